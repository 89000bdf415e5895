"""serve end to end on loopback: decodes over LSL and ZMQ and in the log equal the offline engine, bin for
bin; binned-count input; SIGTERM / SIGINT shut a `neds-rt serve` process down cleanly with a complete log."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from neds_rt import wire
from neds_rt.decode_log import read_decode_log
from neds_rt.outlets import LSLCountsOutlet, LSLSpikeOutlet
from neds_rt.serve import ServeConfig
from tests._gpu import needs_ort_cuda
from tests._serve_models import (
    EID,
    REGIONS,
    UNIT_IDS,
    DecodeClients,
    ServerThread,
    bin_events,
    free_port,
    kept_events,
    offline_decodes,
    push_paced,
    spike_train,
    tiny_model,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)
BIN = 0.02


@pytest.fixture(scope="module")
def model() -> Path:
    return tiny_model(8)


def _check_stamps(stamps: np.ndarray) -> None:
    """(R, 5) host stamps: closed after the bin end, then infer start <= end <= published."""
    bin_end, closed, i0, i1, pub = stamps.T
    assert np.all(closed >= bin_end) and np.all(i0 >= closed) and np.all(i1 >= i0) and np.all(pub >= i1)


@pytest.mark.parametrize(("prewarm_ms", "adapt", "device"), [
    (0.0, True, "cpu"), (10.0, True, "cpu"), (10.0, False, "cpu"),
    pytest.param(0.0, True, "cuda", marks=needs_ort_cuda),
    pytest.param(0.0, True, "cuda-graph", marks=needs_ort_cuda)])
def test_lsl_spikes_decodes_equal_offline_engine_on_every_bin(model: Path, tmp_path: Path, prewarm_ms: float,
                                                              adapt: bool, device: str) -> None:
    uid = uuid.uuid4().hex[:8]
    outlet = LSLSpikeOutlet(f"spk-{uid}", EID, UNIT_IDS, REGIONS, source_id=f"src-{uid}")
    url = f"tcp://127.0.0.1:{free_port()}"
    cfg = ServeConfig(model, stream=f"spk-{uid}", zmq_out=url, out_stream=f"dec-{uid}",
                      log_path=tmp_path / "decodes.csv", grace_ms=40.0, wait_clients_s=10.0, warmup_steps=5,
                      prewarm_ms=prewarm_ms, prewarm_adapt=adapt, device=device.split("-")[0],
                      cuda_graph=device == "cuda-graph")
    st = ServerThread(cfg)
    clients = DecodeClients(f"dec-{uid}", url)
    try:
        st.start()
        assert outlet.wait_for_consumers(10.0)
        times, units = spike_train(np.random.default_rng(0), time.monotonic() + 0.3, 2.0)
        push_paced(outlet.push, times, units)
        server = st.server
        wait_until(lambda: server.t0 is not None, 10, "first event")
        assert server.t0 is not None
        last_needed = int(np.floor((times.max() - server.t0) / BIN)) + 1
        st.wait_bin(last_needed)
        summary = st.stop()
        lsl_ts, lsl_vals = clients.lsl_samples()
        msgs = clients.zmq_messages()
    finally:
        clients.close()
        outlet.close()
    assert server.first_bin == 0 and server.t0 == np.floor(times.min() / BIN) * BIN
    first, last = 0, server.last_bin
    assert last is not None and last >= last_needed
    n_bins = last - first + 1
    kt, ku = kept_events(times, units, server.rejected)
    assert summary.bins == n_bins
    ran, skipped = summary.counts.get("prewarms", 0), summary.counts.get("prewarm_skipped", 0)
    if prewarm_ms:  # one prewarm decision per bin the loop waited for (+1: the bin after the last)
        assert ran > 0 and ran + skipped <= n_bins + 1
        lead = summary.prewarm_ms
        assert lead["runs"] == ran
        if adapt:  # after 16 runs the lead follows the tiny model's prewarms (well under 10 ms)
            assert ran >= 16 and 0.3 <= lead["lead_last"] < prewarm_ms, lead
        else:
            assert lead["lead_last"] == lead["lead_p50"] == pytest.approx(prewarm_ms)
    else:
        assert ran == skipped == 0 and summary.prewarm_ms == {}
    ref = offline_decodes(model, bin_events(kt, ku, server.t0, first, n_bins, 8))  # (T, 6), on the CPU
    atol = 1e-5 if device == "cpu" else 1e-4  # the GPU's float32 kernels round differently from the CPU's

    log = read_decode_log(cfg.log_path)  # type: ignore[arg-type]
    assert not log.truncated
    np.testing.assert_array_equal(log.bins, np.arange(first, last + 1))
    np.testing.assert_allclose(log.values, ref, atol=atol, rtol=0)
    np.testing.assert_allclose(log.bin_end, server.t0 + (log.bins + 1) * BIN, rtol=0, atol=1e-9)
    _check_stamps(log.stamps)
    assert np.all(log.flags & wire.FLAG_GAP_FILLED == 0)

    lsl_bins = np.rint((lsl_ts - server.t0) / BIN).astype(int) - 1  # timestamp = bin end
    np.testing.assert_array_equal(lsl_bins, np.arange(first, last + 1))
    np.testing.assert_allclose(lsl_vals, ref, atol=atol, rtol=0)

    assert [m.bin for m in msgs] == list(range(first, last + 1))
    np.testing.assert_allclose(np.stack([m.values for m in msgs]), ref, atol=atol, rtol=0)
    _check_stamps(np.array([[m.stamps[k] for k in wire.STAMP_NAMES] for m in msgs]))
    assert [m.bin_end for m in msgs] == log.bin_end.tolist()


@pytest.mark.parametrize("realtime", [False, True])
def test_lsl_binned_counts_go_straight_to_the_engine(model: Path, tmp_path: Path, realtime: bool,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    uid = uuid.uuid4().hex[:8]
    outlet = LSLCountsOutlet(f"cnt-{uid}", EID, UNIT_IDS, REGIONS, source_id=f"src-{uid}")
    cfg = ServeConfig(model, stream=f"cnt-{uid}", out_stream=f"dec-{uid}", log_path=tmp_path / "d.csv",
                      wait_clients_s=10.0, warmup_steps=5, grace_ms=100.0, realtime=realtime,
                      cpus=(0,) if realtime else None)
    policy, cpus = os.sched_getscheduler(0), os.sched_getaffinity(0)
    caplog.set_level(logging.INFO, logger="neds_rt.realtime")
    st = ServerThread(cfg)
    clients = DecodeClients(f"dec-{uid}", None)
    rng = np.random.default_rng(1)
    counts = rng.poisson(0.5, (60, 8)).astype(np.int32)  # (T, N) counts per bin
    try:
        st.start()
        assert st.server.kind == "counts"
        assert outlet.wait_for_consumers(10.0)
        t_start = np.floor(time.monotonic() / BIN) * BIN + 0.3 + BIN * np.arange(60)  # (T,) bin starts
        for i in range(0, 60, 5):  # 5 bins per push, 0.2 s ahead of time
            time.sleep(max(0.0, float(t_start[i]) - 0.2 - time.monotonic()))
            outlet.push(t_start[i:i + 5], counts[i:i + 5])
        st.wait_bin(59)
        st.stop()
        lsl_ts, lsl_vals = clients.lsl_samples()
    finally:
        clients.close()
        outlet.close()
    log = read_decode_log(cfg.log_path)  # type: ignore[arg-type]
    np.testing.assert_array_equal(log.bins[:60], np.arange(60))
    ref = offline_decodes(model, counts)
    np.testing.assert_allclose(log.values[:60], ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lsl_vals[:60], ref, atol=1e-5, rtol=0)
    t0 = st.server.t0  # the first bin's start + LSL time correction (microseconds on one host)
    assert t0 is not None and abs(t0 - t_start[0]) < 1e-3
    np.testing.assert_allclose(lsl_ts[:60], t0 + BIN * (np.arange(60) + 1), rtol=0, atol=1e-9)
    assert np.all(log.flags[:60] & wire.FLAG_GAP_FILLED == 0)
    said = caplog.text
    if realtime:  # the serving thread was pinned and moved to SCHED_FIFO, or says why not
        assert "serve: pinned to CPU 0" in said
        assert "serve: running at SCHED_FIFO priority" in said or "serve: cannot run at SCHED_FIFO" in said
    else:
        assert "serve:" not in said
    assert (os.sched_getscheduler(0), os.sched_getaffinity(0)) == (policy, cpus)  # the caller's thread kept


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_serve_down_cleanly_with_a_complete_log(model: Path, tmp_path: Path, sig: int) -> None:
    uid = uuid.uuid4().hex[:8]
    name = f"spk-{uid}"
    outlet = LSLSpikeOutlet(name, EID, UNIT_IDS, REGIONS, source_id=f"src-{uid}")
    log_path = tmp_path / "decodes.csv"
    cmd = [sys.executable, "-m", "neds_rt.cli", "serve", "--model", str(model), "--stream", name,
           "--out-stream", f"dec-{uid}", "--log", str(log_path), "--grace", "40", "--lsl-scope", "machine",
           "--status-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    rng = np.random.default_rng(2)
    try:
        assert outlet.wait_for_consumers(60.0), "serve never connected"
        deadline = time.monotonic() + 60
        sent = False
        while proc.poll() is None and time.monotonic() < deadline:
            t = time.monotonic() + 0.2
            times, units = spike_train(rng, t, 0.05)
            outlet.push(times, units)
            if not sent and log_path.exists() and log_path.read_bytes().count(b"\n") > 30:
                proc.send_signal(sig)
                sent = True
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        outlet.close()
    assert sent, "serve never wrote 30 decodes"
    assert proc.returncode == 0, out
    assert "bins in" in out and "decode log:" in out
    log = read_decode_log(log_path)
    assert not log.truncated
    n_bins = int(out.split(" bins in ")[0].split()[-1])  # the summary's bin count
    assert len(log.bins) == n_bins >= 30
    np.testing.assert_array_equal(np.diff(log.bins), 1)


def test_sigkill_leaves_every_decode_older_than_one_second_in_the_log(model: Path, tmp_path: Path) -> None:
    uid = uuid.uuid4().hex[:8]
    name = f"spk-{uid}"
    outlet = LSLSpikeOutlet(name, EID, UNIT_IDS, REGIONS, source_id=f"src-{uid}")
    log_path = tmp_path / "decodes.csv"
    cmd = [sys.executable, "-m", "neds_rt.cli", "serve", "--model", str(model), "--stream", name,
           "--out-stream", f"dec-{uid}", "--log", str(log_path), "--grace", "40", "--lsl-scope", "machine"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = np.random.default_rng(3)
    killed_at = None
    try:
        assert outlet.wait_for_consumers(60.0), "serve never connected"
        deadline = time.monotonic() + 60
        started = None
        while proc.poll() is None and time.monotonic() < deadline:
            times, units = spike_train(rng, time.monotonic() + 0.2, 0.05)
            outlet.push(times, units)
            if started is None and log_path.exists() and log_path.read_bytes().count(b"\n") > 30:
                started = time.monotonic()
            if started is not None and time.monotonic() > started + 1.5:
                killed_at = time.monotonic()
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        outlet.close()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    log = read_decode_log(log_path)
    np.testing.assert_array_equal(np.diff(log.bins), 1)
    # every bin closed (end + 40 ms grace + 20 ms of slack) more than 1 s before the kill is in the file
    t0 = log.bin_end[0] - BIN * (log.bins[0] + 1)
    due = int(np.floor((killed_at - 1.0 - 0.06 - t0) / BIN)) - 1
    assert log.bins[-1] >= due, (log.bins[-1], due)
