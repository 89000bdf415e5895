"""``bench quality --seeds N``: seed means, spreads, per-seed check differences and intervals over seeds."""

from __future__ import annotations

import copy
import json
import logging
import statistics
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.quality_bootstrap import region_intervals, trial_intervals
from bench.quality_report import (
    MODEL_NOTES,
    REGION_CHECKS,
    add_model_rows,
    assemble,
    markdown,
    seeds_text,
    trial_comparisons,
)
from bench.quality_seeds import SeedRun, combine, mean_regions, mean_results, seed_spread
from neds_rt.cli import app
from neds_rt.errors import DataError
from tests.test_quality_bootstrap import _held

A, B = "sess-a", "sess-b"
REGIONS = {"neds_accuracy": 0.6, "psth_accuracy": 0.5, "chance_majority": 0.3, "chance_uniform": 0.2,
           "n_neurons": 100, "classes": ["CA1", "DG"], "confusion": [[1, 0], [0, 1]]}


def _rows(shift: float) -> dict[str, dict[str, dict[str, float | None]]]:
    """Two sessions; NEDS multi moves by ``shift`` with the seed, the baselines stay."""
    linear = {"wheel_r2": 0.5, "whisker_r2": 0.4, "choice_balanced_accuracy": 0.8,
              "block_balanced_accuracy": 0.6}
    multi = {"bits_per_spike": 0.02 + shift, "wheel_r2": 0.6 + shift, "whisker_r2": 0.4 + shift,
             "choice_balanced_accuracy": 0.8 + shift, "block_balanced_accuracy": 0.7}
    single = {"bits_per_spike": 0.02, "wheel_r2": 0.55, "whisker_r2": 0.4, "choice_balanced_accuracy": 0.8,
              "block_balanced_accuracy": None}
    return {e: {"linear": dict(linear), "rrr": {"bits_per_spike": 0.02}, "neds_multi": dict(multi),
                "neds_single": dict(single)} for e in (A, B)}


def _run(seed: int, shift: float, neds_accuracy: float) -> SeedRun:
    report = assemble(_rows(shift), regions={**REGIONS, "neds_accuracy": neds_accuracy},
                      extra={"data": "/d", "heldout_sessions": [A, B],
                             "latent_variance": {A: {"choice": 0.003}}})
    report["model_notes"]["neds_streaming"] = "causal"  # a note added after assemble (streaming rows)
    return SeedRun(seed, report, {}, {})


def test_mean_results_average_each_value_and_keep_missing_ones_missing() -> None:
    rows = [_rows(-0.01), _rows(0.03)]
    rows[1][A]["linear"]["wheel_r2"] = None
    out = mean_results(rows)
    assert out[B]["neds_multi"]["wheel_r2"] == pytest.approx(0.61)
    assert out[A]["neds_multi"]["bits_per_spike"] == pytest.approx(0.03)
    assert out[A]["linear"]["wheel_r2"] is None  # one seed lacks it: no mean of the others
    assert out[A]["neds_single"]["block_balanced_accuracy"] is None
    other = _rows(0.0)
    del other[B]["rrr"]
    with pytest.raises(DataError, match="sessions and models of the first run"):
        mean_results([_rows(0.0), other])


def test_seed_spread_and_region_means() -> None:
    means = [{"neds_multi": {"wheel_r2": 0.6, "choice_balanced_accuracy": None}},
             {"neds_multi": {"wheel_r2": 0.7, "choice_balanced_accuracy": 0.8}},
             {"neds_multi": {"wheel_r2": 0.8, "choice_balanced_accuracy": 0.9}}]
    spread = seed_spread(means)["neds_multi"]
    assert spread["wheel_r2"]["values"] == [0.6, 0.7, 0.8]
    assert spread["wheel_r2"]["sd"] == pytest.approx(statistics.stdev([0.6, 0.7, 0.8]))
    assert spread["wheel_r2"]["min"] == 0.6 and spread["wheel_r2"]["max"] == 0.8
    assert spread["wheel_r2"]["mean"] == pytest.approx(0.7)
    assert spread["choice_balanced_accuracy"]["sd"] is None  # a seed without it
    assert spread["choice_balanced_accuracy"]["mean"] is None
    regions = mean_regions([{**REGIONS, "neds_accuracy": 0.5}, {**REGIONS, "neds_accuracy": 0.7}])
    assert regions["neds_accuracy"] == pytest.approx(0.6) and regions["psth_accuracy"] == pytest.approx(0.5)
    assert regions["per_seed"]["neds_accuracy"] == [0.5, 0.7]
    assert regions["n_neurons"] == 100 and regions["classes"] == ["CA1", "DG"]  # not averaged
    assert mean_regions([REGIONS, {"skipped": "one region"}]) == {"skipped": "one region"}


