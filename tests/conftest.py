"""Test-wide set-up: LSL in machine scope before anything can load liblsl; one compute thread per process."""

from __future__ import annotations

import os

# Tests share 2 cores with their own subprocesses (DDP ranks, serve, replay): oversubscribed BLAS/OpenMP
# threads make small torch ops 10x slower, so each process computes on one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from neds_rt import lsl_scope

lsl_scope.configure("machine")
