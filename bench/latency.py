"""End-to-end latency: replay, serve and a measuring client as three processes on one host.

Per engine, ``neds-rt serve`` and ``neds-rt replay`` run as subprocesses and this process is the client: it
receives every decode from serve's LSL ``Behavior`` outlet (stamping its arrival on the host clock), the
replay's ground-truth behaviour stream and its trial-event markers. Serve's decode log holds the per-bin
stamps (bin end, closed, inference start/end, published); joined with the arrivals they give each stage:

    close     bin end -> bin closed (includes the grace)
    queue     closed -> inference start
    infer     inference start -> end
    publish   inference end -> published (stamped after the LSL push, before the ZMQ send)
    deliver   published -> received by the client (can be slightly negative: an LSL client may receive
              the decode before serve has stamped ``published``)
    total     bin closed -> received by the client (the latency budget's figure)

Decode quality seen live (wheel R², choice accuracy against the ground-truth streams) is compared with the
offline evaluation of the same bins: the session's spikes binned on serve's grid and stepped through the
same engine offline. Each run also records the host's steal time once a second (:mod:`bench.steal`), the CPU
time the hypervisor gave to other guests, to read the figures of a shared VM by.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from bench.report import console, latency_percentiles, machine_info, write_json
from bench.steal import StealSampler
from neds_rt.engine import DEVICES
from neds_rt.errors import ConfigError, StreamError, invalid
from neds_rt.prewarm import prewarm_text
from neds_rt.realtime import CLIENT_PRIORITY, enter_realtime, parse_cpus
from neds_rt.serve import PREWARM_MS

log = logging.getLogger(__name__)

STAGES: Final = ("close", "queue", "infer", "publish", "deliver", "total")
_STAMP = {"bin_end": 0, "closed": 1, "infer_start": 2, "infer_end": 3, "published": 4}


@dataclass
class LatencyBenchConfig:
    duration: float = 60.0  # session seconds replayed per engine
    speed: float = 1.0
    start: float | None = None  # session seconds; default: the first trial's start
    engines: tuple[str, ...] = ("onnx",)
    device: str = "cpu"  # serve's --device (the offline reference decodes run on the CPU)
    cuda_graph: bool = False  # serve's --cuda-graph, for the onnx engine
    probe: str | None = None
    grace_ms: float = 5.0
    threads: int = 1
    lead_s: float = 2.0  # replay's stream-time lead before the first spike
    settle_s: float = 1.5  # wait after replay ends for the last decodes
    show_serve: bool = False  # serve's status lines on this console instead of its log file
    realtime: bool = False  # serve (priority 20), the client (15) and replay (10) at SCHED_FIFO, on any CPU
    pin: bool = False  # serve pinned to the last CPU, replay and the client to the others
    prewarm_ms: float = PREWARM_MS  # serve's --prewarm-ms
    prewarm_adapt: bool = True  # serve's --prewarm-adapt (False: --prewarm-fixed)

    def check(self) -> None:
        if not self.duration > 0:
            raise invalid("--duration", "must be > 0 s", self.duration)
        if not self.speed > 0:
            raise invalid("--speed", "must be > 0", self.speed)
        for e in self.engines:
            if e not in ("onnx", "torchscript"):
                raise invalid("--engines", "must list onnx and/or torchscript", e, kind=ConfigError)
        if self.device not in DEVICES:
            raise invalid("--device", f"must be one of {DEVICES}", self.device, kind=ConfigError)
        if self.cuda_graph and self.device != "cuda":
            raise invalid("--cuda-graph", "needs --device cuda", self.device, kind=ConfigError)


class _Client:
    """Pulls decodes (blocking, one thread, arrival stamped at once), ground truth and markers."""

    def __init__(self, decode_name: str, replay_name: str) -> None:
        from neds_rt.lsl_scope import pylsl

        self._lsl = pylsl()
        from pylsl.util import LostError  # liblsl is loaded (scoped) by pylsl() above

        self._lost: type[Exception] = LostError
        self.decode_name, self.replay_name = decode_name, replay_name
        self.decodes: list[tuple[float, float, list[float]]] = []  # (timestamp = bin end, arrival, values)
        self.truth: list[tuple[float, list[float]]] = []
        self.markers: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _inlet(self, name: str, timeout: float) -> Any:
        found = self._lsl.resolve_byprop("name", name, timeout=timeout)
        if not found:
            raise invalid(f"LSL stream {name!r}", f"not found within {timeout:.0f} s", name,
                          "check that serve / replay started (see their logs)", kind=StreamError)
        inlet = self._lsl.StreamInlet(found[0], max_buflen=60, recover=False)
        inlet.open_stream(timeout=timeout)
        return inlet

    def start(self, timeout: float = 30.0) -> None:
        dec = self._inlet(self.decode_name, timeout)
        self._threads.append(threading.Thread(target=self._pull_decodes, args=(dec,), daemon=True))
        self._threads[-1].start()

    def start_truth(self, timeout: float = 30.0) -> None:
        truth = self._inlet(f"{self.replay_name}-behaviour", timeout)
        markers = self._inlet(f"{self.replay_name}-markers", timeout)
        self._threads.append(threading.Thread(target=self._pull_rest, args=(truth, markers), daemon=True))
        self._threads[-1].start()

    def _pull_decodes(self, inlet: Any) -> None:
        clock = self._lsl.local_clock
        while not self._stop.is_set():
            try:
                sample, ts = inlet.pull_sample(timeout=0.2)
            except self._lost:  # serve closed its outlet (it ended, or failed: the run reports its exit code)
                return
            if ts is not None:
                self.decodes.append((ts, clock(), list(sample)))

    def _pull_rest(self, truth: Any, markers: Any) -> None:
        while not self._stop.is_set():
            try:
                values, stamps = truth.pull_chunk()
                labels, mstamps = markers.pull_chunk()
            except self._lost:  # replay finished and closed its outlets
                return
            self.truth.extend(zip(stamps, values, strict=True))
            self.markers.extend((t, m[0]) for t, m in zip(mstamps, labels, strict=True))
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2.0)


def _spawn(args: list[str], log_path: Path | None) -> subprocess.Popen[bytes]:
    """``neds-rt ARGS`` as a subprocess, its output in ``log_path`` (or on this console when None)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "neds_rt.cli", *args]
    if log_path is None:
        return subprocess.Popen(cmd, env=env)
    with log_path.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    """Wait for ``proc``; return (exit code, CPU seconds user+system) from its rusage (NaN when the process
    had already been reaped, e.g. by ``Popen.send_signal`` polling a child that had exited on its own)."""
    if proc.returncode is not None:
        return proc.returncode, math.nan
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        time.sleep(0.05)
    proc.kill()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def cpu_split() -> tuple[str, str] | None:
    """(serve's CPU, the other CPUs) as ``--cpus`` values for a real-time run: serve gets the last CPU this
    process may use, replay and the client the others; None on a single CPU (nothing to split)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return str(cpus[-1]), ",".join(map(str, cpus[:-1]))


def _realtime_args(cfg: LatencyBenchConfig, split: tuple[str, str] | None, who: str) -> list[str]:
    """serve's / replay's ``--realtime`` and ``--cpus`` flags for this run (``split``: from cpu_split)."""
    args = ["--realtime"] if cfg.realtime else []
    if split is not None:
        args += ["--cpus", split[0] if who == "serve" else split[1]]
    return args


def _one_run(data: Path, session: str, model: Path, engine: str, cfg: LatencyBenchConfig, out: Path,
             split: tuple[str, str] | None = None) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    name, dec_name = f"nrt-{tag}", f"nrt-{tag}-decodes"
    log_csv, serve_json, replay_json = (out / f"{engine}_decodes.csv", out / f"{engine}_serve.json",
                                        out / f"{engine}_replay.json")
    for p in (log_csv, serve_json, replay_json):
        p.unlink(missing_ok=True)
    serve = _spawn(["serve", "--model", str(model), "--engine", engine, "--device", cfg.device, "--stream",
                    name, "--out-stream", dec_name, "--log", str(log_csv), "--summary-json", str(serve_json),
                    "--grace", str(cfg.grace_ms), "--threads", str(cfg.threads), "--lsl-scope", "machine",
                    "--status-every", "5", "--resolve-timeout", "180", "--prewarm-ms", str(cfg.prewarm_ms),
                    "--prewarm-adapt" if cfg.prewarm_adapt else "--prewarm-fixed",
                    *(["--cuda-graph"] if cfg.cuda_graph and engine == "onnx" else []),
                    *_realtime_args(cfg, split, "serve")],
                   None if cfg.show_serve else out / f"{engine}_serve.log")
    client = _Client(dec_name, name)
    replay: subprocess.Popen[bytes] | None = None
    steal = StealSampler()
    t_wall = time.monotonic()
    steal.start()
    try:
        client.start()
        start = [] if cfg.start is None else ["--start", str(cfg.start)]
        probe = [] if cfg.probe is None else ["--probe", cfg.probe]
        replay = _spawn(["replay", "--data", str(data), "--session", session, "--stream", name, "--speed",
                         str(cfg.speed), "--duration", str(cfg.duration), "--lead", str(cfg.lead_s),
                         "--json", str(replay_json), "--lsl-scope", "machine", *start, *probe,
                         *_realtime_args(cfg, split, "replay")],
                        out / f"{engine}_replay.log")
        client.start_truth()
        replay_rc, replay_cpu = _reap(replay, cfg.duration / cfg.speed + 120.0)
        time.sleep(cfg.settle_s)
    finally:
        client.stop()
        serve.send_signal(signal.SIGINT)
        serve_rc, serve_cpu = _reap(serve, 30.0)
        if replay is not None and replay.returncode is None:
            replay.kill()
        host_steal = steal.stop()
    wall = time.monotonic() - t_wall
    if replay_rc != 0 or serve_rc != 0:
        raise invalid(f"bench run ({engine})", "replay and serve must exit with 0",
                      {"replay": replay_rc, "serve": serve_rc},
                      f"read {out}/{engine}_replay.log and {engine}_serve.log", kind=StreamError)
    result = _analyse(data, session, model, engine, cfg, client, log_csv, serve_json, replay_json,
                      {"serve_cpu_s": serve_cpu, "replay_cpu_s": replay_cpu, "wall_s": wall})
    result["host_steal"] = host_steal  # CPU time the hypervisor gave to other guests (bench.steal)
    return result


def _analyse(data: Path, session: str, model: Path, engine: str, cfg: LatencyBenchConfig, client: _Client,
             log_csv: Path, serve_json: Path, replay_json: Path, cpu: dict[str, float]) -> dict[str, Any]:
    from neds_rt.decode_log import read_decode_log

    full = read_decode_log(log_csv)
    served = json.loads(serve_json.read_text())
    replayed = json.loads(replay_json.read_text())
    # only the bins of the replayed segment: after it ends serve keeps closing (empty, gap-filled) bins
    end = replayed["t_offset"] + replayed["session_end"] / replayed["speed"]  # stream time of the last spike
    dlog = full.select(full.bin_end <= end + served["bin_size"])
    st = dlog.stamps  # (R, 5) host seconds
    ts = np.array([d[0] for d in client.decodes])  # (A,) LSL timestamps = bin end
    arrival = np.array([d[1] for d in client.decodes])  # (A,) host seconds
    idx = np.searchsorted(dlog.bin_end, ts) if ts.size else np.zeros(0, np.int64)
    idx = np.clip(idx, 0, max(len(dlog.bin_end) - 1, 0))
    ok = np.abs(dlog.bin_end[idx] - ts) < 1e-6 if ts.size else np.zeros(0, bool)
    received = np.full(len(dlog.bins), np.nan)  # (R,) arrival per logged bin
    received[idx[ok]] = arrival[ok]
    stage = {
        "close": st[:, 1] - st[:, 0], "queue": st[:, 2] - st[:, 1], "infer": st[:, 3] - st[:, 2],
        "publish": st[:, 4] - st[:, 3], "deliver": received - st[:, 4], "total": received - st[:, 1],
    }
    stages_ms = {k: latency_percentiles(1e3 * v[np.isfinite(v)]) for k, v in stage.items()}
    first, last = int(dlog.bins[0]), int(dlog.bins[-1])
    from neds_rt import wire

    counts = {
        "bins_logged": len(dlog.bins),
        "bins_missing_from_log": (last - first + 1) - len(np.unique(dlog.bins)),
        "bins_not_received": int(np.isnan(received).sum()),
        "gap_filled_bins": int(np.count_nonzero(dlog.flags & wire.FLAG_GAP_FILLED)),
        "overrun_bins": int(np.count_nonzero(dlog.flags & wire.FLAG_OVERRUN)),
        "late_spike_bins": int(np.count_nonzero(dlog.flags & wire.FLAG_LATE_SPIKES)),
        **{f"serve_{k}": v for k, v in served.get("counts", {}).items()},
    }
    duration = cpu["wall_s"]
    quality = _quality(data, session, model, engine, cfg, client, dlog, served, replayed)
    result = {
        "engine": engine, "bin_size_s": served["bin_size"], "stages_ms": stages_ms, "counts": counts,
        "cpu": {**cpu, "serve_cpu_pct": 100 * cpu["serve_cpu_s"] / duration,
                "replay_cpu_pct": 100 * cpu["replay_cpu_s"] / duration},
        "replay_pacing_ms": replayed.get("chunk_lateness_ms", {}), "prewarm_ms": served.get("prewarm_ms", {}),
        "quality": quality,
        "series": {"bin": dlog.bins.tolist(),
                   **{f"{k}_ms": [None if not np.isfinite(x) else round(1e3 * float(x), 4) for x in v]
                      for k, v in stage.items()}},
        "files": {"decode_log": str(log_csv), "serve_summary": str(serve_json), "replay": str(replay_json)},
    }
    return result


def _quality(data: Path, session: str, model: Path, engine: str, cfg: LatencyBenchConfig, client: _Client,
             dlog: Any, served: dict[str, Any], replayed: dict[str, Any]) -> dict[str, Any]:
    """Live decode quality vs the ground-truth streams, and the same metrics on offline decodes."""
    from training.metrics import r2

    labels = list(dlog.labels)
    wheel_col, choice_col = labels.index("wheel_speed"), labels.index("p_choice_cw")
    truth_t = np.array([t for t, _ in client.truth])  # (G,) stream time of each ground-truth sample
    truth_w = np.array([v[0] for _, v in client.truth])  # (G,) wheel speed rad/s
    offline = _offline_decodes(data, session, model, engine, cfg, dlog, served, replayed)
    out: dict[str, Any] = {"bins": len(dlog.bins), "truth_samples": int(truth_t.size),
                           "markers": len(client.markers)}
    inside = (dlog.bin_end >= truth_t.min()) & (dlog.bin_end <= truth_t.max()) if truth_t.size else None
    trials = _trials_from_markers(client.markers)
    for name, values in (("live", dlog.values), ("offline", offline)):
        if values is None:
            continue
        q: dict[str, float] = {}
        if inside is not None and inside.sum() > 10:
            gt = np.interp(dlog.bin_end[inside], truth_t, truth_w)
            q["wheel_r2"] = float(r2(values[inside, wheel_col], gt))
        correct = []
        for t_on, t_fb, choice in trials:
            sel = (dlog.bin_end >= t_on) & (dlog.bin_end <= t_fb)
            if sel.any() and choice in (-1, 1):
                correct.append((values[sel, choice_col].mean() > 0.5) == (choice == 1))
        q["choice_accuracy"] = float(np.mean(correct)) if correct else float("nan")
        cw = [c == 1 for t_on, t_fb, c in trials if c in (-1, 1) and
              ((dlog.bin_end >= t_on) & (dlog.bin_end <= t_fb)).any()]
        q["choice_chance"] = float(max(np.mean(cw), 1 - np.mean(cw))) if cw else float("nan")  # majority
        q["n_trials"] = len(correct)
        out[name] = q
    if offline is not None:  # late spikes make live decodes differ from the all-spikes offline ones
        out["max_abs_decode_difference"] = float(np.nanmax(np.abs(offline - dlog.values)))
        as_served = _offline_decodes(data, session, model, engine, cfg, dlog, served, replayed, True)
        assert as_served is not None
        diff = np.nanmax(np.abs(as_served - dlog.values), axis=1)  # (bins,)
        out["as_served"] = {
            "late_spikes_dropped": len(served.get("late_events", {}).get("bin", [])),
            "max_abs_decode_difference": float(np.nanmax(diff)),
            "bins_equal_1e-4": int(np.count_nonzero(diff < 1e-4)),
        }
    return out


def _trials_from_markers(markers: list[tuple[float, str]]) -> list[tuple[float, float, int]]:
    """(stimOn, feedback, choice) per trial, in stream time, from the replay's marker stream."""
    events: dict[int, dict[str, Any]] = {}
    for t, text in markers:
        m = json.loads(text)
        events.setdefault(int(m["trial"]), {})[m["event"]] = t
        events[int(m["trial"])]["choice"] = m.get("choice")
    return [(e["stimOn"], e["feedback"], int(e["choice"])) for e in events.values()
            if "stimOn" in e and "feedback" in e and e.get("choice") is not None]


