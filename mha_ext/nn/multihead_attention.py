"""``mha_ext.nn.MultiheadAttention``: ``torch.nn.MultiheadAttention`` running on mha_ext's fused op."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import masks
from .._checks import require_tensor
from ..errors import AttentionTypeError, AttentionValueError, LayerTypeError, LayerValueError
from ..functional import attention_weights, scaled_dot_product_attention
from ..varlen import unpack, varlen_attention

__all__ = ["MultiheadAttention"]


def _keep_torch_fast_paths_off(module, args):
    """Forward pre-hook that does nothing.

    ``nn.TransformerEncoderLayer`` skips ``self_attn.forward`` for its fused
    ``torch._transformer_encoder_layer_fwd`` unless some submodule has a hook, so this hook's
    presence is what keeps mha_ext's kernels on that path.
    """
    return None


@contextlib.contextmanager
def _layer_errors():
    """torch's layer raises AssertionError (and RuntimeError) for bad input: mha_ext's layer errors are those
    too, so the op's errors are re-raised as them."""
    try:
        yield
    except AttentionTypeError as error:
        raise LayerTypeError(str(error)) from None
    except AttentionValueError as error:
        raise LayerValueError(str(error)) from None


# How _split_heads arranges a projection (..., count * H * D) viewed as (..., count, H, D): count tensors of the
# op's layout, (N, H, L, D) for batched inputs and (total, H, D) for packed tokens.
_HEADS_ORDER = {"batch_first": (2, 0, 3, 1, 4), "sequence_first": (2, 1, 3, 0, 4), "packed": (1, 0, 2, 3)}


