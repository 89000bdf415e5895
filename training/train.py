"""Training NEDS: single-session, multi-session pretraining, fine-tuning on a held-out session, resume, DDP.

- AdamW with a one-cycle schedule (linear warm-up, then cosine down to ``final_lr_frac`` of the peak);
- one session per step; multi-task masks drawn per trial (:mod:`training.masking`);
- wheel/whisker MSE divided by the session's training variance of each (a normalised MSE, on the scale of the
  other losses), the stored min-max normalisation unchanged; the spike NLL weighted by
  ``TrainConfig.spike_weight`` (see :mod:`training.masking`);
- after each epoch (rank 0): validation metrics with the evaluation masks (encoding -> bits/spike, decoding ->
  wheel R², whisker R², choice and block balanced accuracy), their average is the model-selection score
  (the encoding-only and decoding-only variants average their own task's metrics alone), and
  the masked validation loss; ``best.pt`` keeps the best score, ``last.pt`` the latest state (for resume;
  also every ``TrainConfig.checkpoint_minutes`` inside an epoch, and a run resumed from there continues at the
  next batch with the random streams it stopped in); ``metrics.json`` the history (an epoch that
  ``max_steps`` cut short is recorded with ``"partial"``: the batches done and the epoch's count).
- at the end (``TrainConfig.refit_class_heads``, runs on trial windows that train the class heads): the
  choice and block heads of ``best.pt`` are refitted by logistic regression on its frozen TRAIN features
  (:mod:`training.refit`);
  what was done is recorded in ``best.pt`` (``extra["class_head_refit"]``) and ``metrics.json``.
- Fine-tuning (``finetune_from``) keeps the checkpoint's shared transformer and embeddings and builds new
  stitching layers, session embedding and heads for the sessions trained on. It drops 30 % of the units from
  each trial's spike input by default (``TrainConfig.unit_dropout``, :func:`training.masking.drop_units`).
  ``TrainConfig.frozen_epochs`` trains the sessions' own layers alone, the shared ones frozen, for that many
  epochs first.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from neds_rt.errors import ConfigError, DataError, invalid
from training import metrics as _metrics
from training.arrays import N_BLOCK, N_CHOICE, SPLITS, TRAIN, VAL, TrialArrays
from training.checkpoint import build_model as model_from_checkpoint
from training.checkpoint import (
    check_vocab,
    config_of,
    load_state_checked,
    read_checkpoint,
    save_checkpoint,
    sessions_of,
    vocab_from_arrays,
)
from training.config import SPIKE_WEIGHT, NEDSConfig, TrainConfig
from training.distributed import (
    DistInfo,
    all_mean,
    barrier,
    broadcast_flag,
    gather_objects,
    init_distributed,
    shutdown,
    wrap,
)
from training.loader import Batch, check_splits, iter_batches, make_batch, plan_epoch
from training.masking import Scheme, draw_masks, drop_units, eval_mask, masked_losses, target_variance
from training.model import NEDS, SessionModules, count_parameters, trial_logits
from training.refit import HeadRefit, refit_class_heads, refittable

log = logging.getLogger(__name__)

METRIC_NAMES: Final = ("bits_per_spike", "wheel_r2", "whisker_r2", "choice_bacc", "block_bacc")
ENCODING_METRICS: Final = METRIC_NAMES[:1]
DECODING_METRICS: Final = METRIC_NAMES[1:]


def scored_metrics(schemes: Sequence[str]) -> tuple[str, ...]:
    """The metrics whose mean selects the checkpoint of a run that draws ``schemes``: the encoding-only and
    decoding-only variants are scored on their own task, not on heads they never train."""
    if tuple(schemes) == ("encoding",):
        return ENCODING_METRICS
    if tuple(schemes) == ("decoding",):
        return DECODING_METRICS
    return METRIC_NAMES


@dataclass
class TrainResult:
    out: Path
    model: NEDS
    best_score: float
    best_epoch: int
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    trials_per_s: float = float("nan")
    class_head_refit: list[HeadRefit] = field(default_factory=list)  # what the refit of best.pt did


# ---- schedule and model --------------------------------------------------------------------------
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """One-cycle learning rate of ``step`` (0-based) out of ``total``: linear warm-up, then cosine decay."""
    total = max(total, 1)
    warm = max(1, round(cfg.warmup_frac * total)) if cfg.warmup_frac > 0 else 0
    low = cfg.lr * cfg.final_lr_frac
    if step < warm:
        return low + (cfg.lr - low) * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_model(cfg: NEDSConfig, arrays: Mapping[str, TrialArrays], seed: int = 0) -> NEDS:
    """A fresh NEDS with one set of session layers per session of ``arrays`` (seeded: same on every rank),
    every output head started at that session's null model (see :func:`init_heads`)."""
    torch.manual_seed(seed)
    model = NEDS(cfg)
    for eid in sorted(arrays):
        arr = arrays[eid]
        init_heads(model.add_session(eid, arr.n_units, vocab_from_arrays(arr)), arr)
    return model


