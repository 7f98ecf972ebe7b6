"""What the benchmark measures: attention shapes x masks x directions x dtypes, and their FLOP counts.

A :class:`Case` is one measurement point; every implementation is timed on the same case side by side.
Case ids read ``shape/mask/direction/dtype`` (e.g. ``bert_L512/bool_pad50/fwd/float32``) and are what
``--filter`` matches.

FLOP counting (:func:`attention_flops`) is the *dense* count for every implementation and every mask:
forward ``2*B*Hq*L*S*(E + Ev)`` (Q@K^T plus P@V), forward+backward ``(1 + 2.5) *`` that (backward =
2.5x forward, the FlashAttention convention: it recomputes Q@K^T and does four more products).
Work that a causal or padding mask lets a kernel skip is *not* subtracted, so GFLOP/s is "dense-equivalent"
throughput and comparable across implementations and masks.
"""

from __future__ import annotations

import dataclasses
import enum

FORWARD = "fwd"
FORWARD_BACKWARD = "fwd+bwd"
DIRECTIONS = (FORWARD, FORWARD_BACKWARD)

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

BACKWARD_FLOP_FACTOR = 2.5
FLOP_CONVENTION = (
    "GFLOP/s use the dense FLOP count for every implementation and mask: forward 2*B*Hq*L*S*(E+Ev), "
    "forward+backward 3.5x forward (backward = 2.5x forward, FlashAttention's convention); work a causal "
    "or padding mask lets a kernel skip is not subtracted."
)


class Mask(str, enum.Enum):
    """How a case masks attention. Conventions (the same tensors feed every implementation):

    * ``keep`` (bool, shape ``(B, 1, 1, S)``): True = the key is attended (torch SDPA / mha_ext convention).
      ``nn.MultiheadAttention`` gets ``key_padding_mask = ~keep`` because there True = ignore.
    * ``bias`` (float, shape ``(1, Hq, L, S)``, the query dtype): added to the scaled scores, per head
      (relative-position / ALiBi style), shared across the batch.
    * causal: ``is_causal=True``, top-left aligned as in torch SDPA (query i sees keys 0..i).
    """

    NONE = "none"
    CAUSAL = "causal"
    PADDING = "bool_pad50"  # bool keep-mask, the last 50% of every sequence's keys padded
    BIAS = "float_bias"  # float bias, constant (no gradient)
    BIAS_GRAD = "bias_grad"  # float bias that requires grad (forward+backward only)
    PADDING_BIAS = "bool+bias"  # bool keep-mask and float bias together
    DROPOUT = "dropout10"  # no mask, dropout_p = 0.1 in training (forward+backward only; not checked)

    @property
    def has_keep(self) -> bool:
        return self in (Mask.PADDING, Mask.PADDING_BIAS)

    @property
    def has_bias(self) -> bool:
        return self in (Mask.BIAS, Mask.BIAS_GRAD, Mask.PADDING_BIAS)

    @property
    def dropout_p(self) -> float:
        return 0.1 if self is Mask.DROPOUT else 0.0

    @property
    def directions(self) -> tuple[str, ...]:
        """Directions this mask makes sense in: a bias's gradient and dropout only matter in training."""
        return (FORWARD_BACKWARD,) if self in (Mask.BIAS_GRAD, Mask.DROPOUT) else DIRECTIONS


ALL_MASKS = (Mask.NONE, Mask.CAUSAL, Mask.PADDING, Mask.BIAS, Mask.BIAS_GRAD, Mask.PADDING_BIAS)
PLAIN_MASKS = (Mask.NONE, Mask.CAUSAL, Mask.PADDING, Mask.BIAS)
# Masks as nn.MultiheadAttention users pass them (none, a causal attn_mask, a key_padding_mask): the module
# rows run with these only; per-head float biases are exercised by the attention rows.
MODULE_MASKS = (Mask.NONE, Mask.CAUSAL, Mask.PADDING)


