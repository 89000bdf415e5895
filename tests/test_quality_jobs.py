"""bench quality --jobs: which runs are trained, in what order, and what a failing run does."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.quality import VARIANTS, QualityConfig, run_quality
from bench.quality_jobs import MULTI, PARENT_POLL_S, PRETRAIN, STREAMING, plan_jobs, plan_seeds
from neds_rt.errors import ConfigError


def test_plan_trains_every_run_and_only_the_fine_tunings_wait_for_the_pretraining() -> None:
    jobs = plan_jobs(QualityConfig.quick(), ["a", "b"])
    assert jobs[0].kind == PRETRAIN and jobs[0].eid is None and jobs[0].name == "pretrain"
    assert [j.name for j in jobs[1:]] == [f"{kind}_{eid}" for eid in ("a", "b")
                                          for kind in (*VARIANTS, MULTI, STREAMING)]
    assert {j.name: j.after for j in jobs if j.after} == {"neds_multi_a": PRETRAIN, "neds_multi_b": PRETRAIN}
    quiet = plan_jobs(QualityConfig.quick(streaming=False), ["a"])
    assert STREAMING not in {j.kind for j in quiet} and len(quiet) == 1 + len(VARIANTS) + 1


def test_the_seeds_share_one_plan_their_pretrainings_first() -> None:
    cfgs = [QualityConfig.quick(seed=s, streaming=False) for s in (4, 5)]
    jobs = plan_seeds(cfgs, ["a", "b"])
    assert [(j.kind, j.part) for j in jobs[:2]] == [(PRETRAIN, 0), (PRETRAIN, 1)]
    assert len(jobs) == len(set(jobs)) == 2 * len(plan_jobs(cfgs[0], ["a", "b"]))
    for part in (0, 1):  # each seed keeps its runs, in their order; a fine-tuning waits for its own seed's
        assert [j for j in jobs if j.part == part] == plan_jobs(cfgs[part], ["a", "b"], part)
    assert {(j.part, j.name, j.after) for j in jobs if j.after} == {
        (p, f"{MULTI}_{e}", PRETRAIN) for p in (0, 1) for e in ("a", "b")}


def test_jobs_must_be_at_least_one() -> None:
    with pytest.raises(ConfigError, match=r"QualityConfig.jobs: must be an integer >= 1 \(got 0\)"):
        QualityConfig(jobs=0)


@pytest.mark.slow
def test_a_failing_run_stops_the_others_from_starting_and_its_error_is_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from streams.simulate import simulate_cache

    data = tmp_path / "data"
    simulate_cache(data, n_sessions=3, seed=1, n_trials=40)
    cfg = QualityConfig.quick(n_pretrain=2, n_heldout=1, epochs=1, pretrain_epochs=1, finetune_epochs=1,
                              device="tpu", jobs=2)  # every run fails in its worker
    with caplog.at_level(logging.INFO, logger="bench.quality_jobs"), \
            pytest.raises(ConfigError, match="device: must be auto, cpu, cuda or cuda:N"):
        run_quality(data, tmp_path / "out", cfg)
    failed = sorted(r.getMessage().split()[1] for r in caplog.records if " failed: " in r.getMessage())
    assert len(failed) == 2 and failed[0].startswith("neds_encoding_") and failed[1] == "pretrain"  # the two
    # runs that started; the runs waiting behind them never did
    models = tmp_path / "out" / "models"
    assert not list(models.glob("*/neds_multi"))  # the pretraining failed: no fine-tuning started
    assert not list(models.glob("**/metrics.json"))  # and no run got as far as an epoch
    assert not (tmp_path / "out" / "report.json").exists()


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of process ``pid`` from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _children(pid: int, command: str) -> list[int]:
    """Live processes whose parent is ``pid`` and whose command line holds ``command``."""
    kids = []
    for entry in Path("/proc").glob("[0-9]*"):
        kid = int(entry.name)
        stat = _stat(kid)
        if stat is None or stat[1] != pid or stat[0] == "Z":
            continue
        try:
            if command in (entry / "cmdline").read_text(errors="replace"):
                kids.append(kid)
        except OSError:
            continue  # gone meanwhile
    return kids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_killing_the_comparison_ends_its_workers(tmp_path: Path) -> None:
    from streams.simulate import simulate_cache

    data = tmp_path / "data"
    simulate_cache(data, n_sessions=3, seed=1, n_trials=40)
    cmd = [sys.executable, "-m", "neds_rt.cli", "bench", "quality", "--data", str(data), "--out",
           str(tmp_path / "out"), "--quick", "--pretrain", "2", "--epochs", "500", "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2:  # the pool's two workers, once both train (each run has written a checkpoint)
            assert proc.poll() is None, "bench quality ended before its workers started"
            assert time.monotonic() < deadline, f"no two training workers in 120 s: {workers}"
            if len(list((tmp_path / "out" / "models").glob("**/last.pt"))) >= 2:
                workers = _children(proc.pid, "spawn_main")
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # no handler runs: the workers must notice on their own
        assert proc.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 10 * PARENT_POLL_S + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "orphaned workers still training"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
