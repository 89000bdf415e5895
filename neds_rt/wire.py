"""ZeroMQ wire formats: encode and strictly validate spike, counts, decode and unit-metadata messages.

Every message is a multipart ``[topic, header, payload]`` (metadata: ``[topic + META_SUFFIX, header]``):

- ``topic``: bytes, compared EXACTLY on receipt (a SUB socket filters by prefix only);
- ``header``: a UTF-8 JSON object with a fixed key set (no NaN / Infinity, no duplicate keys, capped size);
- ``payload``: a packed little-endian numpy array, never pickle.

Spike events: header ``{seq, t_first, t_last, n, dtype}``, payload ``n`` records of :data:`SPIKE_DTYPE`
(time float64 in stream seconds, unit int32 index). ``t_first`` / ``t_last`` are the first and last times in
payload order, ``null`` when ``n == 0`` or that time is not finite (NaN times travel to the binner, which
counts them).

Binned counts: header ``{seq, bin, t_start, n_units, dtype}``, payload ``n_units`` int32 counts.

Decodes: header ``{seq, bin, bin_end, stamps, flags, labels, n, dtype}``, payload ``n`` float32 values.
``stamps`` holds :data:`STAMP_NAMES` in seconds of the host's monotonic clock (= LSL ``local_clock``).

``decode_*`` raise :class:`StreamError` naming the problem; :class:`SeqTracker` turns sequence numbers into
a dropped-message count (a gap is reported, not raised).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import zmq

from neds_rt.errors import StreamError, invalid

log = logging.getLogger(__name__)

SPIKE_DTYPE: Final = np.dtype([("t", "<f8"), ("unit", "<i4")])  # packed record, 12 bytes
SPIKE_DTYPE_STR: Final = "t<f8,unit<i4"
COUNTS_DTYPE_STR: Final = "<i4"
DECODE_DTYPE_STR: Final = "<f4"
META_SUFFIX: Final = b"/meta"
STAMP_NAMES: Final = ("bin_end", "closed", "infer_start", "infer_end", "published")

# decode flags (bit mask)
FLAG_GAP_FILLED: Final = 1  # the bin was missed (stream gap) and filled explicitly
FLAG_OVERRUN: Final = 2  # a stage ran over its latency budget
FLAG_LATE_SPIKES: Final = 4  # spikes for this bin arrived after it closed
FLAG_NAMES: Final = {"gap_filled": FLAG_GAP_FILLED, "overrun": FLAG_OVERRUN, "late_spikes": FLAG_LATE_SPIKES}

MAX_HEADER_BYTES: Final = 4096
MAX_META_BYTES: Final = 4 * 1024 * 1024
MAX_PAYLOAD_BYTES: Final = 16 * 1024 * 1024  # 1.4 M spike records per message
MAX_EVENTS: Final = MAX_PAYLOAD_BYTES // SPIKE_DTYPE.itemsize
MAX_UNITS: Final = 1 << 20
MAX_SEQ: Final = (1 << 63) - 1
_MAX_NESTING_HINT: Final = "keep the header a flat JSON object"


@dataclass(frozen=True, slots=True)
class SpikeMessage:
    """A decoded spike-event message."""

    seq: int
    t_first: float | None
    t_last: float | None
    times: np.ndarray  # (n,) float64 spike times, stream seconds
    units: np.ndarray  # (n,) int32 unit index into the stream's unit list


@dataclass(frozen=True, slots=True)
class CountsMessage:
    """A decoded binned-counts message (one bin)."""

    seq: int
    bin: int
    t_start: float
    counts: np.ndarray  # (n_units,) int32 spike counts in [t_start, t_start + bin size)


@dataclass(frozen=True, slots=True)
class DecodeMessage:
    """A decoded behaviour-decode message (one bin)."""

    seq: int
    bin: int
    bin_end: float
    stamps: dict[str, float]  # STAMP_NAMES -> monotonic seconds
    flags: int
    labels: tuple[str, ...]
    values: np.ndarray  # (n,) float32 decoded values, one per label


@dataclass(frozen=True, slots=True)
class MetaMessage:
    """Unit metadata of a ZMQ spike stream (the LSL desc() equivalent)."""

    kind: str  # "events" | "counts"
    session_id: str
    unit_ids: tuple[str, ...]
    regions: tuple[str, ...]
    bin_size_s: float


# ---------------------------------------------------------------------------------------------- helpers


def _err(msg_kind: str, rule: str, value: object = None, fix: str = "") -> StreamError:
    return invalid(f"{msg_kind} message", rule, value, fix or "fix the publisher", kind=StreamError)


def _reject_constant(name: str) -> float:
    raise ValueError(f"JSON constant {name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _as_bytes(frame: object, what: str, msg_kind: str) -> bytes | memoryview:
    if isinstance(frame, bytes | memoryview):
        return frame
    if isinstance(frame, bytearray):
        return bytes(frame)
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    if isinstance(buf, memoryview):
        return buf
    raise _err(msg_kind, f"{what} frame must be bytes", type(frame).__name__)


def _parse_header(raw: bytes | memoryview, msg_kind: str, cap: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    if len(raw) > cap:
        raise _err(msg_kind, f"header is {len(raw)} bytes, over the {cap}-byte cap", None, _MAX_NESTING_HINT)
    try:
        text = bytes(raw).decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise _err(msg_kind, "header JSON is nested too deeply", None, _MAX_NESTING_HINT) from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise _err(msg_kind, f"header is not valid JSON ({e})", bytes(raw[:60])) from None
    if not isinstance(obj, dict):
        raise _err(msg_kind, "header must be a JSON object", type(obj).__name__)
    return obj


def _check_keys(header: dict[str, Any], expected: Sequence[str], msg_kind: str) -> None:
    keys = set(header)
    missing = [k for k in expected if k not in keys]
    extra = sorted(keys - set(expected))
    if missing or extra:
        raise _err(msg_kind, f"header keys must be {list(expected)}; missing {missing}, extra {extra}")


def _int(header: dict[str, Any], key: str, msg_kind: str, lo: int, hi: int) -> int:
    v = header[key]
    if type(v) is not int:
        raise _err(msg_kind, f"header '{key}' must be an integer", v)
    if not lo <= v <= hi:
        raise _err(msg_kind, f"header '{key}' must be in [{lo}, {hi}]", v)
    return v


def _float(header: dict[str, Any], key: str, msg_kind: str, nullable: bool = False) -> float | None:
    v = header[key]
    if v is None and nullable:
        return None
    if type(v) not in (int, float):
        raise _err(msg_kind, f"header '{key}' must be a number{' or null' if nullable else ''}", v)
    f = float(v)
    if not math.isfinite(f):  # 1e999 parses as inf without parse_constant
        raise _err(msg_kind, f"header '{key}' must be finite", v)
    return f


def _str(header: dict[str, Any], key: str, msg_kind: str) -> str:
    v = header[key]
    if not isinstance(v, str):
        raise _err(msg_kind, f"header '{key}' must be a string", v)
    return v


def _check_frames(frames: Sequence[object], n: int, topic: bytes, msg_kind: str) -> list[bytes | memoryview]:
    if len(frames) != n:
        raise _err(
            msg_kind, f"must have {n} frames [topic, header{', payload' if n == 3 else ''}]", len(frames)
        )
    out = [
        _as_bytes(f, name, msg_kind) for f, name in zip(frames, ("topic", "header", "payload"), strict=False)
    ]
    if bytes(out[0]) != topic:
        raise _err(msg_kind, "topic does not match exactly", bytes(out[0][:64]), f"subscribe to {topic!r}")
    return out


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _same(a: float | None, b: float | None) -> bool:
    return a == b  # both None, or bit-exact floats (JSON round-trips float64 exactly)


# ---------------------------------------------------------------------------------------------- spikes


def pack_spikes(times: npt.ArrayLike, units: npt.ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
    """Pack event arrays into (n,) :data:`SPIKE_DTYPE` records, into ``out[:n]`` if given (no allocation)."""
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    u = np.asarray(units).reshape(-1)
    if t.shape != u.shape:
        raise invalid(
            "spike events",
            "times and units must have the same length",
            (t.size, u.size),
            "pass one unit per spike time",
            kind=StreamError,
        )
    if u.size and not np.issubdtype(u.dtype, np.integer):
        raise invalid(
            "spike units", "must be integers", u.dtype, "pass unit indices as int32", kind=StreamError
        )
    if u.size and (u.min() < np.iinfo(np.int32).min or u.max() > np.iinfo(np.int32).max):
        raise invalid("spike units", "must fit int32", (u.min(), u.max()), kind=StreamError)
    rec = np.empty(t.size, SPIKE_DTYPE) if out is None else out[: t.size]
    if rec.size != t.size:
        raise invalid(
            "pack_spikes out",
            "buffer too small",
            (out.size if out is not None else 0, t.size),
            "grow the buffer",
            kind=StreamError,
        )
    rec["t"] = t
    rec["unit"] = u
    return rec


def encode_spikes(
    topic: bytes, seq: int, times: npt.ArrayLike, units: npt.ArrayLike, out: np.ndarray | None = None
) -> list[bytes | memoryview]:
    """Frames ``[topic, header, payload]`` of a spike-event message (payload a view of ``out`` if given)."""
    rec = pack_spikes(times, units, out)
    n = int(rec.size)
    if n > MAX_EVENTS:
        raise invalid(
            "spike message",
            f"at most {MAX_EVENTS} events per message",
            n,
            "split the batch",
            kind=StreamError,
        )
    t_first = _finite_or_none(rec["t"][0]) if n else None
    t_last = _finite_or_none(rec["t"][-1]) if n else None
    header = {"seq": int(seq), "t_first": t_first, "t_last": t_last, "n": n, "dtype": SPIKE_DTYPE_STR}
    return [topic, _dumps(header), rec.data.cast("B")]


def decode_spikes(frames: Sequence[object], topic: bytes, max_events: int = MAX_EVENTS) -> SpikeMessage:
    """Validate and decode a spike-event message; raise :class:`StreamError` naming the problem."""
    kind = "spike"
    _, f_header, payload = _check_frames(frames, 3, topic, kind)
    h = _parse_header(f_header, kind)
    _check_keys(h, ("seq", "t_first", "t_last", "n", "dtype"), kind)
    seq = _int(h, "seq", kind, 0, MAX_SEQ)
    n = _int(h, "n", kind, 0, min(max_events, MAX_EVENTS))
    if _str(h, "dtype", kind) != SPIKE_DTYPE_STR:
        raise _err(kind, f"dtype must be {SPIKE_DTYPE_STR!r}", h["dtype"])
    t_first = _float(h, "t_first", kind, nullable=True)
    t_last = _float(h, "t_last", kind, nullable=True)
    if len(payload) != n * SPIKE_DTYPE.itemsize:
        raise _err(
            kind, f"payload must be n*{SPIKE_DTYPE.itemsize} = {n * SPIKE_DTYPE.itemsize} bytes", len(payload)
        )
    rec = np.frombuffer(payload, SPIKE_DTYPE, count=n)
    times = np.ascontiguousarray(rec["t"])  # (n,) float64 stream seconds
    units = np.ascontiguousarray(rec["unit"])  # (n,) int32 unit index
    want_first = _finite_or_none(times[0]) if n else None
    want_last = _finite_or_none(times[-1]) if n else None
    if not _same(t_first, want_first) or not _same(t_last, want_last):
        raise _err(
            kind,
            "t_first/t_last disagree with the payload",
            {"header": (t_first, t_last), "payload": (want_first, want_last)},
        )
    return SpikeMessage(seq, t_first, t_last, times, units)


# ---------------------------------------------------------------------------------------------- counts


def encode_counts(
    topic: bytes, seq: int, bin_index: int, t_start: float, counts: npt.ArrayLike
) -> list[bytes | memoryview]:
    """Frames ``[topic, header, payload]`` of one bin of counts (payload int32, one per unit)."""
    c = np.ascontiguousarray(counts, dtype="<i4").reshape(-1)  # (N,) int32 counts
    if not math.isfinite(t_start):
        raise invalid("counts t_start", "must be finite", t_start, kind=StreamError)
    header = {
        "seq": int(seq),
        "bin": int(bin_index),
        "t_start": float(t_start),
        "n_units": int(c.size),
        "dtype": COUNTS_DTYPE_STR,
    }
    return [topic, _dumps(header), c.data.cast("B")]


def decode_counts(frames: Sequence[object], topic: bytes, n_units: int | None = None) -> CountsMessage:
    """Validate and decode a binned-counts message; ``n_units`` (when given) must match."""
    kind = "counts"
    _, f_header, payload = _check_frames(frames, 3, topic, kind)
    h = _parse_header(f_header, kind)
    _check_keys(h, ("seq", "bin", "t_start", "n_units", "dtype"), kind)
    seq = _int(h, "seq", kind, 0, MAX_SEQ)
    b = _int(h, "bin", kind, -MAX_SEQ, MAX_SEQ)
    t_start = _float(h, "t_start", kind)
    n = _int(h, "n_units", kind, 0, MAX_UNITS)
    if n_units is not None and n != n_units:
        raise _err(kind, f"n_units must be {n_units} (the stream's unit count)", n)
    if _str(h, "dtype", kind) != COUNTS_DTYPE_STR:
        raise _err(kind, f"dtype must be {COUNTS_DTYPE_STR!r}", h["dtype"])
    if len(payload) != 4 * n:
        raise _err(kind, f"payload must be 4*n_units = {4 * n} bytes", len(payload))
    counts = np.frombuffer(payload, "<i4", count=n).copy()  # (N,) int32
    assert t_start is not None
    return CountsMessage(seq, b, t_start, counts)


# ---------------------------------------------------------------------------------------------- decodes


def encode_decode(
    topic: bytes,
    seq: int,
    bin_index: int,
    bin_end: float,
    stamps: Mapping[str, float],
    flags: int,
    labels: Sequence[str],
    values: npt.ArrayLike,
    labels_json: str | None = None,
) -> list[bytes | memoryview]:
    """Frames ``[topic, header, payload]`` of one decode (payload float32, one value per label).

    ``labels_json`` (``json.dumps(list(labels))``, precomputed by a publisher) skips re-encoding the labels.
    """
    v = np.ascontiguousarray(values, dtype="<f4").reshape(-1)  # (C,) float32 decoded values
    if v.size != len(labels):
        raise invalid("decode values", f"need one value per label ({len(labels)})", v.size, kind=StreamError)
    st = [float(stamps[k]) for k in STAMP_NAMES]
    be = float(bin_end)
    if not (math.isfinite(be) and all(math.isfinite(x) for x in st)):
        raise invalid("decode stamps", "must be finite", (be, st), kind=StreamError)
    lj = labels_json if labels_json is not None else json.dumps(list(labels))
    stamps_json = ",".join(f'"{k}":{x!r}' for k, x in zip(STAMP_NAMES, st, strict=True))
    # repr of a finite float is valid JSON and round-trips float64 exactly
    raw = (
        f'{{"seq":{int(seq)},"bin":{int(bin_index)},"bin_end":{be!r},"stamps":{{{stamps_json}}},'
        f'"flags":{int(flags)},"labels":{lj},"n":{v.size},"dtype":"{DECODE_DTYPE_STR}"}}'
    ).encode()
    return [topic, raw, v.data.cast("B")]


def decode_decode(frames: Sequence[object], topic: bytes) -> DecodeMessage:
    """Validate and decode a behaviour-decode message."""
    kind = "decode"
    _, f_header, payload = _check_frames(frames, 3, topic, kind)
    h = _parse_header(f_header, kind)
    _check_keys(h, ("seq", "bin", "bin_end", "stamps", "flags", "labels", "n", "dtype"), kind)
    seq = _int(h, "seq", kind, 0, MAX_SEQ)
    b = _int(h, "bin", kind, -MAX_SEQ, MAX_SEQ)
    bin_end = _float(h, "bin_end", kind)
    flags = _int(h, "flags", kind, 0, (1 << 31) - 1)
    n = _int(h, "n", kind, 0, 4096)
    if _str(h, "dtype", kind) != DECODE_DTYPE_STR:
        raise _err(kind, f"dtype must be {DECODE_DTYPE_STR!r}", h["dtype"])
    st = h["stamps"]
    if not isinstance(st, dict):
        raise _err(kind, "header 'stamps' must be an object", type(st).__name__)
    _check_keys(st, STAMP_NAMES, kind + " stamps")
    stamps = {k: _float(st, k, kind + " stamps") for k in STAMP_NAMES}
    labels = h["labels"]
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(labels) != n:
        raise _err(kind, f"header 'labels' must be a list of {n} strings", labels)
    if len(payload) != 4 * n:
        raise _err(kind, f"payload must be 4*n = {4 * n} bytes", len(payload))
    values = np.frombuffer(payload, "<f4", count=n).copy()  # (C,) float32
    assert bin_end is not None
    return DecodeMessage(
        seq,
        b,
        bin_end,
        {k: float(v) for k, v in stamps.items() if v is not None},
        flags,
        tuple(labels),
        values,
    )


# ---------------------------------------------------------------------------------------------- metadata


def encode_meta(topic: bytes, meta: MetaMessage) -> list[bytes]:
    """Frames ``[topic + META_SUFFIX, header]`` carrying the stream's unit metadata."""
    if len(meta.unit_ids) != len(meta.regions):
        raise invalid(
            "unit metadata",
            "one region per unit id",
            (len(meta.unit_ids), len(meta.regions)),
            kind=StreamError,
        )
    raw = _dumps(
        {
            "kind": meta.kind,
            "session_id": meta.session_id,
            "unit_ids": list(meta.unit_ids),
            "regions": list(meta.regions),
            "bin_size_s": float(meta.bin_size_s),
        }
    )
    if len(raw) > MAX_META_BYTES:
        raise invalid("unit metadata", f"at most {MAX_META_BYTES} bytes as JSON", len(raw), kind=StreamError)
    return [topic + META_SUFFIX, raw]


