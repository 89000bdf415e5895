"""``neds-rt bench quality --jobs N``: the comparison's training runs, N at once in worker processes.

A comparison trains, per training seed, one pretraining run and, for each held-out session, the
encoding-only, decoding-only and single-session NEDS, the fine-tuning of the pretrained NEDS and (with
``--streaming``) the streaming NEDS. Only the fine-tunings wait for another run, the pretraining; the rest
stand alone. With ``jobs`` > 1 they are all trained first, at most ``jobs`` at a time, each in its own
spawned process with ``threads`` torch threads on ``device``, into the folders the sequential comparison
uses. The comparison then runs as usual and loads every finished run (as ``--resume`` does).

A run is the same computation in a worker as in the comparison's own process: it seeds its own generators,
and the worker runs it with the same code, data and thread count. So the report is the one ``jobs=1`` gives
(to the digit on the CPU, where the two were compared; CUDA kernels need not repeat a run bit for bit even
in one process), and only the run time changes. The pretraining starts first and a fine-tuning starts as soon
as the pretraining has ended, ahead of any run still waiting: the pretraining and the fine-tunings after it
are the longest chain, and the wall time is at least theirs.

With ``--seeds S`` the runs of every seed share one pool (:func:`train_ahead_seeds`): the S pretrainings start
first, each seed's fine-tunings wait for its own pretraining only, and a seed's runs go into its
``OUT/seed_S`` folder. The seeds' comparisons then run one after another on their trained runs.

If a run fails, no other run starts; the runs under way finish (their results stay under ``OUT/models`` for
``--resume``) and the first error is raised. If the comparison's process itself dies (SIGTERM, SIGKILL, the
machine's session ending), every worker ends within a second (:func:`exit_with_parent`): an orphaned run would
otherwise go on writing its ``last.pt`` beside the run that ``--resume`` starts in its place.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from bench.quality import (
    VARIANTS,
    QualityConfig,
    array_cache_dir,
    prepare_sessions,
    run_dir,
    train_multi,
    train_pretraining,
    train_variant,
)
from bench.quality_streaming import MODEL as STREAMING
from bench.quality_streaming import train_streaming

log = logging.getLogger(__name__)

PRETRAIN: Final = "pretrain"
MULTI: Final = "neds_multi"
PARENT_POLL_S: Final = 1.0  # how often a worker looks for its parent


@dataclass(frozen=True)
class Job:
    """One training run: ``kind`` is ``pretrain``, a key of :data:`bench.quality.VARIANTS`, ``neds_multi``
    or ``neds_streaming``; ``eid`` the held-out session (None for the pretraining)."""

    kind: str
    eid: str | None = None
    part: int = 0  # which comparison (seed) of :func:`train_ahead_seeds` the run belongs to

    @property
    def name(self) -> str:
        """The run's name in the report's timing, as the sequential run names its own steps."""
        return self.kind if self.eid is None else f"{self.kind}_{self.eid}"

    @property
    def after(self) -> str | None:
        """The run (of the same comparison) that must end before this one starts."""
        return PRETRAIN if self.kind == MULTI else None


def plan_jobs(cfg: QualityConfig, heldout: list[str], part: int = 0) -> list[Job]:
    """Every training run of one seed's comparison, the pretraining first."""
    jobs = [Job(PRETRAIN, part=part)]
    for eid in heldout:
        jobs += [Job(name, eid, part) for name in VARIANTS] + [Job(MULTI, eid, part)]
        if cfg.streaming:
            jobs.append(Job(STREAMING, eid, part))
    return jobs


def plan_seeds(cfgs: Sequence[QualityConfig], heldout: list[str]) -> list[Job]:
    """The runs of several comparisons (one per seed), every pretraining first: they head the longest
    chains."""
    jobs = [job for part, cfg in enumerate(cfgs) for job in plan_jobs(cfg, heldout, part)]
    return sorted(jobs, key=lambda j: j.kind != PRETRAIN)  # stable: the rest keep their order


def train_ahead(data: Path | str, out: Path | str, cfg: QualityConfig) -> dict[str, float]:
    """Train every run of the comparison at ``cfg.seed`` into ``out/models``, ``cfg.jobs`` at a time; return
    each run's seconds (``<name>_s``) and the wall time of them all (``wall_s``)."""
    return train_ahead_seeds(data, [(Path(out), cfg)])[0]


