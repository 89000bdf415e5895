"""Binning throughput: numba kernels vs the numpy reference vs naive per-window np.histogram2d.

One seeded Poisson spike train (default one hour, 600 units, log-normal rates with a 7 Hz mean) is binned
in 20 ms bins four ways, and every way must give identical counts:

(a) :func:`neds_rt.binning.bin_windows` (numba) on ~570 trial windows of 100 bins, and on one continuous
    window covering the whole recording;
(b) :func:`neds_rt.binning.bin_windows_reference` (numpy), on the first ``ref_seconds`` of the recording
    only (its cost per window grows with the whole train), figures per spike;
(c) naive ``np.histogram2d`` per window (after slicing the window's spikes with searchsorted), on all
    trial windows and on the continuous subset;
(d) :class:`neds_rt.binning.RingBinner` fed the whole recording in 20 ms chunks, one bin popped per chunk.

Throughput is spikes counted into bins per second of wall time (best of ``repeats`` for the fast paths).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import machine_info
from neds_rt.binning import BIN_SIZE_S, RingBinner, bin_windows, bin_windows_reference
from neds_rt.errors import DataError, invalid

log = logging.getLogger(__name__)

TRIAL_BINS = 100
N_TRIALS = 570


def _spike_train(duration: float, n_units: int, rate_hz: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (S,) float64 times in [0, duration) and (S,) int64 units; log-normal rates, mean rate_hz."""
    rng = np.random.default_rng(seed)
    rates = rng.lognormal(0.0, 1.0, n_units)
    rates *= rate_hz / rates.mean()  # (N,) Hz
    n = int(rng.poisson(rates.sum() * duration))
    times = np.sort(rng.uniform(0.0, duration, n))  # (S,) seconds
    units = rng.choice(n_units, size=n, p=rates / rates.sum()).astype(np.int64)  # (S,)
    return times, units


