"""Shared pytest fixtures: every test runs with seeded RNGs, and the global RNG state is restored after it."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

SEED = 0


@pytest.fixture(autouse=True)
def seeded() -> Iterator[None]:
    """Seed Python, NumPy and torch before each test; restore their previous states after it."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
