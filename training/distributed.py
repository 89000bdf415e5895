"""Distributed training under ``torchrun``: process group, DDP wrapping, rank-0 duties, the launcher.

Run multi-session pretraining on N processes with either of::

    neds-rt train --data DIR --out RUN --nproc N
    python -m torch.distributed.run --standalone --nproc_per_node N -m neds_rt.cli train --data DIR --out RUN

(the first builds and runs the second). Each process reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT from the environment torchrun sets. The backend is gloo on CPU and NCCL on CUDA (one GPU per
process, ``cuda:LOCAL_RANK``). Every rank builds the same epoch plan (``training.loader.plan_epoch``), so
all ranks run the same session each step on different trials. Other sessions' layers get no gradient in a
step, so the model is wrapped with ``find_unused_parameters=True``. Only rank 0 logs, evaluates and writes
checkpoints.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
from torch import nn

from neds_rt.errors import ConfigError, invalid

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str = ""  # "" when not distributed
    owns_group: bool = False  # this module created the process group and destroys it

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``cuda`` -> ``cuda:LOCAL_RANK``."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise invalid("device", "asks for CUDA but no CUDA device is available", pref,
                          "pass --device cpu", kind=ConfigError)
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    if pref != "cpu":
        raise invalid("device", "must be auto, cpu, cuda or cuda:N", pref, kind=ConfigError)
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1, else describe a single process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_pref, local_rank)
    if world <= 1:
        return DistInfo(rank=0, world=1, local_rank=0, device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
        owns = True
    log.info("rank %s/%s joined the %s process group on %s", rank, world, backend, device)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device, backend=backend,
                    owns_group=owns)


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around ``model`` (already on ``info.device``); the model itself when single."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def all_mean(value: float, info: DistInfo) -> float:
    """Mean of a float over ranks (a NaN on any rank gives NaN everywhere)."""
    if not info.distributed:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's boolean on every rank."""
    if not info.distributed:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=info.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank (a collective: all ranks must call it)."""
    if not info.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[object] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.distributed and info.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def torchrun_argv(nproc: int, cli_args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m neds_rt.cli <cli_args>``."""
    if nproc < 1:
        raise invalid("--nproc", "must be >= 1", nproc, kind=ConfigError)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "neds_rt.cli", *cli_args]


def strip_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (to relaunch a command without ``--nproc``)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == option:
            skip = True
            continue
        if arg.startswith(option + "="):
            continue
        out.append(arg)
    return out


def launch(nproc: int, cli_args: list[str]) -> int:
    """Run ``cli_args`` under torchrun on ``nproc`` local processes; returns torchrun's exit status."""
    argv = torchrun_argv(nproc, cli_args)
    log.info("launching: %s", " ".join(argv))
    return subprocess.call(argv)
