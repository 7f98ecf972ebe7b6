// The op schemas: the contract every backend implements (csrc/attention/entry.h's bodies, bound to a backend's
// kernels by register_backend.h) and that the Python layer (mha_ext/ops.py) gives autograd and fake kernels.
#include <torch/library.h>

TORCH_LIBRARY(mha_ext, m) {
  // Returns (output (..., H, L, Ev), lse (..., H, L)). query (..., Hq, L, E), key (..., Hkv, S, E), value
  // (..., Hkv, S, Ev): leading dims broadcast as torch's (size 1 against any), Hq a multiple of Hkv or 1.
  // attn_mask: bool (True = attend) or floating (added); attn_bias: floating (added); both broadcast to
  // (..., H, L, S). causal: "none", "upper_left" (query i attends keys j <= i, torch's is_causal) or
  // "lower_right" (j <= i + S - L: the last query row attends every key).
  m.def(
      "attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor? attn_bias, "
      "str causal, float scale, float dropout_p=0.0, Tensor? rng_state=None) -> (Tensor, Tensor)");
  // Returns (grad_query, grad_key, grad_value, grad_attn_mask, grad_attn_bias); the last two are
  // empty unless requested. grad_lse (optional) is the gradient reaching the returned LSE. After its own
  // arguments it takes attention_forward's, in the same order: an argument added to the forward is added
  // at the same place here.
  m.def(
      "attention_backward(Tensor grad_output, Tensor output, Tensor lse, Tensor? grad_lse, bool mask_requires_grad, "
      "bool bias_requires_grad, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor? attn_bias, "
      "str causal, float scale, float dropout_p=0.0, Tensor? rng_state=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Variable-length (packed) attention, FlashAttention's varlen layout (attention/varlen.h): query
  // (total_q, Hq, E), key (total_k, Hkv, E), value (total_k, Hkv, Ev), sequence n at rows
  // [cu_seqlens[n], cu_seqlens[n + 1]) of each (int32 or int64 offsets). attn_mask / attn_bias broadcast to
  // (batch, H, max_seqlen_q, max_seqlen_k), sequence n reading [n, :, :L_n, :S_n]. Returns (output
  // (total_q, H, Ev), lse (H, total_q)); the backward mirrors attention_backward's argument order.
  m.def(
      "varlen_attention_forward(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, Tensor? attn_mask, Tensor? attn_bias, str causal, float scale, "
      "float dropout_p=0.0, Tensor? rng_state=None) -> (Tensor, Tensor)");
  m.def(
      "varlen_attention_backward(Tensor grad_output, Tensor output, Tensor lse, Tensor? grad_lse, "
      "bool mask_requires_grad, bool bias_requires_grad, Tensor query, Tensor key, Tensor value, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? attn_mask, "
      "Tensor? attn_bias, str causal, float scale, float dropout_p=0.0, Tensor? rng_state=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Attention dropout keeps a (query, key) pair with probability 1 - dropout_p, scaling it by
  // 1 / (1 - dropout_p); rng_state = int64 [seed, offset] keys the counter-based RNG, and [seed, offset,
  // row_offset, column_offset, head_offset, total_heads] makes a slice of a larger call (its rows, columns
  // and query heads at those offsets of a call with total_heads heads) decide as that call. This returns
  // the decisions, bool (..., H, L, S), True = kept.
  m.def("attention_dropout_mask(Tensor query, Tensor key, float dropout_p, Tensor rng_state) -> Tensor");
  // Attention probabilities (..., H, L, S) from the LSE that attention_forward returned (before dropout).
  m.def(
      "attention_weights(Tensor query, Tensor key, Tensor? attn_mask, Tensor? attn_bias, Tensor lse, "
      "str causal, float scale) -> Tensor");
  // Which kernels attention_forward and attention_backward run for these arguments on the inputs' device, with
  // their tiles and why the other paths are not taken: JSON text (entry.h).
  m.def(
      "attention_explain(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor? attn_bias, "
      "str causal, float dropout_p=0.0) -> str");
}