def _offline_decodes(data: Path, session: str, model: Path, engine: str, cfg: LatencyBenchConfig, dlog: Any,
                     served: dict[str, Any], replayed: dict[str, Any], as_served: bool = False
                     ) -> np.ndarray | None:
    """The session's spikes, mapped to stream time and binned on serve's grid, stepped offline; with
    ``as_served``, less the late spikes serve dropped (then it must equal the live decodes)."""
    from neds_rt.binning import bin_windows
    from neds_rt.engine import open_engine
    from neds_rt.inlets import match_units
    from streams.replay import load_replay_session, stream_units

    if served.get("t0") is None or served.get("first_bin") is None:
        return None
    sess = load_replay_session(data, session, cfg.probe)
    s0, s1 = replayed["session_start"], replayed["session_end"]
    keep = (sess.spike_times >= s0) & (sess.spike_times < s1)
    stream_t = replayed["t_offset"] + sess.spike_times[keep] / replayed["speed"]  # (S,) stream seconds
    eng = open_engine(model, engine=engine)
    cols = match_units(stream_units(sess), [str(u) for u in eng.meta.unit_ids], allow_extra=True)
    u = cols[sess.spike_units[keep]]
    used = u >= 0
    first, n = int(dlog.bins[0]), int(dlog.bins[-1] - dlog.bins[0] + 1)
    start = served["t0"] + first * served["bin_size"]
    counts = bin_windows(stream_t[used], u[used], [start], n, eng.meta.n_units, served["bin_size"])[0]
    if as_served:  # drop the spikes serve received too late for their bin, as serve did
        late = served.get("late_events", {"bin": [], "column": []})
        rows = np.asarray(late["bin"], np.int64) - first
        cols = np.asarray(late["column"], np.int64)
        ok = (rows >= 0) & (rows < n)
        np.subtract.at(counts, (rows[ok], cols[ok]), 1)
        np.maximum(counts, 0, out=counts)
    decodes = np.stack([eng.step(counts[k])[0] for k in range(n)])  # (n, n_out)
    return np.asarray(decodes[dlog.bins - first])