@dataclasses.dataclass(frozen=True)
class Shape:
    """Attention problem size: query ``(B, Hq, L, E)``, key ``(B, Hkv, S, E)``, value ``(B, Hkv, S, Ev)``."""

    name: str
    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_kv: int
    head_dim: int
    head_dim_v: int
    about: str = ""
    # nn.MultiheadAttention-style rows (which add the q/k/v/out projections) run on BERT-like shapes only
    # (and with MODULE_MASKS): on long and decode shapes the projections would dominate (decode would
    # re-project the whole cache).
    with_modules: bool = False

    @property
    def is_gqa(self) -> bool:
        return self.heads_q != self.heads_kv

    @property
    def is_decode(self) -> bool:
        return self.len_q == 1

    def scores_bytes(self, element_size: int = 4) -> int:
        """Size of one materialised ``(B, Hq, L, S)`` score/probability matrix."""
        return self.batch * self.heads_q * self.len_q * self.len_kv * element_size

    def shrunk(self) -> "Shape":
        """A tiny shape of the same kind (GQA, decode, Ev) used to warm libraries up before a measurement."""
        len_q = 1 if self.is_decode else 16
        return dataclasses.replace(self, name=self.name + "_tiny", batch=1, len_q=len_q, len_kv=16)


def _shape(name, batch, heads_q, length_q, length_kv, head_dim, heads_kv=None, head_dim_v=None, about="",
           with_modules=False):
    return Shape(name, batch, heads_q, heads_kv or heads_q, length_q, length_kv, head_dim,
                 head_dim_v or head_dim, about, with_modules)


# Full CPU suite shapes: BERT, long context, GQA, decode, a head dim of 512.
BERT_L128 = _shape("bert_L128", 8, 12, 128, 128, 64, about="BERT-base, seq 128", with_modules=True)
BERT_L512 = _shape("bert_L512", 8, 12, 512, 512, 64, about="BERT-base, seq 512", with_modules=True)
BERT_HEAD512 = _shape("bert_head512", 8, 1, 512, 512, 512, with_modules=True,
                      about="BERT's attention_layer defaults: 1 head, size_per_head 512")
LONG_L2048_E64 = _shape("long_L2048_E64", 1, 16, 2048, 2048, 64, about="long context")
LONG_L2048_E128 = _shape("long_L2048_E128", 1, 16, 2048, 2048, 128, about="long context")
LONG_L8192_E64 = _shape("long_L8192_E64", 1, 16, 8192, 8192, 64, about="long context")
LONG_L8192_E128 = _shape("long_L8192_E128", 1, 16, 8192, 8192, 128, about="long context")
GQA_L2048 = _shape("gqa_L2048", 1, 32, 2048, 2048, 128, heads_kv=8, about="grouped-query, Hq=32 Hkv=8")
DECODE_S4096 = _shape("decode_S4096", 8, 32, 1, 4096, 128, about="one query token against a 4096-token cache")

# Quick suite shapes: the same kinds, small enough for seconds on 2 cores.
TINY_L64 = _shape("tiny_L64", 2, 4, 64, 64, 64, about="quick: BERT-like", with_modules=True)
TINY_L256 = _shape("tiny_L256", 1, 4, 256, 256, 64, about="quick: longer", with_modules=True)
TINY_GQA = _shape("tiny_gqa_L128", 1, 8, 128, 128, 64, heads_kv=2, about="quick: grouped-query")
TINY_DECODE = _shape("tiny_decode_S512", 2, 4, 1, 512, 32, about="quick: decode")
TINY_HEAD512 = _shape("tiny_head512", 2, 1, 64, 64, 512, about="quick: size_per_head 512", with_modules=True)
TINY_EV = _shape("tiny_ev64_E32", 2, 4, 64, 64, 32, head_dim_v=64, about="quick: Ev != E")

# CUDA suite shapes (L from 1k to 16k at E = 64 and 128), 2^28 score elements each.
GPU_L1024_E64 = _shape("gpu_L1024_E64", 16, 16, 1024, 1024, 64, about="GPU: L=1k")
GPU_L1024_E128 = _shape("gpu_L1024_E128", 16, 16, 1024, 1024, 128, about="GPU: L=1k")
GPU_L4096_E64 = _shape("gpu_L4096_E64", 1, 16, 4096, 4096, 64, about="GPU: L=4k")
GPU_L4096_E128 = _shape("gpu_L4096_E128", 1, 16, 4096, 4096, 128, about="GPU: L=4k")
GPU_L16384_E64 = _shape("gpu_L16384_E64", 1, 16, 16384, 16384, 64, about="GPU: L=16k")
GPU_L16384_E128 = _shape("gpu_L16384_E128", 1, 16, 16384, 16384, 128, about="GPU: L=16k")
GPU_SHAPES = (GPU_L1024_E64, GPU_L1024_E128, GPU_L4096_E64, GPU_L4096_E128, GPU_L16384_E64, GPU_L16384_E128)

