"""Layer probes: how well each depth of a trained NEDS holds a session's choice and block.

Why. When NEDS decodes a trial label worse than the linear decoder, the question is where the label is lost:
in the session's stitching layer (the tokens as they enter), in a block, or in the read-out. On the README's
mid-size run ("Where in the network choice goes") the fine-tuned models lose 0.01-0.13 of choice inside the
transformer, which their stitched input holds, at a depth that moves with the fine-tuning seed.

What. The session's trial windows are run with the decoding mask (every behaviour token hidden, as in
evaluation and serving), and the states of chosen tokens are kept at every depth
(:meth:`NEDS.encode_layers`): as they enter, after each block, after the final LayerNorm. A trial's feature
is the linear decoder's own: the means of ``n_chunks`` consecutive stretches of the window
(:func:`training.baselines.chunk_means`). The linear decoder's logistic regression
(:func:`training.baselines.fit_trial_logistic`: z-scored on TRAIN, C chosen on VAL) is fitted on them, and
its TEST balanced accuracy is the probe's score. So a probe at a depth and the linear decoder on the spike
counts are the same read-out of different features.

Tokens probed: the spike token and the label's own token (per-modality layouts), or the bin's one token
(fused). A state that is the same in every TRAIN trial (a hidden token before the first block) carries
nothing and scores None, as does a label that the split cannot score (one class on TRAIN).
"""

from __future__ import annotations

import logging
from typing import Final

import numpy as np

from neds_rt.errors import DataError, invalid
from training.arrays import N_BLOCK, N_CHOICE, TRAIN, TrialArrays
from training.baselines import LinearConfig, chunk_means, fit_trial_logistic
from training.model import BLOCK, CHOICE, NEDS, SPIKES
from training.states import decoding_states

log = logging.getLogger(__name__)

TARGETS: Final = {"choice": N_CHOICE, "block": N_BLOCK}  # label probed (and its own token's name) -> classes
Scores = dict[str, dict[str, dict[str, float | None]]]  # label -> token -> depth -> TEST balanced accuracy


def depth_names(model: NEDS) -> list[str]:
    """Names of the depths :meth:`NEDS.encode_layers` returns: input, block 1..L, output."""
    return ["input", *(f"block {i + 1}" for i in range(len(model.blocks))), "output"]


def token_indices(model: NEDS) -> dict[str, int]:
    """Token name -> index within a bin's tokens: the spike and class tokens, or the fused bin token."""
    if model.cfg.fused:
        return {"bin": 0}
    return {"spike": SPIKES, "choice": CHOICE, "block": BLOCK}


def layer_features(model: NEDS, arr: TrialArrays, *, n_chunks: int, batch_size: int = 32
                   ) -> dict[str, dict[str, np.ndarray]]:
    """Decoding-mask states of every trial of one session (on the model's device): depth -> token ->
    (K, n_chunks * hidden) chunk means of that token's states over the trial window."""
    if not arr.labels_per_trial:
        raise invalid(f"session {arr.eid} labels", "must be one per trial window to probe", arr.choice.shape,
                      "probe trial windows, not continuous ones", kind=DataError)
    depths, tokens = depth_names(model), token_indices(model)
    parts: dict[str, dict[str, list[np.ndarray]]] = {d: {t: [] for t in tokens} for d in depths}
    for states in decoding_states(model, arr, np.arange(arr.spikes.shape[0]), batch_size=batch_size,
                                  every_depth=True):
        for depth, h in zip(depths, states, strict=True):  # h (B, T, K, hidden)
            for name, i in tokens.items():
                parts[depth][name].append(chunk_means(h[:, :, i].float().cpu().numpy(), n_chunks))
    return {d: {name: np.concatenate(p) for name, p in by_token.items()} for d, by_token in parts.items()}


def probe_layers(model: NEDS, arr: TrialArrays, config: LinearConfig | None = None) -> Scores:
    """TEST balanced accuracy of the linear decoder's logistic read-out of choice and block from each token's
    states at each depth of ``model`` on session ``arr`` (see the module doc)."""
    cfg = config or LinearConfig()
    feats = layer_features(model, arr, n_chunks=cfg.n_chunks)
    train_rows = arr.subset(TRAIN)
    out: Scores = {}
    for label, n_classes in TARGETS.items():
        y = np.asarray(getattr(arr, label))
        scores: dict[str, dict[str, float | None]] = {n: {} for n in (["bin"] if model.cfg.fused else
                                                                      ["spike", label])}
        try:
            for name, by_depth in scores.items():
                for depth, by_token in feats.items():
                    f = by_token[name]  # (K, n_chunks * hidden)
                    if not np.any(np.ptp(f[train_rows], axis=0) > 0):
                        by_depth[depth] = None  # the same state in every TRAIN trial: nothing to read
                        continue
                    res = fit_trial_logistic(f, {label: (y, n_classes)}, arr.split, Cs=cfg.Cs,
                                             max_iter=cfg.max_iter)[label]
                    by_depth[depth] = float(res.balanced_accuracy)
        except DataError as err:  # e.g. one class on TRAIN: no read-out can learn the label
            log.warning("session %s: no %s probes (%s)", arr.eid, label, err)
            scores = {name: dict.fromkeys(feats, None) for name in scores}
        out[label] = scores
    return out
