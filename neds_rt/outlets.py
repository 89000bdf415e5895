"""Outlets: decodes out (LSL ``Behavior`` + ZMQ PUB) and spike streams out for replay (LSL + ZMQ PUB).

Push paths reuse preallocated buffers. Stamps are seconds of the host's monotonic clock, which on Linux is
the clock of LSL's ``local_clock()`` (both CLOCK_MONOTONIC), so processes on one host can compare them.

ZMQ publishers use an XPUB socket: it sends like PUB but also sees subscriptions, so
:meth:`wait_for_subscriber` defeats the slow-joiner problem (messages sent before a subscription lands are
dropped by design).
"""

from __future__ import annotations

import ctypes
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq

from neds_rt import wire
from neds_rt.binning import BIN_SIZE_S
from neds_rt.errors import StreamError, invalid
from neds_rt.lsl_scope import pylsl
from neds_rt.lsl_streams import (
    BEHAVIOR_RATE_HZ,
    StreamUnits,
    behavior_stream_info,
    counts_stream_info,
    spike_stream_info,
)

log = logging.getLogger(__name__)


def _as1d(x: npt.ArrayLike, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=dtype).reshape(-1)  # no copy when already right


def _push_with_stamps(outlet: Any, data: np.ndarray, stamps: np.ndarray) -> None:
    """push_chunk with one timestamp per sample, straight from numpy memory when pylsl allows it."""
    n_samples = stamps.shape[0]
    if n_samples == 0:
        return
    fn = getattr(outlet, "do_push_chunk_n", None)
    if fn is None or not hasattr(outlet, "obj"):  # pylsl internals moved: public (slower) path
        outlet.push_chunk(data, timestamp=stamps.tolist())
        return
    from pylsl.util import handle_error

    handle_error(
        fn(
            outlet.obj,
            ctypes.c_void_p(data.ctypes.data),
            ctypes.c_ulong(data.size),
            ctypes.c_void_p(stamps.ctypes.data),
            ctypes.c_int(1),
        )
    )


# ---------------------------------------------------------------------------------------------- LSL


class _LSLOutlet:
    """What every neds-rt LSL outlet shares: consumer checks and closing."""

    _outlet: Any

    def wait_for_consumers(self, timeout: float) -> bool:
        return bool(self._outlet.wait_for_consumers(timeout))

    def have_consumers(self) -> bool:
        return bool(self._outlet.have_consumers())

    def close(self) -> None:
        self._outlet = None


class LSLBehaviorOutlet(_LSLOutlet):
    """LSL ``Behavior`` stream: one float32 sample per bin, timestamp = bin end, labelled channels."""

    def __init__(
        self,
        name: str,
        channels: Sequence[tuple[str, str]],
        source_id: str,
        rate_hz: float = BEHAVIOR_RATE_HZ,
        session_id: str = "",
        max_buffered: int = 10,
    ) -> None:
        lsl = pylsl()
        self.labels = [c[0] for c in channels]
        self.info = behavior_stream_info(name, channels, source_id, rate_hz=rate_hz, session_id=session_id)
        self._outlet = lsl.StreamOutlet(self.info, chunk_size=1, max_buffered=max_buffered)
        self._buf = np.zeros((1, len(self.labels)), np.float32)  # (1, C) float32 one decoded sample

    def push(self, values: npt.ArrayLike, timestamp: float) -> None:
        """Push one decode stamped ``timestamp`` (the bin end, in stream time)."""
        v = np.asarray(values)
        if v.size != self._buf.shape[1]:
            raise invalid(
                "Behavior sample",
                f"needs {self._buf.shape[1]} values ({self.labels})",
                v.size,
                kind=StreamError,
            )
        self._buf[0, :] = v.reshape(-1)
        self._outlet.push_chunk(self._buf, timestamp=float(timestamp))