@torch.no_grad()
def init_heads(mods: SessionModules, arr: TrialArrays) -> None:
    """Start every output head of a session at its null model, from the session's TRAIN trials.

    Weights are zero and biases are: the log mean count per bin of each unit (spikes), the mean scaled wheel
    speed and whisker energy (regression), the log class frequencies of choice and block. The untrained model
    then predicts what a constant predictor would (bits/spike 0, R² 0, the class prior) instead of random
    outputs tens of target variances away, which the first hundreds of steps would otherwise spend undoing;
    the first update makes the weights non-zero, so gradients reach the transformer from the second step.
    """
    rows = arr.subset(TRAIN)
    if rows.size == 0:
        return
    spikes = arr.spikes[rows].mean(axis=(0, 1), dtype=np.float64)  # (N,) mean count per bin
    biases: list[tuple[nn.Linear, np.ndarray]] = [(mods.spikes_out, np.log(np.maximum(spikes, 1e-3)))]
    for head, x in ((mods.wheel_out, arr.wheel[rows]), (mods.whisker_out, arr.whisker[rows])):
        finite = x[np.isfinite(x)]  # NaN bins are named by the training step, not here
        biases.append((head, np.array([finite.mean() if finite.size else 0.0])))
    classes = ((mods.choice_out, arr.choice[rows], N_CHOICE), (mods.block_out, arr.block[rows], N_BLOCK))
    for head, labels, n in classes:
        counts = np.bincount(labels[(labels >= 0) & (labels < n)], minlength=n)[:n]  # (C,)
        biases.append((head, np.log((counts + 1.0) / (counts.sum() + n))))  # add-one smoothed log prior
    for head, bias in biases:
        head.weight.zero_()
        head.bias.copy_(torch.from_numpy(bias).to(head.bias))


def _as_mapping(arrays: Mapping[str, TrialArrays] | Sequence[TrialArrays]) -> dict[str, TrialArrays]:
    items = list(arrays.values()) if isinstance(arrays, Mapping) else list(arrays)
    if not items:
        raise invalid("sessions", "must hold at least one session to train on", 0,
                      "pass --sessions EID,... or --sessions all with a cache that has sessions",
                      kind=DataError)
    out: dict[str, TrialArrays] = {}
    for arr in items:
        if arr.eid in out:
            raise invalid("sessions", "must not list a session twice", arr.eid, kind=DataError)
        out[arr.eid] = arr
    return out


def _check_bins(cfg: NEDSConfig, arrays: Mapping[str, TrialArrays]) -> None:
    for eid, arr in arrays.items():
        if arr.n_bins != cfg.n_bins:
            raise invalid(f"session {eid}", f"has {arr.n_bins} bins per trial but the model has "
                          f"n_bins={cfg.n_bins}", None,
                          f"build the arrays with {cfg.n_bins} bins or set NEDSConfig.n_bins",
                          kind=DataError)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name and "mask_token" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _finetune_model(
    path: Path, arrays: Mapping[str, TrialArrays], model_cfg: NEDSConfig | None, mask_ratio: float | None,
    seed: int,
) -> NEDS:
    """Shared weights from the checkpoint, new session layers for ``arrays``' sessions.

    The mask ratio stays the pretraining one unless ``mask_ratio`` is given. The 0.1 we first used for
    fine-tuning made the multi-session model worse than a single-session one. Our reading: with nine bins in
    ten visible, the within-modality and cross-modal masks are largely solved from neighbouring bins and the
    visible wheel, so half the fine-tuning signal stops teaching decoding from spikes. On the quick quality
    benchmark (4 pretraining sessions, tiny NEDS, 60 fine-tuning epochs, two seeds) the VAL score rose from
    0.356 / 0.382 at 0.1 to 0.445 / 0.438 at 0.3, with VAL wheel R² 0.73 against 0.45 single-session.
    """
    ckpt = read_checkpoint(path)
    cfg = model_cfg or config_of(ckpt, path)
    if mask_ratio is not None:
        cfg = replace(cfg, mask_ratio=mask_ratio)
    model = build_model(cfg, arrays, seed)
    load_state_checked(model, ckpt["state_dict"], path, skip=("sessions.",))
    log.info("fine-tuning from %s: shared weights kept, session layers rebuilt for %s", path, sorted(arrays))
    return model


