"""Paired-bootstrap intervals of the quality checks: exact resampled metrics, and intervals on known cases."""

from __future__ import annotations

import numpy as np
import pytest

from bench.quality_bootstrap import (
    HeldOut,
    balanced_accuracy_w,
    bits_per_spike_w,
    encoding_sums,
    r2_w,
    region_intervals,
    regression_sums,
    trial_intervals,
)
from bench.quality_report import REGION_CHECKS, assemble, markdown, trial_comparisons
from training.arrays import TEST, Normalisation, TrialArrays
from training.metrics import balanced_accuracy, bits_per_spike, r2

K, T, N = 30, 12, 7


def _draws(rng: np.random.Generator, n_boot: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(B, K) trial indices drawn with replacement, and the same draws as per-trial weights."""
    idx = rng.integers(0, K, size=(n_boot, K))
    w = np.stack([np.bincount(i, minlength=K) for i in idx]).astype(np.float64)
    return idx, w


def test_weighted_metrics_equal_the_metrics_of_the_resampled_trials() -> None:
    rng = np.random.default_rng(0)
    rates = rng.gamma(2.0, 0.2, size=(K, T, N))
    counts = rng.poisson(rates).astype(np.float64)
    counts[:, :, 0] = 0.0
    counts[3, 2, 0] = 1.0  # a neuron with one spike: absent from most resamples (left out of the mean)
    pred, true = rng.normal(size=(K, T)), rng.normal(size=(K, T))
    guess, label = rng.integers(0, 3, K), rng.integers(0, 3, K)
    idx, w = _draws(rng)
    ones = np.ones((1, K))
    sums = encoding_sums(rates, counts)
    assert bits_per_spike_w(sums, ones)[0] == pytest.approx(bits_per_spike(rates, counts))
    assert r2_w(regression_sums(pred, true), ones)[0] == pytest.approx(r2(pred, true))
    assert balanced_accuracy_w(guess, label, ones)[0] == pytest.approx(balanced_accuracy(guess, label))
    bps = bits_per_spike_w(sums, w)
    r2s = r2_w(regression_sums(pred, true), w)
    bacc = balanced_accuracy_w(guess, label, w)
    for b, i in enumerate(idx):
        assert bps[b] == pytest.approx(bits_per_spike(rates[i], counts[i]))
        assert r2s[b] == pytest.approx(r2(pred[i], true[i]))
        assert bacc[b] == pytest.approx(balanced_accuracy(guess[i], label[i]))


def test_a_class_missing_from_a_resample_leaves_the_mean_recall() -> None:
    guess, label = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])
    w = np.array([[2.0, 0.0, 2.0, 0.0]])  # draws trials 0 and 2 only: classes 0 and 1, both right
    assert balanced_accuracy_w(guess, label, w)[0] == pytest.approx(1.0)


def _held(seed: int) -> HeldOut:
    """A session of K TEST trials; ``neds_multi`` is near the truth and right on every class, ``linear``
    is noisy and wrong on every class, ``rrr`` / ``neds_single`` predict each neuron's mean rate."""
    rng = np.random.default_rng(seed)
    rates = rng.gamma(2.0, 0.2, size=(K, T, N))
    choice, block = rng.integers(0, 2, K), rng.integers(0, 3, K)
    arr = TrialArrays(
        eid=f"s{seed}", probe="probe00", unit_ids=np.arange(N), regions=np.array(["CA1"] * N),
        spikes=rng.poisson(rates).astype(np.uint16), wheel=rng.normal(size=(K, T)).astype(np.float32),
        whisker=rng.normal(size=(K, T)).astype(np.float32), choice=choice, block=block,
        trial_index=np.arange(K), window_start=np.arange(K, dtype=np.float64) * 2.0,
        split=np.full(K, TEST, dtype=np.int8), norm=Normalisation(0.0, 1.0, 0.0, 1.0))
    held = HeldOut(arr=arr, test=arr.subset(TEST))
    flat = np.broadcast_to(rates.mean(axis=(0, 1)), rates.shape)
    held.rates.update(neds_multi=rates, rrr=flat, neds_single=flat)
    for model, noise in (("neds_multi", 0.1), ("linear", 1.0), ("neds_single", 1.0)):
        held.wheel[model] = arr.wheel + noise * rng.normal(size=(K, T))
        held.whisker[model] = arr.whisker + noise * rng.normal(size=(K, T))
    held.choice.update(neds_multi=choice, linear=1 - choice)
    held.block.update(neds_multi=block, linear=(block + 1) % 3)
    return held


def test_trial_intervals_on_known_cases() -> None:
    helds = {"a": _held(1), "b": _held(2)}
    comparisons = trial_comparisons()
    out = trial_intervals(helds, comparisons, n_boot=300, seed=0)
    names = [name for name, *_ in comparisons]
    assert set(out) == set(names)
    choice = out[names[3]]
    assert choice["difference"] == pytest.approx(1.0) and choice["interval"] == [1.0, 1.0]  # right vs wrong
    assert choice["share_better"] == 1.0 and choice["n_boot"] == 300 and choice["resampled"] == "TEST trials"
    for i in range(len(names)):
        iv = out[names[i]]
        lo, hi = iv["interval"]
        assert lo <= hi and iv["level"] == 0.95
        assert iv["difference"] > 0 and lo > 0 and iv["share_better"] == 1.0  # near the truth vs noisy/flat
    held = helds["a"]
    expected = r2(held.wheel["neds_multi"], held.arr.wheel) - r2(held.wheel["linear"], held.arr.wheel)
    expected_b = r2(helds["b"].wheel["neds_multi"], helds["b"].arr.wheel) - r2(helds["b"].wheel["linear"],
                                                                               helds["b"].arr.wheel)
    assert out[names[1]]["difference"] == pytest.approx((expected + expected_b) / 2)  # mean over sessions


def test_trial_intervals_equal_models_and_missing_predictions() -> None:
    held = _held(3)
    held.wheel["same"] = held.wheel["neds_multi"]
    out = trial_intervals({"a": held}, [("tie", "neds_multi", "same", "wheel_r2"),
                                        ("missing", "neds_multi", "absent", "choice_balanced_accuracy")],
                          n_boot=50)
    assert out["tie"]["difference"] == 0.0 and out["tie"]["interval"] == [0.0, 0.0]
    assert out["tie"]["share_better"] == 0.0  # a tie is not a win
    assert "missing" not in out
    again = trial_intervals({"a": held}, [("tie", "neds_multi", "linear", "wheel_r2")], n_boot=50, seed=4)
    assert again == trial_intervals({"a": held}, [("tie", "neds_multi", "linear", "wheel_r2")], n_boot=50,
                                    seed=4)  # seeded


def test_undefined_metrics_are_left_out_not_written_as_nan() -> None:
    held = _held(5)
    held.rates["broken"] = np.full_like(held.rates["rrr"], np.nan)  # a model that predicted NaN
    flat = held.arr.wheel.copy()
    flat[1:] = 0.5  # every trial but the first is one constant: resamples without trial 0 have no R²
    held.arr.wheel = flat
    held.wheel["same"] = flat
    out = trial_intervals({"a": held}, [("nan", "broken", "rrr", "bits_per_spike"),
                                        ("flat", "neds_multi", "same", "wheel_r2")], n_boot=400)
    assert "nan" not in out
    assert 200 < out["flat"]["n_boot"] < 400  # trial 0 is missing from ~(1 - 1/K)^K of the draws (36 %)
    assert all(np.isfinite(out["flat"]["interval"]))


def test_region_intervals() -> None:
    neds = np.array([True] * 60 + [False] * 40)
    psth = np.array([True] * 30 + [False] * 70)
    out = region_intervals(neds, psth, 0.25, REGION_CHECKS, n_boot=500)
    chance, base = out[REGION_CHECKS[0]], out[REGION_CHECKS[1]]
    assert chance["difference"] == pytest.approx(0.35) and base["difference"] == pytest.approx(0.30)
    assert chance["resampled"] == "neurons"
    for iv in (chance, base):
        lo, hi = iv["interval"]
        assert lo < iv["difference"] < hi and lo > 0 and iv["share_better"] == 1.0
    same = region_intervals(neds, neds, 0.6, REGION_CHECKS, n_boot=500)[REGION_CHECKS[1]]
    assert same["difference"] == 0.0 and same["interval"] == [0.0, 0.0]
    wide = region_intervals(neds, psth, 0.6, REGION_CHECKS, n_boot=500)[REGION_CHECKS[0]]
    assert wide["interval"][0] < 0 < wide["interval"][1] and 0.2 < wide["share_better"] < 0.8  # 0.6 vs 0.6


def test_markdown_shows_the_intervals_of_the_checks() -> None:
    results: dict[str, dict[str, dict[str, float | None]]] = {
        "a": {"linear": {"wheel_r2": 0.5}, "neds_multi": {"wheel_r2": 0.6}}}
    report = assemble(results)
    name = trial_comparisons()[1][0]
    report["check_intervals"] = {name: {"difference": 0.1, "interval": [0.02, 0.18], "level": 0.95,
                                        "share_better": 0.991, "resampled": "TEST trials", "n_boot": 2000}}
    md = markdown(report)
    row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
    cells = "| PASS | neds_multi 0.600 vs linear 0.500 | +0.100 [+0.020, +0.180]; better in 99 % |"
    assert row.endswith(cells)
    other = next(line for line in md.splitlines() if line.startswith(f"| {trial_comparisons()[0][0]} |"))
    assert other.endswith("| - |")
    assert "95 % paired-bootstrap interval" in md
