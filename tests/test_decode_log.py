"""Decode log: exact round trip, truncated tails, and survival of a real SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from neds_rt.decode_log import FIXED_COLUMNS, DecodeLogWriter, read_decode_log
from neds_rt.errors import ConfigError, DataError
from neds_rt.wire import STAMP_NAMES

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
LABELS = ["wheel_speed", "whisker_me", "p_left"]


def _values(k: int) -> np.ndarray:
    return np.array([k, k * 0.5, -k / 3], np.float32)  # (3,) float32


def test_round_trip_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "decodes.csv"
    stamps = [dict(zip(STAMP_NAMES, 1000.0 + k + np.arange(5) * 1e-4, strict=True)) for k in range(50)]
    with DecodeLogWriter(path, LABELS, flush_interval_s=10.0) as w:  # close() must write everything
        for k in range(50):
            vals = _values(k) if k != 7 else np.array([np.nan, np.inf, -0.0], np.float32)
            w.append(k, 0.02 * (k + 1), stamps[k], k % 4, vals)
    log = read_decode_log(path)
    assert log.labels == tuple(LABELS) and not log.truncated
    assert log.bins.tolist() == list(range(50))
    np.testing.assert_array_equal(log.bin_end, 0.02 * (np.arange(50) + 1))
    np.testing.assert_array_equal(log.stamps, np.array([[s[n] for n in STAMP_NAMES] for s in stamps]))
    assert log.flags.tolist() == [k % 4 for k in range(50)]
    expected = np.stack([_values(k) for k in range(50)])
    expected[7] = [np.nan, np.inf, -0.0]
    np.testing.assert_array_equal(log.values, expected)  # float32 bit-exact, NaN included
    header = path.read_text().splitlines()[0].split(",")
    assert header == [*FIXED_COLUMNS, *LABELS]


def test_truncated_last_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with DecodeLogWriter(path, LABELS) as w:
        for k in range(5):
            w.append(k, 0.02 * k, [1.0, 2.0, 3.0, 4.0, 5.0], 0, _values(k))
    raw = path.read_bytes()
    path.write_bytes(raw[:-7])  # cut the last row mid-number
    log = read_decode_log(path)
    assert log.truncated and log.bins.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(log.values[3], _values(3))


def test_corrupt_middle_row_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with DecodeLogWriter(path, LABELS) as w:
        for k in range(4):
            w.append(k, 0.02 * k, [1.0, 2.0, 3.0, 4.0, 5.0], 0, _values(k))
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = "1,2,3\n"
    path.write_text("".join(lines))
    with pytest.raises(DataError, match="line 3: malformed row"):
        read_decode_log(path)
    path.write_text("not,a,log\n")
    with pytest.raises(DataError, match="header must start with"):
        read_decode_log(path)


def test_writer_refuses_bad_setup(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("something")
    with pytest.raises(ConfigError, match="file exists"):
        DecodeLogWriter(path, LABELS)
    with pytest.raises(ConfigError, match="labels"):
        DecodeLogWriter(tmp_path / "e.csv", ["flags"])
    with DecodeLogWriter(path, LABELS, overwrite=True) as w, pytest.raises(DataError, match="needs 5 stamps"):
        w.append(0, 0.0, [1.0], 0, _values(0))


_CHILD = """
import sys, time
import numpy as np
from neds_rt.decode_log import DecodeLogWriter
w = DecodeLogWriter(sys.argv[1], ["wheel_speed", "whisker_me", "p_left"])
k = 0
while True:
    now = time.monotonic()
    w.append(k, 0.02 * (k + 1), [now] * 5, k % 8, np.array([k, k * 0.5, -k / 3], np.float32))
    k += 1
    time.sleep(0.002)
"""


def test_everything_older_than_one_second_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "killed.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 30.0
        while True:  # let it run until the readable log spans more than a second
            assert proc.poll() is None, "writer process died"
            assert time.monotonic() < deadline, "writer never produced a second of log"
            if path.exists() and path.stat().st_size > 0:
                log = read_decode_log(path)
                if log.bins.size and log.stamps[-1, 0] - log.stamps[0, 0] > 1.5:
                    break
            time.sleep(0.05)
        t_kill = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = read_decode_log(path)
    m = log.bins.size
    assert log.bins.tolist() == list(range(m))  # nothing missing, in order
    assert log.flags.tolist() == [k % 8 for k in range(m)]
    np.testing.assert_array_equal(log.values, np.stack([_values(k) for k in range(m)]))
    np.testing.assert_array_equal(log.bin_end, 0.02 * (np.arange(m) + 1))
    assert (log.stamps == log.stamps[:, :1]).all()
    # every record appended more than 1 s before the kill is in the file
    assert log.stamps[-1, 0] >= t_kill - 1.0, (t_kill - log.stamps[-1, 0], m)
