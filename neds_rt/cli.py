"""The ``neds-rt`` command line. Heavy imports happen inside each command so ``--help`` stays fast."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from neds_rt.errors import NedsRtError

app = typer.Typer(
    name="neds-rt",
    help="Real-time closed-loop decoding with NEDS: simulate, train, export, serve, replay, bench.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: print figures, write JSON and PNG.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(err: NedsRtError) -> typer.Exit:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Folder for the ONE cache (created).")],
    sessions: Annotated[int, typer.Option(min=1, help="Number of sessions.")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same cache and ids.")] = 0,
    trials: Annotated[int | None, typer.Option(help="Trials per session (default: IBL-like draw).")] = None,
) -> None:
    """Write IBL-like sessions into a real ONE cache (ALF files + cache tables + ground truth)."""
    from streams.simulate import simulate_cache

    try:
        eids = simulate_cache(out, n_sessions=sessions, seed=seed, n_trials=trials)
    except NedsRtError as err:
        raise _fail(err) from err
    typer.echo(f"wrote {len(eids)} sessions to {out}")
    for eid in eids:
        typer.echo(f"  {eid}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Working folder for the demo.")] = Path("demo_out"),
) -> None:
    """The main job on an embedded default: simulate, load, bin and summarise (more steps as they land)."""
    from neds_rt.demo import run_demo

    try:
        run_demo(out)
    except NedsRtError as err:
        raise _fail(err) from err


@bench_app.command("binning")
def bench_binning(
    out: Annotated[Path, typer.Option(help="Folder for the JSON result.")] = Path("bench_out"),
    duration: Annotated[float, typer.Option(help="Session length in seconds.")] = 3600.0,
    units: Annotated[int, typer.Option(help="Number of units.")] = 600,
    rate: Annotated[float, typer.Option(help="Mean firing rate, Hz.")] = 7.0,
) -> None:
    """Spikes/s binned by the numba kernels vs the numpy reference vs per-window np.histogram."""
    from bench.binning import run_binning_bench

    run_binning_bench(out, duration=duration, n_units=units, rate_hz=rate)


if __name__ == "__main__":
    app()
