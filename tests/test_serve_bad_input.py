"""serve under bad input: each problem is refused at start or counted, serve keeps running, and the decodes
around it still equal the offline engine's on the same bins."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from neds_rt import wire
from neds_rt.decode_log import read_decode_log
from neds_rt.errors import NedsRtError, StreamError
from neds_rt.lsl_streams import StreamUnits
from neds_rt.outlets import LSLSpikeOutlet, ZMQSpikePublisher
from neds_rt.serve import ServeConfig, Server
from tests._serve_models import (
    EID,
    REGIONS,
    UNIT_IDS,
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
T0 = 100.0  # stream time of bin 0 in the ZMQ tests (stream clock)


@pytest.fixture(scope="module")
def model() -> Path:
    return tiny_model(8)


def _bin_times(rng: np.random.Generator, first: int, last: int, per_bin: int = 4
               ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted spike times inside bins first..last (never near an edge) and their units."""
    k = np.repeat(np.arange(first, last + 1), per_bin)
    times = T0 + (k + rng.uniform(0.1, 0.9, k.size)) * BIN
    return np.sort(times), rng.integers(0, 8, k.size).astype(np.int32)


def _zmq_server(model: Path, tmp_path: Path, units: StreamUnits | None = None
                ) -> tuple[ZMQSpikePublisher, ServerThread, ServeConfig]:
    url = f"tcp://127.0.0.1:{free_port()}"
    units = units or StreamUnits(tuple(UNIT_IDS), tuple(REGIONS), EID)
    pub = ZMQSpikePublisher(url, topic=b"spikes", units=units)
    subscribed = threading.Thread(target=pub.wait_for_subscriber, args=(20.0,))  # sends the unit metadata
    subscribed.start()
    cfg = ServeConfig(model, stream="spikes", zmq_in=url, clock="stream", grace_ms=40.0, warmup_steps=5,
                      log_path=tmp_path / "decodes.csv", out_stream=f"dec-{uuid.uuid4().hex[:8]}")
    try:
        st = ServerThread(cfg)
    finally:
        subscribed.join()
    st.start()
    return pub, st, cfg


def _check_against_offline(model: Path, cfg: ServeConfig, times: np.ndarray, units: np.ndarray,
                           server: Server, t0: float) -> tuple[np.ndarray, np.ndarray]:
    """Every logged bin is contiguous and equals the offline engine on the kept events; returns the flags
    and the (T, N) reference counts."""
    log = read_decode_log(cfg.log_path)  # type: ignore[arg-type]
    first = server.first_bin
    assert first is not None
    np.testing.assert_array_equal(log.bins, np.arange(first, first + len(log.bins)))
    kt, ku = kept_events(times, units, server.rejected)
    counts = bin_events(kt, ku, t0, first, len(log.bins), 8)
    np.testing.assert_allclose(log.values, offline_decodes(model, counts), atol=1e-5, rtol=0)
    return log.flags, counts


@pytest.mark.parametrize("period", [-0.001, 1.0, float("nan")])
def test_io_period_outside_zero_to_the_stall_timeout_is_refused(model: Path, period: float) -> None:
    with pytest.raises(NedsRtError, match="io_period_s"):
        Server(ServeConfig(model, io_period_s=period, stall_s=1.0))


@pytest.mark.parametrize("prewarm_ms", [-1.0, 15.0, float("nan")])
def test_prewarm_outside_zero_to_15_ms_is_refused(model: Path, prewarm_ms: float) -> None:
    with pytest.raises(NedsRtError, match="--prewarm-ms"):
        Server(ServeConfig(model, prewarm_ms=prewarm_ms))


@pytest.mark.parametrize(("engine", "device"), [("onnx", "cpu"), ("torchscript", "cuda")])
def test_cuda_graph_off_the_onnx_cuda_engine_is_refused(model: Path, engine: str, device: str) -> None:
    with pytest.raises(NedsRtError, match=r"--cuda-graph.*needs --engine onnx --device cuda"):
        Server(ServeConfig(model, engine=engine, device=device, cuda_graph=True))


