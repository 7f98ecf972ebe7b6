"""``python -m mha_ext.benchmark --varlen``: packed (varlen) attention on a batch of sequences of different
lengths, against padding (issue 16, item 5).

Lengths: a seeded long-tailed batch, log-normal clipped to [1, max], its median tuned (bisection) so that the
batch's mean length is ``--mean-ratio`` x max (default 0.55); the longest sequence is max, as when a tokenizer
pads a batch to its longest (``padding=True``). Printed with mean / max (the share of real tokens in the padded
batch) and sum(L^2) / (B max^2) (the share of the padded batch's attention work that is real: the FLOP bound of
attention's speed-up from not padding).

Op rows (``--parts op``), the same packed inputs in each implementation's layout, timed side by side in one
process, interleaved (mha_ext.benchmark.timing):

- ``mha_ext_varlen``: :func:`mha_ext.varlen_attention` on (total, H, E) with int32 offsets;
- ``sdpa_padded`` (**the anchor**): torch SDPA on the padded batch (B, H, max, E) with a bool key-padding mask
  (B, 1, 1, max), True = attend; causal rows get ``is_causal=True`` and no mask (torch refuses both at once,
  and with right padding the causal mask already keeps every real query off the padding keys);
- ``sdpa_nested``: torch SDPA on jagged nested tensors (``torch.nested.nested_tensor_from_jagged`` of the
  packed tensors, transposed to (B, H, j, E), built inside the timed call: they are views); where torch refuses
  the case the row says why instead of a time;
- ``mha_ext_padded``: :func:`mha_ext.scaled_dot_product_attention` on the padded batch with the same mask
  (context: the dense kernels on the padded layout).

Before timing, every implementation's first call is checked against a float64 per-sequence reference on the
real (non-padding) tokens: the output and, for fwd+bwd, the gradients of q, k and v. The torch rows' first call
runs under torch.profiler, which names the aten kernel that ran (the ``backend`` column). A call longer than
``--slow-call-s`` (torch's jagged SDPA on the CPU, which runs its math backend sequence by sequence) is not
repeated: its time is that of its checked call.

End-to-end rows (``--parts e2e``): ``transformers.BertModel`` from a ``BertConfig`` with random weights (seeded;
no pooler), eval mode, ``torch.inference_mode`` (``--grad-mode``), float32,
on a padded batch of token ids and its attention_mask:

- ``hf_sdpa_padded`` (**the anchor**): ``attn_implementation="sdpa"`` on the padded batch;
- ``mha_ext_unpadded``: ``attn_implementation="mha_ext"`` through
  ``mha_ext.integrations.transformers.run_unpadded`` (padding stripped, the varlen kernels, outputs back in the
  padded layout: all of it timed);
- ``mha_ext_padded``: ``attn_implementation="mha_ext"`` on the padded batch (context).

Their last_hidden_state must agree on the real tokens before timing. Each row gives the FLOP bound of the whole
model for those lengths (linear layers: sum(L) against B max tokens; attention: sum(L^2) against B max^2), and
one profiled call per implementation splits its time between attention, matrix products and the rest.

Targets on the CPU (issue 16): the op >= 1.5 x ``sdpa_padded`` where mean / max <= 0.6; the encoder >= 1.5 x
``hf_sdpa_padded`` where mean / max ~ 0.55. Missed targets are reported, not an error: the exit status is 1
only when a row failed (an error, or an mha_ext output that does not match). Written: ``NAME.json`` and
``NAME.md`` in ``--out`` (default benchmarks/out/varlen.*).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import logging
import math
import os
import shlex
import statistics
import sys
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from .cases import FORWARD, FORWARD_BACKWARD
from .environment import busy_warning, describe, machine_busy_cpu_s, own_cpu_s
from .report import write_report_files
from .results import TargetResult
from .implementations import Runner
from .timing import TimingPolicy, time_interleaved

OP_TARGET = 1.5              # mha_ext_varlen >= 1.5 x sdpa_padded ...
OP_TARGET_MAX_MEAN = 0.6     # ... on batches whose mean length <= 0.6 x max
E2E_TARGET = 1.5             # mha_ext_unpadded >= 1.5 x hf_sdpa_padded ...
E2E_TARGET_MEAN = (0.5, 0.6)  # ... on batches whose mean length is about 0.55 x max
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
TOLERANCE = {"float32": 2e-3, "bfloat16": 4e-2, "float64": 1e-9}   # gradients: twice that (as the suite)
E2E_TOLERANCE = 2e-3         # last_hidden_state, relative to its largest magnitude

OP_ANCHOR = "sdpa_padded"
OP_IMPLEMENTATIONS = {
    "mha_ext_varlen": "mha_ext.varlen_attention on the packed (total, H, E) tensors",
    "sdpa_padded": "torch SDPA on the padded (B, H, max, E) batch, bool key-padding mask (B, 1, 1, max); "
                   "causal: is_causal=True alone",
    "sdpa_nested": "torch SDPA on jagged nested tensors (B, H, j, E)",
    "mha_ext_padded": "mha_ext.scaled_dot_product_attention on the padded batch, the same mask",
}
E2E_ANCHOR = "hf_sdpa_padded"
E2E_IMPLEMENTATIONS = {
    "hf_sdpa_padded": 'transformers attn_implementation="sdpa", padded batch',
    "mha_ext_unpadded": 'attn_implementation="mha_ext" via mha_ext.integrations.transformers.run_unpadded '
                        "(padding-free, varlen kernels)",
    "mha_ext_padded": 'attn_implementation="mha_ext", padded batch (dense kernels)',
}

# The suite's full policy with at least 5 rounds and a 2 s budget: most calls here take 0.1-15 s, where the
# suite's 3 rounds left the medians +-10% apart from run to run on a 2-core VM.
FULL_POLICY = TimingPolicy(budget_s=2.0, min_repeats=5, max_repeats=40, extra_warmup_below_s=0.25)

OK, REFUSED, MISMATCH, ERROR, UNAVAILABLE = "ok", "refused", "mismatch", "error", "unavailable"


# ------------------------------------------------------------------------------------------ lengths

def long_tailed_lengths(batch: int, max_len: int, mean_ratio: float = 0.55, sigma: float = 0.8,
                        seed: int = 0) -> list[int]:
    """``batch`` lengths in [1, max_len]: exp(mu + sigma z), z standard normal (seeded), rounded and clipped,
    the largest z replaced by +inf (that sequence is max_len long: the batch pads to max_len), mu found by
    bisection so that the mean is as close to mean_ratio x max_len as rounding allows."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"batch and max_len must be positive, got {batch}, {max_len}")
    if not 0.0 < mean_ratio <= 1.0:
        raise ValueError(f"mean_ratio must be in (0, 1], got {mean_ratio}")
    z = torch.randn(batch, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z[int(z.argmax())] = math.inf
    target = mean_ratio * max_len
    low, high = -10.0, math.log(max_len) + 10.0 * max(sigma, 1.0)

    def lengths(mu: float) -> torch.Tensor:
        return (mu + sigma * z).exp().round().clamp(1, max_len)

    for _ in range(200):
        middle = (low + high) / 2
        if float(lengths(middle).mean()) < target:
            low = middle
        else:
            high = middle
    best = min((lengths(low), lengths(high)), key=lambda t: abs(float(t.mean()) - target))
    return [int(x) for x in best.tolist()]


@dataclasses.dataclass(frozen=True)
class LengthStats:
    batch: int
    max_len: int
    lengths: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def mean_ratio(self) -> float:
        """mean / max: the share of the padded batch's tokens that are real (linear layers' FLOP share)."""
        return self.tokens / (self.batch * self.max_len)

    @property
    def attention_share(self) -> float:
        """sum(L^2) / (B max^2): the share of the padded batch's attention work that is real."""
        return sum(n * n for n in self.lengths) / (self.batch * self.max_len ** 2)

    def about(self) -> str:
        ordered = sorted(self.lengths)
        return (f"B={self.batch}, max={self.max_len}: mean {self.tokens / self.batch:.1f} "
                f"(mean/max {self.mean_ratio:.3f}), median {statistics.median(ordered):g}, min {ordered[0]}, "
                f"sum(L^2)/(B*max^2) {self.attention_share:.3f} (attention FLOP bound {1 / self.attention_share:.2f}x)")


# ------------------------------------------------------------------------------------------ CPU load meter

class OthersMeter:
    """The share of the machine's CPU time other processes used between start() and share()."""

    def start(self) -> "OthersMeter":
        self.busy, self.own, self.began = machine_busy_cpu_s(), own_cpu_s(), time.monotonic()
        return self

    def share(self) -> float | None:
        busy, wall = machine_busy_cpu_s(), time.monotonic() - self.began
        if busy is None or self.busy is None or wall <= 0:
            return None
        others = busy - self.busy - (own_cpu_s() - self.own)
        return min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))


