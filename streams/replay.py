"""Replay one session as live streams: spikes (LSL ``Spikes`` and/or ZMQ), ground-truth behaviour (LSL
``Behavior``) and trial events (LSL ``Markers``), paced against absolute deadlines.

Clock: stream time = ``t0 + (session time - start) / speed`` (+ ``loop * period`` when looping), where
``t0`` is the LSL ``local_clock()`` at :meth:`Replayer.open` plus ``lead_s``. The spike stream's
``desc()`` carries the mapping under ``<replay>`` (``t_offset`` = stream time - session time / speed,
``t_start_stream``, ``session_start``, ``session_end``, ``speed``, ``loop``) so a consumer can map stamps
back onto the session clock (:func:`replay_clock_from_info`).

Pacing: the replay clock is cut into ``chunk_s`` chunks (0.5 ms); each chunk's deadline is computed from the
schedule (never by adding up sleeps), the loop sleeps until ``spin_s`` before it (0: no spinning; the
kernel's wake-up slack is ~0.1 ms, and spinning would cost the CPU that serve needs on a small host), spins
the rest, then pushes every event due by then, each with its own exact timestamp. Lateness (push time -
scheduled time) is kept per chunk and per spike in fixed-size histograms (:class:`LatenessStats`) and
reported in the :class:`ReplaySummary`. Chunks with nothing due are skipped.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from neds_rt.binning import BIN_SIZE_S
from neds_rt.errors import ConfigError, DataError, StreamError, invalid
from neds_rt.lsl_scope import pylsl
from neds_rt.lsl_streams import StreamUnits, spike_stream_info
from neds_rt.outlets import LSLBehaviorOutlet, LSLSpikeOutlet, ZMQSpikePublisher
from neds_rt.realtime import REPLAY_PRIORITY, enter_realtime
from streams.replay_events import (
    BEHAVIOUR_CHANNELS,
    BehaviourTimeline,
    MarkerTimeline,
    SpikeTimeline,
    behaviour_timeline,
    segment_spikes,
    session_end,
    trial_markers,
)
from streams.session import Session

log = logging.getLogger(__name__)

MARKERS_TYPE: Final = "Markers"
QUANTILES: Final = (50.0, 90.0, 99.0, 99.9)
_COARSE_MAX_S: Final = 0.05  # longest single sleep, so a stop request is seen within 50 ms


# ---------------------------------------------------------------------------------------------- config


@dataclass
class ReplayConfig:
    """How to replay: which segment, how fast, to which outputs, and the pacing parameters."""

    stream: str = "spikes"  # LSL spike stream name and ZMQ topic; behaviour/markers get -behaviour/-markers
    speed: float = 1.0  # > 1 plays faster than real time
    loop: bool = False  # restart at the segment end, stream times continuing
    start: float = 0.0  # session seconds
    duration: float | None = None  # session seconds; None: to the session end
    lsl: bool = True  # LSL Spikes + Behavior + Markers outlets
    zmq_out: str | None = None  # ZMQ PUB url to bind for spike events
    behaviour: bool = True  # the ground-truth Behavior stream (LSL only)
    markers: bool = True  # the trial-event Markers stream (LSL only)
    behaviour_rate_hz: float = 1.0 / BIN_SIZE_S  # samples per SESSION second
    lead_s: float = 2.0  # seconds from open() to the first scheduled sample (consumers connect meanwhile)
    chunk_s: float = 0.0005  # pacing chunk, stream seconds (0.5 ms: every spike leaves within ~0.7 ms)
    spin_s: float = 0.0  # busy-wait this long before each deadline (0.3 ms costs ~20% of a core)
    max_buffered: int = 3600  # LSL outlet buffer: hundreds of samples (irregular streams)
    realtime: bool = False  # pace from a SCHED_FIFO thread (Linux; warns and goes on where not permitted)
    cpus: tuple[int, ...] | None = None  # pin the pacing thread to these CPUs (neds_rt.realtime)

    def check(self) -> None:
        def _pos(name: str, v: float, fix: str) -> None:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise invalid(name, "must be a finite number > 0", v, fix, kind=ConfigError)

        _pos("--speed", self.speed, "pass --speed 1 for real time, 2 for twice as fast")
        _pos("behaviour_rate_hz", self.behaviour_rate_hz, "use 50")
        _pos("chunk_s", self.chunk_s, "use 0.0005")
        if self.chunk_s > 0.1:
            raise invalid("chunk_s", "must be at most 0.1 s", self.chunk_s, "use 0.0005", kind=ConfigError)
        for name, v in (("spin_s", self.spin_s), ("--lead", self.lead_s)):
            if not (math.isfinite(v) and v >= 0):
                raise invalid(name, "must be a finite number >= 0 s", v, kind=ConfigError)
        if not math.isfinite(self.start):
            raise invalid("--start", "must be a finite number of session seconds", self.start,
                          kind=ConfigError)
        if self.duration is not None:
            _pos("--duration", self.duration, "pass a positive number of session seconds, or leave it out")
        if not self.stream or not self.stream.strip():
            raise invalid("--stream", "must not be empty", self.stream, "use spikes", kind=ConfigError)
        if not self.lsl and not self.zmq_out:
            raise invalid("replay outputs", "need LSL or ZMQ (--no-lsl without --zmq-out plays to nobody)",
                          None, "drop --no-lsl or pass --zmq-out tcp://127.0.0.1:5555", kind=ConfigError)
        if self.max_buffered < 1:
            raise invalid("max_buffered", "must be >= 1", self.max_buffered, kind=ConfigError)


def replay_segment(session: Session, start: float, duration: float | None) -> tuple[float, float]:
    """``[start, end)`` in session seconds, checked to lie inside the session ``[0, session_end)``."""
    t_end = session_end(session)
    what = f"session {session.eid}/{session.probe}"
    if not math.isfinite(start) or start < 0 or start >= t_end:
        raise invalid("--start", f"must lie inside {what}, [0, {t_end:.3f}) s", start,
                      "pick a start inside the session", kind=ConfigError)
    if duration is None:
        end = t_end
    else:
        if not math.isfinite(duration) or duration <= 0:
            raise invalid("--duration", "must be a finite number > 0 s", duration, kind=ConfigError)
        end = start + duration
        if end > t_end:
            raise invalid("--start/--duration", f"segment ends past the end of {what} ({t_end:.3f} s)",
                          (start, duration), f"pass --duration {t_end - start:.3f} or less",
                          kind=ConfigError)
    return float(start), float(end)


# ---------------------------------------------------------------------------------------------- clock


@dataclass(frozen=True)
class ReplayClock:
    """The session -> stream time mapping of one replay."""

    t0: float  # stream time (LSL local_clock, s) of the segment start in loop 0
    start: float  # session s, segment start
    end: float  # session s, segment end (exclusive)
    speed: float

    @property
    def period(self) -> float:
        """Stream seconds per loop of the segment."""
        return (self.end - self.start) / self.speed

    @property
    def t_offset(self) -> float:
        """stream time = t_offset + session time / speed (+ loop * period): at speed 1, stream - session."""
        return self.t0 - self.start / self.speed

    def to_stream(self, session_t: Any, loop: int = 0) -> Any:
        """Stream time(s) of session time(s) ``session_t`` in loop ``loop`` (the formula replay pushes)."""
        rel = np.asarray(session_t, dtype=np.float64) - self.start  # session s since the segment start
        return (self.t0 + loop * self.period) + rel / self.speed

    def to_session(self, stream_t: Any) -> tuple[np.ndarray, np.ndarray]:
        """(session times, loop index) of stream time(s) ``stream_t``."""
        rel = np.asarray(stream_t, dtype=np.float64) - self.t0  # stream s since the first loop began
        loop = np.floor(rel / self.period).astype(np.int64)
        return self.start + (rel - loop * self.period) * self.speed, loop

    def desc(self, loop: bool) -> dict[str, str]:
        return {
            "t_offset": repr(self.t_offset),
            "t_start_stream": repr(self.t0),
            "session_start": repr(self.start),
            "session_end": repr(self.end),
            "speed": repr(self.speed),
            "loop": "1" if loop else "0",
        }


def replay_clock_from_info(info: Any) -> ReplayClock | None:
    """The :class:`ReplayClock` a replayed spike stream publishes in ``desc()/replay`` (None if absent)."""
    node = info.desc().child("replay")
    if node.empty():
        return None
    try:
        return ReplayClock(
            t0=float(node.child_value("t_start_stream")),
            start=float(node.child_value("session_start")),
            end=float(node.child_value("session_end")),
            speed=float(node.child_value("speed")),
        )
    except ValueError as err:
        raise invalid(f"LSL stream {info.name()!r}", "desc() replay clock is not numeric", str(err),
                      kind=StreamError) from None


def chunk_deadline(due: float, origin: float, chunk: float) -> float:
    """The first chunk boundary ``origin + k * chunk`` (k integer) at or after ``due``."""
    k = math.ceil((due - origin) / chunk)
    g = origin + k * chunk
    return g if g >= due else origin + (k + 1) * chunk


def sleep_until(
    deadline: float,
    spin_s: float,
    stop: threading.Event,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Sleep until ``spin_s`` before ``deadline`` (``clock`` seconds), then spin; False if stopped."""
    while True:
        left = deadline - clock() - spin_s
        if left <= 0:
            break
        if stop.is_set():
            return False
        time.sleep(min(left, _COARSE_MAX_S))
    while clock() < deadline:
        pass
    return not stop.is_set()


