"""bench quality: report assembly on hand-made numbers, input checks, and one tiny end-to-end run."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.quality import QualityConfig, add_streaming_rows, embedding_parts, neds_metrics, prepare_sessions
from bench.quality_plots import plot_psths, plot_traces
from bench.quality_report import (
    GAP_METRICS,
    METRICS,
    MODEL_NOTES,
    REGION_CHECKS,
    add_model_rows,
    assemble,
    fraction,
    gap_table,
    markdown,
    model_notes,
    summary_table,
    trial_comparisons,
    write_report,
)
from neds_rt.cli import app
from neds_rt.errors import ConfigError, DataError
from streams.ground_truth import GROUND_TRUTH_DIR
from streams.sim_neurons import LATENT_NAMES
from training.arrays import TEST, TRAIN, VAL, ContinuousArrays, Normalisation, TrialArrays
from training.config import TrainConfig

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


def test_model_notes_name_a_frozen_start_of_the_fine_tuning() -> None:
    assert _report()["model_notes"]["neds_multi"] == MODEL_NOTES["neds_multi"]  # no config: as shipped
    for frozen in (0, None):
        notes = model_notes(["neds_multi"], {"frozen_epochs": frozen})
        assert notes == {"neds_multi": MODEL_NOTES["neds_multi"]}
    rep = assemble(_results(), extra={"config": {"frozen_epochs": 20}})
    assert rep["model_notes"]["neds_multi"].startswith(MODEL_NOTES["neds_multi"])
    assert rep["model_notes"]["neds_multi"].endswith("for the first 20 epochs (--frozen-epochs 20)")
    assert rep["model_notes"]["neds_single"] == MODEL_NOTES["neds_single"]  # only the fine-tuned row
    rep = add_model_rows(rep, "neds_streaming", {}, note="s")  # a row added later keeps the config's note
    assert rep["model_notes"]["neds_multi"].endswith("(--frozen-epochs 20)")
    assert model_notes(["neds_x"], None, {"neds_x": "kept"}) == {"neds_x": "kept"}  # a report's own row


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
    assert multi_wheel["difference"] == pytest.approx(-0.05) and enc["difference"] == pytest.approx(0.03)
    assert checks["region classification from NEDS embeddings beats chance (accuracy)"]["passed"] is True
    bare = assemble({A: {"neds_multi": {"wheel_r2": 0.1}}})
    assert all(c["passed"] is None and c["difference"] is None for c in bare["checks"]
               if "wheel" not in c["name"])
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
    assert "| NEDS embeddings (the check) | 0.600 |" in md and "| PSTH baseline | 0.500 |" in md
    assert "ceiling" not in md.split("## Brain-region")[1].split("##")[0]  # no ceiling was run
    assert "log-rate variance" not in md  # no simulated latents: no shares
    rep["latent_variance"] = {A: {"choice": 0.0029, "whisking": 0.146}}
    session_a = markdown(rep).split(f"## Session {A}")[1].split("## Session")[0]
    assert "log-rate variance that each latent drives" in session_a
    assert "choice 0.3 %, whisking 14.6 %" in session_a
    assert "log-rate variance" not in markdown(rep).split(f"## Session {B}")[1].split("##")[0]
    assert "hold choice and block" not in md  # no probes were run
    depths = ("input", "block 1", "output")
    choice = {"spike": dict(zip(depths, (0.81, 0.7, 0.62), strict=True)),
              "choice": dict(zip(depths, (None, 0.66, 0.64), strict=True))}
    block = {"spike": dict.fromkeys(depths), "block": dict.fromkeys(depths)}
    rep["probes"] = {A: {"neds_multi": {"choice": choice, "block": block}}}
    session_a = markdown(rep).split(f"## Session {A}")[1].split("## Session")[0]
    assert "Choice (the linear decoder: 0.800):" in session_a  # session A's linear choice
    assert "| model, token | input | block 1 | output |" in session_a
    assert "| neds_multi, spike token | 0.810 | 0.700 | 0.620 |" in session_a
    assert "| neds_multi, choice token | - | 0.660 | 0.640 |" in session_a  # hidden before the first block
    assert "| neds_multi, block token | - | - | - |" in session_a  # one block on TRAIN: nothing scored
    assert "hold choice and block" not in markdown(rep).split(f"## Session {B}")[1]


def test_region_table_gives_the_ceiling_and_fractions_when_it_was_run() -> None:
    reg = {**REGIONS, "head_accuracy": 0.55, "head_balanced_accuracy": 0.5, "oracle_accuracy": 0.8,
           "oracle_balanced_accuracy": 0.75, "neds_fraction_of_ceiling": 0.6, "psth_fraction_of_ceiling": 0.4,
           "head_fraction_of_ceiling": 0.5, "oracle_features": "true loadings"}
    rep = assemble(_results(), regions=reg)
    section = markdown(rep).split("## Brain-region")[1].split("## ")[0]
    assert "| features | accuracy | balanced accuracy | fraction of ceiling |" in section
    assert "| NEDS embeddings (the check) | 0.600 | - | 0.600 |" in section
    assert "| NEDS spike-head rows only | 0.550 | 0.500 | 0.500 |" in section
    assert "| ceiling: true tuning | 0.800 | 0.750 | 1 |" in section
    assert "| chance | 0.300 (majority) | 0.200 (uniform) | 0 |" in section
    assert "stitching columns" not in section  # not scored, so no row
    assert "Ceiling: true loadings." in section


def test_add_model_rows_streaming_hook() -> None:
    rep = add_model_rows(_report(), "neds_streaming", {A: {"wheel_r2": 0.6}}, note="streaming")
    assert rep["models"][-1] == "neds_streaming"
    assert rep["results"][A]["neds_streaming"]["wheel_r2"] == 0.6
    assert rep["results"][B]["neds_streaming"]["wheel_r2"] is None
    assert rep["mean"]["neds_streaming"]["wheel_r2"] == pytest.approx(0.6)
    assert rep["model_notes"]["neds_streaming"] == "streaming"
    assert rep["note"] == "x"
    rep = add_model_rows(rep, "neds_streaming_int8", {A: {"wheel_r2": 0.59}}, note="int8")
    assert rep["model_notes"]["neds_streaming"] == "streaming"  # an earlier row keeps its note
    assert rep["model_notes"]["neds_streaming_int8"] == "int8"
    assert rep["model_notes"]["neds_multi"] == MODEL_NOTES["neds_multi"]
    with pytest.raises(DataError, match="sessions the report did not evaluate"):
        add_model_rows(rep, "x", {"unknown": {"wheel_r2": 0.1}})


def test_streaming_rows_give_the_gap_to_offline_in_json_and_markdown(tmp_path: Path) -> None:
    stream = {A: {"wheel_r2": 0.45, "whisker_r2": 0.5, "choice_accuracy": 0.7,
                  "choice_balanced_accuracy": 0.8, "block_balanced_accuracy": 0.6},
              B: {"wheel_r2": 0.25, "whisker_r2": 0.1, "choice_balanced_accuracy": 0.7,
                  "block_balanced_accuracy": 0.5}}
    assert "streaming_gap" not in _report() and gap_table(_report()) == []
    info = {"rule": "mean probability over the window"}
    rep = add_streaming_rows(_report(), stream, out=tmp_path, info=info)
    gap = json.loads((tmp_path / "report.json").read_text())["streaming_gap"]
    assert gap["offline"] == "neds_single" and list(gap["mean"]) == list(GAP_METRICS)
    wheel = gap["mean"]["wheel_r2"]  # streaming mean 0.35, neds_single mean 0.50
    assert wheel["streaming"] == pytest.approx(0.35) and wheel["offline"] == pytest.approx(0.5)
    assert wheel["gap"] == pytest.approx(-0.15)
    assert gap["sessions"][B]["whisker_r2"]["gap"] == pytest.approx(0.1 - 0.3)
    assert gap["mean"]["choice_accuracy"]["offline"] is None and gap["mean"]["choice_accuracy"]["gap"] is None
    assert rep["streaming"]["rule"] == "mean probability over the window" and rep["note"] == "x"
    md = (tmp_path / "report.md").read_text()
    assert "## Streaming vs offline" in md and "mean probability over the window" in md
    assert "| wheel R2 | 0.350 | 0.500 | -0.150 |" in md and "| choice acc | 0.700 | - | - |" in md
    assert "| neds_streaming | - | 0.350 |" in md  # also a row of the main tables


def _stream_session(n_units: int = 8) -> tuple[TrialArrays, ContinuousArrays]:
    """A continuous grid (t0 = 5 s) and six 100-bin trial windows cut from it, 0.2 bin off the grid; trials
    1, 3 and 5 are TEST. The normalisation is the tiny test model's."""
    rng = np.random.default_rng(0)
    n_total, t0, bin_size = 1400, 5.0, 0.02
    norm = Normalisation(0.0, 3.0, 1.0, 5.0)
    ids, regions = np.arange(100, 100 + n_units), np.array(["CA1"] * n_units)
    cont = ContinuousArrays(
        eid="tiny-eid", probe="probe00", unit_ids=ids, regions=regions, t0=t0,
        spikes=rng.poisson(0.4, (n_total, n_units)).astype(np.uint16),
        wheel=rng.random(n_total).astype(np.float32), whisker=rng.random(n_total).astype(np.float32),
        choice=np.full(n_total, -1), block=np.full(n_total, -1), split=np.zeros(n_total, dtype=np.int8),
        norm=norm)
    starts = np.array([150, 350, 550, 750, 950, 1150])  # trial 0 has less than the full lead before it
    idx = starts[:, None] + np.arange(100)[None, :]  # (K, T) grid bins of each trial window
    arr = TrialArrays(
        eid="tiny-eid", probe="probe00", unit_ids=ids, regions=regions, spikes=cont.spikes[idx],
        wheel=cont.wheel[idx], whisker=cont.whisker[idx], choice=np.array([0, 1, 0, 0, 1, 1]),
        block=np.array([0, 1, 2, 1, 0, 2]), trial_index=np.arange(6),
        window_start=t0 + starts * bin_size + 0.004,
        split=np.array([TRAIN, TEST, TRAIN, TEST, VAL, TEST], dtype=np.int8), norm=norm)
    return arr, cont


