"""The attention implementations the benchmark times side by side, each turned into a zero-argument
runner for one case (forward under ``no_grad``, or forward+backward with the case's upstream gradient).

Families, and the anchor each family's "x torch" ratio is taken against:

* ``function`` rows compute attention only, from ``(B, H, L, E)`` tensors. Anchor: ``sdpa_flash`` (torch
  SDPA with the flash backend forced: torch's fused kernel; on the CPU its fused CPU kernel); where that
  backend refuses the case, ``sdpa_default`` (torch's default dispatch), and the table says so.
* ``module`` rows are ``nn.MultiheadAttention``-style modules: they also run the q/k/v and output
  projections, so their GFLOP/s (attention FLOPs only) is not comparable with the function rows.
  Anchor: ``nn_mha`` (torch's module, need_weights=False).

Mask conventions: every implementation gets the case's ``keep`` (bool, True = attend) and ``bias`` (float,
added) from inputs.py; ``nn.MultiheadAttention`` receives ``key_padding_mask = ~keep`` (True = ignore) and a
bool causal ``attn_mask`` with True = *not* allowed; torch SDPA receives the bool+bias case as one float
mask (-inf where not kept); mha_ext receives ``attn_mask=keep, attn_bias=bias``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from .cases import Mask
from .inputs import SEED, CaseInputs

FUNCTION = "function"
MODULE = "module"

# Ratio anchors per family, in order of preference (the first one that ran the case wins).
ANCHORS = {FUNCTION: ("sdpa_flash", "sdpa_default"), MODULE: ("nn_mha",)}


class Refused(Exception):
    """The implementation does not support this case; the message says why."""


@dataclasses.dataclass
class Outputs:
    """What one call produced: the attention (or module) output and, for forward+backward, the gradients
    of the inputs that require grad, by name."""

    output: torch.Tensor
    grads: dict[str, torch.Tensor]


@dataclasses.dataclass
class Runner:
    """One implementation made ready for one case. ``setting`` (e.g. a forced SDPA backend) is a context
    entered around calls: the timing enters it outside the timed region, since a caller sets it once, not
    per call (``sdpa_kernel`` costs ~10 us per entry, which would skew the small cases)."""

    call: Callable[[], Outputs]
    setting: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def __call__(self) -> Outputs:
        with self.setting():
            return self.call()


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    description: str
    family: str
    devices: tuple[str, ...]
    materialises_scores: bool  # builds (B, H, L, S) score matrices: skipped where those get too big
    prepare: Callable[[CaseInputs], Runner]  # raises Refused
    check_available: Callable[[], object] | None = None  # raises when an optional dependency is missing

    def runs_on(self, device_type: str) -> bool:
        return device_type in self.devices


# ---------------------------------------------------------------------------------------------- runners


def _make_runner(inputs: CaseInputs, attend: Callable[[], torch.Tensor], leaves: dict[str, torch.Tensor],
                 grad_output: torch.Tensor | None, setting=contextlib.nullcontext) -> Runner:
    """Wraps ``attend`` into the case's direction: forward under no_grad, or forward then
    ``backward(grad_output)``. ``leaves`` are the tensors whose gradients fwd+bwd returns (their ``.grad``
    is cleared before every call so calls do not accumulate)."""
    if not inputs.needs_grad:
        def run_forward() -> Outputs:
            with torch.no_grad():
                return Outputs(attend(), {})
        return Runner(run_forward, setting)

    leaves = {name: t for name, t in leaves.items() if t is not None and t.requires_grad}

    def run_forward_backward() -> Outputs:
        for leaf in leaves.values():
            leaf.grad = None
        out = attend()
        out.backward(grad_output)
        return Outputs(out.detach(), {name: leaf.grad for name, leaf in leaves.items()})

    return Runner(run_forward_backward, setting)


def _qkv_leaves(inputs: CaseInputs) -> dict[str, torch.Tensor]:
    return {"query": inputs.query, "key": inputs.key, "value": inputs.value, "bias": inputs.bias}


# -------------------------------------------------------------------------------------------- torch SDPA


def _sdpa_mask_kwargs(inputs: CaseInputs) -> dict:
    """torch SDPA's arguments for the case's mask: one ``attn_mask`` (bool True = attend, or float added)."""
    mask = inputs.case.mask
    kwargs = {"dropout_p": inputs.dropout_p}
    if inputs.case.shape.is_gqa:
        kwargs["enable_gqa"] = True
    if mask is Mask.CAUSAL:
        kwargs["is_causal"] = True
    elif mask is Mask.PADDING:
        kwargs["attn_mask"] = inputs.keep
    elif mask in (Mask.BIAS, Mask.BIAS_GRAD):
        kwargs["attn_mask"] = inputs.bias
    elif mask is Mask.PADDING_BIAS:
        kwargs["attn_mask"] = inputs.keep_and_bias_as_float
    return kwargs


def _sdpa_backend_context(backend_name: str | None):
    if backend_name is None:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return partial(sdpa_kernel, getattr(SDPBackend, backend_name))


def _prepare_sdpa(backend_name: str | None, inputs: CaseInputs) -> Runner:
    kwargs = _sdpa_mask_kwargs(inputs)
    q, k, v = inputs.query, inputs.key, inputs.value

    def attend():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    return _make_runner(inputs, attend, _qkv_leaves(inputs), inputs.grad_output,
                        _sdpa_backend_context(backend_name))


# ---------------------------------------------------------------------------------------------- mha_ext


def _cuda_cores_only():
    """fp16/bf16 on mha_ext's CUDA-core kernels instead of its tensor-core ones."""
    import mha_ext

    return mha_ext.settings(cuda_tensor_cores=False)


