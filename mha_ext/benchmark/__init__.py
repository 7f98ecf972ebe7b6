"""mha_ext's benchmark: ``python -m mha_ext.benchmark [--quick] [--device cuda] ...``.

Times mha_ext side by side with torch SDPA (default dispatch and forced backends), FlexAttention (CUDA),
``nn.MultiheadAttention`` and a naive per-head implementation, forward and forward+backward, over shapes
x masks x dtypes (cases.py), checking every output against torch's before timing it. Prints progress and a
table; writes results.json, results.md and chart.png. One job per module:

cases (what is measured, FLOP counts), inputs (the tensors), implementations (what is timed),
correctness (the guard), timing (how), sgemm (the machine's reference rate), suite (the loop),
results / targets (what came out, against the speed, mask-overhead and memory targets), report / chart (console, JSON, Markdown,
PNG), memory (``--memory``, peak memory in a fresh subprocess), environment (machine description),
cli (the command line).
"""


def main(argv=None) -> int:
    """Runs the benchmark's command line with ``argv`` (default: sys.argv[1:])."""
    from .cli import main as cli_main

    return cli_main(argv)
