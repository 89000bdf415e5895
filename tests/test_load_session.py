"""Loading a Session through ONE-api: what a good cache gives, and a clear DataError for each bad input."""

from __future__ import annotations

import importlib.util
import logging
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neds_rt.errors import DataError
from streams.load import list_probes, load_session, open_one
from streams.one_cache import session_folder, write_one_cache
from streams.sim_files import SessionFiles
from tests.test_one_cache import BERYL, tiny_session

KS = "alf/probe00/pykilosort"


def _cache(tmp_path: Path, files: SessionFiles) -> Path:
    root = tmp_path / "one"
    write_one_cache(root, [files])
    return root


def _load(root: Path, files: SessionFiles, probe: str | None = None):  # -> Session
    return load_session(open_one(root), files.eid, probe)


def test_load_session_gives_a_consistent_session(tmp_path: Path) -> None:
    files = tiny_session(0, n_trials=7, n_units=5, probes=("probe00", "probe01"))
    root = _cache(tmp_path, files)
    one = open_one(root)
    assert list_probes(one, files.eid) == ["probe00", "probe01"]
    ses = load_session(one, uuid.UUID(files.eid))  # the uuid.UUID that one.search() returns works too
    assert ses.eid == files.eid and ses.probe == "probe00"
    d = files.datasets
    assert ses.spike_times.dtype == np.float64 and np.all(np.diff(ses.spike_times) >= 0)
    assert ses.spike_units.dtype == np.int32
    np.testing.assert_array_equal(ses.spike_times, d[f"{KS}/spikes.times.npy"])
    ids = ses.units["cluster_id"].to_numpy()
    np.testing.assert_array_equal(ids[ses.spike_units], d[f"{KS}/spikes.clusters.npy"])
    assert list(ses.units.columns) == [
        "cluster_id",
        "uuid",
        "label",
        "channel",
        "depth",
        "allen_id",
        "region",
        "firing_rate",
    ]
    assert ses.n_units == 5 and set(ses.units["region"]) <= set(BERYL)
    chans = d[f"{KS}/channels.brainLocationIds_ccf_2017.npy"]
    assert isinstance(chans, np.ndarray)
    np.testing.assert_array_equal(ses.units["allen_id"], chans[ses.units["channel"]])
    assert ses.units["uuid"].tolist() == d[f"{KS}/clusters.uuids.csv"]["uuids"].tolist()
    counts = np.bincount(ses.spike_units, minlength=ses.n_units)
    np.testing.assert_allclose(ses.units["firing_rate"], counts / ses.spike_times[-1])
    trials = d["alf/_ibl_trials.table.pqt"]
    assert isinstance(trials, pd.DataFrame)
    assert list(ses.trials.columns[:2]) == ["intervals_0", "intervals_1"]
    pd.testing.assert_frame_equal(ses.trials[trials.columns], trials)
    np.testing.assert_array_equal(ses.wheel_times, d["alf/_ibl_wheel.timestamps.npy"])
    np.testing.assert_array_equal(ses.wheel_position, d["alf/_ibl_wheel.position.npy"])
    assert set(ses.motion_energy) == {"left", "right"}
    np.testing.assert_array_equal(ses.motion_energy["left"][1], d["alf/leftCamera.ROIMotionEnergy.npy"])
    np.testing.assert_array_equal(ses.motion_energy["right"][0], d["alf/_ibl_rightCamera.times.npy"])
    assert ses.meta == {
        "subject": files.subject,
        "lab": files.lab,
        "date": files.date,
        "number": files.number,
        "collection": KS,
        "session_path": str(session_folder(root, files)),
    }
    other = load_session(one, files.eid, "probe01")
    assert other.probe == "probe01" and other.meta["collection"] == "alf/probe01/pykilosort"


