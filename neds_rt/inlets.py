"""Spike inlets: LSL and ZeroMQ SUB, one interface, batches in STREAM time.

Both inlets expose ``units`` (a :class:`~neds_rt.lsl_streams.StreamUnits`), ``kind`` (``"events"`` or
``"counts"``) and ``poll(timeout_ms) -> SpikeBatch | CountsBatch | None``. ``poll`` never blocks longer than
``timeout_ms`` and returns None when nothing arrived. Arrays in a batch may be views of the inlet's own
preallocated buffers: use them (or copy them) before the next ``poll``.

A :class:`Gap` on a batch says data was lost before it (LSL stream dropped and came back, or ZMQ sequence
numbers skipped); the serve loop fills the missed bins explicitly. :func:`match_units` maps the stream's units
onto a model's unit vocabulary and refuses a mismatch.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import numpy as np
import zmq

from neds_rt import wire
from neds_rt.errors import StreamError, invalid
from neds_rt.lsl_scope import pylsl
from neds_rt.lsl_streams import COUNTS_TYPE, SPIKES_TYPE, StreamUnits, units_from_info

log = logging.getLogger(__name__)

Kind = Literal["events", "counts"]
_MAX_REASONS: Final = 64


@dataclass(frozen=True, slots=True)
class Gap:
    """Data lost before the batch that carries this marker."""

    lost_at: float  # host monotonic clock (= LSL local_clock) when the loss was detected, s
    resumed_at: float  # host monotonic clock when data flowed again, s
    last_time: float | None  # last stream time delivered before the loss (None: nothing delivered yet)
    reason: str
    dropped_messages: int = 0  # ZMQ messages known to be missing (0 for LSL)


@dataclass(frozen=True, slots=True)
class SpikeBatch:
    times: np.ndarray  # (n,) float64 spike times, stream seconds (time-corrected for LSL)
    units: np.ndarray  # (n,) int32 unit index into the stream's unit list
    gap: Gap | None = None


@dataclass(frozen=True, slots=True)
class CountsBatch:
    t_start: np.ndarray  # (m,) float64 bin start times, stream seconds
    counts: np.ndarray  # (m, N) int32 spike counts per bin and unit
    gap: Gap | None = None


class SpikeInlet(Protocol):
    units: StreamUnits
    kind: Kind

    def poll(self, timeout_ms: float = 0.0) -> SpikeBatch | CountsBatch | None: ...

    def close(self) -> None: ...


def match_units(
    stream_units: Sequence[str] | StreamUnits, model_units: Sequence[str], allow_extra: bool = False
) -> np.ndarray:
    """Index map ``m`` with ``m[i]`` = the model's index of stream unit ``i`` (int32, (N_stream,)).

    The two id sets must be equal; with ``allow_extra`` stream units the model lacks map to -1 (the binner
    counts them as unknown). Raises :class:`StreamError` naming the missing and extra ids.
    """
    s_ids = [
        str(u) for u in (stream_units.unit_ids if isinstance(stream_units, StreamUnits) else stream_units)
    ]
    m_ids = [str(u) for u in model_units]
    index = {u: i for i, u in enumerate(m_ids)}
    if len(index) != len(m_ids):
        raise invalid(
            "model unit vocabulary",
            "unit ids must be unique",
            len(m_ids) - len(index),
            "re-export the model",
            kind=StreamError,
        )
    if len(set(s_ids)) != len(s_ids):
        raise invalid(
            "stream units",
            "unit ids must be unique",
            len(s_ids) - len(set(s_ids)),
            "fix the publisher's unit list",
            kind=StreamError,
        )
    s_set = set(s_ids)
    missing = [u for u in m_ids if u not in s_set]
    extra = [u for u in s_ids if u not in index]
    if missing or (extra and not allow_extra):
        raise invalid(
            "stream units",
            f"do not match the model's {len(m_ids)} units: {len(missing)} missing from the stream "
            f"(first {missing[:5]}), {len(extra)} not in the model (first {extra[:5]})",
            None,
            "stream the session the model was trained on, or re-export the model for this probe",
            kind=StreamError,
        )
    return np.array([index.get(u, -1) for u in s_ids], dtype=np.int32)  # (N_stream,) model index or -1


# ---------------------------------------------------------------------------------------------- LSL


class LSLSpikeInlet:
    """Inlet for an LSL ``Spikes`` (events) or ``SpikeCounts`` stream, with reconnection and gap reports.

    Resolves by ``name`` (and checks the type) or, without a name, by type ``stype``. Times are the stream's
    own timestamps plus ``time_correction()`` (refreshed every ``tc_refresh_s``), or exactly as stamped when
    the outlet runs on this host (same clock; see :attr:`same_host`). When the outlet disappears,
    a background resolver looks for a stream with the same source_id (or name); the first batch after it
    comes back carries a :class:`Gap`.
    """

    def __init__(
        self,
        name: str | None = None,
        stype: str = SPIKES_TYPE,
        resolve_timeout: float = 5.0,
        max_samples: int = 8192,
        max_buflen: int | None = None,
        tc_refresh_s: float = 2.0,
        open_timeout: float = 5.0,
    ) -> None:
        if stype not in (SPIKES_TYPE, COUNTS_TYPE):
            raise invalid("stype", f"must be {SPIKES_TYPE!r} or {COUNTS_TYPE!r}", stype, kind=StreamError)
        self._lsl = pylsl()
        from pylsl.util import LostError  # liblsl is loaded (scoped) by pylsl() above

        self._lost_error: type[Exception] = LostError
        self.name, self.stype = name, stype
        self.kind: Kind = "events" if stype == SPIKES_TYPE else "counts"
        self.max_samples = int(max_samples)
        # LSL buffers seconds for regular streams and 100s of samples for irregular ones
        self.max_buflen = int(max_buflen) if max_buflen is not None else (100 if self.kind == "events" else 2)
        self.tc_refresh_s = tc_refresh_s
        self.open_timeout = open_timeout
        self.gaps: list[Gap] = []
        info = self._resolve(resolve_timeout)
        self._inlet: Any = None
        inlet = self._open(info)
        full = inlet.info(timeout=open_timeout)
        self.units: StreamUnits = units_from_info(full)
        self.source_id: str = full.source_id()
        self.stream_name: str = full.name()
        self.n_channels: int = full.channel_count()
        # preallocated pull buffers
        self._buf = np.zeros((self.max_samples, self.n_channels), np.int32)  # (S, C) int32 pulled samples
        self._times = np.zeros(self.max_samples, np.float64)  # (S,) float64 corrected stream times
        self._last_time: float | None = None
        self._lost_at: float | None = None
        self._resolver: Any = None
        self._pending_gap: Gap | None = None
        self._next_retry = 0.0

    # -- resolve / open --------------------------------------------------------------------------------
    def _what(self) -> str:
        return f"name {self.name!r} and type {self.stype!r}" if self.name else f"type {self.stype!r}"

    def _resolve(self, timeout: float) -> Any:
        lsl = self._lsl
        prop, value = ("name", self.name) if self.name else ("type", self.stype)
        found = lsl.resolve_byprop(prop, value, minimum=1, timeout=timeout)
        if not found:
            raise invalid(
                "LSL spike stream",
                f"no stream with {prop} {value!r} found within {timeout} s",
                None,
                "start the replay / acquisition first, check --stream and the LSL scope",
                kind=StreamError,
            )
        typed = [i for i in found if i.type() == self.stype]
        if not typed:
            raise invalid(
                "LSL spike stream",
                f"stream {value!r} has type {found[0].type()!r}, not {self.stype!r}",
                None,
                "pass the right --stream name or type",
                kind=StreamError,
            )
        if len(typed) > 1:
            log.warning(
                "%s LSL streams match %s; using the newest (source_ids %s)",
                len(typed),
                self._what(),
                [i.source_id() for i in typed],
            )
        return max(typed, key=lambda i: i.created_at())

    def _open(self, info: Any) -> Any:
        inlet = self._lsl.StreamInlet(info, max_buflen=self.max_buflen, recover=False)
        inlet.open_stream(timeout=self.open_timeout)
        # An outlet on this host stamps with this host's clock: the true correction is exactly 0, and LSL's
        # round-trip estimate would only add its noise (it moves spikes across bin edges). Other hosts get
        # LSL's estimate, refreshed every tc_refresh_s.
        self.same_host = bool(info.hostname()) and info.hostname() == socket.gethostname()
        self._tc = 0.0 if self.same_host else float(inlet.time_correction(timeout=self.open_timeout))
        self._tc_next = math.inf if self.same_host else time.monotonic() + self.tc_refresh_s
        self._inlet = inlet
        self._uid = info.uid()
        tc = "0 (same host)" if self.same_host else f"{self._tc:.6f} s"
        log.info("LSL inlet open: %r (%s, source_id %r, host %r), time correction %s", info.name(),
                 info.type(), info.source_id(), info.hostname(), tc)
        return inlet

    def _on_lost(self) -> None:
        now = time.monotonic()
        log.warning(
            "LSL stream %r lost at %.3f (last stream time %s); waiting for it to come back",
            self.stream_name,
            now,
            self._last_time,
        )
        self._inlet = None
        self._lost_at = now
        prop, value = ("source_id", self.source_id) if self.source_id else ("name", self.stream_name)
        self._resolver = self._lsl.ContinuousResolver(prop=prop, value=value)

    def _try_reconnect(self) -> bool:
        now = time.monotonic()
        if now < self._next_retry or self._resolver is None:
            return False
        self._next_retry = now + 0.05
        found = [i for i in self._resolver.results() if i.uid() != self._uid and i.type() == self.stype]
        if not found:
            return False
        info = max(found, key=lambda i: i.created_at())
        try:
            self._open(info)
        except Exception as e:  # the new outlet may vanish again while we open it
            log.warning("LSL reconnect to %r failed (%s); retrying", self.stream_name, e)
            self._inlet = None
            return False
        new_units = units_from_info(self._inlet.info(timeout=self.open_timeout))
        if new_units != self.units:
            self._inlet = None
            raise invalid(
                f"LSL stream {self.stream_name!r}",
                "came back with different units or session",
                None,
                "restart serve against the new stream",
                kind=StreamError,
            )
        assert self._lost_at is not None
        gap = Gap(self._lost_at, time.monotonic(), self._last_time, "LSL stream lost and reconnected")
        log.warning("LSL stream %r back after %.3f s", self.stream_name, gap.resumed_at - gap.lost_at)
        self._pending_gap = gap
        self.gaps.append(gap)
        self._resolver = None
        self._lost_at = None
        return True

    @property
    def connected(self) -> bool:
        return self._inlet is not None

    @property
    def time_correction(self) -> float:
        return self._tc

    # -- pull --------------------------------------------------------------------------------------------
    def poll(self, timeout_ms: float = 0.0) -> SpikeBatch | CountsBatch | None:
        """Pull what is available (waiting up to ``timeout_ms`` for the first sample)."""
        timeout = max(0.0, timeout_ms / 1000.0)
        if self._inlet is None and not self._try_reconnect():
            if timeout > 0:
                time.sleep(min(timeout, 0.005))
            return None
        inlet = self._inlet
        now = time.monotonic()
        if now >= self._tc_next:
            try:
                self._tc = float(inlet.time_correction(timeout=0.5))
            except self._lost_error:
                self._on_lost()
                return None
            except Exception as e:  # a TimeoutError keeps the last estimate
                log.warning("LSL time_correction failed (%s); keeping %.6f", e, self._tc)
            self._tc_next = now + self.tc_refresh_s
        try:
            _, ts = inlet.pull_chunk(
                timeout=timeout,
                max_samples=self.max_samples,
                dest_obj=self._buf,
                min_samples=1 if timeout > 0 else None,
                as_numpy=True,
            )
        except self._lost_error:
            self._on_lost()
            return None
        n = int(ts.shape[0])
        gap, self._pending_gap = self._pending_gap, None
        if n == 0 and gap is None:
            return None
        times = self._times[:n]
        np.add(ts, self._tc, out=times)
        if n:
            self._last_time = float(times[-1])
        # pylsl pulls into the preallocated buffers; each batch gets its own copy of the n rows, since a
        # caller may keep batches across polls (the next pull overwrites the buffers)
        if self.kind == "events":
            return SpikeBatch(times.copy(), self._buf[:n, 0].copy(), gap)
        return CountsBatch(times.copy(), self._buf[:n].copy(), gap)

    def close(self) -> None:
        if self._inlet is not None:
            self._inlet.close_stream()
        self._inlet = None
        self._resolver = None

    def __enter__(self) -> LSLSpikeInlet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- ZMQ


class ZMQSpikeInlet:
    """ZeroMQ SUB inlet for spike events (or counts) in the :mod:`neds_rt.wire` format.

    The topic is compared exactly; malformed messages are counted by reason in ``malformed`` and logged, never
    raised; sequence gaps are counted in ``dropped`` and reported as a :class:`Gap`. Unit metadata arrives on
    ``topic + wire.META_SUFFIX`` (or pass ``units``); :meth:`wait_for_units` blocks until it is known.
    """

    def __init__(
        self,
        url: str,
        topic: bytes | str = b"spikes",
        kind: Kind = "events",
        bind: bool = False,
        units: StreamUnits | None = None,
        max_batch_messages: int = 256,
        rcvhwm: int = 100_000,
        context: zmq.Context | None = None,
    ) -> None:
        self.url = url
        self.topic = topic.encode() if isinstance(topic, str) else bytes(topic)
        if not self.topic:
            raise invalid(
                "topic",
                "must not be empty (a SUB would receive every publisher)",
                self.topic,
                kind=StreamError,
            )
        if kind not in ("events", "counts"):
            raise invalid("kind", "must be 'events' or 'counts'", kind, kind=StreamError)
        self.kind: Kind = kind
        self._meta_topic = self.topic + wire.META_SUFFIX
        self.units: StreamUnits = units if units is not None else StreamUnits((), (), "")
        self._have_units = units is not None
        self.bin_size_s: float | None = None
        self.max_batch_messages = max_batch_messages
        self.received = 0  # good data messages
        self.malformed: Counter[str] = Counter()  # reason -> count
        self.foreign = 0  # messages on other topics sharing our prefix
        self.skipped_before_units = 0
        self.seq = wire.SeqTracker()
        self.gaps: list[Gap] = []
        self._last_time: float | None = None
        self._ctx = context or zmq.Context.instance()
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, max(wire.MAX_PAYLOAD_BYTES, wire.MAX_META_BYTES) + 65536)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic)
        wire.attach(sock, url, bind, "check --zmq-in")
        self._sock = sock

    @property
    def n_malformed(self) -> int:
        return sum(self.malformed.values())

    def _bad(self, e: StreamError) -> None:
        text = str(e)
        reason = text.split(" (got", 1)[0][:100]
        if reason not in self.malformed and len(self.malformed) >= _MAX_REASONS:
            reason = "other"
        self.malformed[reason] += 1
        n = self.n_malformed
        if n <= 10 or n % 100 == 0:
            log.warning("malformed ZMQ message #%s on %s dropped: %s", n, self.url, text)

    def _on_meta(self, frames: list[bytes]) -> None:
        try:
            meta = wire.decode_meta(frames, self.topic)
        except StreamError as e:
            self._bad(e)
            return
        if meta.kind != self.kind:
            self._bad(
                invalid(
                    "meta message",
                    f"stream kind {meta.kind!r} is not this inlet's {self.kind!r}",
                    kind=StreamError,
                )
            )
            return
        units = StreamUnits(meta.unit_ids, meta.regions, meta.session_id)
        if not self._have_units:
            self.units, self._have_units, self.bin_size_s = units, True, meta.bin_size_s
            log.info("ZMQ stream %s: %s units, session %s", self.url, len(units.unit_ids), units.session_id)
        elif units != self.units:
            self._bad(invalid("meta message", "units changed mid-stream", None, kind=StreamError))

    def _recv_all(self, timeout_ms: float) -> list[list[bytes]]:
        if not self._sock.poll(max(0, int(timeout_ms)), zmq.POLLIN):
            return []
        msgs = []
        for _ in range(self.max_batch_messages):
            try:
                msgs.append(self._sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        return msgs

    def wait_for_units(self, timeout_s: float = 5.0) -> StreamUnits:
        """Process incoming messages until the unit metadata is known; StreamError on timeout."""
        deadline = time.monotonic() + timeout_s
        while not self._have_units:
            left = deadline - time.monotonic()
            if left <= 0:
                raise invalid(
                    f"ZMQ stream {self.url} topic {self.topic!r}",
                    f"no unit metadata within {timeout_s} s",
                    None,
                    "start the publisher (it sends metadata every second) or pass units=",
                    kind=StreamError,
                )
            for frames in self._recv_all(min(left * 1000, 50)):
                if frames and frames[0] == self._meta_topic:
                    self._on_meta(frames)
                else:
                    self.skipped_before_units += 1
        return self.units

    def poll(self, timeout_ms: float = 0.0) -> SpikeBatch | CountsBatch | None:
        """Decode what is waiting (at most ``max_batch_messages``), waiting up to ``timeout_ms``."""
        t_parts: list[np.ndarray] = []
        u_parts: list[np.ndarray] = []
        gap: Gap | None = None
        for frames in self._recv_all(timeout_ms):
            head = frames[0] if frames else b""
            if head == self._meta_topic:
                self._on_meta(frames)
                continue
            if head != self.topic and head.startswith(self.topic):  # another stream sharing our prefix
                self.foreign += 1
                continue
            try:
                if self.kind == "events":
                    msg = wire.decode_spikes(frames, self.topic)
                    seq, t, u = msg.seq, msg.times, msg.units
                else:
                    n_units = len(self.units.unit_ids) if self._have_units else None
                    cm = wire.decode_counts(frames, self.topic, n_units)
                    seq, t, u = cm.seq, np.array([cm.t_start]), cm.counts.reshape(1, -1)
            except StreamError as e:
                self._bad(e)
                continue
            if not self._have_units:
                self.skipped_before_units += 1
                continue
            self.received += 1
            dropped = self.seq.update(seq)
            if dropped:
                now = time.monotonic()
                g = Gap(
                    now, now, self._last_time, f"{dropped} ZMQ messages missing before seq {seq}", dropped
                )
                self.gaps.append(g)
                gap = (
                    g
                    if gap is None
                    else Gap(gap.lost_at, now, gap.last_time, g.reason, gap.dropped_messages + dropped)
                )
            if t.size:
                self._last_time = float(t[-1])
            t_parts.append(t)
            u_parts.append(u)
        if not t_parts and gap is None:
            return None
        times = t_parts[0] if len(t_parts) == 1 else _concat(t_parts, np.float64, (0,))
        if self.kind == "events":
            units = u_parts[0] if len(u_parts) == 1 else _concat(u_parts, np.int32, (0,))
            return SpikeBatch(times, units, gap)
        counts = (
            u_parts[0] if len(u_parts) == 1 else _concat(u_parts, np.int32, (0, len(self.units.unit_ids)))
        )
        return CountsBatch(times, counts, gap)

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> ZMQSpikeInlet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _concat(parts: list[np.ndarray], dtype: type, empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype)
