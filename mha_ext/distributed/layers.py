"""Layers on sequence shards: :class:`SequenceParallel` runs an ``mha_ext.nn.MultiheadAttention`` on this rank's
shard of the sequence, and :func:`sequence_parallel` wraps every such layer of a model.

The input and output projections act on each token alone, so they run on the local shard as they are; only
the attention itself needs the other ranks' keys, and runs through :func:`ring_attention` or
:func:`ulysses_attention`, with the layer's masks converted by the layer's own helpers (``mha_ext.masks``).
"""

from __future__ import annotations

import torch

from ..errors import LayerTypeError, LayerValueError
from ..nn.multihead_attention import MultiheadAttention, _keep_torch_fast_paths_off, _layer_errors
from ._comm import all_gather_ints
from ._layout import LAYOUTS
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["SequenceParallel", "sequence_parallel"]

SCHEMES = {"ring": ring_attention, "ulysses": ulysses_attention}
_PREFIX = "attention."


def _check_scheme_and_layout(scheme, layout) -> None:
    if scheme not in SCHEMES:
        raise LayerValueError(f"mha_ext.distributed.SequenceParallel: scheme must be one of {tuple(SCHEMES)}, "
                              f"got {scheme!r}")
    if layout not in LAYOUTS:
        raise LayerValueError(f"mha_ext.distributed.SequenceParallel: layout must be one of {LAYOUTS}, got {layout!r}")


def _check_no_extra_keys(attention) -> None:
    if attention.bias_k is not None or attention.add_zero_attn:
        raise LayerValueError(
            "mha_ext.distributed.SequenceParallel does not support add_bias_kv=True or add_zero_attn=True: the key "
            "they append after the sequence belongs to no rank's shard")


def _rename_keys(state_dict, old: str, new: str) -> None:
    for key in [key for key in state_dict if key.startswith(old)]:
        state_dict[new + key[len(old):]] = state_dict.pop(key)