def test_one_factory_local_mode_and_sorter_collections(tmp_path: Path) -> None:
    from one.api import ONE

    files = [tiny_session(1, sorter="iblsorter"), tiny_session(2, sorter="")]
    root = tmp_path / "one"
    write_one_cache(root, files)
    one = ONE(cache_dir=root, mode="local")
    assert load_session(one, files[0].eid).meta["collection"] == "alf/probe00/iblsorter"
    assert load_session(one, files[1].eid).meta["collection"] == "alf/probe00"


def test_iblsorter_is_preferred_over_pykilosort(tmp_path: Path) -> None:
    files = tiny_session(3)
    newer = tiny_session(3, sorter="iblsorter")
    files.datasets |= {k: v for k, v in newer.datasets.items() if "iblsorter" in k}
    ses = _load(_cache(tmp_path, files), files)
    assert ses.meta["collection"] == "alf/probe00/iblsorter"


def test_unsorted_spikes_and_non_contiguous_cluster_ids(tmp_path: Path) -> None:
    files = tiny_session(4, n_units=4)
    d = files.datasets
    times, clusters = d[f"{KS}/spikes.times.npy"], d[f"{KS}/spikes.clusters.npy"]
    assert isinstance(times, np.ndarray) and isinstance(clusters, np.ndarray)
    order = np.random.default_rng(0).permutation(times.size)
    d[f"{KS}/spikes.times.npy"] = times[order]
    d[f"{KS}/spikes.clusters.npy"] = clusters[order] + 10  # cluster ids 10..13
    d[f"{KS}/clusters.metrics.pqt"] = pd.DataFrame({"cluster_id": np.arange(10, 14), "label": np.ones(4)})
    ses = _load(_cache(tmp_path, files), files)
    np.testing.assert_array_equal(ses.spike_times, times)
    np.testing.assert_array_equal(ses.units["cluster_id"].to_numpy()[ses.spike_units], clusters + 10)
    np.testing.assert_array_equal(ses.spike_units, clusters)  # rows 0..3 of the units table


def test_nan_trials_are_kept_without_warnings(tmp_path: Path) -> None:
    files = tiny_session(5, n_trials=8)
    trials = files.datasets["alf/_ibl_trials.table.pqt"]
    assert isinstance(trials, pd.DataFrame)
    trials.loc[[1, 4], "firstMovement_times"] = np.nan
    trials.loc[2, "choice"] = np.nan
    ses = _load(_cache(tmp_path, files), files)  # filterwarnings=error: a warning would fail here
    assert len(ses.trials) == 8
    assert ses.trials["firstMovement_times"].isna().sum() == 2 and ses.trials["choice"].isna().sum() == 1


def test_missing_right_camera_is_allowed_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = tiny_session(6, right_camera=False)
    with caplog.at_level(logging.INFO, logger="streams.load"):
        ses = _load(_cache(tmp_path, files), files)
    assert set(ses.motion_energy) == {"left"}
    assert "no right camera" in caplog.text


def test_missing_histology_gives_void_regions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = tiny_session(7)
    del files.datasets[f"{KS}/channels.brainLocationIds_ccf_2017.npy"]
    with caplog.at_level(logging.WARNING, logger="streams.load"):
        ses = _load(_cache(tmp_path, files), files)
    assert set(ses.units["region"]) == {"void"} and "no histology" in caplog.text


# --- bad input ---------------------------------------------------------------------------------------


def _drop(path: str) -> Callable[[SessionFiles], None]:
    def edit(files: SessionFiles) -> None:
        del files.datasets[path]

    return edit


def _set(path: str, value: np.ndarray | pd.DataFrame) -> Callable[[SessionFiles], None]:
    def edit(files: SessionFiles) -> None:
        files.datasets[path] = value

    return edit


def _trials(edit_frame: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[SessionFiles], None]:
    def edit(files: SessionFiles) -> None:
        frame = files.datasets["alf/_ibl_trials.table.pqt"]
        assert isinstance(frame, pd.DataFrame)
        files.datasets["alf/_ibl_trials.table.pqt"] = edit_frame(frame.copy())

    return edit