def train_ahead_seeds(data: Path | str, parts: Sequence[tuple[Path, QualityConfig]]
                      ) -> list[dict[str, float]]:
    """Train every run of several comparisons ``parts`` ((out, cfg) per seed, on the same sessions) in one
    pool of ``cfg.jobs`` workers (the first part's); return, per part, :func:`train_ahead`'s seconds (each
    part's ``wall_s`` is the pool's)."""
    from streams.load import open_one
    from training.cache import load_arrays

    data = Path(data)
    pre, heldout = prepare_sessions(data, parts[0][1])
    one = open_one(data)
    for out, _ in parts:  # built and cached once here, so the workers only read the cache
        for eid in (*pre, *heldout):
            load_arrays(one, eid, cache_root=array_cache_dir(out))
    waiting = plan_seeds([cfg for _, cfg in parts], heldout)
    seconds: list[dict[str, float]] = [{} for _ in parts]
    ended: set[tuple[int, str]] = set()  # (part, name) of the runs that ended, for the runs that wait on them
    running: dict[Future[float], Job] = {}
    error: BaseException | None = None
    level = logging.getLogger().getEffectiveLevel()
    jobs = parts[0][1].jobs
    t0 = time.perf_counter()
    log.info("training %s runs, %s at once", len(waiting), jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        while waiting or running:
            ready = [j for j in waiting if j.after is None or (j.part, j.after) in ended]
            ready.sort(key=lambda j: j.after is None)  # a run that waited (a fine-tuning) goes first
            while error is None and ready and len(running) < jobs:
                job = ready.pop(0)
                waiting.remove(job)
                out, cfg = parts[job.part]
                running[pool.submit(_work, str(data), str(out), cfg, pre, job, level)] = job
            if not running:  # nothing under way and nothing may start: a run failed
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                where = f" (seed {parts[job.part][1].seed})" if len(parts) > 1 else ""
                try:
                    seconds[job.part][f"{job.name}_s"] = future.result()
                    ended.add((job.part, job.name))
                    log.info("run %s%s trained (%.0f s)", job.name, where, seconds[job.part][f"{job.name}_s"])
                except BaseException as err:  # re-raised below, once the runs under way have ended
                    error = error or err
                    log.error("run %s%s failed: %s; waiting for the %s runs under way", job.name, where, err,
                              len(running))
    if error is not None:
        raise error
    wall = time.perf_counter() - t0
    for part in seconds:
        part["wall_s"] = wall
    return seconds


def exit_with_parent(parent: int) -> None:
    """Worker initializer: end this process (status 1) within :data:`PARENT_POLL_S` of ``parent``'s death,
    whatever killed it. A pool's busy workers outlive a parent killed by a signal it cannot clean up after."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        print(f"neds-rt bench quality worker {os.getpid()}: the comparison's process {parent} is gone; "
              "ending this run (its last checkpoint stays for --resume)", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _work(data: str, out: str, cfg: QualityConfig, pre: list[str], job: Job, level: int) -> float:
    """In a worker: train ``job`` as the sequential comparison would, and return its seconds."""
    import torch

    from streams.load import open_one
    from training.cache import load_arrays

    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s [{job.name}] %(name)s: %(message)s",
                        force=True)  # a worker process trains several runs: each names its own
    torch.set_num_threads(cfg.threads)
    cfg = replace(cfg, jobs=1)  # in here, the run itself: trained afresh unless --resume
    t0 = time.perf_counter()
    one, root = open_one(Path(data)), array_cache_dir(Path(out))
    if job.kind == PRETRAIN:
        train_pretraining({e: load_arrays(one, e, cache_root=root)[0] for e in pre}, Path(out), cfg)
        return time.perf_counter() - t0
    arr, cont = load_arrays(one, str(job.eid), cache_root=root)
    if job.kind == MULTI:
        train_multi(arr, Path(out), cfg)
    elif job.kind == STREAMING:
        train_streaming(arr, cont, run_dir(Path(out), arr.eid, STREAMING), cfg)
    else:
        train_variant(arr, Path(out), cfg, job.kind)
    return time.perf_counter() - t0
