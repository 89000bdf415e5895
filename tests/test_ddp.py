"""DistributedDataParallel: 2 CPU processes (gloo on 127.0.0.1) train a few steps and end with identical
weights that moved from their initial values; rank 0 alone writes the run folder. CUDA/NCCL variants skip
without a GPU. Also the torchrun command line ``neds-rt train --nproc N`` builds."""

from __future__ import annotations

import itertools
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_train import EIDS, quick, synthetic_arrays, tiny_cfg
from training import train as train_mod
from training.checkpoint import read_checkpoint
from training.distributed import init_distributed, resolve_device, strip_option, torchrun_argv
from training.train import build_model, train

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _arrays() -> dict:
    return {e: synthetic_arrays(e, n_trials=40, seed=i) for i, e in enumerate(EIDS)}


def _worker(rank: int, world: int, port: int, out: str, device: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    # 1 trial per rank per step: most steps leave some modality unmasked on some rank (no loss on its head)
    # last.pt also after every step (rank 0 alone saves, the other rank goes on)
    tcfg = quick(epochs=1, batch_size=1, max_steps=6, device=device, checkpoint_minutes=1e-9)
    res = train(_arrays(), Path(out) / "run", tiny_cfg(), tcfg)
    state = {k: v.detach().cpu() for k, v in res.model.state_dict().items()}
    torch.save({"state": state, "steps": res.steps}, Path(out) / f"rank{rank}.pt")


def _run_two(tmp_path: Path, device: str) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), device), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] == 6
    init = build_model(tiny_cfg(), _arrays(), seed=0).state_dict()
    moved = 0
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), f"ranks disagree on {key}"
        moved += int(not torch.equal(value, init[key]))
    assert moved > len(init) // 2  # training changed the weights (both sessions' layers and the shared ones)
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"best.pt", "last.pt", "metrics.json"}
    assert len(read_checkpoint(tmp_path / "run" / "last.pt")["extra"]["rng"]["ranks"]) == 2  # one per rank


def test_two_cpu_processes_end_with_identical_weights(tmp_path: Path) -> None:
    _run_two(tmp_path, "cpu")


_REAL_DRAW = train_mod.draw_masks
_DRAWS = itertools.count(1)  # draw_masks calls in this process


def _stopped_at_step_4(*args: Any) -> Any:
    """``draw_masks`` that stops the run at the 4th training step's masks, on every rank at once."""
    if len(args) == 5 and next(_DRAWS) == 4:  # a training step's draw (the VAL loss passes no schemes)
        raise RuntimeError("stopped at step 4")
    return _REAL_DRAW(*args)


def _resume_worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    # dropout and unit dropout on; last.pt after every step (rank 0 saves every rank's random state)
    tcfg = quick(epochs=1, batch_size=1, max_steps=6, device="cpu", unit_dropout=0.3, checkpoint_minutes=1e-9)
    if mode == "stop":
        train_mod.draw_masks = _stopped_at_step_4  # this process only
    folder = Path(out) / ("full" if mode == "full" else "part")
    res = train(_arrays(), folder, tiny_cfg(dropout=0.1), tcfg, resume=mode == "resume")
    state = {k: v.detach().cpu() for k, v in res.model.state_dict().items()}
    torch.save({"state": state, "steps": res.steps}, Path(out) / f"{mode}_rank{rank}.pt")


def test_two_processes_resumed_inside_an_epoch_end_as_a_run_never_stopped(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    def spawn(mode: str) -> None:
        mp.spawn(_resume_worker, args=(2, _free_port(), str(tmp_path), mode), nprocs=2, join=True)

    spawn("full")
    with pytest.raises(Exception, match="stopped at step 4"):
        spawn("stop")
    saved = read_checkpoint(tmp_path / "part" / "last.pt")
    assert saved["step"] == 3 and saved["extra"]["within_epoch"]["batches"] == 3
    ranks = saved["extra"]["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["cpu"], ranks[1]["cpu"])  # each rank draws its own
    spawn("resume")
    full = torch.load(tmp_path / "full_rank0.pt", weights_only=True)
    for rank in (0, 1):
        resumed = torch.load(tmp_path / f"resume_rank{rank}.pt", weights_only=True)
        assert resumed["steps"] == full["steps"] == 6
        for k, v in full["state"].items():
            torch.testing.assert_close(resumed["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL DDP needs 2 CUDA devices (one per process)")
def test_two_cuda_processes_end_with_identical_weights(tmp_path: Path) -> None:
    _run_two(tmp_path, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_single_process_cuda_training(tmp_path: Path) -> None:
    res = train(_arrays(), tmp_path / "run", tiny_cfg(), quick(epochs=1, device="cuda"))
    assert next(res.model.parameters()).device.type == "cuda" and res.steps > 0


def test_single_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world, info.distributed, info.is_main) == (0, 1, False, True)
    assert resolve_device("cpu").type == "cpu"


def test_torchrun_command_line() -> None:
    args = ["train", "--data", "d", "--nproc", "2", "--out", "r", "--nproc=3"]
    kept = strip_option(args, "--nproc")
    assert kept == ["train", "--data", "d", "--out", "r"]
    argv = torchrun_argv(2, kept)
    assert argv[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert argv[5] == "-m"
    assert argv[6:] == ["neds_rt.cli", *kept]
