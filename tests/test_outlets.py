"""Outlets over real loopback sockets: LSL Behavior stream and ZMQ decode / spike publishers."""

from __future__ import annotations

import socket
import time
import uuid

import numpy as np
import pytest
import zmq

from neds_rt import wire
from neds_rt.errors import StreamError
from neds_rt.lsl_scope import pylsl
from neds_rt.lsl_streams import StreamUnits, channels_from_info, units_from_info
from neds_rt.outlets import LSLBehaviorOutlet, LSLSpikeOutlet, ZMQDecodePublisher, ZMQSpikePublisher

pytestmark = pytest.mark.timeout(60)

CHANNELS = [("wheel_speed", "rad/s"), ("whisker_me", "a.u."), ("p_choice_left", "probability")]


def _resolve(name: str):  # type: ignore[no-untyped-def]
    found = pylsl().resolve_byprop("name", name, minimum=1, timeout=5.0)
    assert found, f"{name} not found"
    return found[0]


def test_behavior_outlet_labels_and_samples_read_back() -> None:
    lsl = pylsl()
    name = f"test-behavior-{uuid.uuid4().hex[:12]}"
    out = LSLBehaviorOutlet(name, CHANNELS, source_id=name, session_id="eid-7")
    inlet = lsl.StreamInlet(_resolve(name), max_buflen=2, recover=False)
    try:
        info = inlet.info(timeout=5.0)
        assert info.type() == "Behavior" and info.nominal_srate() == 50.0 and info.source_id() == name
        assert info.channel_format() == lsl.cf_float32
        assert channels_from_info(info) == CHANNELS
        assert info.desc().child_value("timestamp") == "bin_end"
        inlet.open_stream(timeout=5.0)
        assert out.wait_for_consumers(5.0)
        bin_ends = 1000.0 + 0.02 * np.arange(1, 6)  # (5,) bin end times
        values = np.arange(15, dtype=np.float32).reshape(5, 3) / 7  # (5, 3)
        for t, v in zip(bin_ends, values, strict=True):
            out.push(v, t)
        got_v: list[np.ndarray] = []
        got_t: list[np.ndarray] = []
        deadline = time.monotonic() + 10.0
        while sum(x.shape[0] for x in got_v) < 5:
            assert time.monotonic() < deadline
            s, ts = inlet.pull_chunk(timeout=0.05, max_samples=16, min_samples=1, as_numpy=True)
            got_v.append(s)
            got_t.append(ts)
        np.testing.assert_array_equal(np.concatenate(got_v), values)  # float32 exact
        np.testing.assert_array_equal(np.concatenate(got_t), bin_ends)  # stamped with the bin end
        with pytest.raises(StreamError, match="needs 3 values"):
            out.push([1.0, 2.0], 1.0)
    finally:
        inlet.close_stream()
        out.close()


def test_spike_outlet_desc_carries_units() -> None:
    name = f"test-spk-{uuid.uuid4().hex[:12]}"
    out = LSLSpikeOutlet(name, "eid-9", ["a", "b"], ["CA1", "LP"], source_id="src-" + name, bin_size=0.01)
    inlet = pylsl().StreamInlet(_resolve(name), recover=False)
    try:
        info = inlet.info(timeout=5.0)
        assert units_from_info(info) == StreamUnits(("a", "b"), ("CA1", "LP"), "eid-9")
        assert info.desc().child_value("bin_size_s") == "0.01" and info.source_id() == "src-" + name
        assert info.nominal_srate() == 0.0 and info.channel_count() == 1
        with pytest.raises(StreamError, match="same length"):
            out.push([1.0, 2.0], [0])
    finally:
        inlet.close_stream()
        out.close()


def test_stream_info_builders_refuse_bad_units() -> None:
    with pytest.raises(StreamError, match="one region per unit id"):
        LSLSpikeOutlet("x", "e", ["a", "b"], ["r"], source_id="x")
    with pytest.raises(StreamError, match="must be unique"):
        LSLSpikeOutlet("x", "e", ["a", "a"], ["r", "r"], source_id="x")
    with pytest.raises(StreamError, match="labels must be unique"):
        LSLBehaviorOutlet("x", [("a", "u"), ("a", "v")], source_id="x")


