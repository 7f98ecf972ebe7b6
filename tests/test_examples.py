"""The examples run (one per seed document) (each is a program that checks its own results; CI runs them with run_all.sh).

They run in this process, as ``__main__``, to spare a torch import per example; the ``distributed_*`` ones run
as CI runs them, on two processes launched by torchrun through run_all.sh.
"""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXPECTED_OUTPUT = {
    "bert_attention_layer_int_mask.py": "matches BERT's formula",
    "per_token_query_key_masks.py": "output size: torch.Size([1, 5, 768])",
    "transformer_swap_causal_padding.py": "mha_ext calls: 6",
    "tensorflow_style_float_mask.py": "match TensorFlow's formula",
}
# Launched by run_all.sh with torchrun on two processes: each rank prints its line.
EXPECTED_DISTRIBUTED_OUTPUT = {
    "distributed_ring_attention.py": "ring_attention matches the single-device op",
}


def test_every_example_is_listed_and_run_by_run_all():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted({**EXPECTED_OUTPUT, **EXPECTED_DISTRIBUTED_OUTPUT})
    assert all(name.startswith("distributed_") for name in EXPECTED_DISTRIBUTED_OUTPUT)
    assert not any(name.startswith("distributed_") for name in EXPECTED_OUTPUT)
    run_all = (EXAMPLES / "run_all.sh").read_text()
    assert "set -- *.py" in run_all and 'for example in "$@"' in run_all
    assert "distributed_*)" in run_all and "-m torch.distributed.run" in run_all


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_DISTRIBUTED_OUTPUT))
def test_distributed_example_runs_under_torchrun(name):
    result = subprocess.run(["bash", str(EXAMPLES / "run_all.sh"), name], env={**os.environ, "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(2):
        lines = [line for line in result.stdout.splitlines() if line.startswith(f"rank {rank} of 2:")]
        assert len(lines) == 1 and EXPECTED_DISTRIBUTED_OUTPUT[name] in lines[0], result.stdout + result.stderr


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("name", sorted(EXPECTED_OUTPUT))
def test_example_runs(name, capsys):
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        torch.set_printoptions(profile="default")  # seed 004 changes them
    assert EXPECTED_OUTPUT[name] in capsys.readouterr().out
