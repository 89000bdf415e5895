"""Steal time from /proc/stat: parsing, the share between readings, and the sampler."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bench.steal import StealSampler, read_cpu_times, steal_pct

LINE = "cpu  {user} 0 {system} {idle} 10 0 5 {steal} 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1 2 3\n"


def _write(path: Path, user: int, system: int, idle: int, steal: int) -> None:
    tmp = path.with_suffix(".tmp")  # replaced in one step: the sampler never reads a half-written file
    tmp.write_text(LINE.format(user=user, system=system, idle=idle, steal=steal))
    os.replace(tmp, path)


def test_reads_steal_and_total_from_the_aggregate_line(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _write(stat, user=100, system=50, idle=800, steal=35)
    # total: user nice system idle iowait irq softirq steal (guest time is already inside user)
    assert read_cpu_times(stat) == (35, 100 + 0 + 50 + 800 + 10 + 0 + 5 + 35)


@pytest.mark.parametrize("text", ["", "cpu 1 2 3 4 5 6 7\n", "intr 1 2 3 4 5 6 7 8 9\n"])
def test_files_without_a_steal_column_give_none(tmp_path: Path, text: str) -> None:
    stat = tmp_path / "stat"
    stat.write_text(text)
    assert read_cpu_times(stat) is None
    assert read_cpu_times(tmp_path / "missing") is None


def test_steal_share_between_two_readings() -> None:
    assert steal_pct((10, 1000), (30, 1200)) == pytest.approx(10.0)  # 20 of 200 ticks
    assert steal_pct((10, 1000), (10, 1000)) == 0.0  # no time passed


def test_sampler_records_each_period_and_the_whole_run(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _write(stat, user=0, system=0, idle=1000, steal=0)
    sampler = StealSampler(period_s=0.05, path=stat)
    sampler.start()
    time.sleep(0.2)
    _write(stat, user=0, system=0, idle=1090, steal=10)  # 10 of the next 100 ticks stolen
    deadline = time.monotonic() + 5.0
    while 10.0 not in sampler._series and time.monotonic() < deadline:  # poll until a period saw it
        time.sleep(0.02)
    got = sampler.stop()
    assert got["pct"] == pytest.approx(10.0)
    assert got["max_pct"] == pytest.approx(10.0) and 0.0 in got["series_pct"]


def test_sampler_without_proc_stat_reports_none(tmp_path: Path) -> None:
    sampler = StealSampler(period_s=0.05, path=tmp_path / "missing")
    sampler.start()
    assert sampler.stop() == {"pct": None, "max_pct": None, "period_s": 0.05, "series_pct": []}
