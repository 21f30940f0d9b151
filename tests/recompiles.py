"""Counting torch.compile's graphs: a fresh dynamo per test, and a block in which any recompile fails the test."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch._dynamo as dynamo
from torch._dynamo.utils import counters


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Import into a test module to give each of its tests an empty compile cache and zeroed counters."""
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def graphs() -> int:
    """Graphs dynamo has compiled since the test began."""
    return counters["stats"]["unique_graphs"]


@contextmanager
def no_recompiles():
    """Anything in the block that recompiles raises RecompileError; no new graph may appear either."""
    before = graphs()
    with dynamo.config.patch(error_on_recompile=True):
        yield
    assert graphs() == before, f"{graphs() - before} new graph(s) compiled"
