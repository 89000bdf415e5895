"""Inference engines: run an exported NEDS step graph one 20 ms bin at a time, state kept between steps.

Step-graph contract (ONNX and TorchScript alike)::

    inputs   counts    (B, N) float32   spike counts of the newest bin
             k_cache   (L, B, H, C, Dh) float32  per-layer keys of the last C bins (oldest first)
             v_cache   (L, B, H, C, Dh) float32  per-layer values
             n_valid   (1,) int64       how many of the C cached bins hold real data (0..C)
    outputs  decodes   (B, n_out) float32  behaviour decodes of the newest bin (meta.outputs order)
             log_rates (B, N) float32     predicted Poisson log-rate per unit of the newest bin
             k_cache_out, v_cache_out       the caches shifted by one bin with the newest appended

onnxruntime uses the CUDA provider when present and asked for, else the CPU provider; TorchScript runs on
CPU or CUDA. Torch is imported only by the TorchScript engine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

from neds_rt.errors import ConfigError, ModelFileError, StreamError, invalid
from neds_rt.model_meta import META_KEY, ModelMeta

log = logging.getLogger(__name__)

STEP_INPUTS: Final = ("counts", "k_cache", "v_cache", "n_valid")
STEP_OUTPUTS: Final = ("decodes", "log_rates", "k_cache_out", "v_cache_out")
ENGINES: Final = ("onnx", "torchscript")
DEVICES: Final = ("cpu", "cuda")


class Engine(Protocol):
    meta: ModelMeta
    batch: int

    def reset(self) -> None: ...

    def step(self, counts: np.ndarray) -> np.ndarray: ...


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise invalid(str(path), "model file does not exist", fix="pass the file `neds-rt export` wrote",
                      kind=ModelFileError)
    if path.stat().st_size == 0:
        raise invalid(str(path), "model file is empty (truncated?)", fix="export the model again",
                      kind=ModelFileError)


class _StepState:
    """Preallocated per-layer key/value caches for B streams."""

    def __init__(self, meta: ModelMeta, batch: int) -> None:
        shape = (meta.n_layers, batch, meta.n_heads, meta.context, meta.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)  # (L, B, H, C, Dh) keys of the last C bins
        self.v = np.zeros(shape, dtype=np.float32)  # (L, B, H, C, Dh) values
        self.n_valid = np.zeros(1, dtype=np.int64)  # (1,) cached bins that hold data
        self.context = meta.context

    def reset(self) -> None:
        self.k[:] = 0.0
        self.v[:] = 0.0
        self.n_valid[0] = 0

    def advance(self) -> None:
        self.n_valid[0] = min(int(self.n_valid[0]) + 1, self.context)


def _check_counts(counts: np.ndarray, meta: ModelMeta, batch: int) -> np.ndarray:
    x = np.asarray(counts, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.shape != (batch, meta.n_units):
        raise invalid("counts", f"must have shape (B={batch}, N={meta.n_units})", x.shape,
                      "pass one row of spike counts per stream, one column per model unit", kind=StreamError)
    if not np.isfinite(x).all():
        raise invalid("counts", "must be finite", "NaN/inf present", kind=StreamError)
    return np.ascontiguousarray(x)


class OnnxStepEngine:
    """onnxruntime step engine (CUDA provider when present and ``device='cuda'``, else CPU)."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 1, batch: int = 1) -> None:
        import onnxruntime as ort

        _check_file(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                log.warning("CUDA execution provider not available; %s runs on the CPU", path)
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for corrupt files
            raise invalid(str(path), "is not a readable ONNX model (corrupt or truncated?)", str(err)[:200],
                          "export the model again", kind=ModelFileError) from err
        self.providers = self._sess.get_providers()
        meta_text = self._sess.get_modelmeta().custom_metadata_map.get(META_KEY)
        self.meta = ModelMeta.from_json(meta_text, str(path))
        _check_io(self.meta, [i.name for i in self._sess.get_inputs()],
                  [o.name for o in self._sess.get_outputs()], str(path))
        self.batch = batch
        self._state = _StepState(self.meta, batch)
        self.log_rates = np.zeros((batch, self.meta.n_units), dtype=np.float32)  # (B, N) of the last step

    def reset(self) -> None:
        self._state.reset()

    def step(self, counts: np.ndarray) -> np.ndarray:
        """(B, N) counts of the newest bin -> (B, n_out) decodes; the state advances by one bin."""
        x = _check_counts(counts, self.meta, self.batch)
        s = self._state
        dec, rates, k, v = self._sess.run(
            list(STEP_OUTPUTS), {"counts": x, "k_cache": s.k, "v_cache": s.v, "n_valid": s.n_valid}
        )
        s.k, s.v = k, v
        s.advance()
        self.log_rates = rates
        return np.asarray(dec)


class TorchScriptStepEngine:
    """TorchScript step engine on CPU or CUDA; torch is imported here only."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 1, batch: int = 1) -> None:
        import torch

        _check_file(path)
        if device == "cuda" and not torch.cuda.is_available():
            log.warning("CUDA not available; %s runs on the CPU", path)
            device = "cpu"
        torch.set_num_threads(threads)
        extra = {f"{META_KEY}.json": ""}
        try:
            self._module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as err:  # torch raises RuntimeError/zipfile errors for corrupt archives
            raise invalid(str(path), "is not a readable TorchScript model (corrupt or truncated?)",
                          str(err)[:200], "export the model again", kind=ModelFileError) from err
        self._module.eval()
        self.meta = ModelMeta.from_json(extra[f"{META_KEY}.json"] or None, str(path))
        if self.meta.graph != "step":
            raise invalid(str(path), "is a window graph; serving needs a step graph", self.meta.graph,
                          "export with --graph step", kind=ModelFileError)
        self._torch = torch
        self._device = torch.device(device)
        self.batch = batch
        shape = (self.meta.n_layers, batch, self.meta.n_heads, self.meta.context, self.meta.head_dim)
        self._k = torch.zeros(shape, device=self._device)  # (L, B, H, C, Dh)
        self._v = torch.zeros(shape, device=self._device)
        self._n_valid = 0
        self.log_rates = np.zeros((batch, self.meta.n_units), dtype=np.float32)

    def reset(self) -> None:
        self._k.zero_()
        self._v.zero_()
        self._n_valid = 0

    def step(self, counts: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(_check_counts(counts, self.meta, self.batch)).to(self._device)
        n_valid = torch.tensor([self._n_valid], dtype=torch.int64, device=self._device)
        with torch.inference_mode():
            dec, rates, self._k, self._v = self._module(x, self._k, self._v, n_valid)
        self._n_valid = min(self._n_valid + 1, self.meta.context)
        self.log_rates = rates.float().cpu().numpy()
        return np.asarray(dec.float().cpu().numpy())


def _check_io(meta: ModelMeta, inputs: list[str], outputs: list[str], source: str) -> None:
    want_in, want_out = (list(STEP_INPUTS), list(STEP_OUTPUTS)) if meta.graph == "step" else (None, None)
    if meta.graph != "step":
        raise invalid(source, "is a window graph; serving needs a step graph", meta.graph,
                      "export with --graph step", kind=ModelFileError)
    if inputs != want_in or outputs != want_out:
        raise invalid(source, f"step graph must have inputs {want_in} and outputs {want_out}",
                      (inputs, outputs), "re-export the model", kind=ModelFileError)


def open_engine(path: Path, engine: str = "onnx", device: str = "cpu", threads: int = 1,
                batch: int = 1) -> OnnxStepEngine | TorchScriptStepEngine:
    """Open an exported step graph with the chosen engine."""
    if engine not in ENGINES:
        raise invalid("--engine", f"must be one of {ENGINES}", engine)
    if device not in DEVICES:
        raise invalid("--device", f"must be one of {DEVICES}", device)
    if threads < 1:
        raise invalid("threads", "must be >= 1", threads, kind=ConfigError)
    cls: Any = OnnxStepEngine if engine == "onnx" else TorchScriptStepEngine
    eng: OnnxStepEngine | TorchScriptStepEngine = cls(Path(path), device=device, threads=threads, batch=batch)
    return eng