class _LSLUnitsOutlet(_LSLOutlet):
    """An outlet whose stream description lists the session's units (Spikes and SpikeCounts streams)."""

    _make_info: Any  # spike_stream_info or counts_stream_info
    _max_buffered: int

    def __init__(
        self,
        name: str,
        session_id: str,
        unit_ids: Sequence[object],
        regions: Sequence[object],
        source_id: str,
        bin_size: float = BIN_SIZE_S,
        max_buffered: int | None = None,
    ) -> None:
        lsl = pylsl()
        self.info = type(self)._make_info(name, session_id, unit_ids, regions, source_id, bin_size)
        self.n_units = len(unit_ids)
        buffered = self._max_buffered if max_buffered is None else max_buffered
        self._outlet = lsl.StreamOutlet(self.info, chunk_size=0, max_buffered=buffered)


class LSLSpikeOutlet(_LSLUnitsOutlet):
    """LSL ``Spikes`` stream for replay: one int32 sample (unit index) per spike, stamped with its time."""

    _make_info = staticmethod(spike_stream_info)
    _max_buffered = 100

    def push(self, times: npt.ArrayLike, units: npt.ArrayLike) -> None:
        """Push spikes (n,) with their stream times (n,) as per-sample LSL timestamps."""
        t = _as1d(times, np.float64)  # (n,) float64 stream seconds
        u = _as1d(units, np.int32)  # (n,) int32 unit index
        if t.shape != u.shape:
            raise invalid(
                "spike events",
                "times and units must have the same length",
                (t.size, u.size),
                kind=StreamError,
            )
        _push_with_stamps(self._outlet, u, t)


class LSLCountsOutlet(_LSLUnitsOutlet):
    """LSL ``SpikeCounts`` stream: one int32 sample per bin (one channel per unit), stamped at bin start."""

    _make_info = staticmethod(counts_stream_info)
    _max_buffered = 10

    def push(self, t_start: npt.ArrayLike, counts: npt.ArrayLike) -> None:
        """Push (m, N) counts with their (m,) bin start times."""
        t = _as1d(t_start, np.float64)  # (m,) float64 stream seconds
        c = np.ascontiguousarray(counts, dtype=np.int32).reshape(t.size, self.n_units)  # (m, N) int32
        _push_with_stamps(self._outlet, c, t)



# ---------------------------------------------------------------------------------------------- ZMQ


