"""Step inference equals a full causal (sliding-window) recompute, across context roll-over."""

from __future__ import annotations

import pytest
import torch

from tests._models import tiny_streaming_model
from training.streaming import StepState, StreamingStep, banded_mask, banded_recompute, step


@pytest.mark.parametrize("tokens", ["fused", "modality"])
def test_500_steps_equal_full_recompute_across_rollover(tokens: str) -> None:
    model = tiny_streaming_model(n_units=10, tokens=tokens)
    eid = model.eids[0]
    context, n_steps = 24, 500  # the ring rolls over ~20 times
    gen = torch.Generator().manual_seed(1)
    counts = torch.poisson(torch.full((2, n_steps, 10), 0.4), generator=gen)  # (B, T, N) two streams
    with torch.no_grad():
        ref_dec, ref_rates = banded_recompute(model, eid, counts, context)
        state = StepState.empty(model, batch=2, context=context)
        module = StreamingStep(model, eid)
        worst = 0.0
        for t in range(n_steps):
            dec, rates = step(module, state, counts[:, t])
            worst = max(worst, (dec - ref_dec[:, t]).abs().max().item(),
                        (rates - ref_rates[:, t]).abs().max().item())
    assert worst < 1e-4, worst
    assert state.next_bin == n_steps


@pytest.mark.parametrize("tokens", ["fused", "modality"])
def test_streaming_output_depends_only_on_the_last_context_bins(tokens: str) -> None:
    """Changing a bin older than the context must not change the newest decode; a recent one must."""
    model = tiny_streaming_model(n_units=6, tokens=tokens)
    eid = model.eids[0]
    counts = torch.poisson(torch.full((1, 40, 6), 0.5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base, _ = banded_recompute(model, eid, counts, 8)
        old = counts.clone()
        old[0, 5] += 7.0  # more than 2 * 8 bins before the end: outside the 2-layer receptive field
        recent = counts.clone()
        recent[0, -3] += 7.0
        d_old, _ = banded_recompute(model, eid, old, 8)
        d_recent, _ = banded_recompute(model, eid, recent, 8)
    assert torch.allclose(d_old[0, -1], base[0, -1], atol=1e-6)
    assert not torch.allclose(d_recent[0, -1], base[0, -1], atol=1e-4)


def test_banded_mask_is_causal_within_the_window() -> None:
    mask = banded_mask(4, 2, torch.device("cpu"), per_bin=5)  # 4 bins x 5 tokens
    assert mask.shape == (20, 20)
    assert bool(mask[5, 0]) and bool(mask[0, 4])  # bin 1 sees bin 0; tokens of bin 0 see each other
    assert not bool(mask[0, 5])  # bin 0 never sees bin 1
    assert not bool(mask[10, 0])  # bin 2 no longer sees bin 0 with a 2-bin context
    fused = banded_mask(4, 2, torch.device("cpu"), per_bin=1)  # 4 bins x 1 token
    assert fused.tolist() == [[True, False, False, False], [True, True, False, False],
                              [False, True, True, False], [False, False, True, True]]


def test_step_needs_a_streaming_model() -> None:
    from training.config import NEDSConfig
    from training.model import NEDS

    model = NEDS(NEDSConfig.preset("tiny"))
    model.add_session("x", 3)
    with pytest.raises(ValueError, match="streaming mode"):
        StreamingStep(model, "x")


@pytest.mark.parametrize("tokens", ["fused", "modality"])
def test_training_forward_equals_the_streaming_reference(tokens: str) -> None:
    """What training optimises (forward with the decoding mask) is what a step serves: with the whole
    window inside the context, forward's wheel and choice equal banded_recompute's."""
    from training.masking import eval_mask

    model = tiny_streaming_model(n_units=7, tokens=tokens)
    eid = model.eids[0]
    t = 20
    counts = torch.poisson(torch.full((2, t, 7), 0.6), generator=torch.Generator().manual_seed(4))
    junk = torch.rand(2, t)  # behaviour is masked: its values must not matter
    with torch.no_grad():
        choice, block = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
        out = model(eid, counts, junk, junk, choice, block, eval_mask("decoding", 2, t))
        dec, rates = banded_recompute(model, eid, counts, context=t)
    norm = model.vocab[eid].norm
    wheel = out.wheel * (norm.wheel_max - norm.wheel_min) + norm.wheel_min  # (B, T) physical units
    torch.testing.assert_close(dec[..., 0], wheel, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec[..., 2], torch.softmax(out.choice, dim=-1)[..., 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rates, out.spikes, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [8, 32])
def test_rotary_tables_in_place_equal_the_function(head_dim: int) -> None:
    """The engine's allocation-free tables (RotaryTables) and rotary_step_tables both equal the rotate-half
    rule computed here in float64 (cos / sin of bin * base**(-2i/Dh), each half repeated, rounded once to
    float32), bit for bit, at small bins and at bins of streams that ran for days."""
    import numpy as np

    from neds_rt.rotary import RotaryTables, rotary_step_tables

    tables = RotaryTables(head_dim, 10000.0)
    cos, sin = np.zeros(head_dim, np.float32), np.zeros(head_dim, np.float32)
    half = 10000.0 ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (Dh/2,) float64
    for k in (0, 1, 2, 99, 100, 12_345, 10**7, 2**40):
        angles = np.tile(float(k) * half, 2)  # (Dh,) float64
        want_cos, want_sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        tables.write(k, cos, sin)
        np.testing.assert_array_equal(cos, want_cos)
        np.testing.assert_array_equal(sin, want_sin)
        got_cos, got_sin = rotary_step_tables(k, head_dim, 10000.0)
        np.testing.assert_array_equal(got_cos, want_cos)
        np.testing.assert_array_equal(got_sin, want_sin)
    assert not np.array_equal(cos, rotary_step_tables(5, head_dim, 10000.0)[0])  # the bin matters
