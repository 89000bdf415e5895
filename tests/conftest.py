"""Test-wide set-up: LSL in machine scope before anything can load liblsl; one compute thread per process."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Tests share 2 cores with their own subprocesses (DDP ranks, serve, replay): oversubscribed BLAS/OpenMP
# threads make small torch ops 10x slower, so each process computes on one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest

from neds_rt import lsl_scope

lsl_scope.configure("machine")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one torch intra-op thread avoids OpenMP spin contention (for
    modules that ``usefixtures`` it; the setting is put back after the test)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
