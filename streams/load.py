"""Load one probe insertion of one IBL session into a :class:`~streams.session.Session` through ONE-api.

Only ONE-api calls are used (``list_collections``, ``load_object``, ``get_details``, ``eid2path``), so the
same code reads a local cache (real IBL or simulated) and, given an online ``ONE``, the IBL servers.
Every missing or malformed dataset raises a :class:`~neds_rt.errors.DataError` naming the session and the
dataset.
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from neds_rt.errors import DataError, invalid
from streams.session import Session

if TYPE_CHECKING:
    from one.api import One

_log = logging.getLogger(__name__)

SORTERS = ("iblsorter", "pykilosort")  # spike-sorting sub-collections, newest first; then alf/<probe>
TRIALS_REQUIRED = (
    "intervals_0",
    "intervals_1",
    "stimOn_times",
    "firstMovement_times",
    "feedback_times",
    "choice",
    "feedbackType",
    "probabilityLeft",
)  # columns that must exist and hold at least one value (NaN rows are kept; training drops them)
_PROBE = re.compile(r"^alf/([^/]+)(?:/([^/]+))?$")
_NOT_A_CACHE_FIX = "run `neds-rt simulate --out FOLDER` to make one, or point at an IBL ONE cache folder"


def open_one(cache_dir: Path | None = None, base_url: str | None = None, **kw: Any) -> One:
    """A ONE instance: local on ``cache_dir`` when no ``base_url`` is given, else online.

    Local: ``One(cache_dir=cache_dir)`` on a folder holding ``sessions.pqt`` and ``datasets.pqt``.
    Online (not used by tests; needs network and IBL credentials): ``ONE(base_url=base_url,
    cache_dir=cache_dir, **kw)``, e.g. ``open_one(base_url="https://openalyx.internationalbrainlab.org",
    password="international", silent=True)``; datasets are downloaded into ``cache_dir`` on first load.
    """
    if base_url is not None:
        from one.api import ONE

        if cache_dir is not None:
            kw["cache_dir"] = cache_dir
        return ONE(base_url=base_url, **kw)
    if cache_dir is None:
        raise invalid(
            "cache_dir",
            "is required without base_url (ONE would otherwise try to go online)",
            fix="pass the ONE cache folder",
            kind=DataError,
        )
    _check_cache_folder(Path(cache_dir))
    from one.api import One

    try:
        with _quiet_one():
            one = One(cache_dir=Path(cache_dir), mode="local", **kw)
    except Exception as err:
        raise invalid(
            f"ONE cache {cache_dir}",
            "cannot be opened",
            f"{type(err).__name__}: {err}",
            _NOT_A_CACHE_FIX,
            kind=DataError,
        ) from err
    _log.debug("opened ONE cache %s", cache_dir)
    return one


def list_probes(one: One, eid: str | uuid.UUID) -> list[str]:
    """Probe names (``probe00``, ``probe01``, ...) with a spike-sorting collection, sorted."""
    return sorted(_probe_collections(one, str(eid)))


def load_session(
    one: One, eid: str | uuid.UUID, probe: str | None = None, check_hash: bool = False
) -> Session:
    """Load spikes, units (with Beryl regions), trials, wheel and camera motion energy of one insertion.

    ``probe`` defaults to the first probe of :func:`list_probes`. Spikes are sorted by time and their
    cluster ids mapped to rows of ``units``. Trials with NaN are kept (``training.data`` drops them);
    only a required column that is missing or entirely NaN is an error. The left camera is required, the
    right one is optional. ``check_hash`` re-hashes every file against the table's md5 (slow on big
    files; file sizes are always checked).
    """
    eid = str(eid)
    details = _session_details(one, eid)
    collections = _probe_collections(one, eid)
    if not collections:
        raise invalid(
            f"session {eid}",
            "has no spike sorting (no alf/<probe>[/pykilosort|/iblsorter] collection)",
            fix="pick a session with ephys, e.g. one.search(datasets='spikes.times.npy')",
            kind=DataError,
        )
    probe = probe or sorted(collections)[0]
    if probe not in collections:
        raise invalid(
            f"session {eid} probe",
            f"not found; the session has {sorted(collections)}",
            probe,
            "pass one of those probes",
            kind=DataError,
        )
    collection = collections[probe]
    loader = _Loader(one, eid, check_hash)

    spike_times, spike_rows, units = _load_spikes_and_units(loader, collection)
    trials = _load_trials(loader)
    wheel_times, wheel_position = _load_wheel(loader)
    motion_energy = _load_motion_energy(loader)
    meta: dict[str, object] = {
        "subject": details.get("subject"),
        "lab": details.get("lab"),
        "date": str(details.get("date") or str(details.get("start_time", ""))[:10]),
        "number": int(details.get("number", 0)),
        "collection": collection,
        "session_path": str(loader.session_path()),
    }
    session = Session(
        eid=eid,
        probe=probe,
        spike_times=spike_times,
        spike_units=spike_rows,
        units=units,
        trials=trials,
        wheel_times=wheel_times,
        wheel_position=wheel_position,
        motion_energy=motion_energy,
        meta=meta,
    )
    _log.info("loaded %s", session.summary())
    return session


# --- ONE access --------------------------------------------------------------------------------------


@contextmanager
def _quiet_one() -> Iterator[None]:
    """ONE 3.6 calls pandas APIs that pandas 3 deprecates; hide those deprecations, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"one(\.|$)")
        yield


