"""Decode log: every decode appended to a CSV file that survives SIGKILL.

Format (RFC 4180 CSV, one header row, then one row per decode)::

    bin,bin_end,t_bin_end,t_closed,t_infer_start,t_infer_end,t_published,flags,<label 1>,...,<label C>

``bin_end`` is in stream seconds; ``t_*`` are host monotonic seconds (see :mod:`neds_rt.wire`); values are
float32 written with 9 significant digits (exact round trip), NaN as ``nan``.

The serve thread only appends a tuple to a deque (:meth:`DecodeLogWriter.append`); a writer thread formats
and ``os.write``s the rows every ``flush_interval_s`` (0.25 s) and ``fsync``s at most every
``fsync_interval_s`` (1 s). A SIGKILL leaves in the file every row appended more than ~0.3 s before it (the
page cache keeps what was written); only a crash of the whole machine can lose up to the last fsync interval.
:func:`read_decode_log` drops a truncated last line.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from neds_rt.errors import ConfigError, DataError, invalid
from neds_rt.wire import STAMP_NAMES

log = logging.getLogger(__name__)

FIXED_COLUMNS: Final = ("bin", "bin_end", *(f"t_{s}" for s in STAMP_NAMES), "flags")

_Record = tuple[int, float, tuple[float, ...], int, np.ndarray]


@dataclass(frozen=True, slots=True)
class DecodeLog:
    """A decode log read back."""

    labels: tuple[str, ...]
    bins: np.ndarray  # (R,) int64 bin index
    bin_end: np.ndarray  # (R,) float64 bin end, stream seconds
    stamps: np.ndarray  # (R, 5) float64 host monotonic seconds, columns STAMP_NAMES
    flags: np.ndarray  # (R,) int64 flag bit mask
    values: np.ndarray  # (R, C) float32 decoded values, columns ``labels``
    truncated: bool  # the file ended in a partial line (dropped)

    def select(self, rows: np.ndarray) -> DecodeLog:
        """The records where the (R,) bool mask ``rows`` is True."""
        return DecodeLog(self.labels, self.bins[rows], self.bin_end[rows], self.stamps[rows],
                         self.flags[rows], self.values[rows], self.truncated)


def _header_line(labels: Sequence[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([*FIXED_COLUMNS, *labels])
    return buf.getvalue().encode()


def _format(rec: _Record) -> str:
    b, bin_end, stamps, flags, values = rec
    vals = ",".join([f"{x:.9g}" for x in values.tolist()])
    st = ",".join([repr(s) for s in stamps])
    return f"{b},{bin_end!r},{st},{flags},{vals}\n"


class DecodeLogWriter:
    """Append-only decode log, written by a background thread (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        labels: Sequence[str],
        overwrite: bool = False,
        flush_interval_s: float = 0.25,
        fsync_interval_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.labels = tuple(str(x) for x in labels)
        clash = [x for x in self.labels if x in FIXED_COLUMNS]
        if clash or len(set(self.labels)) != len(self.labels) or not self.labels:
            raise invalid(
                "decode log labels",
                f"must be non-empty, unique and not one of {FIXED_COLUMNS}",
                list(self.labels),
                "rename the output channels",
                kind=ConfigError,
            )
        if self.path.exists() and self.path.stat().st_size > 0 and not overwrite:
            raise invalid(
                "--log",
                "file exists and is not empty",
                str(self.path),
                "pass a new path or delete the old log",
                kind=ConfigError,
            )
        self.flush_interval_s = flush_interval_s
        self.fsync_interval_s = fsync_interval_s
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._write_all(_header_line(self.labels))
        os.fsync(self._fd)
        self._last_fsync = time.monotonic()
        self._queue: deque[_Record] = deque()
        self._stop = threading.Event()
        self.written = 0  # rows written so far
        self.dropped = 0  # rows refused after a write error
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="decode-log", daemon=True)
        self._thread.start()

    def append(
        self,
        bin_index: int,
        bin_end: float,
        stamps: Mapping[str, float] | Sequence[float],
        flags: int,
        values: npt.ArrayLike,
    ) -> None:
        """Queue one decode (cheap: no formatting or I/O on the caller's thread); values are copied."""
        st = (
            tuple(float(stamps[k]) for k in STAMP_NAMES)
            if isinstance(stamps, Mapping)
            else tuple(float(s) for s in stamps)
        )
        v = np.array(values, dtype=np.float32, copy=True).reshape(-1)  # (C,) float32
        if len(st) != len(STAMP_NAMES) or v.size != len(self.labels):
            raise invalid(
                "decode log record",
                f"needs {len(STAMP_NAMES)} stamps and {len(self.labels)} values",
                (len(st), v.size),
                kind=DataError,
            )
        if self.error is not None:  # the writer died (disk full?): don't grow the queue forever
            self.dropped += 1
            return
        self._queue.append((int(bin_index), float(bin_end), st, int(flags), v))

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _drain(self) -> None:
        q = self._queue
        lines = []
        while q:
            lines.append(_format(q.popleft()))
        if lines:
            self._write_all("".join(lines).encode())
            self.written += len(lines)
        now = time.monotonic()
        if now - self._last_fsync >= self.fsync_interval_s:
            os.fsync(self._fd)
            self._last_fsync = now

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.flush_interval_s):
                self._drain()
        except BaseException as e:  # surfaced by close(); the serve loop must not die on a full disk
            self.error = e
            log.error("decode log %s: writer failed: %s", self.path, e)

    def close(self) -> None:
        """Stop the writer, write everything queued, fsync and close."""
        if self._fd < 0:
            return
        self._stop.set()
        self._thread.join()
        try:
            if self.error is None:
                self._drain()
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1
        if self.error is not None:
            raise invalid(
                "decode log", "writing failed", str(self.error), f"check {self.path}", kind=DataError
            )

    def __enter__(self) -> DecodeLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_decode_log(path: str | Path) -> DecodeLog:
    """Read a decode log; a partial last line (the writer was killed mid-write) is dropped."""
    p = Path(path)
    raw = p.read_bytes()
    end = raw.rfind(b"\n")
    truncated = end != len(raw) - 1
    lines = raw[: end + 1].decode("utf-8").splitlines() if end >= 0 else []
    if not lines:
        raise invalid(
            str(p),
            "is not a decode log: no complete header line",
            raw[:80],
            "pass the file serve wrote with --log",
            kind=DataError,
        )
    header = next(csv.reader([lines[0]]))
    if tuple(header[: len(FIXED_COLUMNS)]) != FIXED_COLUMNS or len(header) == len(FIXED_COLUMNS):
        raise invalid(
            str(p),
            f"header must start with {','.join(FIXED_COLUMNS)} and name the outputs",
            lines[0][:120],
            kind=DataError,
        )
    labels = tuple(header[len(FIXED_COLUMNS) :])
    n_cols = len(header)
    rows = lines[1:]
    bins = np.empty(len(rows), np.int64)  # (R,)
    bin_end = np.empty(len(rows), np.float64)  # (R,)
    stamps = np.empty((len(rows), len(STAMP_NAMES)), np.float64)  # (R, 5)
    flags = np.empty(len(rows), np.int64)  # (R,)
    values = np.empty((len(rows), len(labels)), np.float32)  # (R, C)
    for i, line in enumerate(rows):
        parts = line.split(",")
        try:
            if len(parts) != n_cols:
                raise ValueError(f"{len(parts)} fields, expected {n_cols}")
            bins[i] = int(parts[0])
            bin_end[i] = float(parts[1])
            stamps[i] = [float(x) for x in parts[2:7]]
            flags[i] = int(parts[7])
            values[i] = [float(x) for x in parts[8:]]
        except ValueError as e:
            raise invalid(
                f"{p} line {i + 2}",
                f"malformed row ({e})",
                line[:120],
                "the log is corrupt before its last line",
                kind=DataError,
            ) from None
    return DecodeLog(labels, bins, bin_end, stamps, flags, values, truncated)