# ---------------------------------------------------------------------------------------------- lateness


class LatenessStats:
    """Lateness samples (s) in a fixed-size histogram: constant memory however long the replay runs.

    ``resolution_s`` wide bins up to ``span_s``; rarer values past it are kept exactly (up to
    ``max_overflow``, then only counted in the max). Negative values (early) count as 0 and in ``n_early``.
    """

    def __init__(self, resolution_s: float = 1e-6, span_s: float = 0.1, max_overflow: int = 100_000) -> None:
        self.resolution_s = resolution_s
        self.n_bins = round(span_s / resolution_s)
        self.hist = np.zeros(self.n_bins, np.int64)  # (H,) counts per resolution_s bin
        self.overflow: list[float] = []
        self.max_overflow = max_overflow
        self.count = 0
        self.n_early = 0
        self.max = -math.inf
        self.total = 0.0

    def add(self, x: float) -> None:
        self.count += 1
        self.total += x
        if x > self.max:
            self.max = x
        if x < 0:
            self.n_early += 1
            x = 0.0
        i = int(x / self.resolution_s)
        if i < self.n_bins:
            self.hist[i] += 1
        elif len(self.overflow) < self.max_overflow:
            self.overflow.append(x)

    def add_many(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        self.count += int(x.size)
        self.total += float(x.sum())
        self.max = max(self.max, float(x.max()))
        self.n_early += int(np.count_nonzero(x < 0))
        idx = (np.maximum(x, 0.0) / self.resolution_s).astype(np.int64)  # (n,) histogram bins
        inside = idx < self.n_bins
        if inside.all():
            np.add.at(self.hist, idx, 1)
        else:
            np.add.at(self.hist, idx[inside], 1)
            room = self.max_overflow - len(self.overflow)
            self.overflow.extend(np.maximum(x[~inside], 0.0)[:room].tolist())

    def quantile(self, q: float) -> float:
        """The q-th percentile (0..100) in seconds: the upper edge of its histogram bin (NaN when empty)."""
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(q / 100.0 * self.count))  # 1-based rank of the sample
        cum = np.cumsum(self.hist)
        if rank <= cum[-1]:
            i = int(np.searchsorted(cum, rank, side="left"))
            return min((i + 1) * self.resolution_s, max(self.max, 0.0))
        over = sorted(self.overflow)
        j = rank - int(cum[-1]) - 1
        return over[j] if j < len(over) else self.max

    def summary_ms(self) -> dict[str, float]:
        """count, p50/p90/p99/p99.9 and max in milliseconds, plus the mean and the early count."""
        out: dict[str, float] = {"count": float(self.count)}
        for q in QUANTILES:
            out[f"p{q:g}"] = self.quantile(q) * 1e3
        out["max"] = self.max * 1e3 if self.count else math.nan
        out["mean"] = self.total / self.count * 1e3 if self.count else math.nan
        out["n_early"] = float(self.n_early)
        return out