def test_combine_judges_the_checks_on_the_seed_means_and_counts_the_seeds() -> None:
    runs = [_run(0, -0.02, 0.25), _run(1, 0.01, 0.5), _run(2, 0.04, 0.45)]
    report = combine(runs, {"command": "neds-rt bench quality --seeds 3", "timing": {}})
    assert report["seeds"] == [0, 1, 2]
    assert report["seed_reports"] == ["seed_0/report.md", "seed_1/report.md", "seed_2/report.md"]
    assert report["mean"]["neds_multi"]["wheel_r2"] == pytest.approx(0.61)
    assert report["data"] == "/d" and report["heldout_sessions"] == [A, B]
    assert report["latent_variance"] == {A: {"choice": 0.003}}  # data, not training: the same in every seed
    assert report["model_notes"]["neds_multi"] and "neds_streaming" not in report["models"]
    checks = {c["name"]: c for c in report["checks"]}
    per_seed = report["check_seeds"]
    choice = "NEDS beats the linear baseline on choice (choice_balanced_accuracy)"
    assert checks[choice]["passed"] is True and checks[choice]["difference"] == pytest.approx(0.01)
    assert per_seed[choice]["differences"] == pytest.approx([-0.02, 0.01, 0.04])
    assert per_seed[choice]["better_in"] == 2 and per_seed[choice]["n_seeds"] == 3
    enc = "multi-session NEDS beats single-session NEDS on encoding (bits_per_spike)"
    assert per_seed[enc]["better_in"] == 2  # -0.02, +0.01, +0.04 again
    chance = REGION_CHECKS[0]
    assert checks[chance]["passed"] is True  # mean 0.4 vs 0.3, though seed 0 is below chance
    assert per_seed[chance]["differences"] == pytest.approx([-0.05, 0.2, 0.15])
    assert report["seed_spread"]["neds_multi"]["wheel_r2"]["sd"] == pytest.approx(0.03)
    assert seeds_text(per_seed[choice]) == "better in 2 of 3 seeds (-0.020, +0.010, +0.040)"
    md = markdown(report)
    assert "Training seeds: 0, 1, 2." in md and "[seed_1/report.md](seed_1/report.md)" in md
    assert "## Spread over training seeds" in md and "| neds_multi | 0.030 ± 0.030 | 0.610 ± 0.030 |" in md
    assert "| check | result | numbers | interval | seeds |" in md
    assert "better in 2 of 3 seeds (-0.020, +0.010, +0.040) |" in md
    with pytest.raises(DataError, match="at least 2"):
        combine(runs[:1], {})


def test_a_single_run_report_says_the_seeds_are_not_in_its_intervals() -> None:
    md = markdown(_run(0, 0.0, 0.5).report)
    assert "`--seeds N` does" in md and "| seeds |" not in md and "Training seeds" not in md


def test_trial_intervals_over_seeds_average_each_seeds_difference_on_the_same_draws() -> None:
    one = {"a": _held(1), "b": _held(2)}
    comparisons = trial_comparisons()
    alone = trial_intervals(one, comparisons, n_boot=200, seed=3)
    assert trial_intervals([one, one], comparisons, n_boot=200, seed=3) == alone  # two equal seeds: same
    other = copy.deepcopy(one)
    for held in other.values():  # a second seed whose multi-session model is the linear decoder
        held.wheel["neds_multi"] = held.wheel["linear"]
        held.choice["neds_multi"] = held.choice["linear"]
    both = trial_intervals([one, other], comparisons, n_boot=200, seed=3)
    wheel, choice = comparisons[1][0], comparisons[3][0]
    assert both[wheel]["difference"] == pytest.approx(alone[wheel]["difference"] / 2)
    assert both[choice]["difference"] == pytest.approx(0.5) and both[choice]["interval"] == [0.5, 0.5]
    lo, hi = both[wheel]["interval"]
    assert lo == pytest.approx(alone[wheel]["interval"][0] / 2) and hi == pytest.approx(
        alone[wheel]["interval"][1] / 2)  # the second seed adds 0 on every draw: the same draws, halved
    del other["b"].wheel["neds_multi"]
    assert wheel not in trial_intervals([one, other], comparisons, n_boot=20)  # a seed without predictions
    shifted = copy.deepcopy(one)
    shifted["a"].test = shifted["a"].test[1:]
    with pytest.raises(DataError, match="sessions and TEST trials"):
        trial_intervals([one, shifted], comparisons, n_boot=20)


