"""Assemble the quality report (``report.json``) from per-session scores, and write it as Markdown.

Pure functions on plain dicts, so they are tested on hand-made numbers. The raw input is

- ``results``: ``{eid: {model: {metric: value or None}}}``, TEST-split scores of every held-out session
  (``None`` where a model does not do a task, e.g. the ridge decoders have no bits/spike);
- ``ceilings`` / ``chances``: ``{eid: {metric: value}}`` from the oracle (simulated sessions only) and the
  chance levels; ``regions``: the region-classification scores.

:func:`assemble` adds session means, fractions of the ceiling and the issue's done-when checks, and, when the
streaming NEDS (``neds_streaming``) is among the models, its gap to the offline single-session NEDS;
:func:`add_model_rows` lets a later caller (issue 5's streaming rows) add a model and re-assemble.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from neds_rt.errors import DataError, invalid
from training.config import FINETUNE_UNIT_DROPOUT

METRICS: Final = (
    "bits_per_spike", "wheel_r2", "whisker_r2", "choice_accuracy", "choice_balanced_accuracy",
    "block_accuracy", "block_balanced_accuracy",
)
# the paper's five tasks and the metric each is judged on
TASKS: Final = {
    "encoding": "bits_per_spike", "wheel": "wheel_r2", "whisker": "whisker_r2",
    "choice": "choice_balanced_accuracy", "block": "block_balanced_accuracy",
}
MODELS: Final = (
    "oracle", "psth", "linear", "rrr", "neds_encoding", "neds_decoding", "neds_single", "neds_multi",
)
MODEL_NOTES: Final = {
    "oracle": "ceiling: true rates (encoding), linear decoders on the true latents (decoding)",
    "psth": "smoothed TRAIN PSTH of each neuron (encoding reference)",
    "linear": "ridge on lagged spikes (wheel, whisker), logistic regression (choice, block)",
    "rrr": "reduced-rank Poisson regression encoder from behaviour",
    "neds_encoding": "NEDS trained with encoding masking only (single session)",
    "neds_decoding": "NEDS trained with decoding masking only (single session)",
    "neds_single": "NEDS, all four masking schemes, trained on the held-out session alone",
    "neds_multi": "NEDS pretrained on the other sessions, fine-tuned on the held-out session (unit dropout "
                  f"{FINETUNE_UNIT_DROPOUT}, the fine-tuning default)",
}
HEADLINE: Final = "neds_multi"  # the NEDS row the done-when checks judge
BASELINE_FOR_TASK: Final = {"encoding": "rrr", "wheel": "linear", "whisker": "linear", "choice": "linear",
                            "block": "linear"}

STREAMING: Final = "neds_streaming"  # issue 5: causal decodes of the streaming NEDS
STREAMING_OFFLINE: Final = "neds_single"  # the offline NEDS it is compared with (same session, same budget)
GAP_METRICS: Final = METRICS[1:]  # the decoding metrics (the streaming model is scored on decoding only)

Rows = dict[str, dict[str, dict[str, float | None]]]  # eid -> model -> metric -> value


def clean(value: Any) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def model_order(results: Rows) -> list[str]:
    """Models present, in :data:`MODELS` order, then any others (e.g. streaming rows) in first-seen order."""
    seen: list[str] = []
    for per in results.values():
        for m in per:
            if m not in seen:
                seen.append(m)
    return [m for m in MODELS if m in seen] + [m for m in seen if m not in MODELS]


def complete(results: Rows) -> Rows:
    """Every model x metric x session present (None where missing), values cleaned."""
    models = model_order(results)
    return {eid: {m: {k: clean(per.get(m, {}).get(k)) for k in METRICS} for m in models}
            for eid, per in results.items()}


def session_means(results: Rows) -> dict[str, dict[str, float | None]]:
    """model -> metric -> mean over sessions (None when no session has the value)."""
    models = model_order(results)
    return {m: {k: _mean([results[e].get(m, {}).get(k) for e in results]) for k in METRICS} for m in models}


def fraction(value: float | None, ceiling: float | None, chance: float | None) -> float | None:
    """``(value - chance) / (ceiling - chance)``; None when undefined (no ceiling, ceiling at chance)."""
    if value is None or ceiling is None or chance is None or ceiling - chance <= 1e-12:
        return None
    return (value - chance) / (ceiling - chance)


def fractions(
    results: Rows, ceilings: Mapping[str, Mapping[str, float | None]],
    chances: Mapping[str, Mapping[str, float | None]],
) -> Rows:
    """eid -> model -> metric -> fraction of the session's ceiling (models other than the oracle)."""
    out: Rows = {}
    for eid, per in results.items():
        ceil, ch = ceilings.get(eid, {}), chances.get(eid, {})
        out[eid] = {m: {k: fraction(v, clean(ceil.get(k)), clean(ch.get(k))) for k, v in vals.items()}
                    for m, vals in per.items() if m != "oracle"}
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