def _resume_model(
    path: Path, arrays: Mapping[str, TrialArrays], model_cfg: NEDSConfig | None
) -> tuple[NEDS, dict[str, Any]]:
    ckpt = read_checkpoint(path)
    cfg = model_cfg or config_of(ckpt, path)
    vocabs = {v.eid: v for v in sessions_of(ckpt)}
    for eid, arr in arrays.items():
        if eid not in vocabs:
            raise invalid(f"session {eid}", f"is not in checkpoint {path}", sorted(vocabs),
                          "resume with the sessions the run started with", kind=DataError)
        check_vocab(vocabs[eid], arr, path)
    model = NEDS(cfg)
    for eid in sorted(vocabs):
        model.add_session(eid, vocabs[eid].n_units, vocabs[eid])
    load_state_checked(model, ckpt["state_dict"], path)
    return model, ckpt


# ---- evaluation ----------------------------------------------------------------------------------
def _model_of(model: nn.Module) -> NEDS:
    inner = getattr(model, "module", model)
    assert isinstance(inner, NEDS)
    return inner


def _forward(model: nn.Module, batch: Batch, mask: torch.Tensor, spikes: torch.Tensor | None = None) -> Any:
    """The model on ``batch`` under ``mask``; ``spikes`` replaces the batch's counts as the input."""
    seen = batch.spikes if spikes is None else spikes
    return model(batch.eid, seen, batch.wheel, batch.whisker, batch.choice, batch.block, mask)


def _safe(fn: Any, *args: Any, **kwargs: Any) -> float:
    """A metric, or NaN when it is undefined on this data (e.g. a constant target)."""
    try:
        return float(fn(*args, **kwargs))
    except DataError as err:
        log.debug("metric %s undefined: %s", getattr(fn, "__name__", fn), err)
        return float("nan")


