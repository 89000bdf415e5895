"""Wire formats: round trips and every malformed-message case raising a StreamError that names it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neds_rt import wire
from neds_rt.errors import StreamError

T = b"spikes"


def _spikes(n: int = 5, seq: int = 0) -> list[bytes]:
    times = np.linspace(1.0, 1.1, n)
    units = np.arange(n, dtype=np.int32) % 3
    return [bytes(f) for f in wire.encode_spikes(T, seq, times, units)]


def _with_header(frames: list[bytes], **changes: object) -> list[bytes]:
    h = json.loads(frames[1])
    for k, v in changes.items():
        if v is _DROP:
            del h[k]
        else:
            h[k] = v
    return [frames[0], json.dumps(h).encode(), frames[2]]


_DROP = object()


# ---------------------------------------------------------------------------------------------- round trips


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(allow_nan=True, allow_infinity=True, width=64),
            st.integers(min_value=-(2**31), max_value=2**31 - 1),
        ),
        max_size=200,
    ),
    st.integers(min_value=0, max_value=2**63 - 1),
)
def test_spikes_round_trip(events: list[tuple[float, int]], seq: int) -> None:
    times = np.array([e[0] for e in events], np.float64)
    units = np.array([e[1] for e in events], np.int32)
    frames = [bytes(f) for f in wire.encode_spikes(T, seq, times, units)]
    msg = wire.decode_spikes(frames, T)
    assert msg.seq == seq
    np.testing.assert_array_equal(msg.times, times)  # NaN == NaN positions too
    np.testing.assert_array_equal(msg.units, units)
    assert msg.times.dtype == np.float64 and msg.units.dtype == np.int32
    assert len(frames[2]) == 12 * len(events)


def test_spikes_payload_is_packed_little_endian_records() -> None:
    frames = wire.encode_spikes(T, 3, [2.5], [7])
    payload = bytes(frames[2])
    assert payload == np.float64(2.5).astype("<f8").tobytes() + np.int32(7).astype("<i4").tobytes()
    assert json.loads(frames[1]) == {"seq": 3, "t_first": 2.5, "t_last": 2.5, "n": 1, "dtype": "t<f8,unit<i4"}


def test_empty_spike_message() -> None:
    msg = wire.decode_spikes(wire.encode_spikes(T, 0, [], np.zeros(0, np.int32)), T)
    assert msg.times.size == 0 and msg.t_first is None and msg.t_last is None


def test_encode_into_reused_buffer() -> None:
    buf = np.empty(16, wire.SPIKE_DTYPE)
    frames = wire.encode_spikes(T, 1, [1.0, 2.0], [4, 5], out=buf)
    assert np.shares_memory(np.frombuffer(frames[2], np.uint8), buf)
    msg = wire.decode_spikes(frames, T)
    assert msg.units.tolist() == [4, 5]


def test_zmq_frames_are_accepted() -> None:
    zmq = pytest.importorskip("zmq")
    frames = [zmq.Frame(bytes(f)) for f in _spikes()]
    assert wire.decode_spikes(frames, T).times.size == 5


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=2**31 - 1), min_size=1, max_size=64),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
)
def test_counts_round_trip(counts: list[int], b: int, t_start: float) -> None:
    frames = [bytes(f) for f in wire.encode_counts(T, 9, b, t_start, counts)]
    msg = wire.decode_counts(frames, T, n_units=len(counts))
    assert (msg.seq, msg.bin, msg.t_start) == (9, b, t_start)
    assert msg.counts.tolist() == counts and msg.counts.dtype == np.int32


def _decode_frames(**kw: object) -> list[bytes]:
    stamps = {
        "bin_end": 10.0,
        "closed": 10.001,
        "infer_start": 10.0011,
        "infer_end": 10.0015,
        "published": 10.002,
    }
    args: dict = dict(
        seq=4,
        bin_index=500,
        bin_end=10.0,
        stamps=stamps,
        flags=wire.FLAG_GAP_FILLED,
        labels=["wheel_speed", "whisker_me"],
        values=[0.5, np.nan],
    )
    args.update(kw)
    return [bytes(f) for f in wire.encode_decode(b"decode", **args)]  # type: ignore[arg-type]


def test_decode_round_trip() -> None:
    msg = wire.decode_decode(_decode_frames(), b"decode")
    assert (msg.seq, msg.bin, msg.bin_end, msg.flags) == (4, 500, 10.0, wire.FLAG_GAP_FILLED)
    assert msg.labels == ("wheel_speed", "whisker_me")
    assert msg.stamps["infer_end"] == 10.0015 and set(msg.stamps) == set(wire.STAMP_NAMES)
    assert msg.values[0] == np.float32(0.5) and np.isnan(msg.values[1]) and msg.values.dtype == np.float32


def test_meta_round_trip() -> None:
    meta = wire.MetaMessage("events", "eid-1", ("u0", "u1"), ("CA1", "VISp"), 0.02)
    assert wire.decode_meta(wire.encode_meta(T, meta), T) == meta


# ---------------------------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    ("frames_fn", "needle"),
    [
        (lambda f: f[:2], "must have 3 frames"),
        (lambda f: [*f, b"x"], "must have 3 frames"),
        (lambda f: [b"spikes2", f[1], f[2]], "topic does not match exactly"),
        (lambda f: [b"spike", f[1], f[2]], "topic does not match exactly"),
        (lambda f: [f[0], b"{not json", f[2]], "not valid JSON"),
        (lambda f: [f[0], b"\xff\xfe", f[2]], "not valid JSON"),
        (lambda f: [f[0], b"[1, 2]", f[2]], "must be a JSON object"),
        (lambda f: [f[0], b'{"seq": NaN}', f[2]], "NaN is not allowed"),
        (lambda f: [f[0], b'{"seq": Infinity}', f[2]], "Infinity is not allowed"),
        (lambda f: [f[0], b'{"seq": -Infinity}', f[2]], "Infinity is not allowed"),
        (lambda f: [f[0], b"[" * 2000 + b"]" * 2000, f[2]], "nested too deeply"),
        (lambda f: [f[0], b" " * 5000, f[2]], "over the 4096-byte cap"),
        (
            lambda f: [f[0], b'{"seq":1,"seq":2,"t_first":1,"t_last":1,"n":0,"dtype":"x"}', f[2]],
            "duplicate key",
        ),
        (lambda f: _with_header(f, seq=_DROP), "missing ['seq']"),
        (lambda f: _with_header(f, extra=1), "extra ['extra']"),
        (lambda f: _with_header(f, seq="1"), "'seq' must be an integer"),
        (lambda f: _with_header(f, seq=True), "'seq' must be an integer"),
        (lambda f: _with_header(f, seq=1.0), "'seq' must be an integer"),
        (lambda f: _with_header(f, seq=-1), "'seq' must be in"),
        (lambda f: _with_header(f, seq=2**70), "'seq' must be in"),
        (lambda f: _with_header(f, n=-1), "'n' must be in"),
        (lambda f: _with_header(f, n=wire.MAX_EVENTS + 1), "'n' must be in"),
        (lambda f: _with_header(f, dtype="<f8,<i4"), "dtype must be"),
        (lambda f: _with_header(f, dtype=3), "'dtype' must be a string"),
        (lambda f: _with_header(f, t_first="1.0"), "'t_first' must be a number"),
        (
            lambda f: [f[0], f[1].replace(b'"t_first":1.0', b'"t_first":1e999'), f[2]],
            "'t_first' must be finite",
        ),
        (lambda f: _with_header(f, t_first=0.5), "disagree with the payload"),
        (lambda f: _with_header(f, t_last=None), "disagree with the payload"),
        (lambda f: [f[0], f[1], f[2][:-1]], "payload must be n*12"),
        (lambda f: [f[0], f[1], f[2] + b"\0" * 12], "payload must be n*12"),
        (lambda f: [f[0], f[1], 12345], "payload frame must be bytes"),
    ],
)
def test_malformed_spike_messages_are_refused(frames_fn, needle: str) -> None:  # type: ignore[no-untyped-def]
    frames = frames_fn(_spikes())
    with pytest.raises(StreamError) as ei:
        wire.decode_spikes(frames, T)
    assert needle in str(ei.value)
    assert "spike message" in str(ei.value)


def test_max_events_cap_is_enforced_before_reading_payload() -> None:
    with pytest.raises(StreamError, match="'n' must be in"):
        wire.decode_spikes(_spikes(5), T, max_events=4)


def test_nan_times_travel_with_null_header_bounds() -> None:
    frames = wire.encode_spikes(T, 0, [np.nan, 1.0, np.inf], [0, 1, 2])
    h = json.loads(frames[1])
    assert h["t_first"] is None and h["t_last"] is None
    msg = wire.decode_spikes(frames, T)
    assert np.isnan(msg.times[0]) and msg.times[1] == 1.0


def test_encode_refuses_bad_events() -> None:
    with pytest.raises(StreamError, match="same length"):
        wire.encode_spikes(T, 0, [1.0, 2.0], [1])
    with pytest.raises(StreamError, match="must be integers"):
        wire.encode_spikes(T, 0, [1.0], [1.5])
    with pytest.raises(StreamError, match="must fit int32"):
        wire.encode_spikes(T, 0, [1.0], [2**40])


def test_malformed_counts() -> None:
    good = [bytes(f) for f in wire.encode_counts(T, 0, 3, 0.06, [1, 2, 3])]
    with pytest.raises(StreamError, match="n_units must be 4"):
        wire.decode_counts(good, T, n_units=4)
    with pytest.raises(StreamError, match="payload must be 4\\*n_units"):
        wire.decode_counts([good[0], good[1], good[2][:-4]], T)
    with pytest.raises(StreamError, match="dtype must be"):
        wire.decode_counts(_with_header(good, dtype="<i8"), T)
    with pytest.raises(StreamError, match="missing \\['bin'\\]"):
        wire.decode_counts(_with_header(good, bin=_DROP), T)


def test_malformed_decodes() -> None:
    good = _decode_frames()
    with pytest.raises(StreamError, match="stamps"):
        h = json.loads(good[1])
        del h["stamps"]["closed"]
        wire.decode_decode([good[0], json.dumps(h).encode(), good[2]], b"decode")
    with pytest.raises(StreamError, match="labels"):
        wire.decode_decode(_with_header(good, labels=["a"]), b"decode")
    with pytest.raises(StreamError, match="payload must be 4\\*n"):
        wire.decode_decode([good[0], good[1], good[2] + b"\0\0\0\0"], b"decode")
    with pytest.raises(StreamError, match="one value per label"):
        _decode_frames(values=[1.0])
    with pytest.raises(StreamError, match="must be finite"):
        _decode_frames(stamps={k: float("nan") for k in wire.STAMP_NAMES})


def test_malformed_meta() -> None:
    meta = wire.encode_meta(T, wire.MetaMessage("events", "s", ("a",), ("r",), 0.02))
    with pytest.raises(StreamError, match="topic does not match"):
        wire.decode_meta([T, meta[1]], T)
    bad = json.loads(meta[1])
    bad["regions"] = ["r", "q"]
    with pytest.raises(StreamError, match="one region per unit id"):
        wire.decode_meta([meta[0], json.dumps(bad).encode()], T)
    bad["regions"] = "r"
    with pytest.raises(StreamError, match="'regions' must be a list of strings"):
        wire.decode_meta([meta[0], json.dumps(bad).encode()], T)


def test_seq_tracker_counts_gaps_and_restarts() -> None:
    s = wire.SeqTracker()
    assert [s.update(q) for q in (5, 6, 9, 10, 0, 1)] == [0, 0, 2, 0, 0, 0]
    assert s.dropped == 2 and s.restarts == 1