def test_region_intervals_over_seeds() -> None:
    neds = np.array([True] * 60 + [False] * 40)
    psth = np.array([True] * 30 + [False] * 70)
    alone = region_intervals(neds, psth, 0.25, REGION_CHECKS, n_boot=300)
    same = region_intervals(np.stack([neds, neds]), np.stack([psth, psth]), 0.25, REGION_CHECKS, n_boot=300)
    for name, iv in alone.items():  # two equal seeds: the same intervals (to rounding)
        assert same[name]["interval"] == pytest.approx(iv["interval"])
        assert same[name]["difference"] == pytest.approx(iv["difference"])
        assert same[name]["share_better"] == iv["share_better"]
    worse = np.array([True] * 40 + [False] * 60)
    two = region_intervals(np.stack([neds, worse]), np.stack([psth, psth]), 0.25, REGION_CHECKS, n_boot=300)
    assert two[REGION_CHECKS[0]]["difference"] == pytest.approx(0.25)  # (0.6 + 0.4) / 2 - 0.25
    assert two[REGION_CHECKS[1]]["difference"] == pytest.approx(0.2)
    with pytest.raises(DataError, match="NEDS hits' shape"):
        region_intervals(np.stack([neds, worse]), psth, 0.25, REGION_CHECKS)


@pytest.mark.slow
def test_bench_quality_two_seeds_end_to_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from streams.simulate import simulate_cache

    data, out = tmp_path / "data", tmp_path / "out"
    simulate_cache(data, n_sessions=4, seed=1, n_trials=40)
    # two held-out sessions; --jobs 2: both seeds' runs trained first, in one pool of two workers, then each
    # seed's comparison
    with caplog.at_level(logging.INFO, logger="bench.quality_jobs"):
        res = CliRunner().invoke(app, ["bench", "quality", "--data", str(data), "--out", str(out),
                                       "--pretrain", "2", "--heldout", "2", "--preset", "tiny", "--epochs",
                                       "1", "--no-streaming", "--seed", "4", "--seeds", "2", "--jobs", "2"])
    assert res.exit_code == 0, res.output
    pools = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training ")]
    assert pools == ["training 18 runs, 2 at once"]  # (pretraining + 2 x 4 held-out runs) x 2 seeds, one pool
    assert "of 2 seeds (" in res.output  # each check printed with its per-seed differences
    rep = json.loads((out / "report.json").read_text())
    subs = [json.loads((out / f"seed_{s}" / "report.json").read_text()) for s in (4, 5)]
    assert rep["seeds"] == [4, 5] and [s["config"]["seed"] for s in subs] == [4, 5]
    for sub in subs:  # each seed trained its own models, ahead of its comparison
        assert (out / f"seed_{sub['config']['seed']}" / "models" / "pretrain" / "best.pt").exists()
        assert {"trained_ahead_pretrain_s", "trained_ahead_wall_s"} <= set(sub["timing"])
    eids = rep["heldout_sessions"]
    assert len(eids) == 2
    for eid in eids:
        for model, metrics in rep["results"][eid].items():
            for metric, value in metrics.items():
                values = [s["results"][eid][model][metric] for s in subs]
                assert value == (None if None in values else pytest.approx(sum(values) / 2)), (model, metric)
    for sub in subs:  # a seed's summary row is the mean over its two held-out sessions
        wheel = [sub["results"][e]["neds_multi"]["wheel_r2"] for e in eids]
        assert sub["mean"]["neds_multi"]["wheel_r2"] == pytest.approx(sum(wheel) / 2)
    eid = eids[0]
    assert rep["results"][eid]["linear"] == subs[0]["results"][eid]["linear"] == subs[1]["results"][eid][
        "linear"]  # the baselines do not depend on the training seed
    for check in rep["checks"]:
        per = rep["check_seeds"][check["name"]]
        assert per["differences"] == [next(c["difference"] for c in s["checks"] if c["name"] == check["name"])
                                      for s in subs]
        iv = rep["check_intervals"].get(check["name"])
        if iv is not None and check["difference"] is not None:  # intervals start from the seed means
            assert iv["difference"] == pytest.approx(check["difference"], rel=1e-6, abs=1e-9)
    assert rep["regions"]["per_seed"]["neds_accuracy"] == [s["regions"]["neds_accuracy"] for s in subs]
    assert (out / "multi_vs_single.png").stat().st_size > 0
    for plot in rep["plots"][1:]:
        assert plot.startswith("seed_4/") and (out / plot).stat().st_size > 0
    assert "| seeds |" in (out / "report.md").read_text()


def test_combine_keeps_the_notes_of_rows_added_after_assemble() -> None:
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        run = _run(seed, shift, 0.5)
        rows = {e: {"wheel_r2": 0.5 + shift} for e in (A, B)}
        run.report = add_model_rows(run.report, "neds_streaming", rows, note="causal decodes")
        runs.append(run)
    report = combine(runs, {})
    assert report["model_notes"]["neds_streaming"] == "causal decodes"
    assert report["model_notes"]["neds_multi"] == MODEL_NOTES["neds_multi"]  # known models keep their own
    assert report["mean"]["neds_streaming"]["wheel_r2"] == pytest.approx(0.51)
