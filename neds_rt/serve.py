"""The real-time serve loop: spikes in, one decode per 20 ms bin out, every bin stamped, logged and accounted.

Threads. An I/O thread polls the inlet (LSL or ZMQ; parsing happens there, off the bin loop) at most once per
``io_period_s`` (2 ms) while data flows, so it wakes ~500 times a second, not once per sender chunk; it copies
each batch, maps stream unit indices to model columns and hands it to the bin loop through a bounded queue (a
full queue drops the batch and counts it: ``dropped_batches`` / ``dropped_events``). The bin loop
(:meth:`Server.run`, in the caller's thread) drains the queue into the binner, closes every bin whose end +
grace has passed on the stream clock (:mod:`neds_rt.clock`), and for each closed bin, in order: one engine
step -> LSL ``Behavior`` sample (timestamp = bin end) -> ZMQ decode (header: bin index, stamps, flags) ->
decode log -> telemetry. It then sleeps until the next bin's deadline (deadline-based waiting; on the local
clock batches wait in the queue until then, so the loop wakes once per bin). On the local clock it also wakes
shortly before each deadline for one throwaway engine run (``Engine.prewarm``), so that the real step finds
the weights and the key/value rings in cache: ``prewarm_ms`` (3 ms) before it, then, with ``prewarm_adapt``,
as long before it as recent prewarms took plus a margin (:mod:`neds_rt.prewarm`).

Bins. Bin ``k`` covers ``[t0 + k*bin, t0 + (k+1)*bin)`` in stream time; ``t0`` is ``--t0`` or the first
event's time floored to the bin grid (events) / the first bin's start (binned counts), and the first bin
served is the one holding the first data. Bin indices in every output are ``k``.

Problems are counted (see :class:`neds_rt.telemetry.Summary` ``counts``) and never stop the loop:

- events the binner rejects (``late``, ``nan_time``, ``unknown_unit``, ``ahead``) are logged with the bins
  they hit and kept in :attr:`Server.rejected`; late spikes cannot change a bin already published, so
  FLAG_LATE_SPIKES is set on the FIRST BIN PUBLISHED AFTER they arrived (the log line names the bins hit);
- gaps: bins with no data because the stream stalled (nothing received for ``stall_s``, or the LSL inlet is
  disconnected), bins inside a gap the inlet reports (LSL reconnect, ZMQ sequence jump) that are still open,
  and, for binned counts, bins whose row never came, are closed in order with zero counts and
  FLAG_GAP_FILLED, so time never shifts. With the local clock the first ``stall_s`` of a stall cannot be told
  from silence and closes unflagged;
- a stage over its latency budget sets FLAG_OVERRUN (stages up to inference on the published message; the
  decode log's flags also cover the publish stage) and is logged with the stage.

Real-time habits: preallocated rows and rings, numba JIT and model warm-up before the first bin (then the
engine is reset, and before the inlet opens), the process's large memory then moved onto 2 MiB pages
(:mod:`neds_rt.hugepages`), ``gc.freeze()`` + ``gc.disable()`` while serving, and a 0.2 ms GIL switch
interval so the bin loop takes the GIL back from the I/O thread quickly (all restored on exit).
On close, the LSL outlet lingers 0.2 s so the last decodes reach connected consumers.
"""

from __future__ import annotations

import gc
import logging
import math
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from neds_rt import wire
from neds_rt.binning import RejectedEvents, RingBinner
from neds_rt.clock import StreamClock, grid_origin, host_now
from neds_rt.errors import StreamError, invalid
from neds_rt.hugepages import use_huge_pages
from neds_rt.inlets import CountsBatch, Gap, SpikeBatch, match_units
from neds_rt.prewarm import MAX_PREWARM_S, PrewarmLead
from neds_rt.realtime import SERVE_PRIORITY, enter_realtime
from neds_rt.telemetry import Summary, Telemetry, stage_budgets

log = logging.getLogger(__name__)

KINDS: Final = ("auto", "events", "counts")
_MAX_CLOCK_OFFSET_S: Final = 2.0  # local clock: first event further than this from "now" is refused
_LOG_FIRST: Final = 10
_SWITCH_INTERVAL_S: Final = 0.0002
_LSL_LINGER_S: Final = 0.2  # on close, time for the last Behavior samples to reach LSL consumers
PREWARM_MS: Final = 3.0  # default lead of the prewarm run (four 60-s A/B runs: total p50 2.07 -> 1.84 ms)


