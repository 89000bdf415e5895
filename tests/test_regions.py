"""Region classification: separable clusters score high, random embeddings score near chance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neds_rt.errors import ConfigError, DataError
from training.regions import classify_regions, plot_confusion, plot_projection, project_2d, psth_features

REGIONS = np.array(["CA1", "DG", "LP", "PO", "VISa"])


def _clusters(
    n_per: int = 30, d: int = 8, spread: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(REGIONS.size, d))
    labels = np.repeat(REGIONS, n_per)
    emb = centres[np.repeat(np.arange(REGIONS.size), n_per)] + spread * rng.normal(size=(labels.size, d))
    return emb, labels


def test_separable_clusters_classify_well() -> None:
    emb, labels = _clusters()
    res = classify_regions(emb, labels)
    assert res.accuracy > 0.95 and res.balanced_accuracy > 0.95
    assert res.chance_uniform == pytest.approx(0.2)
    assert res.chance_majority == pytest.approx(0.2)
    assert res.confusion.shape == (5, 5) and res.confusion.sum() == labels.size
    np.testing.assert_array_equal(res.classes, REGIONS)
    np.testing.assert_array_equal(res.true, labels[res.kept])
    assert np.trace(res.confusion) == int(np.sum(res.pred == res.true))
    assert set(res.metrics("neds")) == {"neds_accuracy", "neds_balanced_accuracy", "neds_chance_majority",
                                        "neds_chance_uniform"}


def test_random_embeddings_score_near_chance() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat(REGIONS, 40)
    res = classify_regions(rng.normal(size=(labels.size, 16)), labels)
    assert res.balanced_accuracy < 0.35  # chance 0.2


def test_unbalanced_regions_chance_and_rare_region_dropped() -> None:
    emb, labels = _clusters(n_per=20)
    labels = labels.copy()
    labels[:3] = "SSp"  # 3 neurons: fewer than 5 folds -> left out
    extra = np.random.default_rng(2).normal(size=(40, emb.shape[1])) + 10.0
    emb2 = np.concatenate([emb, extra])
    labels2 = np.concatenate([labels, np.array(["CA1"] * 40)])
    res = classify_regions(emb2, labels2)
    assert res.dropped == {"SSp": 3}
    assert "SSp" not in res.classes and res.kept.size == labels2.size - 3
    assert res.chance_majority == pytest.approx(57 / 137)
    assert res.chance_uniform == pytest.approx(1 / 5)


def test_classify_regions_rejects_bad_input() -> None:
    emb, labels = _clusters(n_per=6)
    with pytest.raises(DataError, match="one region per neuron"):
        classify_regions(emb, labels[:-1])
    with pytest.raises(DataError, match=r"\(N, D\)"):
        classify_regions(emb[:, 0], labels)
    with pytest.raises(DataError, match="at least 2 regions"):
        classify_regions(emb, labels, n_splits=10)
    with pytest.raises(ConfigError, match="n_splits"):
        classify_regions(emb, labels, n_splits=1)
    with pytest.raises(DataError, match="finite"):
        classify_regions(np.full_like(emb, np.nan), labels)


def test_psth_features_recover_region_specific_timing() -> None:
    rng = np.random.default_rng(3)
    k, t = 60, 25
    regions = np.repeat(REGIONS[:3], 15)
    peak = {"CA1": 5, "DG": 12, "LP": 20}
    tt = np.arange(t)
    bumps = [0.2 + 1.5 * np.exp(-0.5 * ((tt - peak[r]) / 2.0) ** 2) for r in regions]
    lam = np.stack(bumps, axis=1)  # (T, N) expected counts per bin
    lam = lam * rng.uniform(0.5, 2.0, size=regions.size)  # neuron-specific gain
    spikes = rng.poisson(np.broadcast_to(lam, (k, t, regions.size)))
    choice = rng.integers(0, 2, k)
    feats = psth_features(spikes, choice=choice, smooth_bins=1.0, zscore_per_neuron=True)
    assert feats.shape == (regions.size, 2 * t)
    np.testing.assert_allclose(feats.mean(axis=1), 0.0, atol=1e-9)
    res = classify_regions(feats, regions)
    assert res.accuracy > 0.9
    raw = psth_features(spikes, rows=np.arange(10))
    np.testing.assert_allclose(raw, spikes[:10].mean(axis=0).T)
    with pytest.raises(DataError, match="both choices"):
        psth_features(spikes, choice=np.zeros(k))
    with pytest.raises(DataError, match="one label per trial"):
        psth_features(spikes, choice=np.zeros(3))
    with pytest.raises(DataError, match=r"\(K, T, N\)"):
        psth_features(spikes[0])


def test_plots_write_png(tmp_path: Path) -> None:
    emb, labels = _clusters(n_per=10)
    res = classify_regions(emb, labels)
    for method in ("pca", "tsne"):
        out = plot_projection(emb, labels, tmp_path / f"proj_{method}.png", method=method)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cm = plot_confusion(res, tmp_path / "sub" / "confusion.png")
    assert cm.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert project_2d(emb).shape == (emb.shape[0], 2)
    with pytest.raises(ConfigError, match="method"):
        project_2d(emb, method="umap")
    with pytest.raises(DataError, match="one region per neuron"):
        plot_projection(emb, labels[:3], tmp_path / "bad.png")
