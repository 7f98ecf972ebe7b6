"""The examples run (one per seed document) (each is a program that checks its own results; CI runs them with run_all.sh).

They run in this process, as ``__main__``, to spare a torch import per example.
"""

import runpy
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


def test_every_example_is_listed_and_run_by_run_all():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED_OUTPUT)
    assert "for example in *.py" in (EXAMPLES / "run_all.sh").read_text()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("name", sorted(EXPECTED_OUTPUT))
def test_example_runs(name, capsys):
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        torch.set_printoptions(profile="default")  # seed 004 changes them
    assert EXPECTED_OUTPUT[name] in capsys.readouterr().out
