"""Batches of trials from :class:`TrialArrays`: one session per batch (sessions have different unit counts).

An epoch's plan is a list of (eid, rows) steps made from the seed and the epoch alone, so every process of a
distributed run builds the same plan: each step's global batch of ``batch_size * world`` trials of one
session is dealt out ``rows[rank::world]``, so all ranks run the same session in lockstep.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from neds_rt.errors import DataError, invalid
from training.arrays import SPLITS, TrialArrays


@dataclass
class Batch:
    eid: str
    rows: np.ndarray  # (B,) int64 rows of the session's TrialArrays
    trial_index: np.ndarray  # (B,) int64 rows of the session's trials table
    spikes: Tensor  # (B, T, N) float32 spike counts per 20 ms bin
    wheel: Tensor  # (B, T) float32 scaled wheel speed
    whisker: Tensor  # (B, T) float32 scaled whisker motion energy
    choice: Tensor  # (B,) int64 in {0, 1}
    block: Tensor  # (B,) int64 in {0, 1, 2}

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])


def make_batch(arr: TrialArrays, rows: np.ndarray, device: torch.device | str = "cpu") -> Batch:
    """Tensors of the trials ``rows`` of one session, on ``device``."""
    rows = np.asarray(rows, dtype=np.int64)
    return Batch(
        eid=arr.eid,
        rows=rows,
        trial_index=np.asarray(arr.trial_index)[rows],
        spikes=torch.from_numpy(arr.spikes[rows].astype(np.float32)).to(device),  # (B, T, N)
        wheel=torch.from_numpy(np.asarray(arr.wheel[rows], dtype=np.float32)).to(device),  # (B, T)
        whisker=torch.from_numpy(np.asarray(arr.whisker[rows], dtype=np.float32)).to(device),  # (B, T)
        choice=torch.from_numpy(np.asarray(arr.choice[rows], dtype=np.int64)).to(device),  # (B,)
        block=torch.from_numpy(np.asarray(arr.block[rows], dtype=np.int64)).to(device),  # (B,)
    )


def check_splits(arrays: Mapping[str, TrialArrays], splits: tuple[int, ...]) -> None:
    """Raise DataError naming the session and split when a session has no trial in a needed split."""
    for eid, arr in arrays.items():
        for split in splits:
            if arr.subset(split).size == 0:
                raise invalid(
                    f"session {eid}", f"has no trial in the {SPLITS[split]!r} split",
                    f"{arr.split.size} trials in all",
                    "use a session with more trials, or rebuild the arrays with other split fractions",
                    kind=DataError,
                )


def plan_epoch(
    arrays: Mapping[str, TrialArrays],
    split: int,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    shuffle: bool = True,
) -> list[tuple[str, np.ndarray]]:
    """This rank's steps of an epoch [(eid, rows (B,) int64), ...]; same length and sessions on all ranks."""
    if not 0 <= rank < world:
        raise invalid("rank", f"must be in [0, world={world})", rank, kind=DataError)
    steps: list[tuple[str, np.ndarray]] = []
    per_step = batch_size * world
    for s_idx, eid in enumerate(sorted(arrays)):
        rows = arrays[eid].subset(split).astype(np.int64)  # (K_split,)
        if rows.size == 0:
            raise invalid(f"session {eid}", f"has no trial in the {SPLITS[split]!r} split", 0,
                          "check the split fractions", kind=DataError)
        if shuffle:
            rows = np.random.default_rng([seed, epoch, s_idx]).permutation(rows)
        for start in range(0, rows.size, per_step):
            chunk = rows[start : start + per_step]
            if chunk.size < world:  # every rank needs a trial: wrap around the session's rows
                chunk = np.resize(np.concatenate([chunk, rows]), world)
            steps.append((eid, chunk))
    if shuffle:
        order = np.random.default_rng([seed, epoch, 1 << 20]).permutation(len(steps))
        steps = [steps[i] for i in order]
    return [(eid, chunk[rank::world]) for eid, chunk in steps]


def iter_batches(
    arrays: Mapping[str, TrialArrays], plan: list[tuple[str, np.ndarray]], device: torch.device | str = "cpu"
) -> Iterator[Batch]:
    for eid, rows in plan:
        yield make_batch(arrays[eid], rows, device)
