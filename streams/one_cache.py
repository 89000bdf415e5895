"""Write sessions into a real ONE cache: ALF files on disk plus ``sessions.pqt`` / ``datasets.pqt``.

ONE's own ``make_parquet_db`` draws new ids on every rebuild, so the tables are built here with stable ids:
the session id is the simulator's eid and each dataset id is ``uuid3(eid, relative path)``. Writing again
into the same folder merges the tables: rows of the sessions being written are replaced, the others kept.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import re
import uuid
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from neds_rt.errors import DataError, invalid
from streams.sim_files import SessionFiles

_log = logging.getLogger(__name__)

SESSIONS_TABLE = "sessions.pqt"
DATASETS_TABLE = "datasets.pqt"
_EXTENSIONS = (".npy", ".pqt", ".csv")
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")  # lab and subject folder names


def session_folder(root: Path, files: SessionFiles) -> Path:
    """``<root>/<lab>/Subjects/<subject>/<YYYY-MM-DD>/<NNN>``, the only shape ONE finds."""
    return Path(root) / files.lab / "Subjects" / files.subject / files.date / f"{files.number:03d}"


def write_one_cache(
    root: Path, sessions: Sequence[SessionFiles], origin: str = "neds-rt simulate"
) -> list[str]:
    """Write each session's datasets under ``root`` and merge them into the cache tables; return the eids.

    The result opens with ``one.api.One(cache_dir=root)``. Sessions already in the tables (same eid) are
    replaced, all others are kept, so the cache can be written in batches.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise invalid("cache folder", "must be a folder", str(root), "pass a folder path", kind=DataError)
    seen: set[str] = set()
    for files in sessions:
        _check_session(files)
        if files.eid in seen:
            raise invalid(
                "sessions",
                "each eid may appear once",
                files.eid,
                "give every session its own eid",
                kind=DataError,
            )
        seen.add(files.eid)
    root.mkdir(parents=True, exist_ok=True)

    ses_rows: list[dict[str, object]] = []
    dset_rows: list[dict[str, object]] = []
    for files in sessions:
        folder = session_folder(root, files)
        ses_rows.append(_session_row(files))
        for rel_path in sorted(files.datasets):
            path = folder / rel_path
            _write_dataset(path, files.datasets[rel_path])
            dset_rows.append(_dataset_row(files.eid, rel_path, path))
        _log.debug("wrote %d datasets of session %s to %s", len(files.datasets), files.eid, folder)

    new_sessions = _sessions_frame(ses_rows)
    new_datasets = _datasets_frame(dset_rows)
    old_sessions, old_datasets = _read_existing(root)
    if old_sessions is not None and old_datasets is not None:
        keep_ses = ~old_sessions.index.isin(new_sessions.index)
        keep_dsets = ~old_datasets.index.get_level_values("eid").isin(new_sessions.index)
        new_sessions = pd.concat([old_sessions[keep_ses], new_sessions])
        new_datasets = pd.concat([old_datasets[keep_dsets], new_datasets])
    _save_tables(root, new_sessions.sort_index(), new_datasets.sort_index(), origin)
    _log.info("ONE cache %s: %d sessions, %d datasets", root, len(new_sessions), len(new_datasets))
    return [files.eid for files in sessions]


def _check_session(files: SessionFiles) -> None:
    """Refuse ids ONE cannot use, folder names it cannot find and datasets it cannot read."""
    what = f"session {files.eid!r}"
    try:
        version = uuid.UUID(files.eid).version
    except (ValueError, TypeError, AttributeError):
        version = None
    if version not in (3, 4):
        raise invalid(
            f"{what} eid",
            "must be a uuid3 or uuid4 string (ONE's eid2path fails on other versions)",
            files.eid,
            "use str(uuid.uuid4())",
            kind=DataError,
        )
    for name, value in (("lab", files.lab), ("subject", files.subject)):
        if not isinstance(value, str) or not _NAME.match(value):
            raise invalid(
                f"{what} {name}",
                "must be letters, digits, '_' or '-'",
                value,
                "rename it",
                kind=DataError,
            )
    try:
        datetime.date.fromisoformat(files.date)
    except (ValueError, TypeError):
        raise invalid(
            f"{what} date",
            "must be 'YYYY-MM-DD'",
            files.date,
            "pass an ISO date",
            kind=DataError,
        ) from None
    if not isinstance(files.number, int | np.integer) or not 0 <= int(files.number) <= 999:
        raise invalid(f"{what} number", "must be an int in 0..999", files.number, kind=DataError)
    if not files.datasets:
        raise invalid(f"{what} datasets", "must not be empty", kind=DataError)
    for rel_path, content in files.datasets.items():
        _check_dataset(what, rel_path, content)