def _class_pred(per_bin_logits: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Predicted classes: per trial (B,) from the mean logits, or per bin (B, T) when labels are per bin."""
    logits = per_bin_logits if labels.ndim == 2 else trial_logits(per_bin_logits)
    return np.asarray(logits.argmax(-1).cpu().numpy())


def _labelled_bacc(pred: np.ndarray, true: np.ndarray) -> float:
    """Balanced accuracy over the samples that have a label (per-bin labels use -1 for none)."""
    keep = true >= 0
    return float(_metrics.balanced_accuracy(pred[keep], true[keep]))


@torch.no_grad()
def evaluate_session(
    model: NEDS, arr: TrialArrays, split: int = VAL, batch_size: int = 32, device: torch.device | str = "cpu",
    scored: Sequence[str] = METRIC_NAMES,
) -> dict[str, float]:
    """The paper's metrics on one session's ``split``: encoding mask -> bits/spike; decoding mask -> wheel and
    whisker R², choice and block balanced accuracy; ``score`` = the mean of the ``scored`` ones (NaN metrics
    left out)."""
    rows = arr.subset(split)
    if rows.size == 0:
        raise invalid(f"session {arr.eid}", f"has no trial in the {SPLITS[split]!r} split", 0,
                      "check the split fractions", kind=DataError)
    was_training = model.training
    model.eval()
    log_rates, wheel, whisker, choice, block = [], [], [], [], []
    for start in range(0, rows.size, batch_size):
        batch = make_batch(arr, rows[start : start + batch_size], device)
        b, t = batch.size, batch.spikes.shape[1]
        enc = _forward(model, batch, eval_mask("encoding", b, t).to(device))
        dec = _forward(model, batch, eval_mask("decoding", b, t).to(device))
        log_rates.append(enc.spikes.cpu().numpy())  # (B, T, N)
        wheel.append(dec.wheel.cpu().numpy())  # (B, T)
        whisker.append(dec.whisker.cpu().numpy())  # (B, T)
        choice.append(_class_pred(dec.choice, arr.choice))  # (B,) per trial or (B, T) per bin
        block.append(_class_pred(dec.block, arr.block))
    model.train(was_training)
    train_rows = arr.subset(TRAIN)
    null = arr.spikes[train_rows].mean(axis=(0, 1)) if train_rows.size else None  # (N,) mean count per bin
    counts = arr.spikes[rows]  # (K, T, N)
    result = {
        "bits_per_spike": _safe(_metrics.bits_per_spike_from_log, np.concatenate(log_rates), counts,
                                null_rates=null),
        "wheel_r2": _safe(_metrics.r2, np.concatenate(wheel), arr.wheel[rows]),
        "whisker_r2": _safe(_metrics.r2, np.concatenate(whisker), arr.whisker[rows]),
        "choice_bacc": _safe(_labelled_bacc, np.concatenate(choice), arr.choice[rows]),
        "block_bacc": _safe(_labelled_bacc, np.concatenate(block), arr.block[rows]),
    }
    values = [result[k] for k in scored if math.isfinite(result[k])]
    result["score"] = float(np.mean(values)) if values else float("nan")
    return result


@torch.no_grad()
def masked_eval_loss(
    model: NEDS,
    arrays: Mapping[str, TrialArrays],
    split: int = VAL,
    ratio: float | None = None,
    seed: int = 1234,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    spike_weight: float = SPIKE_WEIGHT,
) -> float:
    """Mean multi-task masked loss over ``split`` trials with masks from a fixed seed (comparable across
    checkpoints): the held-out version of the training objective (wheel/whisker MSE normalised by each
    session's training variance, the spike loss weighted by ``spike_weight``)."""
    gen = torch.Generator().manual_seed(seed)
    ratio = model.cfg.mask_ratio if ratio is None else ratio
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for eid in sorted(arrays):
        arr = arrays[eid]
        rows = arr.subset(split)
        target_var = target_variance(arr)  # from the training trials, as in training
        for start in range(0, rows.size, batch_size):
            batch = make_batch(arr, rows[start : start + batch_size], device)
            mask, _ = draw_masks(batch.size, batch.spikes.shape[1], ratio, gen)
            out = _forward(model, batch, mask.to(device))
            loss = masked_losses(out, batch.spikes, batch.wheel, batch.whisker, batch.choice, batch.block,
                                 mask.to(device), target_var, spike_weight)["total"]
            total += float(loss) * batch.size
            n += batch.size
    model.train(was_training)
    if n == 0:
        raise invalid("sessions", f"have no trial in the {SPLITS[split]!r} split", 0, kind=DataError)
    return total / n


def evaluate(
    model: NEDS, arrays: Mapping[str, TrialArrays], split: int = VAL, batch_size: int = 32,
    device: torch.device | str = "cpu", scored: Sequence[str] = METRIC_NAMES,
) -> dict[str, Any]:
    """Per-session metrics, their means over sessions, and ``score`` (the model-selection figure: the mean
    of the ``scored`` metrics)."""
    per = {eid: evaluate_session(model, arrays[eid], split, batch_size, device, scored)
           for eid in sorted(arrays)}
    mean: dict[str, float] = {}
    for k in (*METRIC_NAMES, "score"):
        vals = [m[k] for m in per.values() if math.isfinite(m[k])]
        mean[k] = float(np.mean(vals)) if vals else float("nan")
    return {"sessions": per, "mean": mean, "score": mean["score"]}


# ---- training ------------------------------------------------------------------------------------
def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True, leave=False)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, Path):
        return str(x)
    return x


def read_metrics(path: Path) -> dict[str, Any]:
    """A run's ``metrics.json``; an unreadable one is an error that names the file."""
    try:
        done = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise invalid(str(path), "is not a readable metrics file", str(err),
                      "remove the run's folder and train it again", kind=DataError) from err
    if not isinstance(done, dict):
        raise invalid(str(path), "must hold a JSON object", type(done).__name__,
                      "remove the run's folder and train it again", kind=DataError)
    return done


def _write_metrics(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False))
    tmp.replace(path)


def _redraw(data: Mapping[str, TrialArrays], plan: list[tuple[str, np.ndarray]], mask_ratio: float,
            gen: torch.Generator, schemes: tuple[Scheme, ...], unit_dropout: float) -> None:
    """Draw from ``gen``, and discard, what the steps of ``plan`` drew (their masks and unit dropout): a run
    resumed inside an epoch then continues with the random stream it stopped in."""
    for eid, rows in plan:
        n_bins, n_units = data[eid].spikes.shape[1:]
        draw_masks(len(rows), n_bins, mask_ratio, gen, schemes)
        drop_units(torch.zeros(len(rows), 1, n_units), unit_dropout, gen)