def test_units_from_info_refuses_a_stream_without_units() -> None:
    lsl = pylsl()
    info = lsl.StreamInfo("bare", "Spikes", 1, lsl.IRREGULAR_RATE, lsl.cf_int32, "bare")
    with pytest.raises(StreamError, match="has no <units> list"):
        units_from_info(info)


def _sub(url: str, topic: bytes) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(url)
    return sock


def _recv(sock: zmq.Socket, timeout_ms: int = 5000) -> list[bytes]:
    assert sock.poll(timeout_ms, zmq.POLLIN), "nothing received"
    return sock.recv_multipart()


def test_zmq_decode_publisher(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"ipc://{tmp_path}/decode.sock"
    labels = [c[0] for c in CHANNELS]
    pub = ZMQDecodePublisher(url, labels)
    sub = _sub(url, b"decode")
    try:
        assert pub.wait_for_subscriber(5.0)
        before = time.monotonic()
        for k in range(3):
            stamps = {"bin_end": 1.0 + k, "closed": 1.1 + k, "infer_start": 1.2 + k, "infer_end": 1.3 + k}
            pub.publish(100 + k, 50.0 + 0.02 * k, stamps, wire.FLAG_GAP_FILLED if k == 1 else 0, [k, 0.5, -1])
        msgs = [wire.decode_decode(_recv(sub), b"decode") for _ in range(3)]
        assert [m.seq for m in msgs] == [0, 1, 2] and [m.bin for m in msgs] == [100, 101, 102]
        assert [m.flags for m in msgs] == [0, wire.FLAG_GAP_FILLED, 0]
        assert msgs[2].bin_end == 50.0 + 0.04 and msgs[2].labels == tuple(labels)
        assert msgs[1].stamps["infer_end"] == 2.3 and msgs[1].stamps["published"] >= before
        np.testing.assert_array_equal(msgs[2].values, np.array([2, 0.5, -1], np.float32))
        with pytest.raises(StreamError, match="missing 'infer_end'"):
            pub.publish(1, 1.0, {"bin_end": 1.0, "closed": 1.0, "infer_start": 1.0}, 0, [0, 0, 0])
    finally:
        sub.close()
        pub.close()


def test_zmq_spike_publisher_sends_meta_and_events(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"ipc://{tmp_path}/spk.sock"
    units = StreamUnits(("u1", "u2"), ("CA1", "CA3"), "eid")
    pub = ZMQSpikePublisher(url, b"spikes", units=units, bin_size=0.02)
    sub = _sub(url, b"spikes")
    try:
        assert pub.wait_for_subscriber(5.0)
        meta = wire.decode_meta(_recv(sub), b"spikes")  # sent as soon as the subscriber is seen
        assert (meta.unit_ids, meta.regions, meta.session_id, meta.bin_size_s) == (
            ("u1", "u2"),
            ("CA1", "CA3"),
            "eid",
            0.02,
        )
        big_t = np.linspace(0, 1, 5000)  # larger than the initial record buffer: it grows
        big_u = np.arange(5000, dtype=np.int32) % 2
        assert pub.publish(big_t, big_u) == 0
        assert pub.publish([2.0], [1]) == 1
        msgs = []
        while len(msgs) < 2:
            frames = _recv(sub)
            if frames[0] == b"spikes":
                msgs.append(wire.decode_spikes(frames, b"spikes"))
        np.testing.assert_array_equal(msgs[0].times, big_t)
        np.testing.assert_array_equal(msgs[0].units, big_u)
        assert msgs[1].times.tolist() == [2.0] and msgs[1].seq == 1
    finally:
        sub.close()
        pub.close()


def test_zmq_publisher_errors() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(StreamError, match="must not be empty"):
        ZMQDecodePublisher(url, ["a"], topic=b"")
    pub = ZMQDecodePublisher(url, ["a"])  # the port is now taken
    try:
        with pytest.raises(StreamError, match="cannot bind"):
            ZMQDecodePublisher(url, ["a"])
    finally:
        pub.close()