def test_streaming_decodes_equal_a_causal_run_over_the_whole_session() -> None:
    import torch

    from bench.quality_streaming import causal_decodes, trial_start_bins
    from tests._models import tiny_streaming_model
    from training.streaming import banded_recompute

    model = tiny_streaming_model(n_units=8)
    arr, cont = _stream_session()
    rows = arr.subset(TEST)
    starts, offset = trial_start_bins(arr, cont, rows)
    np.testing.assert_array_equal(starts, [350, 750, 1150])
    assert offset == pytest.approx(0.004)
    with torch.no_grad():  # the reference: the whole grid at once, context = the model's 100 bins
        grid = torch.from_numpy(cont.spikes.astype(np.float32))[None]  # (1, T_total, N)
        full, _ = banded_recompute(model, "tiny-eid", grid, 100)
    dec, padded = causal_decodes(model, "tiny-eid", cont.spikes, np.array([150, *starts]), 100)
    assert padded == 0 and dec.shape == (4, 100, 6)
    for k, s in enumerate([150, *starts]):
        np.testing.assert_allclose(dec[k], full[0, s:s + 100].numpy(), atol=1e-4)


# int4 on this tiny random model (hidden 32, decodes nearly flat) is far rougher than on a trained
# default-size model (measured there: R2 against float32 >= 0.993 on every channel); here it measured 1.12
# std and R2 0.54
@pytest.mark.parametrize(("scheme", "max_dev_std", "min_r2"), [("int8", 1.0, 0.99), ("int4", 1.5, 0.4)])
def test_engine_decodes_equal_the_torch_causal_decodes_and_quantized_is_scored(
        tmp_path: Path, scheme: str, max_dev_std: float, min_r2: float) -> None:
    from bench.quality_streaming import (
        causal_decodes,
        engine_decodes,
        receptive_bins,
        score_quantized,
        score_streaming,
        trial_start_bins,
    )
    from tests._models import tiny_streaming_model
    from training.export import export_model

    model = tiny_streaming_model(n_units=8)
    arr, cont = _stream_session()
    test = arr.subset(TEST)
    starts = np.array([150, *trial_start_bins(arr, cont, test)[0]])
    ref, _ = causal_decodes(model, "tiny-eid", cont.spikes, starts, 100)
    export_model(model, "tiny-eid", tmp_path / "f32.onnx", graph="step", context=100)
    got = engine_decodes(tmp_path / "f32.onnx", cont.spikes, starts, 100, receptive_bins(model, 100))
    np.testing.assert_allclose(got, ref, atol=1e-4)  # the step engine, reset and led in, = the torch run
    scores, extra = score_streaming(model, arr, cont, test)
    q_scores, q = score_quantized(model, arr, cont, test, extra["decodes"], tmp_path / "q.onnx", scheme)
    assert (tmp_path / "q.onnx").exists() and set(q_scores) == set(scores)
    assert len(q["max_abs_diff_vs_float32"]) == 6 and 0 < max(q["max_abs_diff_vs_float32"])
    assert max(q["max_abs_diff_over_std"]) < max_dev_std  # stays within the spread of the decodes
    for ch in range(6):  # the quantized decodes explain the float32 decodes of every channel
        fp32, quant = extra["decodes"][..., ch].ravel(), q["decodes"][..., ch].ravel()
        r2 = 1 - ((quant - fp32) ** 2).sum() / ((fp32 - fp32.mean()) ** 2).sum()
        assert r2 > min_r2 and r2 == pytest.approx(q["r2_vs_float32"][ch])


