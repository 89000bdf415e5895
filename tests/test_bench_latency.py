"""A short `bench latency` run (replay, serve, client as processes) produces a complete JSON and PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from neds_rt.errors import ConfigError
from tests._gpu import needs_ort_cuda

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


@pytest.fixture(scope="module")
def cache_and_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    import torch

    from streams.replay import load_replay_session
    from streams.simulate import simulate_cache
    from training.arrays import Normalisation
    from training.config import NEDSConfig
    from training.export import export_model
    from training.model import NEDS, SessionVocab

    root = tmp_path_factory.mktemp("latency")
    eid = simulate_cache(root / "one", n_sessions=1, seed=5, n_trials=20)[0]
    session = load_replay_session(root / "one", eid)
    units = session.units.iloc[::3]  # the model uses a third of the stream's units
    torch.manual_seed(0)
    model = NEDS(NEDSConfig.preset("tiny", mode="streaming", dropout=0.0))
    model.add_session(eid, len(units), vocab=SessionVocab(
        eid, units["cluster_id"].to_numpy(np.int64), units["region"].to_numpy(str),
        Normalisation(0.0, 5.0, 0.0, 10.0), session.probe))
    export_model(model.eval(), eid, root / "step.onnx", context=32)
    return root / "one", eid, root / "step.onnx"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_ort_cuda)])
def test_short_run_writes_a_complete_result(cache_and_model: tuple[Path, str, Path], tmp_path: Path,
                                            device: str) -> None:
    from bench.latency import STAGES, LatencyBenchConfig, run_latency_bench

    data, eid, model = cache_and_model
    cfg = LatencyBenchConfig(duration=8.0, speed=2.0, start=5.0, settle_s=1.0, device=device)
    result = run_latency_bench(data, eid, model, tmp_path / "out", cfg)
    doc = json.loads((tmp_path / "out" / "latency.json").read_text())
    assert doc["session"] == eid and len(doc["runs"]) == 1
    run = doc["runs"][0]
    assert run["engine"] == "onnx"
    for stage in STAGES:
        p = run["stages_ms"][stage]
        assert {"p50", "p90", "p99", "p99.9", "max"} <= set(p)
        assert all(math.isfinite(p[k]) for k in ("p50", "p99", "max")), (stage, p)
    c = run["counts"]
    assert c["bins_logged"] >= 0.8 * 8.0 / 2.0 / 0.02  # ~4 s of stream time at 50 bins/s
    assert c["bins_missing_from_log"] == 0
    assert c["serve_unused_unit_spikes"] > 0  # the stream's other two thirds of the units
    assert run["cpu"]["serve_cpu_s"] > 0 and run["cpu"]["replay_cpu_s"] > 0
    pw = run["prewarm_ms"]  # serve's prewarm runs and the lead they set
    assert pw["runs"] == c["serve_prewarms"] > 0 and pw["lead_last"] > 0
    steal = run["host_steal"]  # the hypervisor's share, once a second (Linux), drawn beside the jitter
    assert 0.0 <= steal["pct"] <= 100.0 and len(steal["series_pct"]) >= 4
    assert run["bin_size_s"] == pytest.approx(0.02)  # places each second's steal at its bins in the plot
    q = run["quality"]
    assert q["truth_samples"] > 0 and q["markers"] > 0
    assert set(q["live"]) >= {"wheel_r2", "choice_accuracy"} and set(q["offline"]) == set(q["live"])
    # live decodes equal an offline recompute of the same bins less the spikes serve got too late
    served = q["as_served"]
    assert served["late_spikes_dropped"] == c.get("serve_late", 0)  # counters appear once non-zero
    assert served["max_abs_decode_difference"] < 1e-4, served  # on CUDA too: the reference runs on the CPU
    assert served["bins_equal_1e-4"] == c["bins_logged"]
    assert math.isfinite(q["max_abs_decode_difference"])  # against all spikes: late ones make it differ
    assert (tmp_path / "out" / "latency.png").stat().st_size > 10_000
    assert result["runs"][0]["counts"] == c


@pytest.mark.timeout(60)
def test_client_stops_quietly_when_serve_closes_its_outlet() -> None:
    import threading
    import time
    import uuid

    from bench.latency import _Client
    from neds_rt.lsl_scope import pylsl

    lsl = pylsl()
    name = f"test-decodes-{uuid.uuid4().hex[:12]}"
    outlet = lsl.StreamOutlet(lsl.StreamInfo(name, "Behavior", 2, 50.0, "float32", name))
    errors: list[BaseException] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment,misc]
    try:
        client = _Client(name, "no-replay")
        client.start(timeout=10.0)
        deadline = time.monotonic() + 10.0
        while not client.decodes and time.monotonic() < deadline:
            outlet.push_sample([1.0, 2.0])
            time.sleep(0.05)
        assert client.decodes and client.decodes[0][2] == [1.0, 2.0]
        del outlet  # serve ended (or crashed): the decode stream is lost
        thread = client._threads[0]
        thread.join(timeout=30.0)
        assert not thread.is_alive()  # the pull loop ended on the lost stream ...
        assert errors == []  # ... without an exception escaping the thread
    finally:
        threading.excepthook = hook


@pytest.mark.parametrize(("realtime", "pin"), [(False, False), (True, False), (False, True), (True, True)])
def test_realtime_and_pinning_are_separate_choices(realtime: bool, pin: bool) -> None:
    from bench.latency import LatencyBenchConfig, _realtime_args

    cfg = LatencyBenchConfig(realtime=realtime, pin=pin)
    split = ("1", "0") if pin else None  # what cpu_split gives on a 2-CPU host, only asked for with --pin
    serve, replay = _realtime_args(cfg, split, "serve"), _realtime_args(cfg, split, "replay")
    assert ("--realtime" in serve) is realtime and ("--realtime" in replay) is realtime
    assert (serve[-2:] == ["--cpus", "1"]) if pin else ("--cpus" not in serve)
    assert (replay[-2:] == ["--cpus", "0"]) if pin else ("--cpus" not in replay)


def test_bad_device_is_refused() -> None:
    from bench.latency import LatencyBenchConfig

    with pytest.raises(ConfigError, match="--device"):
        LatencyBenchConfig(device="tpu").check()
    with pytest.raises(ConfigError, match="--cuda-graph"):
        LatencyBenchConfig(cuda_graph=True).check()