REGION_CHECKS: Final = ("region classification from NEDS embeddings beats chance (accuracy)",
                         "region classification from NEDS embeddings beats the PSTH baseline (accuracy)")


def trial_comparisons() -> list[tuple[str, str, str, str]]:
    """``(check name, model, baseline, metric)`` of the done-when checks scored on TEST trials."""
    out = [(f"NEDS beats the linear baseline on {task} ({metric})", HEADLINE, BASELINE_FOR_TASK[task], metric)
           for task, metric in TASKS.items()]
    out += [(f"multi-session NEDS beats single-session NEDS on {task} ({TASKS[task]})", HEADLINE,
             "neds_single", TASKS[task]) for task in ("encoding", "wheel")]
    return out


def done_checks(mean: Mapping[str, Mapping[str, float | None]], regions: Mapping[str, Any] | None
                ) -> list[dict[str, Any]]:
    """The issue's done-when checks on session means: ``{name, passed (bool or None), detail, difference}``.

    ``passed`` and ``difference`` (model - baseline) are None when a number is missing (that model or score
    was not run)."""
    checks: list[dict[str, Any]] = []

    def compare(name: str, a_name: str, a: float | None, b_name: str, b: float | None) -> None:
        diff = None if a is None or b is None else a - b
        checks.append({"name": name, "passed": None if diff is None else bool(diff > 0),
                       "detail": f"{a_name} {_fmt(a)} vs {b_name} {_fmt(b)}", "difference": diff})

    for name, model, base, metric in trial_comparisons():
        compare(name, model, mean.get(model, {}).get(metric), base, mean.get(base, {}).get(metric))
    reg = dict(regions or {})
    compare(REGION_CHECKS[0], "neds embeddings", clean(reg.get("neds_accuracy")), "chance (majority)",
            clean(reg.get("chance_majority")))
    compare(REGION_CHECKS[1], "neds embeddings", clean(reg.get("neds_accuracy")), "psth",
            clean(reg.get("psth_accuracy")))
    return checks


def interval_text(iv: Mapping[str, Any] | None) -> str:
    """A check's interval in words: difference [95 % interval]; share of resamples won ('-' when none)."""
    if not iv:
        return "-"
    lo, hi = iv["interval"]
    return f"{iv['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]; better in {100 * iv['share_better']:.0f} %"


_REGION_ROWS: Final = (
    ("neds", "NEDS embeddings (the check)"), ("stitch", "NEDS stitching columns only"),
    ("head", "NEDS spike-head rows only"), ("psth", "PSTH baseline"), ("oracle", "ceiling: true tuning"),
)