def _check_cache_folder(folder: Path) -> None:
    """A ONE cache folder: exists and holds both cache tables, each with ONE's ``date_created`` stamp."""
    import json

    import pyarrow.parquet as pq

    if not folder.is_dir():
        raise invalid(f"ONE cache {folder}", "folder does not exist", fix=_NOT_A_CACHE_FIX, kind=DataError)
    for name in ("sessions.pqt", "datasets.pqt"):
        table = folder / name
        if not table.is_file():
            raise invalid(
                f"ONE cache {folder}",
                f"is not a ONE cache: {name} is missing",
                fix=_NOT_A_CACHE_FIX,
                kind=DataError,
            )
        try:
            raw = (pq.read_schema(table).metadata or {}).get(b"one_metadata", b"{}")
            meta = json.loads(raw)
        except Exception as err:
            raise invalid(
                f"ONE cache {folder}",
                f"{name} cannot be read",
                f"{type(err).__name__}: {err}",
                _NOT_A_CACHE_FIX,
                kind=DataError,
            ) from err
        if not isinstance(meta, dict) or "date_created" not in meta:
            raise invalid(
                f"ONE cache {folder}",
                f"{name} lacks ONE's date_created metadata (ONE would skip it)",
                fix=_NOT_A_CACHE_FIX,
                kind=DataError,
            )


def _session_details(one: One, eid: str) -> dict[str, Any]:
    from one.alf.exceptions import ALFError

    try:
        with _quiet_one():
            details = one.get_details(eid)
    except (ALFError, KeyError, ValueError) as err:
        raise invalid(
            "session",
            f"eid not found in the ONE cache {one.cache_dir}",
            eid,
            "list sessions with one.search() or `neds-rt simulate`",
            kind=DataError,
        ) from err
    return dict(details)


def _probe_collections(one: One, eid: str) -> dict[str, str]:
    """probe name -> its spike-sorting collection (iblsorter, else pykilosort, else alf/<probe>)."""
    from one.alf.exceptions import ALFError

    try:
        with _quiet_one():
            found: Sequence[str] = one.list_collections(eid, collection="alf/probe*")
    except ALFError as err:
        raise invalid(
            "session",
            "eid not found in the ONE cache",
            eid,
            "list sessions with one.search()",
            kind=DataError,
        ) from err
    by_probe: dict[str, set[str]] = {}
    for col in found:
        match = _PROBE.match(col)
        if match:
            by_probe.setdefault(match.group(1), set()).add(match.group(2) or "")
    chosen: dict[str, str] = {}
    for probe, subs in by_probe.items():
        sub = next((s for s in SORTERS if s in subs), "" if "" in subs else None)
        if sub is not None:
            chosen[probe] = f"alf/{probe}/{sub}" if sub else f"alf/{probe}"
    return chosen


