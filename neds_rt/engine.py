"""Inference engines: run an exported NEDS step graph one 20 ms bin at a time, state kept between steps.

Step-graph contract (ONNX and TorchScript alike; L layers, M = 5 tokens per bin, S = (C - 1) * M slots)::

    inputs   counts     (B, N) float32     spike counts of the newest bin
             key_bias   (B, S) float32     0 for ring slots that hold a bin, -inf for empty ones
             cos, sin   (Dh,) float32      rotary tables of the newest bin's absolute index (float64 angles)
             k_l, v_l   (B, H, S, Dh)      layer l's ring of rotated keys / values of the last C - 1 bins
    outputs  decodes    (B, n_out) float32 behaviour decodes of the newest bin (meta.outputs order)
             log_rates  (B, N) float32     predicted Poisson log-rate per unit of the newest bin
             k_new_l, v_new_l (B, H, M, Dh) the newest bin's keys / values, written by the engine into
                                           ring slot ``bin % (C - 1)``

The ring is preallocated and never shifted, so a step reads the cache once and writes M slots per layer.
onnxruntime uses the CUDA provider when present and asked for, else the CPU provider; TorchScript runs on
CPU or CUDA. On the CUDA provider the rings, inputs and outputs stay on the GPU in torch tensors bound once
(onnxruntime I/O binding on a CUDA stream of the engine's own), and the ring write is a device copy;
without torch the CUDA provider is fed host arrays per call. Torch is imported only by the TorchScript
engine and that CUDA path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

from neds_rt.errors import ConfigError, ModelFileError, StreamError, invalid
from neds_rt.model_meta import META_KEY, ModelMeta
from neds_rt.rotary import RotaryTables

log = logging.getLogger(__name__)

ENGINES: Final = ("onnx", "torchscript")
DEVICES: Final = ("cpu", "cuda")


def step_io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of a step graph with ``n_layers`` layers (the export writes these)."""
    cache_in = [f"{kv}_{layer}" for layer in range(n_layers) for kv in ("k", "v")]
    cache_out = [f"{kv}_new_{layer}" for layer in range(n_layers) for kv in ("k", "v")]
    return ["counts", "key_bias", "cos", "sin", *cache_in], ["decodes", "log_rates", *cache_out]


class Engine(Protocol):
    meta: ModelMeta
    batch: int

    @property
    def log_rates(self) -> np.ndarray: ...  # (B, N) log-rates of the last step

    def reset(self) -> None: ...

    def step(self, counts: np.ndarray) -> np.ndarray: ...

    def prewarm(self) -> None: ...


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise invalid(str(path), "model file does not exist", fix="pass the file `neds-rt export` wrote",
                      kind=ModelFileError)
    if path.stat().st_size == 0:
        raise invalid(str(path), "model file is empty (truncated?)", fix="export the model again",
                      kind=ModelFileError)


def _check_step_meta(meta: ModelMeta, source: str) -> int:
    if meta.graph != "step":
        raise invalid(source, "is a window graph; serving needs a step graph", meta.graph,
                      "export with --graph step", kind=ModelFileError)
    per_bin = int(meta.extra.get("tokens_per_bin", 0))
    if per_bin < 1 or "rope_base" not in meta.extra:
        raise invalid(source, "metadata lacks tokens_per_bin / rope_base of the step graph", meta.extra,
                      "re-export the model with this version of neds-rt", kind=ModelFileError)
    return per_bin