# ------------------------------------------------------------------------------------------ op rows

@dataclasses.dataclass(frozen=True)
class OpCase:
    batch: int
    heads: int
    head_dim: int
    max_len: int
    causal: bool
    direction: str
    dtype: str

    @property
    def shape_id(self) -> str:
        return f"B{self.batch}_H{self.heads}_E{self.head_dim}_max{self.max_len}"

    @property
    def id(self) -> str:
        return f"{self.shape_id}/{'causal' if self.causal else 'none'}/{self.direction}/{self.dtype}"

    def useful_flops(self, lengths: LengthStats) -> float:
        """Real tokens only: 4 H E sum(L^2) forward (causal not halved), 3.5 x that forward+backward."""
        forward = 4.0 * self.heads * self.head_dim * sum(n * n for n in lengths.lengths)
        return forward * (3.5 if self.direction == FORWARD_BACKWARD else 1.0)


@dataclasses.dataclass
class OpRow:
    case: str
    implementation: str
    max_len: int
    causal: bool
    direction: str
    dtype: str
    mean_ratio: float
    attention_share: float
    status: str = OK
    note: str = ""
    backend: str = ""
    median_ms: float | None = None
    samples_ms: list = dataclasses.field(default_factory=list)
    anchor_ms: float | None = None      # the anchor's median in the same interleaved group
    ratio: float | None = None          # anchor_ms / median_ms (> 1: faster than torch padded)
    gflops: float | None = None         # useful (real-token) FLOPs / time
    check_error: float | None = None
    others_busy: float | None = None


@dataclasses.dataclass
class OpInputs:
    lengths: torch.Tensor        # (B,) int64
    cu_seqlens: torch.Tensor     # (B + 1,) int32
    keep: torch.Tensor           # (B, max) bool, True = real token
    query: torch.Tensor          # (total, H, E) in the case's dtype
    key: torch.Tensor
    value: torch.Tensor
    grad: torch.Tensor           # (total, H, E), the output's gradient (fwd+bwd)


def make_op_inputs(case: OpCase, lengths: LengthStats, seed: int) -> OpInputs:
    generator = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    total = lengths.tokens

    def randn():
        return torch.randn(total, case.heads, case.head_dim, generator=generator).to(dtype)

    counts = torch.tensor(lengths.lengths, dtype=torch.int64)
    keep = torch.arange(case.max_len)[None, :] < counts[:, None]
    from mha_ext.varlen import cu_seqlens

    return OpInputs(counts, cu_seqlens(counts), keep, randn(), randn(), randn(), randn())


