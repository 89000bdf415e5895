"""Hidden states of a session's trial windows under the decoding mask, batch by batch.

The decoding mask hides every behaviour token, as evaluation and serving do. The class-head refit
(:mod:`training.refit`) reads the final states; the layer probes (:mod:`training.probes`) read every depth.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from training.arrays import TrialArrays
from training.loader import make_batch
from training.masking import eval_mask
from training.model import NEDS


@torch.no_grad()
def decoding_states(model: NEDS, arr: TrialArrays, rows: np.ndarray, *, batch_size: int = 32,
                    device: torch.device | str | None = None, every_depth: bool = False
                    ) -> Iterator[list[Tensor]]:
    """For each batch of ``rows`` of session ``arr``, in order: the states (B, T, K, hidden) at every depth of
    :meth:`NEDS.encode_layers` (``every_depth``), or the final ones alone (a list of one). The model runs in
    eval mode (its mode is restored after) on ``device``, by default its own."""
    device = next(model.parameters()).device if device is None else device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, rows.size, batch_size):
            batch = make_batch(arr, rows[start : start + batch_size], device)
            b, t = batch.size, batch.spikes.shape[1]
            x = model.embed(batch.eid, batch.spikes, batch.wheel, batch.whisker, batch.choice, batch.block,
                            eval_mask("decoding", b, t).to(device))  # (B, T*K, hidden)
            states = model.encode_layers(x, t) if every_depth else [model.encode(x, t)]  # (B, T*K, hidden)
            yield [h.view(b, t, model.tokens_per_bin, -1) for h in states]  # each (B, T, K, hidden)
    finally:
        model.train(was_training)
