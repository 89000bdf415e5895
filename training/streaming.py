"""Step inference for the streaming NEDS: one 20 ms bin in, that bin's decodes out, key/value state kept.

Layout. Attention is causal *over bins*: a token sees every token of its own bin and of the previous
``C - 1`` bins (a sliding window of C bins), never a later bin. A step therefore needs only the K tokens of
the new bin. The streaming default fuses a bin's five modalities into one token (``cfg.tokens == "fused"``,
K = 1): the sum of the spike token and the four behaviour tokens. At run time the behaviour is unknown, so
the behaviour parts are the learned mask tokens (the decoding mask of training), and every head reads the
bin's one final state. Fusing makes a step five times cheaper in the projections and MLPs and shortens the
key/value ring five times against the paper's one token per modality (K = 5, still supported): a 5-layer,
256-wide step is ~2.4x faster on one CPU core (``neds-rt bench inference`` times both layouts).

State. Per layer, the keys and values of the last ``C - 1`` bins live in a ring the caller owns
(``(L, B, H, (C-1)*K, Dh)``). Keys are stored already rotated by their absolute bin index, with angles
computed in float64 by the caller (:func:`rotary_step_tables`), so relative positions stay exact however long
the stream runs and the cache never has to be shifted or re-rotated. The graph returns only the new bin's
keys/values; the caller writes them into ring slot ``k % (C - 1)``.

:func:`banded_recompute` is the reference: the whole sequence recomputed at once with the same sliding
window, which every step must equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neds_rt.rotary import rotary_step_tables
from training.model import (
    MODALITIES,
    N_MODALITIES,
    NEDS,
    SPIKES,
    Block,
    rotary_tables,
)

DECODE_CHANNELS: tuple[tuple[str, str], ...] = (
    ("wheel_speed", "rad/s"),
    ("whisker_motion_energy", "a.u."),
    ("p_choice_cw", "probability"),  # choice = +1 (clockwise turn)
    ("p_block_0.2", "probability"),  # probabilityLeft 0.2 / 0.5 / 0.8
    ("p_block_0.5", "probability"),
    ("p_block_0.8", "probability"),
)


def decode_outputs(model: NEDS, eid: str, h: Tensor) -> tuple[Tensor, Tensor]:
    """Final hidden states (..., K, hidden) -> decodes (..., 6) in physical units, log-rates (..., N)."""
    out = model.readout(eid, h, channel_axis=True)
    vocab = model.vocab.get(eid)
    norm = vocab.norm if vocab is not None else None
    wheel, whisker = out.wheel, out.whisker  # (..., 1) scaled
    if norm is not None:
        wheel = wheel * (norm.wheel_max - norm.wheel_min) + norm.wheel_min
        whisker = whisker * (norm.whisker_max - norm.whisker_min) + norm.whisker_min
    p_choice = F.softmax(out.choice, dim=-1)[..., 1:2]  # (..., 1) P(cw)
    p_block = F.softmax(out.block, dim=-1)  # (..., 3)
    decodes = torch.cat([wheel, whisker, p_choice, p_block], dim=-1)  # (..., 6)
    return decodes, out.spikes  # (..., N) log expected counts


def bin_tokens(model: NEDS, eid: str, counts: Tensor) -> Tensor:
    """(B, N) counts of one bin -> (B, K, hidden) input tokens, behaviour masked (decoding).

    Fused (K = 1): the spike token plus the constant sum of the four masked behaviour tokens. Per modality
    (K = 5), written without a batch-sized expand or concat (no shape arithmetic in an exported graph): the
    spike token is placed in row 0 by a one-hot mask and the constant masked behaviour tokens fill rows
    1..M-1; both additions are exact (x * 1, x * 0 and x + 0), so the values equal a concat.
    """
    mods = model.session(eid)
    emb = mods.embedding
    spikes = mods.stitch(counts) + model.modality_embed[SPIKES]  # (B, hidden)
    behaviour = model.mask_token[1:] + model.modality_embed[1:]  # (M-1, hidden) masked behaviour tokens
    if model.cfg.fused:
        return ((spikes + behaviour.sum(dim=0)) + emb)[:, None, :]  # (B, 1, hidden)
    rows = torch.cat([torch.zeros_like(behaviour[:1]), behaviour + emb], dim=0)  # (M, hidden), row 0 zero
    onehot = (torch.arange(N_MODALITIES, device=counts.device) == SPIKES).to(spikes.dtype)  # (M,)
    return (spikes + emb)[:, None, :] * onehot[:, None] + rows  # (B, M, hidden)


def rotate_half_matrix(head_dim: int) -> Tensor:
    """(Dh, Dh) signed permutation R with ``x @ R == cat([-x[half:], x[:half]])`` exactly (one MatMul)."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    idx = torch.arange(half)
    r[idx + half, idx] = -1.0  # out[j] = -x[j + half]
    r[idx, idx + half] = 1.0  # out[j + half] = x[j]
    return r