def _rng_state(device: torch.device, info: DistInfo) -> dict[str, Any]:
    """torch's global random state (the transformer's dropout draws from it), for a checkpoint a run resumes
    from. Under DDP each rank has its own: every rank calls this (a collective) and the state holds them all,
    in rank order, under ``ranks``."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return {"ranks": gather_objects(state, info)} if info.world > 1 else state


def _restore_rng(state: dict[str, Any] | None, device: torch.device, info: DistInfo) -> None:
    """Put back :func:`_rng_state`'s state (this rank's, under DDP), when the checkpoint has one saved by as
    many processes as this run has; otherwise dropout draws anew, and the resumed run is not bit for bit the
    one it continues."""
    if not state:
        return
    saved_world = len(state["ranks"]) if "ranks" in state else 1
    if saved_world != info.world:
        if info.is_main:
            log.warning("the checkpoint's random state is from %s process(es), this run has %s: dropout "
                        "draws anew", saved_world, info.world)
        return
    mine = state["ranks"][info.rank] if "ranks" in state else state
    torch.set_rng_state(mine["cpu"])
    if device.type == "cuda" and "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], device)


def _nan_error(what: str, step: int, batch: Batch, value: float) -> DataError:
    return invalid(
        what, f"is not finite at step {step} on session {batch.eid}, trials {batch.trial_index.tolist()} "
        f"(array rows {batch.rows.tolist()})", value,
        "check those trials for NaN/inf inputs, or lower --lr; training stopped", kind=DataError,
    )


def train(
    arrays: Mapping[str, TrialArrays] | Sequence[TrialArrays],
    out: Path | str,
    model_cfg: NEDSConfig | None = None,
    train_cfg: TrainConfig | None = None,
    *,
    finetune_from: Path | str | None = None,
    mask_ratio: float | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train on ``arrays`` (one or many sessions) and write ``best.pt``, ``last.pt`` and ``metrics.json`` to
    ``out``. Under torchrun (WORLD_SIZE > 1) it runs DistributedDataParallel; rank 0 evaluates and writes.

    ``finetune_from``: keep that checkpoint's shared weights, rebuild the sessions' own layers (the
    checkpoint's mask ratio unless ``mask_ratio``). ``resume``: continue from ``out/last.pt`` (optimizer,
    step and epoch).
    """
    tcfg = train_cfg or TrainConfig()
    data = _as_mapping(arrays)
    out = Path(out)
    check_splits(data, (TRAIN, VAL))
    if resume and finetune_from is not None:
        raise invalid("--resume", "cannot be combined with --finetune-from", str(finetune_from),
                      "resume a fine-tuning run by passing only --resume and its --out", kind=ConfigError)
    info = init_distributed(tcfg.device)
    try:
        return _train(data, out, model_cfg, tcfg, info, finetune_from, mask_ratio, resume)
    finally:
        shutdown(info)