def _trial_starts(duration: float, n_trials: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    span = TRIAL_BINS * BIN_SIZE_S
    base = np.linspace(0.5, duration - span - 1.0, n_trials)
    return base + rng.uniform(0.0, 0.5, n_trials)  # (W,) window starts, seconds


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _histogram_windows(
    times: np.ndarray, units: np.ndarray, starts: np.ndarray, n_bins: int, n_units: int
) -> np.ndarray:
    out = np.zeros((starts.size, n_bins, n_units), dtype=np.int64)  # (W, T, N)
    unit_edges = np.arange(n_units + 1) - 0.5
    for w, s in enumerate(starts):
        edges = s + np.arange(n_bins + 1) * BIN_SIZE_S  # (T + 1,) the same float64 edges as the kernels
        lo, hi = np.searchsorted(times, [edges[0], edges[-1]], side="left")  # spikes in [start, end)
        h, _, _ = np.histogram2d(times[lo:hi], units[lo:hi], bins=(edges, unit_edges))
        out[w] = h
    return out


def _ring_feed(
    times: np.ndarray, units: np.ndarray, n_bins: int, n_units: int
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Feed 20 ms chunks; return (T, N) popped counts, (T,) ns per tick (add + pop), the binner's counts."""
    edges = np.arange(n_bins + 1) * BIN_SIZE_S
    bounds = np.searchsorted(times, edges, side="left")  # chunk k = events in bin k
    out = np.zeros((n_bins, n_units), dtype=np.uint16)  # (T, N) popped counts
    tick_ns = np.zeros(n_bins, dtype=np.int64)
    binner = RingBinner(n_units, t0=0.0, bin_size=BIN_SIZE_S, ring_bins=64)
    clock = time.perf_counter_ns
    for k in range(n_bins):
        a, b = bounds[k], bounds[k + 1]
        t = clock()
        binner.add(times[a:b], units[a:b])
        for _ in range(binner.closable(binner.bin_end(k))):
            binner.pop(out[binner.next_bin])
        tick_ns[k] = clock() - t
    return out, tick_ns, dict(binner.counts)


def _warm_up(n_units: int) -> None:
    t = np.array([0.001, 0.03])
    u = np.array([0, n_units - 1], dtype=np.int64)
    bin_windows(t, u, [0.0], 4, n_units, dtype=np.uint16)
    bin_windows(t, u, [0.0], 4, n_units)
    _ring_feed(t, u, 4, n_units)


def _machine() -> dict[str, object]:
    return machine_info(("numpy", "numba"))


def run_binning_bench(
    out: Path,
    duration: float = 3600.0,
    n_units: int = 600,
    rate_hz: float = 7.0,
    n_trials: int = N_TRIALS,
    ref_seconds: float = 300.0,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the benchmark, print a table, write ``<out>/binning.json``; returns the JSON dict."""
    if not duration > TRIAL_BINS * BIN_SIZE_S + 2.0 or n_units <= 0 or not rate_hz > 0:
        raise invalid("bench binning", "needs duration > 4 s, units > 0 and rate > 0",
                      (duration, n_units, rate_hz), "e.g. --duration 3600 --units 600 --rate 7")
    machine = _machine()
    t = time.perf_counter()
    times, units = _spike_train(duration, n_units, rate_hz, seed)
    log.info("spike train: %s spikes in %.1f s", times.size, time.perf_counter() - t)
    _warm_up(n_units)
    starts = _trial_starts(duration, n_trials, seed)
    n_cont = int(np.floor(duration / BIN_SIZE_S))
    rows: list[dict[str, Any]] = []

    def row(path: str, layout: str, seconds: float, spikes: int, note: str = "") -> None:
        rows.append({"path": path, "layout": layout, "seconds": seconds, "spikes": spikes,
                     "spikes_per_s": spikes / seconds if seconds > 0 else float("inf"), "note": note})

    # (a) numba bin_windows
    sec, trial_counts = _best(lambda: bin_windows(times, units, starts, TRIAL_BINS, n_units, dtype=np.uint16),
                              repeats)
    n_trial_spikes = int(trial_counts.sum(dtype=np.int64))
    row("numba bin_windows", f"{starts.size} trial windows x {TRIAL_BINS} bins", sec, n_trial_spikes,
        f"best of {repeats}")
    sec, cont = _best(lambda: bin_windows(times, units, [0.0], n_cont, n_units, dtype=np.uint16)[0], repeats)
    n_cont_spikes = int(cont.sum(dtype=np.int64))
    row("numba bin_windows", f"1 continuous window x {n_cont} bins", sec, n_cont_spikes, f"best of {repeats}")

    # (b) numpy reference on a subset
    sub_s = min(ref_seconds, duration)
    n_sub = int(np.floor(sub_s / BIN_SIZE_S))
    cut = int(np.searchsorted(times, sub_s + 1.0))
    t_sub, u_sub = times[:cut], units[:cut]
    sub_starts = starts[starts + TRIAL_BINS * BIN_SIZE_S <= sub_s]
    sec, ref_trials = _best(lambda: bin_windows_reference(t_sub, u_sub, sub_starts, TRIAL_BINS, n_units), 1)
    # per window the reference scans every spike it is given: scale by windows and by train length
    est = sec * (starts.size / max(sub_starts.size, 1)) * (times.size / max(t_sub.size, 1))
    row("numpy reference", f"{sub_starts.size} trial windows (first {sub_s:.0f} s)", sec,
        int(ref_trials.sum()), f"subset; full run est. {est:.0f} s (cost/window grows with the train)")
    sec, ref_cont = _best(lambda: bin_windows_reference(t_sub, u_sub, [0.0], n_sub, n_units)[0], 1)
    est = sec * times.size / max(t_sub.size, 1)
    row("numpy reference", f"1 continuous window x {n_sub} bins (first {sub_s:.0f} s)", sec,
        int(ref_cont.sum()), f"subset; full run est. {est:.1f} s (per spike)")

    # (c) naive per-window np.histogram2d
    sec, hist_trials = _best(lambda: _histogram_windows(times, units, starts, TRIAL_BINS, n_units), 1)
    row("np.histogram2d per window", f"{starts.size} trial windows x {TRIAL_BINS} bins", sec,
        int(hist_trials.sum()))
    sec, hist_cont = _best(lambda: _histogram_windows(t_sub, u_sub, np.array([0.0]), n_sub, n_units)[0], 1)
    row("np.histogram2d per window", f"1 continuous window x {n_sub} bins (first {sub_s:.0f} s)", sec,
        int(hist_cont.sum()), "subset (the full grid would need GBs)")

    # (d) RingBinner, 20 ms chunks
    t = time.perf_counter()
    ring, tick_ns, ring_counts = _ring_feed(times, units, n_cont, n_units)
    sec = time.perf_counter() - t
    ring_spikes = int(ring.sum(dtype=np.int64))
    row("RingBinner add+pop", f"{n_cont} ticks of 20 ms", sec, ring_spikes, "incl. Python loop per tick")

    checks = {
        "trial: numba == histogram2d": bool(np.array_equal(trial_counts, hist_trials)),
        "trial subset: numba == reference": bool(np.array_equal(
            bin_windows(t_sub, u_sub, sub_starts, TRIAL_BINS, n_units), ref_trials)),
        "continuous subset: numba == reference": bool(np.array_equal(cont[:n_sub], ref_cont)),
        "continuous subset: numba == histogram2d": bool(np.array_equal(cont[:n_sub], hist_cont)),
        "continuous: numba == RingBinner": bool(np.array_equal(cont, ring)),
        "RingBinner rejected nothing": ring_counts["ok"] == ring_spikes and sum(ring_counts.values())
        == ring_counts["ok"],
    }
    tick_us = tick_ns / 1e3
    result: dict[str, Any] = {
        "parameters": {"duration_s": duration, "n_units": n_units, "mean_rate_hz": rate_hz, "seed": seed,
                       "n_spikes": int(times.size), "n_trial_windows": int(starts.size),
                       "trial_bins": TRIAL_BINS, "bin_size_s": BIN_SIZE_S, "continuous_bins": n_cont,
                       "reference_subset_s": sub_s, "repeats": repeats},
        "machine": machine,
        "results": rows,
        "ring_tick_us": {p: float(np.percentile(tick_us, q)) for p, q in
                         (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))} | {
                             "max": float(tick_us.max())},
        "checks": checks,
        "identical_counts": all(checks.values()),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "binning.json").write_text(json.dumps(result, indent=2))
    _print(result)
    if not result["identical_counts"]:
        raise invalid("bench binning", "all binning paths must give identical counts",
                      {k: v for k, v in checks.items() if not v}, "this is a bug: report it", kind=DataError)
    return result


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    p = result["parameters"]
    table = Table(title=f"binning throughput: {p['n_spikes']:,} spikes, {p['n_units']} units, "
                        f"{p['duration_s']:.0f} s, 20 ms bins")
    for name, justify in (("path", "left"), ("layout", "left"), ("seconds", "right"),
                          ("spikes", "right"), ("Mspikes/s", "right"), ("note", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in result["results"]:
        table.add_row(r["path"], r["layout"], f"{r['seconds']:.4f}", f"{r['spikes']:,}",
                      f"{r['spikes_per_s'] / 1e6:.2f}", r["note"])
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # a log file or pipe: keep rows on one line
    console.print(table)
    ticks = result["ring_tick_us"]
    console.print("RingBinner per 20 ms tick (us): " + ", ".join(f"{k} {v:.1f}" for k, v in ticks.items()))
    m = result["machine"]
    console.print(f"machine: {m['processor'] or m['machine']}, {m['cores_available']} cores, "
                  f"load {m['loadavg_1m_at_start']:.1f}; numba {m['numba']}, numpy {m['numpy']}")
    status = "identical" if result["identical_counts"] else "MISMATCH"
    console.print(f"counts across paths: {status} " + str(result["checks"]))