class _Loader:
    """``one.load_object`` with required attributes, turning ONE's errors into DataErrors that name the
    session and the dataset."""

    def __init__(self, one: One, eid: str, check_hash: bool) -> None:
        self.one, self.eid, self.check_hash = one, eid, check_hash

    def session_path(self) -> Path | None:
        with _quiet_one():
            return self.one.eid2path(self.eid)

    def load(
        self, obj: str, collection: str, attributes: Sequence[str] | None, required: Sequence[str]
    ) -> dict[str, Any] | None:
        """Attributes of ``collection/obj`` (all when ``attributes`` is None); None when the whole object is
        absent and nothing is required."""
        from one.alf.exceptions import ALFError

        kw: dict[str, Any] = {} if attributes is None else {"attribute": list(attributes)}
        try:
            with _quiet_one():
                bunch = self.one.load_object(
                    self.eid, obj, collection=collection, check_hash=self.check_hash, **kw
                )
        except ALFError as err:
            if not required:
                return None
            raise self.missing(collection, obj, required[0], str(err).splitlines()[0]) from err
        except FileNotFoundError as err:
            if not required:
                return None
            raise self.missing(collection, obj, required[0], str(err)) from err
        got = dict(bunch)
        for attr in required:
            if attr not in got:
                raise self.missing(collection, obj, attr, "not on disk or not in the cache tables")
        return got

    def missing(self, collection: str, obj: str, attr: str, why: str) -> DataError:
        return invalid(
            self.dataset(collection, obj, attr),
            f"missing ({why})",
            fix="re-download the session or re-run `neds-rt simulate` for it",
            kind=DataError,
        )

    def dataset(self, collection: str, obj: str, attr: str) -> str:
        return f"session {self.eid}, dataset {collection}/{obj}.{attr}"

    def bad(self, collection: str, obj: str, attr: str, rule: str, value: object = None) -> DataError:
        return invalid(
            self.dataset(collection, obj, attr),
            rule,
            value,
            "the dataset is corrupt; re-download the session or re-run `neds-rt simulate`",
            kind=DataError,
        )


# --- the pieces of a Session -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _brain_regions() -> Any:
    """iblatlas' region tables (ship with the package, work offline); built once, ~1 s."""
    from iblatlas.regions import BrainRegions

    return BrainRegions()


def _vector(
    loader: _Loader, collection: str, obj: str, attr: str, value: Any, real: bool = False
) -> np.ndarray:
    """A dataset as a 1-D array (float64 when ``real``); anything else is a DataError."""
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise loader.bad(collection, obj, attr, "must be 1-D", arr.shape)
    if real:
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise loader.bad(collection, obj, attr, "must hold numbers", arr.dtype)
        arr = arr.astype(np.float64, copy=False)
    return arr


