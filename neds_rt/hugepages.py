"""Back the serving process's large memory with 2 MiB transparent huge pages (Linux), once, after warm-up.

A decode step touches every weight, the key/value rings and onnxruntime's buffers once per 20 ms bin. In
between, other processes evict them, so each step starts cold and walks page tables for ~1,000 4 KiB pages
(under a hypervisor each walk is two-dimensional). With 2 MiB pages the same memory is a few dozen TLB
entries. On the dev VM (THP ``madvise``), collapsing the process's anonymous mappings after warm-up took a
paced step (one call per 20 ms) from p50 2.07 to 1.82-1.90 ms with int4 weights and from 2.95-3.04 to
2.64-2.77 ms with float32 weights (``neds-rt bench inference`` paced rows measure the same kind of call).

:func:`use_huge_pages` marks every private, writable, anonymous mapping of at least 2 MiB (``[heap]``
included) ``MADV_HUGEPAGE`` and asks the kernel to collapse it now (``MADV_COLLAPSE``, Linux >= 6.1); where
the kernel refuses a region it stays on small pages (khugepaged may still collapse it later). Everything is
best effort: no THP, another OS or an old kernel only log why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

HUGE_PAGE: Final = 2 << 20  # bytes
_MADV_HUGEPAGE: Final = 14
_MADV_COLLAPSE: Final = 25
_THP_MODE: Final = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclass
class HugePages:
    """What :func:`use_huge_pages` did: bytes advised and collapsed, anonymous huge pages before and after."""

    advised_bytes: int = 0
    refused_regions: int = 0  # regions MADV_COLLAPSE refused (they stay on small pages for now)
    huge_kib_before: int = 0
    huge_kib_after: int = 0
    reason: str = ""  # why nothing was done, if nothing was


def thp_mode(path: Path = _THP_MODE) -> str | None:
    """The kernel's THP mode (``always`` / ``madvise`` / ``never``), or None where it has none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def anon_huge_kib() -> int:
    """AnonHugePages of this process in KiB (0 where /proc does not say)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _regions(min_bytes: int) -> list[tuple[int, int]]:
    """[start, end) of each private writable anonymous mapping, trimmed to 2 MiB boundaries."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            name = parts[5] if len(parts) > 5 else ""
            if not parts[1].startswith("rw") or parts[1][3] != "p" or (name and name != "[heap]"):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            lo = (lo + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
            hi &= ~(HUGE_PAGE - 1)
            if hi - lo >= min_bytes:
                out.append((lo, hi))
    return out


def use_huge_pages(min_bytes: int = HUGE_PAGE) -> HugePages:
    """Advise and collapse this process's large anonymous mappings onto huge pages; see the module doc."""
    result = HugePages()
    mode = thp_mode()
    if not sys.platform.startswith("linux") or mode is None:
        result.reason = "no transparent huge pages on this system"
    elif mode == "never":
        result.reason = "transparent huge pages are disabled (THP mode 'never')"
    if result.reason:
        log.info("huge pages: %s; memory stays on 4 KiB pages", result.reason)
        return result
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    result.huge_kib_before = anon_huge_kib()
    for lo, hi in _regions(min_bytes):
        if libc.madvise(lo, hi - lo, _MADV_HUGEPAGE) != 0:
            continue  # the mapping went away or cannot take THP
        result.advised_bytes += hi - lo
        if libc.madvise(lo, hi - lo, _MADV_COLLAPSE) != 0:
            result.refused_regions += 1
    result.huge_kib_after = anon_huge_kib()
    log.info("huge pages: advised %.0f MiB, %s region(s) left to khugepaged; anonymous huge pages %s -> %s "
             "MiB (pid %s)", result.advised_bytes / 2**20, result.refused_regions,
             result.huge_kib_before // 1024, result.huge_kib_after // 1024, os.getpid())
    return result
