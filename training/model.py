"""The NEDS model: multimodal tokens per 20 ms bin, a pre-LayerNorm transformer, per-session heads.

Tokens. ``cfg.tokens == "modality"`` (the paper, the offline default): one token per bin per modality for
the five modalities of :data:`MODALITIES`, laid out time-major: token ``t * M + m`` is modality ``m`` at bin
``t``. ``cfg.tokens == "fused"`` (the streaming default): one token per bin, the sum of the five modality
tokens below, and every head reads that token; a streaming step then appends one token, not five, and its
key/value ring is five times shorter (see ``training.streaming``).

- spikes: the session's stitching layer ``Linear(N_s -> hidden)`` on the bin's count vector;
- wheel, whisker: the session's ``Linear(1 -> hidden)`` on the scaled value;
- choice, block: a learned class embedding (shared by all sessions), the same token in every bin.

A masked token's input is replaced by the learned mask token of its modality, and gets the learned modality
embedding (fused layout: the five are then summed). Every token then gets the learned time (bin) embedding
(offline mode only) and the learned session embedding; rotary positions (the bin index, equal for the tokens
of a bin) act on queries and keys.

Heads (per session, on the final hidden states): spikes ``Linear(hidden -> N_s)`` Poisson log-rates (log
expected count per bin); wheel/whisker ``Linear(hidden -> 1)`` regression; choice ``Linear(hidden -> 2)``
and block ``Linear(hidden -> 3)`` per-bin logits, read from the class token plus the bin's spike token
(``cfg.class_reads_spikes``, see :meth:`NEDS.class_state`). The trial's class logits are the mean of the
per-bin logits over the bins, which equals a linear read-out of the mean-pooled tokens (see
:func:`trial_logits`); keeping per-bin logits lets the streaming mode emit a class estimate every bin.

Sessions are keyed by eid: ``add_session(eid, n_units)`` adds the session's tokenizers, embedding and heads
to ``nn.ModuleDict``s; no code or list edit is needed for a new session.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neds_rt.errors import ModelFileError, invalid
from training.arrays import N_BLOCK, N_CHOICE, Normalisation
from training.config import NEDSConfig

MODALITIES: Final = ("spikes", "wheel", "whisker", "choice", "block")
SPIKES, WHEEL, WHISKER, CHOICE, BLOCK = range(5)
N_MODALITIES: Final = len(MODALITIES)
CONTINUOUS: Final = (WHEEL, WHISKER)
DISCRETE: Final = (CHOICE, BLOCK)
BEHAVIOUR: Final = (WHEEL, WHISKER, CHOICE, BLOCK)
_KEY_BAD = re.compile(r"[^0-9A-Za-z_]")


@dataclass
class SessionVocab:
    """What a checkpoint remembers about one session: its units (column order) and normalisation."""

    eid: str
    unit_ids: np.ndarray  # (N,) int64 cluster ids, the stitching layer's input columns in order
    regions: np.ndarray  # (N,) str Beryl acronym per unit
    norm: Normalisation | None = None
    probe: str = ""

    @property
    def n_units(self) -> int:
        return int(self.unit_ids.shape[0])


class NEDSOutput(NamedTuple):
    """Read-outs as :meth:`NEDS.heads` gives them; :meth:`NEDS.readout`: the same, any leading shape."""

    spikes: Tensor  # (B, T, N) Poisson log expected count per bin
    wheel: Tensor  # (B, T) scaled wheel speed
    whisker: Tensor  # (B, T) scaled whisker motion energy
    choice: Tensor  # (B, T, 2) per-bin choice logits
    block: Tensor  # (B, T, 3) per-bin block logits


def session_key(eid: str) -> str:
    """The ``nn.ModuleDict`` key of a session: ``s_`` + eid with anything but [0-9A-Za-z_] made ``_``."""
    return "s_" + _KEY_BAD.sub("_", eid)


def per_bin_labels(labels: Tensor, n_bins: int) -> Tensor:
    """Class labels as (B, T): per-trial (B,) labels repeated over bins, per-bin (B, T) labels as they are.

    Per-bin labels come from continuous windows (streaming training); ``-1`` marks a bin without a label.
    """
    return labels[:, None].expand(-1, n_bins) if labels.dim() == 1 else labels


def trial_logits(per_bin: Tensor) -> Tensor:
    """(B, T, C) per-bin logits -> (B, C) trial logits (mean over bins)."""
    return per_bin.mean(dim=1)


def rotary_tables(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin tables (L, head_dim) for token positions (L,) (rotate-half convention)."""
    dims = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)  # (head_dim / 2,)
    inv_freq = base ** (-dims / head_dim)  # (head_dim / 2,) radians per position
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (L, head_dim / 2) radians
    angles = torch.cat([angles, angles], dim=-1)  # (L, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, L, head_dim) queries or keys by their positions' angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, heads, L, head_dim)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention with rotary queries/keys, through ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: NEDSConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor | None) -> Tensor:
        b, length, hidden = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.heads, self.head_dim)  # (B, L, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )  # (B, heads, L, head_dim)
        return self.out(y.transpose(1, 2).reshape(b, length, hidden))  # (B, L, hidden)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: NEDSConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.hidden, cfg.mlp), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.mlp, cfg.hidden)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor | None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, allowed))
        return x + self.drop(self.mlp(self.norm2(x)))  # (B, L, hidden)


