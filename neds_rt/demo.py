"""``make demo``: the whole toolkit on an embedded default, step by step, reusing earlier results.

1. simulate IBL-like sessions into a real ONE cache;
2. load them through ONE-api and bin them (trial-aligned and continuous);
3. train a small streaming NEDS on continuous windows of every session, holding out the last 30 % of the
   replayed session's recording (reused on a second run);
4. export the replayed session's step graph to ONNX (on every run: seconds);
5. replay 60 s of the held-out stretch as a live LSL stream, serve it live (status lines), and measure with
   a client process (`bench latency`);
6. summarise decode quality (live and offline) and latency percentiles, with the path of the plots.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import typer

log = logging.getLogger(__name__)

DEMO_SESSIONS = 3
DEMO_SEED = 0
DEMO_TRIALS = 150
DEMO_EPOCHS = 16
HELD_OUT_FRACTION = 0.3  # the tail of the replayed session that training never sees
REPLAY_SECONDS = 60.0


def _step(title: str) -> float:
    typer.secho(f"\n== {title}", bold=True)
    return time.perf_counter()


def _done(t: float) -> None:
    typer.echo(f"   {time.perf_counter() - t:.1f} s")


def run_demo(out: Path, replay_seconds: float = REPLAY_SECONDS) -> dict[str, Any]:
    """Run every step; return the latency bench's result (quality and latency of the live run)."""
    from streams.load import open_one
    from streams.simulate import simulate_cache
    from training.cache import load_arrays

    out.mkdir(parents=True, exist_ok=True)
    cache = out / "one_cache"

    t = _step(f"1. simulate {DEMO_SESSIONS} IBL-like sessions into a ONE cache at {cache}")
    if (cache / "sessions.pqt").exists():
        typer.echo("   reusing the existing cache (delete it to simulate again)")
    else:
        simulate_cache(cache, n_sessions=DEMO_SESSIONS, seed=DEMO_SEED, n_trials=DEMO_TRIALS)
    _done(t)

    t = _step("2. load every session through ONE-api (local mode) and bin it (20 ms)")
    one = open_one(cache)
    eids = sorted(str(e) for e in one.search())
    arrays = {eid: load_arrays(one, eid, None, cache_root=out / "arrays") for eid in eids}
    _done(t)
    _print_sessions(arrays)

    replayed = eids[-1]
    cont = arrays[replayed][1]
    cut = round(cont.spikes.shape[0] * (1 - HELD_OUT_FRACTION))  # first held-out bin
    held_out_start = cont.t0 + cut * cont.bin_size  # session seconds

    t = _step(f"3. train a small streaming NEDS on continuous windows ({DEMO_EPOCHS} epochs; the last "
              f"{HELD_OUT_FRACTION:.0%} of session {replayed[:8]} held out)")
    ckpt = _train(out / "run", arrays, replayed, cut)
    _done(t)

    t = _step("4. export the replayed session's step graph (ONNX, metadata inside)")
    model = out / "run" / "step.onnx"
    from training.export import export_checkpoint

    # exported on every run (seconds): a reused training run still gets this version's step graph
    meta = export_checkpoint(ckpt, model, eid=replayed)
    typer.echo(f"   {model}: {meta.n_units} units, context {meta.context} bins")
    _done(t)

    t = _step(f"5. replay {replay_seconds:.0f} s of the held-out stretch live over LSL, serve it, measure "
              "(replay, serve and client are three processes)")
    from bench.latency import LatencyBenchConfig, run_latency_bench

    cfg = LatencyBenchConfig(duration=replay_seconds, start=held_out_start + 1.0, show_serve=True)
    result = run_latency_bench(cache, replayed, model, out / "live", cfg)
    _done(t)

    _step("6. summary")
    _summary(result, out / "live")
    return result


def _train(run: Path, arrays: dict[str, tuple[Any, Any]], replayed: str, cut: int) -> Path:
    from training.arrays import TEST
    from training.config import NEDSConfig, TrainConfig
    from training.train import train
    from training.windows import build_window_arrays

    ckpt = run / "best.pt"
    if ckpt.exists():
        typer.echo(f"   reusing {ckpt} (delete {run} to train again)")
        return ckpt
    windows = {}
    for eid, (_, cont) in arrays.items():
        if eid == replayed:  # the held-out tail becomes test-only: no training window reaches into it
            split = cont.split.copy()
            split[cut:] = TEST
            cont = replace(cont, split=split)
        windows[eid] = build_window_arrays(cont, seed=0)
    cfg = NEDSConfig.preset("small", n_sessions=len(windows), mode="streaming")
    result = train(windows, run, cfg, TrainConfig(epochs=DEMO_EPOCHS, batch_size=16, lr=2e-3))
    typer.echo(f"   {result.trials_per_s:.1f} windows/s, best validation score {result.best_score:.3f}")
    return ckpt


def _print_sessions(arrays: dict[str, tuple[Any, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="NEDS inputs per session")
    for col in ("session", "probe", "units", "regions", "trials (train/val/test)", "trial spikes (K,T,N)",
                "continuous bins"):
        table.add_column(col)
    for eid, (tr, co) in arrays.items():
        names, counts = np.unique(np.asarray(tr.regions), return_counts=True)
        regions = ", ".join(f"{r}:{n}" for r, n in zip(names, counts, strict=True))
        split = "/".join(str(tr.subset(s).size) for s in (0, 1, 2))
        table.add_row(eid[:8], tr.probe, str(tr.n_units), regions, split, str(tuple(tr.spikes.shape)),
                      str(co.spikes.shape[0]))
    Console(width=160).print(table)


def _summary(result: dict[str, Any], folder: Path) -> None:
    run = result["runs"][0]
    p, c, q = run["stages_ms"]["total"], run["counts"], run["quality"]
    typer.echo(f"   bins served: {c['bins_logged']}, missed: {c['bins_missing_from_log']}, not received: "
               f"{c['bins_not_received']}, gap-filled: {c['gap_filled_bins']}, late spikes: "
               f"{c.get('serve_late', 0)}")
    typer.echo("   bin close -> decode received (ms): " + ", ".join(
        f"{k} {p[k]:.2f}" for k in ("p50", "p90", "p99", "p99.9", "max")))
    typer.echo(f"   one inference step (ms): p50 {run['stages_ms']['infer']['p50']:.2f}, "
               f"p99 {run['stages_ms']['infer']['p99']:.2f}")
    for name in ("live", "offline"):
        if name in q:
            typer.echo(f"   decode quality {name:<7}: wheel R² {q[name].get('wheel_r2', float('nan')):.3f}, "
                       f"choice accuracy {q[name]['choice_accuracy']:.2f} over {q[name]['n_trials']} trials "
                       f"(majority-class chance {q[name]['choice_chance']:.2f})")
    served = q.get("as_served", {})
    nan = float("nan")
    typer.echo(f"   max |live - offline| decode: {q.get('max_abs_decode_difference', nan):.2e}; less the "
               f"{served.get('late_spikes_dropped', 0)} late spikes serve dropped: "
               f"{served.get('max_abs_decode_difference', nan):.2e}")
    cpu = run["cpu"]
    typer.echo(f"   CPU: serve {cpu['serve_cpu_pct']:.0f} %, replay {cpu['replay_cpu_pct']:.0f} %")
    typer.echo(f"   plots: {folder / 'latency.png'}; figures: {folder / 'latency.json'}")
