"""Metrics on cases with known answers and cross-checks against sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, r2_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from neds_rt.errors import DataError
from training.metrics import (
    accuracy,
    balanced_accuracy,
    bits_per_spike,
    bits_per_spike_from_log,
    bits_per_spike_per_neuron,
    bits_per_spike_per_neuron_from_log,
    confusion_matrix,
    r2,
)


def _poisson_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rates = rng.gamma(2.0, 0.2, size=(40, 50, 6)) * (1 + np.sin(np.linspace(0, 6, 50)))[None, :, None]
    counts = rng.poisson(rates)  # (K, T, N)
    return rates, counts


def test_null_prediction_scores_zero_bits_per_spike() -> None:
    _, counts = _poisson_data()
    null = np.broadcast_to(counts.mean(axis=(0, 1)), counts.shape)
    assert bits_per_spike(null, counts) == pytest.approx(0.0, abs=1e-12)
    assert bits_per_spike(null, counts, per_neuron=False) == pytest.approx(0.0, abs=1e-12)
    per = bits_per_spike_per_neuron(null, counts)
    np.testing.assert_allclose(per, 0.0, atol=1e-12)


def test_true_rates_beat_null_and_log_input_matches_rate_input() -> None:
    rates, counts = _poisson_data()
    bps = bits_per_spike(rates, counts)
    assert bps > 0.05
    assert bits_per_spike_from_log(np.log(rates), counts) == pytest.approx(bps, rel=1e-12)
    np.testing.assert_allclose(
        bits_per_spike_per_neuron_from_log(np.log(rates), counts), bits_per_spike_per_neuron(rates, counts)
    )


def test_hand_computed_value() -> None:
    # one neuron, two bins: counts 0 and 2, prediction 0.5 and 1.5, null mean 1.0
    counts = np.array([0, 2]).reshape(1, 2, 1)
    pred = np.array([0.5, 1.5]).reshape(1, 2, 1)
    ll_model = (0 * math.log(0.5) - 0.5) + (2 * math.log(1.5) - 1.5)
    ll_null = (0 - 1.0) + (2 * math.log(1.0) - 1.0)
    expected = (ll_model - ll_null) / (2 * math.log(2))
    assert bits_per_spike(pred, counts) == pytest.approx(expected, rel=1e-12)


def test_null_rates_from_training_data() -> None:
    counts = np.array([1, 1, 1, 1]).reshape(1, 4, 1)
    pred = np.full((1, 4, 1), 1.0)
    # the evaluated data's own mean is 1.0 -> 0 bits; a training null of 0.5 is worse, so the model gains
    expected = (4 * (0 - 1.0) - 4 * (math.log(0.5) - 0.5)) / (4 * math.log(2))
    assert bits_per_spike(pred, counts, null_rates=np.array([0.5])) == pytest.approx(expected)
    assert bits_per_spike(pred, counts) == pytest.approx(0.0, abs=1e-12)


def test_silent_neuron_is_left_out_of_the_mean() -> None:
    rates, counts = _poisson_data()
    counts = counts.copy()
    counts[..., 2] = 0
    per = bits_per_spike_per_neuron(rates, counts)
    assert np.isnan(per[2]) and np.all(np.isfinite(np.delete(per, 2)))
    assert bits_per_spike(rates, counts) == pytest.approx(float(np.nanmean(per)))


def test_per_neuron_mean_differs_from_pooled() -> None:
    rates, counts = _poisson_data()
    per = bits_per_spike_per_neuron(rates, counts)
    assert bits_per_spike(rates, counts) == pytest.approx(float(per.mean()))
    weights = counts.sum(axis=(0, 1))
    assert bits_per_spike(rates, counts, per_neuron=False) == pytest.approx(
        float(np.sum(per * weights) / weights.sum())
    )


@pytest.mark.parametrize(
    ("pred", "counts", "kwargs", "match"),
    [
        (np.ones((2, 3, 4)), np.ones((2, 3)), {}, "counts"),
        (np.ones((2, 3, 5)), np.ones((2, 3, 4)), {}, "shape of counts"),
        (-np.ones((2, 3, 4)), np.ones((2, 3, 4)), {}, ">= 0"),
        (np.full((2, 3, 4), np.nan), np.ones((2, 3, 4)), {}, "finite"),
        (np.ones((2, 3, 4)), -np.ones((2, 3, 4)), {}, ">= 0"),
        (np.ones((2, 3, 4)), np.zeros((2, 3, 4)), {}, "at least one spike"),
        (np.ones((2, 3, 4)), np.ones((2, 3, 4)), {"null_rates": np.ones(3)}, "null_rates"),
        (np.ones((2, 3, 4)), np.ones((2, 3, 4)), {"null_rates": -np.ones(4)}, "null_rates"),
    ],
)
def test_bits_per_spike_rejects_bad_input(
    pred: np.ndarray, counts: np.ndarray, kwargs: dict[str, np.ndarray], match: str
) -> None:
    with pytest.raises(DataError, match=match):
        bits_per_spike(pred, counts, **kwargs)  # type: ignore[arg-type]


def test_pooled_rejects_no_spikes() -> None:
    with pytest.raises(DataError, match="at least one spike"):
        bits_per_spike(np.ones((2, 3, 4)), np.zeros((2, 3, 4)), per_neuron=False)


def test_r2_known_values_and_sklearn() -> None:
    rng = np.random.default_rng(1)
    true = rng.normal(size=(30, 100))
    assert r2(true, true) == 1.0
    assert r2(np.full_like(true, true.mean()), true) == pytest.approx(0.0, abs=1e-12)
    pred = true + rng.normal(scale=0.5, size=true.shape)
    assert r2(pred, true) == pytest.approx(r2_score(true.ravel(), pred.ravel()), rel=1e-12)
    assert r2(np.array([1.0, 2.0]), np.array([0.0, 2.0])) == pytest.approx(1 - 1 / 2)


@pytest.mark.parametrize(
    ("pred", "true", "match"),
    [
        (np.ones(3), np.ones(4), "shape"),
        (np.ones(3), np.ones(3), "constant"),
        (np.ones(1), np.ones(1), "at least 2"),
        (np.array([np.inf, 1.0]), np.array([0.0, 1.0]), "finite"),
    ],
)
def test_r2_rejects_bad_input(pred: np.ndarray, true: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        r2(pred, true)


def test_accuracy_and_balanced_accuracy_against_sklearn() -> None:
    rng = np.random.default_rng(2)
    true = rng.choice(3, size=200, p=[0.6, 0.3, 0.1])
    pred = np.where(rng.random(200) < 0.7, true, rng.integers(0, 3, 200))
    assert accuracy(pred, true) == pytest.approx(accuracy_score(true, pred))
    assert balanced_accuracy(pred, true) == pytest.approx(balanced_accuracy_score(true, pred))
    # always the majority class: accuracy = majority rate, balanced accuracy = 1 / n_classes
    maj = np.zeros_like(true)
    assert accuracy(maj, true) == pytest.approx(np.mean(true == 0))
    assert balanced_accuracy(maj, true) == pytest.approx(1 / 3)
    assert balanced_accuracy(true, true) == 1.0


def test_balanced_accuracy_hand_computed() -> None:
    true = np.array([0, 0, 0, 1])
    pred = np.array([0, 0, 1, 1])
    assert balanced_accuracy(pred, true) == pytest.approx((2 / 3 + 1) / 2)
    assert accuracy(pred, true) == pytest.approx(0.75)


def test_label_metrics_reject_bad_input() -> None:
    with pytest.raises(DataError, match="as many labels"):
        accuracy(np.zeros(3), np.zeros(4))
    with pytest.raises(DataError, match="at least one label"):
        balanced_accuracy(np.zeros(0), np.zeros(0))


def test_confusion_matrix_against_sklearn() -> None:
    rng = np.random.default_rng(3)
    true = rng.integers(0, 4, 100)
    pred = rng.integers(0, 4, 100)
    expected = sk_confusion_matrix(true, pred, labels=range(4))
    np.testing.assert_array_equal(confusion_matrix(pred, true, 4), expected)
    with pytest.raises(DataError, match=r"\[0, 4\)"):
        confusion_matrix(np.full(3, 4), np.zeros(3), 4)
