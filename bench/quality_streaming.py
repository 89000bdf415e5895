"""Issue 5: the streaming (causal) NEDS on the held-out sessions of ``bench quality``, against offline NEDS.

For each held-out session a streaming NEDS (``mode="streaming"``, same preset) is trained on continuous
windows of the session (:func:`training.windows.build_window_arrays`) from which the TEST trial windows are
cut out, for as many optimiser steps of as many 100-bin windows as the single-session offline NEDS
(``neds_single``) takes. It is then run causally, as the step runtime would run it
(:func:`training.streaming.banded_recompute` with the model's context of C bins: each layer of a bin attends
to that bin and the C - 1 before it, never a later one), over a stretch of the continuous grid covering each
TEST trial window and the L * (C - 1) bins before it (the receptive field of L layers), which gives the
decodes of a causal run over the whole session. It is scored on exactly the TEST trials the offline models
are scored on, against the same targets:

- wheel / whisker R2 over the trial-window bins (the continuous-grid bin nearest to each trial bin; the two
  grids differ by under half a bin, recorded in the report);
- choice and block: the per-bin class probabilities averaged over the trial window, then the most probable
  class (the offline model averages its per-bin logits over the window).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from bench.quality import (
    QualityConfig,
    add_streaming_rows,
    array_cache_dir,
    neds_metrics,
    run_dir,
    train_or_reuse,
)
from bench.quality_report import add_model_rows
from neds_rt.errors import DataError, invalid

if TYPE_CHECKING:
    from training.arrays import ContinuousArrays, TrialArrays
    from training.model import NEDS

log = logging.getLogger(__name__)

MODEL: Final = "neds_streaming"
INT8_MODEL: Final = "neds_streaming_int8"  # the same model exported with int8 weights, run by the step engine
INT4_MODEL: Final = "neds_streaming_int4"  # ... with 4-bit block-quantized weights
QUANTIZED_MODELS: Final = {"int8": INT8_MODEL, "int4": INT4_MODEL}  # neds-rt export --quantize -> model row
OFFLINE: Final = "neds_single"  # the offline NEDS with the same data and budget
RULE: Final = ("wheel/whisker R2 over the 100 bins of each TEST trial window (stimOn -0.5..+1.5 s) from "
               "causal per-bin decodes; choice/block: per-bin probabilities averaged over the trial window, "
               "then the most probable class (the offline model averages its per-bin logits)")


# ---- causal decodes on trial windows -------------------------------------------------------------------
def trial_ranges(arr: TrialArrays, rows: np.ndarray) -> np.ndarray:
    """(K, 2) [start, end) seconds of the trial windows ``rows``."""
    start = np.asarray(arr.window_start, dtype=np.float64)[rows]  # (K,)
    return np.column_stack([start, start + arr.n_bins * arr.bin_size])


def trial_start_bins(arr: TrialArrays, cont: ContinuousArrays, rows: np.ndarray) -> tuple[np.ndarray, float]:
    """(K,) continuous-grid bin nearest to the first bin of each trial window, and the largest offset (s)."""
    if not math.isclose(arr.bin_size, cont.bin_size):
        raise invalid(f"session {arr.eid}", "needs trial and continuous arrays on the same bin size",
                      (arr.bin_size, cont.bin_size), kind=DataError)
    pos = (np.asarray(arr.window_start, dtype=np.float64)[rows] - cont.t0) / cont.bin_size  # (K,) fractional
    start = np.round(pos).astype(np.int64)
    offset = float(np.abs(pos - start).max() * cont.bin_size) if rows.size else 0.0
    return start, offset


def _stretches(counts: np.ndarray, starts: np.ndarray, lead: int, n_bins: int) -> tuple[np.ndarray, int]:
    """(K, lead + n_bins, N) float32 counts of bins ``start - lead .. start + n_bins - 1`` of the grid; bins
    past either end of the grid are zero. Returns them and how many such padded bins there were."""
    idx = starts[:, None] + np.arange(-lead, n_bins)[None, :]  # (K, L) grid bins
    inside = (idx >= 0) & (idx < counts.shape[0])
    out = counts[np.clip(idx, 0, counts.shape[0] - 1)].astype(np.float32)  # (K, L, N)
    out[~inside] = 0.0
    return out, int((~inside).sum())


def receptive_bins(model: NEDS, context: int) -> int:
    """Bins before a bin that its causal decode can depend on: ``layers * (context - 1)``."""
    return model.cfg.layers * (context - 1)


def causal_decodes(model: NEDS, eid: str, counts: np.ndarray, starts: np.ndarray, n_bins: int,
                   context: int | None = None, batch_size: int = 32) -> tuple[np.ndarray, int]:
    """(K, n_bins, 6) physical decodes of bins ``start .. start + n_bins - 1`` of the grid ``counts``
    (T_total, N) with attention windows of ``context`` bins (the model's ``n_bins`` by default), equal to a
    causal run over the whole grid (each stretch starts :func:`receptive_bins` before its window); and the
    number of bins padded past the grid's ends."""
    import torch

    from training.streaming import banded_recompute

    if not model.cfg.causal:
        raise invalid("model", "must be a streaming NEDS (mode='streaming') for causal decodes",
                      model.cfg.mode, kind=DataError)
    c = context or model.cfg.n_bins
    device = next(model.parameters()).device
    # a layer looks C - 1 bins back, so the decode of a bin depends on the L * (C - 1) bins before it (the
    # step runtime's cached keys/values carry that history): a stretch with that lead equals the whole run
    lead = np.clip(starts, 0, receptive_bins(model, c))  # (K,) bins before each window (fewer at the start)
    out = np.zeros((starts.size, n_bins, 6), dtype=np.float64)
    padded = 0
    model.eval()
    with torch.no_grad():
        for lead_k in np.unique(lead):
            rows = np.flatnonzero(lead == lead_k)
            for b0 in range(0, rows.size, batch_size):
                part = rows[b0 : b0 + batch_size]
                x, n_pad = _stretches(counts, starts[part], int(lead_k), n_bins)  # (B, lead + T, N)
                padded += n_pad
                dec, _ = banded_recompute(model, eid, torch.from_numpy(x).to(device), c)  # (B, lead + T, 6)
                out[part] = dec[:, int(lead_k):].cpu().numpy()
    return out, padded


def streaming_predictions(decodes: np.ndarray, arr: TrialArrays) -> dict[str, np.ndarray]:
    """Causal decodes (K, T, 6) -> :func:`bench.quality.neds_metrics` predictions: scaled ``wheel``,
    ``whisker`` (K, T); ``choice`` (K, 2) and ``block`` (K, 3) probabilities averaged over the window."""
    p_cw = decodes[..., 2].mean(axis=1)  # (K,) mean P(choice = +1 = class 1) over the window
    return {
        "wheel": arr.norm.scale("wheel", decodes[..., 0]).astype(np.float64),  # (K, T) as the targets
        "whisker": arr.norm.scale("whisker", decodes[..., 1]).astype(np.float64),
        "choice": np.column_stack([1.0 - p_cw, p_cw]),  # (K, 2)
        "block": decodes[..., 3:6].mean(axis=1),  # (K, 3)
    }


def engine_decodes(path: Path, counts: np.ndarray, starts: np.ndarray, n_bins: int, lead: int) -> np.ndarray:
    """(K, n_bins, 6) decodes of an exported step graph (``neds_rt.engine``, onnxruntime CPU, 1 thread) for
    bins ``start .. start + n_bins - 1`` of ``counts`` (T_total, N): the engine is reset and stepped through
    the ``lead`` bins before each window first, as :func:`causal_decodes` does with the torch model."""
    from neds_rt.engine import open_engine

    eng = open_engine(path, "onnx", threads=1)
    out = np.zeros((starts.size, n_bins, 6), dtype=np.float64)
    for k, start in enumerate(starts):
        lead_k = int(min(max(start, 0), lead))
        x, _ = _stretches(counts, starts[k : k + 1], lead_k, n_bins)  # (1, lead_k + T, N)
        eng.reset()
        for t in range(x.shape[1]):
            decode = eng.step(x[0, t : t + 1])  # (1, 6)
            if t >= lead_k:
                out[k, t - lead_k] = decode[0]
    return out


def score_streaming(model: NEDS, arr: TrialArrays, cont: ContinuousArrays, rows: np.ndarray,
                    context: int | None = None) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Decoding metrics of the causal decodes on the trial windows ``rows`` (the TEST trials), and details
    (``decodes`` (K, T, 6), ``grid_offset_s``, ``padded_bins``)."""
    starts, offset = trial_start_bins(arr, cont, rows)
    decodes, padded = causal_decodes(model, arr.eid, cont.spikes, starts, arr.n_bins, context)
    if padded:
        log.warning("session %s: %s trial-window bins lie past the continuous grid (zero counts)", arr.eid,
                    padded)
    scores = neds_metrics(streaming_predictions(decodes, arr), arr, rows, tasks=("decoding",))
    return scores, {"decodes": decodes, "grid_offset_s": offset, "padded_bins": padded}


def score_quantized(model: NEDS, arr: TrialArrays, cont: ContinuousArrays, rows: np.ndarray, fp32: np.ndarray,
                    path: Path, scheme: str) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Export ``model`` quantized with ``scheme`` to ``path`` (``neds-rt export --quantize SCHEME``), decode
    the trial windows ``rows`` with the step engine, score them like :func:`score_streaming`, and compare
    the decodes with the float32 ones ``fp32`` (K, T, 6); details hold the quantized ``decodes`` (K, T, 6)
    and, per decode channel, the largest difference (absolute and in standard deviations of the float32
    channel) and the R2 of the quantized decodes against the float32 ones."""
    from training.export import export_model
    from training.metrics import r2

    c = model.cfg.n_bins
    export_model(model, arr.eid, path, graph="step", context=c, quantize=scheme)
    starts, _ = trial_start_bins(arr, cont, rows)
    decodes = engine_decodes(path, cont.spikes, starts, arr.n_bins, receptive_bins(model, c))
    scores = neds_metrics(streaming_predictions(decodes, arr), arr, rows, tasks=("decoding",))
    diff = np.abs(decodes - fp32).reshape(-1, 6).max(axis=0)  # (6,) per decode channel
    spread = fp32.reshape(-1, 6).std(axis=0)  # (6,)
    r2_fp32 = [r2(decodes[..., ch], fp32[..., ch]) if spread[ch] > 0 else None for ch in range(6)]  # None:
    # a float32 channel that never moves has no R2
    return scores, {"max_abs_diff_vs_float32": diff.tolist(),
                    "max_abs_diff_over_std": (diff / np.maximum(spread, 1e-12)).tolist(),
                    "r2_vs_float32": r2_fp32, "decodes": decodes}


# ---- training -------------------------------------------------------------------------------------------
def offline_steps(arr: TrialArrays, cfg: QualityConfig) -> int:
    """Optimiser steps of the single-session offline NEDS: ``epochs`` x batches of TRAIN trials."""
    from training.arrays import TRAIN

    return cfg.epochs * math.ceil(arr.subset(TRAIN).size / cfg.batch_size)


def train_streaming(arr: TrialArrays, cont: ContinuousArrays, out: Path, cfg: QualityConfig
                    ) -> tuple[NEDS, dict[str, Any]]:
    """A streaming NEDS trained on the session's continuous windows (TEST trial windows cut out) for the
    offline NEDS's number of steps; the VAL-best model (``best.pt``) and what it was trained on."""
    from training.arrays import TEST, TRAIN, VAL
    from training.config import NEDSConfig, TrainConfig
    from training.windows import build_window_arrays

    test = arr.subset(TEST)
    windows = build_window_arrays(cont, window_bins=arr.n_bins, seed=cfg.seed,
                                  exclude=trial_ranges(arr, test))  # no window touches a TEST trial
    n_train = int(windows.subset(TRAIN).size)
    if n_train == 0 or windows.subset(VAL).size == 0:
        raise invalid(f"session {arr.eid}", "needs TRAIN and VAL continuous windows outside the TEST trials",
                      (n_train, int(windows.subset(VAL).size)), "use a longer session, or --no-streaming",
                      kind=DataError)
    steps = offline_steps(arr, cfg)
    epochs = math.ceil(steps / math.ceil(n_train / cfg.batch_size))
    tcfg = TrainConfig(epochs=epochs, max_steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                       progress=False, device=cfg.device, checkpoint_minutes=cfg.checkpoint_minutes)
    model_cfg = NEDSConfig.preset(cfg.preset, n_sessions=1, mode="streaming", n_bins=arr.n_bins)
    model = train_or_reuse({arr.eid: windows}, out, model_cfg, tcfg, resume=cfg.reuses_runs)
    info = {"train_windows": n_train, "val_windows": int(windows.subset(VAL).size), "steps": steps,
            "epochs": epochs, "excluded_test_trials": int(test.size)}
    return model, info


# ---- the bench step -------------------------------------------------------------------------------------
def add_streaming(report: dict[str, Any], data: Path, out: Path, cfg: QualityConfig) -> dict[str, Any]:
    """Train, run and score a streaming NEDS on each held-out session of ``report``; add its rows (model
    ``neds_streaming``) and the streaming-vs-offline gap to the report, and return it."""
    from streams.load import open_one
    from training.arrays import TEST
    from training.cache import load_arrays
    from training.quantize import SCHEMES

    one = open_one(Path(data))
    rows: dict[str, dict[str, float | None]] = {}
    schemes = [s for s in QUANTIZED_MODELS if getattr(cfg, s)]
    quant_rows: dict[str, dict[str, dict[str, float | None]]] = {s: {} for s in schemes}
    details: dict[str, Any] = {}
    for eid in report["heldout_sessions"]:
        t0 = time.perf_counter()
        arr, cont = load_arrays(one, eid, cache_root=array_cache_dir(out))
        model, info = train_streaming(arr, cont, run_dir(out, eid, MODEL), cfg)
        test = arr.subset(TEST)
        rows[eid], extra = score_streaming(model, arr, cont, test)
        details[eid] = {**info, "test_trials": int(test.size), "context_bins": model.cfg.n_bins,
                        "lead_bins": receptive_bins(model, model.cfg.n_bins),
                        "grid_offset_max_s": extra["grid_offset_s"], "padded_bins": extra["padded_bins"]}
        report["timing"][f"{MODEL}_{eid}_s"] = time.perf_counter() - t0
        log.info("session %s: streaming NEDS scored on %s TEST trials", eid, test.size)
        for scheme in schemes:
            t0 = time.perf_counter()
            name = QUANTIZED_MODELS[scheme]
            quant_rows[scheme][eid], q = score_quantized(model, arr, cont, test, extra["decodes"],
                                                         run_dir(out, eid, f"{name}.onnx"), scheme)
            details[eid][scheme] = {k: v for k, v in q.items() if k != "decodes"}
            report["timing"][f"{name}_{eid}_s"] = time.perf_counter() - t0
    budget = (f"as many optimiser steps of {cfg.batch_size} continuous windows (a trial window long) as "
              f"{OFFLINE} takes of {cfg.batch_size} TRAIN trials ({cfg.epochs} epochs); no window touches a "
              "TEST trial window")
    meta = {"model": MODEL, "offline": OFFLINE, "rule": RULE, "budget": budget, "sessions": details}
    report = add_streaming_rows(report, rows, model=MODEL, info=meta)
    for scheme, by_session in quant_rows.items():
        report = add_model_rows(report, QUANTIZED_MODELS[scheme], by_session, note=(
            f"the streaming NEDS exported with {SCHEMES[scheme]['weights']} weights (neds-rt export "
            f"--quantize {scheme}) and run by the onnxruntime step engine over the same stretches"))
    return report
