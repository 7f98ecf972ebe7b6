"""Smoke tests of ``python -m mha_ext.benchmark``: tiny cases, a few seconds in all."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from mha_ext.benchmark import main
from mha_ext.benchmark.cases import FORWARD, FORWARD_BACKWARD, Case, Mask, Shape, attention_flops, suite_cases
from mha_ext.benchmark.distributed import SCENARIO_BY_NAME
from mha_ext.benchmark.memory import measure_here
from mha_ext.benchmark.implementations import FUNCTION, Implementation, Outputs, Runner, select_implementations
from mha_ext.benchmark.results import MISMATCH, OK, Row, mask_overheads
from mha_ext.benchmark.suite import SuiteSettings, run_case
from mha_ext.benchmark.targets import evaluate_targets
from mha_ext.benchmark.timing import TimingPolicy

# Two tiny cases: both mask conventions (none, bool keep-mask), forward only, float32.
SMOKE_FILTER = r"^tiny_L64/(none|bool_pad50)/fwd/float32$"
EXPECTED_CPU_IMPLEMENTATIONS = ("mha_ext", "sdpa_flash", "sdpa_default", "sdpa_math", "naive_per_head",
                                "nn_mha", "nn_mha_weights")


def test_flops_hand_computed():
    shape = Shape("hand", batch=2, heads_q=3, heads_kv=3, len_q=5, len_kv=7, head_dim=4, head_dim_v=6)
    # Q@K^T: 2*B*H*L*S*E = 2*2*3*5*7*4 = 1680; P@V: 2*B*H*L*S*Ev = 2520; forward 4200.
    assert attention_flops(shape, FORWARD) == 4200
    assert attention_flops(shape, FORWARD_BACKWARD) == 4200 * 3.5  # backward = 2.5x forward
    gqa = Shape("gqa", batch=1, heads_q=32, heads_kv=8, len_q=2048, len_kv=2048, head_dim=128, head_dim_v=128)
    assert attention_flops(gqa, FORWARD) == 4 * 32 * 2048 * 2048 * 128  # counted on the query heads


def test_case_ids_round_trip():
    case = Case.from_id("bert_L512/bool_pad50/fwd+bwd/bf16")
    assert case.id == "bert_L512/bool_pad50/fwd+bwd/bfloat16"
    assert case.mask is Mask.PADDING and case.shape.len_q == 512


def test_filter_filters(capsys):
    assert main(["--quick", "--list", "--filter", "tiny_gqa"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "/" in line.split()[0]]
    assert listed and all("tiny_gqa" in case_id for case_id in listed)
    assert main(["--quick", "--list", "--dtype", "bf16", "--direction", "fwd"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "/" in line.split()[0]]
    assert listed and all(case_id.endswith("/fwd/bfloat16") for case_id in listed)


@pytest.mark.slow
def test_cli_quick_runs_and_writes(tmp_path, capsys):
    assert main(["--quick", "--filter", SMOKE_FILTER, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "results.json").read_text())
    markdown = (tmp_path / "results.md").read_text()

    assert {row["case"] for row in report["rows"]} == {"tiny_L64/none/fwd/float32", "tiny_L64/bool_pad50/fwd/float32"}
    names = {row["implementation"] for row in report["rows"]}
    for name in EXPECTED_CPU_IMPLEMENTATIONS:
        assert name in names
        assert f"| {name} |" in markdown
        assert name in printed
    for row in report["rows"]:
        if row["implementation"] == "mha_ext":
            assert row["status"] == OK, row  # matched torch, so it was timed
            assert row["anchor"] == "sdpa_flash" and row["ratio"] > 0
            assert math.isclose(row["gflops"], 2 * 2 * 4 * 64 * 64 * 128 / (row["median_ms"] * 1e-3) / 1e9,
                                rel_tol=1e-9)
    assert report["reference_gemm"]["gflops"] > 0
    # A quick run judges no target: nothing a new user could read as a failure.
    assert "Targets: not judged in --quick runs" in printed
    assert "NO" not in printed.split() and "<= 1.10" not in printed
    assert report["environment"]["torch"] == torch.__version__
    assert "bool_pad50" in {o["mask"] for o in report["mask_overhead"]}
    if importlib.util.find_spec("matplotlib") is None:
        assert any("matplotlib" in note for note in report["notes"])
    else:
        assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")


def test_wrong_output_is_flagged_not_timed():
    def prepare_wrong(inputs):
        def run():
            with torch.no_grad():
                return Outputs(torch.nn.functional.scaled_dot_product_attention(
                    inputs.query, inputs.key, inputs.value) * 1.01, {})  # ignores the mask, and off by 1%
        return Runner(run)

    wrong = Implementation("wrong", "a broken implementation", FUNCTION, ("cpu",), False, prepare_wrong)
    [flash], _ = select_implementations("cpu", ["sdpa_flash"])
    settings = SuiteSettings(torch.device("cpu"), TimingPolicy.quick(), peak_gflops=100.0, max_scores_bytes=2 ** 30)
    anchor, broken = run_case(Case.from_id("tiny_L64/bool_pad50/fwd/float32"), [flash, wrong], settings)
    assert anchor.status == OK and anchor.ratio == 1.0
    assert broken.status == MISMATCH and broken.median_ms is None and "differs from sdpa_flash" in broken.note


def _row(case_id: str, implementation: str, ratio: float, ms: float = 1.0, unmasked_ms: float | None = None) -> Row:
    row = Row.for_case(Case.from_id(case_id), implementation, "function", OK)
    row.ratio, row.median_ms, row.unmasked_ms = ratio, ms, unmasked_ms
    return row


def test_targets_and_mask_overhead():
    rows = [_row("bert_L512/none/fwd/float32", "mha_ext", 1.3, ms=10.0),
            _row("bert_L512/causal/fwd/float32", "mha_ext", 1.1, ms=10.5, unmasked_ms=10.0),
            _row("bert_L512/bool_pad50/fwd/float32", "mha_ext", 2.0, ms=12.0, unmasked_ms=10.0),
            _row("bert_L512/bool_pad50/fwd/float32", "sdpa_math", 0.5, ms=24.0),
            _row("bert_L128/none/fwd/float32", "mha_ext", 0.5)]  # L < 512: no target applies
    overheads = mask_overheads(rows)
    assert [(o.mask, round(o.ratio, 2), o.within_limit) for o in overheads] == [
        ("causal", 1.05, True), ("bool_pad50", 1.2, False)]
    results = {t.description: t for t in evaluate_targets(rows, overheads, [])}
    forward = results["float32 forward, no/causal/bool/float mask, L >= 512"]
    assert (forward.rows, forward.passed) == (3, False) and forward.worst.startswith("1.10 (bert_L512/causal")
    assert results["float32 bool padding mask (50% of keys padded), L >= 512"].passed is True
    assert results["decode (L = 1, S >= 4096), any mask and dtype"].passed is None


def test_cuda_targets_take_the_named_backend_on_the_same_case():
    rows = [_row("gpu_L1024_E64/none/fwd/float16", "mha_ext", 9.0, ms=1.0),
            _row("gpu_L1024_E64/none/fwd/float16", "sdpa_flash", 1.0, ms=0.9),  # 0.9 >= 0.8
            _row("gpu_L4096_E128/none/fwd/bfloat16", "mha_ext", 9.0, ms=2.0),
            _row("gpu_L4096_E128/none/fwd/bfloat16", "sdpa_flash", 1.0, ms=1.0),  # 0.5 < 0.8
            _row("gpu_L1024_E64/bool_pad50/fwd/bfloat16", "mha_ext", 1.0, ms=1.0),
            _row("gpu_L1024_E64/bool_pad50/fwd/bfloat16", "sdpa_efficient", 1.0, ms=2.0),  # 2.0 >= 1.5
            _row("gpu_L1024_E64/bool_pad50/fwd/bfloat16", "sdpa_flash", 1.0, ms=0.1)]  # not the target's anchor
    results = {t.description: t for t in evaluate_targets(rows, [], [], "cuda")}
    no_mask = results["fp16/bf16 forward, no mask, E = 64/128, L 1k-16k, vs torch flash"]
    assert (no_mask.rows, no_mask.passed) == (2, False) and no_mask.worst == "0.50 (gpu_L4096_E128/none/fwd/bfloat16)"
    masked = results["fp16/bf16 forward with a bool or float mask, vs torch efficient"]
    assert (masked.rows, masked.passed, masked.worst) == (1, True, "2.00 (gpu_L1024_E64/bool_pad50/fwd/bfloat16)")
    assert results["float32, vs torch efficient in float32"].passed is None  # not measured
    assert not any("float32 forward" in name for name in results)  # the CPU targets are not CUDA's


def test_cuda_suite_holds_every_cuda_target_row():
    cases = suite_cases(quick=False, device_type="cuda")
    ids = {case.id for case in cases}
    for length in (1024, 4096, 16384):
        for head_dim in (64, 128):
            for dtype in ("float16", "bfloat16"):
                assert f"gpu_L{length}_E{head_dim}/none/fwd/{dtype}" in ids
            assert f"gpu_L{length}_E{head_dim}/bool_pad50/fwd/bfloat16" in ids
            assert f"gpu_L{length}_E{head_dim}/none/fwd/float32" in ids
            assert (f"gpu_L{length}_E{head_dim}/bias_grad/fwd+bwd/bfloat16" in ids) == (length <= 4096)
    assert not any(case.shape.name.startswith("gpu_") for case in suite_cases(quick=False))  # CPU suite


def test_mask_overhead_is_timed_side_by_side():
    [mha_ext], _ = select_implementations("cpu", ["mha_ext"])
    settings = SuiteSettings(torch.device("cpu"), TimingPolicy.quick(), peak_gflops=100.0, max_scores_bytes=2 ** 30)
    [row] = run_case(Case.from_id("tiny_L64/causal/fwd/float32"), [mha_ext], settings)
    assert row.status == OK and row.unmasked_ms > 0 and row.repeats >= TimingPolicy.quick().min_repeats


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from Linux /proc")
def test_memory_in_process_and_in_subprocess(tmp_path):
    result = measure_here("tiny_L64/none/fwd/float32", "sdpa_flash", "cpu")
    assert result.note == "" and result.growth_mib is not None and result.growth_mib >= 0
    assert result.output_mib == pytest.approx(2 * 4 * 64 * 64 * 4 / 2 ** 20)

    assert main(["--memory", "--filter", SMOKE_FILTER.replace("(none|bool_pad50)", "none"), "--impls", "mha_ext",
                 "--out", str(tmp_path)]) == 0
    [measured] = json.loads((tmp_path / "results.json").read_text())["memory"]
    assert measured["implementation"] == "mha_ext" and measured["growth_mib"] is not None, measured


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from Linux /proc")
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="needs torch.distributed with gloo")
def test_distributed_mode_reports_time_traffic_and_memory(tmp_path, capsys):
    B, H, L, E, P = 1, 4, 64, 16, 2
    assert main(["--distributed", "--world-sizes", "1,2", "--seq-len", str(L), "--heads", str(H), "--batch", str(B),
                 "--head-dim", str(E), "--repeats", "2", "--timeout", "120", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "distributed.json").read_text())
    markdown = (tmp_path / "distributed.md").read_text()

    # One K/V block of one rank at P = 2, float32: key and value, (B, H, L/P, E) each.
    block = 2 * B * H * (L // P) * E * 4
    assert block == 16384
    # Bytes each rank sends in one step, from the algorithms: the ring forward passes its K/V block on P - 1
    # times; the backward passes the blocks around again (P - 1) and each block's float32 gradient behind
    # them for a full turn back to its owner (P); Ulysses keeps 1/P of q, k, v and the output and sends the
    # rest (4 all-to-alls of (P - 1)/P of a (B, H, L/P, E) shard).
    shard = B * H * (L // P) * E * 4
    expected_sent = {"ring_fwd": (P - 1) * block, "ring_fwd_causal_zigzag": (P - 1) * block,
                     "ring_fwd_bwd": (P - 1) * block + (P - 1) * block + P * block,
                     "ulysses_fwd": 4 * (P - 1) * shard // P}
    assert expected_sent == {"ring_fwd": 16384, "ring_fwd_causal_zigzag": 16384, "ring_fwd_bwd": 65536,
                             "ulysses_fwd": 16384}

    baselines = {b["key"]: b for b in report["baselines"]}
    assert set(baselines) == {"single/none/fwd", "single/causal/fwd", "single/none/fwd+bwd"}
    for baseline in baselines.values():
        assert baseline["threads"] == report["settings"]["cores"]
        assert baseline["step_ms"] > 0 and len(baseline["samples_ms"]) == 2
        assert baseline["growth_mib"] is not None and baseline["growth_mib"] >= 0
    assert baselines["single/none/fwd"]["output_mib"] == pytest.approx(B * H * L * E * 4 / 2 ** 20)
    assert baselines["single/none/fwd+bwd"]["output_mib"] == pytest.approx(4 * B * H * L * E * 4 / 2 ** 20)

    rows = {(row["scenario"], row["world_size"]): row for row in report["rows"]}
    assert set(rows) == {(name, p) for name in expected_sent for p in (1, 2)}
    for (name, world_size), row in rows.items():
        assert row["status"] == "ok", row
        assert len(row["rank_step_ms"]) == len(row["growth_mib"]) == len(row["bytes_sent"]) == world_size
        assert row["threads_per_rank"] == max(1, report["settings"]["cores"] // world_size)
        assert row["step_ms"] > 0 and row["step_ms"] >= max(row["rank_step_ms"]) * 0.999
        assert row["time_ratio"] == pytest.approx(row["step_ms"] / row["single_ms"])
        assert row["single_ms"] == baselines[SCENARIO_BY_NAME[name].baseline]["step_ms"]
        assert all(growth >= 0 for growth in row["growth_mib"])
        assert row["kv_block_bytes"] == 2 * B * H * (L // world_size) * E * 4
        assert row["memory_target_mib"] == pytest.approx(
            row["single_growth_mib"] / world_size + row["kv_block_bytes"] / 2 ** 20)
        assert row["memory_ratio"] == pytest.approx(max(row["growth_mib"]) / row["memory_target_mib"])
        assert row["check_error"] <= 2e-4  # each rank's shard matched the single-process op on tiny inputs
        if world_size == 1:
            assert row["bytes_sent"] == [0] and row["bytes_received"] == [0]
        else:
            assert row["bytes_sent"] == [expected_sent[name]] * P, name
            assert row["bytes_received"] == row["bytes_sent"], name
            assert all(messages > 0 for messages in row["messages"]), name
        assert row["others_busy"] is None or 0 <= row["others_busy"] <= 1
        if name == "ring_fwd" and world_size == P:
            assert row["shift_ms"] > 0 and row["shift_gbps"] == pytest.approx(block / (row["shift_ms"] * 1e-3) / 1e9)
            assert "## Ring shift alone" in markdown
        assert f"| {name} | {world_size} |" in markdown

    targets = {t["description"]: t for t in report["targets"]}
    time_target = targets["ring forward at P = 2: step time / single-process op"]
    assert time_target["rows"] == 1 and isinstance(time_target["passed"], bool)
    memory = targets["per-rank peak RSS growth / (single-process growth / P + one K/V block)"]
    assert memory["rows"] == len(rows) and isinstance(memory["passed"], bool)
    assert "target: ring forward at P = 2" in printed and "## Targets (issue 17)" in markdown


def test_varlen_lengths_are_long_tailed_and_seeded():
    import statistics

    from mha_ext.benchmark.varlen import LengthStats, long_tailed_lengths

    lengths = long_tailed_lengths(32, 512, mean_ratio=0.55, sigma=0.8, seed=0)
    assert lengths == long_tailed_lengths(32, 512, mean_ratio=0.55, sigma=0.8, seed=0)
    assert len(lengths) == 32 and max(lengths) == 512 and min(lengths) >= 1
    stats = LengthStats(32, 512, tuple(lengths))
    assert abs(stats.mean_ratio - 0.55) < 0.01
    assert stats.attention_share == sum(n * n for n in lengths) / (32 * 512 ** 2) < stats.mean_ratio
    assert statistics.median(lengths) < stats.tokens / 32  # long tail: the median is below the mean


def test_varlen_encoder_flop_bound_hand_computed():
    from mha_ext.benchmark.varlen import EncoderShape, LengthStats, encoder_flop_bound

    shape = EncoderShape("hand", hidden=2, layers=1, heads=1, intermediate=4)
    # Per token 2 * (4 h^2 + 2 h I) = 2 * (16 + 16) = 64; attention 4 h sum(L^2) = 8 sum(L^2).
    bound = encoder_flop_bound(shape, LengthStats(2, 4, (4, 2)))
    padded, unpadded = 8 * 64 + 8 * 32, 6 * 64 + 8 * 20
    assert bound["bound"] == pytest.approx(padded / unpadded)
    assert bound["attention_share_padded"] == pytest.approx(8 * 32 / padded)


def test_varlen_targets_judge_the_varlen_rows_only():
    from mha_ext.benchmark.varlen import E2ERow, OpRow, evaluate_targets

    op = [OpRow("a/none/fwd/float32", "mha_ext_varlen", 512, False, FORWARD, "float32", 0.55, 0.39, ratio=2.0),
          OpRow("b/none/fwd/float32", "mha_ext_varlen", 128, False, FORWARD, "float32", 0.55, 0.39, ratio=1.4),
          OpRow("b/none/fwd/float32", "mha_ext_padded", 128, False, FORWARD, "float32", 0.55, 0.39, ratio=0.5),
          OpRow("c/none/fwd/float32", "mha_ext_varlen", 128, False, FORWARD, "float32", 0.9, 0.8, ratio=1.0)]
    e2e = [E2ERow("m/B32_max128", "m", "mha_ext_unpadded", 32, 128, 0.55, 1.8, ratio=1.6),
           E2ERow("m/B32_max128", "m", "mha_ext_padded", 32, 128, 0.55, 1.8, ratio=1.0)]
    op_target, e2e_target = evaluate_targets(op, e2e)
    assert (op_target.rows, op_target.passed, op_target.worst) == (2, False, "1.40 (b/none/fwd/float32)")
    assert (e2e_target.rows, e2e_target.passed) == (1, True)
    assert [t.passed for t in evaluate_targets(op, e2e, judged=False)] == [None, None]
    assert evaluate_targets([], [])[0].note == "no row measured"


def test_varlen_mode_quick_writes_rows_and_targets(tmp_path, capsys):
    assert main(["--varlen", "--quick", "--batch", "4", "--max-lens", "32", "--no-profile",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "varlen.json").read_text())
    markdown = (tmp_path / "varlen.md").read_text()

    op_rows = {(row["case"], row["implementation"]): row for row in report["op_rows"]}
    cases = {case for case, _ in op_rows}
    assert cases == {f"B4_H2_E16_max32/{mask}/{direction}/float32" for mask in ("none", "causal")
                     for direction in ("fwd", "fwd+bwd")}
    for (case, name), row in op_rows.items():
        assert f"| {case} |" in markdown and name in markdown
        if name == "sdpa_nested" and "/causal/" in case:
            assert row["status"] == "refused" and "causal" in row["note"]  # torch's own reason, kept
            continue
        assert row["status"] == "ok", row  # matched the float64 reference on the real tokens
        assert row["median_ms"] > 0 and row["ratio"] > 0 and row["check_error"] < 1e-4
        if name == "sdpa_padded":
            assert row["ratio"] == 1.0 and "flash_attention_for_cpu" in row["backend"]
    assert "sum(L^2)/(B*max^2)" in printed and "mean/max" in printed

    e2e = {row["implementation"]: row for row in report["e2e_rows"]}
    assert set(e2e) == {"hf_sdpa_padded", "mha_ext_unpadded", "mha_ext_padded"}
    assert e2e["hf_sdpa_padded"]["status"] == "ok" and e2e["mha_ext_padded"]["status"] == "ok"
    assert e2e["mha_ext_unpadded"]["status"] in ("ok", "unavailable"), e2e["mha_ext_unpadded"]
    for row in e2e.values():
        assert 1.0 < row["flop_bound"] < 2.0 and f"| {row['implementation']} |" in markdown

    assert [t["threshold"] for t in report["targets"]] == [">= 1.5", ">= 1.5"]
    assert all(t["passed"] is None for t in report["targets"])  # --quick judges nothing
    assert "## Targets (issue 16, CPU)" in markdown and printed.count("target: ") == 2