def _train(
    data: dict[str, TrialArrays],
    out: Path,
    model_cfg: NEDSConfig | None,
    tcfg: TrainConfig,
    info: DistInfo,
    finetune_from: Path | str | None,
    mask_ratio: float | None,
    resume: bool,
) -> TrainResult:
    ckpt: dict[str, Any] | None = None
    if resume:
        model, ckpt = _resume_model(out / "last.pt", data, model_cfg)
        before = out / "metrics.json"  # a resumed fine-tuning run still records where it started from
        finetune_from = read_metrics(before).get("finetune_from") if before.exists() else None
    elif finetune_from is not None:
        model = _finetune_model(Path(finetune_from), data, model_cfg, mask_ratio, tcfg.seed)
    else:
        cfg = model_cfg or NEDSConfig.preset("default", n_sessions=len(data))
        if mask_ratio is not None:
            cfg = replace(cfg, mask_ratio=mask_ratio)
        model = build_model(cfg, data, tcfg.seed)
    cfg = model.cfg
    _check_bins(cfg, data)
    unit_dropout = tcfg.unit_dropout_for(finetuning=finetune_from is not None)
    if tcfg.frozen_epochs and finetune_from is None:
        raise invalid("TrainConfig.frozen_epochs", "freezes pretrained shared layers, so it needs "
                      "finetune_from", tcfg.frozen_epochs, "fine-tune from a checkpoint, or leave it at 0",
                      kind=ConfigError)
    shared = list(model.shared_parameters().values())
    device = info.device
    model.to(device)
    net = wrap(model, info)
    if info.world > 1:  # each rank its own dropout draws (the weights stay equal: DDP averages the gradients)
        torch.manual_seed(tcfg.seed * 7919 + 15485863 * (info.rank + 1))
    opt = _optimizer(model, tcfg)
    steps_per_epoch = len(plan_epoch(data, TRAIN, tcfg.batch_size, tcfg.seed, 0, info.rank, info.world))
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps)
    step, start_epoch, best_score, best_epoch = 0, 0, -math.inf, -1
    history: list[dict[str, Any]] = []
    within: dict[str, Any] = {}  # where in its epoch a run saved inside an epoch stopped
    if ckpt is not None:
        if ckpt.get("optimizer") is not None:
            opt.load_state_dict(ckpt["optimizer"])
        step, start_epoch = int(ckpt["step"]), int(ckpt["epoch"])
        best_score = ckpt["best_score"] if ckpt["best_score"] is not None else -math.inf
        history = list(ckpt.get("extra", {}).get("history", []))
        best_epoch = int(ckpt.get("extra", {}).get("best_epoch", -1))
        within = dict(ckpt.get("extra", {}).get("within_epoch") or {})
        _restore_rng(ckpt.get("extra", {}).get("rng"), device, info)
        log.info("resuming %s at epoch %s, step %s%s", out, start_epoch, step,
                 f", batch {within['batches']} of the epoch" if within else "")
    n_params = count_parameters(model)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log.info("training %s sessions, %s parameters, %s steps/epoch x %s epochs on %s (world %s), unit "
                 "dropout %s, shared layers frozen for %s epochs", len(data), n_params, steps_per_epoch,
                 tcfg.epochs, device, info.world, unit_dropout, tcfg.frozen_epochs)
    gen = torch.Generator().manual_seed(tcfg.seed * 7919 + info.rank + 1)
    schemes = tuple(Scheme[name.upper()] for name in tcfg.schemes)  # masking schemes drawn
    # each session's training variance of wheel/whisker: their MSE becomes scale-free, like the other losses
    target_var = {eid: target_variance(arr) for eid, arr in data.items()}
    step_time, trials_seen = 0.0, 0
    saved_at = time.monotonic()  # of the last save inside an epoch (TrainConfig.checkpoint_minutes)

    def save_last(epochs_done: int, rng: dict[str, Any]) -> None:
        """Write ``last.pt``, the checkpoint a run resumes from, at the loop's state now: with every rank's
        random state and, while the current epoch is unfinished (``epochs_done == epoch``), where in it the
        run is, so a resumed run goes on at the next batch."""
        extra: dict[str, Any] = {"history": _jsonable(history), "best_epoch": best_epoch, "rng": rng}
        if epochs_done == epoch:
            extra["within_epoch"] = {"batches": done, "loss": epoch_loss, "trials": epoch_n}
        save_checkpoint(out / "last.pt", model, optimizer=opt, step=step, epoch=epochs_done,
                        best_score=best_score if best_epoch > 0 else None, train_config=asdict(tcfg),
                        extra=extra)

    net.train()
    for epoch in range(start_epoch, tcfg.epochs):
        if tcfg.max_steps and step >= tcfg.max_steps:
            break
        gen.manual_seed(tcfg.seed * 7919 + epoch * 104729 + info.rank + 1)
        plan = plan_epoch(data, TRAIN, tcfg.batch_size, tcfg.seed, epoch, info.rank, info.world)
        bar = _progress(len(plan), tcfg.progress and info.is_main, f"epoch {epoch + 1}/{tcfg.epochs}")
        epoch_loss, epoch_n, done = 0.0, 0, 0
        if within and epoch == start_epoch:  # resumed inside this epoch: its first batches are done
            done, epoch_loss, epoch_n = int(within["batches"]), float(within["loss"]), int(within["trials"])
            _redraw(data, plan[:done], cfg.mask_ratio, gen, schemes, unit_dropout)
            bar.update(done)
        for batch in iter_batches(data, plan[done:], device):
            if tcfg.max_steps and step >= tcfg.max_steps:
                break
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, tcfg)
            mask, _ = draw_masks(batch.size, batch.spikes.shape[1], cfg.mask_ratio, gen, schemes)
            mask = mask.to(device)  # (B, M, T)
            pred = _forward(net, batch, mask, drop_units(batch.spikes, unit_dropout, gen))
            losses = masked_losses(pred, batch.spikes, batch.wheel, batch.whisker, batch.choice, batch.block,
                                   mask, target_var[batch.eid], tcfg.spike_weight)  # every unit's counts
            loss = losses["total"]
            loss_value = all_mean(float(losses["total"].detach()), info)
            if not math.isfinite(loss_value):
                raise _nan_error("training loss", step, batch, loss_value)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if epoch < tcfg.frozen_epochs:  # frozen start: the sessions' own layers alone learn
                for p in shared:  # AdamW skips a parameter without a gradient, weight decay included
                    p.grad = None
            max_norm = tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            if not math.isfinite(grad_norm):
                raise _nan_error("gradient norm", step, batch, grad_norm)
            opt.step()
            step += 1
            step_time += time.perf_counter() - t0
            trials_seen += batch.size * info.world
            epoch_loss += loss_value * batch.size
            epoch_n += batch.size
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", trials_s=f"{trials_seen / max(step_time, 1e-9):.1f}")
            if tcfg.checkpoint_minutes and done < len(plan) and broadcast_flag(
                    time.monotonic() - saved_at >= 60.0 * tcfg.checkpoint_minutes, info):  # rank 0's clock
                rng = _rng_state(device, info)  # every rank's, under DDP
                if info.is_main:
                    save_last(epoch, rng)
                saved_at = time.monotonic()
        bar.close()
        completed = epoch + 1 if done == len(plan) else epoch  # epochs finished, for resume
        rng = _rng_state(device, info)  # every rank's, under DDP (evaluating draws nothing from it)
        if info.is_main:
            val_loss = masked_eval_loss(model, data, VAL, batch_size=tcfg.eval_batch_size, device=device,
                                        spike_weight=tcfg.spike_weight)
            record: dict[str, Any] = {
                "epoch": epoch + 1, "step": step, "lr": lr_at(max(step - 1, 0), total_steps, tcfg),
                "train_loss": epoch_loss / max(epoch_n, 1), "val_loss": val_loss,
                "val": evaluate(model, data, VAL, tcfg.eval_batch_size, device, scored_metrics(tcfg.schemes)),
            }
            if completed == epoch:  # max_steps stopped it: a resumed run records the whole epoch again
                record["partial"] = {"batches": done, "of": len(plan)}
            history.append(record)
            score = record["val"]["score"]
            is_best = math.isfinite(score) and score > best_score
            if is_best:
                best_score, best_epoch = score, epoch + 1
            if is_best or not (out / "best.pt").exists():
                save_checkpoint(out / "best.pt", model, optimizer=opt, step=step, epoch=completed,
                                best_score=best_score if best_epoch > 0 else None, train_config=asdict(tcfg),
                                extra={"history": _jsonable(history), "best_epoch": best_epoch})
            save_last(completed, rng)  # an epoch that max_steps stopped early is resumed at its next batch
            log.info("epoch %s: train loss %.4f, val loss %.4f, val score %.4f%s", epoch + 1,
                     record["train_loss"], record["val_loss"], score, " (best)" if is_best else "")
            _write_metrics(out / "metrics.json", {
                "sessions": sorted(data), "n_parameters": n_params, "world_size": info.world,
                "device": str(device), "model_config": asdict(cfg), "train_config": asdict(tcfg),
                "finetune_from": None if finetune_from is None else str(finetune_from),
                "unit_dropout": unit_dropout, "steps": step,
                "trials_per_s": trials_seen / step_time if step_time else None,
                "best": {"epoch": best_epoch, "score": best_score}, "history": history,
            })
        barrier(info)
    refits: list[HeadRefit] = []
    ended: dict[str, Any] = {"finished": True}  # every epoch (or max_steps), and the refit
    if info.is_main and tcfg.refit_class_heads and "choice_bacc" in scored_metrics(tcfg.schemes) \
            and any(refittable(arr) for arr in data.values()) and (out / "best.pt").exists():
        refits = _refit_best(out, data, tcfg, device)
        ended["class_head_refit"] = [asdict(r) for r in refits]
    metrics_path = out / "metrics.json"
    if info.is_main and metrics_path.exists():
        _write_metrics(metrics_path, {**read_metrics(metrics_path), **ended})
    return TrainResult(out=out, model=model, best_score=best_score, best_epoch=best_epoch, steps=step,
                       history=history, trials_per_s=trials_seen / step_time if step_time else float("nan"),
                       class_head_refit=refits)


