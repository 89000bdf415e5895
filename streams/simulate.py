"""The IBL-like session simulator: writes sessions into a real ONE cache plus their ground truth.

``simulate_cache(out, n_sessions, seed)`` makes sessions one at a time (memory stays at one session): task and
behaviour (``sim_task``), latents, units and spikes of 1 or 2 probes (``sim_neurons``), hands the datasets to
``streams.one_cache.write_one_cache`` and writes the ground truth to ``<out>/_groundtruth/<eid>/<probe>.npz``.
Session ``i`` of seed ``s`` is drawn from its own generator ``default_rng([s, i])``: same seed, same files and
ids, and the first sessions do not change when more are asked for.
"""

from __future__ import annotations

import datetime
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from neds_rt.errors import DataError, invalid
from streams.ground_truth import GroundTruth, ground_truth_path, save_ground_truth
from streams.sim_files import SessionFiles
from streams.sim_neurons import (
    LATENT_NAMES,
    ProbeLayout,
    ProbeUnits,
    build_latents,
    cluster_tables,
    draw_layout,
    draw_spikes,
    draw_units,
    normalise_units,
)
from streams.sim_task import Behaviour, simulate_behaviour

log = logging.getLogger(__name__)

LABS: Final = (
    "angelakilab",
    "churchlandlab",
    "cortexlab",
    "danlab",
    "hoferlab",
    "mainenlab",
    "mrsicflogellab",
    "steinmetzlab",
    "wittenlab",
    "zadorlab",
)
SESSIONS_PER_SUBJECT: Final = 3
TRIALS_MEDIAN: Final = 569
TRIALS_SD: Final = 196  # IQR 434-699
MIN_TRIALS: Final = 10
SORTER: Final = "pykilosort"


@dataclass
class SimulatedSession:
    """One session in memory: its ONE datasets and the ground truth of each probe."""

    files: SessionFiles
    ground_truth: dict[str, GroundTruth]  # probe name -> ground truth


def _session_meta(seed: int, index: int) -> tuple[str, str, str, int]:
    """lab, subject, date and number of session ``index``: a few sessions per subject on consecutive days."""
    subject_i = index // SESSIONS_PER_SUBJECT
    lab = LABS[subject_i % len(LABS)]
    subject = f"SIM{seed % 10000:04d}-{subject_i:03d}"
    date = datetime.date(2023, 1, 2) + datetime.timedelta(days=7 * subject_i + index % SESSIONS_PER_SUBJECT)
    return lab, subject, date.isoformat(), 1


def _probe_datasets(
    prefix: str,
    layout: ProbeLayout,
    units: ProbeUnits,
    times: np.ndarray,
    clusters: np.ndarray,
    rng: np.random.Generator,
    duration: float,
) -> dict[str, np.ndarray | pd.DataFrame]:
    metrics, uuids = cluster_tables(rng, units, clusters, duration)
    amps = (units.amp[clusters] * np.exp(0.15 * rng.standard_normal(clusters.size, dtype=np.float32))).astype(
        np.float32
    )
    depths = (units.depth[clusters] + 6.0 * rng.standard_normal(clusters.size, dtype=np.float32)).astype(
        np.float32
    )
    return {
        f"{prefix}/spikes.times.npy": times,  # (S,) float64 s, sorted
        f"{prefix}/spikes.clusters.npy": clusters.astype(np.uint32),  # (S,) cluster id
        f"{prefix}/spikes.amps.npy": amps,  # (S,) float32 V
        f"{prefix}/spikes.depths.npy": depths,  # (S,) float32 µm from the tip
        f"{prefix}/clusters.channels.npy": units.channel,  # (N,) int64
        f"{prefix}/clusters.depths.npy": units.depth,  # (N,) float64 µm
        f"{prefix}/clusters.metrics.pqt": metrics,
        f"{prefix}/clusters.uuids.csv": uuids,
        f"{prefix}/channels.brainLocationIds_ccf_2017.npy": layout.allen_ids,  # (C,) int64 Allen ids
        f"{prefix}/channels.mlapdv.npy": layout.mlapdv,  # (C, 3) int32 µm
        f"{prefix}/channels.localCoordinates.npy": layout.local_coords,  # (C, 2) float64 µm
        f"{prefix}/channels.rawInd.npy": np.arange(layout.allen_ids.size, dtype=np.int64),
    }


