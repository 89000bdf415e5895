"""Serve test helpers: tiny streaming NEDS step models (random weights) and the offline reference.

Exports are cached under the temp dir keyed by the model/export sources, so test modules share one export
and a stale cache never survives a code change.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import zmq

from neds_rt import wire
from neds_rt.binning import RejectedEvents, bin_windows
from neds_rt.lsl_scope import pylsl
from neds_rt.serve import ServeConfig, Server
from neds_rt.telemetry import Summary

ROOT = Path(__file__).resolve().parents[1]
_SOURCES = ("training/model.py", "training/streaming.py", "training/export.py", "training/config.py",
            "neds_rt/engine.py", "neds_rt/model_meta.py", "neds_rt/rotary.py")


def _key(*parts: object) -> str:
    h = hashlib.sha256()
    for src in _SOURCES:
        p = ROOT / src
        h.update(p.read_bytes() if p.exists() else b"")
    h.update(repr(parts).encode())
    return h.hexdigest()[:16]


def tiny_model(n_units: int = 8, fmt: str = "onnx", context: int = 16, seed: int = 0,
               eid: str = "serve-test-eid", first_id: int = 100) -> Path:
    """Path to an exported tiny streaming step model; unit ids first_id .. first_id + n_units - 1."""
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    folder = Path(tempfile.gettempdir()) / f"neds_rt_test_models_{os.getuid()}"
    folder.mkdir(exist_ok=True)
    path = folder / f"tiny_{_key(n_units, fmt, context, seed, eid, first_id)}{suffix}"
    if path.exists():
        return path
    import torch

    from training.arrays import Normalisation
    from training.config import NEDSConfig
    from training.export import export_model
    from training.model import NEDS, SessionVocab

    torch.manual_seed(seed)
    cfg = NEDSConfig.preset("tiny", mode="streaming", dropout=0.0)
    model = NEDS(cfg)
    ids = np.arange(first_id, first_id + n_units)
    regions = np.array(["CA1"] * n_units)
    vocab = SessionVocab(eid, ids, regions, Normalisation(0, 3, 0, 5), "probe00")
    model.add_session(eid, n_units, vocab=vocab)
    model.eval()
    tmp = path.with_name(f"{path.stem}.{os.getpid()}{suffix}")
    export_model(model, eid, tmp, fmt=fmt, graph="step", context=context)
    tmp.replace(path)
    return path


def offline_decodes(model: Path, counts: np.ndarray, engine: str = "onnx") -> np.ndarray:
    """Step a fresh engine over (T, N) counts; returns (T, C) float32 decodes (the offline reference)."""
    from neds_rt.engine import open_engine

    eng = open_engine(model, engine=engine)
    out = np.zeros((counts.shape[0], len(eng.meta.outputs)), np.float32)  # (T, C)
    for i in range(counts.shape[0]):
        out[i] = eng.step(counts[i][None, :].astype(np.float32))[0]
    return out


def bin_events(times: np.ndarray, units: np.ndarray, t0: float, first_bin: int, n_bins: int,
               n_units: int, bin_size: float = 0.02) -> np.ndarray:
    """(n_bins, N) counts of bins first_bin .. first_bin + n_bins - 1 on the grid starting at t0."""
    start = t0 + first_bin * bin_size
    keep = (units >= 0) & (units < n_units) & np.isfinite(times)
    return bin_windows(times[keep], units[keep], [start], n_bins, n_units, bin_size)[0]


# ---------------------------------------------------------------------------------------------- harness

UNIT_IDS = [str(u) for u in range(100, 108)]  # the 8 units of tiny_model(8)
REGIONS = ["CA1"] * 8
EID = "serve-test-eid"


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """A :class:`Server`, opened in the test thread (open errors raise here), run in a background thread."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.server = Server(cfg)
        self.server.open()
        self.error: BaseException | None = None
        self.summary: Summary | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.summary = self.server.run()
        except BaseException as e:
            self.error = e

    def start(self, ready_timeout: float = 20.0) -> None:
        self._thread.start()
        wait_until(lambda: self.server.ready.is_set() or self.error is not None, ready_timeout, "serve ready")
        if self.error is not None:
            raise self.error

    def wait_bin(self, k: int, timeout: float = 20.0) -> None:
        wait_until(lambda: (self.server.last_bin or -1) >= k or self.error is not None, timeout, f"bin {k}")
        if self.error is not None:
            raise self.error

    def stop(self, timeout: float = 20.0) -> Summary:
        self.server.stop()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "serve did not stop"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