def _prepare_mha_ext(inputs: CaseInputs, setting=contextlib.nullcontext) -> Runner:
    import mha_ext

    attention = getattr(mha_ext, "scaled_dot_product_attention", None)
    if attention is None:
        raise Refused("mha_ext.scaled_dot_product_attention is missing")
    mask = inputs.case.mask
    kwargs = {"dropout_p": inputs.dropout_p}
    if inputs.case.shape.is_gqa:
        kwargs["enable_gqa"] = True
    if mask is Mask.CAUSAL:
        kwargs["is_causal"] = True
    if mask.has_keep:
        kwargs["attn_mask"] = inputs.keep  # bool, True = attend
    if mask is Mask.BIAS:
        kwargs["attn_mask"] = inputs.bias  # float attn_mask, as a drop-in caller passes it
    elif mask in (Mask.BIAS_GRAD, Mask.PADDING_BIAS):
        kwargs["attn_bias"] = inputs.bias  # the keyword that carries a gradient / combines with a bool mask
    q, k, v = inputs.query, inputs.key, inputs.value

    def attend():
        return attention(q, k, v, **kwargs)

    return _make_runner(inputs, attend, _qkv_leaves(inputs), inputs.grad_output, setting)


# ------------------------------------------------------------------------------------------ naive (tutorial)


