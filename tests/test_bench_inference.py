"""The inference bench harness at a tiny size: a complete JSON, finite percentiles, a PNG; bad input refused.

No timing assertions: the figures themselves belong to ``neds-rt bench inference``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.inference import (
    BASELINE,
    INT4_PACED,
    INT4_PREWARMED,
    INT8_PACED,
    PACED,
    PREWARMED,
    PRIMARY,
    QUANTIZED,
    InferenceBenchConfig,
    _Row,
    _run,
    run_inference_bench,
    spike_counts,
)
from bench.report import LATENCY_KEYS, latency_percentiles, plot_latency, write_json
from neds_rt.cli import app
from neds_rt.errors import ConfigError, DataError

pytestmark = pytest.mark.timeout(120)

TINY: dict[str, Any] = dict(steps=24, warmup=4, baseline_steps=4, rounds=2, n_units=12, context=6, hidden=16,
                            heads=2, mlp=32, layers=2, cpu_batch=3, cuda_batches=(2,), paced_steps=4,
                            pace_s=0.005)

STEP_ROWS = {PRIMARY, "onnxruntime CPU step, 2 threads", "onnxruntime CPU step, 2 threads, spinning",
             "TorchScript CPU step", "torch eager step", "onnxruntime CPU step, batch 3",
             "onnxruntime CPU step, 1 thread, 5 tokens per bin", *QUANTIZED, PACED, INT8_PACED, INT4_PACED,
             PREWARMED, INT4_PREWARMED}
PACED_ROWS = {PACED, INT8_PACED, INT4_PACED, PREWARMED, INT4_PREWARMED}
NAIVE_ROWS = {BASELINE, "naive: offline window recompute, torch eager"}
CUDA_ROWS = {"onnxruntime CUDA step", "onnxruntime CUDA step, CUDA graph", "onnxruntime CUDA step, batch 2",
             "TorchScript CUDA step", "TorchScript CUDA step, batch 2"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench_inference")
    result = run_inference_bench(out, InferenceBenchConfig(**TINY))
    return out, result


def test_json_lists_every_row_with_finite_percentiles(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    out, result = tiny_run
    saved = json.loads((out / "inference.json").read_text())
    assert saved == json.loads(json.dumps(result))  # what was returned is what was written
    names = {r["row"] for r in saved["rows"]}
    skipped = {s["row"] for s in saved["skipped"]}
    assert STEP_ROWS | NAIVE_ROWS <= names
    assert CUDA_ROWS <= names | skipped  # each CUDA row either ran or says why not
    assert all(s["reason"] for s in saved["skipped"])
    for row in saved["rows"]:
        want = (TINY["baseline_steps"] if row["row"] in NAIVE_ROWS
                else TINY["paced_steps"] if row["row"] in PACED_ROWS else TINY["steps"])
        assert row["steps"] == want, row["row"]
        for series in ("latency_ms", "cpu_ms"):
            values = [row[series][k] for k in LATENCY_KEYS]
            assert all(math.isfinite(v) and v >= 0 for v in values), (row["row"], series, values)
            assert values == sorted(values), (row["row"], series)  # p50 <= p90 <= p99 <= p99.9 <= max
            assert row[series]["n"] == want
        assert math.isfinite(row["speedup_p50"]) and row["speedup_p50"] > 0
    base = next(r for r in saved["rows"] if r["row"] == BASELINE)
    assert base["speedup_p50"] == pytest.approx(1.0)
    assert saved["targets"]["row"] == PRIMARY and isinstance(saved["targets"]["p99_met"], bool)
    assert saved["model"]["hidden"] == 16 and saved["model"]["layers"] == 2
    assert saved["model"]["step_graph_nodes"] > 0
    assert saved["machine"]["cores_available"] >= 1 and "onnxruntime" in saved["machine"]


def test_step_rows_decode_like_torch_eager(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    _, result = tiny_run
    five = "onnxruntime CPU step, 1 thread, 5 tokens per bin"  # another model: no parity against eager
    diffs = {r["row"]: r["max_abs_diff_vs_eager"] for r in result["rows"]
             if r["graph"] == "step" and r["batch"] == 1
             and r["row"] not in (five, *QUANTIZED, INT8_PACED, INT4_PACED, INT4_PREWARMED)}
    assert set(diffs) >= {PRIMARY, PACED, PREWARMED, "TorchScript CPU step", "torch eager step"}
    assert all(d is not None and d < 1e-4 for d in diffs.values()), diffs
    assert next(r for r in result["rows"] if r["row"] == five)["max_abs_diff_vs_eager"] is None
    for name, scheme in QUANTIZED.items():  # quantized: compared with float32 instead
        row = next(r for r in result["rows"] if r["row"] == name)
        assert row["max_abs_diff_vs_eager"] is None
        diff = row["max_abs_diff_vs_float32"]
        assert 0 < diff == result["targets"][f"{scheme}_max_abs_diff_vs_float32"] < 0.5
    assert all(r["max_abs_diff_vs_float32"] is None for r in result["rows"] if r["row"] not in QUANTIZED)


def test_cuda_rows_mode_keeps_only_the_gpu_and_reference_rows(tmp_path: Path) -> None:
    result = run_inference_bench(tmp_path, InferenceBenchConfig(**(TINY | dict(rows="cuda"))))
    names = {r["row"] for r in result["rows"]}
    skipped = {s["row"] for s in result["skipped"]}
    assert {PRIMARY, "torch eager step", *NAIVE_ROWS} <= names
    assert names <= {PRIMARY, "torch eager step", *NAIVE_ROWS, *CUDA_ROWS}
    assert CUDA_ROWS <= names | skipped and not (names & skipped)
    cuda_ran = [r for r in result["rows"] if r["device"] == "cuda"]
    for r in cuda_ran:  # where a GPU is lent: B = 1 rows decode like eager, batched rows time B streams
        assert r["batch"] > 1 or r["max_abs_diff_vs_eager"] < 1e-4, r
    assert not any(k.startswith(("int8", "int4", "paced")) for k in result["targets"])
    assert not (tmp_path / "models" / "step_int4.onnx").exists()


def test_paced_rows_call_once_per_tick() -> None:
    calls: list[float] = []
    row = _Row("paced", "fake", "step", "cpu", 1, 1, 5, lambda x: calls.append(time.perf_counter()),
               pace_s=0.01)
    start = time.perf_counter()
    _run(row, np.zeros((8, 3), np.float32), 5, timed=True)
    ticks = start + 0.01 * np.arange(1, 6)  # (5,) absolute deadlines: call i never comes before tick i
    assert len(row.wall_ns) == 5 and np.all(np.array(calls) >= ticks), np.array(calls) - ticks
    back_to_back: list[float] = []
    row = _Row("free", "fake", "step", "cpu", 1, 1, 5, lambda x: back_to_back.append(time.perf_counter()))
    _run(row, np.zeros((8, 3), np.float32), 5, timed=True)
    assert np.diff(back_to_back).max() < 0.009


def test_prewarmed_rows_run_the_throwaway_before_each_timed_call() -> None:
    events: list[tuple[str, float]] = []
    row = _Row("warm", "fake", "step", "cpu", 1, 1, 5, lambda x: events.append(("call", time.perf_counter())),
               pace_s=0.01, prewarm=lambda: events.append(("warm", time.perf_counter())), prewarm_s=0.004)
    start = time.perf_counter()
    _run(row, np.zeros((8, 3), np.float32), 5, timed=True)
    assert [e[0] for e in events] == ["warm", "call"] * 5
    warm, call = (np.array([t for kind, t in events if kind == k]) for k in ("warm", "call"))  # (5,) each
    ticks = start + 0.01 * np.arange(1, 6)  # (5,)
    assert np.all(warm >= ticks - 0.004) and np.all(call >= ticks), (warm - ticks, call - ticks)
    assert len(row.wall_ns) == 5  # only the calls are timed


def test_png_is_written(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = tiny_run
    png = (out / "inference.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "models" / "step.onnx").is_file() and (out / "models" / "window_offline.onnx").is_file()


def test_spike_counts_have_the_asked_rate() -> None:
    counts = spike_counts(2000, 50, 7.0, seed=3)  # (T, N)
    assert counts.shape == (2000, 50) and counts.dtype == np.float32
    assert counts.mean() / 0.02 == pytest.approx(7.0, rel=0.1)  # Hz


@pytest.mark.parametrize("bad", [dict(steps=0), dict(baseline_steps=0), dict(rounds=0), dict(warmup=-1),
                                 dict(context=1), dict(rate_hz=float("nan")), dict(rate_hz=0.0),
                                 dict(n_units=0), dict(cpu_batch=-1), dict(cuda_batches=(0,)),
                                 dict(steps=3, rounds=4), dict(paced_steps=-1), dict(paced_steps=1),
                                 dict(pace_s=0.0), dict(prewarm_ms=-1.0), dict(prewarm_ms=5.0),
                                 dict(rows="gpu")])
def test_bad_configs_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="bench inference"):
        InferenceBenchConfig(**(TINY | bad))


def test_cli_reports_a_bad_option_without_a_traceback() -> None:
    res = CliRunner().invoke(app, ["bench", "inference", "--steps", "0"])
    assert res.exit_code == 2
    assert "steps" in res.output and "must be an integer >= 1" in res.output


def test_latency_percentiles() -> None:
    p = latency_percentiles(np.arange(1, 1001, dtype=np.float64))
    assert p["p50"] == pytest.approx(500.5) and p["max"] == 1000.0 and p["n"] == 1000
    assert p["p99"] == pytest.approx(990.01) and p["p99.9"] == pytest.approx(999.001)
    with pytest.raises(DataError, match="must not be empty"):
        latency_percentiles([])
    with pytest.raises(DataError, match="must be finite"):
        latency_percentiles([1.0, float("nan")])


def test_write_json_is_strict(tmp_path: Path) -> None:
    data = {"a": np.float32(1.5), "b": np.arange(3), "c": float("inf"), "d": (np.int64(2), Path("x"))}
    path = write_json(tmp_path / "sub" / "r.json", data)
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": None, "d": [2, "x"]}


def test_plot_latency_needs_samples(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least one non-empty series"):
        plot_latency(tmp_path / "x.png", {"a": np.array([])}, "empty")
