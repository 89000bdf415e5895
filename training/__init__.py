"""Offline, torch-only: trial alignment and windows, the NEDS model, masking, training, export.

The public names below are re-exported lazily (PEP 562), so ``import training.behaviour`` or
``training.metrics`` does not pull in torch, scikit-learn or the model.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "DecodingResults": "training.baselines",
    "EncoderResult": "training.baselines",
    "LinearConfig": "training.baselines",
    "RRRConfig": "training.baselines",
    "decode_from_features": "training.baselines",
    "fit_linear_decoders": "training.baselines",
    "fit_rrr_encoder": "training.baselines",
    "load_arrays": "training.cache",
    "load_checkpoint": "training.checkpoint",
    "save_checkpoint": "training.checkpoint",
    "NEDSConfig": "training.config",
    "TrainConfig": "training.config",
    "DataConfig": "training.data",
    "build_arrays": "training.data",
    "build_continuous_arrays": "training.data",
    "build_trial_arrays": "training.data",
    "continuous_windows": "training.data",
    "draw_masks": "training.masking",
    "eval_mask": "training.masking",
    "NEDS": "training.model",
    "build_window_arrays": "training.windows",
    "export_model": "training.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
