"""Multi-task masking: the four schemes, ratios, seeds, evaluation masks, losses on masked tokens only."""

from __future__ import annotations

import pytest
import torch

from neds_rt.errors import ConfigError
from training.masking import Scheme, draw_masks, eval_mask, masked_losses
from training.model import BEHAVIOUR, CHOICE, DISCRETE, N_MODALITIES, SPIKES, WHEEL, WHISKER, NEDSOutput

pytestmark = pytest.mark.timeout(60)
T = 50


def draw(batch: int = 400, ratio: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return draw_masks(batch, T, ratio, torch.Generator().manual_seed(seed))


def test_every_scheme_is_drawn_and_follows_its_rule() -> None:
    mask, scheme = draw()
    assert mask.shape == (400, N_MODALITIES, T) and mask.dtype == torch.bool
    assert set(scheme.tolist()) == {int(s) for s in Scheme}
    k = round(0.3 * T)
    for m, s in zip(mask, scheme.tolist(), strict=True):
        per_mod = m.sum(dim=1)  # (M,) masked bins per modality
        if s == Scheme.ENCODING:
            assert per_mod.tolist() == [T, 0, 0, 0, 0]
        elif s == Scheme.DECODING:
            assert per_mod.tolist() == [0, T, T, T, T]
        elif s == Scheme.WITHIN:
            hit = [i for i in range(N_MODALITIES) if per_mod[i] > 0]
            assert len(hit) == 1
            assert int(per_mod[hit[0]]) == (T if hit[0] in DISCRETE else k)
        else:
            assert torch.equal(m[SPIKES], m[WHEEL]) and torch.equal(m[SPIKES], m[WHISKER])
            assert int(per_mod[SPIKES]) == k
            for d in DISCRETE:
                assert int(per_mod[d]) in (0, T)  # a class token is hidden whole or not at all


def test_within_modality_picks_spikes_and_behaviour() -> None:
    mask, scheme = draw(batch=600, seed=1)
    within = mask[scheme == Scheme.WITHIN]
    picked = {int(m.sum(dim=1).argmax()) for m in within}
    assert picked == set(range(N_MODALITIES))


def test_masks_are_seeded() -> None:
    a, sa = draw(seed=7)
    b, sb = draw(seed=7)
    c, _ = draw(seed=8)
    assert torch.equal(a, b) and torch.equal(sa, sb) and not torch.equal(a, c)


def test_ratio_controls_random_bins_and_is_checked() -> None:
    mask, scheme = draw_masks(50, T, 0.1, torch.Generator().manual_seed(0), schemes=(Scheme.CROSS,))
    assert (scheme == Scheme.CROSS).all()
    assert (mask[:, SPIKES].sum(dim=1) == 5).all()
    tiny, _ = draw_masks(4, 3, 0.1, torch.Generator(), schemes=(Scheme.CROSS,))
    assert (tiny[:, SPIKES].sum(dim=1) == 1).all()  # at least one bin
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ConfigError, match="mask ratio"):
            draw_masks(2, T, bad, torch.Generator())
    with pytest.raises(ConfigError, match="at least one masking scheme"):
        draw_masks(2, T, 0.3, torch.Generator(), schemes=())


def test_eval_masks() -> None:
    enc = eval_mask("encoding", 3, T)
    dec = eval_mask("decoding", 3, T)
    assert enc[:, SPIKES].all() and not enc[:, list(BEHAVIOUR)].any()
    assert dec[:, list(BEHAVIOUR)].all() and not dec[:, SPIKES].any()
    with pytest.raises(ConfigError, match="evaluation mask"):
        eval_mask("both", 1, T)


def _outputs(b: int, n: int, seed: int) -> NEDSOutput:
    g = torch.Generator().manual_seed(seed)
    return NEDSOutput(
        spikes=torch.randn(b, T, n, generator=g), wheel=torch.randn(b, T, generator=g),
        whisker=torch.randn(b, T, generator=g), choice=torch.randn(b, T, 2, generator=g),
        block=torch.randn(b, T, 3, generator=g),
    )


def test_losses_count_masked_tokens_only() -> None:
    b, n = 4, 6
    g = torch.Generator().manual_seed(0)
    spikes = torch.poisson(torch.full((b, T, n), 0.7), generator=g)
    wheel, whisker = torch.rand(b, T, generator=g), torch.rand(b, T, generator=g)
    choice, block = torch.tensor([0, 1, 1, 0]), torch.tensor([2, 0, 1, 1])
    mask = torch.zeros(b, N_MODALITIES, T, dtype=torch.bool)
    mask[:, SPIKES, :10] = True
    mask[0, WHEEL, 20:] = True
    mask[1, CHOICE] = True
    out = _outputs(b, n, 1)
    ref = masked_losses(out, spikes, wheel, whisker, choice, block, mask)
    assert set(ref) == {"spikes", "wheel", "choice", "total"}
    assert float(ref["total"]) == pytest.approx(sum(float(ref[k]) for k in ("spikes", "wheel", "choice")))
    # predictions on visible tokens do not change the loss
    moved = out._replace(spikes=out.spikes.clone(), wheel=out.wheel.clone(), whisker=out.whisker + 9)
    moved.spikes[:, 10:] += 3.0
    moved.wheel[1:] -= 2.0
    moved.wheel[0, :20] += 1.0
    same = masked_losses(moved, spikes, wheel, whisker, choice, block, mask)
    torch.testing.assert_close(same["total"], ref["total"])
    # on masked tokens they do
    moved.spikes[:, :10] += 0.5
    changed = masked_losses(moved, spikes, wheel, whisker, choice, block, mask)["spikes"]
    assert float(changed) != pytest.approx(float(ref["spikes"]))
    expected_wheel = float(((out.wheel[0, 20:] - wheel[0, 20:]) ** 2).mean())
    assert float(ref["wheel"]) == pytest.approx(expected_wheel, rel=1e-5)
    expected_choice = float(torch.nn.functional.cross_entropy(out.choice[1:2].mean(dim=1), choice[1:2]))
    assert float(ref["choice"]) == pytest.approx(expected_choice, rel=1e-5)
    assert "block" not in ref and "whisker" not in ref


def test_nothing_masked_is_an_error() -> None:
    mask = torch.zeros(1, N_MODALITIES, T, dtype=torch.bool)
    z = torch.zeros(1, T)
    with pytest.raises(ConfigError, match="hides no token"):
        masked_losses(_outputs(1, 2, 0), torch.zeros(1, T, 2), z, z, torch.zeros(1, dtype=torch.long),
                      torch.zeros(1, dtype=torch.long), mask)