class DecodeClients:
    """An LSL inlet on the Behavior stream and a ZMQ SUB on the decode PUB, connected before serving."""

    def __init__(self, out_stream: str, zmq_url: str | None) -> None:
        lsl = pylsl()
        found = lsl.resolve_byprop("name", out_stream, minimum=1, timeout=10.0)
        assert found, f"no Behavior stream {out_stream}"
        # recover=False: pull_chunk blocks while a recovering inlet reconnects to a closed outlet
        self.inlet = lsl.StreamInlet(found[0], max_buflen=120, recover=False)
        self.inlet.open_stream(timeout=10.0)
        self._ts: list[float] = []
        self._vals: list[list[float]] = []
        self._done = threading.Event()
        self._puller = threading.Thread(target=self._pull, daemon=True)
        self._puller.start()
        self.sub: zmq.Socket | None = None
        if zmq_url is not None:
            self.sub = zmq.Context.instance().socket(zmq.SUB)
            self.sub.setsockopt(zmq.RCVHWM, 100_000)
            self.sub.setsockopt(zmq.LINGER, 0)
            self.sub.setsockopt(zmq.SUBSCRIBE, b"decode")
            self.sub.connect(zmq_url)

    def _pull(self) -> None:
        from pylsl.util import LostError

        while not self._done.is_set():
            try:
                vals, ts = self.inlet.pull_chunk(timeout=0.05, max_samples=4096)
            except LostError:
                return
            self._ts.extend(ts)
            self._vals.extend(vals)

    def lsl_samples(self, timeout: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
        """(R,) timestamps and (R, C) values of the Behavior samples received (after the outlet closed)."""
        self._puller.join(timeout)
        self._done.set()
        self._puller.join(1.0)
        ts, vals = list(self._ts), list(self._vals)
        return np.array(ts), np.array(vals, np.float32).reshape(len(ts), -1)

    def zmq_messages(self) -> list[wire.DecodeMessage]:
        out = []
        assert self.sub is not None
        while self.sub.poll(500, zmq.POLLIN):
            out.append(wire.decode_decode(self.sub.recv_multipart(), b"decode"))
        return out

    def close(self) -> None:
        self._done.set()
        self._puller.join(1.0)
        self.inlet.close_stream()
        if self.sub is not None:
            self.sub.close(linger=0)


def spike_train(rng: np.random.Generator, t_start: float, duration: float, n_units: int = 8,
                rate_hz: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (S,) float64 times and (S,) int32 units: Poisson spikes at ``rate_hz`` per unit.

    No spike lies within 2 ms of a 20 ms grid edge: LSL's time correction (microseconds on one host) then
    cannot move a spike into another bin, so the reference binning is exact.
    """
    n = rng.poisson(rate_hz * n_units * duration)
    times = np.sort(rng.uniform(t_start, t_start + duration, n))
    phase = np.mod(times, 0.02)
    times = times[(phase > 0.002) & (phase < 0.018)]
    n = times.size
    return times, rng.integers(0, n_units, n).astype(np.int32)


def push_paced(push: Callable[[np.ndarray, np.ndarray], None], times: np.ndarray, units: np.ndarray,
               lead: float = 0.2, chunk: float = 0.05) -> None:
    """Push events in stream-time chunks of ``chunk`` s, each ``lead`` s before its time (local clock).

    Events keep their order inside a chunk; NaN times go with the first chunk.
    """
    finite = np.isfinite(times)
    if not finite.any():
        push(times, units)
        return
    t_min = float(times[finite].min())
    idx = np.where(finite, np.floor((np.where(finite, times, t_min) - t_min) / chunk), 0).astype(int)
    for c in range(int(idx.max()) + 1):
        wait = t_min + c * chunk - lead - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        sel = idx == c
        if sel.any():
            push(times[sel], units[sel])


def kept_events(times: np.ndarray, units: np.ndarray, rejected: Iterable[RejectedEvents], tol: float = 1e-3
                ) -> tuple[np.ndarray, np.ndarray]:
    """Drop the events serve rejected from the reference spike train.

    Matched by unit and time within ``tol`` (serve sees LSL times plus the time correction); a NaN time
    matches a NaN time of the same unit.
    """
    keep = np.ones(times.shape[0], bool)
    for r in rejected:
        for t, u in zip(r.times, r.units, strict=True):
            same = (units == u) & keep
            near = np.isnan(times) if np.isnan(t) else np.abs(times - t) < tol
            hit = np.flatnonzero(same & near)
            if hit.size:
                keep[hit[0]] = False
    return times[keep], units[keep]