def _check_dataset(what: str, rel_path: str, content: object) -> None:
    from one.alf.path import rel_path_parts

    pure = PurePosixPath(rel_path)
    if pure.is_absolute() or ".." in pure.parts or "\\" in rel_path:
        raise invalid(
            f"{what} dataset path",
            "must be relative to the session folder, '/'-separated, without '..'",
            rel_path,
            kind=DataError,
        )
    if pure.suffix not in _EXTENSIONS:
        raise invalid(
            f"{what} dataset {rel_path}",
            f"extension must be one of {_EXTENSIONS}",
            pure.suffix,
            kind=DataError,
        )
    try:
        rel_path_parts(rel_path, assert_valid=True)
    except ValueError:
        raise invalid(
            f"{what} dataset {rel_path}",
            "is not a valid ALF path (collection/[_namespace_]object.attribute.ext)",
            rel_path,
            "ONE ignores such files; rename it",
            kind=DataError,
        ) from None
    wants_frame = pure.suffix in (".pqt", ".csv")
    if wants_frame and not isinstance(content, pd.DataFrame):
        raise invalid(
            f"{what} dataset {rel_path}",
            "a .pqt/.csv dataset must be a pandas DataFrame",
            type(content).__name__,
            kind=DataError,
        )
    if not wants_frame and not isinstance(content, np.ndarray):
        raise invalid(
            f"{what} dataset {rel_path}",
            "a .npy dataset must be a numpy array",
            type(content).__name__,
            kind=DataError,
        )


def _write_dataset(path: Path, content: np.ndarray | pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        assert isinstance(content, np.ndarray)
        np.save(path, content, allow_pickle=False)
    elif path.suffix == ".pqt":
        assert isinstance(content, pd.DataFrame)
        content.to_parquet(path, index=False)
    else:
        assert isinstance(content, pd.DataFrame)
        content.to_csv(path, index=False)


def _session_row(files: SessionFiles) -> dict[str, object]:
    return {
        "id": files.eid,
        "lab": files.lab,
        "subject": files.subject,
        "date": datetime.date.fromisoformat(files.date),
        "number": int(files.number),
        "task_protocol": "",
        "projects": "",
    }


def _md5(path: Path) -> str:
    """Hex md5 of a file, as ONE's ``iblutil.io.hashfile.md5`` (which allocates a 256 MB buffer per call)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dataset_row(eid: str, rel_path: str, path: Path) -> dict[str, object]:
    return {
        "eid": eid,
        "id": str(uuid.uuid3(uuid.UUID(eid), rel_path)),  # stable for (eid, path); never uuid5
        "rel_path": rel_path,
        "file_size": path.stat().st_size,
        "hash": _md5(path),
        "exists": True,
        "qc": "NOT_SET",
        "default_revision": True,
    }


def _sessions_frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    from one.alf.cache import SESSIONS_COLUMNS

    frame = pd.DataFrame(rows, columns=list(SESSIONS_COLUMNS))
    frame = frame.astype({k: v for k, v in SESSIONS_COLUMNS.items() if k != "date"})
    return frame.astype({"id": object, "lab": object, "subject": object}).set_index("id")


def _datasets_frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    from one.alf.cache import DATASETS_COLUMNS

    columns = [*DATASETS_COLUMNS, "default_revision"]
    frame = pd.DataFrame(rows, columns=columns).astype({**DATASETS_COLUMNS, "default_revision": bool})
    return frame.set_index(["eid", "id"])


def _read_existing(root: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The tables already in ``root`` (as written by this module), or ``(None, None)``."""
    from iblutil.io import parquet
    from one.alf.cache import DATASETS_COLUMNS, SESSIONS_COLUMNS

    ses_path, dset_path = root / SESSIONS_TABLE, root / DATASETS_TABLE
    if not ses_path.exists() and not dset_path.exists():
        return None, None
    if not (ses_path.exists() and dset_path.exists()):
        raise invalid(
            f"ONE cache {root}",
            "has only one of sessions.pqt / datasets.pqt",
            fix="delete the folder or write into a new one",
            kind=DataError,
        )
    try:
        sessions, _ = parquet.load(ses_path)
        datasets, _ = parquet.load(dset_path)
    except Exception as err:
        raise invalid(
            f"ONE cache {root}",
            "existing cache tables cannot be read",
            str(err),
            "delete the folder or write into a new one",
            kind=DataError,
        ) from err
    if isinstance(sessions.index, pd.RangeIndex):
        sessions = sessions.set_index("id")
    if isinstance(datasets.index, pd.RangeIndex):
        datasets = datasets.set_index(["eid", "id"])
    missing = (set(SESSIONS_COLUMNS) - {"id"} - set(sessions.columns)) | (
        set(DATASETS_COLUMNS) - {"eid", "id"} - set(datasets.columns)
    )
    if missing:
        raise invalid(
            f"ONE cache {root}",
            "existing tables lack columns",
            sorted(missing),
            "write into a new folder",
            kind=DataError,
        )
    if "default_revision" not in datasets.columns:
        datasets["default_revision"] = True
    sessions.index = sessions.index.astype(object)
    datasets.index = datasets.index.set_levels([lvl.astype(object) for lvl in datasets.index.levels])
    return sessions, datasets


def _save_tables(root: Path, sessions: pd.DataFrame, datasets: pd.DataFrame, origin: str) -> None:
    from iblutil.io import parquet
    from one.alf.cache import DATASETS_COLUMNS, QC_TYPE

    datasets = datasets.astype({"file_size": DATASETS_COLUMNS["file_size"], "exists": bool, "qc": QC_TYPE})
    datasets["default_revision"] = datasets["default_revision"].astype(bool)
    meta = {
        "date_created": datetime.datetime.now().isoformat(sep=" ", timespec="minutes"),
        "origin": origin,
    }
    parquet.save(root / SESSIONS_TABLE, sessions, meta)
    parquet.save(root / DATASETS_TABLE, datasets, meta)