def run_latency_bench(data: Path, session: str, model: Path | dict[str, Path], out: Path,
                      cfg: LatencyBenchConfig | None = None) -> dict[str, Any]:
    """Run every engine in turn (``model``: one file, or one per engine); print the table; write
    ``latency.json`` and ``latency.png``."""
    cfg = cfg or LatencyBenchConfig()
    cfg.check()
    out.mkdir(parents=True, exist_ok=True)
    models = model if isinstance(model, dict) else dict.fromkeys(cfg.engines, Path(model))
    split = cpu_split() if cfg.pin else None
    if cfg.pin and split is None:
        log.warning("--pin: a single CPU, nothing to split; running unpinned")
    # the measuring client (its pull threads are created after this) runs at SCHED_FIFO between serve and the
    # replay, as a closed-loop consumer on a rig would, and stays off serve's CPU when pinned
    restore = enter_realtime("bench client", CLIENT_PRIORITY if cfg.realtime else None,
                             parse_cpus(split[1]) if split else None)  # neither: changes nothing
    try:
        runs = [_one_run(Path(data), session, Path(models[engine]), engine, cfg, out, split)
                for engine in cfg.engines]
    finally:
        restore()
    cpus = {"serve": split[0], "replay_and_client": split[1]} if split else None
    result = {"config": asdict(cfg) | {"cpus": cpus}, "session": session,
              "models": {k: str(v) for k, v in models.items()}, "machine": machine_info(), "runs": runs}
    write_json(out / "latency.json", result)
    _plot(out / "latency.png", runs)
    _print(runs)
    return result


