"""The NEDS model: shapes, sessions keyed by eid, mask tokens, causal streaming attention, rotary positions,
parameter count, config rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neds_rt.errors import ConfigError, ModelFileError
from training.config import NEDSConfig, layers_for_sessions
from training.masking import eval_mask
from training.model import (
    BLOCK,
    CHOICE,
    MODALITIES,
    NEDS,
    SPIKES,
    WHEEL,
    Block,
    SessionVocab,
    apply_rotary,
    count_parameters,
    rotary_tables,
    session_key,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_torch_thread")]
EID = "d2f5a130-b981-4546-8858-c94ae1da75ff"


def tiny(mode: str = "offline", tokens: str = "auto") -> NEDSConfig:
    return NEDSConfig.preset("tiny", n_bins=12, mode=mode, tokens=tokens)


def inputs(b: int, t: int, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    spikes = torch.poisson(torch.full((b, t, n), 0.5), generator=g)  # (B, T, N) counts
    wheel = torch.rand(b, t, generator=g)  # (B, T)
    whisker = torch.rand(b, t, generator=g)  # (B, T)
    choice = torch.randint(2, (b,), generator=g)  # (B,)
    block = torch.randint(3, (b,), generator=g)  # (B,)
    return spikes, wheel, whisker, choice, block


def test_forward_shapes_per_session() -> None:
    torch.manual_seed(0)
    model = NEDS(tiny()).eval()
    model.add_session(EID, 9)
    model.add_session("other", 4)
    mask = eval_mask("encoding", 3, 12)
    out = model(EID, *inputs(3, 12, 9), mask)
    assert out.spikes.shape == (3, 12, 9)
    assert out.wheel.shape == (3, 12) and out.whisker.shape == (3, 12)
    assert out.choice.shape == (3, 12, 2) and out.block.shape == (3, 12, 3)
    assert model("other", *inputs(2, 12, 4), eval_mask("decoding", 2, 12)).spikes.shape == (2, 12, 4)
    assert all(torch.isfinite(x).all() for x in out)


@pytest.mark.parametrize("tokens", ["modality", "fused"])
def test_readout_of_bins_is_the_heads_for_any_leading_shape(tokens: str) -> None:
    torch.manual_seed(0)
    model = NEDS(tiny(tokens=tokens)).eval()
    model.add_session(EID, 9)
    k, hidden = model.tokens_per_bin, model.cfg.hidden
    h = torch.randn(2, 12 * k, hidden)  # (B, T*K, hidden) final states
    heads = model.heads(EID, h)
    bins = model.readout(EID, h.view(24, k, hidden))  # (B*T, K, hidden): no time axis, as a streaming step
    kept = model.readout(EID, h.view(2, 12, k, hidden), channel_axis=True)
    for name, whole, flat, with_axis in zip(heads._fields, heads, bins, kept, strict=True):
        torch.testing.assert_close(flat, whole.reshape(24, *whole.shape[2:]), msg=name)
        expected = whole.unsqueeze(-1) if name in ("wheel", "whisker") else whole
        torch.testing.assert_close(with_axis, expected, msg=name)


def test_sessions_keyed_by_eid() -> None:
    model = NEDS(tiny())
    vocab = SessionVocab(EID, np.arange(5, dtype=np.int64), np.array(["CA1"] * 5))
    model.add_session(EID, 5, vocab)
    assert session_key(EID) in model.sessions and "-" not in session_key(EID)
    assert model.eids == [EID] and model.vocab[EID] is vocab
    with pytest.raises(ModelFileError, match="already in the model"):
        model.add_session(EID, 5)
    old = model.session(EID).stitch.weight
    model.add_session(EID, 6, replace=True)  # rebuild with another unit count
    new = model.session(EID).stitch.weight
    assert new.shape == (tiny().hidden, 6) and new is not old
    assert EID not in model.vocab
    with pytest.raises(ModelFileError, match="same module key"):
        model.add_session(EID.replace("-", "_"), 3)
    with pytest.raises(ModelFileError, match="is not a session of this model"):
        model.session("nope")
    with pytest.raises(ModelFileError, match="must list n_units=4 units"):
        model.add_session("x", 4, vocab)
    with pytest.raises(ModelFileError, match="must have 6 unit columns"):
        model(EID, *inputs(1, 12, 7), eval_mask("encoding", 1, 12))
    model.remove_session(EID)
    assert model.eids == []


@pytest.mark.parametrize("tokens", ["modality", "fused"])
def test_masked_inputs_do_not_reach_the_model(tokens: str) -> None:
    torch.manual_seed(1)
    model = NEDS(tiny(tokens=tokens)).eval()
    model.add_session(EID, 6)
    spikes, wheel, whisker, choice, block = inputs(2, 12, 6)
    enc = eval_mask("encoding", 2, 12)
    a = model(EID, spikes, wheel, whisker, choice, block, enc)
    b = model(EID, spikes * 7 + 3, wheel, whisker, choice, block, enc)  # spikes hidden: no effect
    torch.testing.assert_close(a.spikes, b.spikes)
    dec = eval_mask("decoding", 2, 12)
    c = model(EID, spikes, wheel, whisker, choice, block, dec)
    d = model(EID, spikes, 1 - wheel, whisker * 0, 1 - choice, (block + 1) % 3, dec)
    torch.testing.assert_close(c.wheel, d.wheel)
    torch.testing.assert_close(c.choice, d.choice)
    e = model(EID, spikes, 1 - wheel, whisker, choice, block, enc)  # visible behaviour does matter
    assert not torch.allclose(a.spikes, e.spikes)


@pytest.mark.parametrize(("mode", "tokens"), [("offline", "modality"), ("streaming", "modality"),
                                               ("offline", "fused"), ("streaming", "fused")])
def test_streaming_attention_is_causal_over_bins(mode: str, tokens: str) -> None:
    torch.manual_seed(2)
    model = NEDS(tiny(mode, tokens)).eval()
    model.add_session(EID, 5)
    spikes, wheel, whisker, choice, block = inputs(1, 12, 5)
    mask = torch.zeros(1, len(MODALITIES), 12, dtype=torch.bool)
    a = model(EID, spikes, wheel, whisker, choice, block, mask)
    later = spikes.clone()
    later[:, 8:] += 5  # change only bins 8..11
    b = model(EID, later, wheel, whisker, choice, block, mask)
    past_equal = torch.allclose(a.wheel[:, :8], b.wheel[:, :8], atol=1e-6)
    assert past_equal == (mode == "streaming")
    assert not torch.allclose(a.wheel[:, 8:], b.wheel[:, 8:])


def test_streaming_mask_is_block_causal() -> None:
    model = NEDS(tiny("streaming", "modality"))
    allowed = model.attention_mask(3, torch.device("cpu"))
    assert allowed is not None and allowed.shape == (15, 15)
    pos = model.positions(3, torch.device("cpu"))
    assert pos.tolist() == [0] * 5 + [1] * 5 + [2] * 5  # time-major: 5 modality tokens per bin
    assert bool(allowed[0, 4]) and not bool(allowed[4, 5]) and bool(allowed[14, 0])
    assert NEDS(tiny()).attention_mask(3, torch.device("cpu")) is None
    fused = NEDS(tiny("streaming"))  # the streaming default: one token per bin
    assert fused.positions(3, torch.device("cpu")).tolist() == [0, 1, 2]
    f_allowed = fused.attention_mask(3, torch.device("cpu"))
    assert f_allowed is not None and f_allowed.tolist() == [[True, False, False], [True, True, False],
                                                            [True, True, True]]


def test_token_layout_defaults_and_old_checkpoints() -> None:
    assert NEDSConfig(mode="streaming").tokens == "fused" and NEDSConfig().tokens == "modality"
    assert NEDSConfig(mode="streaming", tokens="modality").tokens == "modality"
    # a config saved before the layout was configurable rebuilds as one token per modality
    assert NEDSConfig.from_dict({"mode": "streaming"}).tokens == "modality"
    with pytest.raises(ConfigError, match="tokens"):
        NEDSConfig(tokens="pooled")  # type: ignore[arg-type]


@pytest.mark.parametrize("reads_spikes", [True, False])
def test_class_heads_read_the_class_and_spike_tokens(reads_spikes: bool) -> None:
    """Per-modality tokens: the choice and block logits of each bin come from the class token's final state,
    plus the spike token's when ``class_reads_spikes``; a config saved before the option reads the class
    token alone."""
    torch.manual_seed(6)
    model = NEDS(NEDSConfig.preset("tiny", n_bins=12, class_reads_spikes=reads_spikes)).eval()
    mods = model.add_session(EID, 7)
    args = inputs(2, 12, 7, seed=3)
    mask = eval_mask("decoding", 2, 12)
    h = model.encode(model.embed(EID, *args, mask), 12).view(2, 12, 5, -1)  # (B, T, M, hidden)
    out = model(EID, *args, mask)
    for modality, head, logits in ((CHOICE, mods.choice_out, out.choice), (BLOCK, mods.block_out, out.block)):
        state = h[:, :, modality] + (h[:, :, SPIKES] if reads_spikes else 0.0)  # (B, T, hidden)
        torch.testing.assert_close(logits, head(state))
        other = h[:, :, modality] + (0.0 if reads_spikes else h[:, :, SPIKES])
        assert not torch.allclose(logits, head(other), atol=1e-4)
    assert NEDSConfig.from_dict({"hidden": 32, "heads": 4}).class_reads_spikes is False
    assert NEDSConfig().class_reads_spikes is True


def test_fused_token_is_the_sum_of_the_modality_tokens() -> None:
    """Same weights, two layouts: the fused input token equals the sum of the five per-modality tokens
    minus four extra session embeddings."""
    torch.manual_seed(5)
    per_mod = NEDS(tiny("streaming", "modality")).eval()
    per_mod.add_session(EID, 6)
    fused = NEDS(tiny("streaming", "fused")).eval()
    fused.add_session(EID, 6)
    fused.load_state_dict(per_mod.state_dict())
    spikes, wheel, whisker, choice, block = inputs(2, 12, 6)
    mask = eval_mask("decoding", 2, 12)
    x5 = per_mod.embed(EID, spikes, wheel, whisker, choice, block, mask).view(2, 12, 5, -1)  # (B, T, M, h)
    x1 = fused.embed(EID, spikes, wheel, whisker, choice, block, mask)  # (B, T, h)
    emb = per_mod.session(EID).embedding
    torch.testing.assert_close(x1, x5.sum(dim=2) - 4 * emb)


def test_rotary_scores_depend_on_relative_position() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 1, 8, generator=g)
    k = torch.randn(1, 1, 1, 8, generator=g)

    def score(pq: int, pk: int) -> float:
        cos, sin = rotary_tables(torch.tensor([pq, pk]), 8, 10000.0)
        qr = apply_rotary(q, cos[:1], sin[:1])
        kr = apply_rotary(k, cos[1:], sin[1:])
        return float((qr * kr).sum())

    assert score(3, 1) == pytest.approx(score(102, 100), rel=1e-4, abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
    cos, sin = rotary_tables(torch.tensor([5]), 8, 10000.0)
    assert float(apply_rotary(q, cos, sin).norm()) == pytest.approx(float(q.norm()), rel=1e-5)


def _expected_parameters(cfg: NEDSConfig, n_units: int) -> int:
    h, m = cfg.hidden, cfg.mlp
    block = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * m + m) + (m * h + h)
    shared = (2 + 3) * h + 5 * h + 5 * h + cfg.n_bins * h + cfg.layers * block + 2 * h
    tokenizers = (n_units * h + h) + 2 * (2 * h) + h  # stitching, wheel/whisker in, session embedding
    heads = (h * n_units + n_units) + 2 * (h + 1) + (2 * h + 2) + (3 * h + 3)
    session = tokenizers + heads
    return shared + session


def test_default_model_parameter_count() -> None:
    cfg = NEDSConfig()
    assert (cfg.hidden, cfg.heads, cfg.mlp, cfg.layers, cfg.n_bins) == (256, 8, 512, 5, 100)
    model = NEDS(cfg)
    model.add_session(EID, 600)
    assert count_parameters(model) == _expected_parameters(cfg, 600)
    assert set(model.shared_parameters()) == {
        n for n, _ in model.named_parameters() if not n.startswith("sessions.")
    }


def test_config_rules_and_presets() -> None:
    assert layers_for_sessions(1) == layers_for_sessions(10) == 5
    assert layers_for_sessions(11) > 5 and layers_for_sessions(100) >= layers_for_sessions(11)
    assert NEDSConfig.preset("default", n_sessions=50).layers == layers_for_sessions(50)
    assert NEDSConfig.preset("tiny").hidden == 32 and NEDSConfig.preset("tiny").layers == 2
    assert NEDSConfig(mode="streaming").causal and not NEDSConfig().causal
    with pytest.raises(ConfigError, match="divisible by heads"):
        NEDSConfig(hidden=100, heads=8)
    with pytest.raises(ConfigError, match="mode"):
        NEDSConfig(mode="online")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mask_ratio"):
        NEDSConfig(mask_ratio=1.5)
    with pytest.raises(ConfigError, match="preset"):
        NEDSConfig.preset("huge")
    with pytest.raises(ConfigError, match="does not know"):
        NEDSConfig.from_dict({"hidden": 32, "colour": "red"})


def test_gradients_reach_shared_and_session_layers() -> None:
    torch.manual_seed(4)
    model = NEDS(tiny())
    model.add_session(EID, 6)
    model.add_session("idle", 3)
    mask = torch.zeros(2, len(MODALITIES), 12, dtype=torch.bool)
    mask[:, SPIKES, :4] = True
    mask[:, WHEEL, 6:] = True
    out = model(EID, *inputs(2, 12, 6), mask)
    (out.spikes.sum() + out.wheel.sum() + out.choice.sum()).backward()
    assert model.session(EID).stitch.weight.grad is not None
    block = model.blocks[0]
    assert isinstance(block, Block) and block.attn.qkv.weight.grad is not None
    assert model.session("idle").stitch.weight.grad is None  # other sessions' layers sit out the step