def _region_table(reg: Mapping[str, Any]) -> list[str]:
    """Markdown rows of the region scores; a fraction-of-ceiling column where the ceiling was run."""
    frac = "oracle_accuracy" in reg
    head = "| features | accuracy | balanced accuracy |" + (" fraction of ceiling |" if frac else "")
    rows = [head, "|---|---:|---:|" + ("---:|" if frac else "")]
    for key, label in _REGION_ROWS:
        if f"{key}_accuracy" not in reg:
            continue
        acc, bacc = clean(reg[f"{key}_accuracy"]), clean(reg.get(f"{key}_balanced_accuracy"))
        row = f"| {label} | {_fmt(acc)} | {_fmt(bacc)} |"
        if frac:
            row += f" {_fmt(clean(reg.get(f'{key}_fraction_of_ceiling')))} |" if key != "oracle" else " 1 |"
        rows.append(row)
    chance = (f"| chance | {_fmt(clean(reg.get('chance_majority')))} (majority) | "
              f"{_fmt(clean(reg.get('chance_uniform')))} (uniform) |")
    return [*rows, chance + (" 0 |" if frac else "")]


def _gap_rows(stream: Mapping[str, float | None], offline: Mapping[str, float | None]
              ) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for k in GAP_METRICS:
        a, b = clean(stream.get(k)), clean(offline.get(k))
        out[k] = {"streaming": a, "offline": b, "gap": None if a is None or b is None else a - b}
    return out


def streaming_gap(results: Rows, mean: Mapping[str, Mapping[str, float | None]],
                  streaming: str = STREAMING, offline: str = STREAMING_OFFLINE) -> dict[str, Any]:
    """Per decoding metric: streaming, offline and ``gap`` = streaming - offline, of the session means
    (``mean``) and of each session (``sessions``)."""
    return {
        "streaming": streaming, "offline": offline,
        "mean": _gap_rows(mean.get(streaming, {}), mean.get(offline, {})),
        "sessions": {eid: _gap_rows(per.get(streaming, {}), per.get(offline, {}))
                     for eid, per in results.items()},
    }


