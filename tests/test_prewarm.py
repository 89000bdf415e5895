"""The prewarm lead: fixed, or adapted to the measured prewarm durations (neds_rt.prewarm)."""

from __future__ import annotations

import pytest

from neds_rt.errors import NedsRtError
from neds_rt.prewarm import PREWARM_MARGIN_S, PrewarmLead


def test_fixed_lead_ignores_the_durations() -> None:
    lead = PrewarmLead(0.003, adapt=False)
    for _ in range(100):
        lead.record(0.0005)
        assert lead.lead() == 0.003
    s = lead.summary_ms()
    assert s["runs"] == 100 and s["lead_last"] == s["lead_p50"] == pytest.approx(3.0)
    assert s["run_p50"] == s["run_p99"] == pytest.approx(0.5)


def test_adaptive_lead_keeps_the_initial_lead_until_min_runs_then_follows_p95_plus_margin() -> None:
    lead = PrewarmLead(0.003, min_runs=16)
    for i in range(15):
        lead.record(0.001)
        assert lead.lead() == 0.003, i
    lead.record(0.001)
    assert lead.lead() == pytest.approx(0.001 + PREWARM_MARGIN_S)


def test_adaptive_lead_is_the_nearest_rank_95th_percentile_of_the_window() -> None:
    # 64 runs: the 95th percentile by nearest rank is the 61st smallest (index 60)
    lead = PrewarmLead(0.003, margin_s=0.0, window=64)
    for _ in range(61):
        lead.record(0.001)
    for _ in range(3):
        lead.record(0.004)
    assert lead.lead() == pytest.approx(0.001)  # three slow runs of 64 stay above the 95th percentile
    lead.record(0.004)  # rolls out one 0.001: now 60 fast, 4 slow
    assert lead.lead() == pytest.approx(0.004)
    for _ in range(64):  # the window rolls: the slow runs leave it
        lead.record(0.002)
    assert lead.lead() == pytest.approx(0.002)


def test_adaptive_lead_is_bounded_by_the_margin_and_max() -> None:
    lead = PrewarmLead(0.003, margin_s=0.0005, max_s=0.015, min_runs=1)
    lead.record(0.05)  # a prewarm stalled for 50 ms: the lead stops at max_s
    assert lead.lead() == 0.015
    fast = PrewarmLead(0.003, margin_s=0.0005, min_runs=1)
    fast.record(0.0)
    assert fast.lead() == 0.0005


@pytest.mark.parametrize("bad", [float("nan"), -0.001])
def test_nan_or_negative_durations_are_ignored(bad: float) -> None:
    lead = PrewarmLead(0.003, min_runs=1)
    lead.record(bad)
    assert lead.n_runs == 0 and lead.lead() == 0.003 and lead.summary_ms() == {}
    lead.record(0.001)
    assert lead.n_runs == 1 and lead.lead() == pytest.approx(0.001 + PREWARM_MARGIN_S)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(initial_s=0.0), "initial lead"), (dict(initial_s=0.02), "initial lead"),
    (dict(initial_s=0.003, margin_s=-0.001), "margin"), (dict(initial_s=0.003, margin_s=0.015), "margin"),
    (dict(initial_s=0.003, min_runs=0), "min_runs"),
    (dict(initial_s=0.003, window=8, min_runs=9), "min_runs"),
])
def test_bad_settings_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(NedsRtError, match=match):
        PrewarmLead(**kwargs)  # type: ignore[arg-type]