SHAPES = {s.name: s for s in (
    BERT_L128, BERT_L512, BERT_HEAD512, LONG_L2048_E64, LONG_L2048_E128, LONG_L8192_E64, LONG_L8192_E128,
    GQA_L2048, DECODE_S4096, TINY_L64, TINY_L256, TINY_GQA, TINY_DECODE, TINY_HEAD512, TINY_EV, *GPU_SHAPES)}


@dataclasses.dataclass(frozen=True)
class Case:
    shape: Shape
    mask: Mask
    direction: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.shape.name}/{self.mask.value}/{self.direction}/{self.dtype}"

    @property
    def flops(self) -> float:
        return attention_flops(self.shape, self.direction)

    @property
    def runs_modules(self) -> bool:
        """Whether the nn.MultiheadAttention-style rows run on this case."""
        return self.shape.with_modules and self.mask in MODULE_MASKS

    @classmethod
    def from_id(cls, case_id: str) -> "Case":
        """Parses ``shape/mask/direction/dtype``; raises ValueError naming what is wrong."""
        parts = case_id.split("/")
        if len(parts) != 4:
            raise ValueError(f"case id {case_id!r} is not shape/mask/direction/dtype")
        shape, mask, direction, dtype = parts
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose from {', '.join(DIRECTIONS)}")
        if mask not in {m.value for m in Mask}:
            raise ValueError(f"unknown mask {mask!r}; choose from {', '.join(m.value for m in Mask)}")
        case = cls(SHAPES[shape], Mask(mask), direction, normalise_dtype(dtype))
        if direction not in case.mask.directions:
            raise ValueError(f"mask {mask} is measured in {', '.join(case.mask.directions)} only")
        return case


def attention_flops(shape: Shape, direction: str) -> float:
    """Dense FLOPs of one attention call (see the module docstring)."""
    forward = 2.0 * shape.batch * shape.heads_q * shape.len_q * shape.len_kv * (shape.head_dim + shape.head_dim_v)
    return forward if direction == FORWARD else forward * (1.0 + BACKWARD_FLOP_FACTOR)


def normalise_dtype(name: str) -> str:
    name = DTYPE_ALIASES.get(name.strip().lower(), name.strip().lower())
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)} or {', '.join(DTYPE_ALIASES)}")
    return name


@dataclasses.dataclass(frozen=True)
class SuiteEntry:
    """A block of the suite: one shape crossed with masks, directions and dtypes."""

    shape: Shape
    masks: tuple[Mask, ...]
    directions: tuple[str, ...] = DIRECTIONS
    dtypes: tuple[str, ...] = ("float32", "bfloat16")

    def cases(self):
        for dtype in self.dtypes:
            for direction in self.directions:
                for mask in self.masks:
                    if direction in mask.directions:
                        yield Case(self.shape, mask, direction, dtype)


_FEW = (Mask.NONE, Mask.CAUSAL, Mask.PADDING)
FP32 = ("float32",)
BF16 = ("bfloat16",)

