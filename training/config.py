"""Sizes of the NEDS model and of a training run, as dataclasses (checkpoints save them with ``asdict``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Final, Literal

from neds_rt.errors import ConfigError, invalid

MODES: Final = ("offline", "streaming")
TOKEN_LAYOUTS: Final = ("modality", "fused")
PRESETS: Final = ("tiny", "small", "default")
SCHEMES: Final = ("encoding", "decoding", "within", "cross")  # training.masking.Scheme, lower case
SPIKE_WEIGHT: Final = 100.0  # TrainConfig.spike_weight
FINETUNE_UNIT_DROPOUT: Final = 0.3  # TrainConfig.unit_dropout when fine-tuning (None: chosen by the run)
MAX_UNIT_DROPOUT: Final = 0.95  # the highest TrainConfig.unit_dropout (and neds-rt train --unit-dropout)

# Depth by number of pretraining sessions. The paper keeps 5 layers for small multi-session runs (up to 10
# sessions) and uses deeper models for the full multi-animal pretraining; the larger steps are ours.
_DEPTH_BY_SESSIONS: Final = ((10, 5), (40, 8), (10**9, 12))


@dataclass
class NEDSConfig:
    """Sizes and mode of a NEDS model; the defaults are the paper's (hidden 256, 8 heads, MLP 512, 5 layers).

    ``mode="offline"`` attends both ways over a trial window (the paper); ``mode="streaming"`` makes attention
    causal over bins (a token sees its own bin and earlier ones) and drops the absolute time embedding, so
    only rotary (relative) positions remain and the context can roll.
    """

    hidden: int = 256
    heads: int = 8
    mlp: int = 512
    layers: int = 5
    dropout: float = 0.1
    n_bins: int = 100  # tokens per modality = 20 ms bins in a window
    bin_size: float = 0.02  # seconds
    mask_ratio: float = 0.3  # fraction of bins hidden by the within / cross masks (kept when fine-tuning)
    mode: Literal["offline", "streaming"] = "offline"
    rope_base: float = 10000.0
    # How a bin's five modalities become tokens: "modality" is the paper's one token per modality per bin;
    # "fused" is one token per bin, the sum of the five (masked or not) modality tokens, read by every head.
    # "auto" picks "fused" in streaming mode (a step then appends 1 token, not 5) and "modality" offline.
    tokens: Literal["auto", "modality", "fused"] = "auto"
    # Per-modality tokens only: the choice and block heads read their own token's final state plus the bin's
    # spike token's. The spike token carries the bin's stitched counts in its residual stream, as the fused
    # token does, so a trial's class logits hold a linear read-out of its summed spikes; read alone, the class
    # token must gather that through attention first, and choice, a weak mixed-sign signal, then trained late
    # or never (README, "Decode quality"). False reads the class token alone (checkpoints written before).
    class_reads_spikes: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden", "heads", "mlp", "layers", "n_bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise invalid(f"NEDSConfig.{name}", "must be an integer >= 1", value, kind=ConfigError)
        if self.hidden % self.heads:
            raise invalid("NEDSConfig.hidden", f"must be divisible by heads={self.heads}", self.hidden,
                          "pick hidden = heads * head size", kind=ConfigError)
        if (self.hidden // self.heads) % 2:
            raise invalid("NEDSConfig.hidden", "hidden / heads must be even for rotary positions",
                          self.hidden // self.heads, kind=ConfigError)
        if not 0.0 <= self.dropout < 1.0:
            raise invalid("NEDSConfig.dropout", "must be in [0, 1)", self.dropout, kind=ConfigError)
        if not 0.0 < self.mask_ratio < 1.0:
            raise invalid("NEDSConfig.mask_ratio", "must be in (0, 1)", self.mask_ratio,
                          "use 0.3, the default", kind=ConfigError)
        if self.mode not in MODES:
            raise invalid("NEDSConfig.mode", f"must be one of {MODES}", self.mode, kind=ConfigError)
        if self.bin_size <= 0:
            raise invalid("NEDSConfig.bin_size", "must be > 0 seconds", self.bin_size, kind=ConfigError)
        if self.tokens == "auto":
            self.tokens = "fused" if self.mode == "streaming" else "modality"
        if self.tokens not in TOKEN_LAYOUTS:
            raise invalid("NEDSConfig.tokens", f"must be one of {TOKEN_LAYOUTS} or 'auto'", self.tokens,
                          kind=ConfigError)

    @property
    def causal(self) -> bool:
        return self.mode == "streaming"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def fused(self) -> bool:
        return self.tokens == "fused"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> NEDSConfig:
        """Rebuild from ``asdict`` output; unknown keys are an error naming ``source``."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise invalid(source, "holds NEDSConfig keys this version does not know", extra,
                          "use a checkpoint written by this version of neds-rt", kind=ConfigError)
        # checkpoints written before the token layout was configurable hold one token per modality, and those
        # written before class_reads_spikes read the class tokens alone
        return cls(**{"tokens": "modality", "class_reads_spikes": False, **data})

    @classmethod
    def preset(cls, name: str = "default", n_sessions: int = 1, **overrides: Any) -> NEDSConfig:
        """``tiny`` (tests), ``small`` (laptops), ``default`` (paper; deeper for more sessions)."""
        if name not in PRESETS:
            raise invalid("preset", f"must be one of {PRESETS}", name, kind=ConfigError)
        if n_sessions < 1:
            raise invalid("n_sessions", "must be >= 1", n_sessions, kind=ConfigError)
        if name == "tiny":
            base: dict[str, Any] = dict(hidden=32, heads=4, mlp=64, layers=2, dropout=0.0)
        elif name == "small":
            base = dict(hidden=128, heads=4, mlp=256, layers=3)
        else:
            base = dict(layers=layers_for_sessions(n_sessions))
        base.update(overrides)
        return cls(**base)