@dataclass
class ServeConfig:
    """One serve run (the CLI options of ``neds-rt serve``)."""

    model: Path
    stream: str = "spikes"  # LSL stream name, or the ZMQ topic with zmq_in
    engine: str = "onnx"
    device: str = "cpu"
    cuda_graph: bool = False  # onnxruntime on CUDA: replay each step as one CUDA graph (Engine docs)
    threads: int = 1
    kind: str = "auto"  # auto (LSL: by stream type; ZMQ: events), events, counts
    zmq_in: str | None = None  # connect a SUB here instead of resolving an LSL stream
    zmq_out: str | None = None  # bind a decode PUB here
    out_stream: str = "neds_decodes"  # LSL Behavior stream name
    log_path: Path | None = None  # decode log (CSV); None: no log
    overwrite_log: bool = False
    grace_ms: float | None = None  # None: 5 ms for events, 50 ms for binned counts
    duration_s: float | None = None  # stop after this long (None: until stop() / a signal)
    clock: str = "local"  # local | stream, see neds_rt.clock
    t0: float | None = None  # bin-grid origin in stream seconds
    stall_s: float = 1.0  # watchdog: no data for this long = stalled (bins gap-filled)
    status_s: float = 5.0
    resolve_timeout_s: float = 10.0
    wait_clients_s: float = 0.0  # before serving, wait this long for an LSL consumer / ZMQ subscriber
    queue_size: int = 1024  # batches between the I/O thread and the bin loop
    io_period_s: float = 0.002  # the I/O thread pulls at most once per period (a pull per replay chunk
    # would wake it ~2000 times a second); spikes wait at most this long, well inside the 5 ms grace
    warmup_steps: int = 50
    keep_rejected: int = 10_000  # rejected-event batches kept in Server.rejected
    realtime: bool = False  # the whole process at SCHED_FIFO (neds_rt.realtime), set before any thread starts
    cpus: tuple[int, ...] | None = None  # pin the process (all its threads) to these CPUs
    huge_pages: bool = True  # after warm-up, back large memory with 2 MiB pages (neds_rt.hugepages)
    prewarm_ms: float = PREWARM_MS  # local clock: this long before each bin closes, one throwaway engine run
    # (Engine.prewarm) brings the weights and state back into cache; 0 turns it off
    prewarm_adapt: bool = True  # after 16 prewarms, the lead follows their durations (neds_rt.prewarm)


class _CountsRing:
    """Binned-count rows waiting for their bin, keyed by bin index (the counts-stream binner)."""

    def __init__(self, n_units: int, t0: float, bin_size: float, grace: float, ring_bins: int = 256) -> None:
        self.t0, self.bin_size, self.grace = t0, bin_size, grace
        self.rows = np.zeros((ring_bins, n_units), np.int32)  # (R, N) counts per pending bin
        self.have = np.zeros(ring_bins, bool)  # (R,) a row arrived for this slot
        self.next_bin = 0

    def bin_end(self, k: int) -> float:
        return self.t0 + (k + 1) * self.bin_size

    def index(self, t_start: float) -> int:
        return round((t_start - self.t0) / self.bin_size)

    def add(self, t_start: np.ndarray, counts: np.ndarray) -> dict[str, list[int]]:
        """Store rows; return bins of rows refused by reason (late / nan_time / ahead)."""
        bad: dict[str, list[int]] = {}
        r = self.rows.shape[0]
        for i in range(t_start.shape[0]):
            t = float(t_start[i])
            if not math.isfinite(t):
                bad.setdefault("nan_time", []).append(-1)
                continue
            k = self.index(t)
            if k < self.next_bin:
                bad.setdefault("late", []).append(k)
            elif k >= self.next_bin + r:
                bad.setdefault("ahead", []).append(k)
            else:
                self.rows[k % r] = counts[i]
                self.have[k % r] = True
        return bad

    def ready(self) -> bool:
        return bool(self.have[self.next_bin % self.rows.shape[0]])

    def closable(self, now: float) -> int:
        if not math.isfinite(now):
            return 0
        last = math.floor((now - self.grace - self.t0) / self.bin_size)  # bin holding now - grace
        return max(0, last - self.next_bin)

    def pop(self, out: np.ndarray) -> tuple[int, bool]:
        k = self.next_bin
        slot = k % self.rows.shape[0]
        out[:] = self.rows[slot]
        had = bool(self.have[slot])
        self.rows[slot] = 0
        self.have[slot] = False
        self.next_bin = k + 1
        return k, had

    def skip_to(self, k: int) -> None:
        self.next_bin = k


