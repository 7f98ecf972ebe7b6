"""Hugging Face transformers integration: ``attn_implementation="mha_ext"``.

    import mha_ext.integrations.transformers
    mha_ext.integrations.transformers.register()
    model = AutoModel.from_pretrained(path, attn_implementation="mha_ext")
    model.set_attn_implementation("mha_ext")  # the same, on a model already loaded

Padding-free calls (the sequences of a batch laid end to end in one row of batch 1, with ``position_ids`` that
restart per sequence and / or the ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments that
``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` produces) run on ``mha_ext.varlen_attention``;
:func:`run_unpadded` runs a padded batch that way and returns its outputs in the padded layout.

Needs the optional dependency ``transformers`` (``pip install mha_ext[transformers]``).
"""

from __future__ import annotations

import inspect
import warnings
import weakref

import torch

from ..functional import attention_weights, scaled_dot_product_attention
from ..varlen import cu_seqlens, unpack, varlen_attention

__all__ = ["NAME", "register", "attention_forward", "run_unpadded"]

NAME = "mha_ext"


def register() -> None:
    """Register ``"mha_ext"`` as an attention implementation of transformers (idempotent).

    Two registrations are needed: the attention function, and the mask builder that decides what
    mask reaches it. The mask builder is transformers' ``sdpa_mask``, whose convention is mha_ext's
    own (bool, ``True`` = attend, ``(N, 1, L, S)``, or ``None`` when ``is_causal`` is enough);
    without it transformers would pass no mask at all to an unknown implementation.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:
        raise ImportError(
            "mha_ext.integrations.transformers needs the transformers package: from the mha_ext checkout, "
            "pip install --no-build-isolation '.[transformers]' (or pip install transformers)"
        ) from error
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


# ----------------------------------------------------------------------------------------------------------------
# Padding-free (packed) calls
# ----------------------------------------------------------------------------------------------------------------


class _PerForward:
    """What is derived from a tensor that every layer of one forward receives (the same ``position_ids``,
    ``cu_seq_lens`` and mask objects reach each attention call), computed once and remembered by the
    tensors' identity (weak references, so nothing is kept alive) and version counters. The derivations
    read values on the host (a synchronisation on CUDA); remembering them makes that once per forward
    instead of once per layer."""

    def __init__(self, size: int = 8):
        self._size = size
        self._entries: list = []

    @staticmethod
    def _version(tensor):
        try:
            return tensor._version
        except RuntimeError:  # inference tensors have no version counter
            return None

    def get(self, tag, tensors, compute):
        if torch.compiler.is_compiling():
            return compute()
        versions = tuple(self._version(t) for t in tensors)
        for entry_tag, refs, entry_versions, value in self._entries:
            if entry_tag == tag and entry_versions == versions and all(r() is t for r, t in zip(refs, tensors)):
                return value
        value = compute()
        self._entries = [(tag, tuple(weakref.ref(t) for t in tensors), versions, value)] + self._entries
        del self._entries[self._size:]
        return value


_per_forward = _PerForward()


def _as_int(value):
    if value is None or isinstance(value, int):
        return value
    return int(value)  # a 0-dim tensor (transformers' prepare_fa_kwargs_from_position_ids returns tensors)


def _offsets_from_position_ids(position_ids: torch.Tensor):
    """``(cu_seqlens, max_seqlen)`` of a packed row, or None when the row holds one sequence. As transformers'
    flash-attention path (``prepare_fa_kwargs_from_position_ids``): a sequence starts wherever the position id
    equals the row's minimum (0, or e.g. 2 for RoBERTa-like models)."""
    positions = position_ids.reshape(-1)
    starts = torch.nonzero(positions == positions.min()).view(-1)  # the one host read
    if starts.numel() <= 1:
        return None
    total = positions.new_tensor([positions.numel()])
    offsets = torch.cat((starts.new_zeros(1), starts, total)).to(torch.int32).unique_consecutive()
    return offsets, int((offsets[1:] - offsets[:-1]).max())


def _sequence_index(offsets: torch.Tensor, total: int):
    """For each packed row 0..total-1: its sequence and its position inside it (no host read)."""
    offsets = offsets.to(torch.long)
    rows = torch.arange(total, device=offsets.device)
    sequence = torch.searchsorted(offsets[1:], rows, right=True)
    return sequence, rows - offsets[sequence.clamp(max=offsets.numel() - 2)]


