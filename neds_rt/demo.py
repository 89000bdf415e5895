"""``make demo``: the whole toolkit on an embedded default, step by step, reusing earlier results."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer

log = logging.getLogger(__name__)

DEMO_SESSIONS = 3
DEMO_SEED = 0
DEMO_TRIALS = 120


def _step(title: str) -> float:
    typer.secho(f"\n== {title}", bold=True)
    return time.perf_counter()


def run_demo(out: Path) -> None:
    """Simulate sessions into a ONE cache, load them through ONE-api, bin them and print a summary."""
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
    typer.echo(f"   {time.perf_counter() - t:.1f} s")

    t = _step("2. load every session through ONE-api (local mode) and bin it (20 ms)")
    one = open_one(cache)
    eids = [str(e) for e in one.search()]
    rows = []
    for eid in eids:
        trials, cont = load_arrays(one, eid, None, cache_root=out / "arrays")
        rows.append((eid, trials, cont))
    typer.echo(f"   {time.perf_counter() - t:.1f} s")

    _step("3. summary")
    from rich.console import Console
    from rich.table import Table

    table = Table(title="NEDS inputs per session")
    for col in ("session", "probe", "units", "regions", "trials (train/val/test)", "trial spikes (K,T,N)",
                "continuous bins", "wheel", "whisker"):
        table.add_column(col)
    for eid, tr, co in rows:
        regions = ", ".join(f"{r}:{n}" for r, n in zip(*_counts(tr.regions), strict=True))
        split = "/".join(str(tr.subset(s).size) for s in (0, 1, 2))
        table.add_row(
            eid[:8], tr.probe, str(tr.n_units), regions, split, str(tuple(tr.spikes.shape)),
            str(co.spikes.shape[0]), str(tuple(tr.wheel.shape)), str(tuple(tr.whisker.shape)),
        )
    Console(width=160).print(table)


def _counts(values: object) -> tuple[list[str], list[int]]:
    import numpy as np

    names, counts = np.unique(np.asarray(values), return_counts=True)
    return [str(n) for n in names], [int(c) for c in counts]