def _behaviour_datasets(
    beh: Behaviour, cameras: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, np.ndarray | pd.DataFrame]:
    out: dict[str, np.ndarray | pd.DataFrame] = {
        "alf/_ibl_trials.table.pqt": beh.trials,
        "alf/_ibl_wheel.position.npy": beh.wheel_position,
        "alf/_ibl_wheel.timestamps.npy": beh.wheel_times,
    }
    for cam, (times, me) in cameras.items():
        out[f"alf/_ibl_{cam}Camera.times.npy"] = times
        out[f"alf/{cam}Camera.ROIMotionEnergy.npy"] = me
    return out


def simulate_session(
    seed: int, index: int, n_trials: int | None = None, n_probes: int | None = None
) -> SimulatedSession:
    """Session ``index`` of the cache drawn with ``seed`` (in memory)."""
    rng = np.random.default_rng([seed, index])
    eid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    if n_trials is None:
        n_trials = int(np.clip(round(rng.normal(TRIALS_MEDIAN, TRIALS_SD)), 250, 1100))
    if n_probes is None:
        n_probes = 1 + int(rng.random() < 0.6)
    beh, cameras = simulate_behaviour(rng, n_trials)
    latents = build_latents(rng, beh)  # (G, L) float32
    datasets = _behaviour_datasets(beh, cameras)
    truths: dict[str, GroundTruth] = {}
    for p in range(n_probes):
        probe = f"probe{p:02d}"
        layout = draw_layout(rng)
        units = draw_units(rng, layout)
        normalise_units(units, latents)
        times, clusters = draw_spikes(units, latents, beh.step, seed=int(rng.integers(2**62)))
        datasets.update(
            _probe_datasets(f"alf/{probe}/{SORTER}", layout, units, times, clusters, rng, beh.duration)
        )
        truths[probe] = GroundTruth(
            eid=eid,
            probe=probe,
            t0=0.0,
            step=beh.step,
            latents=latents,
            latent_names=LATENT_NAMES,
            cluster_ids=units.cluster_ids,
            base_rate=units.base_rate,
            loadings=units.loadings,
            log_offset=units.log_offset,
            regions=units.region,
        )
    lab, subject, date, number = _session_meta(seed, index)
    files = SessionFiles(eid=eid, lab=lab, subject=subject, date=date, number=number, datasets=datasets)
    return SimulatedSession(files=files, ground_truth=truths)


def simulate_cache(out: Path, n_sessions: int, seed: int = 0, n_trials: int | None = None) -> list[str]:
    """Write ``n_sessions`` IBL-like sessions into a ONE cache at ``out``; return their eids.

    The cache opens with ``one.api.One(cache_dir=out)``; ground truth lies in ``out/_groundtruth``.
    """
    from streams.one_cache import write_one_cache

    out = Path(out)
    if isinstance(n_sessions, bool) or not isinstance(n_sessions, int | np.integer) or n_sessions < 1:
        raise invalid("n_sessions", "must be an int >= 1", n_sessions, "pass --sessions 1 or more")
    if n_trials is not None and (
        isinstance(n_trials, bool) or not isinstance(n_trials, int | np.integer) or n_trials < MIN_TRIALS
    ):
        raise invalid(
            "n_trials",
            f"must be an int >= {MIN_TRIALS} or None",
            n_trials,
            f"pass --trials {MIN_TRIALS} or more, or leave it out for an IBL-like draw",
        )
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise invalid("seed", "must be an int >= 0", seed, "pass --seed 0 or another non-negative int")
    if out.exists() and not out.is_dir():
        raise invalid(
            "out", "must be a folder (or not exist yet)", str(out), "pass a folder path", kind=DataError
        )
    eids: list[str] = []
    for i in range(int(n_sessions)):
        t_start = time.perf_counter()
        sim = simulate_session(int(seed), i, n_trials)
        eids += write_one_cache(out, [sim.files])
        for probe, gt in sim.ground_truth.items():
            save_ground_truth(ground_truth_path(out, sim.files.eid, probe), gt)
        n_spikes = sum(
            int(v.size)
            for k, v in sim.files.datasets.items()
            if k.endswith("spikes.times.npy") and isinstance(v, np.ndarray)
        )
        log.info(
            "session %d/%d %s: %d trials, %d probes, %d spikes, %.1f s",
            i + 1,
            n_sessions,
            sim.files.eid,
            len(sim.files.datasets["alf/_ibl_trials.table.pqt"]),
            len(sim.ground_truth),
            n_spikes,
            time.perf_counter() - t_start,
        )
        del sim
    return eids
