"""Session -> TrialArrays / ContinuousArrays (training.data) and the on-disk array cache (training.cache)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from neds_rt.binning import bin_windows
from neds_rt.errors import ConfigError, DataError
from streams.session import Session
from training.arrays import TEST, TRAIN, VAL, ContinuousArrays, TrialArrays
from training.cache import arrays_for_session, cache_key, load_arrays, read_arrays, save_arrays
from training.data import (
    DataConfig,
    build_arrays,
    build_continuous_arrays,
    build_trial_arrays,
    continuous_windows,
    split_trials,
    usable_trials,
)

TRIAL_PERIOD = 10.0  # s: trial i spans [10 i + 1, 10 i + 9), stimOn at 10 i + 3


def make_session(n_trials: int = 20, eid: str = "eid-test", seed: int = 0) -> Session:
    """A tiny hand-made session: 3 units (10 Hz, 5 Hz, one spike), regular trials, linear wheel and ME."""
    rng = np.random.default_rng(seed)
    t_end = n_trials * TRIAL_PERIOD
    t0 = np.sort(rng.uniform(0.0, t_end, size=int(10 * t_end)))
    t1 = np.sort(rng.uniform(0.0, t_end, size=int(5 * t_end)))
    times = np.concatenate([t0, t1, [t_end / 2]])
    units = np.concatenate([np.zeros(t0.size), np.ones(t1.size), [2]]).astype(np.int32)
    order = np.argsort(times, kind="stable")
    i = np.arange(n_trials, dtype=np.float64)
    stim = TRIAL_PERIOD * i + 3.0
    trials = pd.DataFrame({
        "intervals_0": TRIAL_PERIOD * i + 1.0,
        "intervals_1": TRIAL_PERIOD * i + 9.0,
        "stimOn_times": stim,
        "goCue_times": stim,
        "response_times": stim + 0.4,
        "firstMovement_times": stim + 0.3,
        "feedback_times": stim + 0.5,
        "choice": np.where(i % 2 == 0, -1.0, 1.0),
        "feedbackType": np.ones(n_trials),
        "contrastLeft": np.ones(n_trials),
        "contrastRight": np.full(n_trials, np.nan),
        "probabilityLeft": np.array([0.5, 0.2, 0.8])[(i % 3).astype(int)],
        "rewardVolume": np.full(n_trials, 1.5),
    })
    units_tab = pd.DataFrame({
        "cluster_id": [10, 11, 12], "label": [1.0, 0.33, 0.0], "region": ["CA1", "DG", "LP"],
    })
    wheel_t = np.arange(0.0, t_end, 0.005)
    cam_t = np.arange(0.0, t_end, 1 / 60)
    return Session(
        eid=eid, probe="probe00", spike_times=times[order], spike_units=units[order], units=units_tab,
        trials=trials, wheel_times=wheel_t, wheel_position=2.0 * wheel_t,
        motion_energy={"left": (cam_t, cam_t.copy()), "right": (cam_t, np.zeros_like(cam_t))},
    )


# ------------------------------------------------------------------------------------------ trial arrays


def test_shapes_dtypes_and_units() -> None:
    ta = build_trial_arrays(make_session())
    assert isinstance(ta, TrialArrays)
    assert ta.spikes.shape == (20, 100, 2) and ta.spikes.dtype == np.uint16
    assert ta.wheel.shape == (20, 100) and ta.wheel.dtype == np.float32
    assert ta.whisker.shape == (20, 100) and ta.whisker.dtype == np.float32
    np.testing.assert_array_equal(ta.unit_ids, [10, 11])  # the 1-spike unit is below 2 Hz
    np.testing.assert_array_equal(ta.regions, ["CA1", "DG"])
    np.testing.assert_array_equal(ta.trial_index, np.arange(20))
    np.testing.assert_allclose(ta.window_start, TRIAL_PERIOD * np.arange(20) + 2.5)
    dropped = ta.meta["dropped"]
    assert isinstance(dropped, dict) and dropped["dropped"] == 0


def test_exact_bins_including_edges() -> None:
    s = make_session(n_trials=10)
    start = 3.0 - 0.5  # trial 0 window start
    edge = lambda k: start + k * 0.02  # noqa: E731 - the float64 edges bin_windows uses
    extra_t = np.array([start - 1e-9, edge(0), edge(0) + 0.019, edge(1), edge(37), edge(99) + 0.01,
                        edge(100), edge(100) - 1e-9])
    # unit 2 gets only these spikes plus enough late ones to pass the 2 Hz threshold
    filler = np.linspace(50.0, 99.0, 600)
    t = np.concatenate([s.spike_times[s.spike_units != 2], extra_t, filler])
    u = np.concatenate([s.spike_units[s.spike_units != 2], np.full(extra_t.size + filler.size, 2)])
    order = np.argsort(t, kind="stable")
    s.spike_times, s.spike_units = t[order], u[order].astype(np.int32)
    ta = build_trial_arrays(s)
    col = int(np.flatnonzero(ta.unit_ids == 12)[0])
    got = ta.spikes[0, :, col]
    want = np.zeros(100, dtype=np.uint16)
    for k in (0, 0, 1, 37, 99, 99):
        want[k] += 1
    np.testing.assert_array_equal(got, want)
    # and the whole tensor equals a direct call of the one binning path
    direct = bin_windows(t, u, ta.window_start, 100, 3, dtype=np.uint16)
    np.testing.assert_array_equal(ta.spikes, direct[:, :, [0, 1, 2]])


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("stimOn_times", np.nan, "nan_stimOn_times"),
        ("choice", np.nan, "nan_choice"),
        ("feedback_times", np.nan, "nan_feedback_times"),
        ("probabilityLeft", np.nan, "nan_probabilityLeft"),
        ("firstMovement_times", np.nan, "nan_firstMovement_times"),
        ("feedbackType", np.nan, "nan_feedbackType"),
        ("choice", 0.0, "choice_0"),
    ],
)
def test_each_filter_drops_its_trial(column: str, value: float, reason: str) -> None:
    s = make_session()
    s.trials.loc[[4, 7], column] = value
    rows, reasons = usable_trials(s, DataConfig())
    np.testing.assert_array_equal(rows, np.setdiff1d(np.arange(20), [4, 7]))
    assert reasons[reason] == 2
    assert reasons["dropped"] == 2
    ta = build_trial_arrays(s)
    assert 4 not in ta.trial_index and 7 not in ta.trial_index and ta.spikes.shape[0] == 18


def test_reaction_time_range_is_closed_and_configurable() -> None:
    s = make_session()
    stim = s.trials["stimOn_times"].to_numpy()
    s.trials.loc[1, "firstMovement_times"] = stim[1] + 0.05  # too fast
    s.trials.loc[2, "firstMovement_times"] = stim[2] + 2.5  # too slow
    s.trials.loc[3, "firstMovement_times"] = stim[3] + 1.9  # inside
    rows, reasons = usable_trials(s, DataConfig())
    assert reasons["reaction_time"] == 2 and 3 in rows and 1 not in rows and 2 not in rows
    rows_wide, _ = usable_trials(s, DataConfig(rt_range=(0.0, 3.0)))
    assert rows_wide.size == 20


def test_missing_column_names_it() -> None:
    s = make_session()
    s.trials = s.trials.drop(columns=["feedbackType"])
    with pytest.raises(DataError, match=r"column 'feedbackType'.*is required"):
        build_trial_arrays(s)


def test_no_usable_trial_names_session_dataset_and_counts() -> None:
    s = make_session(eid="eid-empty")
    s.trials["choice"] = 0.0
    s.trials.loc[0, "stimOn_times"] = np.nan
    with pytest.raises(DataError, match=r"eid-empty.*_ibl_trials\.table\.pqt.*no usable trial") as err:
        build_trial_arrays(s)
    assert "choice_0=20" in str(err.value) and "nan_stimOn_times=1" in str(err.value)


def test_bad_probability_left_names_the_value() -> None:
    s = make_session()
    s.trials.loc[5, "probabilityLeft"] = 0.3
    with pytest.raises(DataError, match=r"probabilityLeft.*0\.3"):
        build_trial_arrays(s)


def test_bad_choice_value_raises() -> None:
    s = make_session()
    s.trials.loc[5, "choice"] = 2.0
    with pytest.raises(DataError, match=r"choice.*2\.0"):
        build_trial_arrays(s)


def test_labels_mapping() -> None:
    s = make_session(n_trials=12)
    s.trials.loc[4, "probabilityLeft"] = 0.2 + 1e-5  # within tolerance
    ta = build_trial_arrays(s)
    np.testing.assert_array_equal(ta.choice, np.arange(12) % 2)  # -1 -> 0, +1 -> 1
    np.testing.assert_array_equal(ta.block, np.array([1, 0, 2])[np.arange(12) % 3])
    assert ta.choice.dtype == np.int64 and ta.block.dtype == np.int64


def test_split_sizes_and_determinism() -> None:
    cfg = DataConfig()
    a = split_trials(50, cfg, "eid-a")
    np.testing.assert_array_equal(np.bincount(a, minlength=3), [35, 5, 10])
    np.testing.assert_array_equal(a, split_trials(50, cfg, "eid-a"))
    assert not np.array_equal(a, split_trials(50, DataConfig(seed=1), "eid-a"))
    assert not np.array_equal(a, split_trials(50, cfg, "eid-b"))
    ta1, ta2 = build_trial_arrays(make_session()), build_trial_arrays(make_session())
    np.testing.assert_array_equal(ta1.split, ta2.split)
    assert ta1.split.dtype == np.int8
    assert [ta1.subset(k).size for k in (TRAIN, VAL, TEST)] == [14, 2, 4]


def test_empty_split_names_it() -> None:
    with pytest.raises(DataError, match=r"eid-s: val split.*is empty"):
        split_trials(4, DataConfig(), "eid-s")
    s = make_session(n_trials=4)
    with pytest.raises(DataError, match="split"):
        build_trial_arrays(s)


def test_scaling_uses_training_trials_only() -> None:
    s = make_session(n_trials=30)
    ta = build_trial_arrays(s)
    # motion energy == time and wheel speed == 2 rad/s everywhere, so raw values are known exactly
    train = ta.subset(TRAIN)
    centres = ta.window_start[:, None] + (np.arange(100) + 0.5) * 0.02  # (K, T) raw whisker
    assert ta.norm.whisker_min == pytest.approx(centres[train].min())
    assert ta.norm.whisker_max == pytest.approx(centres[train].max())
    assert ta.norm.wheel_min == pytest.approx(2.0, rel=1e-3)
    last_trial_is_train = ta.split[-1] == TRAIN
    assert last_trial_is_train or ta.whisker.max() > 1.0 + 1e-6
    assert ta.whisker[train].min() == pytest.approx(0.0, abs=1e-6)
    assert ta.whisker[train].max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(ta.norm.unscale("whisker", ta.whisker), centres, rtol=1e-5)
    # changing a test trial's motion energy leaves the normalisation unchanged
    test_row = int(ta.trial_index[ta.subset(TEST)[0]])
    t, me = s.motion_energy["left"]
    stim = float(s.trials.loc[test_row, "stimOn_times"])
    me = me.copy()
    me[(t > stim - 0.6) & (t < stim + 1.6)] = 1e6
    s.motion_energy["left"] = (t, me)
    ta2 = build_trial_arrays(s)
    assert ta2.norm == ta.norm


def test_nan_motion_energy_is_counted() -> None:
    s = make_session()
    t, me = s.motion_energy["left"]
    me = me.copy()
    me[100:110] = np.nan
    s.motion_energy["left"] = (t, me)
    assert build_trial_arrays(s).meta["whisker_nan_frames"] == 10


@pytest.mark.parametrize(
    "cfg",
    [DataConfig(bin_size=0.0), DataConfig(split=(0.5, 0.1, 0.1)), DataConfig(rt_range=(2.0, 1.0)),
     DataConfig(pre=0.51), DataConfig(min_rate_hz=-1.0)],
)
def test_bad_config_raises(cfg: DataConfig) -> None:
    with pytest.raises(ConfigError, match="DataConfig"):
        build_trial_arrays(make_session(), cfg)


def test_no_unit_above_threshold_raises() -> None:
    with pytest.raises(DataError, match="no unit fires above 100"):
        build_trial_arrays(make_session(), DataConfig(min_rate_hz=100.0))


# ------------------------------------------------------------------------------------- continuous arrays


def test_continuous_grid_spikes_and_behaviour_match_trials() -> None:
    s = make_session()
    ta, ca = build_arrays(s)
    assert isinstance(ca, ContinuousArrays)
    assert ca.t0 == 1.0
    n_total = int(np.floor((TRIAL_PERIOD * 19 + 9.0 - 1.0) / 0.02))
    assert ca.spikes.shape == (n_total, 2) and ca.spikes.dtype == np.uint16
    assert ca.wheel.shape == ca.whisker.shape == ca.choice.shape == ca.split.shape == (n_total,)
    np.testing.assert_array_equal(ca.unit_ids, ta.unit_ids)
    assert ca.norm == ta.norm
    for k in (0, 7, 19):
        b = round((ta.window_start[k] - ca.t0) / 0.02)
        np.testing.assert_array_equal(ca.spikes[b:b + 100], ta.spikes[k])
        np.testing.assert_allclose(ca.whisker[b:b + 100], ta.whisker[k], atol=1e-5)
        np.testing.assert_allclose(ca.wheel[b:b + 100], ta.wheel[k], atol=1e-4)
    assert int(ca.spikes.sum()) == int(((s.spike_times >= 1.0) & (s.spike_times < 1.0 + n_total * 0.02)
                                        & (s.spike_units < 2)).sum())
    ca2 = build_continuous_arrays(s, trial_arrays=ta)
    np.testing.assert_array_equal(ca2.spikes, ca.spikes)
    np.testing.assert_array_equal(build_continuous_arrays(s).split, ca.split)


def test_continuous_labels_and_splits_per_bin() -> None:
    s = make_session()
    s.trials.loc[5, "choice"] = 0.0  # unusable trial: its bins get -1 labels
    ta, ca = build_arrays(s)
    centre = ca.t0 + (np.arange(ca.choice.size) + 0.5) * 0.02
    split_of = dict(zip(ta.trial_index.tolist(), ta.split.tolist(), strict=True))
    choice_of = dict(zip(ta.trial_index.tolist(), ta.choice.tolist(), strict=True))
    for trial in (0, 3, 6, 19):
        inside = (centre >= TRIAL_PERIOD * trial + 1.0) & (centre < TRIAL_PERIOD * trial + 9.0)
        assert np.all(ca.choice[inside] == choice_of[trial])
        assert np.all(ca.split[inside] == split_of[trial])
        # the ITI before trial `trial` takes its split, with no labels
        iti = (centre >= TRIAL_PERIOD * trial - 1.0) & (centre < TRIAL_PERIOD * trial + 1.0)
        assert np.all(ca.choice[iti] == -1) and np.all(ca.block[iti] == -1)
        if trial:
            assert np.all(ca.split[iti] == split_of[trial])
    dropped = (centre >= 51.0) & (centre < 59.0)
    assert np.all(ca.choice[dropped] == -1) and np.all(ca.block[dropped] == -1)
    assert np.all(ca.split[dropped] == split_of[6])  # bins of a dropped trial: the following trial's


def test_continuous_windows_stay_inside_one_split() -> None:
    _, ca = build_arrays(make_session(n_trials=30))
    for split in (TRAIN, VAL, TEST):
        starts = continuous_windows(ca, window_bins=100, stride=50, split=split)
        assert starts.dtype == np.int64 and starts.size > 0
        for a in starts:
            assert np.all(ca.split[a:a + 100] == split) and a + 100 <= ca.split.size
        assert np.all(np.diff(starts) > 0)
    default = continuous_windows(ca)
    rng_starts = continuous_windows(ca, window_bins=100, stride=100, rng=np.random.default_rng(3))
    assert rng_starts.size > 0 and not np.array_equal(default, rng_starts)
    for a in rng_starts:
        assert np.all(ca.split[a:a + 100] == TRAIN)
    assert continuous_windows(ca, window_bins=10**7).size == 0
    with pytest.raises(ConfigError, match="stride"):
        continuous_windows(ca, stride=0)
    with pytest.raises(ConfigError, match="split"):
        continuous_windows(ca, split=5)


# ------------------------------------------------------------------------------------------------- cache


def _assert_same(a: tuple[TrialArrays, ContinuousArrays], b: tuple[TrialArrays, ContinuousArrays]) -> None:
    for x, y in zip(a, b, strict=True):
        for name, value in vars(x).items():
            other = getattr(y, name)
            if isinstance(value, np.ndarray):
                assert value.dtype == other.dtype, name
                np.testing.assert_array_equal(value, other, err_msg=name)
            else:
                assert value == other, name


def test_cache_round_trip_and_config_miss(tmp_path: Path) -> None:
    s = make_session()
    first = arrays_for_session(s, DataConfig(), tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    assert len(files) == 1
    _assert_same(first, read_arrays(files[0]))
    _assert_same(first, arrays_for_session(s, DataConfig(), tmp_path))
    assert len(list(tmp_path.glob("*.npz"))) == 1  # a hit writes nothing
    other = arrays_for_session(s, DataConfig(min_rate_hz=6.0), tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2  # a changed config misses
    assert other[0].n_units == 1


def test_cache_file_holds_no_pickled_objects(tmp_path: Path) -> None:
    ta, ca = build_arrays(make_session())
    path = tmp_path / "x.npz"
    save_arrays(path, ta, ca)
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


def test_corrupt_cache_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="unreadable"):
        read_arrays(path)


def test_cache_key_depends_on_every_input() -> None:
    base = cache_key("e", "probe00", DataConfig(), [["alf/x.npy", 10, None]])
    assert base == cache_key("e", "probe00", DataConfig(), [["alf/x.npy", 10, None]])
    assert base != cache_key("e", "probe01", DataConfig(), [["alf/x.npy", 10, None]])
    assert base != cache_key("f", "probe00", DataConfig(), [["alf/x.npy", 10, None]])
    assert base != cache_key("e", "probe00", DataConfig(seed=2), [["alf/x.npy", 10, None]])
    assert base != cache_key("e", "probe00", DataConfig(), [["alf/x.npy", 11, None]])


class _FakeOne:
    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    def list_datasets(self, eid: str, details: bool = False) -> pd.DataFrame:
        return pd.DataFrame({"rel_path": list(self.sizes), "file_size": list(self.sizes.values()),
                             "hash": [None] * len(self.sizes)})


def test_load_arrays_uses_loader_and_dataset_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []

    def load_session(one: Any, eid: str, probe: str | None = None) -> Session:
        loads.append(eid)
        return make_session(eid=eid)

    fake = types.ModuleType("streams.load")
    fake.load_session = load_session  # type: ignore[attr-defined]
    fake.open_one = lambda cache_dir: _FakeOne({"alf/_ibl_trials.table.pqt": 100})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "streams.load", fake)
    one = _FakeOne({"alf/_ibl_trials.table.pqt": 100, "alf/probe01/spikes.times.npy": 5})
    a = load_arrays(one, "eid-1", "probe00", DataConfig(), tmp_path)
    b = load_arrays(one, "eid-1", "probe00", DataConfig(), tmp_path)
    _assert_same(a, b)
    assert loads == ["eid-1"]
    one.sizes["alf/probe01/spikes.times.npy"] = 6  # another probe's file: still a hit
    load_arrays(one, "eid-1", "probe00", DataConfig(), tmp_path)
    assert loads == ["eid-1"]
    one.sizes["alf/_ibl_trials.table.pqt"] = 101  # re-extracted trials: a miss
    load_arrays(one, "eid-1", "probe00", DataConfig(), tmp_path)
    assert loads == ["eid-1", "eid-1"]
    load_arrays(tmp_path / "one_cache", "eid-1", "probe00", DataConfig(), tmp_path)  # a folder opens ONE
    assert len(loads) == 2  # same fingerprint as the first load via the folder's fake ONE


def _write_one_cache(root: Path, session: Session) -> None:
    from streams.one_cache import write_one_cache
    from streams.sim_files import SessionFiles

    col = "alf/probe00/pykilosort"
    ids = session.units["cluster_id"].to_numpy()
    datasets: dict[str, np.ndarray | pd.DataFrame] = {
        f"{col}/spikes.times.npy": session.spike_times,
        f"{col}/spikes.clusters.npy": ids[session.spike_units],
        f"{col}/clusters.channels.npy": np.arange(ids.size),
        f"{col}/clusters.metrics.pqt": pd.DataFrame({"cluster_id": ids, "label": session.units["label"]}),
        "alf/_ibl_trials.table.pqt": session.trials,
        "alf/_ibl_wheel.position.npy": session.wheel_position,
        "alf/_ibl_wheel.timestamps.npy": session.wheel_times,
        "alf/_ibl_leftCamera.times.npy": session.motion_energy["left"][0],
        "alf/leftCamera.ROIMotionEnergy.npy": session.motion_energy["left"][1],
    }
    write_one_cache(root, [SessionFiles(eid=session.eid, lab="lab", subject="mouse", date="2025-01-02",
                                        number=1, datasets=datasets)])


def test_load_arrays_from_a_real_one_cache(tmp_path: Path) -> None:
    import uuid

    from streams.load import load_session, open_one

    session = make_session(eid=str(uuid.UUID(int=7, version=4)))
    _write_one_cache(tmp_path / "one", session)
    first = load_arrays(tmp_path / "one", session.eid, "probe00", DataConfig(), tmp_path / "arrays")
    second = load_arrays(tmp_path / "one", session.eid, "probe00", DataConfig(), tmp_path / "arrays")
    _assert_same(first, second)
    assert len(list((tmp_path / "arrays").glob("*.npz"))) == 1
    loaded = load_session(open_one(tmp_path / "one"), session.eid, probe="probe00")
    _assert_same(first, build_arrays(loaded))
    beside = load_arrays(tmp_path / "one", session.eid, "probe00", DataConfig())  # default: inside the cache
    _assert_same(first, beside)
    assert len(list((tmp_path / "one" / "neds_rt_arrays").glob("*.npz"))) == 1
    np.testing.assert_array_equal(first[0].spikes, build_trial_arrays(session).spikes)