class Server:
    """A serve run: :meth:`open` (engine, warm-up, inlet with unit check, outlets, log), :meth:`run` (the
    loop, until :meth:`stop`, the duration or a fatal stream error) -> :class:`Summary`. Thread-safe
    :meth:`stop`; not reusable after :meth:`run` returns."""

    def __init__(self, cfg: ServeConfig) -> None:
        if cfg.kind not in KINDS:
            raise invalid("--kind", f"must be one of {KINDS}", cfg.kind)
        if cfg.grace_ms is not None and not cfg.grace_ms >= 0:
            raise invalid("--grace", "must be >= 0 ms", cfg.grace_ms, "pass e.g. --grace 5")
        if cfg.duration_s is not None and not cfg.duration_s > 0:
            raise invalid("--duration", "must be > 0 s", cfg.duration_s)
        if not 0 <= cfg.io_period_s < cfg.stall_s:
            raise invalid("io_period_s", "must be >= 0 s and below the stall timeout", cfg.io_period_s)
        if not cfg.stall_s > 0 or cfg.queue_size < 1:
            raise invalid("stall_s/queue_size", "must be positive", (cfg.stall_s, cfg.queue_size))
        if not 0 <= cfg.prewarm_ms < 1e3 * MAX_PREWARM_S:
            raise invalid("--prewarm-ms", f"must be >= 0 ms and below {1e3 * MAX_PREWARM_S:g} ms",
                          cfg.prewarm_ms, "pass e.g. --prewarm-ms 3, or 0 to turn it off")
        if cfg.cuda_graph and (cfg.engine, cfg.device) != ("onnx", "cuda"):
            raise invalid("--cuda-graph", "needs --engine onnx --device cuda", (cfg.engine, cfg.device))
        self.cfg = cfg
        self.clock = StreamClock(cfg.clock)
        self.rejected: deque[RejectedEvents] = deque(maxlen=cfg.keep_rejected)
        self.t0: float | None = cfg.t0
        self.first_bin: int | None = None
        self.last_bin: int | None = None
        self.summary: Summary | None = None
        self.ready = threading.Event()  # set when serving starts (after warm-up and waiting for clients)
        self._stop = threading.Event()
        self._opened = False
        self._closed = False
        self._fatal: BaseException | None = None
        self._queue: queue.Queue[SpikeBatch | CountsBatch] = queue.Queue(cfg.queue_size)
        self._io: dict[str, int] = {"dropped_batches": 0, "dropped_events": 0, "io_errors": 0, "gaps": 0,
                                    "unused_unit_spikes": 0}
        self._last_data_at: float | None = None  # host time of the newest non-empty batch (I/O thread)
        self._newest_time = -math.inf  # newest finite stream time received (bin loop)
        self._src: RingBinner | _CountsRing | None = None
        self._gap_ranges: list[tuple[int, int]] = []  # [lo, hi) bins inside a reported gap
        self._pending_flags = 0
        self._stalled = False
        self._waiting_logged = 0.0
        self._prewarmed_bin = -1  # the bin whose close the last prewarm run was for
        self._prewarm_lead = (PrewarmLead(cfg.prewarm_ms / 1e3, adapt=cfg.prewarm_adapt)
                              if cfg.prewarm_ms > 0 else None)
        self._log_counts: dict[str, int] = {}
        self._io_thread: threading.Thread | None = None
        self.engine: Any = None
        self.inlet: Any = None
        self.lsl_out: Any = None
        self.zmq_out: Any = None
        self.decode_log: Any = None

    # -- open --------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Load and warm the engine, open the inlet (refusing a unit mismatch), the outlets and the log."""
        if self._opened:
            return
        try:
            self._open()
        except BaseException:
            self._close_io()
            raise
        self._opened = True

    def _open(self) -> None:
        from neds_rt.engine import open_engine

        cfg = self.cfg
        self.engine = open_engine(cfg.model, engine=cfg.engine, device=cfg.device, threads=cfg.threads,
                                  cuda_graph=cfg.cuda_graph)
        meta = self.engine.meta
        self.bin_size = float(meta.bin_size)
        self.n_units = meta.n_units
        self._row_i32 = np.zeros(self.n_units, np.int32)  # (N,) counts of the closing bin
        self._row_f32 = np.zeros((1, self.n_units), np.float32)  # (1, N) engine input
        self._st: dict[str, float] = dict.fromkeys(wire.STAMP_NAMES, 0.0)
        self._warm_up()  # before the inlet opens: a publisher waiting for us starts sending then
        self._open_outputs(meta)
        self.inlet, self.kind = self._open_inlet()  # last: data buffers from here until run() starts
        grace_ms = cfg.grace_ms if cfg.grace_ms is not None else (5.0 if self.kind == "events" else 50.0)
        self.grace = grace_ms / 1e3
        budgets = stage_budgets(self.grace)
        if cfg.clock == "stream":
            budgets.pop("close")  # bin_end (stream clock) and closed (host clock) are not comparable
        self.telemetry = Telemetry(budgets, status_s=cfg.status_s)
        stream_units = self.inlet.units
        model_units = [str(u) for u in meta.unit_ids]
        # every model unit must be in the stream; stream units the model does not use (e.g. below the
        # training firing-rate threshold) are dropped in the I/O thread and counted as unused_unit_spikes
        unit_map = match_units(stream_units, model_units, allow_extra=True)  # (N_stream,) model col or -1
        if stream_units.session_id and stream_units.session_id != meta.session:
            log.warning("stream %r is session %s but the model was exported for %s (units match)",
                        cfg.stream, stream_units.session_id, meta.session)
        identity = np.array_equal(unit_map, np.arange(self.n_units))
        self._unit_map = None if identity else unit_map.astype(np.int64)
        used = np.flatnonzero(unit_map >= 0)
        self._col_perm = None if identity else used[np.argsort(unit_map[used])]  # (N,) stream col of unit j
        n_unused = int((unit_map < 0).sum())
        if n_unused:
            log.info("the stream has %s units the model does not use; their spikes are counted and dropped",
                     n_unused)
        elif not identity:
            log.info("stream units are in another order than the model's; remapping columns")
        log.info("serving %s (%s%s, %s units, context %s bins) on %s stream %r, grace %.1f ms, clock %s",
                 cfg.model, cfg.engine, f", {meta.weights} weights" if meta.weights != "float32" else "",
                 self.n_units, meta.context, self.kind, cfg.stream, grace_ms, cfg.clock)

    def _open_inlet(self) -> tuple[Any, str]:
        from neds_rt.inlets import LSLSpikeInlet, ZMQSpikeInlet
        from neds_rt.lsl_streams import COUNTS_TYPE, SPIKES_TYPE

        cfg = self.cfg
        if cfg.zmq_in:
            kind: Literal["events", "counts"] = "counts" if cfg.kind == "counts" else "events"
            zin = ZMQSpikeInlet(cfg.zmq_in, topic=cfg.stream, kind=kind, bind=False)
            try:
                zin.wait_for_units(cfg.resolve_timeout_s)
            except BaseException:
                zin.close()
                raise
            if zin.bin_size_s is not None and abs(zin.bin_size_s - self.bin_size) > 1e-9 and kind == "counts":
                zin.close()
                raise invalid(f"ZMQ stream {cfg.zmq_in}", f"bins of {zin.bin_size_s} s do not match the "
                              f"model's {self.bin_size} s", zin.bin_size_s, kind=StreamError)
            return zin, kind
        if cfg.kind == "auto":
            from neds_rt.lsl_scope import pylsl

            found = pylsl().resolve_byprop("name", cfg.stream, minimum=1, timeout=cfg.resolve_timeout_s)
            if not found:
                raise invalid("--stream", f"no LSL stream named {cfg.stream!r} within "
                              f"{cfg.resolve_timeout_s} s", cfg.stream,
                              "start the replay / acquisition first, check the name and --lsl-scope",
                              kind=StreamError)
            kind = "counts" if found[0].type() == COUNTS_TYPE else "events"
        else:
            kind = "counts" if cfg.kind == "counts" else "events"
        stype = COUNTS_TYPE if kind == "counts" else SPIKES_TYPE
        return LSLSpikeInlet(cfg.stream, stype=stype, resolve_timeout=cfg.resolve_timeout_s), kind

    def _warm_up(self) -> None:
        """JIT the binner kernels and run the engine ``warmup_steps`` times, then reset its state."""
        b = RingBinner(self.n_units, 0.0, self.bin_size, 0.0)
        b.add(np.array([0.001, np.nan, 0.5, 1e6]), np.array([0, 0, self.n_units, 0]))
        b.closable(1.0)
        b.pop(self._row_i32)
        x = np.random.default_rng(0).poisson(1.0, (1, self.n_units)).astype(np.float32)  # (1, N)
        for _ in range(self.cfg.warmup_steps):
            self.engine.step(x)
        self.engine.reset()
        self._row_i32[:] = 0

    def _open_outputs(self, meta: Any) -> None:
        from neds_rt.decode_log import DecodeLogWriter
        from neds_rt.outlets import LSLBehaviorOutlet, ZMQDecodePublisher

        cfg = self.cfg
        channels = [(o.label, o.unit) for o in meta.outputs]
        self.labels = [c[0] for c in channels]
        self.lsl_out = LSLBehaviorOutlet(cfg.out_stream, channels, f"neds-rt-serve:{meta.session}:"
                                         f"{cfg.out_stream}", rate_hz=1.0 / self.bin_size,
                                         session_id=meta.session)
        if cfg.zmq_out:
            self.zmq_out = ZMQDecodePublisher(cfg.zmq_out, self.labels, bind=True)
        if cfg.log_path is not None:
            self.decode_log = DecodeLogWriter(cfg.log_path, self.labels, overwrite=cfg.overwrite_log)

    # -- run ---------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish (thread- and signal-safe)."""
        self._stop.set()

    def run(self) -> Summary:
        """Serve until :meth:`stop`, the duration, or a fatal stream error (re-raised after a clean close)."""
        cfg = self.cfg
        restore = (enter_realtime("serve", SERVE_PRIORITY if cfg.realtime else None, cfg.cpus)
                   if cfg.realtime or cfg.cpus else None)  # before open(): liblsl's threads inherit it
        try:
            return self._run()
        finally:
            if restore is not None:
                restore()

    def _run(self) -> Summary:
        self.open()
        cfg = self.cfg
        gc_was_enabled = gc.isenabled()
        switch = sys.getswitchinterval()
        try:
            # the bin loop gets the GIL back from the I/O thread within 0.2 ms, not Python's default 5 ms
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
            self._wait_for_clients()
            gc.collect()
            if cfg.huge_pages:  # after every allocation of warm-up and open(): weights, rings, buffers
                use_huge_pages()
            gc.freeze()
            gc.disable()
            self._io_thread = threading.Thread(target=self._io_loop, name="serve-io", daemon=True)
            self._io_thread.start()
            start = host_now()
            self.telemetry.start(start)
            end_at = start + cfg.duration_s if cfg.duration_s is not None else math.inf
            self.ready.set()
            while not self._stop.is_set():
                now = host_now()
                if now >= end_at:
                    break
                self._drain()
                self._watchdog(host_now())
                self._close_due()
                self._status(host_now())
                self._wait(end_at)
        finally:
            self._stop.set()
            sys.setswitchinterval(switch)
            if gc_was_enabled:
                gc.enable()
            gc.unfreeze()
            self._close_io()
            self.summary = self._finish()
        if self._fatal is not None:
            raise self._fatal
        return self.summary

    def _wait_for_clients(self) -> None:
        t = self.cfg.wait_clients_s
        if t <= 0:
            return
        if not self.lsl_out.wait_for_consumers(t):
            log.warning("no LSL consumer of %r after %.1f s; serving anyway", self.cfg.out_stream, t)
        if self.zmq_out is not None and not self.zmq_out.wait_for_subscriber(t):
            log.warning("no ZMQ subscriber on %s after %.1f s; serving anyway", self.cfg.zmq_out, t)

    def _wait(self, end_at: float) -> None:
        """Sleep until the next bin's deadline (bin end + grace). Batches wait in the queue until then on the
        local clock (one wake-up per bin, not one per batch); before the grid starts, and on the stream
        clock, where data moves the deadlines, the first batch to arrive wakes the loop."""
        timeout = 0.1
        on_grid = self._src if self.clock.mode == "local" else None  # local deadlines, once the grid exists
        if on_grid is not None:
            deadline = on_grid.bin_end(on_grid.next_bin) + self.grace
            if self._prewarm_lead is not None and self._prewarmed_bin != on_grid.next_bin:
                deadline = self._prewarm(self._prewarm_lead, on_grid.next_bin, deadline)
            timeout = min(timeout, deadline - host_now())
        timeout = min(timeout, end_at - host_now())
        if timeout <= 0:
            return
        if on_grid is not None:
            self._stop.wait(timeout)
            return
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return
        self._take(item)

    def _prewarm(self, lead: PrewarmLead, k: int, deadline: float) -> float:
        """Run Engine.prewarm for bin ``k`` once its time has come (``lead`` before the deadline) and return
        the next time to wake: the prewarm time while it is ahead, else the deadline. A prewarm needs at
        least half its lead before the deadline, so it never delays the close by much; when the loop comes
        too late (a slow close, a catch-up after a stall) it is skipped and counted. Each run's duration
        goes to ``lead``, which adapts the lead to it (:mod:`neds_rt.prewarm`)."""
        lead_s = lead.lead()
        now = host_now()
        if now < deadline - lead_s:
            return deadline - lead_s
        self._prewarmed_bin = k
        if deadline - now < lead_s / 2:
            self._count("prewarm_skipped", 1)
            return deadline
        self.engine.prewarm()
        lead.record(host_now() - now)
        self._count("prewarms", 1)
        return deadline

    # -- I/O thread --------------------------------------------------------------------------------------
    def _io_loop(self) -> None:
        inlet, io, period = self.inlet, self._io, self.cfg.io_period_s
        next_pull = 0.0
        while not self._stop.is_set():
            rest = next_pull - host_now()
            if rest > 0 and self._stop.wait(rest):  # coalesce: one pull per period while data flows
                return
            next_pull = host_now() + period
            try:
                batch = inlet.poll(5.0)
            except StreamError as e:  # e.g. the stream came back with other units: cannot go on
                log.error("stream error, stopping: %s", e)
                self._fatal = e
                self._stop.set()
                return
            except Exception as e:  # a transient transport failure must not kill the loop
                io["io_errors"] += 1
                log.warning("inlet poll failed (%s); retrying", e)
                self._stop.wait(0.05)
                continue
            if batch is None:
                continue
            item = self._own(batch)
            n = item.times.shape[0] if isinstance(item, SpikeBatch) else item.t_start.shape[0]
            if n:
                self._last_data_at = host_now()
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                io["dropped_batches"] += 1
                io["dropped_events"] += n
                if io["dropped_batches"] <= _LOG_FIRST or io["dropped_batches"] % 1000 == 0:
                    log.warning("bin loop queue full: dropped batch #%s (%s events)",
                                io["dropped_batches"], n)

    def _own(self, batch: SpikeBatch | CountsBatch) -> SpikeBatch | CountsBatch:
        """Copy the inlet's buffers and map stream units / columns onto the model's (I/O thread)."""
        if isinstance(batch, SpikeBatch):
            u = batch.units.astype(np.int64)  # (n,) stream unit index
            t = batch.times.astype(np.float64)  # (n,)
            if self._unit_map is not None:
                ok = (u >= 0) & (u < self._unit_map.shape[0])  # out of range: the binner's unknown_unit
                u = np.where(ok, self._unit_map[np.where(ok, u, 0)], -1)  # (n,) model column or -1
                unused = ok & (u < 0)  # a unit of the stream that the model does not use
                if unused.any():
                    self._io["unused_unit_spikes"] += int(unused.sum())
                    t, u = t[~unused], u[~unused]
            return SpikeBatch(t, u, batch.gap)
        c = batch.counts if self._col_perm is None else batch.counts[:, self._col_perm]
        return CountsBatch(batch.t_start.astype(np.float64), np.array(c, np.int32), batch.gap)

    # -- bin loop ----------------------------------------------------------------------------------------
    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._take(item)

    def _take(self, item: SpikeBatch | CountsBatch) -> None:
        times = item.times if isinstance(item, SpikeBatch) else item.t_start
        newest = float(np.fmax.reduce(times)) if times.shape[0] else math.nan
        if self._src is None:
            if not math.isfinite(newest):
                self._count("nan_time" if times.shape[0] else "empty_before_start",
                            int(times.shape[0]) if times.shape[0] else 1)
                return
            self._start_grid(float(np.fmin.reduce(times)))
        src = self._src
        assert src is not None
        if item.gap is not None:
            self._on_gap(item.gap, times)
        if isinstance(item, SpikeBatch):
            assert isinstance(src, RingBinner)
            for r in src.add(item.times, item.units):
                self._on_rejected(r, src.next_bin)
        else:
            assert isinstance(src, _CountsRing)
            for reason, bins in src.add(item.t_start, item.counts).items():
                self._count(f"{reason}_count_rows", len(bins))
                if reason == "late":
                    self._pending_flags |= wire.FLAG_LATE_SPIKES
                self._log_problem(reason, "%s binned-count rows (%s) for bins %s; oldest open bin %s",
                                  len(bins), reason, bins[:10], src.next_bin)
            newest = newest + self.bin_size  # a counts row covers its bin up to t_start + bin
        if math.isfinite(newest) and newest > self._newest_time:
            self._newest_time = newest
            self.clock.observe(newest)

    def _start_grid(self, first: float) -> None:
        cfg = self.cfg
        if self.clock.mode == "local" and abs(first - host_now()) > _MAX_CLOCK_OFFSET_S:
            err = invalid(f"stream {cfg.stream!r} timestamps", f"are {first - host_now():+.1f} s from this "
                          "host's clock, so no bin could close on time", first,
                          "publish on the host clock (LSL does this), or pass --clock stream",
                          kind=StreamError)
            self._fatal = err
            self._stop.set()
            raise err
        if self.kind == "events":
            self.t0 = cfg.t0 if cfg.t0 is not None else grid_origin(first, self.bin_size)
            src: RingBinner | _CountsRing = RingBinner(self.n_units, self.t0, self.bin_size, self.grace)
            k = math.floor((first - self.t0) / self.bin_size)
        else:
            self.t0 = cfg.t0 if cfg.t0 is not None else first
            src = _CountsRing(self.n_units, self.t0, self.bin_size, self.grace)
            k = src.index(first)
        if k < 0:
            raise invalid("--t0", "must not be after the first event", (self.t0, first))
        src.skip_to(k)
        self.first_bin = k
        self._src = src
        log.info("bin grid: t0 %.6f s (stream time), first bin %s starts at %.6f s",
                 self.t0, k, self.t0 + k * self.bin_size)

    def _on_gap(self, gap: Gap, times: np.ndarray) -> None:
        src = self._src
        assert src is not None
        self._io["gaps"] += 1
        first = float(np.fmin.reduce(times)) if times.shape[0] else math.nan
        lo = src.next_bin
        if gap.last_time is not None:
            lo = max(lo, math.floor((gap.last_time - src.t0) / self.bin_size) + 1)
        hi = math.floor((first - src.t0) / self.bin_size) if math.isfinite(first) else lo
        log.warning("stream gap (%s; lost %.3f s on the host clock); open bins [%s, %s) will be gap-filled",
                    gap.reason, gap.resumed_at - gap.lost_at, lo, hi)
        if hi > lo:
            self._gap_ranges.append((lo, hi))

    def late_events(self) -> dict[str, list[int]]:
        """The late spikes kept in :attr:`rejected`: the bin each hit and its model column (one entry per
        spike). An offline recompute that drops them reproduces what was served."""
        late = [r for r in self.rejected if r.reason == "late"]
        bins = np.concatenate([r.bins for r in late]) if late else np.zeros(0, np.int64)
        cols = np.concatenate([r.units for r in late]) if late else np.zeros(0, np.int64)
        return {"bin": bins.astype(int).tolist(), "column": cols.astype(int).tolist()}

    def _on_rejected(self, r: RejectedEvents, next_bin: int) -> None:
        self.rejected.append(r)
        n = int(r.times.shape[0])
        if r.reason == "late":
            self._pending_flags |= wire.FLAG_LATE_SPIKES
        self._count(r.reason, n)
        self._log_problem(r.reason, "%s %s events hit bins %s (units %s); oldest open bin %s", n, r.reason,
                          np.unique(r.bins)[:10].tolist(), np.unique(r.units)[:10].tolist(), next_bin)

    def _count(self, what: str, n: int) -> None:
        self.telemetry.counts[what] += n

    def _log_problem(self, reason: str, fmt: str, *args: object) -> None:
        n = self._log_counts.get(reason, 0) + 1
        self._log_counts[reason] = n
        if n <= _LOG_FIRST or n % 1000 == 0:
            log.warning(fmt + " [report #%s]", *args, n)

    def _is_gap_bin(self, k: int) -> bool:
        if self._stalled and self.clock.mode == "local":  # stream clock: bins close only as data arrive
            return True
        while self._gap_ranges and self._gap_ranges[0][1] <= k:
            self._gap_ranges.pop(0)
        return any(lo <= k < hi for lo, hi in self._gap_ranges)

    def _close_due(self) -> None:
        src = self._src
        if src is None:
            return
        n = src.closable(self.clock.now())
        if isinstance(src, _CountsRing):
            while n > 0 or src.ready():
                self._close_one()
                n -= 1
        else:
            for _ in range(n):
                self._close_one()

    def _close_one(self) -> None:
        src, st, tele = self._src, self._st, self.telemetry
        assert src is not None
        if isinstance(src, _CountsRing):
            k, had = src.pop(self._row_i32)
            gap = not had or self._is_gap_bin(k)
        else:
            k = src.pop(self._row_i32)
            gap = self._is_gap_bin(k)
        st["closed"] = host_now()
        bin_end = src.bin_end(k)
        st["bin_end"] = bin_end
        flags, self._pending_flags = self._pending_flags, 0
        if gap:
            flags |= wire.FLAG_GAP_FILLED
            tele.counts["gap_filled_bins"] += 1
        np.copyto(self._row_f32[0], self._row_i32)
        st["infer_start"] = host_now()
        dec = self.engine.step(self._row_f32)[0]  # (C,) float32 decodes of bin k
        st["infer_end"] = host_now()
        if tele.over_budget(st, ("close", "counts", "infer"), k):
            flags |= wire.FLAG_OVERRUN
        self.lsl_out.push(dec, bin_end)
        st["published"] = host_now()
        if self.zmq_out is not None:
            self.zmq_out.publish(k, bin_end, st, flags, dec)
        if tele.over_budget(st, ("publish", "close_to_published"), k):
            flags |= wire.FLAG_OVERRUN
        if flags & wire.FLAG_OVERRUN:
            tele.counts["overrun_bins"] += 1
        if self.decode_log is not None:
            self.decode_log.append(k, bin_end, st, flags, dec)
        tele.record(k, st)
        self.last_bin = k

    def _watchdog(self, now: float) -> None:
        """Track whether the stream is stalled (nothing for ``stall_s`` or the LSL inlet disconnected)."""
        last = self._last_data_at
        if last is None:
            if now - self._waiting_logged >= 5.0:
                log.info("waiting for the first data on stream %r", self.cfg.stream)
                self._waiting_logged = now
        else:
            silent = now - last
            lost = not getattr(self.inlet, "connected", True)
            if not self._stalled and (silent > self.cfg.stall_s or lost):
                self._stalled = True
                self._count("stalls", 1)
                log.warning("stream %r delivered nothing for %.2f s (newest stream time %.3f); closing bins "
                            "empty and flagging them gap-filled", self.cfg.stream, silent, self._newest_time)
            elif self._stalled and silent <= self.cfg.stall_s and not lost:
                self._stalled = False
                log.warning("stream %r flowing again; %s bins gap-filled so far", self.cfg.stream,
                            self.telemetry.counts["gap_filled_bins"])

    def _status(self, now: float) -> None:
        self._sync_counts()
        line = self.telemetry.status_line(now)
        if line is not None:
            log.info("%s", line)
            gc.collect(0)

    def _sync_counts(self) -> None:
        c = self.telemetry.counts
        for k, v in self._io.items():
            c[k] = v
        inlet = self.inlet
        if inlet is not None and hasattr(inlet, "n_malformed"):
            c["malformed_messages"] = inlet.n_malformed
            c["dropped_messages"] = inlet.seq.dropped

    # -- close -------------------------------------------------------------------------------------------
    def _close_io(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._io_thread is not None:
            self._io_thread.join(timeout=5.0)
        if self.lsl_out is not None and self.last_bin is not None and self.lsl_out.have_consumers():
            time.sleep(_LSL_LINGER_S)  # closing an outlet drops samples still in flight to consumers
        for name in ("inlet", "zmq_out", "lsl_out"):
            obj = getattr(self, name)
            if obj is not None:
                try:
                    obj.close()
                except Exception as e:  # closing must go on to flush the log
                    log.warning("closing %s failed: %s", name, e)
        if self.decode_log is not None:
            self.decode_log.close()  # writes and fsyncs every queued row

    def _finish(self) -> Summary:
        self._sync_counts()
        summary = self.telemetry.summary(host_now())
        if self._prewarm_lead is not None:
            summary.prewarm_ms = self._prewarm_lead.summary_ms()
        for line in summary.lines():
            log.info("summary: %s", line)
        return summary
