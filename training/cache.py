"""On-disk cache of a session's binned arrays (one ``.npz`` per session, probe and config; no pickle).

The key hashes the session id, probe, every :class:`DataConfig` field, :data:`CACHE_VERSION` and the
session's dataset list from the ONE cache (relative path, file size, md5 where known), so a changed config,
a new code version or re-extracted data all miss the cache. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Final

import numpy as np

from neds_rt.errors import DataError, invalid
from streams.session import Session
from training.arrays import ContinuousArrays, Normalisation, TrialArrays
from training.data import DataConfig, build_arrays

log = logging.getLogger(__name__)

CACHE_VERSION: Final = 1  # bump when the arrays' content or layout changes
_NORM_FIELDS: Final = ("wheel_min", "wheel_max", "whisker_min", "whisker_max")
_TRIAL_ARRAYS: Final = ("unit_ids", "regions", "spikes", "wheel", "whisker", "choice", "block",
                        "trial_index", "window_start", "split")
_CONT_ARRAYS: Final = ("spikes", "wheel", "whisker", "choice", "block", "split")


def _dataset_fingerprint(one: Any, eid: str, probe: str | None) -> list[list[object]]:
    """[rel_path, file_size, hash] of the session's datasets in the ONE cache ([] when unavailable)."""
    try:
        table = one.list_datasets(eid, details=True)
    except Exception as err:  # a cache without details still works; the key is only less specific
        log.warning("session %s: cannot list datasets for the cache key (%s)", eid, err)
        return []
    rows: list[list[object]] = []
    for _, rec in table.iterrows():
        rel = str(rec.get("rel_path", ""))
        if probe is not None and "/probe" in rel and f"/{probe}/" not in rel:
            continue  # other probes' files do not change this probe's arrays
        size = rec.get("file_size")
        digest = rec.get("hash")
        rows.append([rel, None if size is None or size != size else int(size),
                     None if not isinstance(digest, str) or not digest else digest])
    return sorted(rows, key=lambda r: str(r[0]))


def cache_key(eid: str, probe: str | None, cfg: DataConfig, datasets: list[list[object]]) -> str:
    """Hex sha256 of everything the arrays depend on."""
    blob = json.dumps({"version": CACHE_VERSION, "eid": eid, "probe": probe, "config": cfg.as_dict(),
                       "datasets": datasets}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


ARRAY_CACHE_DIR = "neds_rt_arrays"  # default home of binned arrays, inside the ONE cache they come from


def cache_path(cache_root: Path, eid: str, probe: str | None, key: str) -> Path:
    return Path(cache_root) / f"{eid}_{probe or 'probe'}_{key[:16]}.npz"


def save_arrays(path: Path, trials: TrialArrays, cont: ContinuousArrays) -> None:
    """Write both array sets to ``path`` (npz, strings as unicode arrays, meta as JSON text)."""
    payload: dict[str, np.ndarray] = {
        "eid": np.array(trials.eid), "probe": np.array(trials.probe),
        "norm": np.array([getattr(trials.norm, f) for f in _NORM_FIELDS], dtype=np.float64),
        "bin_size": np.array([trials.bin_size, cont.bin_size], dtype=np.float64),
        "t0": np.array(cont.t0, dtype=np.float64),
        "meta_json": np.array(json.dumps(trials.meta, default=str)),
    }
    for name in _TRIAL_ARRAYS:
        payload[f"trial_{name}"] = np.asarray(getattr(trials, name))
    for name in _CONT_ARRAYS:
        payload[f"cont_{name}"] = np.asarray(getattr(cont, name))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp.npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **payload)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_arrays(path: Path) -> tuple[TrialArrays, ContinuousArrays]:
    """Read what :func:`save_arrays` wrote (``allow_pickle=False``)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as err:
        raise invalid(f"array cache {path}", "is unreadable", str(err), "delete the file to rebuild it",
                      kind=DataError) from err
    norm = Normalisation(*(float(v) for v in data["norm"]))
    eid, probe = str(data["eid"]), str(data["probe"])
    trial_bin, cont_bin = (float(v) for v in data["bin_size"])
    trials = TrialArrays(
        eid=eid, probe=probe, norm=norm, bin_size=trial_bin, meta=json.loads(str(data["meta_json"])),
        **{name: data[f"trial_{name}"] for name in _TRIAL_ARRAYS},
    )
    cont = ContinuousArrays(
        eid=eid, probe=probe, unit_ids=trials.unit_ids, regions=trials.regions, t0=float(data["t0"]),
        norm=norm, bin_size=cont_bin, **{name: data[f"cont_{name}"] for name in _CONT_ARRAYS},
    )
    return trials, cont


def arrays_for_session(
    session: Session, cfg: DataConfig, cache_root: Path, datasets: list[list[object]] | None = None
) -> tuple[TrialArrays, ContinuousArrays]:
    """Cached :func:`training.data.build_arrays` of an in-memory session (``datasets`` refines the key)."""
    key = cache_key(session.eid, session.probe, cfg, datasets or [])
    path = cache_path(cache_root, session.eid, session.probe, key)
    if path.exists():
        log.info("session %s/%s: arrays from cache %s", session.eid, session.probe, path)
        return read_arrays(path)
    trials, cont = build_arrays(session, cfg)
    save_arrays(path, trials, cont)
    log.info("session %s/%s: arrays cached to %s", session.eid, session.probe, path)
    return trials, cont


def load_arrays(
    one_or_cache_dir: Any,
    eid: str,
    probe: str | None = None,
    cfg: DataConfig | None = None,
    cache_root: Path | str | None = None,
) -> tuple[TrialArrays, ContinuousArrays]:
    """The session's (TrialArrays, ContinuousArrays), from ``cache_root`` when cached, else built and cached.

    ``one_or_cache_dir`` is a ONE instance or the folder of a ONE cache. ``probe=None`` is the loader's
    default probe; the cache file records the probe the loader picked. ``cache_root=None`` keeps the arrays
    beside the data, in ``<ONE cache>/neds_rt_arrays``.
    """
    from streams.load import load_session, open_one

    cfg = cfg or DataConfig()
    cfg.check()
    one = open_one(Path(one_or_cache_dir)) if isinstance(one_or_cache_dir, str | Path) else one_or_cache_dir
    eid = str(eid)
    key = cache_key(eid, probe, cfg, _dataset_fingerprint(one, eid, probe))
    root = Path(one.cache_dir) / ARRAY_CACHE_DIR if cache_root is None else Path(cache_root)
    path = cache_path(root, eid, probe, key)
    if path.exists():
        log.info("session %s/%s: arrays from cache %s", eid, probe, path)
        return read_arrays(path)
    session = load_session(one, eid, probe=probe)
    trials, cont = build_arrays(session, cfg)
    save_arrays(path, trials, cont)
    log.info("session %s/%s: arrays cached to %s", eid, session.probe, path)
    return trials, cont