class StreamingStep(nn.Module):
    """Export-friendly single step of one session's streaming NEDS.

    forward(counts (B, N), key_bias (B, S) additive 0 / -inf for filled / empty ring slots, cos (Dh,),
    sin (Dh,), then per layer l: k_l (B, H, S, Dh), v_l (B, H, S, Dh)) -> (decodes (B, 6), log_rates (B, N),
    then per layer: k_new_l (B, H, K, Dh), v_new_l (B, H, K, Dh)); S = (C - 1) * K ring slots, K tokens
    per bin.

    Per-layer cache inputs and a two-part attention (ring part + new-bin part, one softmax over both) keep the
    graph from copying the cache: a step reads the ring once and writes only the new bin's keys/values.
    """

    def __init__(self, model: NEDS, eid: str) -> None:
        super().__init__()
        if not model.cfg.causal:
            raise ValueError("StreamingStep needs a model in streaming mode")
        self.model = model
        self.eid = eid
        self.heads = model.cfg.heads
        self.head_dim = model.cfg.head_dim
        self.hidden = model.cfg.hidden
        self.scale = 1.0 / math.sqrt(self.head_dim)
        rot = rotate_half_matrix(self.head_dim).to(model.mask_token.device)
        self.register_buffer("rot", rot, persistent=False)  # (Dh, Dh)

    def forward(
        self, counts: Tensor, key_bias: Tensor, cos: Tensor, sin: Tensor, *cache: Tensor
    ) -> tuple[Tensor, ...]:
        # Lean graph (~190 onnxruntime nodes for 5 layers instead of ~360; 154 after onnxruntime's own
        # fusions at one token per bin): the token stream stays 2-D (B*M, hidden) so every Linear is one Gemm
        # with its bias; reshapes use -1 for the batch (no Shape/Gather arithmetic); with one token per bin
        # the head split is a reshape, not a transpose; q and k are rotated together, rotate-half as a MatMul
        # with a signed permutation; the ring/new split of the softmax uses constant slice bounds.
        model = self.model
        m, heads, dh, hidden = model.tokens_per_bin, self.heads, self.head_dim, self.hidden  # m = K
        x = bin_tokens(model, self.eid, counts).reshape(-1, hidden)  # (B*K, hidden)
        bias = key_bias[:, None, None, :]  # (B, 1, 1, S)
        new_kv: list[Tensor] = []
        for layer, block in enumerate(model.blocks):
            assert isinstance(block, Block)
            attn = block.attn
            k_ring, v_ring = cache[2 * layer], cache[2 * layer + 1]  # (B, H, S, Dh) each
            qkv = attn.qkv(block.norm1(x))  # (B*K, 3H*Dh)
            # -> (B, 3H, K, Dh); with one token per bin a reshape alone (no Transpose copy in the graph)
            qkv = (qkv.reshape(-1, 3 * heads, 1, dh) if m == 1
                   else qkv.reshape(-1, m, 3 * heads, dh).transpose(1, 2))
            qk, v = qkv[:, :2 * heads], qkv[:, 2 * heads:]  # (B, 2H, K, Dh), (B, H, K, Dh)
            qk = qk * cos + (qk @ self.rot) * sin  # rotary on q and k at once
            q, k = qk[:, :heads], qk[:, heads:]  # (B, H, K, Dh) each
            s_ring = q @ k_ring.transpose(-1, -2) * self.scale + bias  # (B, H, K, S)
            s_new = q @ k.transpose(-1, -2) * self.scale  # (B, H, K, K) own bin: all visible
            p = torch.softmax(torch.cat([s_ring, s_new], dim=-1), dim=-1)  # (B, H, K, S + K)
            y = p[..., :-m] @ v_ring + p[..., -m:] @ v  # (B, H, K, Dh)
            y = y.reshape(-1, hidden) if m == 1 else y.transpose(1, 2).reshape(-1, hidden)  # (B*K, hidden)
            x = x + attn.out(y)  # (B*K, hidden)
            x = x + block.mlp(block.norm2(x))
            new_kv += [k, v]
        decodes, log_rates = decode_outputs(model, self.eid, model.norm(x).reshape(-1, m, hidden))
        return (decodes, log_rates, *new_kv)