def test_cli_prewarm_defaults_are_serves() -> None:
    import inspect

    from neds_rt import cli
    from neds_rt.serve import PREWARM_MS, ServeConfig

    assert ServeConfig(Path("m.onnx")).prewarm_ms == PREWARM_MS > 0
    assert ServeConfig(Path("m.onnx")).prewarm_adapt
    for command in (cli.serve, cli.bench_latency):  # typer keeps the default in the signature
        assert inspect.signature(command).parameters["prewarm_ms"].default == PREWARM_MS, command
        assert inspect.signature(command).parameters["prewarm_adapt"].default is True, command


def test_stream_whose_units_differ_from_the_model_is_refused_at_start(model: Path) -> None:
    uid = uuid.uuid4().hex[:8]
    ids = [*UNIT_IDS[:-1], "999"]
    outlet = LSLSpikeOutlet(f"spk-{uid}", EID, ids, REGIONS, source_id=f"src-{uid}")
    server = Server(ServeConfig(model, stream=f"spk-{uid}", out_stream=f"dec-{uid}", warmup_steps=1))
    try:
        with pytest.raises(StreamError, match=r"missing from the stream \(first \['107'\]\).*\['999'\]"):
            server.open()
    finally:
        outlet.close()


def test_nan_unknown_out_of_order_late_and_malformed_are_counted(model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pub, st, cfg = _zmq_server(model, tmp_path)
    server = st.server
    sent_t: list[np.ndarray] = []
    sent_u: list[np.ndarray] = []

    def send(t: np.ndarray, u: np.ndarray) -> None:
        pub.publish(t, u)
        sent_t.append(t)
        sent_u.append(u)

    try:
        send(*_bin_times(rng, 0, 9))  # closes bins up to 6 (stream clock: bin end <= newest - grace)
        st.wait_bin(6)
        t, u = _bin_times(rng, 10, 14)
        order = rng.permutation(t.size)  # out of order inside open bins: fine, not counted
        t, u = t[order], u[order]
        t = np.concatenate([t, [np.nan, T0 + 12.5 * BIN, T0 + 13.5 * BIN]])
        u = np.concatenate([u, [0, 8, -1]]).astype(np.int32)  # a NaN time, two unknown unit indices
        send(t, u)
        pub._sock.send_multipart([b"spikes", b'{"seq": 2, "n": NaN}', b"\x00" * 12])  # malformed
        send(*_bin_times(rng, 15, 24))
        st.wait_bin(20)
        late_t = T0 + np.array([3.5, 3.6, 5.2]) * BIN  # bins 3 and 5 closed long ago
        send(late_t, np.array([1, 2, 3], np.int32))
        send(*_bin_times(rng, 25, 45))
        st.wait_bin(40)
        summary = st.stop()
    finally:
        pub.close()
        if st.error is None and not st.server._stop.is_set():
            st.stop()
    c = summary.counts
    assert (c["nan_time"], c["unknown_unit"], c["late"], c["malformed_messages"]) == (1, 2, 3, 1)
    assert c.get("ahead", 0) == 0
    late = [r for r in server.rejected if r.reason == "late"]
    assert sorted(np.concatenate([r.bins for r in late]).tolist()) == [3, 3, 5]  # logged with the bins hit
    flags, _ = _check_against_offline(model, cfg, np.concatenate(sent_t), np.concatenate(sent_u), server, T0)
    late_flagged = np.flatnonzero(flags & wire.FLAG_LATE_SPIKES)
    assert late_flagged.size == 1 and late_flagged[0] > 20  # the first bin published after they came
    assert not np.any(flags & wire.FLAG_GAP_FILLED)


def test_zmq_sequence_gap_is_filled_and_flagged(model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pub, st, cfg = _zmq_server(model, tmp_path)
    try:
        t1, u1 = _bin_times(rng, 0, 19)
        pub.publish(t1, u1)
        st.wait_bin(15)
        pub.seq += 5  # five messages lost on the wire ...
        t2, u2 = _bin_times(rng, 40, 60)  # ... and with them bins 20..39
        pub.publish(t2, u2)
        st.wait_bin(55)
        summary = st.stop()
    finally:
        pub.close()
    assert summary.counts["dropped_messages"] == 5 and summary.counts["gaps"] == 1
    flags, _ = _check_against_offline(model, cfg, np.concatenate([t1, t2]), np.concatenate([u1, u2]),
                                      st.server, T0)
    gap_bins = np.flatnonzero(flags & wire.FLAG_GAP_FILLED)
    np.testing.assert_array_equal(gap_bins, np.arange(20, 40))
    assert summary.counts["gap_filled_bins"] == 20


def test_lsl_stream_that_stops_and_comes_back_is_gap_filled(model: Path, tmp_path: Path) -> None:
    uid = uuid.uuid4().hex[:8]
    name, source = f"spk-{uid}", f"src-{uid}"
    outlet = LSLSpikeOutlet(name, EID, UNIT_IDS, REGIONS, source_id=source)
    cfg = ServeConfig(model, stream=name, out_stream=f"dec-{uid}", log_path=tmp_path / "d.csv",
                      grace_ms=40.0, stall_s=0.3, warmup_steps=5)
    st = ServerThread(cfg)
    rng = np.random.default_rng(2)
    try:
        st.start()
        assert outlet.wait_for_consumers(10.0)
        t1, u1 = spike_train(rng, time.monotonic() + 0.3, 1.0)
        push_paced(outlet.push, t1, u1)
        time.sleep(0.3)
        outlet.close()  # the acquisition stops ...
        del outlet
        wait_until(lambda: st.server.telemetry.counts["gap_filled_bins"] >= 10, 20, "gap-filled bins")
        outlet = LSLSpikeOutlet(name, EID, UNIT_IDS, REGIONS, source_id=source)  # ... and comes back
        assert outlet.wait_for_consumers(20.0), "serve did not reconnect"
        t2, u2 = spike_train(rng, time.monotonic() + 0.3, 1.0)
        push_paced(outlet.push, t2, u2)
        server = st.server
        assert server.t0 is not None
        st.wait_bin(int(np.floor((t2.max() - server.t0) / BIN)) + 1)
        summary = st.stop()
    finally:
        outlet.close()
    assert summary.counts["stalls"] >= 1 and summary.counts["gaps"] >= 1
    times, units = np.concatenate([t1, t2]), np.concatenate([u1, u2])
    flags, counts = _check_against_offline(model, cfg, times, units, server, server.t0)
    gap = np.flatnonzero(flags & wire.FLAG_GAP_FILLED)
    assert gap.size == summary.counts["gap_filled_bins"] >= 10
    assert counts[gap].sum() == 0  # flagged bins are exactly the empty, filled ones
    assert server.first_bin is not None
    assert np.all(server.t0 + (server.first_bin + gap) * BIN >= t1.max() - BIN)  # after the first train


def test_stream_units_the_model_does_not_use_are_counted_and_dropped(model: Path, tmp_path: Path) -> None:
    """A sorter streams every unit; the model keeps a subset (e.g. above 2 Hz). Extra units are accepted,
    their spikes counted as unused and dropped, and the decodes equal the offline engine on model units."""
    rng = np.random.default_rng(4)
    stream_ids = ("7", *UNIT_IDS[:4], "8", *UNIT_IDS[4:], "9")  # 3 extra units, model units in order
    stream_regions = ("DG", *REGIONS[:4], "DG", *REGIONS[4:], "DG")
    to_model = np.array([-1, 0, 1, 2, 3, -1, 4, 5, 6, 7, -1])  # stream index -> model column
    pub, st, cfg = _zmq_server(model, tmp_path, StreamUnits(stream_ids, stream_regions, EID))
    try:
        t, _ = _bin_times(rng, 0, 30)
        u_stream = rng.integers(0, len(stream_ids), t.size).astype(np.int32)
        pub.publish(t, u_stream)
        st.wait_bin(25)
        summary = st.stop()
    finally:
        pub.close()
        if st.error is None and not st.server._stop.is_set():
            st.stop()
    unused = to_model[u_stream] < 0
    assert summary.counts["unused_unit_spikes"] == int(unused.sum()) > 0
    assert summary.counts.get("unknown_unit", 0) == 0
    _check_against_offline(model, cfg, t[~unused], to_model[u_stream][~unused], st.server, T0)