def layers_for_sessions(n_sessions: int) -> int:
    """Transformer depth for a pretraining run over ``n_sessions`` sessions (5 up to 10 sessions)."""
    for limit, depth in _DEPTH_BY_SESSIONS:
        if n_sessions <= limit:
            return depth
    return _DEPTH_BY_SESSIONS[-1][1]


@dataclass
class TrainConfig:
    """One training run: optimiser, schedule, batching and evaluation."""

    epochs: int = 10
    batch_size: int = 16  # trials per step per process (one session per step)
    lr: float = 1e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 0.01
    warmup_frac: float = 0.1  # share of steps spent warming up linearly, then cosine down
    final_lr_frac: float = 0.01  # lr at the last step, as a share of the peak
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    seed: int = 0
    max_steps: int = 0  # stop after this many steps (0: run every epoch)
    eval_batch_size: int = 32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True  # progress bar on rank 0
    # masking schemes drawn in training (training.masking.Scheme names); ("encoding",) / ("decoding",) train
    # the unimodal NEDS variants
    schemes: tuple[str, ...] = SCHEMES
    # weight of the spike Poisson NLL (mean per neuron and bin) in the total loss; see training.masking.
    # Chosen on VAL, fine-tuning the quick benchmark's pretrained tiny model on its 400-trial held-out session
    # for 30 epochs: weights 1 / 10 / 30 / 100 gave VAL bits/spike 0.005 / 0.013 / 0.019 / 0.022 with wheel R²
    # 0.72-0.75 and whisker 0.70 at every weight; the neuron count (537, the per-token sum) gave 0.021 but
    # cost wheel (0.66), choice (0.54) and block (0.49 balanced accuracy, against 0.80 and 0.67 at 100)
    spike_weight: float = SPIKE_WEIGHT
    # refit the choice and block heads of best.pt on its frozen TRAIN features at the end, for sessions of
    # trial windows (training.refit; per-bin labels keep the trained heads):
    # trained jointly they underfit (TRAIN choice 0.68-0.71 on the README's 400-trial session); refitted,
    # TEST block rose from 0.60 to 0.81 and choice from 0.68 to 0.71 (means of three seeds)
    refit_class_heads: bool = True
    # share of units zeroed in the spike input of each training trial (training.masking.drop_units; the loss
    # still scores every unit), against memorising a session's few hundred TRAIN trials. None: 0.3 when
    # fine-tuning a pretrained model (FINETUNE_UNIT_DROPOUT), 0 otherwise; see the README, "Unit dropout"
    unit_dropout: float | None = None
    # epochs at the start of fine-tuning in which the shared layers keep their pretrained weights and only the
    # sessions' own layers (stitching, embedding, heads) learn; then every layer trains (linear probing, then
    # fine-tuning). Off by default: it helped choice at 1,000 trials but not clearly at 400, and the VAL score
    # did not tell it apart; see the README, "A frozen start for fine-tuning"
    frozen_epochs: int = 0
    # also save last.pt every this many minutes inside an epoch (0: only at the end of each epoch), so a long
    # epoch (a multi-session pretraining on a CPU) cut short loses at most this much; resume continues at the
    # next batch, with the random streams it stopped in. Does not change what the run learns
    checkpoint_minutes: float = 0.0

    def unit_dropout_for(self, finetuning: bool) -> float:
        """The unit dropout a run uses: ``unit_dropout``, or when None the default for fine-tuning or not."""
        if self.unit_dropout is not None:
            return self.unit_dropout
        return FINETUNE_UNIT_DROPOUT if finetuning else 0.0

    def __post_init__(self) -> None:
        self.schemes = tuple(self.schemes)
        bad = [s for s in self.schemes if s not in SCHEMES]
        if not self.schemes or bad or len(set(self.schemes)) != len(self.schemes):
            raise invalid("TrainConfig.schemes", f"must be distinct names out of {SCHEMES}", self.schemes,
                          "e.g. schemes=('encoding',) for encoding-only masking", kind=ConfigError)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise invalid(f"TrainConfig.{name}", "must be an integer >= 1", value, kind=ConfigError)
        if self.max_steps < 0:
            raise invalid("TrainConfig.max_steps", "must be >= 0 (0: no limit)", self.max_steps,
                          kind=ConfigError)
        if self.unit_dropout is not None and not 0.0 <= self.unit_dropout <= MAX_UNIT_DROPOUT:
            raise invalid("TrainConfig.unit_dropout", f"must be in [0, {MAX_UNIT_DROPOUT}]",
                          self.unit_dropout, "use 0 to switch it off", kind=ConfigError)
        if not isinstance(self.frozen_epochs, int) or self.frozen_epochs < 0:
            raise invalid("TrainConfig.frozen_epochs", "must be an integer >= 0", self.frozen_epochs,
                          "use 0 to train every layer from the first step", kind=ConfigError)
        if not (math.isfinite(self.checkpoint_minutes) and self.checkpoint_minutes >= 0):
            raise invalid("TrainConfig.checkpoint_minutes", "must be a finite number >= 0",
                          self.checkpoint_minutes, "use 0 to save last.pt only at the end of each epoch",
                          kind=ConfigError)
        if not self.spike_weight > 0:
            raise invalid("TrainConfig.spike_weight", "must be > 0", self.spike_weight, kind=ConfigError)
        if self.lr <= 0:
            raise invalid("TrainConfig.lr", "must be > 0", self.lr, kind=ConfigError)
        if not 0.0 <= self.warmup_frac < 1.0:
            raise invalid("TrainConfig.warmup_frac", "must be in [0, 1)", self.warmup_frac, kind=ConfigError)
        if not 0.0 < self.final_lr_frac <= 1.0:
            raise invalid("TrainConfig.final_lr_frac", "must be in (0, 1]", self.final_lr_frac,
                          kind=ConfigError)
