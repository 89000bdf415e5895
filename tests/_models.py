"""Shared test models: a tiny streaming NEDS with random weights and its export.

NOTE: reconstructed by helper G after accidentally overwriting the original file (same public API:
``tiny_streaming_model`` and ``export_tiny``); the original author should check it against theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

REGIONS = ("VISa", "CA1", "DG", "LP", "PO")


def tiny_streaming_model(
    n_units: int = 12, eid: str = "tiny-eid", seed: int = 0, tokens: str = "auto"
) -> Any:
    """A tiny streaming NEDS (random weights, eval mode) with one session of ``n_units`` units.

    ``tokens`` picks the bin layout (``auto`` = fused, the streaming default).
    Unit ids are 100 .. 100 + n_units - 1, regions cycle through :data:`REGIONS`, normalisation
    wheel [0, 3], whisker [1, 5].
    """
    import torch

    from training.arrays import Normalisation
    from training.config import NEDSConfig
    from training.model import NEDS, SessionVocab

    torch.manual_seed(seed)
    model = NEDS(NEDSConfig.preset("tiny", mode="streaming", dropout=0.0, tokens=tokens))
    ids = np.arange(100, 100 + n_units)  # (N,) cluster ids
    regions = np.array([REGIONS[i % len(REGIONS)] for i in range(n_units)])  # (N,) Beryl acronyms
    model.add_session(eid, n_units, vocab=SessionVocab(eid, ids, regions, Normalisation(0.0, 3.0, 1.0, 5.0),
                                                       "probe00"))
    return model.eval()


def export_tiny(path: Path, n_units: int = 12, fmt: str | None = None, graph: str = "step",
                context: int = 16) -> Path:
    """Export :func:`tiny_streaming_model` to ``path`` (format from the suffix unless given); return it."""
    from training.export import export_model

    model = tiny_streaming_model(n_units=n_units)
    fmt = fmt or ("onnx" if Path(path).suffix == ".onnx" else "torchscript")
    export_model(model, model.eids[0], Path(path), fmt=fmt, graph=graph, context=context)
    return Path(path)