def ort_session_options(threads: int = 1, spinning: bool = False) -> Any:
    """onnxruntime options for a latency-bound step: sequential, all graph optimisations, ``threads`` intra-op
    threads, and no spinning by default (idle workers spinning for work burn a core and, on a busy 2-core
    rig, lengthen the tail: bench inference measured 2-thread p99 21.5 -> 12.6 ms at the same p50)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return opts


class _Ring:
    """Preallocated per-layer key/value rings for B streams, and the bin clock of the state."""

    def __init__(self, meta: ModelMeta, batch: int, per_bin: int) -> None:
        self.per_bin = per_bin  # K tokens per bin
        self.ring_bins = meta.context - 1
        slots = self.ring_bins * per_bin
        shape = (batch, meta.n_heads, slots, meta.head_dim)
        self.kv = [np.zeros(shape, dtype=np.float32) for _ in range(2 * meta.n_layers)]  # L x (k, v)
        self.key_bias = np.full((batch, slots), -np.inf, dtype=np.float32)  # (B, S)
        self.next_bin = 0
        self.rotary = RotaryTables(meta.head_dim, float(meta.extra["rope_base"]))

    def reset(self) -> None:
        for a in self.kv:
            a[:] = 0.0
        self.key_bias[:] = -np.inf
        self.next_bin = 0

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """New (Dh,) float32 cos, sin of the next bin (the bound CPU path writes its own buffers instead)."""
        return self.rotary.new(self.next_bin)

    def write(self, new_kv: list[np.ndarray]) -> None:
        """Store the newest bin's (B, H, K, Dh) keys/values in its slot and advance the clock."""
        self.store(self.next_bin, new_kv)
        self.next_bin += 1

    def store(self, k: int, new_kv: list[np.ndarray]) -> None:
        """Store bin ``k``'s (B, H, K, Dh) keys/values in its ring slot (the clock does not move)."""
        if self.ring_bins > 0:
            lo = (k % self.ring_bins) * self.per_bin
            for ring, new in zip(self.kv, new_kv, strict=True):
                ring[:, :, lo:lo + self.per_bin] = new
            self.key_bias[:, lo:lo + self.per_bin] = 0.0


