"""The engines on a GPU: onnxruntime's CUDA provider (state bound in torch tensors, with and without CUDA
graph replay) and TorchScript on CUDA equal the torch reference within 1e-4 across ring roll-over, batched
calls equal single-stream ones, and the device-bound buffer logic equals the numpy-bound CPU path (that one
runs on any machine, with torch CPU tensors standing in for the GPU's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neds_rt.engine import OnnxStepEngine, open_engine
from neds_rt.errors import ConfigError
from tests._gpu import ORT_CUDA, needs_ort_cuda, needs_torch_cuda
from tests._models import tiny_streaming_model
from training.export import export_model
from training.streaming import banded_recompute

CONTEXT = 16
N_UNITS = 12


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny_streaming_model(n_units=N_UNITS)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("export_cuda")
    paths = {"onnx": out / "step.onnx", "torchscript": out / "step.pt"}
    for fmt, path in paths.items():
        export_model(model, model.eids[0], path, fmt=fmt, graph="step", context=CONTEXT)
    return paths


def _counts(n_bins: int, batch: int = 1, seed: int = 3) -> np.ndarray:
    """(T, B, N) Poisson counts at ~7 Hz per unit per 20 ms bin, with bursts."""
    rng = np.random.default_rng(seed)
    rates = rng.lognormal(np.log(0.14), 1.0, size=N_UNITS)
    return rng.poisson(rates, size=(n_bins, batch, N_UNITS)).astype(np.float32)


def _reference(model, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Decodes and log-rates (T, n_out), (T, N) of stream 0 by a banded causal recompute in torch."""
    with torch.no_grad():
        dec, rates = banded_recompute(model, model.eids[0], torch.from_numpy(counts[:, 0][None]), CONTEXT)
    return dec[0].numpy(), rates[0].numpy()


def test_torch_bound_buffers_equal_the_numpy_binding_for_a_batch(files: dict[str, Path]) -> None:
    counts = _counts(40, batch=3)  # the 15-bin ring rolls over twice
    dev = OnnxStepEngine(files["onnx"], batch=3, bind="torch-cpu")
    ref = OnnxStepEngine(files["onnx"], batch=3)
    assert (dev.bind, ref.bind) == ("torch-cpu", "numpy")
    kept = []
    for t in range(counts.shape[0]):
        if t % 4 == 1:
            dev.prewarm()  # nothing to warm on device-bound state: the state must not move
        dec = dev.step(counts[t])
        np.testing.assert_array_equal(dec, ref.step(counts[t]))
        np.testing.assert_array_equal(dev.log_rates, ref.log_rates)
        kept.append((dec, dec.copy()))
    for dec, snapshot in kept:  # returned decodes are the caller's: later steps do not overwrite them
        np.testing.assert_array_equal(dec, snapshot)
    dev.reset()
    ref.reset()
    assert dev.next_bin == ref.next_bin == 0
    np.testing.assert_array_equal(dev.step(counts[0]), ref.step(counts[0]))


def test_cuda_graph_and_unknown_binding_are_refused_off_the_gpu(files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="cuda_graph"):
        OnnxStepEngine(files["onnx"], cuda_graph=True)  # the CPU provider has no CUDA graphs
    with pytest.raises(ConfigError, match="bind"):
        OnnxStepEngine(files["onnx"], bind="pinned")
    with pytest.raises(ConfigError, match="cuda_graph"):
        open_engine(files["torchscript"], engine="torchscript", cuda_graph=True)


@needs_ort_cuda
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_onnxruntime_cuda_step_equals_torch(model, files: dict[str, Path], cuda_graph: bool) -> None:  # type: ignore[no-untyped-def]
    counts = _counts(60)  # 60 steps: the ring rolls over 4 times
    ref_dec, ref_rates = _reference(model, counts)
    eng = open_engine(files["onnx"], engine="onnx", device="cuda", cuda_graph=cuda_graph)
    assert isinstance(eng, OnnxStepEngine)
    assert eng.providers[0] == "CUDAExecutionProvider" and eng.bind == "torch-cuda"
    for t in range(counts.shape[0]):
        np.testing.assert_allclose(eng.step(counts[t]), ref_dec[t][None], atol=1e-4, rtol=0)
        np.testing.assert_allclose(eng.log_rates, ref_rates[t][None], atol=1e-4, rtol=0)
    eng.reset()
    np.testing.assert_allclose(eng.step(counts[0]), ref_dec[0][None], atol=1e-4, rtol=0)


@needs_torch_cuda
def test_torchscript_cuda_step_equals_torch(model, files: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    counts = _counts(60)
    ref_dec, ref_rates = _reference(model, counts)
    eng = open_engine(files["torchscript"], engine="torchscript", device="cuda")
    assert eng._device.type == "cuda"  # type: ignore[union-attr]
    for t in range(counts.shape[0]):
        np.testing.assert_allclose(eng.step(counts[t]), ref_dec[t][None], atol=1e-4, rtol=0)
        np.testing.assert_allclose(eng.log_rates, ref_rates[t][None], atol=1e-4, rtol=0)


@needs_torch_cuda
@pytest.mark.parametrize("engine", ["onnx", "torchscript"])
def test_batched_cuda_calls_equal_single_stream_cpu_engines(files: dict[str, Path], engine: str) -> None:
    if engine == "onnx" and not ORT_CUDA:
        pytest.skip("needs onnxruntime's CUDA execution provider (onnxruntime-gpu)")
    batch = 4
    counts = _counts(40, batch=batch, seed=9)  # (T, B, N): four different streams
    gpu = open_engine(files[engine], engine=engine, device="cuda", batch=batch)
    singles = [open_engine(files[engine], engine=engine) for _ in range(batch)]
    for t in range(counts.shape[0]):
        dec = gpu.step(counts[t])
        assert dec.shape == (batch, len(gpu.meta.outputs))
        for b, eng in enumerate(singles):
            np.testing.assert_allclose(dec[b], eng.step(counts[t, b])[0], atol=1e-4, rtol=0)
