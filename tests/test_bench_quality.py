"""bench quality: report assembly on hand-made numbers, input checks, and one tiny end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.quality import QualityConfig, prepare_sessions
from bench.quality_plots import plot_psths, plot_traces
from bench.quality_report import (
    METRICS,
    add_model_rows,
    assemble,
    fraction,
    markdown,
    summary_table,
    write_report,
)
from neds_rt.cli import app
from neds_rt.errors import ConfigError, DataError

A, B = "sess-a", "sess-b"


def _results() -> dict[str, dict[str, dict[str, float | None]]]:
    enc = {"bits_per_spike": 0.10}
    dec = {"wheel_r2": 0.5, "whisker_r2": 0.4, "choice_balanced_accuracy": 0.8,
           "block_balanced_accuracy": 0.6}
    return {
        A: {
            "oracle": {"bits_per_spike": 0.2, "wheel_r2": 0.9, "whisker_r2": 0.8,
                       "choice_balanced_accuracy": 1.0, "block_balanced_accuracy": 0.9},
            "linear": dict(dec), "rrr": dict(enc),
            "neds_single": {"bits_per_spike": 0.12, "wheel_r2": 0.55, "whisker_r2": 0.5,
                            "choice_balanced_accuracy": 0.85, "block_balanced_accuracy": 0.65},
            "neds_multi": {"bits_per_spike": 0.15, "wheel_r2": 0.7, "whisker_r2": 0.6,
                           "choice_balanced_accuracy": 0.9, "block_balanced_accuracy": 0.7},
        },
        B: {
            "linear": {**dec, "wheel_r2": 0.3}, "rrr": {"bits_per_spike": float("nan")},
            "neds_single": {"bits_per_spike": 0.08, "wheel_r2": 0.45, "whisker_r2": 0.3,
                            "choice_balanced_accuracy": 0.75, "block_balanced_accuracy": 0.55},
            "neds_multi": {"bits_per_spike": 0.11, "wheel_r2": 0.2, "whisker_r2": 0.5,
                           "choice_balanced_accuracy": 0.8, "block_balanced_accuracy": 0.6},
        },
    }


REGIONS = {"neds_accuracy": 0.6, "psth_accuracy": 0.5, "chance_majority": 0.3, "chance_uniform": 0.2}


def _report() -> dict:
    ceilings = {A: {"bits_per_spike": 0.2, "wheel_r2": 0.9}}
    chances = {A: {"bits_per_spike": 0.0, "wheel_r2": 0.0}, B: {"bits_per_spike": 0.0}}
    return assemble(_results(), ceilings=ceilings, chances=chances, regions=REGIONS, extra={"note": "x"})


def test_assemble_fills_every_model_metric_session_and_averages() -> None:
    rep = _report()
    assert rep["models"] == ["oracle", "linear", "rrr", "neds_single", "neds_multi"]
    for eid in (A, B):
        assert set(rep["results"][eid]) == set(rep["models"])
        for per in rep["results"][eid].values():
            assert tuple(per) == METRICS
    assert rep["results"][B]["oracle"]["bits_per_spike"] is None  # missing model -> None
    assert rep["results"][B]["rrr"]["bits_per_spike"] is None  # NaN -> None
    assert rep["results"][A]["linear"]["bits_per_spike"] is None  # task the model does not do
    assert rep["mean"]["neds_multi"]["wheel_r2"] == pytest.approx(0.45)
    assert rep["mean"]["linear"]["wheel_r2"] == pytest.approx(0.4)
    assert rep["mean"]["rrr"]["bits_per_spike"] == pytest.approx(0.10)  # mean over sessions that have it
    assert rep["note"] == "x"
    json.dumps(rep, allow_nan=False)  # JSON-ready, no NaN


def test_fraction_of_ceiling() -> None:
    rep = _report()
    fr = rep["fraction_of_ceiling"]
    assert "oracle" not in fr[A]
    assert fr[A]["neds_multi"]["bits_per_spike"] == pytest.approx(0.75)
    assert fr[A]["neds_multi"]["wheel_r2"] == pytest.approx(0.7 / 0.9)
    assert fr[A]["neds_multi"]["whisker_r2"] is None  # no ceiling given
    assert fr[B]["neds_multi"]["bits_per_spike"] is None  # no ceiling for B
    assert fraction(0.5, 0.5, 0.5) is None  # ceiling at chance: undefined
    assert fraction(0.75, 1.0, 0.5) == pytest.approx(0.5)


def test_done_checks_pass_fail_and_missing() -> None:
    checks = {c["name"]: c for c in _report()["checks"]}
    enc = checks["NEDS beats the linear baseline on encoding (bits_per_spike)"]
    assert enc["passed"] is True and "0.130" in enc["detail"] and "rrr 0.100" in enc["detail"]
    assert checks["NEDS beats the linear baseline on wheel (wheel_r2)"]["passed"] is True
    multi_wheel = checks["multi-session NEDS beats single-session NEDS on wheel (wheel_r2)"]
    assert multi_wheel["passed"] is False  # 0.45 vs 0.50
    assert "neds_single 0.500" in multi_wheel["detail"]
    assert checks["region classification from NEDS embeddings beats chance (accuracy)"]["passed"] is True
    bare = assemble({A: {"neds_multi": {"wheel_r2": 0.1}}})
    assert all(c["passed"] is None for c in bare["checks"] if "wheel" not in c["name"])
    assert len(bare["checks"]) == 9


def test_markdown_and_files(tmp_path: Path) -> None:
    rep = _report()
    md = markdown(rep)
    assert "| model | bits/spike | wheel R2" in md
    assert "| neds_multi | 0.130 | 0.450 |" in md
    assert f"## Session {A}" in md and f"## Session {B}" in md
    assert "| FAIL |" in md and "| PASS |" in md
    assert summary_table(rep).splitlines()[0].startswith("| model |")
    js, mdp = write_report(rep, tmp_path / "r")
    assert json.loads(js.read_text())["mean"]["neds_multi"]["bits_per_spike"] == pytest.approx(0.13)
    assert mdp.read_text() == md


def test_add_model_rows_streaming_hook() -> None:
    rep = add_model_rows(_report(), "neds_streaming", {A: {"wheel_r2": 0.6}}, note="streaming")
    assert rep["models"][-1] == "neds_streaming"
    assert rep["results"][A]["neds_streaming"]["wheel_r2"] == 0.6
    assert rep["results"][B]["neds_streaming"]["wheel_r2"] is None
    assert rep["mean"]["neds_streaming"]["wheel_r2"] == pytest.approx(0.6)
    assert rep["model_notes"]["neds_streaming"] == "streaming"
    assert rep["note"] == "x"
    with pytest.raises(DataError, match="sessions the report did not evaluate"):
        add_model_rows(rep, "x", {"unknown": {"wheel_r2": 0.1}})


def test_assemble_needs_sessions() -> None:
    with pytest.raises(DataError, match="at least one held-out session"):
        assemble({})


def test_config_rules() -> None:
    with pytest.raises(ConfigError, match="preset"):
        QualityConfig(preset="huge")
    with pytest.raises(ConfigError, match="n_heldout"):
        QualityConfig(n_heldout=0)
    assert QualityConfig.quick().n_trials == 150


def test_prepare_sessions_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no ONE cache"):
        prepare_sessions(tmp_path / "none", QualityConfig(simulate=False))


def test_plot_shape_errors(tmp_path: Path) -> None:
    true = np.zeros((3, 10))
    with pytest.raises(DataError, match="shape of the truth"):
        plot_traces(true, {"m": np.zeros((3, 9))}, tmp_path / "t.png", target="wheel")
    with pytest.raises(DataError, match="must name rows"):
        plot_traces(true, {}, tmp_path / "t.png", target="wheel", trials=(5,))
    with pytest.raises(DataError, match="must name columns"):
        plot_psths(np.zeros((3, 10, 2)), {}, [7], tmp_path / "p.png")
    assert plot_psths(np.ones((3, 10, 2)), {"m": np.ones((3, 10, 2))}, [0, 1], tmp_path / "p.png").exists()


@pytest.mark.slow
def test_bench_quality_end_to_end(tmp_path: Path) -> None:
    from streams.simulate import simulate_cache

    data = tmp_path / "data"
    simulate_cache(data, n_sessions=3, seed=1, n_trials=40)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["bench", "quality", "--data", str(data), "--out", str(out), "--pretrain",
                                   "2", "--heldout", "1", "--preset", "tiny", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert "| model |" in res.output
    with pytest.raises(DataError, match="must hold n_pretrain"):
        prepare_sessions(data, QualityConfig(n_pretrain=3, n_heldout=1))
    rep = json.loads((out / "report.json").read_text())
    expected = ["oracle", "psth", "linear", "rrr", "neds_encoding", "neds_decoding", "neds_single",
                "neds_multi"]
    assert rep["models"] == expected
    assert len(rep["heldout_sessions"]) == 1 and len(rep["pretrain_sessions"]) == 2
    eid = rep["heldout_sessions"][0]
    assert set(rep["results"]) == {eid}
    for model in expected:
        assert list(rep["results"][eid][model]) == list(METRICS)
        assert list(rep["mean"][model]) == list(METRICS)
    multi = rep["results"][eid]["neds_multi"]
    assert all(isinstance(multi[m], float) and math.isfinite(multi[m]) for m in METRICS)
    assert rep["results"][eid]["neds_encoding"]["wheel_r2"] is None  # encoding-only: no decoding scores
    assert rep["results"][eid]["neds_decoding"]["bits_per_spike"] is None
    assert isinstance(rep["results"][eid]["linear"]["wheel_r2"], float)
    assert isinstance(rep["results"][eid]["oracle"]["bits_per_spike"], float)
    assert rep["regions"]["n_regions"] >= 2 and 0.0 <= rep["regions"]["neds_accuracy"] <= 1.0
    assert len(rep["checks"]) == 9
    for png in ("multi_vs_single.png", "traces_wheel.png", "traces_whisker.png", "psths.png",
                "regions_projection.png", "regions_confusion.png"):
        assert (out / png).stat().st_size > 0
        assert png in rep["plots"]
    md = (out / "report.md").read_text()
    assert "| model | bits/spike |" in md and "| neds_multi |" in md and "## Done-when checks" in md