@dataclass
class ReplaySummary:
    """What one :meth:`Replayer.run` did."""

    eid: str
    probe: str
    stream: str
    speed: float
    session_start: float
    session_end: float
    t_offset: float  # stream time - session time / speed (loop 0)
    t_start_stream: float
    n_spikes: int
    n_behaviour: int
    n_markers: int
    n_chunks: int
    loops: int  # loops started (1 without --loop)
    completed: bool  # played to the end (not stopped early)
    wall_s: float
    # per chunk: the time all its events had left (after the pushes) - the chunk's deadline
    chunk_lateness_ms: dict[str, float] = field(default_factory=dict)
    wake_lateness_ms: dict[str, float] = field(default_factory=dict)  # per chunk: wake-up - deadline
    # per chunk with spikes: lateness of its earliest spike (push time - that spike's own stamp), which
    # bounds every spike's lateness; includes the wait for the chunk boundary (< chunk_s)
    worst_spike_lateness_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON (NaN -> None)."""

        def _clean(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: _clean(x) for k, x in v.items()}
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {k: _clean(v) for k, v in asdict(self).items()}

    def lines(self) -> list[str]:
        def _fmt(d: dict[str, float]) -> str:
            keys = [f"p{q:g}" for q in QUANTILES] + ["max"]
            return "  ".join(f"{k} {d.get(k, math.nan):.3f}" for k in keys)

        return [
            f"replayed {self.eid}/{self.probe} [{self.session_start:.3f}, {self.session_end:.3f}) s at speed "
            f"{self.speed:g}: {self.n_spikes} spikes, {self.n_behaviour} behaviour samples, {self.n_markers} "
            f"markers, {self.loops} loop(s), {self.wall_s:.1f} s{'' if self.completed else ' (stopped)'}",
            f"stream time = session time / speed + {self.t_offset:.6f} s",
            f"pacing lateness per chunk (ms, {int(self.chunk_lateness_ms.get('count', 0))} chunks): "
            + _fmt(self.chunk_lateness_ms),
            f"  of which waking up late (ms): {_fmt(self.wake_lateness_ms)}",
            "worst spike lateness per chunk (ms, incl. the wait for the chunk end): "
            + _fmt(self.worst_spike_lateness_ms),
        ]


# ---------------------------------------------------------------------------------------------- outlets


class _ReplaySpikeOutlet(LSLSpikeOutlet):
    """The ``Spikes`` outlet with the replay clock in ``desc()/replay`` and a larger buffer."""

    def __init__(
        self,
        name: str,
        units: StreamUnits,
        source_id: str,
        replay_desc: dict[str, str],
        max_buffered: int,
    ) -> None:
        lsl = pylsl()
        self.info = spike_stream_info(name, units.session_id, units.unit_ids, units.regions, source_id,
                                      BIN_SIZE_S)
        node = self.info.desc().append_child("replay")
        for key, value in replay_desc.items():
            node.append_child_value(key, value)
        self.n_units = len(units.unit_ids)
        self._outlet = lsl.StreamOutlet(self.info, chunk_size=0, max_buffered=max_buffered)


class _MarkerOutlet:
    """LSL ``Markers`` stream: irregular rate, one string channel, one sample per trial event."""

    def __init__(self, name: str, source_id: str, session_id: str, replay_desc: dict[str, str]) -> None:
        lsl = pylsl()
        self.info = lsl.StreamInfo(name, MARKERS_TYPE, 1, lsl.IRREGULAR_RATE, lsl.cf_string, source_id)
        self.info.desc().append_child_value("session_id", session_id)
        node = self.info.desc().append_child("replay")
        for key, value in replay_desc.items():
            node.append_child_value(key, value)
        self.info.set_channel_labels(["trial_event"])
        self._outlet: Any = lsl.StreamOutlet(self.info, chunk_size=1, max_buffered=10)

    def push(self, label: str, timestamp: float) -> None:
        self._outlet.push_sample([label], float(timestamp))

    def have_consumers(self) -> bool:
        return bool(self._outlet.have_consumers())

    def close(self) -> None:
        self._outlet = None


def stream_units(session: Session) -> StreamUnits:
    """The units a replay announces: one per row of the units table (id = cluster id, Beryl region)."""
    units = session.units
    ids = (units["cluster_id"] if "cluster_id" in units.columns else units.index).astype(str).tolist()
    regions = units["region"].astype(str).tolist() if "region" in units.columns else [""] * len(ids)
    return StreamUnits(tuple(ids), tuple(regions), str(session.eid))


# ---------------------------------------------------------------------------------------------- replayer


class Replayer:
    """Replays one :class:`Session` in-process: ``Replayer(session, cfg).run(stop_event) -> ReplaySummary``.

    :meth:`open` makes the outlets and fixes the clock (``t0 = now + lead_s``); :meth:`run` opens if
    needed and paces the segment (forever with ``loop``) until done or ``stop`` is set. Events due before
    ``run`` starts (``run`` called more than ``lead_s`` after ``open``) are pushed at once, late, with
    their exact stamps.
    """

    def __init__(self, session: Session, cfg: ReplayConfig | None = None) -> None:
        self.cfg = cfg = cfg or ReplayConfig()
        cfg.check()
        self.session = session
        self.start, self.end = replay_segment(session, cfg.start, cfg.duration)
        self.spikes: SpikeTimeline = segment_spikes(session, self.start, self.end)
        if self.spikes.times.size == 0:
            raise invalid(f"session {session.eid}/{session.probe}: segment [{self.start}, {self.end}) s",
                          "holds no spikes", None, "pick another --start/--duration", kind=DataError)
        self.units = stream_units(session)
        self.behaviour: BehaviourTimeline | None = (
            behaviour_timeline(session, self.start, self.end, cfg.behaviour_rate_hz)
            if cfg.lsl and cfg.behaviour else None
        )
        self.markers: MarkerTimeline | None = (
            trial_markers(session, self.start, self.end) if cfg.lsl and cfg.markers else None
        )
        self.source_id = f"neds-rt-replay-{session.eid}-{session.probe}"
        self.clock: ReplayClock | None = None
        self._clock_offset = 0.0  # stream clock - time.monotonic()
        self._lsl_spikes: _ReplaySpikeOutlet | None = None
        self._lsl_behaviour: LSLBehaviorOutlet | None = None
        self._lsl_markers: _MarkerOutlet | None = None
        self._zmq: ZMQSpikePublisher | None = None

    # -- outputs -----------------------------------------------------------------------------------------
    def open(self) -> ReplayClock:
        """Create the outlets and fix the clock; returns it. Idempotent."""
        if self.clock is not None:
            return self.clock
        cfg = self.cfg
        if cfg.lsl:
            lsl = pylsl()
            now_stream = float(lsl.local_clock())
            self._clock_offset = now_stream - time.monotonic()
        else:
            now_stream = time.monotonic()
            self._clock_offset = 0.0
        clock = ReplayClock(now_stream + cfg.lead_s, self.start, self.end, float(cfg.speed))
        desc = clock.desc(cfg.loop) | {"probe": self.session.probe}
        try:
            if cfg.zmq_out:
                self._zmq = ZMQSpikePublisher(cfg.zmq_out, topic=cfg.stream, units=self.units)
            if cfg.lsl:
                self._lsl_spikes = _ReplaySpikeOutlet(cfg.stream, self.units, self.source_id, desc,
                                                      cfg.max_buffered)
                if self.behaviour is not None:
                    self._lsl_behaviour = LSLBehaviorOutlet(
                        f"{cfg.stream}-behaviour", BEHAVIOUR_CHANNELS, f"{self.source_id}-behaviour",
                        rate_hz=self.behaviour.rate_hz * cfg.speed, session_id=str(self.session.eid),
                        max_buffered=60,
                    )
                if self.markers is not None:
                    self._lsl_markers = _MarkerOutlet(f"{cfg.stream}-markers", f"{self.source_id}-markers",
                                                      str(self.session.eid), desc)
        except Exception:
            self.close()
            raise
        self.clock = clock
        log.info("replay %s/%s [%.3f, %.3f) s at speed %g: stream %r%s, first sample at stream time %.6f "
                 "(t_offset %.6f)", self.session.eid, self.session.probe, self.start, self.end, cfg.speed,
                 cfg.stream, f", ZMQ {cfg.zmq_out}" if cfg.zmq_out else "", clock.t0, clock.t_offset)
        return clock

    def wait_for_consumers(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) until every spike output has a consumer; True when they all do."""
        self.open()
        deadline = time.monotonic() + timeout
        ok = True
        if self._zmq is not None:
            ok = self._zmq.wait_for_subscriber(max(0.0, deadline - time.monotonic()))
        if self._lsl_spikes is not None:
            ok = self._lsl_spikes.wait_for_consumers(max(0.0, deadline - time.monotonic())) and ok
        return ok

    def close(self) -> None:
        for out in (self._lsl_spikes, self._lsl_behaviour, self._lsl_markers, self._zmq):
            if out is not None:
                out.close()
        self._lsl_spikes = self._lsl_behaviour = self._lsl_markers = None
        self._zmq = None

    def __enter__(self) -> Replayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pacing ------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> ReplaySummary:
        """Play the segment (again and again with ``loop``) until done or ``stop`` is set."""
        clock = self.open()
        stop = stop or threading.Event()
        cfg, off, mono = self.cfg, self._clock_offset, time.monotonic
        start, speed, chunk, spin = self.start, clock.speed, cfg.chunk_s, cfg.spin_s
        sp_t, sp_u = self.spikes.times, self.spikes.units  # (S,) session s, (S,) int32 unit rows
        n_sp = sp_t.size
        bh, mk = self.behaviour, self.markers
        bh_t = bh.times if bh is not None and self._lsl_behaviour is not None else np.zeros(0)  # (B,) s
        mk_t = mk.times if mk is not None and self._lsl_markers is not None else np.zeros(0)  # (M,) s
        n_bh, n_mk = bh_t.size, mk_t.size
        chunk_lat, spike_lat, wake_lat = LatenessStats(), LatenessStats(), LatenessStats()
        counts = {"spikes": 0, "behaviour": 0, "markers": 0, "chunks": 0}
        loops, completed = 0, False
        restore = (enter_realtime("replay", REPLAY_PRIORITY if cfg.realtime else None, cfg.cpus)
                   if cfg.realtime or cfg.cpus else None)
        wall0 = mono()
        try:
            while True:
                base = clock.t0 + loops * clock.period  # stream time of the segment start in this loop
                i = ib = im = 0
                while True:
                    due_sp = base + (sp_t.item(i) - start) / speed if i < n_sp else math.inf
                    due_bh = base + (bh_t.item(ib) - start) / speed if ib < n_bh else math.inf
                    due_mk = base + (mk_t.item(im) - start) / speed if im < n_mk else math.inf
                    due = min(due_sp, due_bh, due_mk)
                    if due == math.inf:
                        break
                    g = chunk_deadline(due, clock.t0, chunk)  # stream time of this chunk's deadline
                    if not sleep_until(g - off, spin, stop, mono):
                        break
                    woke = mono() + off
                    wake_lat.add(woke - g)
                    horizon = max(g, woke)  # everything due by now leaves now (catch-up after a stall)
                    s_lim = start + (horizon - base) * speed  # session time of the horizon
                    first = math.inf  # stream time of the earliest spike pushed in this chunk
                    if due_sp <= horizon:
                        j = max(int(np.searchsorted(sp_t, s_lim, side="right")), i + 1)
                        stamps = base + (sp_t[i:j] - start) / speed  # (n,) float64 stream s, one per spike
                        units = sp_u[i:j]
                        if self._lsl_spikes is not None:
                            self._lsl_spikes.push(stamps, units)
                        if self._zmq is not None:
                            self._zmq.publish(stamps, units)
                        first = float(stamps[0])
                        counts["spikes"] += j - i
                        i = j
                    if due_bh <= horizon and bh is not None and self._lsl_behaviour is not None:
                        jb = max(int(np.searchsorted(bh_t, s_lim, side="right")), ib + 1)
                        for k in range(ib, jb):
                            self._lsl_behaviour.push(bh.values[k], base + (bh_t[k] - start) / speed)
                        counts["behaviour"] += jb - ib
                        ib = jb
                    if due_mk <= horizon and mk is not None and self._lsl_markers is not None:
                        jm = max(int(np.searchsorted(mk_t, s_lim, side="right")), im + 1)
                        for k in range(im, jm):
                            self._lsl_markers.push(mk.labels[k], base + (mk_t[k] - start) / speed)
                        counts["markers"] += jm - im
                        im = jm
                    t_push = mono() + off  # stream clock after the pushes
                    chunk_lat.add(t_push - g)
                    if first != math.inf:
                        spike_lat.add(t_push - first)
                    counts["chunks"] += 1
                loops += 1
                if stop.is_set():
                    break
                if not cfg.loop:
                    completed = True
                    break
        finally:
            if restore is not None:
                restore()
        summary = ReplaySummary(
            eid=str(self.session.eid), probe=self.session.probe, stream=cfg.stream, speed=speed,
            session_start=start, session_end=self.end, t_offset=clock.t_offset, t_start_stream=clock.t0,
            n_spikes=counts["spikes"], n_behaviour=counts["behaviour"], n_markers=counts["markers"],
            n_chunks=counts["chunks"], loops=loops, completed=completed, wall_s=mono() - wall0,
            chunk_lateness_ms=chunk_lat.summary_ms(), wake_lateness_ms=wake_lat.summary_ms(),
            worst_spike_lateness_ms=spike_lat.summary_ms(),
        )
        for line in summary.lines():
            log.info("%s", line)
        return summary


def load_replay_session(data: Path, eid: str, probe: str | None = None) -> Session:
    """Open the ONE cache at ``data`` and load one probe of one session (DataError names what is missing)."""
    from streams.load import load_session, open_one

    return load_session(open_one(Path(data)), eid, probe)