def _as_jagged(x: Tensor) -> Tensor:
    """A nested tensor in the jagged layout (torch's strided nested tensors are copied; autograd follows)."""
    return x if x.layout == torch.jagged else torch.nested.as_nested_tensor(list(x.unbind()), layout=torch.jagged)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear with the bias added in the weight's dtype: torch's layer runs a bias of another dtype
    (e.g. a float16 in_proj_bias on float64 inputs) on its matmul-then-add path, where F.linear's fused
    one would refuse it."""
    return F.linear(x, weight, None if bias is None else bias.to(weight.dtype))


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in replacement for :class:`torch.nn.MultiheadAttention` computed by mha_ext's fused kernels.

    The constructor, parameters (``in_proj_weight``, ``in_proj_bias``, ``q_proj_weight`` /
    ``k_proj_weight`` / ``v_proj_weight`` when ``kdim`` or ``vdim`` differ from ``embed_dim``,
    ``bias_k``, ``bias_v``, ``out_proj``), initialisation and ``forward`` signature are those of
    ``torch.nn.MultiheadAttention``, so state dicts load both ways with ``strict=True`` and
    ``isinstance(m, torch.nn.MultiheadAttention)`` holds.

    Masks follow **nn.MultiheadAttention's conventions**, not the op's:

    * ``key_padding_mask`` ``(N, S)`` (``(S,)`` unbatched): bool ``True`` = ignore that key; float = added.
    * ``attn_mask`` ``(L, S)`` or ``(N * num_heads, L, S)``: bool ``True`` = not allowed to attend;
      float = added to the scores.
    * ``is_causal=True`` is a hint that ``attn_mask`` is the causal mask (``attn_mask`` is required),
      used exactly when torch uses it: no ``key_padding_mask`` and ``need_weights=False``.

    They reach the op as broadcast views (``(N, 1, 1, S)``, ``(L, S)``, ``(N, H, L, S)``), never
    expanded. Differences from torch: a query with every key masked gets zeros (output and
    weights) instead of NaN; the returned attention weights come from the fused kernels (the
    softmax recomputed from the log-sum-exp), before dropout, and cannot be back-propagated through;
    a projection bias of another dtype than its weight is added in the weight's dtype.

    Nested ``(N, j, E)`` inputs (``batch_first=True``), torch's strided ones and jagged ones
    (``layout=torch.jagged``), run without padding: the projections on the tokens and attention on the varlen
    kernels, in training too (torch's layer takes strided nested tensors only on its inference fast path). The
    output is nested in the query's layout; as in torch, masks are refused with nested inputs (the lengths are
    the padding) and the weights are padded ``(N, L_max, S_max)``, zero outside each sequence. Bad input raises ``mha_ext.errors.LayerValueError`` / ``LayerTypeError``, which are
    ``AssertionError`` and ``RuntimeError`` (what torch's layer raises) as well as ``ValueError`` /
    ``TypeError``.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )
        self._disable_torch_fast_paths()

    def _disable_torch_fast_paths(self) -> None:
        """Make torch's fused encoder-layer path refuse this module (see ``_keep_torch_fast_paths_off``)."""
        if _keep_torch_fast_paths_off not in self._forward_pre_hooks.values():
            self.register_forward_pre_hook(_keep_torch_fast_paths_off)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same arguments and results as :meth:`torch.nn.MultiheadAttention.forward`.

        Mask conventions (nn.MultiheadAttention's): ``key_padding_mask`` ``(N, S)``, bool ``True`` =
        ignore the key, float = added; ``attn_mask`` ``(L, S)`` or ``(N * num_heads, L, S)``, bool
        ``True`` = not allowed, float = added. Returns ``(attn_output, attn_weights)``; the weights
        are ``(N, L, S)`` averaged or ``(N, num_heads, L, S)`` per head, ``None`` when
        ``need_weights=False``.
        """
        with _layer_errors():
            return self._attention(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)

    def _attention(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                   is_causal):
        if any(isinstance(x, Tensor) and x.is_nested for x in (query, key, value)):
            return self._nested_attention(query, key, value, key_padding_mask, need_weights, attn_mask,
                                          average_attn_weights, is_causal)
        is_batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise LayerValueError(
                "is_causal=True needs attn_mask (the causal mask it hints at), like torch.nn.MultiheadAttention; "
                "use torch.nn.Transformer.generate_square_subsequent_mask to build it"
            )
        q, k, v, key_padding_mask, batch_first = self._input_heads(query, key, value, key_padding_mask, is_batched)
        k, v, extra_keys = self._append_extra_keys(k, v)

        # torch.nn.MultiheadAttention trusts the is_causal hint only in this case and uses
        # attn_mask otherwise; doing the same gives the same result even for a wrong hint.
        use_causal = is_causal and key_padding_mask is None and not need_weights
        op_mask, op_bias = self._op_masks(
            None if use_causal else attn_mask, key_padding_mask, extra_keys, q.dtype
        )

        result = scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=op_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=use_causal,
            attn_bias=op_bias,
            return_lse=need_weights,
        )
        out, lse = result if need_weights else (result, None)

        out = self._output_projection(out, batch_first)

        weights = None
        if need_weights:
            weights = attention_weights(q, k, attn_mask=op_mask, attn_bias=op_bias, lse=lse)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        if not is_batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def _input_heads(self, query, key, value, key_padding_mask, is_batched):
        """The projected ``(N, H, L, D)`` q, k, v, the key_padding_mask with a batch dim, and whether the
        projections are batch-first (unbatched inputs are run as a batch of one)."""
        # Decided before the inputs are reshaped, which creates new tensor objects.
        self_attention = query is key and key is value
        key_is_value = key is value
        batch_first = self.batch_first or not is_batched
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        layout = "batch_first" if batch_first else "sequence_first"
        q, k, v = self._project(query, key, value, self_attention, key_is_value, layout)
        return q, k, v, key_padding_mask, batch_first

    def _nested_attention(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                          is_causal):
        """Nested ``(N, j, E)`` query, key and value: tokens projected as they lie, attention by varlen_attention."""
        for name, x in (("query", query), ("key", key), ("value", value)):
            require_tensor(name, x)
            if not x.is_nested or x.dim() != 3:
                raise LayerValueError(
                    f"with a nested query, {name} must be a nested (N, j, E) tensor too, got "
                    f"{'a nested' if x.is_nested else 'a dense'} tensor of shape {tuple(x.shape)}")
        if not self.batch_first:
            raise LayerValueError("nested inputs need batch_first=True (as torch.nn.MultiheadAttention's)")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise LayerValueError(
                "key_padding_mask, attn_mask and is_causal are not supported with nested inputs (as in "
                "torch.nn.MultiheadAttention): the nested tensors' lengths are the padding")
        if self.bias_k is not None or self.add_zero_attn:
            raise LayerValueError("add_bias_kv and add_zero_attn are not supported with nested inputs")
        self_attention, key_is_value = query is key and key is value, key is value
        jagged_query = _as_jagged(query)
        jagged_key = jagged_query if key is query else _as_jagged(key)
        jagged_value = jagged_key if key_is_value else _as_jagged(value)
        for name, x, dim in (("query", jagged_query, self.embed_dim), ("key", jagged_key, self.kdim),
                             ("value", jagged_value, self.vdim)):
            if x.shape[-1] != dim:
                raise LayerValueError(f"{name} must have {dim} features, got shape {tuple(x.shape)}")
        if jagged_key.size(0) != jagged_query.size(0) or not torch.equal(jagged_key.offsets(), jagged_value.offsets()):
            raise LayerValueError("nested key and value must have the query's batch size and equal lengths")
        q, k, v = self._project(jagged_query.values(), jagged_key.values(), jagged_value.values(), self_attention,
                                key_is_value, "packed")
        offsets_q, offsets_k = jagged_query.offsets(), jagged_key.offsets()
        out = varlen_attention(q, k, v, offsets_q, offsets_k, jagged_query._maybe_max_seqlen,
                               jagged_key._maybe_max_seqlen, dropout_p=self.dropout if self.training else 0.0)
        out = _linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias)
        out = torch.nested.nested_tensor_from_jagged(out, offsets_q, max_seqlen=jagged_query._maybe_max_seqlen)
        if query.layout != torch.jagged:
            out = torch.nested.as_nested_tensor(list(out.unbind()), layout=query.layout)
        weights = self._padded_weights(q, k, offsets_q, offsets_k, average_attn_weights) if need_weights else None
        return out, weights

    def _padded_weights(self, q, k, offsets_q, offsets_k, average_attn_weights):
        """torch's weights for nested inputs: (N, H, L_max, S_max), zero outside each sequence's (L, S)."""
        def padded(packed, offsets):
            lengths = offsets.diff()
            tokens = torch.arange(int(lengths.max()) if lengths.numel() else 0, device=packed.device) < lengths[:, None]
            return unpack(packed, tokens).transpose(1, 2), tokens

        (q_padded, rows), (k_padded, columns) = padded(q, offsets_q), padded(k, offsets_k)
        inside = rows[:, None, :, None] & columns[:, None, None, :]
        weights = attention_weights(q_padded, k_padded, attn_mask=inside)
        return weights.mean(dim=1) if average_attn_weights else weights

    def _append_extra_keys(self, k, v):
        """k, v with the keys of ``add_bias_kv`` / ``add_zero_attn`` appended, and how many were appended."""
        batch, heads, head_dim = k.shape[0], self.num_heads, self.head_dim
        extra_keys = 0
        if self.bias_k is not None:  # bias_v comes with it (add_bias_kv)
            k = torch.cat([k, self.bias_k.view(1, heads, 1, head_dim).expand(batch, -1, -1, -1)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, heads, 1, head_dim).expand(batch, -1, -1, -1)], dim=2)
            extra_keys += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(batch, heads, 1, head_dim)], dim=2)
            extra_keys += 1
        return k, v, extra_keys

    def _output_projection(self, out, batch_first):
        """The op's ``(N, H, L, D)`` output -> ``(N, L, E)`` or ``(L, N, E)``, through ``out_proj``."""
        out = out.permute(0, 2, 1, 3) if batch_first else out.permute(2, 0, 1, 3)
        return _linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias)

    def _project(self, query, key, value, self_attention, key_is_value, layout):
        """Input projections, returned as per-head views of the projected tensors: ``(N, H, L, D)`` for batched
        inputs, ``(total, H, D)`` for packed tokens (``layout``: a key of _HEADS_ORDER).

        Self-attention runs one fused ``(3E, E)`` projection and ``key is value`` one ``(2E, E)``
        projection for both; the op then reads q, k, v through strides, without copies.
        """
        E = self.embed_dim
        bias = self.in_proj_bias
        if self._qkv_same_embed_dim:
            weight = self.in_proj_weight
            if self_attention:
                return self._split_heads(query, weight, bias, 3, layout)
            if key_is_value:
                (q,) = self._split_heads(query, weight[:E], None if bias is None else bias[:E], 1, layout)
                k, v = self._split_heads(key, weight[E:], None if bias is None else bias[E:], 2, layout)
                return q, k, v
            weights = weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None, None, None) if bias is None else bias.chunk(3)
        return tuple(
            self._split_heads(x, w, b, 1, layout)[0]
            for x, w, b in zip((query, key, value), weights, biases)
        )

    def _split_heads(self, x, weight, bias, count, layout):
        projected = _linear(x, weight, bias).unflatten(-1, (count, self.num_heads, self.head_dim))
        return projected.permute(_HEADS_ORDER[layout]).unbind(0)

    def _op_masks(self, attn_mask, key_padding_mask, extra_keys, dtype):
        """nn.MultiheadAttention's masks -> the op's ``(attn_mask, attn_bias)``.

        The op takes one bool-or-float ``attn_mask`` plus a float ``attn_bias``, which together
        hold any pair of torch's masks without merging them into an ``(N, H, L, S)`` tensor.
        Keys appended by ``add_bias_kv`` / ``add_zero_attn`` are always attended, as in torch.
        """
        def prepared(mask):
            if mask is None:
                return None
            if mask.is_floating_point():
                mask = mask.to(dtype)
            if extra_keys:
                mask = F.pad(mask, (0, extra_keys), value=0.0 if mask.is_floating_point() else True)
            return mask

        attn = prepared(None if attn_mask is None else masks.from_torch_attn_mask(attn_mask, self.num_heads))
        padding = prepared(None if key_padding_mask is None else masks.from_torch_key_padding_mask(key_padding_mask))
        def is_bool(mask):
            return mask is not None and not mask.is_floating_point()

        if is_bool(attn) and is_bool(padding):  # one bool mask at most: padding becomes -inf biases
            padding = masks.to_additive(padding, dtype)
        return (padding, attn) if is_bool(padding) else (attn, padding)

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Validate shapes like torch does, naming the argument; return is_batched.

        Mask dtypes are checked by the mha_ext.masks converters.
        """
        for name, x in (("query", query), ("key", key), ("value", value)):
            require_tensor(name, x)
        if query.dim() not in (2, 3):
            raise LayerValueError(
                f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}"
            )
        is_batched = query.dim() == 3
        for name, x in (("key", key), ("value", value)):
            if x.dim() != query.dim():
                raise LayerValueError(
                    f"{name} must be {query.dim()}-D like query, got shape {tuple(x.shape)}"
                )
        for name, x, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if x.shape[-1] != dim:
                expected = "embed_dim" if name == "query" else name[0] + "dim"
                raise LayerValueError(f"{name} must have {dim} features ({expected}), got shape {tuple(x.shape)}")
        seq_dim = self._sequence_dim(is_batched)
        if key.shape[seq_dim] != value.shape[seq_dim]:
            raise LayerValueError(
                "key and value must have the same sequence length, "
                f"got shapes {tuple(key.shape)} and {tuple(value.shape)}"
            )
        L, S = query.shape[seq_dim], key.shape[seq_dim]
        batch = None
        if is_batched:
            batch_dim = 1 - seq_dim
            batch = query.shape[batch_dim]
            for name, x in (("key", key), ("value", value)):
                if x.shape[batch_dim] != batch:
                    raise LayerValueError(
                        f"{name} must have query's batch size {batch} in dim {batch_dim}, got shape {tuple(x.shape)}"
                    )
        self._check_masks(key_padding_mask, attn_mask, is_batched, batch, L, S)
        return is_batched

    def _sequence_dim(self, is_batched) -> int:
        """The sequence dim of the layer's inputs: 1 for batch_first batches, else 0."""
        return 1 if self.batch_first and is_batched else 0

    def _check_masks(self, key_padding_mask, attn_mask, is_batched, batch, L, S) -> None:
        """Mask shapes against the batch size, the query length L and the key length S."""
        if key_padding_mask is not None:
            expected = (batch, S) if is_batched else (S,)
            if tuple(key_padding_mask.shape) != expected:
                raise LayerValueError(
                    f"key_padding_mask must have shape {expected} (N, S), got {tuple(key_padding_mask.shape)}"
                )
        if attn_mask is not None:
            expected_3d = ((batch if is_batched else 1) * self.num_heads, L, S)
            if tuple(attn_mask.shape) not in ((L, S), expected_3d):
                raise LayerValueError(
                    f"attn_mask must have shape {(L, S)} (L, S) or {expected_3d} (N * num_heads, L, S), "
                    f"got {tuple(attn_mask.shape)}"
                )