def _print(runs: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="bin close -> decode received (ms), per stage")
    for col in ("engine", "stage", "p50", "p90", "p99", "p99.9", "max"):
        table.add_column(col)
    for run in runs:
        for name in STAGES:
            p = run["stages_ms"][name]
            cells = (f"{p[k]:.3f}" for k in ("p50", "p90", "p99", "p99.9", "max"))
            table.add_row(run["engine"], name, *cells)
    console().print(table)
    for run in runs:
        q, c = run["quality"], run["counts"]
        served_q = q.get("as_served", {})
        console().print(
            f"{run['engine']}: {c['bins_logged']} bins, missing {c['bins_missing_from_log']}, not received "
            f"{c['bins_not_received']}, gap-filled {c['gap_filled_bins']}; serve CPU "
            f"{run['cpu']['serve_cpu_pct']:.0f}%, replay CPU {run['cpu']['replay_cpu_pct']:.0f}%; live "
            f"{q.get('live')}, offline {q.get('offline')}, max |live - offline| "
            f"{q.get('max_abs_decode_difference')} (less the {served_q.get('late_spikes_dropped')} late "
            f"spikes: {served_q.get('max_abs_decode_difference')})")
        if run.get("prewarm_ms"):
            console().print(f"{run['engine']}: prewarm {prewarm_text(run['prewarm_ms'])}", markup=False)
        steal = run.get("host_steal", {})
        if steal.get("pct") is not None:
            console().print(f"{run['engine']}: host steal {steal['pct']:.2f}% of CPU time (worst "
                            f"{steal['period_s']:g} s: {steal['max_pct']}%)", markup=False)