def test_streaming_scores_are_causal_and_on_exactly_the_test_trials() -> None:
    from bench.quality_streaming import score_streaming, streaming_predictions
    from tests._models import tiny_streaming_model

    model = tiny_streaming_model(n_units=8)
    arr, cont = _stream_session()
    test = arr.subset(TEST)
    scores, extra = score_streaming(model, arr, cont, test)
    dec = extra["decodes"]
    assert dec.shape == (3, 100, 6)  # the three TEST trials, nothing else
    assert scores == neds_metrics(streaming_predictions(dec, arr), arr, test, ("decoding",))
    assert set(scores) == set(GAP_METRICS) and all(math.isfinite(v) for v in scores.values() if v is not None)
    # non-TEST trials' targets and labels do not enter the scores; a TEST trial's do
    other = replace(arr, wheel=arr.wheel.copy(), choice=1 - arr.choice)
    other.wheel[arr.split != TEST] += 5.0
    other.choice[test] = arr.choice[test]
    assert score_streaming(model, other, cont, test)[0] == scores
    flipped = replace(arr, choice=1 - arr.choice)
    assert score_streaming(model, flipped, cont, test)[0]["choice_accuracy"] == pytest.approx(
        1.0 - scores["choice_accuracy"])
    # causal: spikes after the first TEST trial's window change later trials' decodes, never its own
    end = 350 + 100
    later = replace(cont, spikes=cont.spikes.copy())
    later.spikes[end:] += 3
    alone = score_streaming(model, arr, cont, test[:1])[0]
    assert score_streaming(model, arr, later, test[:1])[0] == pytest.approx(alone, abs=1e-9)
    moved = score_streaming(model, arr, later, test)[1]["decodes"]
    np.testing.assert_allclose(moved[0], dec[0], atol=1e-5)  # float rounding of a differently filled batch
    assert not np.allclose(moved[1], dec[1], atol=1e-3)
    inside = replace(cont, spikes=cont.spikes.copy())
    inside.spikes[end - 1] += 3  # the window's last bin: only that bin's decode can change
    changed = score_streaming(model, arr, inside, test[:1])[1]["decodes"][0]
    np.testing.assert_allclose(changed[:-1], dec[0, :-1], atol=1e-5)
    assert not np.allclose(changed[-1], dec[0, -1], atol=1e-3)


