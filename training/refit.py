"""Refit the choice and block heads of a trained NEDS on its frozen features, by logistic regression.

Why. Trained jointly with the other tasks, the class heads underfit: on the 400-trial held-out session of
the README's "Decode quality" runs, single-session tiny NEDS predicts choice on only 0.68-0.71 of its own
TRAIN trials, while a logistic regression on the same model's features fits 0.75-0.85 of them and, over
three seeds, lifts TEST choice from 0.68 to 0.71 and block from 0.60 to 0.81. The class losses reach ~3/8 of
each batch's trials, so their gradients are mostly noise next to the other tasks' (see the README), and by
the end of the schedule the heads have not caught up with the features the trunk holds.

What. For each session and each class head, the states the head reads (:meth:`NEDS.class_state`, decoding
mask: every behaviour token hidden, as in evaluation and serving) are taken on the session's TRAIN and VAL
trials, and a trial's feature is its mean state over bins: the trial logits are the mean of the per-bin
logits, so the head applied per bin and averaged is exactly a linear read-out of that mean. Features are
z-scored on TRAIN; C (inverse L2 strength) is chosen by stratified k-fold cross-validation on the TRAIN
trials (balanced accuracy of the pooled out-of-fold predictions), and the logistic regression refitted on
all TRAIN trials with it replaces the head. VAL is not used: ``best.pt``
is already the epoch with the best VAL score, so VAL is biased in the trained head's favour (choice 0.82-0.90
there against 0.66-0.71 on TEST), and 40 VAL trials chose C too noisily for choice. VAL then scores the refit
without bias (:class:`HeadRefit`). The refit is mapped back to the raw features and written into the head's
``Linear``, so checkpoints, exports and the streaming runtime use it unchanged. Nothing else in the model
moves.

Only trial windows are refitted (:func:`refittable`). Sessions with per-bin labels (continuous windows, the
streaming model's training data) keep their trained heads: a per-bin refit fits tens of thousands of
correlated bins, which took 1-3.5 min per head for the demo's small model on this CPU (the demo went from
2.5 to 10 min), and on the quick benchmark it moved streaming choice only from 0.500 to 0.540.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from neds_rt.errors import DataError, invalid
from training.arrays import N_BLOCK, N_CHOICE, TRAIN, VAL, TrialArrays
from training.baselines import fit_logistic
from training.metrics import balanced_accuracy
from training.model import BLOCK, CHOICE, MODALITIES, NEDS
from training.states import decoding_states

log = logging.getLogger(__name__)

_ABSENT_LOGIT = -30.0  # bias of a class no TRAIN sample has: never predicted, still finite
REFIT_CS: Final = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2)  # inverse L2 strengths cross-validated on TRAIN


@dataclass
class HeadRefit:
    """What :func:`refit_class_heads` did to one head of one session."""

    eid: str
    head: str  # "choice" or "block"
    kept: str  # "refit" (the head was replaced) or "trained" (TRAIN holds fewer than 2 classes: kept)
    C: float | None  # inverse L2 strength chosen by cross-validation (None: the trained head was kept)
    val_bacc_trained: float  # VAL balanced accuracy of the trained head (biased up by epoch selection)
    val_bacc: float  # ... of the head kept (NaN: no VAL label)
    train_bacc: float  # TRAIN balanced accuracy of the head kept
    n_train: int  # labelled TRAIN trials
    cv_bacc: float = float("nan")  # cross-validated TRAIN balanced accuracy of the chosen C


def refittable(arr: TrialArrays) -> bool:
    """Whether :func:`refit_class_heads` refits a session: trial windows (one label per trial) only."""
    return arr.labels_per_trial


@torch.no_grad()
def class_states(
    model: NEDS, arr: TrialArrays, rows: np.ndarray, *, batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> dict[int, np.ndarray]:
    """Decoding-mask states each class head reads, averaged over the bins of each trial ``rows`` of one
    session: {CHOICE, BLOCK} -> (K, hidden)."""
    states: dict[int, list[np.ndarray]] = {CHOICE: [], BLOCK: []}
    for (h,) in decoding_states(model, arr, rows, batch_size=batch_size, device=device):  # (B, T, K, hidden)
        for modality, chunks in states.items():
            chunks.append(model.class_state(h, modality).mean(dim=1).float().cpu().numpy())  # (B, hidden)
    return {m: np.concatenate(chunks) for m, chunks in states.items()}


def _labelled(states: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, hidden) states, (K,) labels -> those of the trials with a label (>= 0), as float64 / int64."""
    y = np.asarray(labels).astype(np.int64)
    keep = y >= 0
    return states[keep].astype(np.float64), y[keep]


