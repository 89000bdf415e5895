"""Checkpoints: weights, config, each session's unit vocabulary and normalisation, and the optimiser state.

A checkpoint is a ``torch.save`` dict of plain types and tensors only, so it loads with
``torch.load(weights_only=True)`` (no pickled code)::

    format, version, config (asdict NEDSConfig), sessions [{eid, probe, unit_ids, regions, norm}],
    state_dict, optimizer (or None), step, epoch, best_score, train_config, extra
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor, nn

from neds_rt.errors import ConfigError, DataError, ModelFileError, invalid
from training.arrays import Normalisation, TrialArrays
from training.config import NEDSConfig
from training.model import NEDS, SessionVocab

FORMAT: Final = "neds-rt checkpoint"
VERSION: Final = 1
_REQUIRED: Final = ("format", "version", "config", "sessions", "state_dict")


def vocab_from_arrays(arr: TrialArrays) -> SessionVocab:
    return SessionVocab(
        eid=arr.eid,
        unit_ids=np.asarray(arr.unit_ids, dtype=np.int64),
        regions=np.asarray(arr.regions).astype(str),
        norm=arr.norm,
        probe=arr.probe,
    )


def _vocab_to_dict(eid: str, n_units: int, vocab: SessionVocab | None) -> dict[str, Any]:
    if vocab is None:  # a session added without a vocabulary: columns are anonymous 0..N-1
        return {"eid": eid, "probe": "", "unit_ids": list(range(n_units)), "regions": [""] * n_units,
                "norm": None}
    return {
        "eid": eid,
        "probe": vocab.probe,
        "unit_ids": [int(u) for u in vocab.unit_ids],
        "regions": [str(r) for r in vocab.regions],
        "norm": None if vocab.norm is None else {k: float(v) for k, v in asdict(vocab.norm).items()},
    }


def _vocab_from_dict(d: dict[str, Any]) -> SessionVocab:
    norm = None if d.get("norm") is None else Normalisation(**d["norm"])
    return SessionVocab(
        eid=str(d["eid"]),
        unit_ids=np.asarray(d["unit_ids"], dtype=np.int64),  # (N,)
        regions=np.asarray(d["regions"], dtype=str),  # (N,)
        norm=norm,
        probe=str(d.get("probe", "")),
    )


def save_checkpoint(
    path: Path | str,
    model: NEDS,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    epoch: int = 0,
    best_score: float | None = None,
    train_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (temp file + rename) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sessions = [_vocab_to_dict(eid, model.session(eid).n_units, model.vocab.get(eid)) for eid in model.eids]
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": asdict(model.cfg),
        "sessions": sessions,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "step": int(step),
        "epoch": int(epoch),
        "best_score": None if best_score is None else float(best_score),
        "train_config": train_config or {},
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict, checked for format and required keys."""
    path = Path(path)
    if not path.is_file():
        raise invalid(f"checkpoint {path}", "does not exist", str(path),
                      "pass a .pt file written by training", kind=ModelFileError)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise invalid(f"checkpoint {path}", "cannot be read as a neds-rt checkpoint", type(err).__name__,
                      f"re-save it with training ({err})", kind=ModelFileError) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise invalid(f"checkpoint {path}", f"is not a {FORMAT!r} file", type(ckpt).__name__,
                      "pass best.pt or last.pt from a neds-rt train run", kind=ModelFileError)
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise invalid(f"checkpoint {path}", "lacks required entries", missing, kind=ModelFileError)
    if ckpt["version"] > VERSION:
        raise invalid(f"checkpoint {path}", f"has format version > {VERSION}", ckpt["version"],
                      "upgrade neds-rt", kind=ModelFileError)
    return ckpt


def config_of(ckpt: dict[str, Any], path: Path | str) -> NEDSConfig:
    try:
        return NEDSConfig.from_dict(dict(ckpt["config"]), source=f"checkpoint {path} config")
    except (ConfigError, TypeError) as err:
        raise invalid(f"checkpoint {path}", "holds an invalid model config", ckpt["config"], str(err),
                      kind=ModelFileError) from err


def sessions_of(ckpt: dict[str, Any]) -> list[SessionVocab]:
    return [_vocab_from_dict(d) for d in ckpt["sessions"]]


def load_state_checked(
    model: nn.Module, state: dict[str, Tensor], path: Path | str, skip: tuple[str, ...] = ()
) -> None:
    """Copy ``state`` into ``model``; a missing/unexpected key or a shape mismatch is a ModelFileError naming
    the file and the key. Keys starting with one of ``skip`` are left alone on both sides."""
    own = model.state_dict()

    def wanted(key: str) -> bool:
        return not key.startswith(skip) if skip else True

    missing = sorted(k for k in own if wanted(k) and k not in state)
    unexpected = sorted(k for k in state if wanted(k) and k not in own)
    if missing or unexpected:
        key = (missing or unexpected)[0]
        rule = "lacks weight" if missing else "holds a weight this model does not have"
        counts = f"({len(missing)} missing, {len(unexpected)} extra)"
        raise invalid(f"checkpoint {path}", f"{rule} {key!r} {counts}", key,
                      "it was written by another model config; train anew or pass the matching preset",
                      kind=ModelFileError)
    for key, value in state.items():
        if not wanted(key):
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            raise invalid(f"checkpoint {path}",
                          f"weight {key!r} has shape {tuple(value.shape)} but this model needs "
                          f"{tuple(own[key].shape)}", key,
                          "it was written by another model config; train anew or pass the matching preset",
                          kind=ModelFileError)
    subset = {k: v for k, v in state.items() if wanted(k)}
    model.load_state_dict(subset, strict=not skip)


def build_model(ckpt: dict[str, Any], path: Path | str) -> NEDS:
    """A NEDS with the checkpoint's config and sessions, weights loaded."""
    model = NEDS(config_of(ckpt, path))
    for vocab in sessions_of(ckpt):
        model.add_session(vocab.eid, vocab.n_units, vocab)
    load_state_checked(model, ckpt["state_dict"], path)
    return model


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> NEDS:
    """Rebuild the model (config, sessions, vocabularies, weights) from a checkpoint, in eval mode."""
    model = build_model(read_checkpoint(path, map_location), path)
    return model.eval()


def check_vocab(vocab: SessionVocab, arr: TrialArrays, path: Path | str) -> None:
    """Raise DataError when a session's units differ from the vocabulary the checkpoint trained on."""
    ids = np.asarray(arr.unit_ids, dtype=np.int64)
    if ids.shape == vocab.unit_ids.shape and np.array_equal(ids, vocab.unit_ids):
        return
    if ids.shape != vocab.unit_ids.shape:
        detail = f"{ids.size} units, checkpoint has {vocab.n_units}"
    else:
        first = int(np.flatnonzero(ids != vocab.unit_ids)[0])
        detail = f"column {first}: unit {int(ids[first])}, checkpoint has unit {int(vocab.unit_ids[first])}"
    raise invalid(
        f"session {arr.eid}", f"has units that differ from checkpoint {path}'s vocabulary", detail,
        "load the session with the checkpoint's units, or fine-tune with --finetune-from to rebuild its "
        "stitching layer", kind=DataError,
    )