# The full suite is sized for 15-20 minutes on 2 quiet CPU cores: every mask on the BERT shapes (where the
# targets' "L >= 512, all masks" rows live), fewer masks, directions and dtypes as the shapes grow.
# Any other combination of a shape, mask, direction and dtype can be run with --case.
FULL_SUITE = (
    SuiteEntry(BERT_L128, ALL_MASKS, dtypes=FP32),
    SuiteEntry(BERT_L128, PLAIN_MASKS, dtypes=BF16),
    SuiteEntry(BERT_L512, ALL_MASKS, dtypes=FP32),
    SuiteEntry(BERT_L512, PLAIN_MASKS, dtypes=BF16),
    SuiteEntry(BERT_L512, (Mask.DROPOUT,), dtypes=FP32),
    SuiteEntry(BERT_HEAD512, _FEW),
    SuiteEntry(LONG_L2048_E64, ALL_MASKS, dtypes=FP32),
    SuiteEntry(LONG_L2048_E64, _FEW, dtypes=BF16),
    SuiteEntry(LONG_L2048_E128, _FEW, dtypes=FP32),
    SuiteEntry(LONG_L2048_E128, (Mask.NONE,), dtypes=BF16),
    SuiteEntry(LONG_L8192_E64, _FEW, directions=(FORWARD,), dtypes=FP32),
    SuiteEntry(LONG_L8192_E64, (Mask.NONE,), directions=(FORWARD,), dtypes=BF16),
    SuiteEntry(LONG_L8192_E128, (Mask.NONE,), directions=(FORWARD,), dtypes=FP32),
    SuiteEntry(GQA_L2048, _FEW, directions=(FORWARD,), dtypes=FP32),
    SuiteEntry(GQA_L2048, (Mask.NONE,), directions=(FORWARD_BACKWARD,), dtypes=FP32),
    SuiteEntry(GQA_L2048, (Mask.NONE,), directions=(FORWARD,), dtypes=BF16),
    SuiteEntry(DECODE_S4096, (Mask.NONE, Mask.PADDING, Mask.BIAS), directions=(FORWARD,)),
)

QUICK_SUITE = (
    SuiteEntry(TINY_L64, ALL_MASKS + (Mask.DROPOUT,), dtypes=FP32),
    SuiteEntry(TINY_L64, (Mask.NONE, Mask.PADDING), directions=(FORWARD,), dtypes=BF16),
    SuiteEntry(TINY_L64, (Mask.NONE,), directions=(FORWARD_BACKWARD,), dtypes=BF16),
    SuiteEntry(TINY_L256, _FEW, dtypes=FP32),
    SuiteEntry(TINY_GQA, (Mask.NONE, Mask.CAUSAL), directions=(FORWARD,), dtypes=FP32),
    SuiteEntry(TINY_GQA, (Mask.NONE,), directions=(FORWARD_BACKWARD,), dtypes=FP32),
    SuiteEntry(TINY_DECODE, (Mask.NONE, Mask.PADDING), directions=(FORWARD,)),
    SuiteEntry(TINY_HEAD512, (Mask.NONE,), directions=(FORWARD,), dtypes=FP32),
    SuiteEntry(TINY_EV, (Mask.NONE,), directions=(FORWARD,), dtypes=FP32),
)

# The case --memory measures when no --filter is given (its target: under 64 MiB of extra memory).
MEMORY_DEFAULT_CASE = f"{LONG_L8192_E64.name}/none/fwd/float32"
MEMORY_TARGET_MIB = 64.0


HALF = ("float16", "bfloat16")

# The full suite on CUDA, the rows CUDA_TARGETS judge. fp16/bf16 forward without a mask (against torch's flash
# backend); with a bool or float mask, and forward+backward with a bias requiring grad (against the
# efficient backend, the one torch GPU kernel that takes masks with gradients); float32 (efficient in fp32).
# The bias is (1, Hq, L, S): 8 GiB in bf16 at L = 16k, so the bias rows stop at 4k.
CUDA_SUITE = tuple(
    entry for shape in GPU_SHAPES for entry in (
        SuiteEntry(shape, (Mask.NONE,), directions=(FORWARD,), dtypes=HALF),
        SuiteEntry(shape, (Mask.NONE,), directions=(FORWARD_BACKWARD,), dtypes=BF16),
        SuiteEntry(shape, (Mask.PADDING,), dtypes=BF16),
        SuiteEntry(shape, (Mask.NONE, Mask.PADDING), directions=(FORWARD,), dtypes=FP32),
    ) + ((SuiteEntry(shape, (Mask.BIAS,), directions=(FORWARD,), dtypes=BF16),
          SuiteEntry(shape, (Mask.BIAS_GRAD,), dtypes=BF16)) if shape.len_q <= 4096 else ()))


def suite_cases(quick: bool, dtypes=None, directions=None, device_type: str = "cpu") -> list[Case]:
    """The suite's cases (the CUDA suite for a full run on CUDA), keeping only the given dtypes/directions
    (None = all)."""
    suite = QUICK_SUITE if quick else CUDA_SUITE if device_type == "cuda" else FULL_SUITE
    cases = [c for entry in suite for c in entry.cases()]
    return [c for c in cases
            if (dtypes is None or c.dtype in dtypes) and (directions is None or c.direction in directions)]