def _refit_best(out: Path, data: Mapping[str, TrialArrays], tcfg: TrainConfig,
                device: torch.device) -> list[HeadRefit]:
    """Refit the class heads of ``out/best.pt`` (:mod:`training.refit`), rewrite it, and record what was done
    in it (the caller records it in ``metrics.json``). ``last.pt`` keeps the trained heads (resume continues
    from them)."""
    path = out / "best.pt"
    ckpt = read_checkpoint(path, device)
    best = model_from_checkpoint(ckpt, path).to(device)
    refits = refit_class_heads(best, data, batch_size=tcfg.eval_batch_size, device=device)
    record = [asdict(r) for r in refits]
    save_checkpoint(path, best, step=ckpt["step"], epoch=ckpt["epoch"], best_score=ckpt["best_score"],
                    train_config=ckpt["train_config"], extra={**ckpt["extra"], "class_head_refit": record})
    return refits


# settings that do not change what a run learns
_RUN_KEYS_IGNORED: Final = ("progress", "device", "eval_batch_size", "checkpoint_minutes")


def finished_run(out: Path | str, arrays: Mapping[str, TrialArrays], train_cfg: TrainConfig,
                 model_cfg: NEDSConfig | None = None, finetune_from: Path | str | None = None) -> bool:
    """True when ``out`` holds a run that ended (``metrics.json`` says ``finished``: every epoch and the
    refit) on these sessions with this configuration; False when it holds no run or one that did not end
    (resume it from ``last.pt``). A run made with another configuration is an error that names the
    difference."""
    path = Path(out) / "metrics.json"
    if not path.exists():
        return False
    done = read_metrics(path)
    want: dict[str, Any] = {"sessions": sorted(arrays), "train_config": _jsonable(asdict(train_cfg)),
                            "finetune_from": None if finetune_from is None else str(finetune_from)}
    if model_cfg is not None:
        want["model_config"] = _jsonable(asdict(model_cfg))
    for key, value in want.items():
        have = done.get(key)
        if key == "train_config" and isinstance(have, dict):
            have = {k: v for k, v in have.items() if k not in _RUN_KEYS_IGNORED}
            value = {k: v for k, v in value.items() if k not in _RUN_KEYS_IGNORED}
        if have != value:
            if isinstance(value, dict) and isinstance(have, dict):
                diff = f"{key}: " + ", ".join(
                    (f"{k}={have[k]!r}" if k in have else f"{k} not recorded") + f" (now {v!r})"
                    for k, v in value.items() if k not in have or have[k] != v)
            else:
                diff = f"{key}={have!r} (now {value!r})"
            raise invalid(f"run in {out}", "was made with another configuration", diff,
                          "remove that folder, or use another --out", kind=ConfigError)
    return bool(done.get("finished"))