def _nan(col: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda f: f.assign(**{col: np.nan})


BAD_FILES: dict[str, tuple[Callable[[SessionFiles], None], str]] = {
    "spike times absent from the tables": (_drop(f"{KS}/spikes.times.npy"), r"spikes\.times.*missing"),
    "spike clusters absent": (_drop(f"{KS}/spikes.clusters.npy"), r"spikes\.clusters.*missing"),
    "cluster metrics absent": (_drop(f"{KS}/clusters.metrics.pqt"), r"clusters\.metrics.*missing"),
    "trials absent": (_drop("alf/_ibl_trials.table.pqt"), r"alf/trials\..*missing"),
    "wheel absent": (_drop("alf/_ibl_wheel.timestamps.npy"), r"wheel\.timestamps.*missing"),
    "left camera absent": (
        _drop("alf/leftCamera.ROIMotionEnergy.npy"),
        r"leftCamera\.ROIMotionEnergy.*missing",
    ),
    "clusters past the table": (
        _set(f"{KS}/spikes.clusters.npy", np.r_[np.zeros(199, np.int64), 9]),
        r"index past the cluster table \(4 clusters, largest cluster_id 3\).*max cluster id 9",
    ),
    "negative cluster": (_set(f"{KS}/spikes.clusters.npy", np.r_[np.zeros(199, np.int64), -1]), "min -1"),
    "times/clusters length mismatch": (
        _set(f"{KS}/spikes.clusters.npy", np.zeros(150, np.int64)),
        r"spikes\.clusters: must be 1-D with one entry per spike \(200 times\).*\(150,\)",
    ),
    "NaN spike time": (_set(f"{KS}/spikes.times.npy", np.r_[np.full(199, 1.0), np.nan]), "must be finite"),
    "metrics without label": (
        _set(f"{KS}/clusters.metrics.pqt", pd.DataFrame({"cluster_id": np.arange(4)})),
        "needs a 'label'",
    ),
    "metrics with a wrong row count": (
        _set(f"{KS}/clusters.metrics.pqt", pd.DataFrame({"cluster_id": [0, 1], "label": [1.0, 1.0]})),
        r"one row per cluster \(4\)",
    ),
    "unknown Allen ids": (
        _set(f"{KS}/channels.brainLocationIds_ccf_2017.npy", np.full(8, 987654321)),
        "not Allen CCF 2017",
    ),
    "cluster channel past the channels": (
        _set(f"{KS}/clusters.channels.npy", np.array([0, 1, 2, 40])),
        r"index past the channels table \(8",
    ),
    "required trials column missing": (
        _trials(lambda f: f.drop(columns="stimOn_times")),
        r"lacks required columns \['stimOn_times'\]",
    ),
    "required trials column all NaN": (
        _trials(_nan("feedbackType")),
        r"entirely NaN \(6 rows\).*\['feedbackType'\]",
    ),
    "trials with no rows": (_trials(lambda f: f.iloc[:0]), "holds no trials"),
    "wheel length mismatch": (
        _set("alf/_ibl_wheel.position.npy", np.zeros(3)),
        r"match wheel\.timestamps \(200\)",
    ),
    "camera length mismatch": (
        _set("alf/leftCamera.ROIMotionEnergy.npy", np.zeros(5)),
        r"leftCamera\.ROIMotionEnergy.*frames",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_datasets_raise_naming_session_and_dataset(tmp_path: Path, case: str) -> None:
    edit, match = BAD_FILES[case]
    files = tiny_session(8)
    edit(files)
    root = _cache(tmp_path, files)
    with pytest.raises(DataError, match=match) as err:
        _load(root, files)
    assert f"session {files.eid}" in str(err.value)


@pytest.mark.parametrize(
    "rel_path", [f"{KS}/spikes.times.npy", "alf/_ibl_wheel.position.npy", "alf/_ibl_leftCamera.times.npy"]
)
def test_dataset_deleted_from_disk(tmp_path: Path, rel_path: str) -> None:
    files = tiny_session(9)
    root = _cache(tmp_path, files)
    (session_folder(root, files) / rel_path).unlink()  # still in the tables, gone from disk
    attr = rel_path.rsplit("/", 1)[-1].removeprefix("_ibl_").removesuffix(".npy")
    with pytest.raises(DataError, match=rf"session {files.eid}, dataset .*{attr}: missing"):
        _load(root, files)


def test_whole_object_deleted_from_disk(tmp_path: Path) -> None:
    files = tiny_session(10)
    root = _cache(tmp_path, files)
    for path in (session_folder(root, files) / KS).glob("spikes.*"):
        path.unlink()
    with pytest.raises(DataError, match=rf"session {files.eid}, dataset {KS}/spikes\.times: missing"):
        _load(root, files)


def test_missing_probe_and_no_spike_sorting(tmp_path: Path) -> None:
    files = tiny_session(11)
    bare = tiny_session(12, probes=())
    root = tmp_path / "one"
    write_one_cache(root, [files, bare])
    one = open_one(root)
    with pytest.raises(DataError, match=rf"session {files.eid} probe.*\['probe00'\].*'probe07'"):
        load_session(one, files.eid, "probe07")
    assert list_probes(one, bare.eid) == []
    with pytest.raises(DataError, match=rf"session {bare.eid}: has no spike sorting"):
        load_session(one, bare.eid)


def test_unknown_eid(tmp_path: Path) -> None:
    files = tiny_session(13)
    one = open_one(_cache(tmp_path, files))
    unknown = str(uuid.UUID(int=12345, version=4))
    with pytest.raises(DataError, match=rf"session: eid not found.*{unknown}"):
        load_session(one, unknown)
    with pytest.raises(DataError, match="eid not found"):
        load_session(one, "not-an-eid")


def test_folders_that_are_not_one_caches(tmp_path: Path) -> None:
    from iblutil.io import parquet

    with pytest.raises(DataError, match=r"does not exist.*neds-rt simulate"):
        open_one(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"not a ONE cache: sessions\.pqt is missing.*neds-rt simulate"):
        open_one(tmp_path)
    files = tiny_session(14)
    root = _cache(tmp_path, files)
    (root / "datasets.pqt").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=rf"ONE cache {root}: datasets\.pqt cannot be read"):
        open_one(root)
    parquet.save(root / "datasets.pqt", pd.DataFrame({"id": ["x"]}), {"origin": "no date"})
    with pytest.raises(DataError, match="lacks ONE's date_created"):
        open_one(root)
    with pytest.raises(DataError, match="cache_dir: is required without base_url"):
        open_one()


# --- against helper A's simulator ----------------------------------------------------------------------

HAS_SIMULATOR = importlib.util.find_spec("streams.simulate") is not None


@pytest.mark.skipif(not HAS_SIMULATOR, reason="streams.simulate not written yet")
@pytest.mark.slow
def test_simulated_cache_loads(tmp_path: Path) -> None:
    from one.api import One

    from streams.simulate import simulate_cache

    eids = simulate_cache(tmp_path, n_sessions=2, seed=3, n_trials=30)
    one = One(cache_dir=tmp_path)
    assert sorted(map(str, one.search(datasets="spikes.times.npy"))) == sorted(map(str, eids))
    for eid in eids:
        ses = load_session(one, eid)
        assert ses.eid == str(eid) and ses.n_units > 0 and len(ses.trials) == 30
        assert set(ses.units["region"]) <= {"VISa", "CA1", "DG", "LP", "PO"}
        assert ses.spike_units.min() >= 0 and ses.spike_units.max() < ses.n_units
        assert ses.spike_times[0] >= 0 and np.all(np.diff(ses.spike_times) >= 0)
        assert ses.spike_times[-1] <= max(ses.trials["intervals_1"].max(), ses.wheel_times[-1]) + 60
        assert "left" in ses.motion_energy and ses.wheel_times.size == ses.wheel_position.size
