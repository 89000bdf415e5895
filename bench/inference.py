"""Per-step inference latency of the streaming NEDS, against the naive full-window recompute.

One random-weight streaming NEDS (default sizes: hidden 256, 8 heads, MLP 512, 5 layers, one fused token per
bin) with one 600-unit session is exported as an ONNX and a TorchScript step graph; one offline
(bidirectional) NEDS of the same sizes is exported as an ONNX window graph. Each row then decodes the same
Poisson spike counts (log-normal rates with a 7 Hz mean, 20 ms bins), one call per 20 ms tick:

- onnxruntime CPU step graph, 1 thread and 2 threads (2 threads with and without spinning pool threads);
- the same step with the paper's five tokens per bin (``tokens="modality"``), for information;
- TorchScript CPU step graph, and torch eager (:func:`training.streaming.step` under ``inference_mode``);
- the naive baseline: the offline model recomputing its whole ``context``-bin window every tick (onnxruntime,
  and torch eager unless disabled);
- a batched CPU row (``cpu_batch`` streams per call), and where CUDA exists, CUDA rows at B = 1 and batched:
  onnxruntime's CUDA provider (state bound on the GPU; also with CUDA graph replay) and TorchScript on CUDA
  (``rows="cuda"`` keeps only these and the reference rows: the 1-thread CPU step, eager, the naive baseline);
- quantized rows: the same step exported with int8 weights and with int4 weights (``neds-rt export
  --quantize``); their decodes are compared with float32's instead of eager's;
- paced rows: the 1-thread float32, int8 and int4 steps called once per 20 ms bin, as serve calls them.
  Between calls the core idles or runs other work, and the next call starts with cold caches: on the 2-core
  VM this roughly doubles the quantized steps (the figure to expect inside ``neds-rt serve``), where
  back-to-back calls measure the kernels alone;
- prewarmed paced rows: the paced float32 and int4 steps with one throwaway run (``Engine.prewarm``)
  ``prewarm_ms`` before each call, as ``neds-rt serve --prewarm-ms`` does; the throwaway run is not timed.

Latency is wall time around one engine call (input checks, ring update and copies included, as served),
after a warm-up that fills the key/value ring. Rows run interleaved in ``rounds`` chunks so that a shared,
noisy machine loads them alike; the CPU time the process spent per call (all its threads) is kept next to
the wall time, since on a loaded machine it is the steadier figure.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from bench.report import console, latency_percentiles, machine_info, plot_latency, write_json
from neds_rt.errors import ConfigError, invalid
from neds_rt.serve import PREWARM_MS

log = logging.getLogger(__name__)

EID: Final = "bench-session"
TARGET_P99_MS: Final = 1.0  # issue 5: one onnxruntime step at p99 <= 1 ms on the 2-core CPU
TARGET_SPEEDUP: Final = 20.0  # issue 5: >= 20x faster than the naive full-window recompute
BASELINE: Final = "naive: offline window recompute, onnxruntime CPU 1 thread"
PRIMARY: Final = "onnxruntime CPU step, 1 thread"
INT8: Final = "onnxruntime CPU step, 1 thread, int8 weights"
PACED: Final = "onnxruntime CPU step, 1 thread, paced"
INT8_PACED: Final = "onnxruntime CPU step, 1 thread, int8 weights, paced"
INT4: Final = "onnxruntime CPU step, 1 thread, int4 weights"
INT4_PACED: Final = "onnxruntime CPU step, 1 thread, int4 weights, paced"
PREWARMED: Final = "onnxruntime CPU step, 1 thread, paced, prewarmed"
INT4_PREWARMED: Final = "onnxruntime CPU step, 1 thread, int4 weights, paced, prewarmed"
QUANTIZED: Final = {INT8: "int8", INT4: "int4"}  # back-to-back quantized rows -> scheme (neds-rt export)


@dataclass
class InferenceBenchConfig:
    """What ``neds-rt bench inference`` runs; model sizes left as None take :class:`NEDSConfig`'s defaults."""

    steps: int = 10_000  # timed steps per step-graph row
    warmup: int = 500  # untimed steps first (at least ``context``, so the ring is full when timing starts)
    baseline_steps: int = 300  # timed ticks of each naive row (each recomputes a whole window)
    rounds: int = 5  # rows run interleaved in this many chunks
    n_units: int = 600
    context: int = 100  # bins: the ring of the step graph, the window of the naive baseline
    rate_hz: float = 7.0  # mean firing rate per unit
    cpu_batch: int = 8  # streams per call of the batched CPU row (0: no such row)
    paced_steps: int = 1500  # timed calls of each paced row, one per ``pace_s`` (0: no paced rows)
    pace_s: float = 0.02  # the bin cadence of the paced rows
    prewarm_ms: float = PREWARM_MS  # lead of the prewarmed paced rows' throwaway run (0: no such rows)
    cuda_batches: tuple[int, ...] = (8, 32)  # batched CUDA rows, where CUDA exists
    rows: str = "all"  # all, or cuda: the CUDA rows and the reference rows only (a GPU host's short run)
    eager_baseline: bool = True  # also time the naive baseline in torch eager
    hidden: int | None = None
    heads: int | None = None
    mlp: int | None = None
    layers: int | None = None
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> InferenceBenchConfig:
        """A short run (about a minute on a quiet 2-core CPU at default sizes)."""
        base: dict[str, Any] = dict(steps=600, warmup=120, baseline_steps=20, rounds=2, paced_steps=100)
        base.update(overrides)
        return cls(**base)

    def __post_init__(self) -> None:
        for name in ("steps", "baseline_steps", "rounds", "n_units"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise invalid(f"bench inference {name}", "must be an integer >= 1", value, kind=ConfigError)
        if self.warmup < 0 or self.cpu_batch < 0 or self.paced_steps < 0:
            raise invalid("bench inference warmup / cpu_batch / paced_steps", "must be >= 0",
                          (self.warmup, self.cpu_batch, self.paced_steps), kind=ConfigError)
        if self.paced_steps and not (math.isfinite(self.pace_s) and 0 < self.pace_s <= 1):
            raise invalid("bench inference pace_s", "must be in (0, 1] s", self.pace_s, kind=ConfigError)
        if not 0 <= self.prewarm_ms < self.pace_s * 1e3:
            raise invalid("bench inference prewarm_ms", "must be >= 0 and below the pace", self.prewarm_ms,
                          kind=ConfigError)
        if self.context < 2:
            raise invalid("bench inference context", "must be >= 2 bins", self.context, kind=ConfigError)
        if self.rounds > min(self.steps, self.baseline_steps, self.paced_steps or self.steps):
            raise invalid("bench inference rounds", "must be <= steps, baseline_steps and paced_steps",
                          (self.rounds, self.steps, self.baseline_steps, self.paced_steps),
                          "use fewer rounds", kind=ConfigError)
        if not (math.isfinite(self.rate_hz) and self.rate_hz > 0):
            raise invalid("bench inference rate_hz", "must be a finite rate > 0 Hz", self.rate_hz,
                          kind=ConfigError)
        if self.rows not in ("all", "cuda"):
            raise invalid("bench inference rows", "must be all or cuda", self.rows, kind=ConfigError)
        if any(b < 1 for b in self.cuda_batches):
            raise invalid("bench inference cuda_batches", "must all be >= 1", self.cuda_batches,
                          kind=ConfigError)

    def sizes(self) -> dict[str, Any]:
        """The model sizes given (hidden, heads, mlp, layers), as ``NEDSConfig`` keyword arguments."""
        return {k: v for k in ("hidden", "heads", "mlp", "layers") if (v := getattr(self, k)) is not None}


@dataclass
class _Row:
    name: str
    engine: str
    graph: str
    device: str
    threads: int
    batch: int
    steps: int  # timed calls
    call: Callable[[np.ndarray], Any]  # (B, N) float32 counts -> decodes (B, n_out)
    note: str = ""
    wall_ns: list[int] = field(default_factory=list)
    cpu_ns: list[int] = field(default_factory=list)
    last_warmup: np.ndarray | None = None
    calls: int = 0  # calls so far (warm-up included): the index into the input stream
    same_model: bool = True  # same weights and layout as the eager row (parity is checked against it)
    pace_s: float = 0.0  # > 0: one call per pace_s (as served), not back to back
    prewarm: Callable[[], Any] | None = None  # paced rows: an untimed throwaway run prewarm_s before a call
    prewarm_s: float = 0.0


# ---- inputs and models ------------------------------------------------------------------------------------
def spike_counts(n_bins: int, n_units: int, rate_hz: float, seed: int, bin_size: float = 0.02) -> np.ndarray:
    """(T, N) float32 Poisson counts per 20 ms bin; per-unit rates log-normal with mean ``rate_hz``."""
    rng = np.random.default_rng(seed)
    rates = rng.lognormal(0.0, 1.0, n_units)
    rates *= rate_hz / rates.mean()  # (N,) Hz
    return rng.poisson(rates * bin_size, size=(n_bins, n_units)).astype(np.float32)  # (T, N)


def _model(mode: str, cfg: InferenceBenchConfig, tokens: str = "auto") -> Any:
    import torch

    from training.arrays import Normalisation
    from training.config import NEDSConfig
    from training.model import NEDS, SessionVocab

    torch.manual_seed(cfg.seed)
    model = NEDS(NEDSConfig(mode=mode, dropout=0.0, n_bins=cfg.context, tokens=tokens,  # type: ignore[arg-type]
                            **cfg.sizes()))
    n = cfg.n_units
    vocab = SessionVocab(EID, np.arange(n, dtype=np.int64), np.array(["CA1"] * n),
                         Normalisation(wheel_min=-10.0, wheel_max=10.0, whisker_min=0.0, whisker_max=5.0),
                         probe="probe00")
    model.add_session(EID, n, vocab=vocab)
    return model.eval()


def _graph_nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _cuda_status() -> tuple[bool, str]:
    """(usable, reason): the CUDA driver reports a device."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "no CUDA driver on this machine (libcuda.so.1 not found): CPU-only host"
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return False, "the CUDA driver reports no usable GPU"
    return True, f"{count.value} CUDA device(s)"


# ---- rows -------------------------------------------------------------------------------------------------
def _ort_step_row(name: str, path: Path, cfg: InferenceBenchConfig, threads: int, batch: int = 1,
                  device: str = "cpu", spinning: bool = False, note: str = "",
                  paced: bool = False, prewarm_s: float = 0.0, cuda_graph: bool = False) -> _Row:
    from neds_rt.engine import OnnxStepEngine

    eng = OnnxStepEngine(path, device=device, threads=threads, batch=batch, spinning=spinning,
                         cuda_graph=cuda_graph)
    if device == "cuda" and eng.providers[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"onnxruntime fell back to {eng.providers} for {path}")
    steps, pace_s = (cfg.paced_steps, cfg.pace_s) if paced else (cfg.steps, 0.0)
    return _Row(name, "onnxruntime", "step", device, threads, batch, steps, eng.step, note, pace_s=pace_s,
                prewarm=eng.prewarm if prewarm_s > 0 else None, prewarm_s=prewarm_s)


def _torchscript_row(name: str, path: Path, cfg: InferenceBenchConfig, device: str = "cpu",
                     batch: int = 1, note: str = "") -> _Row:
    from neds_rt.engine import open_engine

    eng = open_engine(path, "torchscript", device=device, threads=1, batch=batch)
    return _Row(name, "torchscript", "step", device, 1, batch, cfg.steps, eng.step, note)


def _cuda_rows(cfg: InferenceBenchConfig, step_onnx: Path, step_ts: Path, cuda: tuple[bool, str]
               ) -> tuple[list[_Row], list[dict[str, str]]]:
    """onnxruntime CUDA (B = 1, B = 1 with CUDA graph replay, batched) and TorchScript CUDA (B = 1, batched)
    rows; ``cuda`` is :func:`_cuda_status`. A row that cannot be built (no driver, no provider, no torch CUDA,
    a failed graph capture) is skipped with its reason rather than ending the run."""
    import onnxruntime as ort
    import torch

    ok, reason = cuda
    ort_reason = ("" if "CUDAExecutionProvider" in ort.get_available_providers()
                  else "onnxruntime was built without the CUDA execution provider")
    torch_reason = "" if torch.cuda.is_available() else "this torch build sees no CUDA device"
    plans: list[tuple[str, str, Callable[[str], _Row]]] = [  # (row name, why not, build the named row)
        ("onnxruntime CUDA step", ort_reason, lambda name: _ort_step_row(
            name, step_onnx, cfg, 1, device="cuda", note="state bound on the GPU")),
        ("onnxruntime CUDA step, CUDA graph", ort_reason, lambda name: _ort_step_row(
            name, step_onnx, cfg, 1, device="cuda", cuda_graph=True,
            note="the step replayed as one CUDA graph")),
        *((f"onnxruntime CUDA step, batch {b}", ort_reason, lambda name, b=b: _ort_step_row(
            name, step_onnx, cfg, 1, batch=b, device="cuda", note=f"{b} streams per call"))
          for b in cfg.cuda_batches),
        ("TorchScript CUDA step", torch_reason, lambda name: _torchscript_row(
            name, step_ts, cfg, device="cuda")),
        *((f"TorchScript CUDA step, batch {b}", torch_reason, lambda name, b=b: _torchscript_row(
            name, step_ts, cfg, device="cuda", batch=b, note=f"{b} streams per call"))
          for b in cfg.cuda_batches),
    ]
    rows: list[_Row] = []
    skipped: list[dict[str, str]] = []
    for name, why, build in plans:
        why = why if ok else reason
        if why:
            skipped.append({"row": name, "reason": why})
            continue
        try:
            rows.append(build(name))
        except Exception as err:  # a GPU row that fails to build is reported, not fatal
            log.warning("%s: %s", name, err)
            skipped.append({"row": name, "reason": f"failed to build: {str(err)[:300]}"})
    return rows, skipped


def _eager_step_row(model: Any, cfg: InferenceBenchConfig) -> _Row:
    import torch

    from training.streaming import StepState, StreamingStep, step

    module = StreamingStep(model, EID)
    with torch.inference_mode():
        state = StepState.empty(model, batch=1, context=cfg.context)

    def call(counts: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            decodes, _ = step(module, state, torch.from_numpy(counts))
        return decodes.numpy()

    return _Row("torch eager step", "torch eager", "step", "cpu", 1, 1, cfg.steps, call,
                "training.streaming.step, inference_mode")


def _naive_ort_row(name: str, path: Path, cfg: InferenceBenchConfig, threads: int) -> _Row:
    import onnxruntime as ort

    from neds_rt.engine import ort_session_options

    sess = ort.InferenceSession(str(path), sess_options=ort_session_options(threads),
                                providers=["CPUExecutionProvider"])
    window = np.zeros((1, cfg.context, cfg.n_units), dtype=np.float32)  # (1, C, N) the last C bins

    def call(counts: np.ndarray) -> np.ndarray:
        window[0, :-1] = window[0, 1:]  # shift one bin (numpy copes with the overlap)
        window[0, -1] = counts[0]
        decodes = sess.run(["decodes"], {"counts": window})[0]  # (1, C, n_out)
        return np.asarray(decodes[:, -1])

    return _Row(name, "onnxruntime", "window (offline, full recompute)", "cpu", threads, 1,
                cfg.baseline_steps, call, f"bidirectional {cfg.context}-bin window recomputed every tick")


def _naive_eager_row(model: Any, cfg: InferenceBenchConfig) -> _Row:
    import torch

    from training.export import WindowGraph

    graph = WindowGraph(model, EID, cfg.context)
    window = torch.zeros(1, cfg.context, cfg.n_units)  # (1, C, N)

    def call(counts: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            window[0, :-1] = window[0, 1:].clone()
            window[0, -1] = torch.from_numpy(counts[0])
            decodes, _ = graph(window)  # (1, C, n_out)
        return decodes[:, -1].numpy()

    return _Row("naive: offline window recompute, torch eager", "torch eager",
                "window (offline, full recompute)", "cpu", 1, 1, cfg.baseline_steps, call,
                f"bidirectional {cfg.context}-bin window recomputed every tick")


def _cpu_rows(cfg: InferenceBenchConfig, step_onnx: Path, step_ts: Path, step_modality_onnx: Path,
              step_int8_onnx: Path, step_int4_onnx: Path) -> list[_Row]:
    """The CPU rows beyond the reference ones: 2 threads, TorchScript, 5 tokens per bin, int8 / int4, paced,
    prewarmed and batched."""
    rows: list[_Row] = [
        _ort_step_row("onnxruntime CPU step, 2 threads", step_onnx, cfg, threads=2,
                      note="no spinning (the engine's setting)"),
        _ort_step_row("onnxruntime CPU step, 2 threads, spinning", step_onnx, cfg, threads=2,
                      spinning=True, note="pool threads spin (onnxruntime's own default)"),
        _torchscript_row("TorchScript CPU step", step_ts, cfg),
        _ort_step_row("onnxruntime CPU step, 1 thread, 5 tokens per bin", step_modality_onnx, cfg,
                      threads=1, note="the paper's one token per modality, for information"),
        _ort_step_row(INT8, step_int8_onnx, cfg, threads=1,
                      note="int8 MatMul weights (neds-rt export --quantize int8); decodes differ"),
        _ort_step_row(INT4, step_int4_onnx, cfg, threads=1,
                      note="4-bit weights in blocks of 32 (neds-rt export --quantize int4); decodes "
                           "differ"),
    ]
    for row in rows[-3:]:
        row.same_model = False
    if cfg.paced_steps:
        pace = f"one call per {cfg.pace_s * 1e3:g} ms, as served"
        rows.append(_ort_step_row(PACED, step_onnx, cfg, threads=1, note=pace, paced=True))
        for name, path in ((INT8_PACED, step_int8_onnx), (INT4_PACED, step_int4_onnx)):
            rows.append(_ort_step_row(name, path, cfg, threads=1, note=pace, paced=True))
            rows[-1].same_model = False
        if cfg.prewarm_ms > 0:
            warm = f"{pace}, after a throwaway run {cfg.prewarm_ms:g} ms before (serve --prewarm-fixed)"
            for name, path in ((PREWARMED, step_onnx), (INT4_PREWARMED, step_int4_onnx)):
                rows.append(_ort_step_row(name, path, cfg, threads=1, note=warm, paced=True,
                                          prewarm_s=cfg.prewarm_ms / 1e3))
            rows[-1].same_model = False
    if cfg.cpu_batch > 0:
        rows.append(_ort_step_row(f"onnxruntime CPU step, batch {cfg.cpu_batch}", step_onnx, cfg,
                                  threads=1, batch=cfg.cpu_batch,
                                  note=f"{cfg.cpu_batch} streams per call, for information"))
    return rows


# ---- timing -----------------------------------------------------------------------------------------------
def _inputs(row: _Row, counts: np.ndarray, index: int) -> np.ndarray:
    """(B, N) counts of call ``index``: stream b reads the shared train at an offset, so streams differ."""
    t = counts.shape[0]
    rows = (index + np.arange(row.batch) * (t // max(row.batch, 1) + 1)) % t
    return np.ascontiguousarray(counts[rows])  # (B, N)


def _run(row: _Row, counts: np.ndarray, n: int, timed: bool) -> None:
    wall, cpu = time.perf_counter_ns, time.process_time_ns
    out: Any = None
    pace_ns, prewarm_ns = int(row.pace_s * 1e9), int(row.prewarm_s * 1e9)
    due = wall() + pace_ns
    for _ in range(n):
        x = _inputs(row, counts, row.calls)
        if pace_ns:  # sleep to the next tick, as serve sleeps to the next bin's deadline
            if row.prewarm is not None:  # as serve --prewarm-ms: a throwaway run shortly before (untimed)
                time.sleep(max(0.0, (due - prewarm_ns - wall()) / 1e9))
                row.prewarm()
            time.sleep(max(0.0, (due - wall()) / 1e9))
            due += pace_ns
        c0 = cpu()
        t0 = wall()
        out = row.call(x)
        t1 = wall()
        c1 = cpu()
        row.calls += 1
        if timed:
            row.wall_ns.append(t1 - t0)
            row.cpu_ns.append(c1 - c0)
    if not timed and out is not None:
        row.last_warmup = np.asarray(out, dtype=np.float64)


def _chunks(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# ---- the benchmark ----------------------------------------------------------------------------------------
def run_inference_bench(out: Path, cfg: InferenceBenchConfig | None = None) -> dict[str, Any]:
    """Build, export and time every row; print the table, write ``inference.json`` and ``inference.png``."""
    import torch

    from training.export import export_model
    from training.model import count_parameters

    cfg = cfg or InferenceBenchConfig()
    out = Path(out)
    models_dir = out / "models"
    machine = machine_info(("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch"))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # TorchScript and eager rows: one thread, like the 1-thread onnxruntime row
    try:
        stream_model = _model("streaming", cfg)  # fused: one token per bin (the streaming default)
        per_modality_model = _model("streaming", cfg, tokens="modality")  # the paper's 5 tokens per bin
        offline_model = _model("offline", cfg)
        step_onnx, step_ts = models_dir / "step.onnx", models_dir / "step.pt"
        step_modality_onnx = models_dir / "step_5_tokens.onnx"
        step_int8_onnx, step_int4_onnx = models_dir / "step_int8.onnx", models_dir / "step_int4.onnx"
        window_onnx = models_dir / "window_offline.onnx"
        t = time.perf_counter()
        export_model(stream_model, EID, step_onnx, fmt="onnx", graph="step", context=cfg.context)
        export_model(stream_model, EID, step_ts, fmt="torchscript", graph="step", context=cfg.context)
        export_model(offline_model, EID, window_onnx, fmt="onnx", graph="window", context=cfg.context)
        if cfg.rows == "all":
            export_model(per_modality_model, EID, step_modality_onnx, fmt="onnx", graph="step",
                         context=cfg.context)
            for path, scheme in ((step_int8_onnx, "int8"), (step_int4_onnx, "int4")):
                export_model(stream_model, EID, path, fmt="onnx", graph="step", context=cfg.context,
                             quantize=scheme)
        log.info("exported the graphs in %.1f s", time.perf_counter() - t)

        cuda_status = _cuda_status()
        rows: list[_Row] = [_ort_step_row(PRIMARY, step_onnx, cfg, threads=1),
                            _eager_step_row(stream_model, cfg)]
        if cfg.rows == "all":
            rows += _cpu_rows(cfg, step_onnx, step_ts, step_modality_onnx, step_int8_onnx, step_int4_onnx)
        cuda, skipped = _cuda_rows(cfg, step_onnx, step_ts, cuda_status)
        rows += cuda
        rows.append(_naive_ort_row(BASELINE, window_onnx, cfg, threads=1))
        if cfg.eager_baseline:
            rows.append(_naive_eager_row(offline_model, cfg))

        n_bins = max(cfg.steps, cfg.baseline_steps) + cfg.warmup + 1
        counts = spike_counts(min(n_bins, 20_000), cfg.n_units, cfg.rate_hz, cfg.seed)  # (T, N)
        warmup = max(cfg.warmup, cfg.context)  # the ring is full before timing starts
        load_before = os.getloadavg()
        for row in rows:
            naive = row.graph != "step"
            _run(row, counts, min(warmup, 5) if naive else warmup, timed=False)
        round_load: list[float] = []
        started = time.perf_counter()
        for r in range(cfg.rounds):
            for row in rows:
                _run(row, counts, _chunks(row.steps, cfg.rounds)[r], timed=True)
            round_load.append(os.getloadavg()[0])
            log.info("round %s/%s done, load %.1f", r + 1, cfg.rounds, round_load[-1])
        seconds = time.perf_counter() - started
        load_after = os.getloadavg()
        result = _result(cfg, rows, skipped, machine, {
            "streaming_parameters": count_parameters(stream_model),
            "offline_parameters": count_parameters(offline_model),
            "step_graph_nodes": _graph_nodes(step_onnx),
            "window_graph_nodes": _graph_nodes(window_onnx),
        }, {"before": list(load_before), "after": list(load_after), "per_round_1m": round_load},
            seconds, cuda_status[1])
    finally:
        torch.set_num_threads(torch_threads)
    write_json(out / "inference.json", result)
    plot_latency(out / "inference.png",
                 {r.name: np.asarray(r.wall_ns, dtype=np.float64) / 1e6 for r in rows},
                 _title(result), unit="ms", budget=TARGET_P99_MS)
    _print(result)
    return result


def _result(cfg: InferenceBenchConfig, rows: list[_Row], skipped: list[dict[str, str]],
            machine: dict[str, object], model: dict[str, int], load: dict[str, Any], seconds: float,
            cuda: str) -> dict[str, Any]:
    from training.config import NEDSConfig

    base = next(r for r in rows if r.name == BASELINE)
    base_lat = latency_percentiles(np.asarray(base.wall_ns) / 1e6)
    ref = next(r for r in rows if r.name == "torch eager step").last_warmup
    fp32 = next(r for r in rows if r.name == PRIMARY).last_warmup
    table: list[dict[str, Any]] = []
    for r in rows:
        lat = latency_percentiles(np.asarray(r.wall_ns) / 1e6)  # ms per call
        cpu = latency_percentiles(np.asarray(r.cpu_ns) / 1e6)  # ms of process CPU per call
        parity = None
        if (r.graph == "step" and r.batch == 1 and r.same_model and ref is not None
                and r.last_warmup is not None):
            parity = float(np.abs(r.last_warmup - ref).max())  # same inputs from an empty state
        vs_fp32 = None
        if r.name in QUANTIZED and r.last_warmup is not None and fp32 is not None:
            vs_fp32 = float(np.abs(r.last_warmup - fp32).max())  # quantization error, same inputs
        table.append({
            "row": r.name, "engine": r.engine, "graph": r.graph, "device": r.device, "threads": r.threads,
            "batch": r.batch, "steps": len(r.wall_ns), "latency_ms": lat, "cpu_ms": cpu,
            "per_stream_p50_ms": lat["p50"] / r.batch,
            "speedup_p50": base_lat["p50"] / lat["p50"], "speedup_p99": base_lat["p99"] / lat["p99"],
            "max_abs_diff_vs_eager": parity, "max_abs_diff_vs_float32": vs_fp32, "note": r.note,
        })
    primary = next(t for t in table if t["row"] == PRIMARY)
    quantized = {scheme: row for name, scheme in QUANTIZED.items() for row in table if row["row"] == name}
    sizes = asdict(NEDSConfig(mode="streaming", dropout=0.0, n_bins=cfg.context, **cfg.sizes()))
    return {
        "parameters": asdict(cfg) | {"bin_size_s": 0.02, "session": EID},
        "model": {k: sizes[k] for k in ("hidden", "heads", "mlp", "layers", "tokens")} | model,
        "machine": machine,
        "load_average": load,
        "seconds": seconds,
        "cuda": cuda,
        "rows": table,
        "skipped": skipped,
        "targets": {
            "row": PRIMARY, "p99_ms": primary["latency_ms"]["p99"], "target_p99_ms": TARGET_P99_MS,
            "p99_met": primary["latency_ms"]["p99"] <= TARGET_P99_MS,
            "speedup_p50": primary["speedup_p50"], "target_speedup": TARGET_SPEEDUP,
            "speedup_met": primary["speedup_p50"] >= TARGET_SPEEDUP,
            **{key: value for scheme, row in quantized.items() for key, value in (
                (f"{scheme}_p99_ms", row["latency_ms"]["p99"]),
                (f"{scheme}_p99_met", row["latency_ms"]["p99"] <= TARGET_P99_MS),
                (f"{scheme}_max_abs_diff_vs_float32", row["max_abs_diff_vs_float32"]))},
            **{f"{key}_p99_ms": next(t for t in table if t["row"] == name)["latency_ms"]["p99"]
               for key, name in (("paced", PACED), ("int8_paced", INT8_PACED), ("int4_paced", INT4_PACED),
                                 ("paced_prewarmed", PREWARMED), ("int4_paced_prewarmed", INT4_PREWARMED))
               if any(r.name == name for r in rows)},
        },
    }


def _title(result: dict[str, Any]) -> str:
    m, load = result["model"], result["load_average"]
    return (f"NEDS step latency: hidden {m['hidden']}, {m['heads']} heads, MLP {m['mlp']}, "
            f"{m['layers']} layers, "
            f"{result['parameters']['n_units']} units, context {result['parameters']['context']} bins; "
            f"load {load['before'][0]:.1f} -> {load['after'][0]:.1f}")


def _print(result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=_title(result))
    table.add_column("row", justify="left")
    for name in ("thr", "B", "steps", "min ms", "p50", "p90", "p99", "p99.9", "max", "cpu p50", "x naive p50",
                 "x naive p99"):
        table.add_column(name, justify="right")
    for r in result["rows"]:
        lat = r["latency_ms"]
        table.add_row(r["row"], str(r["threads"]), str(r["batch"]), f"{r['steps']:,}",
                      *(f"{lat[k]:.3f}" for k in ("min", "p50", "p90", "p99", "p99.9", "max")),
                      f"{r['cpu_ms']['p50']:.3f}", f"{r['speedup_p50']:.1f}x", f"{r['speedup_p99']:.1f}x")
    con = console()
    con.print(table)
    for s in result["skipped"]:
        con.print(f"skipped: {s['row']}: {s['reason']}")
    t = result["targets"]
    con.print(f"target ({t['row']}): p99 {t['p99_ms']:.3f} ms vs <= {t['target_p99_ms']} ms: "
              f"{'met' if t['p99_met'] else 'NOT met'}; {t['speedup_p50']:.1f}x the naive recompute at p50 "
              f"vs >= {t['target_speedup']:.0f}x: {'met' if t['speedup_met'] else 'NOT met'}", markup=False)
    for name, scheme in QUANTIZED.items():
        if f"{scheme}_p99_ms" not in t:
            continue
        within = "within" if t[f"{scheme}_p99_met"] else "over"
        con.print(f"{scheme} weights ({name}): p99 {t[f'{scheme}_p99_ms']:.3f} ms ({within} "
                  f"{t['target_p99_ms']} ms); decodes differ from float32 by up to "
                  f"{t[f'{scheme}_max_abs_diff_vs_float32']:.2e} on the last warm-up step (random weights: "
                  "bench quality scores a trained model's)", markup=False)
    if "paced_p99_ms" in t:
        con.print(f"paced, one call per bin as served: p99 float32 {t['paced_p99_ms']:.3f} ms, int8 "
                  f"{t['int8_paced_p99_ms']:.3f} ms, int4 {t['int4_paced_p99_ms']:.3f} ms (cold caches after "
                  "each idle gap)", markup=False)
    if "paced_prewarmed_p99_ms" in t:
        con.print(f"paced after a throwaway run {result['parameters']['prewarm_ms']:g} ms before (serve "
                  f"--prewarm-ms): p99 float32 {t['paced_prewarmed_p99_ms']:.3f} ms, int4 "
                  f"{t['int4_paced_prewarmed_p99_ms']:.3f} ms", markup=False)
    diffs = [r["max_abs_diff_vs_eager"] for r in result["rows"] if r["max_abs_diff_vs_eager"] is not None]
    m, load = result["machine"], result["load_average"]
    con.print(f"step rows agree with torch eager within {max(diffs):.2e} after the warm-up; "
              f"cpu p50 = process CPU time per call (all threads)" if diffs else "")
    con.print(f"machine: {m['processor'] or m['machine']}, {m['cores_available']} cores; load average "
              f"{load['before'][0]:.1f} before, {load['after'][0]:.1f} after, per round "
              f"{', '.join(f'{x:.1f}' for x in load['per_round_1m'])}; {result['seconds']:.0f} s timed")