class SessionModules(nn.Module):
    """One session's own layers: stitching/projections in, session embedding, output heads."""

    def __init__(self, n_units: int, hidden: int) -> None:
        super().__init__()
        self.n_units = n_units
        self.stitch = nn.Linear(n_units, hidden)  # spikes tokenizer: counts (N,) -> token
        self.wheel_in = nn.Linear(1, hidden)
        self.whisker_in = nn.Linear(1, hidden)
        self.embedding = nn.Parameter(torch.randn(hidden) * 0.02)  # (hidden,) learned session embedding
        self.spikes_out = nn.Linear(hidden, n_units)
        self.wheel_out = nn.Linear(hidden, 1)
        self.whisker_out = nn.Linear(hidden, 1)
        self.choice_out = nn.Linear(hidden, N_CHOICE)
        self.block_out = nn.Linear(hidden, N_BLOCK)


class NEDS(nn.Module):
    """NEDS: ``forward(eid, spikes, wheel, whisker, choice, block, mask)``."""

    def __init__(self, cfg: NEDSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.sessions = nn.ModuleDict()
        self.vocab: dict[str, SessionVocab] = {}  # eid -> units and normalisation (saved by checkpoints)
        self._keys: dict[str, str] = {}  # eid -> ModuleDict key
        self.choice_embed = nn.Embedding(N_CHOICE, h)
        self.block_embed = nn.Embedding(N_BLOCK, h)
        self.mask_token = nn.Parameter(torch.randn(N_MODALITIES, h) * 0.02)  # (M, hidden) one per modality
        self.modality_embed = nn.Parameter(torch.randn(N_MODALITIES, h) * 0.02)  # (M, hidden)
        self.time_embed = nn.Parameter(torch.randn(cfg.n_bins, h) * 0.02)  # (T, hidden), offline mode only
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(h)
        self.in_drop = nn.Dropout(cfg.dropout)
        self.tokens_per_bin = 1 if cfg.fused else N_MODALITIES  # K

    def token(self, modality: int) -> int:
        """Index, within a bin's K tokens, of the token whose final state ``modality``'s head reads."""
        return 0 if self.cfg.fused else modality

    def class_state(self, h: Tensor, modality: int) -> Tensor:
        """Final states of a bin's tokens (..., K, hidden) -> what the ``modality`` class head reads (...,
        hidden): its own token, plus the spike token when ``cfg.class_reads_spikes`` (per-modality tokens)."""
        state = h[..., self.token(modality), :]
        if self.cfg.class_reads_spikes and not self.cfg.fused:
            state = state + h[..., self.token(SPIKES), :]
        return state

    # ---- sessions -------------------------------------------------------------------------------------
    @property
    def eids(self) -> list[str]:
        return list(self._keys)

    def add_session(
        self, eid: str, n_units: int, vocab: SessionVocab | None = None, replace: bool = False
    ) -> SessionModules:
        """Add (or with ``replace`` rebuild) the session's stitching, projections, embedding and heads."""
        if not eid:
            raise invalid("eid", "must be a non-empty session id", eid, kind=ModelFileError)
        if n_units < 1:
            raise invalid(f"session {eid} n_units", "must be >= 1", n_units, kind=ModelFileError)
        if vocab is not None and vocab.n_units != n_units:
            raise invalid(f"session {eid} vocabulary", f"must list n_units={n_units} units", vocab.n_units,
                          kind=ModelFileError)
        key = session_key(eid)
        if eid in self._keys and not replace:
            raise invalid(f"session {eid}", "is already in the model", eid,
                          "pass replace=True to rebuild its layers", kind=ModelFileError)
        clash = [e for e, k in self._keys.items() if k == key and e != eid]
        if clash:
            raise invalid(f"session {eid}", f"maps to the same module key as session {clash[0]}", key,
                          "rename one of the sessions", kind=ModelFileError)
        device = self.mask_token.device
        mods = SessionModules(n_units, self.cfg.hidden).to(device)
        self.sessions[key] = mods
        self._keys[eid] = key
        if vocab is not None:
            self.vocab[eid] = vocab
        else:
            self.vocab.pop(eid, None)
        return mods

    def remove_session(self, eid: str) -> None:
        key = self._key(eid)
        del self.sessions[key]
        del self._keys[eid]
        self.vocab.pop(eid, None)

    def session(self, eid: str) -> SessionModules:
        mods = self.sessions[self._key(eid)]
        assert isinstance(mods, SessionModules)
        return mods

    def _key(self, eid: str) -> str:
        if eid not in self._keys:
            raise invalid("eid", f"is not a session of this model ({len(self._keys)} sessions)", eid,
                          "add it with add_session or fine-tune on it", kind=ModelFileError)
        return self._keys[eid]

    def shared_parameters(self) -> dict[str, Tensor]:
        """Parameters common to all sessions (transformer, embeddings, mask tokens), by name."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("sessions.")}

    # ---- forward --------------------------------------------------------------------------------------
    def positions(self, n_bins: int, device: torch.device) -> Tensor:
        """(L,) bin index of each time-major token (L = n_bins * K)."""
        return torch.arange(n_bins, device=device).repeat_interleave(self.tokens_per_bin)

    def attention_mask(self, n_bins: int, device: torch.device) -> Tensor | None:
        """None (offline: all tokens see all) or (L, L) bool, True where query bin >= key bin (streaming)."""
        if not self.cfg.causal:
            return None
        pos = self.positions(n_bins, device)  # (L,)
        return pos[:, None] >= pos[None, :]  # (L, L)

    def embed(
        self, eid: str, spikes: Tensor, wheel: Tensor, whisker: Tensor, choice: Tensor, block: Tensor,
        mask: Tensor,
    ) -> Tensor:
        """Token inputs (B, T*K, hidden), time-major, with masked tokens replaced by the mask tokens."""
        mods = self.session(eid)
        b, t, n = spikes.shape
        if n != mods.n_units:
            raise invalid(f"spikes of session {eid}", f"must have {mods.n_units} unit columns", n,
                          "pass the session's binned counts in vocabulary order", kind=ModelFileError)
        if t > self.cfg.n_bins and not self.cfg.causal:
            raise invalid("spikes", f"must have at most n_bins={self.cfg.n_bins} bins", t,
                          kind=ModelFileError)
        choice_bins, block_bins = per_bin_labels(choice, t), per_bin_labels(block, t)  # (B, T) each
        tokens = torch.stack(
            [
                mods.stitch(spikes),  # (B, T, hidden)
                mods.wheel_in(wheel.unsqueeze(-1)),  # (B, T, hidden)
                mods.whisker_in(whisker.unsqueeze(-1)),  # (B, T, hidden)
                self.choice_embed(choice_bins.clamp(min=0)),  # (B, T, hidden) the class in every bin
                self.block_embed(block_bins.clamp(min=0)),  # (B, T, hidden)
            ],
            dim=2,
        )  # (B, T, M, hidden)
        unknown = torch.stack([choice_bins < 0, block_bins < 0], dim=1)  # (B, 2, T) no label: always masked
        mask = torch.cat([mask[:, :CHOICE], mask[:, CHOICE:] | unknown], dim=1)  # (B, M, T)
        masked = mask.transpose(1, 2).unsqueeze(-1)  # (B, T, M, 1) from (B, M, T)
        tokens = torch.where(masked, self.mask_token[None, None], tokens)  # (B, T, M, hidden)
        tokens = tokens + self.modality_embed[None, None]
        if self.cfg.fused:
            tokens = tokens.sum(dim=2, keepdim=True)  # (B, T, 1, hidden) one token per bin
        tokens = tokens + mods.embedding  # (B, T, K, hidden)
        if not self.cfg.causal:
            tokens = tokens + self.time_embed[:t][None, :, None, :]  # absolute bin embedding
        return self.in_drop(tokens.reshape(b, t * self.tokens_per_bin, -1))  # (B, L, hidden)

    def encode(self, x: Tensor, n_bins: int) -> Tensor:
        """Run the transformer on time-major tokens (B, L, hidden) -> final hidden states (B, L, hidden)."""
        cos, sin, allowed = self.attention_inputs(n_bins, x.device)
        for block in self.blocks:
            x = block(x, cos, sin, allowed)
        return self.norm(x)

    def encode_layers(self, x: Tensor, n_bins: int) -> list[Tensor]:
        """:meth:`encode`, keeping every depth's states (B, L, hidden): the tokens as they enter, after each
        block, and after the final LayerNorm (the last is :meth:`encode`'s output); ``layers + 2`` in all."""
        cos, sin, allowed = self.attention_inputs(n_bins, x.device)
        states = [x]
        for block in self.blocks:
            states.append(block(states[-1], cos, sin, allowed))
        states.append(self.norm(states[-1]))
        return states

    def attention_inputs(self, n_bins: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        """Rotary tables (L, head_dim) x 2 and the attention mask (None or (L, L)) of ``n_bins`` bins."""
        pos = self.positions(n_bins, device)  # (L,)
        cos, sin = rotary_tables(pos, self.cfg.head_dim, self.cfg.rope_base)  # (L, head_dim) each
        return cos, sin, self.attention_mask(n_bins, device)

    def heads(self, eid: str, h: Tensor) -> NEDSOutput:
        """Per-session read-outs of final hidden states (B, T*K, hidden)."""
        b, length, hidden = h.shape
        k = self.tokens_per_bin
        return self.readout(eid, h.view(b, length // k, k, hidden))  # from (B, T, K, hidden)

    def readout(self, eid: str, h: Tensor, channel_axis: bool = False) -> NEDSOutput:
        """Session ``eid``'s read-outs of the final states of bins (..., K, hidden), offline and streaming:
        spikes (..., N), wheel and whisker (...) scaled (``channel_axis``: (..., 1), as the streaming step
        concatenates them, with no reshape in its graph), choice (..., 2) and block (..., 3) logits."""
        mods = self.session(eid)
        at = self.token
        wheel = mods.wheel_out(h[..., at(WHEEL), :])  # (..., 1)
        whisker = mods.whisker_out(h[..., at(WHISKER), :])  # (..., 1)
        return NEDSOutput(
            spikes=mods.spikes_out(h[..., at(SPIKES), :]),  # (..., N) log expected counts per bin
            wheel=wheel if channel_axis else wheel.squeeze(-1),  # (...) or (..., 1)
            whisker=whisker if channel_axis else whisker.squeeze(-1),  # (...) or (..., 1)
            choice=mods.choice_out(self.class_state(h, CHOICE)),  # (..., 2)
            block=mods.block_out(self.class_state(h, BLOCK)),  # (..., 3)
        )

    def forward(
        self, eid: str, spikes: Tensor, wheel: Tensor, whisker: Tensor, choice: Tensor, block: Tensor,
        mask: Tensor,
    ) -> NEDSOutput:
        """spikes (B, T, N) float counts, wheel/whisker (B, T) scaled, choice/block (B,) int64 classes per
        trial or (B, T) per bin (-1: no label, always masked), mask (B, M, T) bool (True = hidden and
        predicted)."""
        x = self.embed(eid, spikes, wheel, whisker, choice, block, mask)
        return self.heads(eid, self.encode(x, spikes.shape[1]))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
