"""Replay: clock mapping, pacing helpers, event timelines, real LSL / ZMQ replays of a simulated session."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from neds_rt.binning import bin_windows
from neds_rt.cli import app
from neds_rt.errors import ConfigError, DataError
from neds_rt.inlets import SpikeBatch, ZMQSpikeInlet
from neds_rt.lsl_scope import pylsl
from neds_rt.lsl_streams import channels_from_info, units_from_info
from streams.replay import (
    LatenessStats,
    ReplayClock,
    ReplayConfig,
    Replayer,
    ReplaySummary,
    chunk_deadline,
    load_replay_session,
    replay_clock_from_info,
    replay_segment,
    sleep_until,
    stream_units,
)
from streams.replay_events import (
    BEHAVIOUR_CHANNELS,
    behaviour_timeline,
    segment_spikes,
    session_end,
    trial_markers,
)
from streams.session import Session
from streams.simulate import simulate_cache

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Session]:
    root = tmp_path_factory.mktemp("replay_cache")
    eid = simulate_cache(root, n_sessions=1, seed=0, n_trials=20)[0]
    return root, eid, load_replay_session(root, eid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _name(what: str) -> str:
    return f"test-replay-{what}-{uuid.uuid4().hex[:10]}"


def _segment_around_trial(session: Session, k: int, before: float, duration: float) -> tuple[float, float]:
    start = float(session.trials["stimOn_times"].iloc[k]) - before
    return start, duration


def _check_lateness(summary: ReplaySummary) -> None:
    """Complete and finite: every chunk measured (no timing threshold)."""
    assert summary.chunk_lateness_ms["count"] == summary.wake_lateness_ms["count"] == summary.n_chunks > 0
    assert 0 < summary.worst_spike_lateness_ms["count"] <= summary.n_chunks
    for stats in (summary.chunk_lateness_ms, summary.wake_lateness_ms, summary.worst_spike_lateness_ms):
        for key in ("p50", "p90", "p99", "p99.9", "max", "mean"):
            assert math.isfinite(stats[key]), key
        assert stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["p99.9"] <= stats["max"] + 1e-3


# ---------------------------------------------------------------------------------------------- pure


def test_clock_maps_session_to_stream_and_back_across_loops() -> None:
    clock = ReplayClock(t0=1000.0, start=10.0, end=14.0, speed=2.0)
    assert clock.period == 2.0 and clock.t_offset == 995.0
    assert clock.to_stream(10.0) == 1000.0 and clock.to_stream(12.0) == 1001.0
    assert clock.to_stream(12.0, loop=3) == 1007.0
    s = np.array([10.0, 11.5, 13.999])
    for loop in (0, 1, 5):
        back, idx = clock.to_session(clock.to_stream(s, loop))
        np.testing.assert_allclose(back, s, atol=1e-9)
        assert (idx == loop).all()
    np.testing.assert_allclose(clock.to_stream(s), clock.t_offset + s / clock.speed)  # the published offset


def test_chunk_deadline_is_on_the_grid_and_never_before_due() -> None:
    rng = np.random.default_rng(0)
    origin, chunk = 12345.678, 0.001
    for due in origin + rng.uniform(-1.0, 50.0, 2000):
        g = chunk_deadline(float(due), origin, chunk)
        assert g >= due and g - due < chunk + 1e-9
        k = (g - origin) / chunk
        assert abs(k - round(k)) < 1e-5
    assert chunk_deadline(origin + 0.003, origin, chunk) == pytest.approx(origin + 0.003)


def test_sleep_until_waits_for_absolute_deadline_and_sees_stop() -> None:
    stop = threading.Event()
    deadline = time.monotonic() + 0.02
    assert sleep_until(deadline, 0.0003, stop)
    assert time.monotonic() >= deadline  # never early
    assert sleep_until(time.monotonic() - 1.0, 0.0003, stop)  # past deadline: at once
    stop.set()
    t = time.monotonic()
    assert not sleep_until(t + 30.0, 0.0003, stop)  # stop seen, no 30 s sleep
    assert time.monotonic() - t < 10.0


def test_lateness_stats_percentiles_overflow_and_early() -> None:
    stats = LatenessStats(resolution_s=1e-6, span_s=0.01)
    values = np.arange(1, 1001) * 1e-6  # (1000,) 1..1000 µs
    stats.add_many(values[:500])
    for v in values[500:]:
        stats.add(float(v))
    assert stats.count == 1000
    assert stats.quantile(50) == pytest.approx(500e-6, abs=2e-6)
    assert stats.quantile(99) == pytest.approx(990e-6, abs=2e-6)
    assert stats.max == pytest.approx(1000e-6)
    stats.add_many(np.array([0.5, 0.2, -1e-6]))  # two past the span, one early
    assert stats.n_early == 1 and stats.count == 1003 and stats.max == 0.5
    assert stats.quantile(100) == 0.5 and stats.quantile(99.85) == pytest.approx(0.2)
    summary = stats.summary_ms()
    assert summary["max"] == 500.0 and summary["count"] == 1003
    empty = LatenessStats().summary_ms()
    assert empty["count"] == 0 and math.isnan(empty["p50"])


# ---------------------------------------------------------------------------------------------- timelines


def test_timelines_of_a_segment(sim: tuple[Path, str, Session]) -> None:
    _, _, session = sim
    start, duration = _segment_around_trial(session, 2, 1.0, 4.0)
    end = start + duration
    spikes = segment_spikes(session, start, end)
    inside = (session.spike_times >= start) & (session.spike_times < end)
    np.testing.assert_array_equal(spikes.times, session.spike_times[inside])
    np.testing.assert_array_equal(spikes.units, session.spike_units[inside])
    assert session_end(session) > session.spike_times[-1]
    assert segment_spikes(session, 0.0, session_end(session)).times.size == session.spike_times.size

    beh = behaviour_timeline(session, start, end, 50.0)
    assert beh.values.shape == (200, len(BEHAVIOUR_CHANNELS)) and beh.values.dtype == np.float32
    np.testing.assert_allclose(beh.times, start + 0.02 * np.arange(1, 201))  # bin ENDS
    assert np.isfinite(beh.values).all() and (beh.values[:, 0] >= 0).all()
    assert beh.values[:, 0].max() > 0  # the mouse turns the wheel in a trial

    markers = trial_markers(session, start, end)
    assert np.all(np.diff(markers.times) >= 0)
    trials = session.trials
    expected = 0
    for col in ("stimOn_times", "firstMovement_times", "feedback_times"):
        t = trials[col].to_numpy(dtype=np.float64)
        expected += int(((t >= start) & (t < end)).sum())
    assert len(markers.labels) == markers.times.size == expected >= 3
    for t, label in zip(markers.times, markers.labels, strict=True):
        m = json.loads(label)
        k = m["trial"]
        col = {"stimOn": "stimOn_times", "firstMovement": "firstMovement_times",
               "feedback": "feedback_times"}[m["event"]]
        assert m["t_session"] == t == float(trials[col].iloc[k])
        assert m["choice"] == int(trials["choice"].iloc[k])
        assert m["block"] == float(trials["probabilityLeft"].iloc[k])
        assert m["feedback_type"] == int(trials["feedbackType"].iloc[k])
    assert {json.loads(x)["event"] for x in markers.labels} == {"stimOn", "firstMovement", "feedback"}


# ---------------------------------------------------------------------------------------------- live


def _pull_all(
    inlet: Any, want: int, channels: int, fmt: Any, timeout: float = 20.0
) -> tuple[Any, np.ndarray]:
    samples: list[Any] = []
    stamps: list[np.ndarray] = []
    deadline = time.monotonic() + timeout
    while sum(len(s) for s in stamps) < want and time.monotonic() < deadline:
        if fmt == "string":
            s, ts = inlet.pull_chunk(timeout=0.05, max_samples=1024)
            samples.extend(x[0] for x in s)
            stamps.append(np.asarray(ts, dtype=np.float64))
        else:
            s, ts = inlet.pull_chunk(timeout=0.05, max_samples=8192, min_samples=1, as_numpy=True)
            samples.append(np.asarray(s).reshape(-1, channels))
            stamps.append(np.asarray(ts, dtype=np.float64))
    got = samples if fmt == "string" else np.concatenate(samples) if samples else np.zeros((0, channels))
    return got, np.concatenate(stamps) if stamps else np.zeros(0)


def test_lsl_replay_spikes_behaviour_and_markers(sim: tuple[Path, str, Session]) -> None:
    _, eid, session = sim
    lsl = pylsl()
    start, duration = _segment_around_trial(session, 1, 0.5, 2.0)
    speed = 2.0
    name = _name("lsl")
    cfg = ReplayConfig(stream=name, speed=speed, start=start, duration=duration, lead_s=3.0)
    replayer = Replayer(session, cfg)
    clock = replayer.open()
    inlets: dict[str, Any] = {}
    try:
        for key in ("", "-behaviour", "-markers"):
            found = lsl.resolve_byprop("name", name + key, minimum=1, timeout=10.0)
            assert found, name + key
            inlets[key] = lsl.StreamInlet(found[0], max_buflen=360, recover=False)
            inlets[key].open_stream(timeout=10.0)
        info = inlets[""].info(timeout=10.0)
        units = units_from_info(info)
        assert units == stream_units(session) and units.session_id == eid
        assert len(units.unit_ids) == session.n_units
        assert list(units.unit_ids) == session.units["cluster_id"].astype(str).tolist()
        assert info.source_id() == f"neds-rt-replay-{eid}-{session.probe}"
        published = replay_clock_from_info(info)
        assert published == clock
        assert float(info.desc().child("replay").child_value("t_offset")) == clock.t_offset
        b_info = inlets["-behaviour"].info(timeout=10.0)
        assert b_info.type() == "Behavior" and channels_from_info(b_info) == list(BEHAVIOUR_CHANNELS)
        m_info = inlets["-markers"].info(timeout=10.0)
        assert m_info.type() == "Markers" and m_info.channel_format() == lsl.cf_string
        assert replayer.wait_for_consumers(10.0)
        tc = inlets[""].time_correction(timeout=10.0)

        result: dict[str, ReplaySummary] = {}
        runner = threading.Thread(target=lambda: result.setdefault("s", replayer.run()), daemon=True)
        runner.start()
        expected = segment_spikes(session, start, start + duration)
        n_beh = round(duration * 50)
        assert replayer.markers is not None
        n_mk = len(replayer.markers.labels)
        units_got, t_got = _pull_all(inlets[""], expected.times.size, 1, lsl.cf_int32)
        beh_got, tb_got = _pull_all(inlets["-behaviour"], n_beh, 2, lsl.cf_float32)
        mk_got, tm_got = _pull_all(inlets["-markers"], n_mk, 1, "string")
        runner.join(timeout=30.0)
        assert not runner.is_alive()
    finally:
        for inlet in inlets.values():
            inlet.close_stream()
        replayer.close()

    # every spike, in order, with its unit, stamped session time offset by the start (scaled by speed)
    assert t_got.size == expected.times.size
    np.testing.assert_array_equal(units_got[:, 0], expected.units)
    want = clock.t0 + (expected.times - start) / speed  # (S,) stream s
    assert np.abs((t_got + tc) - want).max() < 1e-3
    back, loop = published.to_session(t_got)  # a consumer maps stamps back with the published clock
    assert (loop == 0).all() and np.abs(back - expected.times).max() < 1e-6
    # binned back on the session clock, the replayed stream gives the session's own 20 ms bins
    n_bins = int(duration / 0.02)
    live = bin_windows(back, units_got[:, 0], [start], n_bins, session.n_units)  # (1, T, N)
    offline = bin_windows(session.spike_times, session.spike_units, [start], n_bins, session.n_units)
    np.testing.assert_array_equal(live, offline)

    beh = replayer.behaviour
    assert beh is not None and beh_got.shape == (n_beh, 2)
    np.testing.assert_array_equal(beh_got, beh.values)
    np.testing.assert_allclose(tb_got, clock.to_stream(beh.times), rtol=0, atol=1e-9)
    assert tuple(mk_got) == replayer.markers.labels
    np.testing.assert_allclose(tm_got, clock.to_stream(replayer.markers.times), rtol=0, atol=1e-9)

    summary = result["s"]
    assert summary.completed and summary.loops == 1
    assert (summary.n_spikes, summary.n_behaviour, summary.n_markers) == (expected.times.size, n_beh, n_mk)
    _check_lateness(summary)


def test_zmq_replay_loops_with_continuing_times(sim: tuple[Path, str, Session]) -> None:
    _, eid, session = sim
    url = f"tcp://127.0.0.1:{_free_port()}"
    start, duration, speed = 40.0, 0.8, 4.0
    cfg = ReplayConfig(stream="spk", speed=speed, start=start, duration=duration, loop=True, lsl=False,
                       zmq_out=url, lead_s=3.0, realtime=True)  # SCHED_FIFO where permitted
    replayer = Replayer(session, cfg)
    clock = replayer.open()
    assert replayer.behaviour is None and replayer.markers is None  # LSL-only streams
    inlet = ZMQSpikeInlet(url, topic="spk")
    stop = threading.Event()
    result: dict[str, ReplaySummary] = {}
    runner = threading.Thread(target=lambda: result.setdefault("s", replayer.run(stop)), daemon=True)
    expected = segment_spikes(session, start, start + duration)
    n = expected.times.size
    times: list[np.ndarray] = []
    units: list[np.ndarray] = []
    try:
        assert replayer.wait_for_consumers(10.0)
        got_units = inlet.wait_for_units(10.0)
        assert got_units == stream_units(session) and got_units.session_id == eid
        runner.start()
        deadline = time.monotonic() + 30.0
        while sum(t.size for t in times) < 2 * n + n // 2 and time.monotonic() < deadline:
            batch = inlet.poll(50)
            if batch is not None:
                assert isinstance(batch, SpikeBatch)
                times.append(batch.times.copy())
                units.append(batch.units.copy())
        stop.set()
        runner.join(timeout=30.0)
        assert not runner.is_alive()
    finally:
        stop.set()
        inlet.close()
        replayer.close()
    t = np.concatenate(times)
    u = np.concatenate(units)
    assert t.size >= 2 * n and inlet.seq.dropped == 0
    assert np.all(np.diff(t) >= 0)  # monotonic across the loop boundary
    for loop in (0, 1):
        np.testing.assert_array_equal(t[loop * n:(loop + 1) * n], clock.to_stream(expected.times, loop))
        np.testing.assert_array_equal(u[loop * n:(loop + 1) * n], expected.units)
    assert t[n] - t[0] == pytest.approx(duration / speed, abs=1e-9)  # next loop starts one period later
    summary = result["s"]
    assert not summary.completed and summary.loops >= 3
    assert summary.n_spikes >= t.size
    _check_lateness(summary)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_clear_errors(sim: tuple[Path, str, Session]) -> None:
    root, eid, session = sim
    with pytest.raises(DataError, match="eid not found"):
        load_replay_session(root, str(uuid.uuid4()))
    with pytest.raises(DataError, match=r"probe.*probe00"):
        load_replay_session(root, eid, "probe07")
    with pytest.raises(DataError, match=r"not a ONE cache|does not exist"):
        load_replay_session(root / "nope", eid)
    end = session_end(session)
    with pytest.raises(ConfigError, match="--start"):
        replay_segment(session, -1.0, None)
    with pytest.raises(ConfigError, match="--start"):
        replay_segment(session, end + 5.0, 1.0)
    with pytest.raises(ConfigError, match="segment ends past the end"):
        replay_segment(session, end - 1.0, 2.0)
    assert replay_segment(session, 10.0, 2.0) == (10.0, 12.0)
    for speed in (0.0, -2.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="--speed"):
            Replayer(session, ReplayConfig(speed=speed))
    with pytest.raises(ConfigError, match="--duration"):
        Replayer(session, ReplayConfig(duration=0.0))
    with pytest.raises(ConfigError, match="need LSL or ZMQ"):
        Replayer(session, ReplayConfig(lsl=False, zmq_out=None))


def test_cli_replay_over_zmq_and_errors(sim: tuple[Path, str, Session], tmp_path: Path) -> None:
    root, eid, session = sim
    url = f"tcp://127.0.0.1:{_free_port()}"
    out = tmp_path / "replay.json"
    runner = CliRunner()
    args = ["replay", "--data", str(root), "--session", eid, "--no-lsl", "--zmq-out", url, "--start", "20",
            "--duration", "0.5", "--speed", "5", "--lead", "0.1", "--json", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "pacing lateness per chunk" in res.output and "worst spike lateness" in res.output
    summary = json.loads(out.read_text())
    assert summary["n_spikes"] == segment_spikes(session, 20.0, 20.5).times.size and summary["completed"]
    assert summary["chunk_lateness_ms"]["count"] == summary["n_chunks"]

    bad = runner.invoke(app, [*args[:-2], "--speed", "0"])
    assert bad.exit_code == 2 and "--speed" in bad.output
    bad = runner.invoke(app, ["replay", "--data", str(root), "--session", str(uuid.uuid4()), "--no-lsl",
                              "--zmq-out", url])
    assert bad.exit_code == 2 and "eid not found" in bad.output
    bad = runner.invoke(app, ["replay", "--data", str(root), "--session", eid, "--no-lsl"])
    assert bad.exit_code == 2 and "need LSL or ZMQ" in bad.output


def test_cli_replay_stops_cleanly_on_sigterm(sim: tuple[Path, str, Session]) -> None:
    root, eid, _ = sim
    url = f"tcp://127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "neds_rt.cli", "replay", "--data", str(root), "--session", eid, "--no-lsl",
           "--zmq-out", url, "--stream", "spk", "--start", "30", "--duration", "1", "--speed", "2", "--loop",
           "--lead", "0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    inlet = ZMQSpikeInlet(url, topic="spk")
    try:
        got = 0
        deadline = time.monotonic() + 60.0
        while got < 1000 and time.monotonic() < deadline and proc.poll() is None:
            batch = inlet.poll(50)
            if isinstance(batch, SpikeBatch):
                got += int(batch.times.size)
        assert got >= 1000, "no spikes from the replay process"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30.0)
    finally:
        inlet.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "(stopped)" in out and "pacing lateness per chunk" in out
