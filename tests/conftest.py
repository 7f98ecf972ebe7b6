"""pytest's hooks for the suite. What the tests share lives in tests/helpers (the fp64 reference, the backend
cases, the CUDA emulator); the markers (slow, emulator, gpu) are declared in pyproject.toml."""

from __future__ import annotations

import pytest

from helpers.emulator import load


@pytest.fixture(scope="session")
def emulator():
    """The CPU emulator of the CUDA kernels (built with g++ on first use: a minute or two)."""
    return load()
