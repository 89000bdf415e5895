"""Offline, torch-only: trial alignment and windows, the NEDS model, masking, training, export."""

from training.baselines import (
    DecodingResults,
    EncoderResult,
    LinearConfig,
    RRRConfig,
    decode_from_features,
    fit_linear_decoders,
    fit_rrr_encoder,
)
from training.cache import load_arrays
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import NEDSConfig, TrainConfig
from training.data import (
    DataConfig,
    build_arrays,
    build_continuous_arrays,
    build_trial_arrays,
    continuous_windows,
)
from training.masking import draw_masks, eval_mask
from training.model import NEDS

__all__ = [
    "NEDS",
    "DataConfig",
    "DecodingResults",
    "EncoderResult",
    "LinearConfig",
    "NEDSConfig",
    "RRRConfig",
    "TrainConfig",
    "build_arrays",
    "build_continuous_arrays",
    "build_trial_arrays",
    "continuous_windows",
    "decode_from_features",
    "draw_masks",
    "eval_mask",
    "fit_linear_decoders",
    "fit_rrr_encoder",
    "load_arrays",
    "load_checkpoint",
    "save_checkpoint",
]
