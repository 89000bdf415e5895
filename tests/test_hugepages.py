"""Huge pages after warm-up: the process's large anonymous memory really moves onto 2 MiB pages."""

from __future__ import annotations

from pathlib import Path

import pytest

from neds_rt.hugepages import HUGE_PAGE, anon_huge_kib, thp_mode, use_huge_pages


def test_thp_mode_reads_the_bracketed_mode(tmp_path: Path) -> None:
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert thp_mode(f) == "madvise"
    f.write_text("garbage\n")
    assert thp_mode(f) is None
    assert thp_mode(tmp_path / "missing") is None


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"),
                    reason="no transparent huge pages to use here (THP mode is not always/madvise)")
def test_large_memory_is_collapsed_onto_huge_pages() -> None:
    # 32 MiB through plain malloc, written: on 4 KiB pages under THP 'madvise' (numpy, unlike onnxruntime,
    # already advises its own large arrays)
    block = bytearray(b"\x01") * (16 * HUGE_PAGE)
    before = anon_huge_kib()
    result = use_huge_pages()
    assert result.advised_bytes >= 8 * HUGE_PAGE and result.huge_kib_before == before
    assert result.huge_kib_after >= before + 8 * HUGE_PAGE // 1024  # at least half the block collapsed
    assert block.count(1) == len(block)  # the data is untouched


def test_no_thp_only_logs_why(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import neds_rt.hugepages as hp

    monkeypatch.setattr(hp, "thp_mode", lambda: "never")
    with caplog.at_level(logging.INFO, logger="neds_rt.hugepages"):
        result = use_huge_pages()
    assert result.advised_bytes == 0 and "disabled" in result.reason
    assert "memory stays on 4 KiB pages" in caplog.text
