"""The ONE cache writer: files on disk, stable cache tables, and plain ONE-api reading them back."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neds_rt.errors import DataError
from streams.one_cache import session_folder, write_one_cache
from streams.sim_files import SessionFiles

# Allen ids of VISa1, CA1, DG-mo, LP, PO (Beryl: VISa, CA1, DG, LP, PO)
ALLEN_IDS = np.array([312782550, 382, 10703, 218, 1020], dtype=np.int64)
BERYL = ["VISa", "CA1", "DG", "LP", "PO"]


def tiny_session(
    seed: int = 0,
    n_trials: int = 6,
    n_units: int = 4,
    probes: tuple[str, ...] = ("probe00",),
    sorter: str = "pykilosort",
    number: int = 1,
    right_camera: bool = True,
) -> SessionFiles:
    """A hand-made IBL-like session: a few trials, a few units per probe, wheel and two cameras."""
    rng = np.random.default_rng(seed)
    eid = str(uuid.UUID(int=int(rng.integers(1 << 62)), version=4))
    starts = 1.0 + 3.0 * np.arange(n_trials)  # (K,) s, one trial every 3 s
    stim = starts + 0.5
    move = stim + 0.3
    feedback = move + 0.1
    choice = np.where(np.arange(n_trials) % 2 == 0, -1.0, 1.0)
    contrast = np.where(np.arange(n_trials) % 3 == 0, 1.0, 0.25)
    trials = pd.DataFrame(
        {
            "intervals_0": starts,
            "intervals_1": starts + 2.5,
            "stimOn_times": stim,
            "goCue_times": stim + 0.01,
            "response_times": feedback,
            "firstMovement_times": move,
            "feedback_times": feedback,
            "choice": choice,
            "feedbackType": np.ones(n_trials),
            "contrastLeft": np.where(choice > 0, contrast, np.nan),
            "contrastRight": np.where(choice < 0, contrast, np.nan),
            "probabilityLeft": np.full(n_trials, 0.5),
            "rewardVolume": np.full(n_trials, 1.5),
        }
    )
    duration = float(starts[-1] + 4.0)
    wheel_t = np.sort(rng.uniform(0, duration, 200))  # (W,) s, irregular encoder ticks
    left_t = np.arange(0, duration, 1 / 60)  # (F,) s, 60 Hz
    right_t = np.arange(0, duration, 1 / 150)  # (F,) s, 150 Hz
    datasets: dict[str, np.ndarray | pd.DataFrame] = {
        "alf/_ibl_trials.table.pqt": trials,
        "alf/_ibl_wheel.position.npy": np.cumsum(rng.normal(0, 0.01, wheel_t.size)),
        "alf/_ibl_wheel.timestamps.npy": wheel_t,
        "alf/_ibl_leftCamera.times.npy": left_t,
        "alf/leftCamera.ROIMotionEnergy.npy": rng.uniform(0, 5, left_t.size),
    }
    if right_camera:
        datasets["alf/_ibl_rightCamera.times.npy"] = right_t
        datasets["alf/rightCamera.ROIMotionEnergy.npy"] = rng.uniform(0, 5, right_t.size)
    for k, probe in enumerate(probes):
        col = f"alf/{probe}/{sorter}" if sorter else f"alf/{probe}"
        n_spikes = 50 * n_units
        times = np.sort(rng.uniform(0, duration, n_spikes))  # (S,) s
        clusters = rng.integers(0, n_units, n_spikes)  # (S,) cluster id
        n_channels = 8
        channels = (np.arange(n_units) * 2) % n_channels
        datasets |= {
            f"{col}/spikes.times.npy": times,
            f"{col}/spikes.clusters.npy": clusters.astype(np.int64),
            f"{col}/spikes.amps.npy": rng.uniform(50e-6, 200e-6, n_spikes),
            f"{col}/spikes.depths.npy": rng.uniform(0, 3800, n_spikes),
            f"{col}/clusters.channels.npy": channels.astype(np.int64),
            f"{col}/clusters.depths.npy": channels * 20.0 + 10.0 * k,
            f"{col}/clusters.metrics.pqt": pd.DataFrame(
                {"cluster_id": np.arange(n_units), "label": np.where(np.arange(n_units) % 2, 1.0, 1 / 3)}
            ),
            f"{col}/clusters.uuids.csv": pd.DataFrame(
                {"uuids": [str(uuid.UUID(int=int(rng.integers(1 << 62)), version=4)) for _ in range(n_units)]}
            ),
            f"{col}/channels.brainLocationIds_ccf_2017.npy": ALLEN_IDS[np.arange(n_channels) % 5],
            f"{col}/channels.mlapdv.npy": rng.integers(-3000, 3000, (n_channels, 3)).astype(np.int32),
        }
    return SessionFiles(
        eid=eid,
        lab="testlab",
        subject=f"SIM{seed:03d}",
        date="2024-05-0" + str(1 + seed % 9),
        number=number,
        datasets=datasets,
    )


def _one(root: Path):  # -> one.api.One
    from one.api import One

    return One(cache_dir=root)


def test_written_cache_opens_with_plain_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = tiny_session(0), tiny_session(1, probes=("probe00", "probe01"))
    eids = write_one_cache(tmp_path, [a, b])
    assert eids == [a.eid, b.eid]
    assert (session_folder(tmp_path, a) / "alf/_ibl_trials.table.pqt").is_file()
    assert session_folder(tmp_path, a).as_posix().endswith("testlab/Subjects/SIM000/2024-05-01/001")

    one = _one(tmp_path)
    assert sorted(map(str, one.search())) == sorted(eids)
    assert sorted(map(str, one.search(datasets="spikes.times.npy"))) == sorted(eids)
    assert [str(e) for e in one.search(subject="SIM001")] == [b.eid]

    trials = one.load_object(a.eid, "trials")
    assert np.allclose(trials["stimOn_times"], a.datasets["alf/_ibl_trials.table.pqt"]["stimOn_times"])
    with caplog.at_level(logging.WARNING):
        spikes = one.load_object(a.eid, "spikes", collection="alf/probe00/pykilosort")  # checks md5 + size
    assert "mismatch" not in caplog.text
    assert np.array_equal(spikes["times"], a.datasets["alf/probe00/pykilosort/spikes.times.npy"])
    assert np.array_equal(spikes["clusters"], a.datasets["alf/probe00/pykilosort/spikes.clusters.npy"])
    cols = one.list_collections(b.eid, collection="alf/probe*")
    assert set(cols) == {"alf/probe00/pykilosort", "alf/probe01/pykilosort"}
    assert one.eid2path(a.eid) == session_folder(tmp_path, a)


def test_one_factory_in_local_mode_reads_it(tmp_path: Path) -> None:
    from one.api import ONE

    s = tiny_session(2)
    write_one_cache(tmp_path, [s])
    one = ONE(cache_dir=tmp_path, mode="local")
    assert [str(e) for e in one.search(datasets="spikes.times.npy")] == [s.eid]
    me = one.load_object(s.eid, "leftCamera", collection="alf")
    assert np.array_equal(me["ROIMotionEnergy"], s.datasets["alf/leftCamera.ROIMotionEnergy.npy"])


def test_tables_have_stable_ids_and_one_dtypes(tmp_path: Path) -> None:
    from iblutil.io import parquet
    from iblutil.io.hashfile import md5
    from one.alf.cache import QC_TYPE

    s = tiny_session(3)
    write_one_cache(tmp_path / "a", [s])
    write_one_cache(tmp_path / "b", [s])
    da, meta = parquet.load(tmp_path / "a" / "datasets.pqt")
    db, _ = parquet.load(tmp_path / "b" / "datasets.pqt")
    sa, smeta = parquet.load(tmp_path / "a" / "sessions.pqt")
    assert "date_created" in meta and meta["origin"] == "neds-rt simulate" and "date_created" in smeta
    assert da.index.equals(db.index)  # same ids on every write
    assert list(sa.index) == [s.eid]
    assert da.index.names == ["eid", "id"]
    for eid, did in da.index:
        assert uuid.UUID(did).version == 3 and eid == s.eid
    assert da["qc"].dtype == QC_TYPE
    assert da["default_revision"].all() and da["exists"].all()
    assert set(da["rel_path"]) == set(s.datasets)
    row = da[da["rel_path"] == "alf/_ibl_wheel.timestamps.npy"].iloc[0]
    path = session_folder(tmp_path / "a", s) / "alf/_ibl_wheel.timestamps.npy"
    assert row["hash"] == md5(path) and row["file_size"] == path.stat().st_size


def test_batches_merge_and_rewrites_replace(tmp_path: Path) -> None:
    a, b = tiny_session(4), tiny_session(5)
    write_one_cache(tmp_path, [a])
    write_one_cache(tmp_path, [b])
    one = _one(tmp_path)
    assert sorted(map(str, one.search())) == sorted([a.eid, b.eid])
    # rewrite a with one dataset fewer: its rows are replaced, b's kept
    del a.datasets["alf/rightCamera.ROIMotionEnergy.npy"]
    write_one_cache(tmp_path, [a])
    one = _one(tmp_path)
    assert sorted(map(str, one.search())) == sorted([a.eid, b.eid])
    assert "alf/rightCamera.ROIMotionEnergy.npy" not in one.list_datasets(a.eid)
    assert "alf/rightCamera.ROIMotionEnergy.npy" in one.list_datasets(b.eid)


def test_iblsorter_and_bare_probe_collections(tmp_path: Path) -> None:
    s = tiny_session(6, sorter="iblsorter")
    t = tiny_session(7, sorter="")
    write_one_cache(tmp_path, [s, t])
    one = _one(tmp_path)
    assert one.list_collections(s.eid, collection="alf/probe*") == ["alf/probe00/iblsorter"]
    assert one.list_collections(t.eid, collection="alf/probe*") == ["alf/probe00"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"eid": str(uuid.uuid5(uuid.NAMESPACE_DNS, "x"))}, "uuid3 or uuid4"),
        ({"eid": "not-a-uuid"}, "uuid3 or uuid4"),
        ({"date": "01/05/2024"}, "YYYY-MM-DD"),
        ({"number": 1000}, "0..999"),
        ({"subject": "a/b"}, "subject"),
        ({"datasets": {}}, "must not be empty"),
        ({"datasets": {"../evil.times.npy": np.zeros(3)}}, "relative"),
        ({"datasets": {"alf/wheel.times.txt": np.zeros(3)}}, "extension"),
        ({"datasets": {"alf/notalf.npy": np.zeros(3)}}, "valid ALF path"),
        ({"datasets": {"alf/trials.table.pqt": np.zeros(3)}}, "DataFrame"),
        ({"datasets": {"alf/wheel.times.npy": pd.DataFrame({"a": [1]})}}, "numpy array"),
    ],
)
def test_bad_sessions_are_refused(tmp_path: Path, change: dict[str, object], match: str) -> None:
    s = tiny_session(8)
    for key, value in change.items():
        setattr(s, key, value)
    with pytest.raises(DataError, match=match):
        write_one_cache(tmp_path, [s])
    assert not (tmp_path / "datasets.pqt").exists()


def test_duplicate_eids_and_half_caches_are_refused(tmp_path: Path) -> None:
    s = tiny_session(9)
    with pytest.raises(DataError, match="each eid may appear once"):
        write_one_cache(tmp_path, [s, s])
    write_one_cache(tmp_path, [s])
    (tmp_path / "sessions.pqt").unlink()
    with pytest.raises(DataError, match="only one of"):
        write_one_cache(tmp_path, [tiny_session(10)])
    (tmp_path / "datasets.pqt").write_bytes(b"garbage")
    (tmp_path / "sessions.pqt").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot be read"):
        write_one_cache(tmp_path, [tiny_session(10)])