def select_c(x: np.ndarray, y: np.ndarray, *, Cs: Sequence[float], folds: int,
             max_iter: int) -> tuple[float, float]:
    """C of ``Cs`` with the best balanced accuracy of the pooled out-of-fold predictions of a stratified
    ``folds``-fold split of the (n, F) samples ``x``; ties go to the stronger penalty. Returns (C, its
    cross-validated balanced accuracy)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_folds = min(folds, int(y.size))
    if n_folds < 2:
        raise invalid("class head refit", "needs at least 2 labelled TRAIN trials to cross-validate C",
                      int(y.size), "train on a session with more TRAIN trials", kind=DataError)
    # one group per trial, the splits the README's figures were measured with: at ~100 TRAIN trials the C
    # chosen moves with the fold assignment (README, the quick benchmark)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=0)
    with warnings.catch_warnings():  # a class rarer than the folds are many only warns; its folds still work
        warnings.simplefilter("ignore", UserWarning)
        split = list(splitter.split(x, y, np.arange(y.size)))
    best: tuple[float, float] | None = None
    for c in sorted(Cs):
        pred = np.empty_like(y)
        for fit_rows, held in split:
            pred[held] = fit_logistic(x[fit_rows], y[fit_rows], c, max_iter).predict(x[held])
        score = balanced_accuracy(pred, y)
        if best is None or score > best[1]:
            best = (float(c), score)
    assert best is not None
    return best


def _predict(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.asarray((x @ weight.T + bias).argmax(axis=1))


def _raw_weights(
    fitted: Any, mu: np.ndarray, sd: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """A logistic regression fitted on (x - mu) / sd -> the head's (C, hidden) weight and (C,) bias on x."""
    classes = np.asarray(fitted.classes_)  # (C',) classes seen in TRAIN
    coef = np.asarray(fitted.coef_) / sd  # (1 or C', hidden) on the raw features
    icpt = np.asarray(fitted.intercept_) - coef @ mu  # (1 or C',)
    weight = np.zeros((n_classes, mu.size))
    bias = np.full(n_classes, _ABSENT_LOGIT)
    if classes.size == 2:  # sklearn keeps one row: the logit of classes[1] against classes[0]
        bias[classes] = 0.0
        weight[classes[1]], bias[classes[1]] = coef[0], icpt[0]
    else:
        weight[classes], bias[classes] = coef, icpt
    return weight, bias


def refit_head(
    head: nn.Linear,
    states: Mapping[int, np.ndarray],
    labels: Mapping[int, np.ndarray],
    n_classes: int,
    *,
    eid: str = "",
    name: str = "",
    Cs: Sequence[float] = REFIT_CS,
    folds: int = 5,
    max_iter: int = 2000,
) -> HeadRefit:
    """Refit one class ``head`` (``name`` of session ``eid``) in place from its (K, hidden) TRAIN ``states``
    and (K,) ``labels`` (VAL, when present, only scores it); kept as trained when TRAIN holds fewer than 2
    classes."""
    x_tr, y_tr = _labelled(states[TRAIN], labels[TRAIN])
    x_va, y_va = _labelled(states[VAL], labels[VAL])
    weight = head.weight.detach().double().cpu().numpy()  # (C, hidden)
    bias = head.bias.detach().double().cpu().numpy()  # (C,)
    val_trained = balanced_accuracy(_predict(x_va, weight, bias), y_va) if y_va.size else float("nan")
    train_trained = balanced_accuracy(_predict(x_tr, weight, bias), y_tr) if y_tr.size else float("nan")
    result = HeadRefit(eid=eid, head=name, kept="trained", C=None, val_bacc_trained=val_trained,
                       val_bacc=val_trained, train_bacc=train_trained, n_train=int(y_tr.size))
    if np.unique(y_tr).size < 2:  # no label or one TRAIN class: nothing to separate
        return result
    mu, sd = x_tr.mean(axis=0), x_tr.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)  # a constant feature gets weight 0 whatever its scale
    z_tr = (x_tr - mu) / sd
    c_best, cv_score = select_c(z_tr, y_tr, Cs=Cs, folds=folds, max_iter=max_iter)
    fitted = fit_logistic(z_tr, y_tr, c_best, max_iter)
    new_w, new_b = _raw_weights(fitted, mu, sd, n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(new_w).to(head.weight))
        head.bias.copy_(torch.from_numpy(new_b).to(head.bias))
    result.kept, result.C, result.cv_bacc = "refit", c_best, cv_score
    result.train_bacc = balanced_accuracy(_predict(x_tr, new_w, new_b), y_tr)
    if y_va.size:
        result.val_bacc = balanced_accuracy(_predict(x_va, new_w, new_b), y_va)
    return result


def refit_class_heads(
    model: NEDS,
    arrays: Mapping[str, TrialArrays],
    *,
    Cs: Sequence[float] = REFIT_CS,
    folds: int = 5,
    max_iter: int = 2000,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> list[HeadRefit]:
    """Refit the choice and block heads of every session of ``arrays`` with trial labels (see the module
    docstring; :func:`refittable`); the model is changed in place. Returns one :class:`HeadRefit` per
    refitted session and head."""
    report: list[HeadRefit] = []
    for eid in sorted(arrays):
        arr = arrays[eid]
        if not refittable(arr):
            log.info("class heads of %s: kept as trained (per-bin labels are not refitted)", eid)
            continue
        mods = model.session(eid)
        split_rows = {split: arr.subset(split) for split in (TRAIN, VAL)}
        per_split = {split: class_states(model, arr, rows, batch_size=batch_size, device=device)
                     for split, rows in split_rows.items()}
        for modality, head, labels, n_classes in ((CHOICE, mods.choice_out, arr.choice, N_CHOICE),
                                                  (BLOCK, mods.block_out, arr.block, N_BLOCK)):
            done = refit_head(head, {s: per_split[s][modality] for s in split_rows},
                              {s: labels[rows] for s, rows in split_rows.items()}, n_classes, eid=eid,
                              name=MODALITIES[modality], Cs=Cs, folds=folds, max_iter=max_iter)
            report.append(done)
            log.info("class head %s of %s: %s (VAL balanced accuracy %.3f -> %.3f, TRAIN %.3f)", done.head,
                     eid, done.kept, done.val_bacc_trained, done.val_bacc, done.train_bacc)
    return report
