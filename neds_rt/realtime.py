"""Real-time scheduling for the processes of a rig: SCHED_FIFO priority and CPU pinning (Linux).

``serve --realtime`` and ``replay --realtime`` call :func:`enter_realtime` before they start their threads, so
every thread they create (the bin loop, the I/O thread, liblsl's receivers) inherits the policy and the CPU
set. A SCHED_FIFO thread runs until it blocks, ahead of every normal process, so a decode step is no longer
preempted by a browser, a replay or a compiler; the serve loop sleeps between bins, so it cannot starve the
machine. Pinning (``--cpus``) keeps the caches warm and, on a 2-core rig, keeps the stream source on the
other core. Where the system refuses (not Linux, or no CAP_SYS_NICE / RLIMIT_RTPRIO), a warning says so and
the process goes on at normal priority.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Final

from neds_rt.errors import ConfigError, invalid

log = logging.getLogger(__name__)

SERVE_PRIORITY: Final = 20  # above replay's pacing thread: on a shared host the decoder comes first
CLIENT_PRIORITY: Final = 15  # a decode consumer (bench latency's client): after serve, before the replay
REPLAY_PRIORITY: Final = 10


def parse_cpus(text: str | None) -> tuple[int, ...] | None:
    """``"1"`` or ``"0,2-3"`` -> (1,) or (0, 2, 3); None or "" -> None. Unknown CPUs are a clear error."""
    if not text:
        return None
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise invalid("--cpus", "must list CPU numbers like 1 or 0,2-3", text, kind=ConfigError) from None
    online = set(range(os.cpu_count() or 1))  # not this process's affinity: a parent may have narrowed it
    if not cpus or not cpus <= online:
        raise invalid("--cpus", f"must name CPUs of this machine {sorted(online)}", text, kind=ConfigError)
    return tuple(sorted(cpus))


def enter_realtime(who: str, priority: int | None, cpus: Sequence[int] | None = None) -> Callable[[], None]:
    """Move the calling thread to SCHED_FIFO ``priority`` (None: keep its policy) and, with ``cpus``, pin it
    there; return the undo.

    Threads created afterwards inherit both. Refusals are logged as warnings naming ``who``; the undo then
    restores whatever did change.
    """
    undo: list[Callable[[], None]] = []
    if cpus:
        try:
            old_cpus = os.sched_getaffinity(0)
            os.sched_setaffinity(0, set(cpus))
            undo.append(lambda: os.sched_setaffinity(0, old_cpus))
            log.info("%s: pinned to CPU %s", who, ",".join(map(str, cpus)))
        except (AttributeError, OSError) as err:
            log.warning("%s: cannot pin to CPUs %s (%s); going on unpinned", who, list(cpus), err)
    if priority is not None:
        try:
            old_policy, old_param = os.sched_getscheduler(0), os.sched_getparam(0)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            undo.append(lambda: os.sched_setscheduler(0, old_policy, old_param))
            log.info("%s: running at SCHED_FIFO priority %s", who, priority)
        except (AttributeError, OSError) as err:  # not Linux, or no CAP_SYS_NICE / RLIMIT_RTPRIO
            log.warning("%s: cannot run at SCHED_FIFO priority %s (%s); going on at normal priority", who,
                        priority, err)

    def restore() -> None:
        for fn in reversed(undo):
            try:
                fn()
            except OSError as err:
                log.warning("%s: could not restore scheduling (%s)", who, err)

    return restore