def _cli_configs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                 *option_sets: list[str]) -> list[QualityConfig]:
    """The QualityConfig that ``neds-rt bench quality`` builds from each set of options (nothing is run)."""
    import bench.quality as quality

    seen: list[QualityConfig] = []

    def fake(data: Path, out: Path, cfg: QualityConfig, command: str = "") -> dict:
        seen.append(cfg)
        return {**_report(), "timing": {"total_s": 1.0}}

    monkeypatch.setattr(quality, "run_quality", fake)
    for extra in option_sets:
        res = CliRunner().invoke(app, ["bench", "quality", "--data", str(tmp_path), "--out", str(tmp_path),
                                       *extra])
        assert res.exit_code == 0, res.output
    return seen


def test_cli_streaming_is_on_by_default_and_can_be_skipped(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    seen = _cli_configs(monkeypatch, tmp_path, [], ["--quick"], ["--no-streaming"],
                        ["--quick", "--no-streaming"])
    assert [c.streaming for c in seen] == [True, True, False, False]
    assert seen[1].preset == "tiny" and seen[3].preset == "tiny"


def test_frozen_epochs_reach_the_multi_session_fine_tuning_alone(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    import bench.quality as quality

    seen = _cli_configs(monkeypatch, tmp_path, ["--quick"], ["--quick", "--frozen-epochs", "5"])
    assert [c.frozen_epochs for c in seen] == [0, 5]
    runs: list[tuple[TrainConfig, Path | None]] = []

    def record(arrays: Any, out: Path, model_cfg: Any, tcfg: TrainConfig, *,
               finetune_from: Path | None = None, resume: bool = False) -> None:
        runs.append((tcfg, finetune_from))

    monkeypatch.setattr(quality, "train_or_reuse", record)
    cfg, one_session = QualityConfig.quick(frozen_epochs=3), {"eid": None}  # the arrays are not looked at
    quality._train_neds(one_session, tmp_path / "multi", cfg, 6, finetune_from=tmp_path / "pre.pt")
    quality._train_neds(one_session, tmp_path / "single", cfg, 6)
    assert [(t.frozen_epochs, f) for t, f in runs] == [(3, tmp_path / "pre.pt"), (0, None)]  # scratch: none
    with pytest.raises(ConfigError, match=r"QualityConfig\.frozen_epochs: must be an integer >= 0"):
        QualityConfig(frozen_epochs=-1)


def test_embedding_parts_are_each_neurons_stitch_column_and_spike_head_row() -> None:
    from tests._models import tiny_streaming_model

    model = tiny_streaming_model(n_units=7)
    mods = model.session("tiny-eid")
    parts = embedding_parts(model, "tiny-eid")
    assert list(parts) == ["stitch", "head"]
    hidden = model.cfg.hidden
    assert parts["stitch"].shape == parts["head"].shape == (7, hidden)
    np.testing.assert_array_equal(parts["stitch"][3], mods.stitch.weight.detach().numpy()[:, 3])
    np.testing.assert_array_equal(parts["head"][3], mods.spikes_out.weight.detach().numpy()[3])


def test_assemble_needs_sessions() -> None:
    with pytest.raises(DataError, match="at least one held-out session"):
        assemble({})


def test_config_rules() -> None:
    with pytest.raises(ConfigError, match="preset"):
        QualityConfig(preset="huge")
    with pytest.raises(ConfigError, match="n_heldout"):
        QualityConfig(n_heldout=0)
    with pytest.raises(ConfigError, match="checkpoint_minutes: must be a finite number >= 0"):
        QualityConfig(checkpoint_minutes=float("nan"))
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
    assert "| model |" in res.output and "streaming vs offline" in res.output
    assert "PASS region classification from NEDS embeddings beats chance (accuracy): " in res.output or \
        "FAIL region classification from NEDS embeddings beats chance (accuracy): " in res.output
    assert "better in" in res.output  # the checks' intervals are printed with them
    with pytest.raises(DataError, match="must hold n_pretrain"):
        prepare_sessions(data, QualityConfig(n_pretrain=3, n_heldout=1))
    rep = json.loads((out / "report.json").read_text())
    expected = ["oracle", "psth", "linear", "rrr", "neds_encoding", "neds_decoding", "neds_single",
                "neds_multi", "neds_streaming", "neds_streaming_int8", "neds_streaming_int4"]
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
    for name in ("neds_streaming", "neds_streaming_int8", "neds_streaming_int4"):  # causal, decoding only
        stream = rep["results"][eid][name]
        assert stream["bits_per_spike"] is None
        assert all(isinstance(stream[m], float) and math.isfinite(stream[m]) for m in GAP_METRICS)
    gap = rep["streaming_gap"]
    assert gap["offline"] == "neds_single"
    for m in GAP_METRICS:
        row = gap["mean"][m]
        assert all(isinstance(row[k], float) and math.isfinite(row[k])
                   for k in ("streaming", "offline", "gap"))
        assert row["gap"] == pytest.approx(row["streaming"] - row["offline"])
    info = rep["streaming"]["sessions"][eid]
    assert info["test_trials"] == rep["n_trials"][eid]["test"] == info["excluded_test_trials"]
    assert info["train_windows"] > 0 and info["steps"] >= 1 and 0 <= info["grid_offset_max_s"] <= 0.01
    assert (out / "models" / eid / "neds_streaming" / "best.pt").exists()
    for scheme in ("int8", "int4"):
        assert (out / "models" / eid / f"neds_streaming_{scheme}.onnx").exists()
        assert len(info[scheme]["max_abs_diff_vs_float32"]) == len(info[scheme]["r2_vs_float32"]) == 6
    assert isinstance(rep["results"][eid]["oracle"]["bits_per_spike"], float)
    shares = rep["latent_variance"][eid]  # simulated: what each latent drives of the units' log-rates
    assert list(shares) == list(LATENT_NAMES) and all(0.0 <= v < 1.0 for v in shares.values())
    assert shares["choice"] > 0.0  # (block_prior is 0 here: 40 trials all fall in the first, unbiased block)
    reg = rep["regions"]
    assert reg["n_regions"] >= 2 and 0.0 <= reg["neds_accuracy"] <= 1.0
    for name in ("stitch", "head", "oracle"):  # simulated data: the true loadings give the ceiling
        assert 0.0 <= reg[f"{name}_accuracy"] <= 1.0
    assert reg["oracle_accuracy"] > reg["chance_majority"]
    assert len(rep["checks"]) == 9
    intervals = rep["check_intervals"]
    for name, model, base, metric in trial_comparisons():  # resampled metrics start from the report's own
        a, b = rep["mean"][model][metric], rep["mean"][base][metric]
        if a is None or b is None:  # e.g. a one-class TRAIN split leaves the linear classifiers out
            assert name not in intervals
            continue
        iv = intervals[name]
        assert iv["difference"] == pytest.approx(a - b, rel=1e-6, abs=1e-9)
        assert iv["interval"][0] <= iv["interval"][1] and iv["n_boot"] == 2000
    neds = reg["neds_accuracy"]
    assert intervals[REGION_CHECKS[0]]["difference"] == pytest.approx(neds - reg["chance_majority"])
    assert intervals[REGION_CHECKS[1]]["difference"] == pytest.approx(neds - reg["psth_accuracy"])
    for png in ("multi_vs_single.png", "traces_wheel.png", "traces_whisker.png", "psths.png",
                "regions_projection.png", "regions_confusion.png"):
        assert (out / png).stat().st_size > 0
        assert png in rep["plots"]
    md = (out / "report.md").read_text()
    assert "| model | bits/spike |" in md and "| neds_multi |" in md and "## Done-when checks" in md
    assert "## Streaming vs offline" in md and "| wheel R2 |" in md and "| neds_streaming |" in md
    assert f"choice {100 * shares['choice']:.1f} %" in md
    for scheme in ("int8", "int4"):
        assert f"| neds_streaming_{scheme} |" in md and f"{scheme} weights (`neds_streaming_{scheme}`)" in md
    probes = rep["probes"][eid]  # where each decoding NEDS holds the labels, layer by layer
    assert list(probes) == ["neds_decoding", "neds_single", "neds_multi"]
    for scores in probes.values():
        spike = scores["choice"]["spike"]
        assert list(spike) == ["input", "block 1", "block 2", "output"]
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in spike.values())
        assert scores["choice"]["choice"]["input"] is None  # the hidden choice token, alike in every trial
        assert isinstance(scores["choice"]["choice"]["output"], float)
        assert all(v is None for v in scores["block"]["block"].values())  # one block on TRAIN (see above)
    assert "| neds_multi, spike token |" in md and "| neds_decoding, choice token | - |" in md

    # --resume: the finished runs are reused (none retrained), one cut short before its end continues
    runs = sorted(out.glob("models/**/best.pt"))
    assert len(runs) == 6  # pretraining, encoding, decoding, single, multi, streaming
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    for run in runs:  # every run saves last.pt inside its epochs at the bench's interval
        settings = json.loads((run.parent / "metrics.json").read_text())["train_config"]
        assert settings["checkpoint_minutes"] == 10
    single = out / "models" / eid / "neds_single" / "metrics.json"
    cut = json.loads(single.read_text())
    del cut["finished"]
    single.write_text(json.dumps(cut))
    again = CliRunner().invoke(app, ["bench", "quality", "--data", str(data), "--out", str(out), "--pretrain",
                                     "2", "--heldout", "1", "--preset", "tiny", "--epochs", "1", "--resume",
                                     "--checkpoint-minutes", "0"])  # another interval: still the same runs
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in runs if p.parent.name != "neds_single"} == {
        p: t for p, t in stamps.items() if p.parent.name != "neds_single"}
    assert json.loads(single.read_text())["finished"] is True
    rep2 = json.loads((out / "report.json").read_text())
    assert rep2["results"] == rep["results"] and rep2["check_intervals"] == rep["check_intervals"]
    other = CliRunner().invoke(app, ["bench", "quality", "--data", str(data), "--out", str(out), "--pretrain",
                                     "2", "--heldout", "1", "--preset", "tiny", "--epochs", "2", "--resume"])
    assert other.exit_code != 0 and "train_config: epochs=1 (now 2)" in other.output

    # a lab's own sessions have no ground truth: the same comparison without the oracle rows, the latent
    # shares and the region ceiling (the simulator's side files hidden; every run reused)
    truth = data / GROUND_TRUTH_DIR
    truth.rename(tmp_path / "truth_aside")
    real = CliRunner().invoke(app, ["bench", "quality", "--data", str(data), "--out", str(out), "--pretrain",
                                    "2", "--heldout", "1", "--preset", "tiny", "--epochs", "1", "--resume"])
    (tmp_path / "truth_aside").rename(truth)
    assert real.exit_code == 0, real.output
    rep4 = json.loads((out / "report.json").read_text())
    assert rep4["models"] == [m for m in expected if m != "oracle"]
    assert rep4["results"][eid] == {m: v for m, v in rep["results"][eid].items() if m != "oracle"}
    assert not rep4.get("latent_variance") and "oracle_accuracy" not in rep4["regions"]
    assert rep4["regions"]["neds_accuracy"] == reg["neds_accuracy"]
    assert [c["name"] for c in rep4["checks"]] == [c["name"] for c in rep["checks"]]
    assert rep4["check_intervals"] == rep["check_intervals"]

    # --jobs 2: every run trained first, two at a time in worker processes, then loaded: the same report
    par = tmp_path / "out_jobs"
    res = CliRunner().invoke(app, ["bench", "quality", "--data", str(data), "--out", str(par), "--pretrain",
                                   "2", "--heldout", "1", "--preset", "tiny", "--epochs", "1", "--jobs", "2"])
    assert res.exit_code == 0, res.output
    rep3 = json.loads((par / "report.json").read_text())
    assert rep3["config"]["jobs"] == 2 and rep3["models"] == expected
    assert rep3["results"] == rep["results"] and rep3["check_intervals"] == rep["check_intervals"]
    assert rep3["regions"] == rep["regions"] and rep3["streaming"] == rep["streaming"]
    runs_ahead = {"pretrain", *(f"{name}_{eid}" for name in ("neds_encoding", "neds_decoding", "neds_single",
                                                             "neds_multi", "neds_streaming"))}
    assert {k for k in rep3["timing"] if k.startswith("trained_ahead_")} == {
        *(f"trained_ahead_{name}_s" for name in runs_ahead), "trained_ahead_wall_s"}