def model_notes(models: Sequence[str], config: Mapping[str, Any] | None,
                earlier: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each model's note: :data:`MODEL_NOTES`, else ``earlier``'s (a report's own rows). The run's
    ``config`` (a ``QualityConfig`` as a dict) adds what it changed, e.g. a frozen start of ``neds_multi``."""
    notes = {m: MODEL_NOTES.get(m) or (earlier or {}).get(m) or "" for m in models}
    frozen = int((config or {}).get("frozen_epochs") or 0)
    if frozen and HEADLINE in notes:
        notes[HEADLINE] += (f"; frozen start: the held-out session's own layers trained alone for the first "
                            f"{frozen} epochs (--frozen-epochs {frozen})")
    return notes


def assemble(
    results: Rows,
    *,
    ceilings: Mapping[str, Mapping[str, float | None]] | None = None,
    chances: Mapping[str, Mapping[str, float | None]] | None = None,
    regions: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    notes: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The whole report as a JSON-ready dict (see the module doc for the inputs). ``notes``: model notes of
    an earlier report, kept for the models :data:`MODEL_NOTES` does not describe (rows added later)."""
    if not results:
        raise invalid("results", "must hold at least one held-out session", 0,
                      "run the comparison on one or more held-out sessions", kind=DataError)
    full = complete(results)
    ceil = {e: {k: clean(v) for k, v in c.items()} for e, c in (ceilings or {}).items()}
    ch = {e: {k: clean(v) for k, v in c.items()} for e, c in (chances or {}).items()}
    fr = fractions(full, ceil, ch)
    mean = session_means(full)
    report: dict[str, Any] = dict(extra or {})
    report.update({
        "metrics": list(METRICS), "tasks": dict(TASKS), "models": model_order(full),
        "model_notes": model_notes(model_order(full), report.get("config"), notes),
        "sessions_evaluated": sorted(full), "results": full, "mean": mean,
        "ceilings": ceil, "chances": ch, "fraction_of_ceiling": fr, "fraction_of_ceiling_mean":
        session_means(fr) if fr else {}, "regions": dict(regions or {}),
    })
    report["checks"] = done_checks(mean, regions)
    if STREAMING in mean:
        report["streaming_gap"] = streaming_gap(full, mean)
    return report


def add_model_rows(report: dict[str, Any], model: str, rows: Mapping[str, Mapping[str, float | None]],
                   note: str = "") -> dict[str, Any]:
    """Add one model's per-session scores ``{eid: {metric: value}}`` (e.g. a streaming NEDS's decodes on
    held-out sessions) and re-assemble means, fractions and checks. Sessions must be in the report."""
    unknown = sorted(set(rows) - set(report["results"]))
    if unknown:
        raise invalid(f"rows of {model}", "name sessions the report did not evaluate", unknown,
                      f"pass scores for {report['results'] and sorted(report['results'])}", kind=DataError)
    results = {e: {m: dict(v) for m, v in per.items()} for e, per in report["results"].items()}
    for eid, vals in rows.items():
        results[eid][model] = dict(vals)
    keep = {k: v for k, v in report.items() if k not in {
        "metrics", "tasks", "models", "model_notes", "sessions_evaluated", "results", "mean", "ceilings",
        "chances", "fraction_of_ceiling", "fraction_of_ceiling_mean", "regions", "checks",
        "streaming_gap"}}
    new = assemble(results, ceilings=report.get("ceilings"), chances=report.get("chances"),
                   regions=report.get("regions"), extra=keep, notes=report.get("model_notes"))
    if note:
        new["model_notes"][model] = note
    return new


# ---- markdown ------------------------------------------------------------------------------------------
_SHORT: Final = {"bits_per_spike": "bits/spike", "wheel_r2": "wheel R2", "whisker_r2": "whisker R2",
                 "choice_accuracy": "choice acc", "choice_balanced_accuracy": "choice bal acc",
                 "block_accuracy": "block acc", "block_balanced_accuracy": "block bal acc"}


def table(rows: Mapping[str, Mapping[str, float | None]], models: Sequence[str]) -> list[str]:
    """A Markdown table: one row per model, one column per metric."""
    lines = ["| model | " + " | ".join(_SHORT[k] for k in METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]
    for m in models:
        if m in rows:
            lines.append(f"| {m} | " + " | ".join(_fmt(rows[m].get(k)) for k in METRICS) + " |")
    return lines


def spread_table(spread: Mapping[str, Mapping[str, Mapping[str, Any]]], models: Sequence[str]) -> list[str]:
    """A Markdown table of the five task metrics: each model's seed mean ± standard deviation."""
    metrics = list(TASKS.values())
    lines = ["| model | " + " | ".join(_SHORT[k] for k in metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for m in models:
        if m not in spread:
            continue
        cells = []
        for k in metrics:
            entry = spread[m].get(k) or {}
            mean, sd = entry.get("mean"), entry.get("sd")
            cells.append(_fmt(mean) + ("" if mean is None or sd is None else f" ± {sd:.3f}"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def seeds_text(entry: Mapping[str, Any] | None) -> str:
    """A check's seeds in words: 'better in k of N seeds (d1, d2, ...)' ('-' when none)."""
    if not entry:
        return "-"
    diffs = ", ".join("-" if d is None else f"{d:+.3f}" for d in entry["differences"])
    return f"better in {entry['better_in']} of {entry['n_seeds']} seeds ({diffs})"


def gap_table(report: Mapping[str, Any]) -> list[str]:
    """The streaming-vs-offline Markdown table (session means); [] when the report has no streaming rows."""
    gap = report.get("streaming_gap")
    if not gap:
        return []
    lines = [f"| metric | streaming ({gap['streaming']}) | offline ({gap['offline']}) | gap (streaming - "
             "offline) |", "|---|---:|---:|---:|"]
    for k, row in gap["mean"].items():
        gap_v = "-" if row["gap"] is None else f"{row['gap']:+.3f}"
        lines.append(f"| {_SHORT[k]} | {_fmt(row['streaming'])} | {_fmt(row['offline'])} | {gap_v} |")
    return lines


def probe_tables(probes: Mapping[str, Mapping[str, Any]], linear: Mapping[str, float | None]) -> list[str]:
    """One session's layer probes (``training.probes``; model -> label -> token -> depth -> score): a table
    per label, a row per model and token, a column per depth; the linear decoder's score in the heading."""
    out: list[str] = []
    for label in ("choice", "block"):
        rows = [(model, token, by_depth) for model, scores in probes.items()
                for token, by_depth in scores.get(label, {}).items()]
        if not rows:
            continue
        depths = list(rows[0][2])
        bar = _fmt(linear.get(f"{label}_balanced_accuracy"))
        out += [f"{label.capitalize()} (the linear decoder: {bar}):", "",
                "| model, token | " + " | ".join(depths) + " |", "|---|" + "---:|" * len(depths)]
        out += [f"| {model}, {token} token | " + " | ".join(_fmt(by_depth.get(d)) for d in depths) + " |"
                for model, token, by_depth in rows]
        out.append("")
    return out


def summary_table(report: Mapping[str, Any]) -> str:
    """The session-mean table (the issue's summary table)."""
    return "\n".join(table(report["mean"], report["models"]))


def markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the mean table, fractions of the ceiling, per-session tables, regions and checks."""
    models = report["models"]
    out = ["# neds-rt quality report", ""]
    cfg = report.get("config")
    if cfg:
        out += [f"Command: `{report.get('command', 'neds-rt bench quality')}`", "",
                f"Pretraining sessions: {len(report.get('pretrain_sessions', []))}; held-out sessions: "
                f"{len(report['sessions_evaluated'])}; preset `{cfg.get('preset')}`; run time "
                f"{_fmt(report.get('timing', {}).get('total_s'), 0)} s.", ""]
    seeds = report.get("seeds")
    if seeds:
        links = ", ".join(f"[{r}]({r})" for r in report.get("seed_reports", []))
        out += [f"Training seeds: {', '.join(map(str, seeds))}. Every score is the mean over the seeds; each "
                f"seed's own report: {links}.", ""]
    out += ["All scores on the TEST trials of the held-out sessions; bits/spike against a null model of each "
            "neuron's mean TEST rate, averaged over neurons; R2 single-trial over all bins.", "",
            "## Mean over held-out sessions", ""]
    out += [*table(report["mean"], models), ""]
    if report.get("seed_spread"):
        out += ["## Spread over training seeds (session means: mean ± standard deviation over seeds)", "",
                *spread_table(report["seed_spread"], models), ""]
    gap = gap_table(report)
    if gap:
        info = report.get("streaming") or {}
        out += ["## Streaming vs offline (mean over held-out sessions)", "",
                "The streaming NEDS decodes causally (each 20 ms bin from itself and the context before it, "
                "as the step runtime does); the offline single-session NEDS sees the whole trial window. "
                "Same TEST trials; gap = streaming - offline.", ""]
        if info.get("rule"):
            out += [f"Scoring: {info['rule']}.", ""]
        if info.get("budget"):
            out += [f"Training budget: {info['budget']}.", ""]
        out += [*gap, ""]
        for eid, det in (info.get("sessions") or {}).items():
            for scheme in ("int8", "int4"):
                q = det.get(scheme)
                if not q:
                    continue
                worst = max(q["max_abs_diff_over_std"])
                r2 = [v for v in q.get("r2_vs_float32") or [] if v is not None]
                out += [f"{scheme} weights (`neds_streaming_{scheme}`), session {eid}: largest decode "
                        f"difference from float32 {worst:.2f} standard deviations of that decode channel "
                        "(per channel: " + ", ".join(f"{v:.2g}" for v in q["max_abs_diff_over_std"]) + ")"
                        + (f"; R2 against the float32 decodes >= {min(r2):.4f}" if r2 else "") + ".", ""]
    if report.get("fraction_of_ceiling_mean"):
        out += ["## Fraction of the oracle ceiling (mean over sessions; 0 = chance, 1 = ceiling)", ""]
        out += [*table(report["fraction_of_ceiling_mean"], models), ""]
    for eid in report["sessions_evaluated"]:
        out += [f"## Session {eid}", "", *table(report["results"][eid], models), ""]
        noise_free = report.get("ceilings", {}).get(eid, {}).get("bits_per_spike_without_noise_latents")
        if noise_free is not None:
            out += [f"Oracle bits/spike with the simulator's private noise latents averaged out (the best a "
                    f"model can do from behaviour alone): {_fmt(noise_free)}.", ""]
        shares = (report.get("latent_variance") or {}).get(eid)
        if shares:
            out += ["Share of the simulated units' log-rate variance that each latent drives (the weaker a "
                    "behaviour's share, the more neurons and bins a decoder must pool): "
                    + ", ".join(f"{name} {100 * v:.1f} %" for name, v in shares.items()) + ".", ""]
        probes = (report.get("probes") or {}).get(eid)
        if probes:
            out += ["Where the NEDS models hold choice and block: the linear decoder's logistic read-out "
                    "(chunk means of a trial, C chosen on VAL) fitted on each token's states as they enter, "
                    "after each block and at the output, decoding mask; TEST balanced accuracy ('-': the "
                    "same state in every trial).", "",
                    *probe_tables(probes, report["results"][eid].get("linear", {}))]
    reg = report.get("regions") or {}
    if reg:
        out += ["## Brain-region classification from neuron embeddings", "", *_region_table(reg), "",
                f"{reg.get('n_neurons', '?')} neurons, {reg.get('n_regions', '?')} regions, "
                f"{reg.get('n_splits', '?')}-fold cross-validated logistic regression; "
                f"features: {reg.get('features', '?')}."
                + (f" Ceiling: {reg['oracle_features']}." if reg.get("oracle_features") else ""), ""]
    per_seed = report.get("check_seeds")
    seeds_note = ("Every seed's predictions are scored on the same resamples and the difference is averaged "
                  "over seeds; the last column gives each seed's own difference." if per_seed else
                  "It does not include the spread between training seeds (`--seeds N` does).")
    out += ["## Done-when checks", "",
            "Interval: the difference (model - baseline) and its 95 % paired-bootstrap interval, resampling "
            "the TEST trials (the neurons, for regions), and the share of resamples in which the model is "
            f"better. {seeds_note}", "",
            "| check | result | numbers | interval |" + (" seeds |" if per_seed else ""),
            "|---|---|---|---|" + ("---|" if per_seed else "")]
    intervals = report.get("check_intervals") or {}
    for c in report["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[c["passed"]]
        cell = interval_text(intervals.get(c["name"]))
        seeds_cell = f" {seeds_text(per_seed.get(c['name']))} |" if per_seed else ""
        out.append(f"| {c['name']} | {verdict} | {c['detail']} | {cell} |{seeds_cell}")
    out += ["", "## Models", ""] + [f"- `{m}`: {report['model_notes'].get(m, '')}" for m in models]
    if report.get("plots"):
        out += ["", "## Plots", ""] + [f"- [{p}]({p})" for p in report["plots"]]
    timing = report.get("timing")
    if timing:
        out += ["", "## Run time (s)", ""] + [f"- {k}: {_fmt(clean(v), 1)}" for k, v in timing.items()]
    return "\n".join(out) + "\n"


def write_report(report: Mapping[str, Any], out: Path | str) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into the folder ``out``; return their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    js, md = folder / "report.json", folder / "report.md"
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False, default=str))
    tmp.replace(js)
    md.write_text(markdown(report))
    return js, md