def _pad(packed: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(total, H, E) -> (B, H, max, E), contiguous, zeros on the padding."""
    padded = packed.new_zeros(tuple(keep.shape) + tuple(packed.shape[1:]))
    padded[keep] = packed
    return padded.transpose(1, 2).contiguous()


def _unpad(padded: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, H, max, E) -> (total, H, E): the real tokens."""
    return padded.transpose(1, 2)[keep]


@dataclasses.dataclass
class Prepared:
    call: Callable[[], list]                       # -> [output, (grad q, grad k, grad v)] in its own layout
    to_packed: Callable[[torch.Tensor], torch.Tensor]


def prepare_op(name: str, case: OpCase, inputs: OpInputs) -> Prepared:
    import mha_ext

    backward = case.direction == FORWARD_BACKWARD
    causal, max_len = case.causal, case.max_len
    if name in ("mha_ext_varlen", "sdpa_nested"):
        leaves = [t.clone().requires_grad_(backward) for t in (inputs.query, inputs.key, inputs.value)]
        grad, to_packed = inputs.grad, (lambda t: t)
        if name == "mha_ext_varlen":
            cu = inputs.cu_seqlens

            def forward():
                return mha_ext.varlen_attention(*leaves, cu, cu, max_len, max_len, is_causal=causal)
        else:
            offsets = inputs.cu_seqlens.to(torch.int64)

            def forward():
                nested = [torch.nested.nested_tensor_from_jagged(t, offsets, max_seqlen=max_len).transpose(1, 2)
                          for t in leaves]
                return F.scaled_dot_product_attention(*nested, is_causal=causal).transpose(1, 2).values()
    elif name in ("sdpa_padded", "mha_ext_padded"):
        keep = inputs.keep
        leaves = [_pad(t, keep).requires_grad_(backward) for t in (inputs.query, inputs.key, inputs.value)]
        grad, to_packed = _pad(inputs.grad, keep), (lambda t: _unpad(t, keep))
        mask = None if causal else keep[:, None, None, :]
        function = F.scaled_dot_product_attention if name == "sdpa_padded" else mha_ext.scaled_dot_product_attention

        def forward():
            return function(*leaves, attn_mask=mask, is_causal=causal)
    else:
        raise KeyError(f"unknown op implementation {name!r}; choose from {', '.join(OP_IMPLEMENTATIONS)}")

    def call():
        if not backward:
            with torch.no_grad():
                return [forward()]
        out = forward()
        return [out, *torch.autograd.grad(out, leaves, grad)]

    return Prepared(call, to_packed)


def op_reference(case: OpCase, inputs: OpInputs) -> list[torch.Tensor]:
    """float64, sequence by sequence (torch SDPA's math on each (H, L, E) slice): [output, grads...]."""
    leaves = [t.double().requires_grad_(case.direction == FORWARD_BACKWARD)
              for t in (inputs.query, inputs.key, inputs.value)]
    offsets = inputs.cu_seqlens.tolist()
    pieces = []
    with contextlib.ExitStack() as stack:
        if case.direction == FORWARD:
            stack.enter_context(torch.no_grad())
        for begin, end in zip(offsets[:-1], offsets[1:]):
            if end == begin:
                continue
            q, k, v = (t[begin:end].transpose(0, 1) for t in leaves)
            pieces.append(F.scaled_dot_product_attention(q, k, v, is_causal=case.causal).transpose(0, 1))
        out = torch.cat(pieces)
        if case.direction == FORWARD:
            return [out]
        return [out.detach(), *torch.autograd.grad(out, leaves, inputs.grad.double())]


def relative_error(mine: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    errors = []
    for a, b in zip(mine, reference):
        scale = max(b.abs().max().item(), 1e-30)
        errors.append((a.detach().double() - b.double()).abs().max().item() / scale)
    return errors


class _TorchLog(logging.Handler):
    """Collects what torch's nested SDPA logs when it refuses a case (its reasons), instead of printing it."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage().strip()
        if message and message not in self.messages:
            self.messages.append(message)


QUIET_LOGGERS = ("torch.nested._internal.sdpa",   # why jagged SDPA refuses a case: collected for the row's note
                 "torch.fx._symbolic_trace")      # a one-off is_fx_tracing deprecation warning of nested tensors


@contextlib.contextmanager
def _quiet_torch_logs():
    """Collects what torch logs on QUIET_LOGGERS instead of printing it (and silences Python warnings)."""
    handler = _TorchLog()
    saved = []
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate))
        logger.addHandler(handler)
        logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield handler
    finally:
        for logger, propagate in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate


def profiled_kernels(call: Callable[[], object]) -> tuple[object, str]:
    """Calls ``call`` once under torch.profiler; returns its result and the aten SDPA kernels that ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = call()
    names = sorted({event.key for event in prof.key_averages()
                    if "scaled_dot_product" in event.key and event.key != "aten::scaled_dot_product_attention"})
    return result, ", ".join(name.replace("aten::", "") for name in names)


def _group_timing(prepared: dict[str, Prepared], first_s: dict[str, float], policy: TimingPolicy):
    with warnings.catch_warnings(), _quiet_torch_logs():
        warnings.simplefilter("ignore")
        runners = {name: Runner(p.call) for name, p in prepared.items()}
        return time_interleaved(runners, "cpu", policy, first_s)


def run_op_case(case: OpCase, lengths: LengthStats, names: list[str], policy: TimingPolicy, seed: int,
                slow_call_s: float, reference_cache: dict) -> list[OpRow]:
    """Every implementation of one case: checked, then timed side by side (see the module docstring)."""
    inputs = make_op_inputs(case, lengths, seed)
    key = (case.shape_id, case.causal, case.dtype)
    if key not in reference_cache:  # fwd+bwd's reference serves the forward too
        full = dataclasses.replace(case, direction=FORWARD_BACKWARD)
        reference_cache.clear()
        reference_cache[key] = op_reference(full, inputs)
    reference = reference_cache[key][:1 if case.direction == FORWARD else 4]
    tolerance = TOLERANCE[case.dtype]
    meter = OthersMeter().start()
    rows: dict[str, OpRow] = {}
    prepared: dict[str, Prepared] = {}
    first_s: dict[str, float] = {}
    outputs = None
    for name in names:
        row = rows[name] = OpRow(case.id, name, case.max_len, case.causal, case.direction, case.dtype,
                                 lengths.mean_ratio, lengths.attention_share)
        try:
            ready = prepare_op(name, case, inputs)
            with _quiet_torch_logs() as log:
                began = time.perf_counter()
                try:
                    if name.startswith("sdpa_"):
                        outputs, row.backend = profiled_kernels(ready.call)
                    else:
                        outputs = ready.call()
                except RuntimeError as exc:
                    if name != "sdpa_nested":
                        raise
                    reasons = "; ".join(m for m in log.messages if "not used because" not in m)
                    row.status = REFUSED
                    row.note = f"torch refuses it: {str(exc).splitlines()[0]}" + (f" ({reasons})" if reasons else "")
                    continue
                first_s[name] = time.perf_counter() - began
            errors = relative_error([ready.to_packed(t) for t in outputs], reference)
            row.check_error = max(errors)
            limits = [tolerance] + [2 * tolerance] * (len(errors) - 1)
            if any(not e <= limit for e, limit in zip(errors, limits)):
                row.status = MISMATCH
                row.note = ("differs from the float64 reference on the real tokens: "
                            + ", ".join(f"{what} {e:.2g}" for what, e in zip(("out", "dq", "dk", "dv"), errors)))
                continue
            prepared[name] = ready
        except Exception as exc:  # noqa: BLE001  (reported in the row)
            row.status, row.note = ERROR, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    del outputs  # the last checked call's tensors: freed before timing
    slow = [n for n in prepared if first_s[n] > slow_call_s]
    for name in slow:  # too slow to repeat: its checked call is its time
        rows[name].samples_ms = [first_s[name] * 1e3]
        rows[name].median_ms = first_s[name] * 1e3
        rows[name].note = (f"one call (its checked call, {first_s[name]:.1f} s, under the profiler): calls over "
                           f"--slow-call-s {slow_call_s:g} s are not repeated")
    timings = _group_timing({n: p for n, p in prepared.items() if n not in slow}, first_s, policy)
    for name, timing in timings.items():
        rows[name].samples_ms = [s * 1e3 for s in timing.samples_s]
        rows[name].median_ms = timing.median_s * 1e3
    anchor = rows.get(OP_ANCHOR)
    flops = case.useful_flops(lengths)
    share = meter.share()
    for row in rows.values():
        row.others_busy = share
        if row.median_ms:
            row.gflops = flops / (row.median_ms * 1e-3) / 1e9
            if anchor is not None and anchor.median_ms:
                row.anchor_ms = anchor.median_ms
                row.ratio = anchor.median_ms / row.median_ms
    return list(rows.values())


# ------------------------------------------------------------------------------------------ end to end

@dataclasses.dataclass(frozen=True)
class EncoderShape:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_position: int = 512
    vocab: int = 30522
    about: str = ""

    def config(self):
        from transformers import BertConfig

        return BertConfig(vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
                          num_attention_heads=self.heads, intermediate_size=self.intermediate,
                          max_position_embeddings=self.max_position)

    def flops(self, tokens: int, square_tokens: int) -> tuple[float, float]:
        """(linear layers, attention) FLOPs of one forward: per layer and token 2 (4 h^2 + 2 h I) (q, k, v,
        output and the two feed-forward matrices); per layer 4 h sum(L^2) for the scores and their product
        with V. Embeddings, layer norms, GELU and softmax are left out (small)."""
        linear = self.layers * tokens * 2.0 * (4 * self.hidden ** 2 + 2 * self.hidden * self.intermediate)
        attention = self.layers * square_tokens * 4.0 * self.hidden
        return linear, attention


ENCODERS = {
    "minilm_l6": EncoderShape("minilm_l6", 384, 6, 12, 1536, about="all-MiniLM-L6-v2's shapes"),
    "bert_base": EncoderShape("bert_base", 768, 12, 12, 3072, about="BERT-base's shapes"),
}
QUICK_ENCODER = EncoderShape("tiny_bert", 64, 2, 4, 128, max_position=128, vocab=1000, about="tiny (--quick)")
# The padded batches' max lengths per encoder (--e2e-max-lens replaces them): MiniLM is mostly used at 128 (its
# sentence-transformers default is 256); BERT-base at 512 takes ~30 s a call on 2 cores, left to the option.
E2E_MAX_LENS = {"minilm_l6": [128, 256, 512], "bert_base": [128, 256], "tiny_bert": [32]}


def encoder_flop_bound(shape: EncoderShape, lengths: LengthStats) -> dict:
    """The padded batch's FLOPs over the padding-free batch's: what skipping padding can gain at best."""
    padded = shape.flops(lengths.batch * lengths.max_len, lengths.batch * lengths.max_len ** 2)
    unpadded = shape.flops(lengths.tokens, sum(n * n for n in lengths.lengths))
    return {"padded_gflop": sum(padded) / 1e9, "unpadded_gflop": sum(unpadded) / 1e9,
            "attention_share_padded": padded[1] / sum(padded), "bound": sum(padded) / sum(unpadded)}


@dataclasses.dataclass
class E2ERow:
    case: str
    model: str
    implementation: str
    batch: int
    max_len: int
    mean_ratio: float
    flop_bound: float
    status: str = OK
    note: str = ""
    median_ms: float | None = None
    samples_ms: list = dataclasses.field(default_factory=list)
    anchor_ms: float | None = None
    ratio: float | None = None              # anchor_ms / median_ms
    tokens_per_s: float | None = None       # real tokens per second
    check_error: float | None = None
    others_busy: float | None = None
    profile_ms: dict = dataclasses.field(default_factory=dict)   # one profiled call: attention / matmul / other


def _unpadded_runner():
    """mha_ext.integrations.transformers.run_unpadded, or the reason it is not there."""
    try:
        from mha_ext.integrations import transformers as integration
    except Exception as exc:  # noqa: BLE001
        return None, f"mha_ext.integrations.transformers: {type(exc).__name__}: {exc}"
    function = getattr(integration, "run_unpadded", None)
    if function is None:
        return None, "mha_ext.integrations.transformers.run_unpadded does not exist in this checkout"
    return function, ""


def _last_hidden_state(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0]


PROFILE_GROUPS = (
    ("attention", ("scaled_dot_product", "mha_ext::", "varlen_attention", "attention_forward")),
    ("matmul", ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
)


def profile_split(call: Callable[[], object]) -> dict:
    """One call under torch.profiler: ms of the calling thread in attention kernels, in matrix products and
    in everything else (self times; torch's intra-op threads work inside the op that started them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        began = time.perf_counter()
        call()
        wall = time.perf_counter() - began
    split = {group: 0.0 for group, _ in PROFILE_GROUPS}
    split["other"] = 0.0
    top_other: dict[str, float] = {}
    for event in prof.key_averages():
        self_ms = event.self_cpu_time_total / 1e3
        for group, patterns in PROFILE_GROUPS:
            if any(p in event.key for p in patterns):
                split[group] += self_ms
                break
        else:
            split["other"] += self_ms
            top_other[event.key] = top_other.get(event.key, 0.0) + self_ms
    split["wall"] = wall * 1e3
    split["top_other"] = ", ".join(f"{k.replace('aten::', '')} {v:.0f}" for k, v in
                                   sorted(top_other.items(), key=lambda kv: -kv[1])[:4])
    return split


GRAD_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


def run_e2e_case(shape: EncoderShape, lengths: LengthStats, names: list[str], policy: TimingPolicy, seed: int,
                 profile: bool, grad_mode: str = "inference_mode") -> list[E2ERow]:
    import transformers  # noqa: F401  (fails here, as one error row per implementation, when missing)
    from transformers import BertModel

    case_id = f"{shape.name}/B{lengths.batch}_max{lengths.max_len}"
    bound = encoder_flop_bound(shape, lengths)
    rows = {name: E2ERow(case_id, shape.name, name, lengths.batch, lengths.max_len, lengths.mean_ratio,
                         bound["bound"]) for name in names}
    torch.manual_seed(seed)
    base = BertModel(shape.config(), add_pooling_layer=False).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    counts = torch.tensor(lengths.lengths)
    keep = torch.arange(lengths.max_len)[None, :] < counts[:, None]
    input_ids = torch.randint(1000 if shape.vocab > 2000 else 1, shape.vocab, (lengths.batch, lengths.max_len),
                              generator=generator)
    input_ids[~keep] = 0  # [PAD]
    batch = {"input_ids": input_ids, "attention_mask": keep.to(torch.int64),
             "token_type_ids": torch.zeros_like(input_ids)}
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    for name in names:
        row = rows[name]
        try:
            if name == "mha_ext_unpadded":
                run_unpadded, why = _unpadded_runner()
                if run_unpadded is None:
                    row.status, row.note = UNAVAILABLE, why
                    continue
            if name != "hf_sdpa_padded":
                from mha_ext.integrations.transformers import register

                register()
            model = base if name == "hf_sdpa_padded" else copy.deepcopy(base)
            model.set_attn_implementation("sdpa" if name == "hf_sdpa_padded" else "mha_ext")
            mode = GRAD_MODES[grad_mode]
            if name == "mha_ext_unpadded":
                def call(model=model, run_unpadded=run_unpadded, mode=mode):
                    with mode():
                        return _last_hidden_state(run_unpadded(model, **batch))
            else:
                def call(model=model, mode=mode):
                    with mode():
                        return _last_hidden_state(model(**batch))
            calls[name] = call
        except Exception as exc:  # noqa: BLE001
            row.status, row.note = ERROR, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    meter = OthersMeter().start()
    first_s, outputs = {}, {}
    for name, call in list(calls.items()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                began = time.perf_counter()
                outputs[name] = call()[keep]
                first_s[name] = time.perf_counter() - began
        except Exception as exc:  # noqa: BLE001
            rows[name].status, rows[name].note = ERROR, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            del calls[name]
    reference = outputs.get(E2E_ANCHOR)
    if reference is not None:
        for name in list(calls):
            [error] = relative_error([outputs[name]], [reference])
            rows[name].check_error = error
            if not error <= E2E_TOLERANCE:
                rows[name].status = MISMATCH
                rows[name].note = f"last_hidden_state differs from {E2E_ANCHOR}'s on the real tokens by {error:.2g}"
                del calls[name]
    outputs.clear()
    timings = time_interleaved({n: Runner(c) for n, c in calls.items()}, "cpu", policy, first_s)
    share = meter.share()
    anchor = timings.get(E2E_ANCHOR)
    for name, timing in timings.items():
        row = rows[name]
        row.samples_ms = [s * 1e3 for s in timing.samples_s]
        row.median_ms = timing.median_s * 1e3
        row.tokens_per_s = lengths.tokens / timing.median_s
        row.others_busy = share
        if anchor is not None:
            row.anchor_ms = anchor.median_s * 1e3
            row.ratio = anchor.median_s / timing.median_s
    if profile:
        for name, call in calls.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows[name].profile_ms = profile_split(call)
    return list(rows.values())


# ------------------------------------------------------------------------------------------ targets

def evaluate_targets(op_rows: list[OpRow], e2e_rows: list[E2ERow], judged: bool = True) -> list[TargetResult]:
    """The two CPU targets of issue 16 item 5; ``judged=False`` (--quick) gives each its rows, not a verdict."""
    targets = []
    for description, needs, rows, limit in (
        (f"op: mha_ext_varlen / {OP_ANCHOR} (key-padding mask), every op row with mean/max <= {OP_TARGET_MAX_MEAN}",
         f">= {OP_TARGET}", [r for r in op_rows if r.implementation == "mha_ext_varlen"
                               and r.mean_ratio <= OP_TARGET_MAX_MEAN + 1e-9], OP_TARGET),
        (f"end to end: mha_ext_unpadded / {E2E_ANCHOR}, every encoder row with mean/max in "
         f"[{E2E_TARGET_MEAN[0]}, {E2E_TARGET_MEAN[1]}]", f">= {E2E_TARGET}",
         [r for r in e2e_rows if r.implementation == "mha_ext_unpadded"
          and E2E_TARGET_MEAN[0] - 1e-9 <= r.mean_ratio <= E2E_TARGET_MEAN[1] + 1e-9], E2E_TARGET),
    ):
        target = TargetResult(description, needs, len(rows), "", None)
        failed = [r for r in rows if r.ratio is None]
        timed = [r for r in rows if r.ratio is not None]
        if failed:
            target.worst = f"{failed[0].status.upper()} ({failed[0].case})"
            target.passed = False
        elif timed:
            worst = min(timed, key=lambda r: r.ratio)
            target.worst = f"{worst.ratio:.2f} ({worst.case})"
            target.passed = all(r.ratio >= limit for r in timed)
        if not rows:
            target.note = "no row measured"
        if not judged:
            target.passed, target.note = None, "not judged in --quick runs (tiny shapes)"
        targets.append(target)
    return targets


# ------------------------------------------------------------------------------------------ report

def _num(value, digits=1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _span(samples, digits) -> str:
    return f"{min(samples):,.{digits}f}-{max(samples):,.{digits}f}" if len(samples) > 1 else ""


def _error(value) -> str:
    return "" if value is None else f"{value:.1e}"


def _percent(fraction) -> str:
    return "" if fraction is None else f"{fraction:.0%}"


def _verdict(target: dict) -> str:
    if target["passed"] is None:
        return target["note"] or "not measured"
    return "yes" if target["passed"] else "NO"


def _note(row: dict) -> str:
    note = row["note"] if row["status"] == OK else f"{row['status'].upper()} {row['note']}"
    return note.replace("\n", " ").replace("|", "/")[:400]


def header_lines(report: dict) -> list[str]:
    env, settings = report["environment"], report["settings"]
    busy = env.get("cpu_busy_before_run")
    lines = [
        f"command: `{report['command']}`",
        f"date: {report['date']}; wall time of the run {report['elapsed_s']:.0f} s",
        f"CPU: {env['cpu']} ({env['cpu_count']} logical CPUs), {env['threads']} torch threads; at the start: "
        f"1-minute load average {env.get('load_average_1min')}, CPU busy with other processes "
        + ("unknown" if busy is None else f"{busy:.0%}"),
        f"torch {env['torch']}, transformers {settings.get('transformers') or 'not installed'}, Python "
        f"{env['python']}; mha_ext {env.get('mha_ext', {}).get('version', '?')}",
        f"lengths: log-normal (sigma {settings['sigma']}) clipped to [1, max], median tuned so mean = "
        f"{settings['mean_ratio']} x max, longest = max, seed {settings['seed']}",
        f"timing: one checked call, then interleaved rounds (budget {settings['timing']['budget_s']} s per "
        f"implementation, {settings['timing']['min_repeats']}-{settings['timing']['max_repeats']} rounds); median",
    ]
    lines += [f"lengths {about}" for about in report["lengths"].values()]
    return lines


EXPLAINED = (
    "Columns: `ms` median time of one call (`min-max ms`: the fastest and slowest timed call); `x torch` = the "
    "anchor's median in the same interleaved rounds / this row's (> 1: faster than torch on the padded batch; "
    "op rows: `sdpa_padded`, encoder rows: `hf_sdpa_padded`); "
    "`GFLOP/s` useful work (real tokens only: 4·H·E·ΣL² forward, 3.5× that forward+backward) over the time; "
    "`backend` the aten kernel torch ran (from torch.profiler on the checked call); `err` largest difference from "
    "the reference on the real tokens, relative to its largest magnitude (op rows: float64 per-sequence "
    "reference, output and gradients; encoder rows: `hf_sdpa_padded`'s last_hidden_state); `others %` the share of "
    "the machine's CPU time other processes used while the case ran (/proc/stat): above a few percent the times "
    "are not trustworthy on a 2-core machine."
)


def markdown_section(report: dict, level: int = 1) -> str:
    h = "#" * level
    parts = [f"{h} mha_ext packed (varlen) attention benchmark (`--varlen`)", ""]
    parts += [f"- {line}" for line in header_lines(report)] + ["", EXPLAINED, ""]
    if report["op_rows"]:
        parts += [f"{h}# Op: varlen attention against padding", "",
                  "| case | mean/max | ΣL²/(B·max²) | implementation | backend | ms | min-max ms | x torch | "
                  "GFLOP/s | err | others % | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["op_rows"]:
            parts.append(f"| {r['case']} | {r['mean_ratio']:.3f} | {r['attention_share']:.3f} | "
                         f"{r['implementation']} | {r['backend']} | {_num(r['median_ms'], 2)} | "
                         f"{_span(r['samples_ms'], 2)} | {_num(r['ratio'], 2)} | {_num(r['gflops'])} | "
                         f"{_error(r['check_error'])} | {_percent(r['others_busy'])} | {_note(r)} |")
        parts.append("")
    if report["e2e_rows"]:
        parts += [f"{h}# End to end: BERT-size encoder (random weights, float32, inference)", "",
                  "| model | batch | mean/max | FLOP bound | implementation | ms | min-max ms | x sdpa | tokens/s | "
                  "err | others % | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["e2e_rows"]:
            err = _error(r["check_error"])
            parts.append(f"| {r['model']} | B={r['batch']}, max {r['max_len']} | {r['mean_ratio']:.3f} | "
                         f"{r['flop_bound']:.2f}x | {r['implementation']} | {_num(r['median_ms'], 1)} | "
                         f"{_span(r['samples_ms'], 1)} | "
                         f"{_num(r['ratio'], 2)} | {_num(r['tokens_per_s'], 0)} | {err} | "
                         f"{_percent(r['others_busy'])} | {_note(r)} |")
        bounds = report.get("e2e_bounds", {})
        if bounds:
            parts += ["", "FLOP bound of the whole model (linear layers ∝ ΣL against B·max tokens, attention "
                      "∝ ΣL² against B·max²; embeddings, norms and activations left out):", "",
                      "| model | batch | padded GFLOP | padding-free GFLOP | attention share (padded) | bound |",
                      "|---|---|---|---|---|---|"]
            for key, b in bounds.items():
                model, batch = key.split("/", 1)
                parts.append(f"| {model} | {batch} | {b['padded_gflop']:,.1f} | {b['unpadded_gflop']:,.1f} | "
                             f"{b['attention_share_padded']:.1%} | {b['bound']:.2f}x |")
        profiled = [r for r in report["e2e_rows"] if r.get("profile_ms")]
        if profiled:
            parts += ["", "Where the time goes (one call under torch.profiler, self time of each op on the calling "
                      "thread, ms; profiler overhead included):", "",
                      "| model | batch | implementation | wall | attention | matmul | other | largest others |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in profiled:
                p = r["profile_ms"]
                parts.append(f"| {r['model']} | B={r['batch']}, max {r['max_len']} | {r['implementation']} | "
                             f"{p['wall']:,.1f} | {p['attention']:,.1f} | {p['matmul']:,.1f} | {p['other']:,.1f} | "
                             f"{p['top_other']} |")
        parts.append("")
    parts += [f"{h}# Targets (issue 16, CPU)", "", "| target | needs | rows | worst | met |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        parts.append(f"| {t['description']} | {t['threshold']} | {t['rows']} | {t['worst']} | {_verdict(t)} |")
    if report["notes"]:
        parts += ["", *[f"- note: {n}" for n in report["notes"]]]
    return "\n".join(parts) + "\n"


def console_table(report: dict) -> str:
    lines = []
    if report["op_rows"]:
        lines.append(f"{'op case':42} {'implementation':15} {'ms':>10} {'x torch':>8} {'GFLOP/s':>8} {'err':>8} "
                     f"{'others':>6}  note")
        for r in report["op_rows"]:
            err = _error(r["check_error"])
            lines.append(f"{r['case']:42} {r['implementation']:15} {_num(r['median_ms'], 2):>10} "
                         f"{_num(r['ratio'], 2):>8} {_num(r['gflops']):>8} {err:>8} {_percent(r['others_busy']):>6}"
                         f"  {_note(r)[:90]}")
    if report["e2e_rows"]:
        lines.append(f"{'encoder case':26} {'bound':>6} {'implementation':17} {'ms':>10} {'x sdpa':>7} {'tokens/s':>9} "
                     f"{'err':>8} {'others':>6}  note")
        for r in report["e2e_rows"]:
            err = _error(r["check_error"])
            lines.append(f"{r['case']:26} {r['flop_bound']:>5.2f}x {r['implementation']:17} "
                         f"{_num(r['median_ms'], 1):>10} {_num(r['ratio'], 2):>7} {_num(r['tokens_per_s'], 0):>9} "
                         f"{err:>8} {_percent(r['others_busy']):>6}  {_note(r)[:90]}")
    for t in report["targets"]:
        lines.append(f"target: {t['description']} {t['threshold']}: worst {t['worst'] or '-'} -> {_verdict(t)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command line

def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def _name_list(choices) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mha_ext.benchmark --varlen",
        description="Packed (varlen) attention on a long-tailed batch of lengths against padding: the op against "
        "torch SDPA on the padded batch and on jagged nested tensors, and a BERT-size encoder, transformers sdpa "
        "padded against mha_ext padding-free (issue 16).")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (seconds)")
    parser.add_argument("--parts", type=_name_list(("op", "e2e")), default=["op", "e2e"],
                        help="comma list: op, e2e (default both)")
    parser.add_argument("--batch", type=int, help="B (default 32; --quick 8 for the op, 4 end to end)")
    parser.add_argument("--max-lens", type=_int_list, help="op rows' max lengths (default 512,128; --quick 64)")
    parser.add_argument("--heads", type=int, help="op rows' H (default 12; --quick 2)")
    parser.add_argument("--head-dim", type=int, help="op rows' E (default 64; --quick 16)")
    parser.add_argument("--dtypes", type=_name_list(("float32", "bfloat16")),
                        help="op rows' dtypes (default float32,bfloat16; --quick float32)")
    parser.add_argument("--directions", type=_name_list((FORWARD, FORWARD_BACKWARD)),
                        help="op rows' directions (default fwd,fwd+bwd)")
    parser.add_argument("--op-impls", type=_name_list(tuple(OP_IMPLEMENTATIONS)),
                        help="op implementations (default all: " + ", ".join(OP_IMPLEMENTATIONS) + ")")
    parser.add_argument("--models", type=_name_list(tuple(ENCODERS)),
                        help="encoders (default minilm_l6,bert_base; --quick a tiny one)")
    parser.add_argument("--e2e-max-lens", type=_int_list,
                        help="encoder batches' max lengths (default minilm_l6 128,256,512, bert_base 128,256; "
                        "--quick 32)")
    parser.add_argument("--mean-ratio", type=float, default=0.55, help="mean length / max (default %(default)s)")
    parser.add_argument("--sigma", type=float, default=0.8,
                        help="log-normal sigma of the lengths (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="lengths, inputs and weights (default %(default)s)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--budget", type=float, help="seconds of timing per implementation and case "
                        "(default 2, at least 5 rounds; --quick 0.03, at least 5 rounds)")
    parser.add_argument("--slow-call-s", type=float, default=10.0,
                        help="op calls slower than this are timed once (their checked call) (default %(default)s)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled call of each encoder row")
    parser.add_argument("--grad-mode", choices=("inference_mode", "no_grad"), default="inference_mode",
                        help="the encoder rows' autograd mode (default %(default)s)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "out"), help="output folder (default %(default)s)")
    parser.add_argument("--name", default="varlen", help="output file stem (default %(default)s)")
    return parser


def _transformers_version() -> str | None:
    try:
        import transformers
    except Exception:  # noqa: BLE001
        return None
    return transformers.__version__


def main(argv=None) -> int:
    """``python -m mha_ext.benchmark --varlen [options]``; argv without the ``--varlen`` flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    quick = args.quick
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = TimingPolicy.quick() if quick else FULL_POLICY
    if args.budget is not None:
        policy = TimingPolicy(args.budget, policy.min_repeats, policy.max_repeats, policy.extra_warmup_below_s)
    op_batch = args.batch or (8 if quick else 32)
    e2e_batch = args.batch or (4 if quick else 32)
    max_lens = args.max_lens or ([64] if quick else [512, 128])
    heads = args.heads or (2 if quick else 12)
    head_dim = args.head_dim or (16 if quick else 64)
    dtypes = args.dtypes or (["float32"] if quick else ["float32", "bfloat16"])
    directions = args.directions or [FORWARD, FORWARD_BACKWARD]
    op_names = args.op_impls or list(OP_IMPLEMENTATIONS)
    if OP_ANCHOR not in op_names:
        op_names = [OP_ANCHOR] + op_names
    encoders = [QUICK_ENCODER] if quick and not args.models else [ENCODERS[m] for m in
                                                                  (args.models or ["minilm_l6", "bert_base"])]
    e2e_max_lens = args.e2e_max_lens  # None: E2E_MAX_LENS
    if not 0 < args.mean_ratio <= 1:
        parser.error("--mean-ratio must be in (0, 1]")
    for shape in encoders:
        if any(m > shape.max_position for m in e2e_max_lens or E2E_MAX_LENS[shape.name]):
            parser.error(f"--e2e-max-lens: {shape.name} has {shape.max_position} positions")

    started = time.perf_counter()
    command = shlex.join(["python", "-m", "mha_ext.benchmark", "--varlen"] + argv)
    environment = describe(torch.device("cpu"))
    notes = []
    warning = busy_warning(environment)
    if warning:
        notes.append(warning)
    lengths_of: dict[tuple[int, int], LengthStats] = {}

    def lengths_for(batch: int, max_len: int) -> LengthStats:
        if (batch, max_len) not in lengths_of:
            lengths_of[batch, max_len] = LengthStats(batch, max_len, tuple(long_tailed_lengths(
                batch, max_len, args.mean_ratio, args.sigma, args.seed)))
        return lengths_of[batch, max_len]

    print(f"{command}\n{environment['cpu']} ({environment['cpu_count']} CPUs), {environment['threads']} threads, "
          f"torch {environment['torch']}, transformers {_transformers_version()}; load average "
          f"{environment.get('load_average_1min')}", flush=True)
    for note in notes:
        print("note:", note, flush=True)

    op_rows: list[OpRow] = []
    if "op" in args.parts:
        cases = [OpCase(op_batch, heads, head_dim, m, causal, direction, dtype)
                 for m in max_lens for dtype in dtypes for causal in (False, True) for direction in directions]
        reference_cache: dict = {}
        for m in max_lens:
            print("lengths", lengths_for(op_batch, m).about(), flush=True)
        for index, case in enumerate(cases):
            print(f"[{time.perf_counter() - started:5.0f} s] op {index + 1}/{len(cases)} {case.id} ...", flush=True)
            rows = run_op_case(case, lengths_for(op_batch, case.max_len), op_names, policy, args.seed,
                               args.slow_call_s, reference_cache)
            for r in rows:
                print(f"    {r.implementation:15} {_num(r.median_ms, 2):>10} ms {_num(r.ratio, 2):>6}x "
                      f"{r.status if r.status != OK else ''} {r.backend} {r.note[:100]}".rstrip(), flush=True)
            op_rows += rows

    e2e_rows: list[E2ERow] = []
    e2e_bounds: dict[str, dict] = {}
    if "e2e" in args.parts:
        for shape in encoders:
            for m in e2e_max_lens or E2E_MAX_LENS[shape.name]:
                lengths = lengths_for(e2e_batch, m)
                e2e_bounds[f"{shape.name}/B={e2e_batch}, max {m}"] = bound = encoder_flop_bound(shape, lengths)
                print(f"[{time.perf_counter() - started:5.0f} s] encoder {shape.name} ({shape.about}) "
                      f"{lengths.about()}; whole-model FLOP bound {bound['bound']:.2f}x ...", flush=True)
                try:
                    rows = run_e2e_case(shape, lengths, list(E2E_IMPLEMENTATIONS), policy, args.seed,
                                        not args.no_profile, args.grad_mode)
                except Exception as exc:  # noqa: BLE001  (transformers missing, or the model fails to build)
                    rows = [E2ERow(f"{shape.name}/B{e2e_batch}_max{m}", shape.name, name, e2e_batch, m,
                                   lengths.mean_ratio, bound["bound"], ERROR,
                                   f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                            for name in E2E_IMPLEMENTATIONS]
                for r in rows:
                    print(f"    {r.implementation:17} {_num(r.median_ms, 1):>10} ms {_num(r.ratio, 2):>6}x "
                          f"{r.status if r.status != OK else ''} {r.note[:100]}".rstrip(), flush=True)
                e2e_rows += rows

    targets = evaluate_targets(op_rows, e2e_rows, judged=not quick)
    report = {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "environment": environment,
        "settings": {"quick": quick, "parts": args.parts, "mean_ratio": args.mean_ratio, "sigma": args.sigma,
                     "seed": args.seed, "timing": vars(policy), "slow_call_s": args.slow_call_s,
                     "op_implementations": {n: OP_IMPLEMENTATIONS[n] for n in op_names},
                     "e2e_implementations": E2E_IMPLEMENTATIONS, "grad_mode": args.grad_mode,
                     "encoders": [dataclasses.asdict(s) for s in encoders],
                     "transformers": _transformers_version()},
        "elapsed_s": time.perf_counter() - started,
        "lengths": {f"B={s.batch}, max {s.max_len}": s.about() for s in lengths_of.values()},
        "length_lists": {f"B={s.batch}, max {s.max_len}": list(s.lengths) for s in lengths_of.values()},
        "op_rows": [dataclasses.asdict(r) for r in op_rows],
        "e2e_rows": [dataclasses.asdict(r) for r in e2e_rows],
        "e2e_bounds": e2e_bounds,
        "targets": [dataclasses.asdict(t) for t in targets],
        "notes": notes,
    }
    json_path, markdown_path = write_report_files(report, args.out, args.name, markdown_section(report))
    print(console_table(report))
    for note in notes:
        print("note:", note)
    print("wrote", json_path, markdown_path, flush=True)
    failed = [r for r in op_rows + e2e_rows if r.status == ERROR
              or (r.status == MISMATCH and r.implementation.startswith("mha_ext"))]
    return 1 if failed else 0
