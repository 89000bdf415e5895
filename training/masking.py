"""Multi-task masking (the paper's training signal) and the masked losses.

For each trial of a batch one scheme is drawn:

- ``ENCODING``: every spike token masked (predict spikes from behaviour);
- ``DECODING``: every behaviour token masked (predict behaviour from spikes);
- ``WITHIN``: one modality drawn at random, and a random ``ratio`` of its bins masked;
- ``CROSS``: the same random ``ratio`` of bins masked in every continuous modality (spikes, wheel, whisker).

Choice and block are one class repeated in every bin, so a partly masked discrete modality would leak its
answer through the visible bins: a discrete modality is always masked whole. In ``WITHIN`` it is masked whole
when drawn; in ``CROSS`` each discrete modality is masked whole with probability ``ratio``.

A mask is a (B, M, T) bool tensor, True = the token is hidden from the model and its loss counts. Losses are
computed on masked tokens only.

Wheel and whisker are min-max scaled per session, so their variance is small (~0.015) and a plain MSE is
tens of times smaller than the spike NLL and the cross-entropies. Training therefore divides each regression
MSE by the variance of that target over the session's training trials (:func:`target_variance`): a
normalised MSE, ``1 - R²`` in scale, whatever the scaling of the target.

The spike loss is the other way round: a Poisson NLL averaged over neurons and bins is mostly Poisson noise
no model can remove. At ~7 Hz and 20 ms bins a neuron's NLL is ~0.43 nats per bin, of which a good encoder
removes ~0.002 (0.02 bits/spike), against the ~0.7 of a normalised MSE that decoding removes. Summed with
weight 1, the behaviour losses shape the shared trunk alone and encoding barely leaves its mean-rate start,
so the total weights the spike loss by ``spike_weight`` (``TrainConfig.spike_weight``; see there for how
its default was chosen). The per-modality losses are returned unweighted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import IntEnum
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from neds_rt.errors import ConfigError, DataError, invalid
from training.arrays import SPLITS, TRAIN, TrialArrays
from training.model import BEHAVIOUR, BLOCK, CHOICE, DISCRETE, MODALITIES, N_MODALITIES, SPIKES, NEDSOutput
from training.model import trial_logits as _trial_logits

EVAL_KINDS: Final = ("encoding", "decoding")
REGRESSION: Final = ("wheel", "whisker")  # the continuous behaviour targets, normalised by their variance
VAR_FLOOR: Final = 1e-6  # smallest target variance used (a flat target would blow the loss up)


class Scheme(IntEnum):
    ENCODING = 0
    DECODING = 1
    WITHIN = 2
    CROSS = 3


ALL_SCHEMES: Final = tuple(Scheme)
_CONTINUOUS_ALL: Final = tuple(m for m in range(N_MODALITIES) if m not in DISCRETE)


def _random_bins(batch: int, n_bins: int, ratio: float, gen: torch.Generator) -> Tensor:
    """(B, T) bool with exactly max(1, round(ratio * T)) True bins per row, placed at random."""
    k = max(1, round(ratio * n_bins))
    scores = torch.rand(batch, n_bins, generator=gen)  # (B, T)
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, T) rank of each bin's score
    return rank < k


def draw_masks(
    batch: int,
    n_bins: int,
    ratio: float,
    gen: torch.Generator,
    schemes: tuple[Scheme, ...] = ALL_SCHEMES,
) -> tuple[Tensor, Tensor]:
    """Draw one scheme per trial: (mask (B, M, T) bool, scheme (B,) int64), on the CPU, from ``gen``."""
    if not 0.0 < ratio < 1.0:
        raise invalid("mask ratio", "must be in (0, 1)", ratio, "use 0.3, the default",
                      kind=ConfigError)
    if not schemes:
        raise invalid("schemes", "must name at least one masking scheme", schemes, kind=ConfigError)
    choice = torch.randint(len(schemes), (batch,), generator=gen)  # (B,) index into schemes
    scheme = torch.tensor([int(s) for s in schemes], dtype=torch.int64)[choice]  # (B,)
    bins = _random_bins(batch, n_bins, ratio, gen)  # (B, T)
    within_mod = torch.randint(N_MODALITIES, (batch,), generator=gen)  # (B,) modality for WITHIN
    discrete_hit = torch.rand(batch, len(DISCRETE), generator=gen) < ratio  # (B, 2) for CROSS
    mask = torch.zeros(batch, N_MODALITIES, n_bins, dtype=torch.bool)  # (B, M, T)
    for i in range(batch):
        s = int(scheme[i])
        if s == Scheme.ENCODING:
            mask[i, SPIKES] = True
        elif s == Scheme.DECODING:
            mask[i, list(BEHAVIOUR)] = True
        elif s == Scheme.WITHIN:
            m = int(within_mod[i])
            mask[i, m] = True if m in DISCRETE else bins[i]
        else:
            mask[i, list(_CONTINUOUS_ALL)] = bins[i]
            for j, m in enumerate(DISCRETE):
                mask[i, m] = bool(discrete_hit[i, j])
    return mask, scheme


def drop_units(spikes: Tensor, p: float, gen: torch.Generator) -> Tensor:
    """Unit dropout of the model's spike input (B, T, N): in each trial a random share ``p`` of the units is
    zeroed in every bin and the rest scaled by ``1 / (1 - p)``, so the expected input is unchanged. Only the
    input: the spike loss still scores every unit against its true counts. ``p = 0`` returns ``spikes`` and
    draws nothing from ``gen``. (See ``TrainConfig.unit_dropout``.)"""
    if not 0.0 <= p < 1.0:
        raise invalid("unit dropout", "must be in [0, 1)", p, "use 0 to switch it off", kind=ConfigError)
    if p == 0.0:
        return spikes
    b, _, n = spikes.shape
    keep = torch.rand(b, 1, n, generator=gen) >= p  # (B, 1, N) on the CPU, like the masks
    return spikes * keep.to(device=spikes.device, dtype=spikes.dtype) / (1.0 - p)  # (B, T, N)


def eval_mask(kind: str, batch: int, n_bins: int) -> Tensor:
    """Evaluation mask (B, M, T): ``encoding`` hides all spikes; ``decoding`` hides all behaviour."""
    if kind not in EVAL_KINDS:
        raise invalid("evaluation mask", f"must be one of {EVAL_KINDS}", kind, kind=ConfigError)
    mask = torch.zeros(batch, N_MODALITIES, n_bins, dtype=torch.bool)
    if kind == "encoding":
        mask[:, SPIKES] = True
    else:
        mask[:, list(BEHAVIOUR)] = True
    return mask


def target_variance(arr: TrialArrays, split: int = TRAIN, floor: float = VAR_FLOOR) -> dict[str, float]:
    """Variance of each scaled regression target (``wheel``, ``whisker``) over all bins of one session's
    ``split`` trials, floored at ``floor``: the ``target_var`` of :func:`masked_losses` for that session.
    Non-finite bins are left out here (the training step names the trials that hold them)."""
    rows = arr.subset(split)  # (K_split,)
    if rows.size == 0:
        raise invalid(f"session {arr.eid}", f"has no trial in the {SPLITS[split]!r} split to take the "
                      "behaviour variance from", 0, "check the split fractions", kind=DataError)
    var: dict[str, float] = {}
    for name in REGRESSION:
        x = np.asarray(getattr(arr, name)[rows], dtype=np.float64)  # (K_split, T) scaled target
        x = x[np.isfinite(x)]  # (n,) finite bins
        if x.size == 0:
            raise invalid(f"session {arr.eid} {name}", f"has no finite value in the {SPLITS[split]!r} split",
                          rows.size, "rebuild the arrays; trials with NaN behaviour should be dropped",
                          kind=DataError)
        var[name] = max(float(x.var()), floor)
    return var


def _check_target_var(target_var: Mapping[str, float]) -> None:
    for name in REGRESSION:
        v = target_var.get(name)
        if v is None or not (math.isfinite(v) and v > 0):
            raise invalid(f"target_var[{name!r}]", "must be a finite variance > 0", v,
                          "compute it with target_variance(arrays) on the session's training trials",
                          kind=ConfigError)


def masked_losses(
    out: NEDSOutput,
    spikes: Tensor,
    wheel: Tensor,
    whisker: Tensor,
    choice: Tensor,
    block: Tensor,
    mask: Tensor,
    target_var: Mapping[str, float] | None = None,
    spike_weight: float = 1.0,
) -> dict[str, Tensor]:
    """Per-modality mean loss over masked tokens, plus ``total`` (their sum, the spike loss times
    ``spike_weight``); modalities with nothing masked are left out. Spikes: Poisson NLL of log-rates;
    wheel/whisker: MSE, divided by ``target_var[name]`` when given (the session's training variance of that
    target, see :func:`target_variance`: a normalised MSE); choice/block: cross-entropy of the trial logits
    (mean of per-bin logits) over trials whose modality is masked, or, for per-bin (B, T) labels, of the
    per-bin logits over masked bins that have a label."""
    if target_var is not None:
        _check_target_var(target_var)
    losses: dict[str, Tensor] = {}
    m_spk = mask[:, SPIKES]  # (B, T)
    if m_spk.any():
        # (B, T, N) Poisson negative log-likelihood of the counts, without the log k! term
        nll = F.poisson_nll_loss(out.spikes, spikes, log_input=True, full=False, reduction="none")
        losses["spikes"] = nll[m_spk].mean()
    for idx, pred, true in ((1, out.wheel, wheel), (2, out.whisker, whisker)):
        m = mask[:, idx]  # (B, T)
        if m.any():
            name = MODALITIES[idx]
            mse = F.mse_loss(pred[m], true[m])  # () mean over masked bins
            losses[name] = mse if target_var is None else mse / target_var[name]
    for idx, logits, labels in ((CHOICE, out.choice, choice), (BLOCK, out.block, block)):
        if labels.dim() == 2:  # per-bin labels (continuous windows): per-bin logits, -1 bins ignored
            m = mask[:, idx] & (labels >= 0)  # (B, T)
            if m.any():
                losses[MODALITIES[idx]] = F.cross_entropy(logits[m], labels[m])
            continue
        rows = mask[:, idx].any(dim=1)  # (B,) trials whose class is hidden
        if rows.any():
            losses[MODALITIES[idx]] = F.cross_entropy(_trial_logits(logits)[rows], labels[rows])
    if not losses:
        raise invalid("mask", "hides no token, so there is no loss", tuple(mask.shape),
                      "draw masks with draw_masks or eval_mask", kind=ConfigError)
    if not spike_weight > 0:
        raise invalid("spike_weight", "must be > 0", spike_weight, kind=ConfigError)
    weighted = [v * spike_weight if k == "spikes" else v for k, v in losses.items()]
    losses["total"] = torch.stack(weighted).sum()
    return losses
