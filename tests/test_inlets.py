"""Inlets over real loopback sockets: LSL (events, counts, reconnect) and ZMQ SUB (malformed, gaps)."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable

import numpy as np
import pytest
import zmq

from neds_rt import wire
from neds_rt.errors import StreamError
from neds_rt.inlets import CountsBatch, Gap, LSLSpikeInlet, SpikeBatch, ZMQSpikeInlet, match_units
from neds_rt.lsl_scope import pylsl
from neds_rt.lsl_streams import StreamUnits
from neds_rt.outlets import LSLCountsOutlet, LSLSpikeOutlet, ZMQSpikePublisher

pytestmark = pytest.mark.timeout(60)

UNIT_IDS = [f"unit-{i}" for i in range(12)]
REGIONS = ["CA1"] * 6 + ["VISp"] * 6


def _name() -> str:
    return f"test-spikes-{uuid.uuid4().hex[:12]}"


def _events(n: int, t0: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    times = t0 + np.sort(rng.uniform(0.0, 0.5, n))  # (n,) float64 seconds
    units = rng.integers(0, len(UNIT_IDS), n).astype(np.int32)  # (n,) int32
    return times, units


def _poll_until(
    inlet: LSLSpikeInlet | ZMQSpikeInlet,
    done: Callable[[list], bool],
    timeout: float = 10.0,
    on_batch: Callable[[object], None] | None = None,
) -> list:
    batches: list = []
    deadline = time.monotonic() + timeout
    while not done(batches):
        assert time.monotonic() < deadline, f"timed out after {len(batches)} batches"
        b = inlet.poll(20.0)
        if b is not None:
            if on_batch is not None:
                on_batch(b)
            batches.append(b)
    return batches


def _n_events(batches: list) -> int:
    return sum(b.times.size for b in batches if isinstance(b, SpikeBatch))


# ---------------------------------------------------------------------------------------------- LSL


def test_lsl_spikes_delivered_with_their_timestamps() -> None:
    lsl = pylsl()
    name = _name()
    out = LSLSpikeOutlet(name, "eid-A", UNIT_IDS, REGIONS, source_id=name)
    inlet = LSLSpikeInlet(name=name, resolve_timeout=5.0)
    try:
        assert inlet.units == StreamUnits(tuple(UNIT_IDS), tuple(REGIONS), "eid-A")
        assert inlet.kind == "events"
        assert out.wait_for_consumers(5.0)
        times, units = _events(3000, lsl.local_clock())
        for lo in range(0, times.size, 700):  # several pushes, like a replay tick
            out.push(times[lo : lo + 700], units[lo : lo + 700])
        got_t: list[np.ndarray] = []
        got_u: list[np.ndarray] = []

        def keep(b: object) -> None:  # undo the time correction
            assert isinstance(b, SpikeBatch) and b.gap is None
            got_t.append(b.times - inlet.time_correction)
            got_u.append(b.units)

        _poll_until(inlet, lambda bs: _n_events(bs) >= times.size, on_batch=keep)
        np.testing.assert_array_equal(np.concatenate(got_u), units)
        np.testing.assert_allclose(np.concatenate(got_t), times, rtol=0, atol=1e-9)
        assert inlet.same_host and inlet.time_correction == 0.0  # same host, same clock: no estimate noise
    finally:
        inlet.close()
        out.close()


def test_lsl_counts_stream() -> None:
    lsl = pylsl()
    name = _name()
    out = LSLCountsOutlet(name, "eid-B", UNIT_IDS, REGIONS, source_id=name)
    inlet = LSLSpikeInlet(name=name, stype="SpikeCounts")
    try:
        assert inlet.kind == "counts" and inlet.units.unit_ids == tuple(UNIT_IDS)
        assert out.wait_for_consumers(5.0)
        t0 = lsl.local_clock()
        starts = t0 + 0.02 * np.arange(10)  # (10,) bin starts
        counts = np.arange(10 * 12, dtype=np.int32).reshape(10, 12)  # (10, 12)
        out.push(starts, counts)
        rows: list[np.ndarray] = []
        stamps: list[np.ndarray] = []

        def keep(b: object) -> None:
            assert isinstance(b, CountsBatch)
            rows.append(b.counts.copy())
            stamps.append(b.t_start - inlet.time_correction)

        _poll_until(inlet, lambda bs: sum(b.counts.shape[0] for b in bs) >= 10, on_batch=keep)
        np.testing.assert_array_equal(np.concatenate(rows), counts)
        np.testing.assert_allclose(np.concatenate(stamps), starts, rtol=0, atol=1e-9)
    finally:
        inlet.close()
        out.close()


def test_lsl_resolve_failure_names_what_was_looked_for() -> None:
    missing = _name()
    with pytest.raises(StreamError, match=f"no stream with name '{missing}' found within 0.3 s"):
        LSLSpikeInlet(name=missing, resolve_timeout=0.3)


def test_lsl_wrong_type_refused() -> None:
    name = _name()
    out = LSLCountsOutlet(name, "eid", UNIT_IDS, REGIONS, source_id=name)
    try:
        with pytest.raises(StreamError, match="has type 'SpikeCounts', not 'Spikes'"):
            LSLSpikeInlet(name=name, stype="Spikes", resolve_timeout=5.0)
    finally:
        out.close()


def test_lsl_batches_kept_across_polls_keep_their_values() -> None:
    """Each batch owns its arrays: a later poll (which reuses the pull buffers) must not change it."""
    lsl = pylsl()
    name = _name()
    out = LSLSpikeOutlet(name, "eid-K", UNIT_IDS, REGIONS, source_id=name)
    inlet = LSLSpikeInlet(name=name, max_samples=16)  # 300 events arrive in many small batches
    try:
        assert out.wait_for_consumers(5.0)
        times, units = _events(300, lsl.local_clock(), seed=5)
        out.push(times, units)
        batches = _poll_until(inlet, lambda bs: _n_events(bs) >= times.size)
        assert len(batches) >= 300 // 16
        np.testing.assert_array_equal(np.concatenate([b.units for b in batches]), units)
        np.testing.assert_allclose(np.concatenate([b.times for b in batches]), times + inlet.time_correction,
                                   rtol=0, atol=1e-6)
    finally:
        inlet.close()
        out.close()


def test_lsl_stream_that_stops_and_comes_back_reports_a_gap() -> None:
    lsl = pylsl()
    name = _name()
    out = LSLSpikeOutlet(name, "eid-C", UNIT_IDS, REGIONS, source_id=name)
    inlet = LSLSpikeInlet(name=name)
    try:
        assert out.wait_for_consumers(5.0)
        t1, u1 = _events(200, lsl.local_clock(), seed=1)
        out.push(t1, u1)
        _poll_until(inlet, lambda bs: _n_events(bs) >= 200)
        out.close()  # the source goes away
        _poll_until(inlet, lambda bs: not inlet.connected)
        out2 = LSLSpikeOutlet(name, "eid-C", UNIT_IDS, REGIONS, source_id=name)  # same name + source_id
        try:
            deadline = time.monotonic() + 15.0
            gaps: list[Gap] = []
            while not out2.have_consumers():  # the inlet re-resolves in the background while polled
                assert time.monotonic() < deadline, "inlet never reconnected"
                b = inlet.poll(20.0)
                if b is not None and b.gap is not None:
                    gaps.append(b.gap)
            t2, u2 = _events(300, lsl.local_clock(), seed=2)
            out2.push(t2, u2)
            after = _poll_until(inlet, lambda bs: _n_events(bs) >= 300)
            gaps += [b.gap for b in after if b.gap is not None]
            assert len(gaps) == 1 and inlet.gaps == gaps
            gap = gaps[0]
            assert gap.last_time is not None and abs(gap.last_time - t1[-1]) < 1e-3
            assert gap.resumed_at >= gap.lost_at
            got = np.concatenate([b.times for b in after if isinstance(b, SpikeBatch)])
            np.testing.assert_allclose(got, t2 + inlet.time_correction, rtol=0, atol=1e-6)
        finally:
            out2.close()
    finally:
        inlet.close()


# ---------------------------------------------------------------------------------------------- ZMQ


@pytest.fixture
def url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"ipc://{tmp_path}/spikes.sock"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raw_pub(url: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(url)
    return sock


def _wait_sub(sock: zmq.Socket) -> None:
    assert sock.poll(5000, zmq.POLLIN), "no subscriber"
    assert sock.recv()[:1] == b"\x01"


def test_zmq_publisher_to_inlet() -> None:
    units = StreamUnits(tuple(UNIT_IDS), tuple(REGIONS), "eid-Z")
    with zmq.Context() as ctx:
        url = f"tcp://127.0.0.1:{_free_port()}"
        pub = ZMQSpikePublisher(url, b"spikes", units=units, context=ctx)
        inlet = ZMQSpikeInlet(url, b"spikes", context=ctx)
        try:
            assert pub.wait_for_subscriber(5.0)
            assert inlet.wait_for_units(5.0) == units
            times, u = _events(1000, 100.0)
            for lo in range(0, 1000, 100):
                pub.publish(times[lo : lo + 100], u[lo : lo + 100])
            bs = _poll_until(inlet, lambda bs: _n_events(bs) >= 1000)
            np.testing.assert_array_equal(np.concatenate([b.times for b in bs]), times)
            np.testing.assert_array_equal(np.concatenate([b.units for b in bs]), u)
            assert inlet.received == 10 and inlet.n_malformed == 0 and inlet.seq.dropped == 0
            assert all(b.gap is None for b in bs)
        finally:
            inlet.close()
            pub.close()


def test_zmq_malformed_messages_counted_and_loop_continues(url: str) -> None:
    sock = _raw_pub(url)
    units = StreamUnits(tuple(UNIT_IDS), tuple(REGIONS), "eid-M")
    inlet = ZMQSpikeInlet(url, "spikes", units=units)
    try:
        _wait_sub(sock)
        good = [wire.encode_spikes(b"spikes", k, [float(k)], [k % 12]) for k in range(6)]
        bad = [
            [b"spikes", b"{nope", b""],
            [b"spikes", b'{"seq": NaN}', b""],
            [b"spikes", b"[" * 2000 + b"]" * 2000, b""],
            [b"spikes"],
            [b"spikes", b'{"seq":9,"t_first":1.0,"t_last":1.0,"n":1,"dtype":"t<f8,unit<i4"}', b"\0" * 11],
        ]
        sequence: list = []
        for k, g in enumerate(good):
            sequence.append(g)
            if k < len(bad):
                sequence.append(bad[k])
        sequence.append([b"spikesX", b"{}", b""])  # another stream sharing the prefix: ignored
        for frames in sequence:
            sock.send_multipart(frames)
        bs = _poll_until(inlet, lambda bs: _n_events(bs) >= 6)
        assert np.concatenate([b.times for b in bs]).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        _poll_until(inlet, lambda bs: inlet.n_malformed + inlet.foreign >= 6, timeout=5.0)
        assert inlet.n_malformed == 5 and inlet.foreign == 1
        reasons = " | ".join(inlet.malformed)
        for needle in (
            "not valid JSON",
            "NaN is not allowed",
            "nested too deeply",
            "must have 3 frames",
            "payload must be n*12",
        ):
            assert needle in reasons
        assert inlet.seq.dropped == 0
    finally:
        inlet.close()
        sock.close()


def test_zmq_seq_gap_reported_as_dropped(url: str) -> None:
    sock = _raw_pub(url)
    inlet = ZMQSpikeInlet(url, b"spikes", units=StreamUnits(tuple(UNIT_IDS), tuple(REGIONS), "e"))
    try:
        _wait_sub(sock)
        for seq in (0, 1, 4, 5):
            sock.send_multipart(wire.encode_spikes(b"spikes", seq, [float(seq)], [0]))
        bs = _poll_until(inlet, lambda bs: _n_events(bs) >= 4)
        gaps = [b.gap for b in bs if b.gap is not None]
        assert len(gaps) == 1 and gaps[0].dropped_messages == 2 and gaps[0].last_time == 1.0
        assert inlet.seq.dropped == 2
    finally:
        inlet.close()
        sock.close()


def test_zmq_counts_inlet(url: str) -> None:
    units = StreamUnits(("a", "b", "c"), ("r", "r", "r"), "e")
    pub = ZMQSpikePublisher(url, b"counts", units=units, kind="counts")
    inlet = ZMQSpikeInlet(url, b"counts", kind="counts")
    try:
        assert pub.wait_for_subscriber(5.0)
        assert inlet.wait_for_units(5.0).unit_ids == ("a", "b", "c")
        for k in range(5):
            pub.publish_counts(k, 0.02 * k, [k, k + 1, k + 2])
        bs = _poll_until(inlet, lambda bs: sum(b.counts.shape[0] for b in bs) >= 5)
        counts = np.concatenate([b.counts for b in bs])
        assert counts.shape == (5, 3) and counts[:, 0].tolist() == [0, 1, 2, 3, 4]
        assert np.concatenate([b.t_start for b in bs]).tolist() == [0.02 * k for k in range(5)]
    finally:
        inlet.close()
        pub.close()


def test_zmq_wait_for_units_times_out(url: str) -> None:
    inlet = ZMQSpikeInlet(url, b"spikes")
    try:
        with pytest.raises(StreamError, match=r"no unit metadata within 0\.2 s"):
            inlet.wait_for_units(0.2)
    finally:
        inlet.close()


# ---------------------------------------------------------------------------------------------- units


def test_match_units_maps_a_permutation() -> None:
    stream = StreamUnits(("c", "a", "b"), ("r",) * 3, "s")
    assert match_units(stream, ["a", "b", "c"]).tolist() == [2, 0, 1]


def test_match_units_refuses_a_mismatch_naming_the_ids() -> None:
    with pytest.raises(StreamError) as ei:
        match_units(["a", "b", "x"], ["a", "b", "c", "d"])
    msg = str(ei.value)
    assert "2 missing from the stream (first ['c', 'd'])" in msg and "1 not in the model (first ['x'])" in msg
    assert match_units(["a", "x", "b"], ["a", "b"], allow_extra=True).tolist() == [0, -1, 1]
    with pytest.raises(StreamError, match="must be unique"):
        match_units(["a", "a"], ["a"])


def test_lsl_stream_units_refused_by_a_different_model() -> None:
    name = _name()
    out = LSLSpikeOutlet(name, "eid", UNIT_IDS, REGIONS, source_id=name)
    inlet = LSLSpikeInlet(name=name)
    try:
        with pytest.raises(StreamError, match="missing from the stream"):
            match_units(inlet.units, [*UNIT_IDS[:-1], "other-unit"])
    finally:
        inlet.close()
        out.close()