def _plot_steal(ax: Any, run: dict[str, Any]) -> None:
    """The host's steal time per second on a second axis of the jitter panel, placed at the bins served in
    that second (approximately: sampling starts a few seconds before the first bin)."""
    steal = run.get("host_steal", {})
    series = np.asarray(steal.get("series_pct") or [], dtype=float)  # (S,) % per period
    if series.size == 0 or not run["series"]["bin"]:
        return
    bins_per_period = steal["period_s"] / run["bin_size_s"]  # bins are stream time, which runs with the wall
    # clock at any --speed (the replay divides session times by the speed)
    x = run["series"]["bin"][0] + (np.arange(series.size) + 0.5) * bins_per_period  # (S,) bin index
    twin = ax.twinx()
    twin.plot(x, series, color="tab:red", lw=0.8, alpha=0.6, label=f"{run['engine']} host steal")
    twin.set(ylabel="host steal (% of CPU time)", ylim=(0, max(5.0, 1.1 * float(series.max()))))
    twin.legend(fontsize=8, loc="upper right")


def _plot(path: Path, runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for run in runs:
        for name in STAGES:
            x = np.array([np.nan if v is None else v for v in run["series"][f"{name}_ms"]], dtype=float)
            x = np.sort(x[np.isfinite(x) & (x > 0)])
            if x.size:
                axes[0].plot(x, np.arange(1, x.size + 1) / x.size, lw=2 if name == "total" else 1,
                             label=f"{run['engine']} {name}")
        total = np.array([np.nan if v is None else v for v in run["series"]["total_ms"]], dtype=float)
        axes[1].plot(run["series"]["bin"], total, lw=0.5, label=run["engine"])
        _plot_steal(axes[1], run)
    axes[0].axvline(2.0, color="r", ls="--", lw=1, label="2 ms budget")
    axes[0].set(xscale="log", xlabel="latency (ms)", ylabel="fraction of bins",
                title="latency CDF per stage")
    axes[1].set(xlabel="bin", ylabel="total latency (ms)", yscale="log", title="jitter over the run")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
