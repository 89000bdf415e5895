"""Linear baselines and oracle ceilings on synthetic sessions where the right answer is designed in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from neds_rt.errors import ConfigError, DataError
from streams.ground_truth import GroundTruth, ground_truth_path, save_ground_truth
from training.arrays import TEST, TRAIN, VAL, Normalisation, TrialArrays
from training.baselines import (
    LinearConfig,
    RRRConfig,
    decode_from_features,
    fit_lagged_ridge,
    fit_linear_decoders,
    fit_rrr_encoder,
    fit_trial_logistic,
    lagged,
    ridge_path,
    spike_features,
)
from training.metrics import bits_per_spike
from training.oracle import (
    chance_levels,
    decoding_ceiling,
    fraction_of_ceiling,
    latent_shares_for,
    latent_variance_shares,
    oracle_bits_per_spike,
    oracle_bits_per_spike_per_neuron,
    true_latents_for,
    true_loadings_for,
    true_rates_for,
)

FAST = LinearConfig(lags=3, alphas=(1e-2, 1.0, 1e2, 1e4), Cs=(1e-2, 1.0), max_components=32)


def _split(k: int, rng: np.random.Generator) -> np.ndarray:
    split = np.full(k, TRAIN, dtype=np.int8)
    perm = rng.permutation(k)
    split[perm[: k // 5]] = VAL
    split[perm[k // 5 : 2 * k // 5]] = TEST
    return split


def _arrays(spikes: np.ndarray, wheel: np.ndarray, whisker: np.ndarray, choice: np.ndarray,
            block: np.ndarray, split: np.ndarray) -> TrialArrays:
    k, _, n = spikes.shape
    return TrialArrays(
        eid="synthetic", probe="probe00", unit_ids=np.arange(n, dtype=np.int64),
        regions=np.array(["CA1"] * n), spikes=spikes.astype(np.uint16), wheel=wheel.astype(np.float32),
        whisker=whisker.astype(np.float32), choice=choice.astype(np.int64), block=block.astype(np.int64),
        trial_index=np.arange(k, dtype=np.int64), window_start=np.arange(k, dtype=np.float64) * 3.0,
        split=split, norm=Normalisation(0.0, 1.0, 0.0, 1.0),
    )


def _decodable(seed: int = 0, k: int = 150, t: int = 40, n: int = 12) -> TrialArrays:
    """Wheel = a linear function of lagged sqrt spikes; whisker and block = noise; choice from neuron 0."""
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, 2, k)
    lam = rng.uniform(0.5, 3.0, size=(k, t, n))
    lam[:, :, 0] = 0.5 + choice[:, None]  # neuron 0 fires twice as much before a choice of 1
    spikes = rng.poisson(lam)  # (K, T, N)
    w = rng.normal(size=(3, n))
    s = np.sqrt(spikes.astype(np.float64))
    wheel = s @ w[1]
    wheel[:, 1:] += s[:, :-1] @ w[0]  # bin t sees bin t-1
    wheel[:, :-1] += s[:, 1:] @ w[2]  # and bin t+1
    whisker = rng.normal(size=(k, t))
    block = rng.integers(0, 3, size=k)
    return _arrays(spikes, wheel, whisker, choice, block, _split(k, rng))


def test_lagged_shifts_within_trial_and_pads_with_zeros() -> None:
    x = np.arange(2 * 4 * 1, dtype=np.float64).reshape(2, 4, 1) + 1  # trials [1,2,3,4], [5,6,7,8]
    out = lagged(x, 1)  # blocks: t-1, t, t+1
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(out[0, :, 1], [1, 2, 3, 4])
    np.testing.assert_array_equal(out[1, :, 2], [6, 7, 8, 0])
    with pytest.raises(ConfigError, match="lags"):
        lagged(x, -1)


def test_ridge_path_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 7)) * rng.uniform(0.1, 3, 7) + 2.0
    y = x @ rng.normal(size=(7, 2)) + rng.normal(size=(200, 2)) + 5.0
    w, b = ridge_path(x, y, (0.1, 10.0))
    for a, alpha in enumerate((0.1, 10.0)):
        ref = Ridge(alpha=alpha).fit(x, y)
        np.testing.assert_allclose(w[a], ref.coef_.T, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(b[a], ref.intercept_, rtol=1e-6)


def test_spike_features_pca_keeps_at_most_max_components() -> None:
    rng = np.random.default_rng(1)
    spikes = rng.poisson(1.0, size=(20, 10, 40))
    spikes[..., 3] = 0  # a silent neuron is dropped, not divided by zero
    tr = np.arange(15)
    assert spike_features(spikes, tr, max_components=64).shape == (20, 10, 39)
    feats = spike_features(spikes, tr, max_components=8)
    assert feats.shape == (20, 10, 8) and feats.dtype == np.float32
    np.testing.assert_allclose(feats[tr].std(axis=(0, 1)), 1.0, rtol=1e-4)
    with pytest.raises(DataError, match="no neuron that varies"):
        spike_features(np.zeros((20, 10, 4)), tr, max_components=8)


def test_linear_decoders_recover_designed_signal_and_not_noise() -> None:
    arrays = _decodable()
    res = fit_linear_decoders(arrays, FAST)
    m = res.metrics()
    assert m["wheel_r2"] > 0.95
    assert abs(m["whisker_r2"]) < 0.1
    assert m["choice_balanced_accuracy"] > 0.8
    assert m["block_balanced_accuracy"] < 0.6  # 3 classes of noise: chance 1/3
    wheel = res.regression["wheel"]
    te = np.flatnonzero(arrays.split == TEST)
    np.testing.assert_array_equal(wheel.rows, te)
    assert wheel.pred.shape == (te.size, arrays.n_bins)
    np.testing.assert_array_equal(wheel.true, arrays.wheel[te])
    block = res.classification["block"]
    assert block.proba.shape == (te.size, 3)
    np.testing.assert_allclose(block.proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(block.pred, block.proba.argmax(axis=1))


def test_pure_noise_decodes_at_chance() -> None:
    rng = np.random.default_rng(5)
    k, t, n = 150, 30, 10
    arrays = _arrays(rng.poisson(1.0, size=(k, t, n)), rng.normal(size=(k, t)), rng.normal(size=(k, t)),
                     rng.integers(0, 2, k), rng.integers(0, 3, k), _split(k, rng))
    m = fit_linear_decoders(arrays, FAST).metrics()
    assert abs(m["wheel_r2"]) < 0.1 and abs(m["whisker_r2"]) < 0.1
    assert 0.25 < m["choice_balanced_accuracy"] < 0.75


def test_alpha_is_chosen_on_val() -> None:
    rng = np.random.default_rng(2)
    k, t = 100, 20
    feats = rng.normal(size=(k, t, 30)).astype(np.float32)
    y = feats[..., 0] + 3.0 * rng.normal(size=(k, t))  # weak signal in many noisy features
    split = _split(k, rng)
    res = fit_lagged_ridge(feats, {"y": y}, split, lags=2, alphas=(1e-3, 1e3))
    assert res["y"].alpha == 1e3  # the small penalty overfits 150 features
    assert res["y"].val_r2 > 0


def test_decoders_reject_bad_input() -> None:
    arrays = _decodable(k=50)
    no_val = arrays.split.copy()
    no_val[no_val == VAL] = TRAIN
    with pytest.raises(DataError, match="no VAL trials"):
        fit_lagged_ridge(np.ones((50, 40, 2), np.float32), {"y": arrays.wheel}, no_val)
    with pytest.raises(ConfigError, match="alphas"):
        fit_lagged_ridge(np.ones((50, 40, 2), np.float32), {"y": arrays.wheel}, arrays.split, alphas=())
    with pytest.raises(ConfigError, match="Cs"):
        fit_trial_logistic(np.ones((50, 3)), {"c": (arrays.choice, 2)}, arrays.split, Cs=(-1.0,))
    with pytest.raises(DataError, match="2 classes"):
        fit_trial_logistic(np.ones((50, 3)), {"c": (np.zeros(50), 2)}, arrays.split)
    with pytest.raises(DataError, match=r"labels in \[0, 2\)"):
        fit_trial_logistic(np.ones((50, 3)), {"c": (np.full(50, 2), 2)}, arrays.split)
    with pytest.raises(DataError, match="one entry per trial"):
        fit_lagged_ridge(np.ones((50, 40, 2), np.float32), {"y": arrays.wheel}, arrays.split[:10])
    with pytest.raises(DataError, match=r"\(K, T, D\)"):
        decode_from_features(np.ones((50, 40)), wheel=arrays.wheel, whisker=arrays.whisker,
                             choice=arrays.choice, block=arrays.block, split=arrays.split)


def _encodable(seed: int = 0, k: int = 150, t: int = 40, n: int = 15, coupled: bool = True) -> tuple[
    TrialArrays, np.ndarray
]:
    """Spikes whose log rate = PSTH + gain * wheel(t) + choice effect; returns the arrays and true rates."""
    rng = np.random.default_rng(seed)
    tt = np.arange(t)
    base = np.log(0.3 + 0.25 * (1 + np.sin(tt[:, None] / 6.0 + rng.uniform(0, 6, n))))  # (T, N)
    wheel = np.abs(np.cumsum(rng.normal(size=(k, t)), axis=1)) / 4.0  # (K, T) smooth-ish
    whisker = rng.random((k, t))
    choice = rng.integers(0, 2, k)
    block = rng.integers(0, 3, k)
    gain = rng.normal(scale=0.6, size=n) if coupled else np.zeros(n)
    ch_gain = 0.4 * rng.normal(size=n) if coupled else np.zeros(n)
    ch = ch_gain[None, None, :] * (2 * choice - 1)[:, None, None]  # (K, 1, N)
    log_rates = base[None] + gain[None, None, :] * (wheel - wheel.mean())[..., None] + ch  # (K, T, N)
    rates = np.exp(log_rates)
    spikes = rng.poisson(rates)
    return _arrays(spikes, wheel, whisker, choice, block, _split(k, rng)), rates


def test_rrr_encoder_explains_behaviour_driven_spikes() -> None:
    arrays, rates = _encodable()
    res = fit_rrr_encoder(arrays, RRRConfig(ranks=(1, 2), lags=2, max_iter=200))
    oracle = oracle_bits_per_spike(rates, arrays.spikes, arrays.split)
    te = np.flatnonzero(arrays.split == TEST)
    assert res.rates.shape == (te.size, arrays.n_bins, arrays.n_units)
    np.testing.assert_array_equal(res.rows, te)
    assert res.rank in (1, 2) and set(res.val_bits_per_spike) == {1, 2}
    assert res.bits_per_spike > res.psth_bits_per_spike + 0.05
    assert res.bits_per_spike > 0.7 * oracle
    assert res.bits_per_spike < oracle + 0.02  # nothing fit to data beats the truth by more than noise
    assert res.bits_per_spike == pytest.approx(bits_per_spike(res.rates, arrays.spikes[te]), rel=1e-5)
    assert res.metrics()["rrr_bits_per_spike"] == res.bits_per_spike


def test_rrr_encoder_gains_nothing_when_spikes_ignore_behaviour() -> None:
    arrays, _ = _encodable(seed=3, coupled=False)
    res = fit_rrr_encoder(arrays, RRRConfig(lags=1, max_iter=100), rank=2)
    assert res.rank == 2
    assert abs(res.bits_per_spike - res.psth_bits_per_spike) < 0.02


def test_rrr_encoder_rejects_bad_rank() -> None:
    arrays, _ = _encodable(k=30)
    with pytest.raises(ConfigError, match="rank"):
        fit_rrr_encoder(arrays, rank=0)


def test_oracle_bits_per_spike_uses_test_trials_only() -> None:
    arrays, rates = _encodable(seed=4)
    te = arrays.split == TEST
    assert oracle_bits_per_spike(rates, arrays.spikes, arrays.split) == pytest.approx(
        bits_per_spike(rates[te], arrays.spikes[te])
    )
    per = oracle_bits_per_spike_per_neuron(rates, arrays.spikes, arrays.split)
    assert per.shape == (arrays.n_units,) and np.all(per > 0)
    with pytest.raises(DataError, match="shape of the spike counts"):
        oracle_bits_per_spike(rates[:, :, :3], arrays.spikes, arrays.split)
    with pytest.raises(DataError, match="no TEST trials"):
        oracle_bits_per_spike(rates, arrays.spikes, np.zeros(arrays.spikes.shape[0], np.int8))


def test_decoding_ceiling_from_latents_and_fraction() -> None:
    rng = np.random.default_rng(6)
    k, t = 150, 30
    lat = rng.normal(size=(k, t, 3))  # (K, T, D) true latents
    wheel = np.abs(lat[..., 0])  # a nonlinear readout: the quadratic expansion recovers most of it
    whisker = lat[..., 1] - 0.5 * lat[..., 2]
    choice = (lat[:, :, 2].mean(axis=1) > 0).astype(np.int64)
    block = rng.integers(0, 3, k)
    arrays = _arrays(rng.poisson(1.0, size=(k, t, 4)), wheel, whisker, choice, block, _split(k, rng))
    res = decoding_ceiling(lat, arrays, config=FAST).metrics()
    assert res["whisker_r2"] > 0.99
    assert res["wheel_r2"] > 0.5
    assert res["choice_balanced_accuracy"] > 0.85
    linear = decoding_ceiling(lat, arrays, quadratic=False, config=FAST).metrics()
    assert linear["wheel_r2"] < res["wheel_r2"]
    quad = decoding_ceiling(lat, arrays, quadratic=True, config=FAST).metrics()
    assert res["wheel_r2"] == quad["wheel_r2"]  # the default picks the better feature set on VAL
    with pytest.raises(DataError, match="latents"):
        decoding_ceiling(lat[:, :10], arrays, config=FAST)
    chance = chance_levels(arrays)
    assert chance["block_balanced_accuracy"] == pytest.approx(1 / 3)
    assert chance["wheel_r2"] == 0.0 and 0.5 <= chance["choice_accuracy"] < 1.0
    frac = fraction_of_ceiling(linear["choice_balanced_accuracy"], res["choice_balanced_accuracy"], 0.5)
    assert np.isfinite(frac)


def test_fraction_of_ceiling() -> None:
    assert fraction_of_ceiling(0.75, 1.0, 0.5) == pytest.approx(0.5)
    assert fraction_of_ceiling(0.2, 0.4) == pytest.approx(0.5)
    assert fraction_of_ceiling(0.5, 1.0, 0.5) == 0.0
    with pytest.raises(DataError, match="above chance"):
        fraction_of_ceiling(0.5, 0.5, 0.5)
    with pytest.raises(DataError, match="finite"):
        fraction_of_ceiling(float("nan"), 1.0, 0.0)


def test_true_rates_and_latents_from_ground_truth_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n_all, n_lat, step = 6, 3, 0.005
    gt = GroundTruth(
        eid="sim-eid", probe="probe00", t0=0.0, step=step,
        latents=rng.normal(size=(4000, n_lat)).astype(np.float32), latent_names=("a", "b", "c"),
        cluster_ids=np.arange(10, 10 + n_all, dtype=np.int64), base_rate=np.full(n_all, 5.0),
        loadings=rng.normal(scale=0.3, size=(n_all, n_lat)).astype(np.float32),
        log_offset=np.full(n_all, np.log(5.0), dtype=np.float32), regions=np.array(["CA1"] * n_all),
    )
    save_ground_truth(ground_truth_path(tmp_path, gt.eid, gt.probe), gt)
    k, t = 5, 20
    arrays = _arrays(rng.poisson(0.1, size=(k, t, 3)), rng.random((k, t)), rng.random((k, t)),
                     np.array([0, 1, 0, 1, 0]), np.array([0, 1, 2, 0, 1]), np.array([0, 0, 0, 1, 2], np.int8))
    arrays.eid, arrays.unit_ids = gt.eid, np.array([15, 10, 12], dtype=np.int64)
    rates = true_rates_for(arrays, tmp_path)
    full = gt.rates(arrays.window_start, t)  # (K, T, N_all)
    np.testing.assert_allclose(rates, full[:, :, [5, 0, 2]], rtol=1e-6)
    lat = true_latents_for(arrays, tmp_path)
    assert lat.shape == (k, t, n_lat)
    np.testing.assert_allclose(lat[0, 0], gt.latents[:4].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(true_loadings_for(arrays, tmp_path), gt.loadings[[5, 0, 2]])
    shares = latent_shares_for(arrays, tmp_path)  # the arrays' units and trial bins only
    assert shares == pytest.approx(latent_variance_shares(lat, gt.loadings[[5, 0, 2]], ("a", "b", "c")))
    arrays.unit_ids = np.array([10, 99], dtype=np.int64)
    with pytest.raises(DataError, match="no rates for 1 units"):
        true_rates_for(arrays, tmp_path)
    with pytest.raises(DataError, match="no rates for 1 units"):
        true_loadings_for(arrays, tmp_path)


def test_trial_logistic_span_rotation_keeps_the_l2_solution() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(8)
    k, f = 60, 150  # more features than TRAIN trials: the fit runs on the rotated span
    x = rng.normal(size=(k, f))
    y = (x[:, 0] + 0.5 * rng.normal(size=k) > 0).astype(np.int64)
    split = _split(k, rng)
    res = fit_trial_logistic(x, {"y": (y, 2)}, split, Cs=(0.1,), max_iter=5000)["y"]
    tr, te = split == TRAIN, split == TEST
    z = (x - x[tr].mean(axis=0)) / x[tr].std(axis=0)
    ref = LogisticRegression(C=0.1, max_iter=5000, tol=1e-10).fit(z[tr], y[tr])
    np.testing.assert_allclose(res.proba, ref.predict_proba(z[te]), atol=1e-3)


def test_true_rates_marginalise_noise_latents(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    g, step = 40000, 0.005
    lat = np.zeros((g, 2), dtype=np.float32)
    lat[:, 1] = rng.normal(size=g)  # white noise latent, variance 1
    load = np.array([[0.0, 0.5], [0.0, 1.0]], dtype=np.float32)  # (N, L)
    gt = GroundTruth(
        eid="sim-eid", probe="probe00", t0=0.0, step=step, latents=lat, latent_names=("task", "noise"),
        cluster_ids=np.array([1, 2]), base_rate=np.full(2, 5.0), loadings=load,
        log_offset=np.full(2, np.log(5.0), dtype=np.float32), regions=np.array(["CA1", "DG"]),
    )
    save_ground_truth(ground_truth_path(tmp_path, gt.eid, gt.probe), gt)
    k, t = 80, 100
    arrays = _arrays(np.zeros((k, t, 2)), np.zeros((k, t)), np.zeros((k, t)), np.zeros(k), np.zeros(k),
                     np.zeros(k, np.int8))
    arrays.eid, arrays.unit_ids = gt.eid, np.array([1, 2], dtype=np.int64)
    arrays.window_start = np.arange(k) * 2.0
    marg = true_rates_for(arrays, tmp_path, marginalise=("noise",))
    m, v = float(lat[:, 1].astype(np.float64).mean()), float(lat[:, 1].astype(np.float64).var())
    expected = 0.02 * 5.0 * np.exp(load[:, 1] * m + 0.5 * load[:, 1] ** 2 * v)  # (N,) lognormal mean per bin
    np.testing.assert_allclose(marg, np.broadcast_to(expected, marg.shape), rtol=1e-4)
    sampled = true_rates_for(arrays, tmp_path)
    np.testing.assert_allclose(sampled.mean(axis=(0, 1)), expected, rtol=0.05)  # same mean, not the same bins
    with pytest.raises(DataError, match="marginalise"):
        true_rates_for(arrays, tmp_path, marginalise=("nope",))


def test_latent_variance_shares_known_answers() -> None:
    a = np.array([1.0, -1.0] * 4)  # variance 1 over 8 bins
    b = np.array([2.0, 2.0, -2.0, -2.0] * 2)  # variance 4, uncorrelated with a
    two = np.stack([a, b], axis=-1).reshape(4, 2, 2)  # (K, T, L)
    # unit 0 reads a (log-rate variance 1), unit 1 reads b (variance 4): 1 / 5 and 4 / 5 of the total
    assert latent_variance_shares(two, np.eye(2), ("a", "b")) == pytest.approx({"a": 0.2, "b": 0.8})
    # scaling every loading scales every variance alike: the shares stay
    assert latent_variance_shares(two, 3 * np.eye(2), ("a", "b")) == pytest.approx({"a": 0.2, "b": 0.8})
    # unit 1 reads b at weight 2 (log-rate variance 16): a's share falls to 1 / 17
    assert latent_variance_shares(two, np.array([[1.0, 0.0], [0.0, 2.0]]), ("a", "b")) == pytest.approx(
        {"a": 1 / 17, "b": 16 / 17})
    # two copies of one latent: the unit's variance is 4, each copy's own part 1; the covariance is in neither
    same = np.stack([a, a], axis=-1).reshape(4, 2, 2)
    assert latent_variance_shares(same, np.ones((1, 2)), ("x", "y")) == pytest.approx({"x": 0.25, "y": 0.25})
    with pytest.raises(DataError, match="loadings"):
        latent_variance_shares(two, np.eye(3), ("a", "b"))
    with pytest.raises(DataError, match="names"):
        latent_variance_shares(two, np.eye(2), ("a",))
    with pytest.raises(DataError, match="no log-rate variance"):
        latent_variance_shares(two, np.zeros((2, 2)), ("a", "b"))
    bad = two.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="finite"):
        latent_variance_shares(bad, np.eye(2), ("a", "b"))
