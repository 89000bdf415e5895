"""The IBL-like simulator: determinism, IBL invariants, unit statistics, anatomy, wheel, ground truth, ONE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neds_rt.binning import bin_windows
from neds_rt.errors import ConfigError, DataError
from streams import sim_neurons as sn
from streams import sim_task as st
from streams.ground_truth import GroundTruth, load_ground_truth
from streams.simulate import SimulatedSession, simulate_cache, simulate_session

TRIAL_COLUMNS = [
    "intervals_0",
    "intervals_1",
    "stimOn_times",
    "goCue_times",
    "response_times",
    "firstMovement_times",
    "feedback_times",
    "choice",
    "feedbackType",
    "contrastLeft",
    "contrastRight",
    "probabilityLeft",
    "rewardVolume",
]
PREFIX = "alf/probe00/pykilosort"


@pytest.fixture(scope="module")
def sim() -> SimulatedSession:
    return simulate_session(seed=11, index=0, n_trials=60, n_probes=1)


def _spikes(s: SimulatedSession) -> tuple[np.ndarray, np.ndarray]:
    times = s.files.datasets[f"{PREFIX}/spikes.times.npy"]
    clusters = s.files.datasets[f"{PREFIX}/spikes.clusters.npy"]
    assert isinstance(times, np.ndarray) and isinstance(clusters, np.ndarray)
    return times, clusters.astype(np.int64)


def _trials(s: SimulatedSession) -> pd.DataFrame:
    trials = s.files.datasets["alf/_ibl_trials.table.pqt"]
    assert isinstance(trials, pd.DataFrame)
    return trials


def test_same_seed_same_session(sim: SimulatedSession) -> None:
    again = simulate_session(seed=11, index=0, n_trials=60, n_probes=1)
    assert again.files.eid == sim.files.eid
    assert (again.files.subject, again.files.date) == (sim.files.subject, sim.files.date)
    assert sorted(again.files.datasets) == sorted(sim.files.datasets)
    for key, value in sim.files.datasets.items():
        other = again.files.datasets[key]
        if isinstance(value, pd.DataFrame):
            assert isinstance(other, pd.DataFrame)
            pd.testing.assert_frame_equal(value, other)
        else:
            np.testing.assert_array_equal(value, other)
    np.testing.assert_array_equal(again.ground_truth["probe00"].latents, sim.ground_truth["probe00"].latents)
    other_session = simulate_session(seed=11, index=1, n_trials=20, n_probes=1)
    other_seed = simulate_session(seed=12, index=0, n_trials=20, n_probes=1)
    assert len({sim.files.eid, other_session.files.eid, other_seed.files.eid}) == 3


def test_spike_draw_does_not_depend_on_workers(sim: SimulatedSession) -> None:
    gt = sim.ground_truth["probe00"]
    units = sn.ProbeUnits(
        cluster_ids=gt.cluster_ids,
        base_rate=gt.base_rate,
        label=np.ones(gt.n_units),
        channel=np.zeros(gt.n_units),
        depth=np.zeros(gt.n_units),
        region=gt.regions,
        amp=np.ones(gt.n_units),
        loadings=gt.loadings,
        log_offset=gt.log_offset,
    )
    one = sn.draw_spikes(units, gt.latents, gt.step, seed=5, workers=1, blocks_per_chunk=64)
    two = sn.draw_spikes(units, gt.latents, gt.step, seed=5, workers=2, blocks_per_chunk=64)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


def test_trials_table_follows_ibl_invariants(sim: SimulatedSession) -> None:
    tr = _trials(sim)
    assert list(tr.columns) == TRIAL_COLUMNS
    assert len(tr) == 60
    assert not tr.drop(columns=["contrastLeft", "contrastRight"]).isna().any().any()
    assert (tr.intervals_0 < tr.stimOn_times).all()
    assert (tr.stimOn_times < tr.firstMovement_times).all()
    assert (tr.firstMovement_times < tr.response_times).all()
    assert (tr.response_times <= tr.feedback_times).all()
    assert (tr.feedback_times < tr.intervals_1).all()
    assert (tr.intervals_1.to_numpy()[:-1] <= tr.intervals_0.to_numpy()[1:]).all()
    assert (np.abs(tr.goCue_times - tr.stimOn_times) < 0.02).all()
    assert set(tr.choice.unique()) <= {-1.0, 1.0}
    assert set(tr.feedbackType.unique()) <= {-1.0, 1.0}
    left = tr.contrastLeft.notna()
    assert (left ^ tr.contrastRight.notna()).all()  # exactly one side has a stimulus, the other is NaN
    contrast = tr.contrastLeft.fillna(tr.contrastRight)
    assert set(contrast.unique()) <= set(st.CONTRASTS)
    correct = np.where(left, 1.0, -1.0) == tr.choice  # choice +1 (clockwise) is correct for a left stimulus
    np.testing.assert_array_equal(np.where(correct, 1.0, -1.0), tr.feedbackType)
    np.testing.assert_array_equal(tr.rewardVolume > 0, correct)
    assert (tr.probabilityLeft == 0.5).all()  # 60 trials: still in the 90 unbiased ones
    rt = tr.firstMovement_times - tr.stimOn_times
    assert (rt >= 0.08).all()
    hold = tr.intervals_1 - tr.feedback_times
    assert (hold[tr.feedbackType > 0] < hold[tr.feedbackType < 0].min()).all()  # 1 s vs 2 s before the ITI


def test_blocks_contrasts_and_psychometrics() -> None:
    rng = np.random.default_rng(3)
    p_left = st.draw_blocks(rng, 3000)
    assert (p_left[: st.N_UNBIASED] == 0.5).all()
    biased = p_left[st.N_UNBIASED :]
    assert set(np.unique(biased)) == {0.2, 0.8}
    switches = np.flatnonzero(np.diff(biased)) + 1
    lengths = np.diff(np.concatenate([[0], switches]))
    assert lengths.min() >= st.BLOCK_MIN and lengths.max() <= st.BLOCK_MAX
    assert 35 < lengths.mean() < 60  # truncated Exp(60) on [20, 100]

    zero_correct, all_correct, rt_full, rt_zero, left_in_08 = [], [], [], [], []
    for _ in range(30):
        trials, *_ = st.draw_trials(rng, 600, st.TaskParams.draw(rng), t_first=5.0)
        contrast = trials.contrastLeft.fillna(trials.contrastRight)
        zero = contrast == 0
        zero_correct.append((trials.feedbackType[zero] > 0).mean())
        all_correct.append((trials.feedbackType > 0).mean())
        rt = trials.firstMovement_times - trials.stimOn_times
        rt_full.append(rt[contrast == 1].median())
        rt_zero.append(rt[zero].median())
        in_08 = trials.probabilityLeft == 0.8
        left_in_08.append(trials.contrastLeft[in_08].notna().mean())
        assert (rt < 2.0).mean() > 0.95
        assert abs(zero.mean() - 1 / 9) < 0.06  # 0 % half as often as each other contrast
    assert abs(np.mean(zero_correct) - 0.587) < 0.04
    assert 0.75 < np.mean(all_correct) < 0.9
    assert np.mean(rt_zero) > np.mean(rt_full) + 0.1  # slower at low contrast
    assert abs(np.mean(left_in_08) - 0.8) < 0.03  # the side is drawn with pLeft


def test_unit_draw_statistics() -> None:
    rng = np.random.default_rng(5)
    good_rates, n_above, n_good, labels = [], [], [], []
    for _ in range(60):
        units = sn.draw_units(rng, sn.draw_layout(rng))
        good = units.label == 1.0
        good_rates.append(units.base_rate[good])
        n_above.append(int((units.base_rate > 2.0).sum()))
        n_good.append(int(good.sum()))
        labels.append(units.label)
        assert units.loadings.shape == (units.n_units, sn.N_LATENTS)
        assert np.array_equal(units.cluster_ids, np.arange(units.n_units))
    rates = np.concatenate(good_rates)
    assert 3.6 < np.median(rates) < 4.4
    assert 6.3 < rates.mean() < 8.0
    assert 17 < np.percentile(rates, 95) < 30
    assert abs(np.median(n_above) - 538) < 45
    assert 360 < np.percentile(n_above, 10) and np.percentile(n_above, 90) < 720
    assert abs(np.median(n_good) - 115) < 20
    assert set(np.unique(np.concatenate(labels))) == {0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0}


def test_regions_map_back_through_beryl() -> None:
    from iblatlas.regions import BrainRegions

    br = BrainRegions()
    rng = np.random.default_rng(8)
    for _ in range(3):
        layout = sn.draw_layout(rng)
        assert layout.allen_ids.shape == (sn.N_CHANNELS,) and layout.mlapdv.dtype == np.int32
        beryl = br.id2acronym(layout.allen_ids, mapping="Beryl")
        np.testing.assert_array_equal(beryl, layout.regions)
        assert set(beryl) == set(sn.REGIONS)
        changes = np.flatnonzero(beryl[1:] != beryl[:-1])
        assert changes.size == len(sn.REGIONS) - 1  # contiguous bands along the probe
        assert list(beryl[np.r_[0, changes + 1]]) == list(sn.REGIONS[::-1])  # PO at the tip, VISa on top
        units = sn.draw_units(rng, layout, n_above=200)
        np.testing.assert_array_equal(units.region, layout.regions[units.channel])


def test_region_tuning_is_fixed_across_sessions() -> None:
    mean_a, sd_a = sn.region_tuning()
    mean_b, _ = sn.region_tuning()
    np.testing.assert_array_equal(mean_a, mean_b)
    assert mean_a.shape == sd_a.shape == (len(sn.REGIONS), sn.N_LATENTS)
    profile = np.concatenate([mean_a, sd_a], axis=1)  # (R, 2L)
    dist = np.linalg.norm(profile[:, None] - profile[None], axis=-1)
    assert dist[~np.eye(len(sn.REGIONS), dtype=bool)].min() > 0.15  # regions differ in tuning


def test_wheel_ticks_and_turn_direction(sim: SimulatedSession) -> None:
    tr = _trials(sim)
    t = sim.files.datasets["alf/_ibl_wheel.timestamps.npy"]
    pos = sim.files.datasets["alf/_ibl_wheel.position.npy"]
    assert isinstance(t, np.ndarray) and isinstance(pos, np.ndarray)
    assert (np.diff(t) > 0).all()
    counts = pos / st.WHEEL_RESOLUTION
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-6)  # encoder counts, 4096 per turn
    assert (np.abs(np.diff(np.round(counts))) == 1).all()  # one sample per count change
    assert len(np.unique(np.round(np.diff(t), 6))) > 100  # irregular timestamps
    at_move = np.interp(tr.firstMovement_times, t, pos)
    at_response = np.interp(tr.response_times, t, pos)
    turn = at_response - at_move
    np.testing.assert_array_equal(np.sign(turn), -tr.choice)  # +1 = clockwise = position decreases
    assert (np.abs(turn) > st.RESPONSE_THRESHOLD_RAD - 3 * st.WHEEL_RESOLUTION).all()
    before = np.interp(tr.stimOn_times, t, pos) - np.interp(tr.stimOn_times - 0.4, t, pos)
    assert (np.abs(before) < 0.02).all()  # quiescence before the stimulus


def test_cameras(sim: SimulatedSession) -> None:
    for cam, fs in st.CAMERA_FS.items():
        times = sim.files.datasets[f"alf/_ibl_{cam}Camera.times.npy"]
        me = sim.files.datasets[f"alf/{cam}Camera.ROIMotionEnergy.npy"]
        assert isinstance(times, np.ndarray) and isinstance(me, np.ndarray)
        assert times.shape == me.shape
        assert (np.diff(times) >= 0).all()
        assert abs(1.0 / np.median(np.diff(times)) - fs) < 1.0
        assert 0 < me.min() and me.max() < 255 and np.median(me) < 10


def test_ground_truth_rates_match_spike_counts(sim: SimulatedSession) -> None:
    gt = sim.ground_truth["probe00"]
    times, clusters = _spikes(sim)
    assert (np.diff(times) >= 0).all()
    starts = _trials(sim).stimOn_times.to_numpy() - 0.5
    expected = gt.rates(starts, 100)  # (W, T, N) expected counts per 20 ms bin
    counts = bin_windows(times, clusters, starts, 100, gt.n_units)
    assert expected.shape == counts.shape
    total_e, total_c = float(expected.sum()), float(counts.sum())
    assert abs(total_c - total_e) < 4 * np.sqrt(total_e)
    per_unit = (counts.sum((0, 1)) - expected.sum((0, 1))) / np.sqrt(expected.sum((0, 1)))
    assert 0.8 < per_unit.std() < 1.25 and abs(per_unit.mean()) < 0.2  # Poisson z-scores
    psth_e, psth_c = expected.sum((0, 2)), counts.sum((0, 2))
    assert np.corrcoef(psth_e, psth_c)[0, 1] > 0.9  # the stimulus/movement time course is in the spikes
    # session-mean rates near the base rates (normalisation)
    duration = float(gt.latents.shape[0] * gt.step)
    observed = np.bincount(clusters, minlength=gt.n_units) / duration
    busy = gt.base_rate > 5
    assert abs(np.median(observed[busy] / gt.base_rate[busy]) - 1) < 0.1


def test_ground_truth_integration_is_exact(sim: SimulatedSession) -> None:
    gt = sim.ground_truth["probe00"]
    start = 10 * gt.step + 0.3 * gt.step  # window starting inside a fine step
    fast = gt.rates([start], 8, bin_size=4 * gt.step)  # bins tile whole steps
    general = gt.rates([start], 8, bin_size=4 * gt.step * (1 + 1e-12))  # general overlap path
    np.testing.assert_allclose(fast, general, rtol=1e-4)
    fine = gt.fine_rates(10, 45).astype(np.float64) * gt.step  # (35, N) expected counts per fine step
    first_bin = 0.7 * fine[0] + fine[1:4].sum(0) + 0.3 * fine[4]
    np.testing.assert_allclose(fast[0, 0], first_bin, rtol=1e-4)
    lat = gt.latents_at([start], 8, bin_size=4 * gt.step)
    z = gt.latents[10:15].astype(np.float64)
    np.testing.assert_allclose(lat[0, 0], (0.7 * z[0] + z[1:4].sum(0) + 0.3 * z[4]) / 4, rtol=1e-4, atol=1e-6)
    outside = gt.rates([-10.0], 5)
    assert (outside == 0).all()


def test_behaviour_is_decodable_from_spikes(sim: SimulatedSession) -> None:
    from sklearn.linear_model import Ridge

    gt = sim.ground_truth["probe00"]
    times, clusters = _spikes(sim)
    n_bins = int(gt.latents.shape[0] * gt.step / 0.02) - 1
    x = np.sqrt(bin_windows(times, clusters, [0.0], n_bins, gt.n_units)[0])  # (T, N) sqrt counts
    wt, wp = (
        sim.files.datasets["alf/_ibl_wheel.timestamps.npy"],
        sim.files.datasets["alf/_ibl_wheel.position.npy"],
    )
    edges = np.arange(n_bins + 1) * 0.02
    speed = np.abs(np.diff(np.interp(edges, wt, wp))) / 0.02  # (T,) rad/s from the written wheel data
    me_t, me = (
        sim.files.datasets[f"alf/{k}"]
        for k in ("_ibl_leftCamera.times.npy", "leftCamera.ROIMotionEnergy.npy")
    )
    whisker = np.interp(edges[:-1] + 0.01, me_t, me)  # (T,)
    split = int(0.7 * n_bins)
    for name, y in (("wheel speed", speed), ("whisker", whisker)):
        ys = np.convolve(y, np.ones(5) / 5, mode="same")
        xs = np.stack([np.convolve(c, np.ones(5) / 5, mode="same") for c in x.T], axis=1)
        model = Ridge(alpha=100.0).fit(xs[:split], ys[:split])
        r2 = model.score(xs[split:], ys[split:])
        assert 0.2 < r2 < 0.95, (name, r2)  # decodable, not trivially perfect


def test_regions_respond_differently(sim: SimulatedSession) -> None:
    gt = sim.ground_truth["probe00"]
    times, clusters = _spikes(sim)
    tr = _trials(sim)
    strong = tr.contrastLeft.fillna(0).to_numpy() >= 0.25
    counts = bin_windows(times, clusters, tr.stimOn_times.to_numpy()[strong] - 0.3, 25, gt.n_units)
    evoked = counts[:, 17:22].mean((0, 1)) / 0.02  # 40-140 ms after a left stimulus, Hz
    baseline = counts[:, :15].mean((0, 1)) / 0.02
    gain = np.log((evoked + 0.5) / (baseline + 0.5))
    assert np.median(gain[gt.regions == "VISa"]) > np.median(gain[gt.regions == "CA1"]) + 0.1


def test_cache_opens_with_one_and_ground_truth_loads(tmp_path: Path) -> None:
    from one.api import One

    out = tmp_path / "cache"
    eids = simulate_cache(out, n_sessions=2, seed=4, n_trials=30)
    again = simulate_cache(tmp_path / "again", n_sessions=1, seed=4, n_trials=30)
    assert again == eids[:1]
    rel = Path("alf/probe00/pykilosort/spikes.times.npy")
    first = next(out.rglob(str(rel)))
    second = tmp_path / "again" / first.relative_to(out)
    assert first.read_bytes() == second.read_bytes()

    one = One(cache_dir=out)
    found = sorted(str(e) for e in one.search())
    assert found == sorted(eids)
    for eid in eids:
        trials = one.load_object(eid, "trials")
        assert len(trials["choice"]) == 30
        spikes = one.load_object(eid, "spikes", collection="alf/probe00/pykilosort")
        assert spikes["times"].size == spikes["clusters"].size > 0
        gt = load_ground_truth(out, eid, "probe00")
        assert isinstance(gt, GroundTruth)
        assert gt.n_units == int(spikes["clusters"].max()) + 1 or gt.n_units > spikes["clusters"].max()
    with pytest.raises(DataError, match=r"probe07\.npz"):
        load_ground_truth(out, eids[0], "probe07")


@pytest.mark.parametrize(
    ("kwargs", "kind", "match"),
    [
        ({"n_sessions": 0}, ConfigError, "n_sessions"),
        ({"n_sessions": 1, "n_trials": 3}, ConfigError, "n_trials"),
        ({"n_sessions": 1, "seed": -1}, ConfigError, "seed"),
    ],
)
def test_bad_arguments_are_refused(
    tmp_path: Path, kwargs: dict[str, int], kind: type[Exception], match: str
) -> None:
    with pytest.raises(kind, match=match):
        simulate_cache(tmp_path, **kwargs)


def test_output_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(DataError, match="out"):
        simulate_cache(path, n_sessions=1, n_trials=20)


def test_corrupt_ground_truth_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "_groundtruth" / "abc" / "probe00.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, latents=np.zeros((2, 2)))
    with pytest.raises(DataError, match="lacks arrays"):
        load_ground_truth(tmp_path, "abc", "probe00")


@pytest.mark.parametrize(
    ("starts", "n_bins", "bin_size", "kind", "match"),
    [
        ([0.0], 0, 0.02, ConfigError, "n_bins"),
        ([0.0], 10, 0.0, ConfigError, "bin_size"),
        ([np.nan], 10, 0.02, DataError, "window starts"),
    ],
)
def test_bad_rate_queries_are_refused(
    sim: SimulatedSession,
    starts: list[float],
    n_bins: int,
    bin_size: float,
    kind: type[Exception],
    match: str,
) -> None:
    gt = sim.ground_truth["probe00"]
    with pytest.raises(kind, match=match):
        gt.rates(starts, n_bins, bin_size=bin_size)
    with pytest.raises(kind, match=match):
        gt.latents_at(starts, n_bins, bin_size=bin_size)
