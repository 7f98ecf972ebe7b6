"""``mha_ext.explain``: which kernels a call would run, their tiles, and why the other paths are not taken
(like xformers' ``not_supported_reasons``), asked of the backend the inputs' device dispatches to."""

from __future__ import annotations

import dataclasses
import json

import torch

from ._checks import causal_alignment, check_dropout_p, require_optional_tensor, require_tensor, run_op


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    kernel: str                # what runs
    tiles: str                 # its tiles
    not_taken: dict            # every other path: why it is not taken


@dataclasses.dataclass(frozen=True)
class Explanation:
    backend: str               # "cpu" or "cuda"
    forward: KernelChoice      # what scaled_dot_product_attention runs
    backward: KernelChoice     # what its gradient runs
    facts: dict                # what the choices depend on: GEMM engine, vector ISA, threads, device

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}"]
        for op, choice in (("forward", self.forward), ("backward", self.backward)):
            lines += [f"{op}: {choice.kernel}", f"  tiles: {choice.tiles}"]
            lines += [f"  not {path}: {why}" for path, why in choice.not_taken.items()]
        lines += [f"{name}: {value}" for name, value in self.facts.items()]
        return "\n".join(lines)


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
            attn_bias=None) -> Explanation:
    """What ``mha_ext.scaled_dot_product_attention`` with these arguments (and its backward) would run.

    Takes that function's arguments and conventions (bool mask True = attend; floating masks added;
    ``is_causal`` True / "upper_left" / "lower_right"), validates them the same way, and runs nothing but
    the choice: the kernel of each op, its tiles, and for each path not taken the reason, in the current
    ``mha_ext.settings``. Eager only (not inside ``torch.compile``).

        >>> print(mha_ext.explain(q, k, v, attn_mask=padding))
    """
    require_tensor("query", query)
    require_tensor("key", key)
    require_tensor("value", value)
    require_optional_tensor("attn_mask", attn_mask)
    require_optional_tensor("attn_bias", attn_bias)
    del scale, enable_gqa  # accepted for the same call shape; they change no choice
    dropout_p = check_dropout_p(dropout_p)
    causal, attn_mask = causal_alignment(is_causal, attn_mask, query, key)
    text = run_op(torch.ops.mha_ext.attention_explain, query, key, value, attn_mask, attn_bias, causal, dropout_p)
    data = json.loads(text)
    return Explanation(data["backend"], KernelChoice(**data["forward"]), KernelChoice(**data["backward"]),
                       data["facts"])