def _load_spikes_and_units(loader: _Loader, collection: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    spikes = loader.load("spikes", collection, ["times", "clusters"], ["times", "clusters"])
    clusters = loader.load(
        "clusters", collection, ["channels", "depths", "metrics", "uuids"], ["channels", "metrics"]
    )
    assert spikes is not None and clusters is not None
    times = _vector(loader, collection, "spikes", "times", spikes["times"], real=True)  # (S,) s
    cl = np.asarray(spikes["clusters"])  # (S,) cluster id per spike
    if cl.ndim != 1 or cl.shape != times.shape:
        raise loader.bad(
            collection,
            "spikes",
            "clusters",
            f"must be 1-D with one entry per spike ({times.size} times)",
            cl.shape,
        )
    if cl.size and not np.issubdtype(cl.dtype, np.integer):
        if not np.all(np.isfinite(cl)) or not np.all(cl == np.round(cl)):
            raise loader.bad(collection, "spikes", "clusters", "must hold integer cluster ids", cl.dtype)
        cl = cl.astype(np.int64)
    if times.size == 0:
        raise loader.bad(collection, "spikes", "times", "holds no spikes")
    if not np.all(np.isfinite(times)):
        raise loader.bad(
            collection, "spikes", "times", "must be finite", f"{int(np.sum(~np.isfinite(times)))} NaN/inf"
        )
    if not np.all(times[1:] >= times[:-1]):
        _log.info("session %s %s: spikes not sorted by time; sorting", loader.eid, collection)
        order = np.argsort(times, kind="stable")
        times, cl = times[order], cl[order]

    units = _units_table(loader, collection, clusters)
    ids = units["cluster_id"].to_numpy()
    max_id = int(cl.max())
    if int(cl.min()) < 0 or max_id > int(ids.max()):
        raise loader.bad(
            collection,
            "spikes",
            "clusters",
            f"index past the cluster table ({len(units)} clusters, largest cluster_id {int(ids.max())})",
            f"max cluster id {max_id}, min {int(cl.min())}",
        )
    lookup = np.full(int(ids.max()) + 1, -1, dtype=np.int32)  # cluster id -> units row
    lookup[ids] = np.arange(len(units), dtype=np.int32)
    rows = lookup[cl]  # (S,) int32 row of units per spike
    if np.any(rows < 0):
        absent = np.unique(cl[rows < 0])
        raise loader.bad(
            collection,
            "spikes",
            "clusters",
            "has cluster ids that are not in clusters.metrics cluster_id",
            absent[:10].tolist(),
        )
    duration = float(times[-1])
    counts = np.bincount(rows, minlength=len(units))  # (N,) spikes per unit
    units["firing_rate"] = counts / duration if duration > 0 else np.zeros(len(units))
    return times, rows, units


def _units_table(loader: _Loader, collection: str, clusters: dict[str, Any]) -> pd.DataFrame:
    """cluster_id, uuid, label, channel, depth, allen_id, region (Beryl); one row per cluster."""
    channels = _vector(loader, collection, "clusters", "channels", clusters["channels"])
    if not np.issubdtype(channels.dtype, np.integer):
        if not np.all(np.isfinite(channels)) or not np.all(channels == np.round(channels)):
            raise loader.bad(
                collection, "clusters", "channels", "must hold integer channel indices", channels.dtype
            )
        channels = channels.astype(np.int64)
    n = channels.size
    if n == 0:
        raise loader.bad(collection, "clusters", "channels", "holds no clusters")
    metrics = clusters["metrics"]
    if not isinstance(metrics, pd.DataFrame) or len(metrics) != n:
        raise loader.bad(
            collection,
            "clusters",
            "metrics",
            f"must be a table with one row per cluster ({n})",
            getattr(metrics, "shape", type(metrics).__name__),
        )
    if "label" not in metrics.columns:
        raise loader.bad(collection, "clusters", "metrics", "needs a 'label' column", list(metrics.columns))
    if "cluster_id" in metrics.columns:
        ids = metrics["cluster_id"].to_numpy()
        if not np.issubdtype(ids.dtype, np.integer) or np.any(ids < 0) or np.unique(ids).size != n:
            raise loader.bad(
                collection,
                "clusters",
                "metrics",
                "cluster_id must be unique non-negative integers",
                ids[:10].tolist(),
            )
    else:
        ids = np.arange(n)
    depths = clusters.get("depths")
    depth = (
        _vector(loader, collection, "clusters", "depths", depths, real=True)
        if depths is not None
        else np.full(n, np.nan)
    )
    if depth.size != n:
        raise loader.bad(
            collection, "clusters", "depths", f"must have one entry per cluster ({n})", depth.size
        )
    uuids = clusters.get("uuids")
    if uuids is None:
        uuid_col = [""] * n
    else:
        values = uuids.iloc[:, 0] if isinstance(uuids, pd.DataFrame) else pd.Series(uuids)
        if len(values) != n:
            raise loader.bad(
                collection, "clusters", "uuids", f"must have one entry per cluster ({n})", len(values)
            )
        uuid_col = values.astype(str).tolist()
    allen_id, region = _regions(loader, collection, channels)
    return pd.DataFrame(
        {
            "cluster_id": ids.astype(np.int64),
            "uuid": uuid_col,
            "label": metrics["label"].to_numpy(dtype=np.float64),
            "channel": channels.astype(np.int64),
            "depth": depth,
            "allen_id": allen_id,
            "region": region,
        }
    )


def _regions(loader: _Loader, collection: str, cluster_channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) Allen id and (N,) Beryl acronym per cluster, through the channel it sits on."""
    n = cluster_channels.size
    chans = loader.load("channels", collection, ["brainLocationIds_ccf_2017"], [])
    if chans is None or "brainLocationIds_ccf_2017" not in chans:
        _log.warning(
            "session %s %s: no channels.brainLocationIds_ccf_2017 (no histology); regions are 'void'",
            loader.eid,
            collection,
        )
        return np.zeros(n, dtype=np.int64), np.full(n, "void", dtype=object)
    ids = _vector(
        loader, collection, "channels", "brainLocationIds_ccf_2017", chans["brainLocationIds_ccf_2017"]
    )
    if not np.issubdtype(ids.dtype, np.integer):
        raise loader.bad(
            collection, "channels", "brainLocationIds_ccf_2017", "must hold integer Allen ids", ids.dtype
        )
    if int(cluster_channels.min()) < 0 or int(cluster_channels.max()) >= ids.size:
        raise loader.bad(
            collection,
            "clusters",
            "channels",
            f"index past the channels table ({ids.size} channels)",
            int(cluster_channels.max()),
        )
    allen = ids[cluster_channels].astype(np.int64)  # (N,) Allen id per cluster
    br = _brain_regions()
    known = np.isin(np.abs(allen), br.id)
    if not known.all():
        raise loader.bad(
            collection,
            "channels",
            "brainLocationIds_ccf_2017",
            "holds ids that are not Allen CCF 2017 regions",
            np.unique(allen[~known])[:10].tolist(),
        )
    region = np.asarray(br.id2acronym(allen, mapping="Beryl"), dtype=object)  # (N,) Beryl acronym
    return allen, region


def _load_trials(loader: _Loader) -> pd.DataFrame:
    trials = loader.load("trials", "alf", None, [])
    if not trials:
        raise loader.missing("alf", "trials", "table", "no trials datasets on disk or in the cache tables")
    try:
        from one.alf.io import AlfBunch

        frame = AlfBunch(trials).to_df()
    except (ValueError, TypeError) as err:
        sizes = {k: np.shape(v) for k, v in trials.items()}
        raise loader.bad("alf", "trials", "*", "attributes must have one row per trial", sizes) from err
    first = [c for c in ("intervals_0", "intervals_1") if c in frame.columns]
    frame = frame[first + [c for c in frame.columns if c not in first]].reset_index(drop=True)
    if frame.empty:
        raise loader.bad("alf", "trials", "table", "holds no trials")
    missing = [c for c in TRIALS_REQUIRED if c not in frame.columns]
    if missing:
        raise loader.bad("alf", "trials", "table", f"lacks required columns {missing}", sorted(frame.columns))
    all_nan = [c for c in TRIALS_REQUIRED if frame[c].isna().all()]
    if all_nan:
        raise loader.bad(
            "alf", "trials", "table", f"required columns are entirely NaN ({len(frame)} rows)", all_nan
        )
    n_nan = int(frame[list(TRIALS_REQUIRED)].isna().any(axis=1).sum())
    if n_nan:
        _log.debug("session %s: %d of %d trials have NaN in required columns", loader.eid, n_nan, len(frame))
    return frame


def _load_wheel(loader: _Loader) -> tuple[np.ndarray, np.ndarray]:
    wheel = loader.load("wheel", "alf", ["position", "timestamps"], ["position", "timestamps"])
    assert wheel is not None
    t = _vector(loader, "alf", "wheel", "timestamps", wheel["timestamps"], real=True)  # (W,) s
    pos = _vector(loader, "alf", "wheel", "position", wheel["position"], real=True)  # (W,) rad
    if t.size != pos.size:
        raise loader.bad("alf", "wheel", "position", f"must match wheel.timestamps ({t.size})", pos.size)
    return t, pos


def _load_motion_energy(loader: _Loader) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """camera -> ((F,) frame times s, (F,) ROI motion energy); left required, right optional."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for side, required in (("left", True), ("right", False)):
        obj = f"{side}Camera"
        attrs = ["times", "ROIMotionEnergy"]
        cam = loader.load(obj, "alf", attrs, attrs if required else [])
        if cam is None or any(a not in cam for a in attrs):
            _log.info("session %s: no %s camera motion energy; skipped", loader.eid, side)
            continue
        t = _vector(loader, "alf", obj, "times", cam["times"], real=True)
        me = _vector(loader, "alf", obj, "ROIMotionEnergy", cam["ROIMotionEnergy"], real=True)
        if t.size != me.size:
            raise loader.bad(
                "alf", obj, "ROIMotionEnergy", f"must match {obj}.times ({t.size} frames)", me.size
            )
        out[side] = (t, me)
    return out