def decode_meta(frames: Sequence[object], topic: bytes) -> MetaMessage:
    """Validate and decode a unit-metadata message (``topic`` is the data topic, without the suffix)."""
    kind = "meta"
    _, f_header = _check_frames(frames, 2, topic + META_SUFFIX, kind)
    h = _parse_header(f_header, kind, cap=MAX_META_BYTES)
    _check_keys(h, ("kind", "session_id", "unit_ids", "regions", "bin_size_s"), kind)
    k = _str(h, "kind", kind)
    if k not in ("events", "counts"):
        raise _err(kind, "header 'kind' must be 'events' or 'counts'", k)
    sid = _str(h, "session_id", kind)
    ids, regs = h["unit_ids"], h["regions"]
    for name, lst in (("unit_ids", ids), ("regions", regs)):
        if not isinstance(lst, list) or not all(isinstance(x, str) for x in lst):
            raise _err(kind, f"header '{name}' must be a list of strings", type(lst).__name__)
    if len(ids) != len(regs):
        raise _err(kind, "one region per unit id", (len(ids), len(regs)))
    bs = _float(h, "bin_size_s", kind)
    assert bs is not None
    if bs <= 0:
        raise _err(kind, "header 'bin_size_s' must be > 0", bs)
    return MetaMessage(k, sid, tuple(ids), tuple(regs), bs)