def _prepare_naive(inputs: CaseInputs) -> Runner:
    """Per-head loop as in the tutorials: scores = q_h @ k_h^T * scale (+ bias), masked_fill(-inf),
    softmax, (dropout), @ v_h; heads stacked. Masks are applied as "ignore" masks (True = masked out)."""
    shape = inputs.case.shape
    group = shape.heads_q // shape.heads_kv
    q, k, v, bias, scale, p = inputs.query, inputs.key, inputs.value, inputs.bias, inputs.scale, inputs.dropout_p
    ignore_key = None if inputs.keep is None else ~inputs.keep[:, 0]  # (B, 1, S)
    ignore_future = ~inputs.causal_keep if inputs.is_causal else None  # (L, S)

    def attend():
        heads = []
        for h in range(shape.heads_q):
            scores = torch.matmul(q[:, h], k[:, h // group].transpose(-2, -1)) * scale
            if bias is not None:
                scores = scores + bias[:, h]
            if ignore_key is not None:
                scores = scores.masked_fill(ignore_key, float("-inf"))
            if ignore_future is not None:
                scores = scores.masked_fill(ignore_future, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            if p > 0:
                probs = F.dropout(probs, p)
            heads.append(torch.matmul(probs, v[:, h // group]))
        return torch.stack(heads, dim=1)

    return _make_runner(inputs, attend, _qkv_leaves(inputs), inputs.grad_output)


# ---------------------------------------------------------------------------------------- FlexAttention


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    """One compiled FlexAttention for the run. Every case has its own shapes and mask functions, so it
    recompiles per case: raise dynamo's recompile limit (8 by default) above the number of cases, or later
    cases would silently run FlexAttention uncompiled."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 1024))
    return torch.compile(flex_attention, dynamic=False)


def _prepare_flex(inputs: CaseInputs) -> Runner:
    """torch FlexAttention, compiled; masks as a block mask (keep / causal) and a score_mod (bias)."""
    if inputs.device.type != "cuda":
        raise Refused("FlexAttention is only benchmarked on CUDA")
    if inputs.dropout_p > 0:
        raise Refused("FlexAttention has no dropout")
    from torch.nn.attention.flex_attention import create_block_mask

    shape = inputs.case.shape
    block_mask = None
    if inputs.keep is not None:
        keep_by_key = inputs.keep[:, 0, 0, :]

        def keep_mod(b, h, q_idx, kv_idx):
            return keep_by_key[b, kv_idx]

        block_mask = create_block_mask(keep_mod, shape.batch, None, shape.len_q, shape.len_kv,
                                       device=inputs.device)
    elif inputs.is_causal:
        def causal_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal_mod, None, None, shape.len_q, shape.len_kv, device=inputs.device)
    score_mod = None
    if inputs.bias is not None:
        bias = inputs.bias

        def add_bias(score, b, h, q_idx, kv_idx):
            return score + bias[0, h, q_idx, kv_idx]

        score_mod = add_bias
    flex = _compiled_flex_attention()
    q, k, v = inputs.query, inputs.key, inputs.value

    def attend():
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=shape.is_gqa)

    return _make_runner(inputs, attend, _qkv_leaves(inputs), inputs.grad_output)


# ---------------------------------------------------------------------------------- nn.MultiheadAttention


def _torch_module(inputs: CaseInputs) -> torch.nn.MultiheadAttention:
    """torch's module with fixed random weights (the same for every module row of a case)."""
    shape = inputs.case.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 2)
        module = torch.nn.MultiheadAttention(shape.heads_q * shape.head_dim, shape.heads_q,
                                             dropout=inputs.dropout_p, batch_first=True)
    return module


def _prepare_module(module_class_loader: Callable[[], type], need_weights: bool, inputs: CaseInputs) -> Runner:
    shape = inputs.case.shape
    if shape.is_gqa:
        raise Refused("nn.MultiheadAttention has no grouped-query attention")
    if shape.head_dim_v != shape.head_dim:
        raise Refused("nn.MultiheadAttention heads have one head_dim for keys and values")
    reference = _torch_module(inputs)
    module_class = module_class_loader()
    if module_class is torch.nn.MultiheadAttention:
        module = reference
    else:
        module = module_class(shape.heads_q * shape.head_dim, shape.heads_q, dropout=inputs.dropout_p,
                              batch_first=True)
        module.load_state_dict(reference.state_dict())
    module = module.to(inputs.device, getattr(torch, inputs.case.dtype)).train(inputs.dropout_p > 0)

    query, memory, grad_output = inputs.hidden
    kwargs = {"need_weights": need_weights}
    if inputs.keep is not None:
        kwargs["key_padding_mask"] = ~inputs.keep[:, 0, 0, :]  # (B, S), True = ignore
    if inputs.is_causal:
        kwargs["attn_mask"] = ~inputs.causal_keep  # (L, S), True = not allowed
        kwargs["is_causal"] = True
    bias = inputs.bias
    batch_heads_shape = (shape.batch * shape.heads_q, shape.len_q, shape.len_kv)
    bias_per_call = bias is not None and bias.requires_grad
    if bias is not None and not bias_per_call:
        kwargs["attn_mask"] = bias.expand(shape.batch, -1, -1, -1).reshape(batch_heads_shape)

    def attend():
        if bias_per_call:  # (B*H, L, S) as the module wants; built per call so the gradient reaches `bias`
            kwargs["attn_mask"] = bias.expand(shape.batch, -1, -1, -1).reshape(batch_heads_shape)
        return module(query, memory, memory, **kwargs)[0]

    return _make_runner(inputs, attend, {"query_states": query, "kv_states": memory, "bias": bias}, grad_output)


def _torch_module_class() -> type:
    return torch.nn.MultiheadAttention


def _mha_ext_module_class() -> type:
    from mha_ext.nn import MultiheadAttention

    return MultiheadAttention


# --------------------------------------------------------------------------------------------- registry

CPU_AND_CUDA = ("cpu", "cuda")


def all_implementations() -> list[Implementation]:
    """Every implementation the benchmark knows, in table order (mha_ext first, then the anchors)."""
    both = CPU_AND_CUDA
    return [
        Implementation("mha_ext", "mha_ext.scaled_dot_product_attention", FUNCTION, both, False,
                       _prepare_mha_ext),
        Implementation("mha_ext_cuda_cores", "mha_ext with settings(cuda_tensor_cores=False) (fp16/bf16 on CUDA cores)",
                       FUNCTION, ("cuda",), False, partial(_prepare_mha_ext, setting=_cuda_cores_only)),
        Implementation("sdpa_flash", "torch SDPA, flash backend forced (CPU: torch's fused CPU kernel)",
                       FUNCTION, both, False, partial(_prepare_sdpa, "FLASH_ATTENTION")),
        Implementation("sdpa_default", "torch SDPA, default dispatch", FUNCTION, both, False,
                       partial(_prepare_sdpa, None)),
        Implementation("sdpa_efficient", "torch SDPA, memory-efficient backend forced", FUNCTION, ("cuda",),
                       False, partial(_prepare_sdpa, "EFFICIENT_ATTENTION")),
        Implementation("sdpa_cudnn", "torch SDPA, cuDNN backend forced", FUNCTION, ("cuda",), False,
                       partial(_prepare_sdpa, "CUDNN_ATTENTION")),
        Implementation("sdpa_math", "torch SDPA, math backend forced", FUNCTION, both, True,
                       partial(_prepare_sdpa, "MATH")),
        Implementation("flex_attention", "torch FlexAttention (torch.compile'd)", FUNCTION, ("cuda",), False,
                       _prepare_flex, check_available=_compiled_flex_attention),
        Implementation("naive_per_head", "tutorial-style per-head loop: matmul, masked_fill, softmax, matmul",
                       FUNCTION, both, True, _prepare_naive),
        Implementation("nn_mha", "torch.nn.MultiheadAttention, need_weights=False (with projections)",
                       MODULE, both, False, partial(_prepare_module, _torch_module_class, False)),
        Implementation("nn_mha_weights", "torch.nn.MultiheadAttention, need_weights=True (with projections)",
                       MODULE, both, True, partial(_prepare_module, _torch_module_class, True)),
        Implementation("mha_ext_nn_mha", "mha_ext.nn.MultiheadAttention, need_weights=False", MODULE, both,
                       False, partial(_prepare_module, _mha_ext_module_class, False),
                       check_available=_mha_ext_module_class),
        Implementation("mha_ext_nn_mha_weights", "mha_ext.nn.MultiheadAttention, need_weights=True", MODULE,
                       both, True, partial(_prepare_module, _mha_ext_module_class, True),
                       check_available=_mha_ext_module_class),
    ]


def select_implementations(device_type: str, names=None) -> tuple[list[Implementation], list[str]]:
    """Implementations that run on ``device_type`` (only ``names`` if given), and notes on those left out
    because an optional dependency is missing."""
    known = [impl.name for impl in all_implementations()]
    unknown = [name for name in names or [] if name not in known]
    if unknown:
        raise ValueError(f"unknown implementation(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen, notes = [], []
    for impl in all_implementations():
        if (names and impl.name not in names) or not impl.runs_on(device_type):
            continue
        if impl.check_available is not None:
            try:
                impl.check_available()
            except Exception as exc:
                notes.append(f"{impl.name} left out: {type(exc).__name__}: {exc}")
                continue
        chosen.append(impl)
    return chosen, notes


# ------------------------------------------------------------------------------------ failure reasons

_TORCH_REFUSALS = ("No available kernel", "No viable backend")


def _clean_warning(message: str) -> str:
    return re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", message).strip()


def describe_failure(exc: BaseException, warning_messages: list[str], inputs: CaseInputs) -> tuple[str, str]:
    """(status, reason) for a call that raised: ``"refused"`` when the implementation declined the case
    (mha_ext's NotImplementedError, a forced torch backend with no kernel for it, Refused), else ``"error"``."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if isinstance(exc, Refused):
        return "refused", str(exc)
    if isinstance(exc, NotImplementedError):
        return "refused", text
    if isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _TORCH_REFUSALS):
        said = []
        for message in warning_messages:
            message = _clean_warning(message)
            if message and not message.endswith("not used because:") and message not in said:
                said.append(message)
        if not said and inputs.bias is not None and inputs.bias.requires_grad:
            said.append("the float mask requires grad")
        return "refused", "; ".join(said) or text
    return "error", text
