"""Routes ``torch.nn.functional.scaled_dot_product_attention`` to mha_ext, so that models written against
torch's SDPA (timm, diffusers, transformers' ``attn_implementation="sdpa"``, ``nn.MultiheadAttention``'s
non-fast path) run mha_ext's kernels with no change to their code.

    import mha_ext

    with mha_ext.sdpa_override():          # for a block (nestable; the previous state comes back on exit)
        out = model(x)

    mha_ext.install()                      # for the whole process, until
    mha_ext.uninstall()                    # puts torch's function object back

``install()`` replaces the attribute ``torch.nn.functional.scaled_dot_product_attention`` with
:func:`scaled_dot_product_attention` below, a plain Python function with torch's signature. Code that looks the
function up when it calls it (``F.scaled_dot_product_attention(...)``,
``torch.nn.functional.scaled_dot_product_attention(...)``, and ``torch.nn.functional.multi_head_attention_forward``,
which reads it as a global of its module) is routed; a reference taken earlier
(``from torch.nn.functional import scaled_dot_product_attention`` before ``install()``) and the C function
``torch._C._nn.scaled_dot_product_attention`` are not.

Each call asks :func:`fallback_reason` whether mha_ext takes it. When it does not (a device or dtype mha_ext
has no kernel for, a strided nested tensor, a tensor subclass, a CUDA head dim above 256, ...), torch's own
function runs instead and a :class:`SDPAFallbackWarning` names the reason, once per distinct reason. The
decision is made from the arguments' types, dtypes, devices and shapes alone (no try/except around the call),
so it traces under ``torch.compile(fullgraph=True)``: there the routed call becomes mha_ext's op
``torch.ops.mha_ext.attention_forward`` in the graph, and a fallback's warning is issued while compiling.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.nn.attention.bias import CausalBias

from ._loader import build_info
from .functional import scaled_dot_product_attention as _mha_ext_attention

__all__ = ["install", "uninstall", "sdpa_override", "is_installed", "fallback_reason", "scaled_dot_product_attention",
           "SDPAFallbackWarning"]


class SDPAFallbackWarning(UserWarning):
    """A call routed by :func:`install` / :func:`sdpa_override` that mha_ext does not take ran torch's SDPA."""


# The function install() replaced: what uninstall() puts back and what a fallback calls (torch's own, unless
# another library had replaced it before).
_previous = torch.nn.functional.scaled_dot_product_attention
_lock = threading.RLock()
# The fallback reasons warned about already: each is warned about once per process.
_warned: set[str] = set()

# Read once: mha_ext's extension is loaded before this module is imported (and a pybind call would not trace
# under torch.compile).
_cuda_kernels = bool(build_info()["cuda"])

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Tensor types mha_ext's ops take: plain tensors and parameters, and the subclasses torch traces with (the
# ops have fake kernels and are functional). Jagged nested tensors and, as attn_mask, torch's CausalBias are
# handled by mha_ext.scaled_dot_product_attention itself; any other subclass goes to torch, whose own SDPA
# dispatches to it as without the override.
_ROUTED_TYPES = (torch.Tensor, torch.nn.Parameter, FakeTensor, FunctionalTensor)
# The CUDA kernels hold whole rows of the head dims in shared memory (csrc/cuda/launch.h kMaxHeadDim).
_CUDA_MAX_HEAD_DIM = 256