def load_run_arrays(
    data_dir: Path | str,
    sessions: Sequence[str] | None = None,
    cache_root: Path | str | None = None,
    mode: str = "offline",
    seed: int = 0,
) -> dict[str, TrialArrays]:
    """Training arrays of ``sessions`` (all of the cache when None) from a ONE cache, through the array
    cache (``cache_root``, by default inside the ONE cache): trial-aligned windows for ``offline``,
    continuous windows cut anywhere for ``streaming``."""
    from streams.load import open_one
    from training.cache import load_arrays

    one = open_one(Path(data_dir))
    known = sorted(str(e) for e in one.search())
    wanted = list(sessions) if sessions else known
    unknown = [e for e in wanted if e not in known]
    if unknown:
        raise invalid("--sessions", f"names sessions that are not in the ONE cache {data_dir}", unknown,
                      f"pick from {known[:5]}{' ...' if len(known) > 5 else ''} or pass --sessions all",
                      kind=DataError)
    if not wanted:
        raise invalid(f"ONE cache {data_dir}", "holds no session", 0, "simulate or download sessions first",
                      kind=DataError)
    if mode == "streaming":
        from training.windows import build_window_arrays

        return {eid: build_window_arrays(load_arrays(one, eid, cache_root=cache_root)[1], seed=seed)
                for eid in wanted}
    return {eid: load_arrays(one, eid, cache_root=cache_root)[0] for eid in wanted}


def describe_model(model: NEDS) -> str:
    """One line: mode, sizes, sessions and parameter count."""
    c = model.cfg
    return (f"NEDS {c.mode}: hidden {c.hidden}, {c.heads} heads, MLP {c.mlp}, {c.layers} layers, "
            f"{len(model.eids)} sessions, {count_parameters(model):,} parameters")

