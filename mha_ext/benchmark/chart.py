"""The PNG chart: dense-equivalent throughput against sequence length, one line per implementation, one
panel per (direction, dtype), unmasked cases. matplotlib is optional (``pip install mha_ext[benchmark]``):
without it the chart is skipped and the run says so."""

from __future__ import annotations

import itertools
from collections import Counter

from .cases import DIRECTIONS, DTYPES, Mask
from .implementations import MODULE
from .report import throughput_unit
from .results import OK, Row


def _chart_rows(rows: list[Row]) -> tuple[list[Row], int | None]:
    """Unmasked, non-GQA, non-decode rows of the head size that covers the most sequence lengths; one shape
    per sequence length (the first one met)."""
    plain = [r for r in rows if r.mask == Mask.NONE.value and r.heads_q == r.heads_kv and r.len_q == r.len_kv
             and r.head_dim == r.head_dim_v]
    lengths = Counter()
    for head_dim, length in {(r.head_dim, r.len_q) for r in plain}:
        lengths[head_dim] += 1
    if not lengths:
        return [], None
    head_dim = max(lengths, key=lambda e: (lengths[e], -e))
    shape_for_length = {}
    for row in plain:
        if row.head_dim == head_dim:
            shape_for_length.setdefault(row.len_q, row.shape)
    return [r for r in plain if shape_for_length.get(r.len_q) == r.shape and r.head_dim == head_dim], head_dim


def draw_chart(rows: list[Row], device_type: str, path, title: str) -> str | None:
    """Writes the chart to ``path``; returns None, or why there is no chart."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'mha_ext[benchmark]'): no chart"
    chosen, head_dim = _chart_rows(rows)
    panels = sorted({(r.direction, r.dtype) for r in chosen})
    if not panels:
        return "no unmasked rows to chart"
    unit, factor = throughput_unit(device_type)
    directions = [d for d in DIRECTIONS if any(d == direction for direction, _ in panels)]
    dtypes = [t for t in DTYPES if any(t == dtype for _, dtype in panels)]
    figure, axes = plt.subplots(len(directions), len(dtypes), figsize=(6.5 * len(dtypes), 4.5 * len(directions)),
                                squeeze=False)
    implementations = list(dict.fromkeys(r.implementation for r in chosen))
    for (row_index, direction), (column_index, dtype) in itertools.product(enumerate(directions), enumerate(dtypes)):
        axis = axes[row_index][column_index]
        if (direction, dtype) not in panels:
            axis.set_visible(False)
            continue
        for name in implementations:
            points = sorted((r.len_q, r.gflops * factor, r.family) for r in chosen
                            if r.implementation == name and r.direction == direction and r.dtype == dtype
                            and r.status == OK and r.gflops)
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name,
                          linestyle="--" if points[0][2] == MODULE else "-",
                          linewidth=2.5 if name == "mha_ext" else 1.2)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length L = S")
        axis.set_ylabel(f"{unit} (dense count)")
        axis.set_title(f"{direction}, {dtype}, no mask, E={head_dim}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    shapes = sorted({(r.len_q, r.shape) for r in chosen})
    figure.suptitle(f"{title}\nshapes: " + ", ".join(name for _, name in shapes), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None
