"""``neds-rt bench quality --seeds N``: the comparison over N training seeds, judged on the seed means.

At the benchmark's sizes the training seed moves a check's margin about as much as the sampling of the TEST
trials does, so one run's verdict can flip with the seed. With ``--seeds N`` the whole comparison runs once
per training seed (``seed``, ``seed + 1``, ...) on the same data and splits, each into ``OUT/seed_S`` with its
own full report, and the report in ``OUT`` combines them:

- every score is the mean over seeds (per session, then averaged over sessions as before), and the
  done-when checks judge those means;
- ``seed_spread``: per model and metric, each seed's session mean, their standard deviation, min and max;
- ``check_seeds``: per check, each seed's difference (model - baseline) and in how many seeds the model won;
- ``check_intervals``: the paired bootstrap of :mod:`bench.quality_bootstrap` with every seed's predictions
  scored on the same draws of trials (of neurons, for regions), so the interval is that of the seed-mean
  difference;
- region scores are the seed means of each seed's cross-validated accuracies.

The baselines and the oracle do not depend on the training seed; they are rerun in each seed's report and
taken from the first.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.quality_bootstrap import HeldOut
from bench.quality_report import Rows, assemble, clean
from neds_rt.errors import DataError, invalid

# what the combined report keeps from the first seed's report, besides what assemble() rebuilds
_CARRIED = ("data", "pretrain_sessions", "heldout_sessions", "n_units", "n_trials", "streaming",
            "latent_variance")


@dataclass
class SeedRun:
    """One training seed's report and what its intervals were computed from."""

    seed: int
    report: dict[str, Any]
    helds: dict[str, HeldOut]  # eid -> TEST predictions
    region_data: dict[str, Any]  # regions' cross-validated results ({} when skipped)


def seed_folder(seed: int) -> str:
    """The sub-folder of OUT that holds training seed ``seed``'s report and models."""
    return f"seed_{seed}"


def _every_seed(values: Sequence[float | None]) -> list[float] | None:
    """The seeds' values as floats, or None when any seed lacks its value (no statistic of the others)."""
    present = [float(v) for v in values if v is not None]
    return present if len(present) == len(values) else None


def _seed_mean(values: Sequence[float | None]) -> float | None:
    whole = _every_seed(values)
    return None if whole is None else clean(statistics.fmean(whole))


def mean_results(per_seed: Sequence[Rows]) -> Rows:
    """Seed means of ``{eid: {model: {metric: value}}}``; None where any seed lacks the value."""
    first = per_seed[0]
    for i, rows in enumerate(per_seed[1:], start=1):
        if {e: sorted(m) for e, m in rows.items()} != {e: sorted(m) for e, m in first.items()}:
            raise invalid(f"results of seed run {i}", "must hold the sessions and models of the first run",
                          {e: sorted(m) for e, m in rows.items()}, kind=DataError)
    out: Rows = {}
    for eid, models in first.items():
        out[eid] = {}
        for model, metrics in models.items():
            out[eid][model] = {}
            for metric in metrics:
                out[eid][model][metric] = _seed_mean([rows[eid][model].get(metric) for rows in per_seed])
    return out


def mean_regions(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Region scores: the seed mean of every float score, the rest (counts, classes, confusion matrices)
    from the first seed, and ``per_seed``: each seed's float scores. Skipped in any seed: that seed's
    ``skipped`` note."""
    skipped = [r for r in per_seed if "skipped" in r or not r]
    if skipped:
        return dict(skipped[0])
    first = per_seed[0]
    scores = [k for k, v in first.items() if isinstance(v, float)]
    out = dict(first)
    out["per_seed"] = {k: [clean(r.get(k)) for r in per_seed] for k in scores}
    for k, values in out["per_seed"].items():
        out[k] = _seed_mean(values)
    return out


def seed_spread(per_seed_means: Sequence[Mapping[str, Mapping[str, float | None]]]
                ) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {metric: {values, mean, sd, min, max}}}`` of the session means of each seed (sd: sample
    standard deviation, None with one seed; every statistic None when a seed lacks the value)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model, metrics in per_seed_means[0].items():
        out[model] = {}
        for metric in metrics:
            values = [m.get(model, {}).get(metric) for m in per_seed_means]
            whole = _every_seed(values) or []
            out[model][metric] = {
                "values": values, "mean": _seed_mean(values),
                "sd": clean(statistics.stdev(whole)) if len(whole) > 1 else None,
                "min": min(whole) if whole else None, "max": max(whole) if whole else None,
            }
    return out


def check_seeds(per_seed_checks: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per check: each seed's difference (model - baseline), and ``better_in`` of ``n_seeds`` seeds."""
    out: dict[str, dict[str, Any]] = {}
    for i, check in enumerate(per_seed_checks[0]):
        diffs = [checks[i].get("difference") for checks in per_seed_checks]
        out[check["name"]] = {"differences": diffs, "n_seeds": len(diffs),
                               "better_in": sum(1 for d in diffs if d is not None and d > 0)}
    return out


def combine(runs: Sequence[SeedRun], extra: Mapping[str, Any]) -> dict[str, Any]:
    """The combined report of the seed runs (see the module doc); ``extra`` adds the command, the config
    and the timing. Intervals and plots are the caller's (they need the predictions and the folder)."""
    if len(runs) < 2:
        raise invalid("seed runs", "must be at least 2 to combine", len(runs), "run one seed without --seeds",
                      kind=DataError)
    first = runs[0].report
    report = assemble(
        mean_results([r.report["results"] for r in runs]), ceilings=first.get("ceilings"),
        chances=first.get("chances"), regions=mean_regions([r.report.get("regions") or {} for r in runs]),
        extra={**{k: first[k] for k in _CARRIED if k in first}, **extra}, notes=first.get("model_notes"),
    )
    report["seeds"] = [r.seed for r in runs]
    report["seed_reports"] = [f"{seed_folder(r.seed)}/report.md" for r in runs]
    report["seed_spread"] = seed_spread([r.report["mean"] for r in runs])
    report["check_seeds"] = check_seeds([r.report["checks"] for r in runs])
    return report