class _ZMQPublisher:
    def __init__(
        self, url: str, topic: bytes | str, bind: bool, sndhwm: int, context: zmq.Context | None
    ) -> None:
        self.url = url
        self.topic = topic.encode() if isinstance(topic, str) else bytes(topic)
        if not self.topic:
            raise invalid("topic", "must not be empty", self.topic, kind=StreamError)
        self._ctx = context or zmq.Context.instance()
        sock = self._ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.LINGER, 200)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every subscriber's subscription, not only the first
        wire.attach(sock, url, bind, "pick a free port or another ipc:// path")
        self._sock = sock
        self.seq = 0
        self.subscriptions = 0

    def _drain_subscriptions(self, timeout_ms: int = 0) -> int:
        new = 0
        while self._sock.poll(timeout_ms, zmq.POLLIN):
            msg = self._sock.recv()
            if msg[:1] == b"\x01" and self.topic.startswith(msg[1:]):
                new += 1
            timeout_ms = 0
        self.subscriptions += new
        return new

    def wait_for_subscriber(self, timeout: float) -> bool:
        """Wait until a subscriber for our topic has connected (or one already had); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.subscriptions == 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._drain_subscriptions(int(min(left, 0.05) * 1000) + 1)
        return True

    def close(self) -> None:
        self._sock.close()


class ZMQSpikePublisher(_ZMQPublisher):
    """Publishes spike events (or binned counts) in the :mod:`neds_rt.wire` format, plus unit metadata on
    ``topic + META_SUFFIX`` at start, on each new subscription and every ``meta_interval_s``."""

    def __init__(
        self,
        url: str,
        topic: bytes | str = b"spikes",
        units: StreamUnits | None = None,
        kind: str = "events",
        bin_size: float = BIN_SIZE_S,
        bind: bool = True,
        meta_interval_s: float = 1.0,
        sndhwm: int = 100_000,
        context: zmq.Context | None = None,
    ) -> None:
        super().__init__(url, topic, bind, sndhwm, context)
        if kind not in ("events", "counts"):
            raise invalid("kind", "must be 'events' or 'counts'", kind, kind=StreamError)
        self.kind = kind
        self.units = units
        self._meta = (
            None
            if units is None
            else wire.encode_meta(
                self.topic,
                wire.MetaMessage(
                    kind, units.session_id, tuple(units.unit_ids), tuple(units.regions), bin_size
                ),
            )
        )
        self.meta_interval_s = meta_interval_s
        self._next_meta = 0.0
        self._rec = np.empty(1024, wire.SPIKE_DTYPE)  # (cap,) packed records, grown by doubling

    def send_meta(self) -> None:
        if self._meta is not None:
            self._sock.send_multipart(self._meta)
        self._next_meta = time.monotonic() + self.meta_interval_s

    def _maybe_meta(self) -> None:
        if self._meta is None:
            return
        now = time.monotonic()
        if now >= self._next_meta or self._drain_subscriptions():
            self.send_meta()

    def wait_for_subscriber(self, timeout: float) -> bool:
        ok = super().wait_for_subscriber(timeout)
        if ok:
            self.send_meta()
        return ok

    def publish(self, times: npt.ArrayLike, units: npt.ArrayLike) -> int:
        """Send one spike-event message; returns its sequence number."""
        self._maybe_meta()
        n = np.size(times)
        if n > self._rec.size:
            self._rec = np.empty(max(n, 2 * self._rec.size), wire.SPIKE_DTYPE)
        frames = wire.encode_spikes(self.topic, self.seq, times, units, out=self._rec)
        self._sock.send_multipart(frames)  # copies: the record buffer is reused
        self.seq += 1
        return self.seq - 1

    def publish_counts(self, bin_index: int, t_start: float, counts: npt.ArrayLike) -> int:
        """Send one bin of counts; returns its sequence number."""
        self._maybe_meta()
        self._sock.send_multipart(wire.encode_counts(self.topic, self.seq, bin_index, t_start, counts))
        self.seq += 1
        return self.seq - 1


class ZMQDecodePublisher(_ZMQPublisher):
    """Publishes decodes: header with bin index, bin end, latency stamps and flags; payload float32 values."""

    def __init__(
        self,
        url: str,
        labels: Sequence[str],
        topic: bytes | str = b"decode",
        bind: bool = True,
        sndhwm: int = 10_000,
        context: zmq.Context | None = None,
    ) -> None:
        super().__init__(url, topic, bind, sndhwm, context)
        self.labels = tuple(labels)
        self._labels_json = json.dumps(list(self.labels))
        self._stamps: dict[str, float] = dict.fromkeys(wire.STAMP_NAMES, 0.0)

    def publish(
        self, bin_index: int, bin_end: float, stamps: Mapping[str, float], flags: int, values: npt.ArrayLike
    ) -> float:
        """Send one decode. ``stamps`` needs bin_end, closed, infer_start, infer_end; ``published`` is set
        here (host monotonic clock) unless given. Returns the published stamp."""
        st = self._stamps
        for k in wire.STAMP_NAMES[:-1]:
            if k not in stamps:
                raise invalid("decode stamps", f"missing {k!r}", sorted(stamps), kind=StreamError)
            st[k] = stamps[k]
        published = float(stamps["published"]) if "published" in stamps else time.monotonic()
        st["published"] = published
        frames = wire.encode_decode(
            self.topic, self.seq, bin_index, bin_end, st, flags, self.labels, values, self._labels_json
        )
        self._sock.send_multipart(frames)
        self.seq += 1
        return published