class SequenceParallel(torch.nn.Module):
    """Runs an ``mha_ext.nn.MultiheadAttention`` on sequence shards: each rank of `group` passes its shard of
    query, key and value and gets its shard of the output, equal to the layer's output on the gathered
    sequence (gradients included: the inputs' for this rank's tokens, the parameters' this rank's part).

    ``SequenceParallel(attention, group=None, scheme="ring", layout="contiguous")``: `attention` is the layer
    (held as the submodule ``attention``), `group` the process group (default: the default group), `scheme`
    ``"ring"`` (:func:`ring_attention`, any head count) or ``"ulysses"`` (:func:`ulysses_attention`,
    ``num_heads`` a multiple of the group size), `layout` how the sequence is sharded: ``"contiguous"`` or
    ``"zigzag"``, as :func:`mha_ext.distributed.shard` cuts it along the layer's sequence dim (1 with
    ``batch_first``, else 0): ``shard(x, dim=1 if batch_first else 0, layout=layout)``.

    ``forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` takes ``nn.MultiheadAttention``'s arguments, with shards:

    * query, key, value: this rank's shards, ``(N, L_r, E)`` with ``batch_first`` (else ``(L_r, N, E)``, or
      ``(L_r, E)`` unbatched); the key/value shards may be shorter or longer than the query's (cross-attention).
    * ``key_padding_mask`` ``(N, S)``: the **whole** key sequence in global order, nn.MultiheadAttention's
      convention (bool ``True`` = ignore the key, float added).
    * ``attn_mask`` ``(L_r, S)`` or ``(N * num_heads, L_r, S)``: **this rank's query rows** (in its shard's
      order: ``shard(mask, dim=-2, layout=layout)``) against the whole key sequence in global order,
      nn.MultiheadAttention's convention (bool ``True`` = not allowed, float added).
    * ``is_causal=True``: causal attention over **global positions** (query at position i attends keys at
      positions j <= i), whatever the layout, without needing ``attn_mask``; unlike the layer, where it is
      only a hint that ``attn_mask`` is the causal mask. An ``attn_mask`` passed with it is applied as well,
      so the causal mask's rows with the hint (what ``nn.TransformerEncoderLayer`` passes) give the same
      result. ``"lower_right"`` aligns the diagonal to the last key (``j <= i + S - L``).
    * ``need_weights`` must be False (the default here): the weights would need the whole ``L x S`` matrix.
      ``average_attn_weights`` is ignored.

    Returns ``(attn_output, None)``, the output being this rank's shard in the query's layout.

    Dropout is the layer's (``attention.dropout`` in training mode), with the single-device layer's
    decisions: the seed is drawn from the group's first rank's default generator. A floating mask that
    requires grad gets this rank's part of its gradient: an ``attn_mask`` its rows' gradient, a
    ``key_padding_mask`` this rank's queries' contribution (the ranks' parts sum to the layer's gradient).
    Parameter gradients are this rank's part too: sum them over the ranks (as data parallelism's all-reduce
    does) to get the gradient of the whole sequence.

    Every rank of the group calls forward together, with the same shapes apart from the sequence shards, and
    all or none of them pass masks (masks cost one more small collective, for the key sequence's length).
    The layer's own ``forward`` does not run (the wrapper calls its projections and mask conversion), so
    forward hooks belong on the wrapper. ``add_bias_kv`` and ``add_zero_attn`` are refused.

    The wrapper has no parameters of its own; its state dict is the layer's, under the same keys as the
    unwrapped layer's (the ``attention.`` prefix is dropped when saving and added back when loading), so
    checkpoints load into the model with or without the wrapper. Attributes it lacks (``embed_dim``,
    ``num_heads``, ``batch_first``, ``in_proj_weight``, ...) are read from the layer, so modules like
    ``nn.TransformerEncoderLayer`` that inspect their ``self_attn`` keep working.
    """

    def __init__(self, attention: MultiheadAttention, group=None, scheme: str = "ring",
                 layout: str = "contiguous") -> None:
        if not isinstance(attention, MultiheadAttention):
            hint = (" (convert torch's layers with mha_ext.nn.replace_attention first)"
                    if isinstance(attention, torch.nn.MultiheadAttention) else "")
            raise LayerTypeError(f"mha_ext.distributed.SequenceParallel: attention must be an "
                                 f"mha_ext.nn.MultiheadAttention, got {type(attention).__name__}{hint}")
        _check_scheme_and_layout(scheme, layout)
        _check_no_extra_keys(attention)
        super().__init__()
        self.attention = attention
        self.group, self.scheme, self.layout = group, scheme, layout
        # Keep nn.TransformerEncoderLayer's fused path (which skips self_attn.forward) off, as the layer does.
        self.register_forward_pre_hook(_keep_torch_fast_paths_off)
        self.register_state_dict_post_hook(SequenceParallel._drop_prefix)
        self.register_load_state_dict_pre_hook(SequenceParallel._add_prefix)

    @staticmethod
    def _drop_prefix(module, state_dict, prefix, local_metadata) -> None:
        _rename_keys(state_dict, prefix + _PREFIX, prefix)

    @staticmethod
    def _add_prefix(module, state_dict, prefix, *args) -> None:
        _rename_keys(state_dict, prefix, prefix + _PREFIX)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "attention":   # not set yet (during construction or unpickling)
                raise
            return getattr(self.attention, name)

    def extra_repr(self) -> str:
        group = "" if self.group is None else f", group={self.group!r}"
        return f"scheme={self.scheme!r}, layout={self.layout!r}{group}"

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = False, attn_mask=None,
                average_attn_weights: bool = True, is_causal=False):
        """This rank's shard of the layer's output on the gathered sequence, and None (see the class)."""
        with _layer_errors():
            if need_weights:
                raise LayerValueError(
                    "mha_ext.distributed.SequenceParallel: need_weights must be False (the attention weights of "
                    "a sharded sequence are not computed); pass need_weights=False")
            layer = self.attention
            _check_no_extra_keys(layer)
            is_batched = layer._check_inputs(query, key, value, None, None)
            if key_padding_mask is not None or attn_mask is not None:
                seq_dim = layer._sequence_dim(is_batched)
                key_length = sum(n for (n,) in all_gather_ints([key.shape[seq_dim]], self.group, query.device))
                layer._check_masks(key_padding_mask, attn_mask, is_batched,
                                   query.shape[1 - seq_dim] if is_batched else None, query.shape[seq_dim], key_length)
            q, k, v, key_padding_mask, batch_first = layer._input_heads(query, key, value, key_padding_mask,
                                                                        is_batched)
            op_mask, op_bias = layer._op_masks(attn_mask, key_padding_mask, 0, q.dtype)
            out = SCHEMES[self.scheme](q, k, v, attn_mask=op_mask, attn_bias=op_bias, is_causal=is_causal,
                                       dropout_p=layer.dropout if layer.training else 0.0, group=self.group,
                                       layout=self.layout)
            out = layer._output_projection(out, batch_first)
            return (out if is_batched else out.squeeze(0)), None