# ---------------------------------------------------------------------------------------------- sequence


class SeqTracker:
    """Turns message sequence numbers into a count of dropped messages (gaps are reported, not raised)."""

    def __init__(self) -> None:
        self.expected: int | None = None
        self.dropped = 0  # total messages missing so far
        self.restarts = 0  # times the sequence went backwards (publisher restart)

    def update(self, seq: int) -> int:
        """Record ``seq``; return how many messages were skipped just before it (0 when none)."""
        gap = 0
        if self.expected is not None:
            if seq > self.expected:
                gap = seq - self.expected
                self.dropped += gap
                log.warning(
                    "ZMQ sequence gap: expected %s, got %s (%s messages dropped)", self.expected, seq, gap
                )
            elif seq < self.expected:
                self.restarts += 1
                log.warning("ZMQ sequence went back from %s to %s: publisher restarted", self.expected, seq)
        self.expected = seq + 1
        return gap


def attach(sock: zmq.Socket, url: str, bind: bool, fix: str) -> None:
    """Bind or connect ``sock`` to ``url``; on failure close it and raise a StreamError naming the url."""
    try:
        sock.bind(url) if bind else sock.connect(url)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise invalid("ZMQ url", f"cannot {'bind' if bind else 'connect'} ({e})", url, fix,
                      kind=StreamError) from None