def _packing_mask(cu_q, cu_k, q_length, k_length, causal: bool, device) -> torch.Tensor:
    """The ``(q_length, k_length)`` bool mask (True = attend) that packing implies: each query attends the keys
    of its own sequence, and with ``causal`` only those up to its position, aligned at the sequence's end
    (``lower_right``, FlashAttention's convention; the same as ``upper_left`` when query and key lengths
    match)."""
    seq_q, pos_q = _sequence_index(cu_q.to(device), q_length)
    seq_k, pos_k = _sequence_index(cu_k.to(device), k_length)
    mask = seq_q[:, None] == seq_k[None, :]
    if causal:
        cu_q, cu_k = cu_q.to(device, torch.long), cu_k.to(device, torch.long)
        shift = (cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])  # S_n - L_n
        limit = pos_q + shift[seq_q.clamp(max=shift.numel() - 1)]
        mask &= pos_k[None, :] <= limit[:, None]
    return mask


def _is_packing_mask(attention_mask, cu_q, cu_k, q_length, k_length, causal) -> bool:
    """Whether a mask says exactly what packing says (transformers builds the block-diagonal (causal) mask
    itself when ``position_ids`` are packed and no 2-D mask was given): then it may be dropped. Only bool
    masks shared by the heads, ``(1, 1, L, S)`` or ``(L, S)``; one O(L * S) comparison and host read."""
    if attention_mask.dtype != torch.bool or attention_mask.shape[-2:] != (q_length, k_length):
        return False
    if attention_mask.dim() > 2 and any(size != 1 for size in attention_mask.shape[:-2]):
        return False
    expected = _packing_mask(cu_q, cu_k, q_length, k_length, causal, attention_mask.device)
    return torch.equal(attention_mask.reshape(q_length, k_length), expected)