def _check_counts(counts: np.ndarray, meta: ModelMeta, batch: int) -> np.ndarray:
    x = np.asarray(counts, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.shape != (batch, meta.n_units):
        raise invalid("counts", f"must have shape (B={batch}, N={meta.n_units})", x.shape,
                      "pass one row of spike counts per stream, one column per model unit", kind=StreamError)
    if not np.isfinite(x).all():
        raise _not_finite()
    return np.ascontiguousarray(x)


def _not_finite() -> StreamError:
    """The error for counts with NaN or inf (both count checks raise it)."""
    return invalid("counts", "must be finite", "NaN/inf present", kind=StreamError)


class OnnxStepEngine:
    """onnxruntime step engine (CUDA provider when present and ``device='cuda'``, else CPU).

    On the CPU provider every input and output is bound once to a buffer the engine owns (onnxruntime I/O
    binding): the rings are read in place, the counts and rotary tables are copied into their buffers, and
    outputs land in preallocated arrays, so a step allocates only the decodes it returns and skips the
    per-call feed conversion (~0.2 ms of a 2 ms paced step on the dev VM). The step's bookkeeping (ring write,
    next tables) is left to :meth:`_settle`, which the prewarm runs before the bin closes.
    """

    def __init__(self, path: Path, device: str = "cpu", threads: int = 1, batch: int = 1,
                 spinning: bool = False, cuda_graph: bool = False, bind: str | None = None) -> None:
        import onnxruntime as ort

        _check_file(path)
        opts = ort_session_options(threads, spinning=spinning)
        providers: list[Any] = ["CPUExecutionProvider"]
        torch_cuda = device == "cuda" and _torch_cuda()
        self._stream: Any = None  # the torch CUDA stream that onnxruntime computes on (torch-bound state)
        if device == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                if torch_cuda:
                    import torch

                    self._stream = torch.cuda.Stream()  # a stream of its own: CUDA graphs cannot capture
                    # the legacy default stream
                providers.insert(0, ("CUDAExecutionProvider", _cuda_options(self._stream, cuda_graph)))
            else:
                log.warning("CUDA execution provider not available; %s runs on the CPU", path)
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for corrupt files
            raise invalid(str(path), "is not a readable ONNX model (corrupt or truncated?)", str(err)[:200],
                          "export the model again", kind=ModelFileError) from err
        self.providers: list[str] = self._sess.get_providers()
        meta_text = self._sess.get_modelmeta().custom_metadata_map.get(META_KEY)
        self.meta = ModelMeta.from_json(meta_text, str(path))
        per_bin = _check_step_meta(self.meta, str(path))
        names_in, names_out = step_io_names(self.meta.n_layers)
        got_in = [i.name for i in self._sess.get_inputs()]
        got_out = [o.name for o in self._sess.get_outputs()]
        if got_in != names_in or got_out != names_out:
            raise invalid(str(path), "step graph inputs/outputs do not match its metadata",
                          (got_in[:6], got_out[:4]), "re-export the model", kind=ModelFileError)
        self._names_in, self._names_out = names_in, names_out
        self.batch = batch
        self._ring = _Ring(self.meta, batch, per_bin)
        self._log_rates: np.ndarray = np.zeros((batch, self.meta.n_units), np.float32)  # (B, N), last step
        self._pending: int | None = None  # the bin whose keys/values still wait in the outputs for the ring
        self._tables_bin = -1  # the bin whose rotary tables are in the bound cos/sin buffers
        on_cuda = self.providers[0] == "CUDAExecutionProvider"
        if cuda_graph and not (on_cuda and torch_cuda):
            raise invalid("cuda_graph", "needs onnxruntime's CUDA provider and torch with CUDA",
                          self.providers, kind=ConfigError)
        # where the bound buffers live: numpy on the CPU provider, torch on the GPU, or none (per-call feeds);
        # ``bind="torch-cpu"`` binds torch CPU tensors on the CPU provider, so the device path runs anywhere
        self.bind = bind or ("numpy" if not on_cuda else "torch-cuda" if torch_cuda else "feeds")
        self._binding: Any = None
        self._zeros: np.ndarray | None = None  # the per-call path's prewarm counts, made once
        if self.bind == "numpy":
            self._binding = self._bind()
        elif self.bind in ("torch-cuda", "torch-cpu"):
            self._binding = self._bind_torch("cuda" if self.bind == "torch-cuda" else "cpu")
        elif self.bind != "feeds":
            raise invalid("bind", "must be numpy, torch-cuda, torch-cpu or feeds", bind, kind=ConfigError)

    def _bind(self) -> Any:
        """Bind every input to an engine-owned buffer and every output to a preallocated array."""
        ring, meta = self._ring, self.meta
        self._x = np.zeros((self.batch, meta.n_units), dtype=np.float32)  # (B, N) counts
        self._cos, self._sin = (np.zeros(meta.head_dim, dtype=np.float32) for _ in range(2))  # (Dh,) each
        new_kv = (self.batch, meta.n_heads, ring.per_bin, meta.head_dim)  # (B, H, K, Dh)
        self._outs = [np.zeros((self.batch, len(meta.outputs)), dtype=np.float32),  # (B, n_out)
                      np.zeros((self.batch, meta.n_units), dtype=np.float32),  # (B, N) log-rates
                      *(np.zeros(new_kv, dtype=np.float32) for _ in ring.kv)]
        self._warm_outs = [np.zeros_like(a) for a in self._outs]  # prewarm()'s outputs, thrown away
        self._warm_binding = self._bind_io(self._warm_outs)
        return self._bind_io(self._outs)

    def _bind_io(self, outs: list[np.ndarray]) -> Any:
        binding = self._sess.io_binding()
        for name, buf in self._feeds(self._x, self._cos, self._sin).items():
            binding.bind_cpu_input(name, buf)  # no copy: onnxruntime reads the buffer at each run
        for name, buf in zip(self._names_out, outs, strict=True):
            binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        return binding

    def _bind_torch(self, device: str) -> Any:
        """Bind every input and output to a torch tensor on ``device`` (the GPU, or the CPU in tests): the
        rings never leave the device; a step copies in the counts and rotary tables, copies out the decodes
        and log-rates, and writes the newest keys/values into their ring slot with a device copy."""
        import torch

        ring, meta, b = self._ring, self.meta, self.batch
        dev = torch.device(device)
        self._t = torch
        with self._on_stream():
            self._t_kv = [torch.zeros(a.shape, dtype=torch.float32, device=dev)  # (B, H, S, Dh) each
                          for a in ring.kv]
            self._t_bias = torch.full(ring.key_bias.shape, float("-inf"), device=dev)  # (B, S)
            self._t_x = torch.zeros((b, meta.n_units), device=dev)  # (B, N)
            self._t_cos, self._t_sin = (torch.zeros(meta.head_dim, device=dev) for _ in range(2))  # (Dh,)
            new_kv = (b, meta.n_heads, ring.per_bin, meta.head_dim)  # (B, H, K, Dh)
            self._t_outs = [torch.zeros((b, len(meta.outputs)), device=dev),  # (B, n_out)
                            torch.zeros((b, meta.n_units), device=dev),  # (B, N)
                            *(torch.zeros(new_kv, device=dev) for _ in ring.kv)]
        kind, index = dev.type, dev.index or 0
        binding = self._sess.io_binding()
        ins = [self._t_x, self._t_bias, self._t_cos, self._t_sin, *self._t_kv]
        for name, t in zip(self._names_in, ins, strict=True):
            binding.bind_input(name, kind, index, np.float32, list(t.shape), t.data_ptr())
        for name, t in zip(self._names_out, self._t_outs, strict=True):
            binding.bind_output(name, kind, index, np.float32, list(t.shape), t.data_ptr())
        return binding

    def _on_stream(self) -> Any:
        """torch's context for the engine's CUDA stream (a no-op for the CPU-bound test path)."""
        return self._t.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    @property
    def next_bin(self) -> int:
        return self._ring.next_bin

    @property
    def _numpy_bound(self) -> bool:
        return self.bind == "numpy" and self._binding is not None  # tests drop the binding for the feed path

    @property
    def log_rates(self) -> np.ndarray:
        """(B, N) predicted log-rates of the last step (a copy)."""
        return self._outs[1].copy() if self._numpy_bound else self._log_rates

    def reset(self) -> None:
        self._pending, self._tables_bin = None, -1
        self._ring.reset()  # in place: the bound ring buffers stay the same arrays
        if self.bind.startswith("torch"):
            with self._on_stream():
                for t in self._t_kv:
                    t.zero_()
                self._t_bias.fill_(float("-inf"))

    def step(self, counts: np.ndarray) -> np.ndarray:
        """(B, N) counts of the newest bin -> (B, n_out) decodes; the state advances by one bin."""
        ring = self._ring
        if self._numpy_bound:
            self._settle()
            self._load(counts)
            self._sess.run_with_iobinding(self._binding)
            self._pending = ring.next_bin  # its keys/values go to the ring in the next _settle
            ring.next_bin += 1
            return self._outs[0].copy()  # the output buffer is reused by the next step
        x = _check_counts(counts, self.meta, self.batch)
        cos, sin = ring.tables()
        if self.bind.startswith("torch"):
            return self._step_torch(x, cos, sin)
        outs = self._sess.run(self._names_out, self._feeds(x, cos, sin))
        ring.write(outs[2:])
        self._log_rates = outs[1]
        return np.asarray(outs[0])

    def _settle(self) -> None:
        """Finish the last step's bookkeeping off the critical path (numpy-bound path): store its
        keys/values in their ring slot and fill the next bin's rotary tables. :meth:`prewarm` runs it before
        the bin closes, so the step itself only loads the counts and runs the graph; without a prewarm the
        step runs it first. Measured after a 20 ms sleep, each part alone: the ring write ~0.13 ms, the
        tables ~0.16 ms."""
        ring = self._ring
        if self._pending is not None:
            ring.store(self._pending, self._outs[2:])
            self._pending = None
        if self._tables_bin != ring.next_bin:
            ring.rotary.write(ring.next_bin, self._cos, self._sin)
            self._tables_bin = ring.next_bin

    def _load(self, counts: np.ndarray) -> None:
        """Copy one bin's counts into the bound input, checked: an array of the right shape and a numeric
        dtype is copied and checked with one float64 sum (NaN or inf makes it non-finite); anything else goes
        through :func:`_check_counts`, which names the problem."""
        x = self._x
        if type(counts) is not np.ndarray or counts.shape != x.shape or counts.dtype.kind not in "fiu":
            counts = _check_counts(counts, self.meta, self.batch)
        np.copyto(x, counts, casting="unsafe")
        if not math.isfinite(x.sum(dtype=np.float64)):  # float64: finite float32 counts cannot overflow it
            x[...] = 0.0
            raise _not_finite()

    def _step_torch(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        torch, ring = self._t, self._ring
        with self._on_stream():
            self._t_x.copy_(torch.from_numpy(x))
            self._t_cos.copy_(torch.from_numpy(cos))
            self._t_sin.copy_(torch.from_numpy(sin))
            self._sess.run_with_iobinding(self._binding)
            decodes, log_rates, *new_kv = self._t_outs
            if ring.ring_bins > 0:
                lo = (ring.next_bin % ring.ring_bins) * ring.per_bin
                for cache, new in zip(self._t_kv, new_kv, strict=True):
                    cache[:, :, lo:lo + ring.per_bin].copy_(new)
                self._t_bias[:, lo:lo + ring.per_bin] = 0.0
            ring.next_bin += 1
            # copies the caller keeps; waiting for them waits for the stream, so the ring write is done too
            self._log_rates = log_rates.to("cpu", copy=True).numpy()
            return np.asarray(decodes.to("cpu", copy=True).numpy())

    def prewarm(self) -> None:
        """Run the graph once more on the current state, and throw the outputs away: the state does not move,
        and the next :meth:`step` finds the weights, the state and the kernels' code in cache (serve calls
        it shortly before a bin closes; see ``ServeConfig.prewarm_ms``). The bound CPU path first settles
        the last step (:meth:`_settle`) and reuses the last counts; the per-call path (CUDA provider
        without torch) feeds zero counts. With the state on the GPU (torch-bound) there is no host cache to
        warm, and it does nothing."""
        if self.bind.startswith("torch"):
            return
        if self._numpy_bound:
            self._settle()  # the last step's ring write and this bin's tables, now rather than at the close
            self._load(self._x)  # the step's own load path, on the last counts (warms its code)
            self._sess.run_with_iobinding(self._warm_binding)
            return
        if self._zeros is None:
            self._zeros = np.zeros((self.batch, self.meta.n_units), dtype=np.float32)  # (B, N), kept
        self._sess.run(self._names_out, self._feeds(self._zeros, *self._ring.tables()))

    def _feeds(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's inputs by name: counts ``x``, the key bias, the rotary tables and the key/value rings
        (bound once on the CPU provider, passed per call on the CUDA provider)."""
        ring = self._ring
        return dict(zip(self._names_in, [x, ring.key_bias, cos, sin, *ring.kv], strict=True))


def _torch_cuda() -> bool:
    """torch is installed and sees a GPU (the CUDA provider then keeps the state in torch tensors)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _cuda_options(stream: Any, cuda_graph: bool) -> dict[str, str]:
    """CUDA provider options: full float32 matmuls (no TF32, so decodes match the CPU within 1e-4), the
    engine's torch stream as onnxruntime's compute stream when torch holds the state (one stream orders the
    ring write before the next step), and CUDA graph replay when asked for."""
    opts = {"device_id": "0", "use_tf32": "0"}
    if stream is not None:
        opts |= {"has_user_compute_stream": "1", "user_compute_stream": str(stream.cuda_stream)}
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    return opts


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
            with warnings.catch_warnings():  # TorchScript is a supported export format; its loader warns
                warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated",
                                        category=DeprecationWarning)
                self._module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as err:  # torch raises RuntimeError/zipfile errors for corrupt archives
            raise invalid(str(path), "is not a readable TorchScript model (corrupt or truncated?)",
                          str(err)[:200], "export the model again", kind=ModelFileError) from err
        self._module.eval()
        self.meta = ModelMeta.from_json(extra[f"{META_KEY}.json"] or None, str(path))
        per_bin = _check_step_meta(self.meta, str(path))
        self._torch = torch
        self._device = torch.device(device)
        self.batch = batch
        self._ring = _Ring(self.meta, batch, per_bin)
        self._kv = [torch.from_numpy(a).to(self._device) for a in self._ring.kv]
        self._bias = torch.from_numpy(self._ring.key_bias).to(self._device)
        self._zeros = torch.zeros((batch, self.meta.n_units), device=self._device)  # (B, N) prewarm counts
        self.log_rates = np.zeros((batch, self.meta.n_units), dtype=np.float32)

    @property
    def next_bin(self) -> int:
        return self._ring.next_bin

    def reset(self) -> None:
        for t in self._kv:
            t.zero_()
        self._bias.fill_(float("-inf"))
        self._ring.reset()

    def step(self, counts: np.ndarray) -> np.ndarray:
        torch = self._torch
        ring = self._ring
        x = torch.from_numpy(_check_counts(counts, self.meta, self.batch)).to(self._device)
        cos, sin = self._tables()
        with torch.inference_mode():
            outs = self._module(x, self._bias, cos, sin, *self._kv)
            if ring.ring_bins > 0:
                lo = (ring.next_bin % ring.ring_bins) * ring.per_bin
                for cache, new in zip(self._kv, outs[2:], strict=True):
                    cache[:, :, lo:lo + ring.per_bin] = new
                self._bias[:, lo:lo + ring.per_bin] = 0.0
        ring.next_bin += 1
        self.log_rates = outs[1].float().cpu().numpy()
        return np.asarray(outs[0].float().cpu().numpy())

    def prewarm(self) -> None:
        """Run the module once on the current state with zero counts and throw the outputs away (the state
        does not move; the next :meth:`step` finds the weights and state in cache)."""
        torch = self._torch
        with torch.inference_mode():
            self._module(self._zeros, self._bias, *self._tables(), *self._kv)

    def _tables(self) -> tuple[Any, Any]:
        """The rotary (cos, sin) tables of the next bin, on the engine's device."""
        cos, sin = (self._torch.from_numpy(a).to(self._device) for a in self._ring.tables())
        return cos, sin


def open_engine(path: Path, engine: str = "onnx", device: str = "cpu", threads: int = 1,
                batch: int = 1, cuda_graph: bool = False) -> OnnxStepEngine | TorchScriptStepEngine:
    """Open an exported step graph with the chosen engine."""
    if engine not in ENGINES:
        raise invalid("--engine", f"must be one of {ENGINES}", engine)
    if device not in DEVICES:
        raise invalid("--device", f"must be one of {DEVICES}", device)
    if threads < 1:
        raise invalid("threads", "must be >= 1", threads, kind=ConfigError)
    if engine == "onnx":
        return OnnxStepEngine(Path(path), device=device, threads=threads, batch=batch, cuda_graph=cuda_graph)
    if cuda_graph:
        raise invalid("cuda_graph", "is an onnxruntime CUDA option; TorchScript does not take it", engine,
                      kind=ConfigError)
    return TorchScriptStepEngine(Path(path), device=device, threads=threads, batch=batch)
