"""Telemetry: stamps kept per bin, stage durations and percentiles, budgets and overruns, status, summary."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from neds_rt.clock import StreamClock, grid_origin
from neds_rt.errors import ConfigError
from neds_rt.telemetry import STAGES, Telemetry, percentiles_ms, stage_budgets


def _stamps(bin_end: float, close: float, counts: float, infer: float, publish: float) -> dict[str, float]:
    closed = bin_end + close
    return {"bin_end": bin_end, "closed": closed, "infer_start": closed + counts,
            "infer_end": closed + counts + infer, "published": closed + counts + infer + publish}


def test_stage_durations_and_percentiles_cover_every_recorded_bin() -> None:
    tele = Telemetry(stage_budgets(0.005), capacity=64)
    infer = np.linspace(0.1e-3, 1.0e-3, 100)  # 100 bins: the ring of 64 keeps the last 64
    for k, x in enumerate(infer):
        tele.record(k, _stamps(k * 0.02, 0.005, 0.01e-3, float(x), 0.05e-3))
    assert tele.n == 100
    got = tele.stage_durations("infer")
    np.testing.assert_allclose(got, infer[-64:], rtol=0, atol=1e-12)
    np.testing.assert_allclose(tele.stage_durations("infer", last=3), infer[-3:], atol=1e-12)
    np.testing.assert_array_equal(tele.bin_index[:4], [64, 65, 66, 67])  # ring wrapped
    total = tele.stage_durations("close_to_published")
    np.testing.assert_allclose(total, 0.01e-3 + infer[-64:] + 0.05e-3, atol=1e-12)
    pct = percentiles_ms(got)
    assert list(pct) == ["p50", "p90", "p99", "p99.9", "max"]
    assert pct["max"] == pytest.approx(1.0) and pct["p50"] == pytest.approx(np.median(infer[-64:]) * 1e3)
    assert np.isnan(percentiles_ms(np.array([]))["p50"])


def test_overruns_are_counted_per_stage_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    tele = Telemetry(stage_budgets(0.005))
    ok = _stamps(1.0, 0.006, 0.01e-3, 0.5e-3, 0.05e-3)
    assert not tele.over_budget(ok, list(STAGES), 0)
    slow = _stamps(1.0, 0.006, 0.01e-3, 1.5e-3, 0.05e-3)  # inference over its 1 ms budget
    with caplog.at_level(logging.WARNING, logger="neds_rt.telemetry"):
        assert tele.over_budget(slow, ["counts", "infer"], 7)
    assert tele.overruns == {"infer": 1}
    assert "overrun #1 in stage infer at bin 7: 1.500 ms (budget 1.000 ms)" in caplog.text
    late_close = _stamps(1.0, 0.0125, 0.01e-3, 0.5e-3, 0.05e-3)  # woke 7.5 ms after bin end + 5 ms grace
    assert tele.over_budget(late_close, ["close"], 8) and tele.overruns["close"] == 1


def test_status_line_every_interval_and_summary() -> None:
    tele = Telemetry(stage_budgets(0.0), status_s=1.0)
    tele.start(100.0)
    assert tele.status_line(100.5) is None  # not yet
    for k in range(50):
        tele.record(k, _stamps(100 + k * 0.02, 0.0, 0.01e-3, 0.5e-3, 0.1e-3))
    tele.counts["late"] += 3
    tele.counts["gap_filled_bins"] += 2
    tele.overruns["infer"] += 1
    line = tele.status_line(101.0)
    assert line is not None
    assert "50.0 bins/s" in line and "p50 0.610 ms" in line and "late spikes 3" in line
    assert "overruns 1" in line and "gap-filled bins 2" in line
    assert tele.status_line(101.5) is None
    summary = tele.summary(110.0)
    assert summary.bins == 50 and summary.duration_s == 10.0
    assert summary.stages["infer"]["p99"] == pytest.approx(0.5)
    text = "\n".join(summary.lines())
    assert "50 bins in 10.0 s" in text and "late 3" in text and "close_to_published" in text
    assert summary.to_dict()["overruns"] == {"infer": 1}


def test_stream_clock_and_grid() -> None:
    assert grid_origin(1000.013, 0.02) == pytest.approx(1000.0)
    assert grid_origin(-0.001, 0.02) == pytest.approx(-0.02)
    with pytest.raises(ConfigError, match="first event time: must be finite"):
        grid_origin(float("nan"), 0.02)
    clock = StreamClock("stream")
    assert clock.now() == -np.inf
    clock.observe(5.0)
    clock.observe(float("nan"))
    clock.observe(4.0)
    assert clock.now() == 5.0
    with pytest.raises(ConfigError, match="--clock: must be one of"):
        StreamClock("gps")