@dataclass
class StepState:
    """Torch-side ring state for :class:`StreamingStep` (the runtime keeps the numpy twin)."""

    k: list[Tensor]  # L x (B, H, S, Dh) rotated keys of the last C-1 bins
    v: list[Tensor]  # L x (B, H, S, Dh)
    key_bias: Tensor  # (B, S) 0 for filled slots, -inf for empty ones
    per_bin: int  # K tokens per bin; S = (C - 1) * K
    next_bin: int = 0

    @classmethod
    def empty(cls, model: NEDS, batch: int = 1, context: int | None = None) -> StepState:
        cfg = model.cfg
        c = context or cfg.n_bins
        slots = (c - 1) * model.tokens_per_bin
        shape = (batch, cfg.heads, slots, cfg.head_dim)
        dev = model.mask_token.device
        bias = torch.full((batch, slots), float("-inf"), device=dev)
        k = [torch.zeros(shape, device=dev) for _ in range(cfg.layers)]
        v = [torch.zeros(shape, device=dev) for _ in range(cfg.layers)]
        return cls(k, v, bias, model.tokens_per_bin)

    @property
    def ring_bins(self) -> int:
        return self.k[0].shape[2] // self.per_bin

    def cache(self) -> list[Tensor]:
        """Per-layer (k, v) interleaved, in StreamingStep's input order."""
        return [t for pair in zip(self.k, self.v, strict=True) for t in pair]


def step(module: StreamingStep, state: StepState, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Advance ``state`` by one bin of (B, N) counts; return (B, 6) decodes and (B, N) log-rates."""
    cfg = module.model.cfg
    cos, sin = (torch.from_numpy(a).to(counts.device) for a in
                rotary_step_tables(state.next_bin, cfg.head_dim, cfg.rope_base))
    decodes, log_rates, *new_kv = module(counts, state.key_bias, cos, sin, *state.cache())
    if state.ring_bins > 0:
        k = state.per_bin
        slot = (state.next_bin % state.ring_bins) * k
        for layer in range(len(state.k)):
            state.k[layer][:, :, slot:slot + k] = new_kv[2 * layer]
            state.v[layer][:, :, slot:slot + k] = new_kv[2 * layer + 1]
        state.key_bias[:, slot:slot + k] = 0.0
    state.next_bin += 1
    return decodes, log_rates


def banded_mask(n_bins: int, context: int, device: torch.device, per_bin: int) -> Tensor:
    """(L, L) bool over time-major tokens (K = ``per_bin`` per bin): query bin q sees key bin k when
    0 <= q - k < context."""
    pos = torch.arange(n_bins, device=device).repeat_interleave(per_bin)  # (L,)
    diff = pos[:, None] - pos[None, :]
    return (diff >= 0) & (diff < context)


def banded_recompute(model: NEDS, eid: str, counts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Reference: (B, T, N) counts recomputed at once with a C-bin sliding window -> (B, T, 6), (B, T, N)."""
    b, t, _ = counts.shape
    k = model.tokens_per_bin
    x = torch.stack([bin_tokens(model, eid, counts[:, i]) for i in range(t)], dim=1)  # (B, T, K, hidden)
    x = x.reshape(b, t * k, -1)  # (B, L, hidden) time-major
    pos = model.positions(t, counts.device)  # (L,)
    cos, sin = rotary_tables(pos, model.cfg.head_dim, model.cfg.rope_base)
    allowed = banded_mask(t, context, counts.device, k)
    for block in model.blocks:
        x = block(x, cos, sin, allowed)
    h = model.norm(x).view(b, t, k, -1)  # (B, T, K, hidden)
    return decode_outputs(model, eid, h)


__all__ = ["DECODE_CHANNELS", "MODALITIES", "StepState", "StreamingStep", "banded_recompute",
           "rotate_half_matrix", "step"]