def sequence_parallel(model: torch.nn.Module, group=None, scheme: str = "ring",
                      layout: str = "contiguous") -> torch.nn.Module:
    """Wraps every ``mha_ext.nn.MultiheadAttention`` inside `model` in a :class:`SequenceParallel`, in place,
    and returns `model`; `model` then takes this rank's sequence shards wherever it took whole sequences.

    Each layer is replaced in its parent module, under the same name (a layer shared by several parents,
    or held under several names, gets one wrapper); layers already wrapped stay as they are, so a second call
    changes nothing. The state dict keeps its keys (see :class:`SequenceParallel`), and
    ``nn.TransformerEncoder``'s nested-tensor path is turned off for encoders holding wrapped layers (its
    padding mask covers the whole sequence, not the shard). If `model` itself is a layer, the wrapper is
    returned. A ``torch.nn.MultiheadAttention`` that is not mha_ext's is refused (its attention would see only
    the local keys): convert it first with ``mha_ext.nn.replace_attention(model)``.

    The rest of the model must act on each token alone (projections, feed-forward, layer norms do) or be made
    aware of the sharding by the caller: positional encodings need each shard's global positions, and a loss
    averaged over tokens needs the global count. Masks passed to the model follow :class:`SequenceParallel`'s
    shapes.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, SequenceParallel):
        return model
    if isinstance(model, MultiheadAttention):
        return SequenceParallel(model, group=group, scheme=scheme, layout=layout)
    _check_scheme_and_layout(scheme, layout)
    wrapped = {id(m) for wrapper in model.modules() if isinstance(wrapper, SequenceParallel) for m in wrapper.modules()}
    targets, refused = [], []
    for parent_name, parent in model.named_modules():
        if id(parent) in wrapped:
            continue
        for name, child in parent._modules.items():   # every name, even one holding a module held by another
            if isinstance(child, MultiheadAttention):
                _check_no_extra_keys(child)
                targets.append((parent, name, child))
            elif isinstance(child, torch.nn.MultiheadAttention):
                refused.append(f"{parent_name}.{name}" if parent_name else name)
    if refused:
        raise LayerTypeError(
            "mha_ext.distributed.sequence_parallel: these torch.nn.MultiheadAttention layers are not mha_ext's and "
            f"would attend to the local keys only: {', '.join(refused)}; convert them first with "
            "mha_ext.nn.replace_attention(model)")
    wrappers = {}
    for parent, name, layer in targets:
        if id(layer) not in wrappers:
            wrappers[id(layer)] = SequenceParallel(layer, group=group, scheme=scheme, layout=layout)
        setattr(parent, name, wrappers[id(layer)])
    for module in model.modules():
        if isinstance(module, torch.nn.TransformerEncoder) and any(
                isinstance(m, SequenceParallel) for m in module.layers.modules()):
            module.use_nested_tensor = False
    return model
