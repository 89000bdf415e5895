"""SCHED_FIFO and CPU pinning for serve and replay: applied to the calling thread and its children, undone."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from neds_rt.errors import ConfigError
from neds_rt.realtime import enter_realtime, parse_cpus

N_CPUS = os.cpu_count() or 1


def test_parse_cpus_lists_ranges_and_names_bad_input() -> None:
    assert parse_cpus(None) is None and parse_cpus("") is None
    assert parse_cpus("0") == (0,)
    if N_CPUS >= 2:
        assert parse_cpus("1,0") == (0, 1) and parse_cpus("0-1") == (0, 1)
    with pytest.raises(ConfigError, match=r"--cpus.*like 1 or 0,2-3.*'one'"):
        parse_cpus("one")
    with pytest.raises(ConfigError, match=rf"--cpus.*CPUs of this machine.*'{N_CPUS}'"):
        parse_cpus(str(N_CPUS))  # one past the last CPU


def test_enter_realtime_changes_only_the_calling_thread_and_its_children(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="neds_rt.realtime")
    main = (os.sched_getscheduler(0), os.sched_getaffinity(0))
    seen: dict[str, object] = {}

    def worker() -> None:
        before = (os.sched_getscheduler(0), os.sched_getaffinity(0))
        restore = enter_realtime("test", 5, [0])
        seen["during"] = (os.sched_getscheduler(0), os.sched_getaffinity(0))
        child = threading.Thread(target=lambda: seen.update(child=(os.sched_getscheduler(0),
                                                                   os.sched_getaffinity(0))))
        child.start()
        child.join()
        restore()
        seen["after"] = (os.sched_getscheduler(0), os.sched_getaffinity(0))
        seen["before"] = before

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    fifo = "test: running at SCHED_FIFO priority 5" in caplog.text
    assert fifo or "test: cannot run at SCHED_FIFO priority 5" in caplog.text  # done, or says why not
    assert "test: pinned to CPU 0" in caplog.text
    want = (os.SCHED_FIFO if fifo else main[0], {0})
    assert seen["during"] == want and seen["child"] == want  # a thread started afterwards inherits both
    assert seen["after"] == seen["before"]  # undone
    assert (os.sched_getscheduler(0), os.sched_getaffinity(0)) == main  # other threads never touched