def _autocast_dtype(device_type: str):
    """The dtype torch's SDPA casts float32 / float16 / bfloat16 inputs to under autocast on this device (torch
    runs it in lower precision), or None where autocast is off."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast_for_autocast(tensor, dtype):
    # As autocast's cast does: floating tensors other than float64 take the autocast dtype; bool masks stay.
    if tensor is None or dtype is None or not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(dtype)


def fallback_reason(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                    enable_gqa=False):
    """Why the routed ``scaled_dot_product_attention`` would send this call to torch's SDPA instead of mha_ext:
    a short reason string, or None when mha_ext takes it.

    mha_ext takes plain (or parameter, or torch.jagged nested) tensors on the CPU, and on CUDA where this build
    has CUDA kernels, outside torch.func transforms (vmap, grad, ...); query, key and value of one dtype among
    float32, float64, float16 and bfloat16 (the dtypes they have after autocast, which torch's SDPA applies); a
    bool attn_mask, a floating one of the query's dtype or float32, or torch's CausalBias; on CUDA, head dims E
    and Ev up to 256; a finite scale. Anything else goes to torch, which runs the call or raises its own error
    for it. Arguments that both reject otherwise (shapes that do not broadcast, tensors on two devices,
    dropout_p outside [0, 1]) are mha_ext's to reject: its errors are RuntimeErrors as torch's are.
    """
    for name, tensor in (("query", query), ("key", key), ("value", value), ("attn_mask", attn_mask)):
        if tensor is None and name == "attn_mask":
            continue
        if not isinstance(tensor, torch.Tensor):
            return f"{name} is a {type(tensor).__name__}, not a torch.Tensor"
        if tensor.is_nested:
            if tensor.layout != torch.jagged:
                return f"{name} is a nested tensor with layout {tensor.layout} (mha_ext takes torch.jagged ones)"
        elif not (type(tensor) in _ROUTED_TYPES or (name == "attn_mask" and isinstance(tensor, CausalBias))):
            return f"{name} is a {type(tensor).__name__}, a tensor subclass mha_ext does not route"
    if torch._C._are_functorch_transforms_active():
        # mha_ext's ops have neither batching rules nor functorch-ready autograd: torch's SDPA has both.
        return "a torch.func transform (vmap, grad, jacrev, ...) is active"
    device_type = query.device.type
    if device_type not in ("cpu", "cuda"):
        return f"query is on a {device_type} device (mha_ext has CPU and CUDA kernels)"
    if device_type == "cuda" and not _cuda_kernels:
        return "query is a CUDA tensor but this build of mha_ext has no CUDA kernels"
    autocast_dtype = _autocast_dtype(device_type)

    def dtype_of(tensor):
        cast = autocast_dtype is not None and tensor.is_floating_point() and tensor.dtype != torch.float64
        return autocast_dtype if cast else tensor.dtype

    dtype = dtype_of(query)
    if dtype not in _DTYPES:
        return f"query has dtype {dtype} (mha_ext takes float32, float64, float16 and bfloat16)"
    if dtype_of(key) != dtype or dtype_of(value) != dtype:
        return "key or value has a dtype other than the query's"
    if attn_mask is not None and not isinstance(attn_mask, CausalBias) and attn_mask.dtype != torch.bool:
        mask_dtype = dtype_of(attn_mask)
        if mask_dtype != dtype and mask_dtype != torch.float32:
            return f"attn_mask has dtype {mask_dtype} (mha_ext takes bool, the query's dtype or float32)"
    if device_type == "cuda" and query.dim() >= 1 and value.dim() >= 1:
        if query.size(-1) > _CUDA_MAX_HEAD_DIM or value.size(-1) > _CUDA_MAX_HEAD_DIM:
            return f"a CUDA head dim (E or Ev) is above {_CUDA_MAX_HEAD_DIM}"
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and not math.isfinite(scale):
        return "scale is not finite"
    return None


@torch.compiler.assume_constant_result
def _warn_fallback(reason: str) -> bool:
    # Under torch.compile this runs once while the graph is traced (warnings.warn itself would break the graph);
    # eagerly, on each fallback, warning on the first with each reason.
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"mha_ext.sdpa_override: {reason}; torch's scaled_dot_product_attention runs instead",
                      SDPAFallbackWarning, stacklevel=3)
    return True


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                                 enable_gqa=False):
    """What ``torch.nn.functional.scaled_dot_product_attention`` is while the override is installed: torch's
    signature and semantics (bool mask True = attend, floating mask added, ``is_causal`` top-left,
    ``enable_gqa``), computed by ``mha_ext.scaled_dot_product_attention`` when :func:`fallback_reason` says
    mha_ext takes the call, by torch's function otherwise (with a :class:`SDPAFallbackWarning`, once per reason).

    Differences from torch: a query row with nothing to attend gives 0 (torch 2.13 also does on the CPU; some
    torch kernels and older releases give NaN); dropout draws mha_ext's own random decisions; torch's backend
    choice (``torch.nn.attention.sdpa_kernel``) does not apply to routed calls.
    """
    reason = fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if reason is not None:
        _warn_fallback(reason)
        if isinstance(attn_mask, CausalBias):
            # What torch's function does with one: CausalBias.__torch_function__ dispatches it, but only where
            # the function called is torch.nn.functional's attribute, which is this function now.
            return type(attn_mask)._dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return _previous(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    autocast_dtype = _autocast_dtype(query.device.type)
    if autocast_dtype is not None:
        query, key, value = (_cast_for_autocast(t, autocast_dtype) for t in (query, key, value))
        if not isinstance(attn_mask, CausalBias):
            attn_mask = _cast_for_autocast(attn_mask, autocast_dtype)
    return _mha_ext_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def is_installed() -> bool:
    """Whether ``torch.nn.functional.scaled_dot_product_attention`` is this module's routed function now."""
    return torch.nn.functional.scaled_dot_product_attention is scaled_dot_product_attention


def install() -> None:
    """Routes ``torch.nn.functional.scaled_dot_product_attention`` to mha_ext for the whole process (every
    thread), until :func:`uninstall`. Calling it again while installed does nothing."""
    global _previous
    with _lock:
        current = torch.nn.functional.scaled_dot_product_attention
        if current is scaled_dot_product_attention:
            return
        _previous = current
        torch.nn.functional.scaled_dot_product_attention = scaled_dot_product_attention


def uninstall() -> None:
    """Puts back the function object :func:`install` replaced (torch's own). Does nothing when the override is
    not installed, or when something else has replaced it since (that replacement is left in place)."""
    with _lock:
        if torch.nn.functional.scaled_dot_product_attention is scaled_dot_product_attention:
            torch.nn.functional.scaled_dot_product_attention = _previous


@contextlib.contextmanager
def sdpa_override(enabled: bool = True):
    """Routes ``torch.nn.functional.scaled_dot_product_attention`` to mha_ext (``enabled=False``: to torch) inside
    a ``with`` block, and restores the state before the block on exit, on an exception too. Nestable; also a
    decorator. Like :func:`install`, it changes the function for every thread while the block runs. Enter it
    outside ``torch.compile``d code: a compiled function sees the state it was compiled in (torch.compile guards on
    the function, so a change compiles it again)."""
    with _lock:
        was_installed = is_installed()
        install() if enabled else uninstall()
    try:
        yield
    finally:
        with _lock:
            install() if was_installed else uninstall()