def _packed_call(query, key, attention_mask, is_causal, kwargs):
    """How a padding-free call is to be run: ``None`` when the call is not padding-free, else
    ``(cu_q, cu_k, max_q, max_k, mask)`` where ``mask`` is ``None`` when the varlen kernels can run
    (no mask, or the mask packing implies), or the mask for the dense path otherwise."""
    if query.shape[0] != 1:
        return None
    q_length, k_length = query.shape[2], key.shape[2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        # Explicit offsets (DataCollatorWithFlattening(return_flash_attn_kwargs=True), run_unpadded): the sequences
        # are independent, whatever else is passed. A mask that says more than that (padding inside the packed
        # row, a sliding window) is kept, intersected with the block-diagonal packing mask, on the dense path.
        if cu_q is None or cu_k is None:
            if q_length != k_length:
                raise ValueError(
                    "attn_implementation='mha_ext': pass both cu_seq_lens_q and cu_seq_lens_k when the query "
                    f"({q_length} tokens) and the keys ({k_length}) differ in length")
            cu_q = cu_k = cu_q if cu_q is not None else cu_k
        cu_q, cu_k = (torch.as_tensor(cu, dtype=torch.int32, device=query.device) if not torch.is_tensor(cu) else cu
                      for cu in (cu_q, cu_k))
        totals = _per_forward.get(("totals",), (cu_q, cu_k), lambda: (int(cu_q[-1]), int(cu_k[-1])))
        if totals != (q_length, k_length):
            raise ValueError(
                f"attn_implementation='mha_ext': cu_seq_lens_q / cu_seq_lens_k end at {totals[0]} / {totals[1]} "
                f"tokens but this attention call has {q_length} query and {k_length} key tokens (a packed call "
                "holds every sequence in one row of batch 1, without a cache prefix)")
        max_q, max_k = _as_int(kwargs.get("max_length_q")), _as_int(kwargs.get("max_length_k"))
        if attention_mask is None or _per_forward.get(
                ("exact", q_length, k_length, is_causal), (attention_mask, cu_q, cu_k),
                lambda: _is_packing_mask(attention_mask, cu_q, cu_k, q_length, k_length, is_causal)):
            return cu_q, cu_k, max_q, max_k, None
        return cu_q, cu_k, max_q, max_k, _intersect(attention_mask, cu_q, cu_k, q_length, k_length)
    # Offsets from position_ids restarting inside the row, as transformers' flash-attention path does. Only for
    # self-attention without a cache prefix, and not while compiling (it reads the positions on the host). A
    # mask other than the one packing implies wins, as in transformers (masking_utils derives packing from
    # position_ids only when no 2-D mask is given): e.g. generate()'s position ids of a left-padded row of 1.
    position_ids = kwargs.get("position_ids")
    if (position_ids is None or q_length != k_length or q_length < 2 or position_ids.numel() != q_length
            or torch.compiler.is_compiling()):
        return None
    found = _per_forward.get(("positions",), (position_ids,), lambda: _offsets_from_position_ids(position_ids))
    if found is None:
        return None
    cu, max_length = found
    if attention_mask is not None and not _per_forward.get(
            ("exact", q_length, k_length, is_causal), (attention_mask, cu),
            lambda: _is_packing_mask(attention_mask, cu, cu, q_length, k_length, is_causal)):
        return None
    return cu, cu, max_length, max_length, None


def _intersect(attention_mask, cu_q, cu_k, q_length, k_length):
    """``attention_mask`` restricted to the block-diagonal of the packed sequences (dense layout)."""
    blocks = _packing_mask(cu_q, cu_k, q_length, k_length, False, attention_mask.device)
    if attention_mask.dtype == torch.bool:
        return attention_mask & blocks
    return attention_mask.masked_fill(~blocks, float("-inf"))


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function signature, computed by ``mha_ext.scaled_dot_product_attention``.

    ``query`` ``(B, Hq, L, E)``, ``key`` / ``value`` ``(B, Hkv, S, E / Ev)``; grouped-query models
    (``Hkv < Hq``) run with ``enable_gqa=True``, without repeating K/V. ``attention_mask`` is what
    transformers' mask builders give: bool ``(B, 1, L, S)`` with ``True`` = attend (``sdpa_mask``,
    registered by :func:`register`) or a float mask added to the scores (a custom 4-D mask passed
    by the user); ``None`` means no mask, plus causal masking when the module is causal and
    ``L > 1``, as in transformers' ``sdpa`` implementation. ``position_bias`` (T5-style) is added
    as ``attn_bias``. Returns ``(attn_output (B, L, Hq, Ev), attn_weights)``, the weights
    ``(B, Hq, L, S)`` only when ``output_attentions=True`` (recomputed from the log-sum-exp).

    Padding-free calls (batch 1 holding several sequences end to end) run on ``mha_ext.varlen_attention``,
    each sequence attending only itself (causally per sequence for causal modules), when

    - ``cu_seq_lens_q`` / ``cu_seq_lens_k`` are given (``max_length_q`` / ``max_length_k`` optional); a mask
      that says more than the packing (padding inside the row) is then intersected with it and run dense;
    - or ``position_ids`` restart inside the row (sequence starts where they equal their minimum, as
      transformers' flash-attention path), for self-attention without a cache prefix, and only if the mask is
      ``None`` or exactly the block-diagonal one transformers builds from those positions (a different mask
      wins, as in transformers).

    With ``output_attentions=True`` or a ``position_bias`` a packed call runs dense with the block-diagonal
    mask (the weights are ``(1, Hq, T, T)``, zero across sequences). Costs: the packing is read on the host
    once per forward (remembered by tensor identity across the layers), plus one O(T²) comparison per forward
    when transformers also built a block-diagonal mask; the varlen op reads the offsets on the host per call.
    """
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(
                f"attn_implementation='mha_ext' does not support {unsupported!r} (got a value for it); "
                "use attn_implementation='eager' for this model"
            )
    if kwargs.get("cache") is not None:
        raise NotImplementedError(
            "attn_implementation='mha_ext' does not support paged caches (continuous batching); got cache="
            f"{type(kwargs['cache']).__name__}"
        )
    q_length = query.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    output_attentions = bool(kwargs.get("output_attentions", False))
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(query.dtype)
    packed = _packed_call(query, key, attention_mask, bool(is_causal), kwargs)
    if packed is not None:
        cu_q, cu_k, max_q, max_k, dense_mask = packed
        if dense_mask is None and not output_attentions and position_bias is None:
            # (1, H, T, E) -> (T, H, E): views, no copy
            out = varlen_attention(
                query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k,
                max_q, max_k, is_causal="lower_right" if is_causal else False, scale=scaling,
                dropout_p=dropout, enable_gqa=query.shape[1] != key.shape[1],
            )
            return out.unsqueeze(0), None
        if dense_mask is None:
            dense_mask = attention_mask if attention_mask is not None else _packing_mask(
                cu_q, cu_k, q_length, key.shape[2], bool(is_causal), query.device)[None, None]
        attention_mask = dense_mask
    # Same rule as transformers' sdpa: the flag only stands in for a mask that was skipped, and a single
    # query token (decoding) attends every cached key. Causal masking is top-left aligned, so keys past
    # L (an empty static cache) are excluded by it without cropping them.
    is_causal = bool(is_causal) and attention_mask is None and q_length > 1
    arguments = dict(
        attn_mask=attention_mask,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        attn_bias=position_bias,
    )
    result = scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, return_lse=output_attentions, **arguments
    )
    weights = None
    if output_attentions:
        result, lse = result
        weights = attention_weights(query, key, lse=lse, **arguments)
    return result.transpose(1, 2).contiguous(), weights


# ----------------------------------------------------------------------------------------------------------------
# run_unpadded: a padded batch, run packed
# ----------------------------------------------------------------------------------------------------------------


def _pack_rows(tensor: torch.Tensor, keep: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.shape[:2] != keep.shape:
        if tensor.dim() >= 2 and tensor.shape[0] == 1 and tensor.shape[1] == keep.shape[1]:
            tensor = tensor.expand(keep.shape[0], *tensor.shape[1:])  # e.g. position_ids (1, L) shared by the rows
        else:
            raise ValueError(
                f"run_unpadded: {name} must have the padded batch's shape (B, L) = {tuple(keep.shape)} in its "
                f"first two dims, got {tuple(tensor.shape)}")
    return tensor[keep.to(tensor.device)].unsqueeze(0)


def _unpack_attentions(weights: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``(1, H, T, T)`` packed attention weights -> ``(B, H, L, L)``, zero at padding."""
    rows, columns = tokens[:, :, None], tokens[:, None, :]
    dense = weights[0][:, rows, columns].transpose(0, 1)  # (B, H, L, L)
    valid = (keep[:, :, None] & keep[:, None, :])[:, None]
    return dense * valid.to(dense.dtype)


def run_unpadded(model, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                 position_ids=None, **kwargs):
    """Run a padded batch padding-free: strip the padding, call ``model`` once on the sequences laid end to end
    (``(1, T)`` inputs, ``position_ids`` restarting per sequence, ``cu_seq_lens_q/k`` and ``max_length_q/k``),
    and return its outputs in the padded layout.

    ``attention_mask`` ``(B, L)``: 1 = token, 0 = padding (left or right padding, or holes anywhere); ``None``
    means no padding. ``position_ids`` default to ``0..L_n-1`` per sequence (the padded model's own default for
    right padding); given ``(B, L)`` position ids are packed as they are (pass them for models that do not number
    from 0, e.g. RoBERTa). ``token_type_ids`` and per-token ``labels`` ``(B, L)`` are packed; for causal LMs
    (``model.loss_type == "ForCausalLM"``) the labels are shifted inside each padded row first and passed as
    ``shift_labels``, so the loss is the padded model's. Other keyword arguments go to ``model`` unchanged.

    The outputs: every tensor ``(1, T, ...)`` (logits, last_hidden_state, each of hidden_states) comes back
    ``(B, L, ...)`` with zeros at padding; attentions ``(1, H, T, T)`` come back ``(B, H, L, L)``; the loss as
    it is. ``pooler_output`` (BERT-style, from each sequence's first token) is recomputed with the base model's
    ``pooler`` from the first token of every sequence -- the padded model pools row position 0, so with left
    padding it pools a padding token, which this does not. Any other per-sequence tensor (batch dim 1, e.g. a
    sequence classifier's logits, computed on the packed row) cannot be recovered: it is set to ``None``, with a
    warning. Differentiable (train through it). Needs ``attn_implementation="mha_ext"``: other implementations
    (eager, sdpa) would let the packed sequences attend each other; caches (``use_cache``, ``past_key_values``)
    are not supported.
    """
    from transformers.utils import ModelOutput

    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != NAME:
        raise ValueError(
            f"run_unpadded needs a model with attn_implementation={NAME!r} (only it keeps the packed sequences "
            f"apart), but this model uses {implementation!r}: load it with attn_implementation={NAME!r} or call "
            f"model.set_attn_implementation({NAME!r}) (after mha_ext.integrations.transformers.register())")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("run_unpadded: pass exactly one of input_ids and inputs_embeds")
    for name in ("past_key_values", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        if kwargs.get(name) is not None:
            raise ValueError(f"run_unpadded makes the packing itself; got {name}" if name != "past_key_values"
                             else "run_unpadded does not support caches (past_key_values)")
    if kwargs.get("use_cache"):
        raise NotImplementedError("run_unpadded does not support use_cache=True: the cache would hold the "
                                  "packed row, not the batch")
    reference = input_ids if input_ids is not None else inputs_embeds
    if reference.dim() < 2:
        raise ValueError(f"run_unpadded: input_ids / inputs_embeds must be batched (B, L, ...), got shape "
                         f"{tuple(reference.shape)}")
    batch, length = reference.shape[:2]
    if attention_mask is None:
        keep = torch.ones(batch, length, dtype=torch.bool, device=reference.device)
    else:
        if attention_mask.shape != (batch, length):
            raise ValueError(f"run_unpadded: attention_mask must be the 2-D (B, L) = {(batch, length)} padding "
                             f"mask (1 = token, 0 = padding), got shape {tuple(attention_mask.shape)}")
        keep = attention_mask.to(reference.device).bool()
    lengths = keep.sum(1)
    offsets = cu_seqlens(lengths)
    max_length = int(lengths.max())  # the one host read of the call
    if max_length == 0:
        raise ValueError("run_unpadded: attention_mask marks no token at all")
    total = int(offsets[-1])

    call = dict(kwargs)
    return_dict = call.pop("return_dict", None)
    if input_ids is not None:
        call["input_ids"] = _pack_rows(input_ids, keep, "input_ids")
    else:
        call["inputs_embeds"] = _pack_rows(inputs_embeds, keep, "inputs_embeds")
    if position_ids is None:
        call["position_ids"] = (keep.cumsum(1) - 1)[keep].unsqueeze(0)
    else:
        call["position_ids"] = _pack_rows(position_ids, keep, "position_ids")
    if token_type_ids is not None:
        call["token_type_ids"] = _pack_rows(token_type_ids, keep, "token_type_ids")
    labels = call.pop("labels", None)
    if labels is not None:
        if labels.shape[:2] != (batch, length):
            raise NotImplementedError(
                f"run_unpadded packs per-token labels (B, L) = {(batch, length)} only, got labels of shape "
                f"{tuple(labels.shape)}: per-sequence heads see the packed row as one sequence")
        if getattr(model, "loss_type", None) == "ForCausalLM":
            shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            call["shift_labels"] = _pack_rows(shifted, keep, "labels")
        call["labels"] = _pack_rows(labels, keep, "labels")
    if "use_cache" in inspect.signature(model.forward).parameters:
        call["use_cache"] = False
    offsets_device = offsets.to(reference.device)
    # An all-ones mask rather than None: transformers then builds no (1, 1, T, T) block-diagonal mask from the
    # packed position_ids (it skips an all-ones mask), and the offsets alone say where sequences end.
    no_padding = torch.ones(1, total, dtype=torch.long, device=reference.device)
    outputs = model(attention_mask=no_padding, cu_seq_lens_q=offsets_device, cu_seq_lens_k=offsets_device,
                    max_length_q=max_length, max_length_k=max_length, return_dict=True, **call)
    if not isinstance(outputs, ModelOutput):
        raise TypeError(f"run_unpadded: the model returned {type(outputs).__name__}, expected a ModelOutput")

    tokens = (torch.cumsum(keep.flatten(), 0) - 1).clamp(min=0).view(batch, length)  # packed row of each token

    def restore(value):
        if isinstance(value, (tuple, list)):
            items = [restore(item) for item in value]
            return _UNRECOVERABLE if any(item is _UNRECOVERABLE for item in items) else type(value)(items)
        if not torch.is_tensor(value) or value.dim() < 2 or value.shape[0] != 1:
            return value
        if value.shape[1] == total:
            return unpack(value[0], keep)
        if value.dim() == 4 and value.shape[2] == value.shape[3] == total:
            return _unpack_attentions(value, tokens, keep)
        return value if batch == 1 else _UNRECOVERABLE  # one sequence: the packed row is that sequence

    restored, dropped = {}, []
    for name, value in outputs.items():
        result = _pool_first_tokens(model, outputs, offsets_device, lengths) if name == "pooler_output" else None
        if result is None:
            result = restore(value)
        if result is _UNRECOVERABLE:
            dropped.append(name)
            result = None
        restored[name] = result
    if dropped:
        warnings.warn(f"run_unpadded: {', '.join(dropped)} of {type(outputs).__name__} describe(s) the packed row "
                      "as one sequence and cannot be mapped back to the batch: set to None", stacklevel=2)
    result = type(outputs)(**restored)
    return result.to_tuple() if return_dict is False else result


_UNRECOVERABLE = object()


def _pool_first_tokens(model, outputs, offsets, lengths):
    """BERT-style pooler_output ``(B, D)`` recomputed from each sequence's first token (None if impossible)."""
    pooler = getattr(getattr(model, "base_model", model), "pooler", None)
    hidden = outputs.get("last_hidden_state")
    if pooler is None or hidden is None:
        return None
    first = hidden[0, offsets[:-1].long().clamp(max=hidden.shape[1] - 1)]
    pooled = pooler(first.unsqueeze(1))
    return pooled * (lengths > 0).to(pooled.dtype)[:, None]
