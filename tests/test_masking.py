"""Multi-task masking: the four schemes, ratios, seeds, evaluation masks, losses on masked tokens only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neds_rt.errors import ConfigError, DataError
from training.arrays import TRAIN, VAL, Normalisation, TrialArrays
from training.masking import (
    VAR_FLOOR,
    Scheme,
    draw_masks,
    drop_units,
    eval_mask,
    masked_losses,
    target_variance,
)
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


Case = tuple[NEDSOutput, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _regression_case(seed: int = 0) -> Case:
    """4 trials, 6 units; spikes, wheel (trial 0, bins 20:), whisker (trial 2, bins :15) and choice masked."""
    b, n = 4, 6
    g = torch.Generator().manual_seed(seed)
    spikes = torch.poisson(torch.full((b, T, n), 0.7), generator=g)
    wheel, whisker = 0.1 * torch.rand(b, T, generator=g), 0.3 * torch.rand(b, T, generator=g)  # small scale
    choice, block = torch.tensor([0, 1, 1, 0]), torch.tensor([2, 0, 1, 1])
    mask = torch.zeros(b, N_MODALITIES, T, dtype=torch.bool)
    mask[:, SPIKES, :10] = True
    mask[0, WHEEL, 20:] = True
    mask[2, WHISKER, :15] = True
    mask[1, CHOICE] = True
    return _outputs(b, n, seed + 1), spikes, wheel, whisker, choice, block, mask


def test_target_var_divides_regression_mse_only() -> None:
    out, spikes, wheel, whisker, choice, block, mask = _regression_case()
    var = {"wheel": 0.015, "whisker": 0.2}
    plain = masked_losses(out, spikes, wheel, whisker, choice, block, mask)
    norm = masked_losses(out, spikes, wheel, whisker, choice, block, mask, target_var=var)
    assert set(norm) == {"spikes", "wheel", "whisker", "choice", "total"}
    mse_wheel = float(((out.wheel[0, 20:] - wheel[0, 20:]) ** 2).mean())
    mse_whisker = float(((out.whisker[2, :15] - whisker[2, :15]) ** 2).mean())
    assert float(norm["wheel"]) == pytest.approx(mse_wheel / 0.015, rel=1e-5)
    assert float(norm["whisker"]) == pytest.approx(mse_whisker / 0.2, rel=1e-5)
    for k in ("spikes", "choice"):  # the other losses are untouched
        torch.testing.assert_close(norm[k], plain[k])
    assert float(norm["total"]) == pytest.approx(sum(float(norm[k]) for k in set(norm) - {"total"}), rel=1e-6)
    assert float(norm["total"]) > float(plain["total"])  # a variance < 1 weighs the regression losses up
    # the normalised loss of the mean predictor is 1 (the 1 - R² scale)
    mean_pred = out._replace(wheel=torch.full_like(wheel, float(wheel[0, 20:].mean())))
    var_true = {"wheel": float(wheel[0, 20:].var(unbiased=False)), "whisker": 1.0}
    at_mean = masked_losses(mean_pred, spikes, wheel, whisker, choice, block, mask, target_var=var_true)
    assert float(at_mean["wheel"]) == pytest.approx(1.0, rel=1e-5)


def test_spike_weight_scales_the_spike_loss_in_the_total_only() -> None:
    out, spikes, wheel, whisker, choice, block, mask = _regression_case(seed=1)
    plain = masked_losses(out, spikes, wheel, whisker, choice, block, mask)
    heavy = masked_losses(out, spikes, wheel, whisker, choice, block, mask, spike_weight=100.0)
    for k in set(plain) - {"total"}:  # the per-modality losses come back unweighted
        torch.testing.assert_close(heavy[k], plain[k])
    rest = sum(float(plain[k]) for k in set(plain) - {"total", "spikes"})
    assert float(heavy["total"]) == pytest.approx(100.0 * float(plain["spikes"]) + rest, rel=1e-5)
    assert float(plain["total"]) == pytest.approx(float(plain["spikes"]) + rest, rel=1e-6)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="spike_weight"):
            masked_losses(out, spikes, wheel, whisker, choice, block, mask, spike_weight=bad)


def test_normalised_regression_loss_is_scale_free() -> None:
    out, spikes, wheel, whisker, choice, block, mask = _regression_case(seed=3)
    var = {"wheel": float(wheel.var()), "whisker": float(whisker.var())}
    c = 40.0  # another min-max range of the same behaviour: targets, predictions and variance rescale
    scaled = out._replace(wheel=out.wheel * c + 2.0, whisker=out.whisker * c - 1.0)
    ref = masked_losses(out, spikes, wheel, whisker, choice, block, mask, target_var=var)
    big = masked_losses(scaled, spikes, wheel * c + 2.0, whisker * c - 1.0, choice, block, mask,
                        target_var={k: v * c**2 for k, v in var.items()})
    for k in ("wheel", "whisker", "total"):
        assert float(big[k]) == pytest.approx(float(ref[k]), rel=1e-4)
    plain = masked_losses(scaled, spikes, wheel * c + 2.0, whisker * c - 1.0, choice, block, mask)
    assert float(plain["wheel"]) == pytest.approx(c**2 * var["wheel"] * float(ref["wheel"]), rel=1e-4)


def test_bad_target_var_is_an_error() -> None:
    out, spikes, wheel, whisker, choice, block, mask = _regression_case()
    for bad in ({"wheel": 0.1}, {"wheel": 0.1, "whisker": 0.0}, {"wheel": float("nan"), "whisker": 0.1}):
        with pytest.raises(ConfigError, match="target_var"):
            masked_losses(out, spikes, wheel, whisker, choice, block, mask, target_var=bad)


def _session(wheel: np.ndarray, whisker: np.ndarray, split: np.ndarray) -> TrialArrays:
    k, t = wheel.shape
    return TrialArrays(
        eid="e1", probe="probe00", unit_ids=np.arange(3, dtype=np.int64), regions=np.array(["CA1"] * 3),
        spikes=np.zeros((k, t, 3), dtype=np.uint16), wheel=wheel.astype(np.float32),
        whisker=whisker.astype(np.float32), choice=np.zeros(k, dtype=np.int64),
        block=np.zeros(k, dtype=np.int64),
        trial_index=np.arange(k, dtype=np.int64), window_start=np.arange(k, dtype=np.float64),
        split=split.astype(np.int8), norm=Normalisation(0.0, 1.0, 0.0, 1.0),
    )


def test_target_variance_comes_from_training_trials_and_is_floored() -> None:
    rng = np.random.default_rng(0)
    split = np.array([TRAIN] * 8 + [VAL] * 2)
    wheel = rng.random((10, T)) * 0.3  # (K, T)
    wheel[split == VAL] = 50.0 + 10 * rng.random((2, T))  # held-out trials far off: must not count
    whisker = np.full((10, T), 0.4)  # a flat target
    var = target_variance(_session(wheel, whisker, split))
    assert set(var) == {"wheel", "whisker"}
    assert var["wheel"] == pytest.approx(float(wheel[:8].astype(np.float32).var(dtype=np.float64)), rel=1e-6)
    assert var["whisker"] == VAR_FLOOR
    assert target_variance(_session(wheel, whisker, split), split=VAL)["wheel"] > 1.0
    assert target_variance(_session(wheel, whisker, split), floor=0.5)["wheel"] == 0.5


def test_target_variance_errors() -> None:
    wheel = np.zeros((4, T))
    with pytest.raises(DataError, match="no trial in the 'train' split"):
        target_variance(_session(wheel, wheel, np.full(4, VAL)))
    with pytest.raises(DataError, match="wheel: has no finite value in the 'train' split"):
        target_variance(_session(np.full((4, T), np.nan), wheel, np.full(4, TRAIN)))


def test_target_variance_skips_non_finite_bins() -> None:
    rng = np.random.default_rng(1)
    wheel = rng.random((4, T))  # (K, T)
    bad = wheel.copy()
    bad[0, 3], bad[2, 7] = np.nan, np.inf  # left for the training step to report with its trials
    kept = bad.astype(np.float32)[np.isfinite(bad)]  # (n,) the finite bins, as stored
    var = target_variance(_session(bad, wheel, np.full(4, TRAIN)))
    assert var["wheel"] == pytest.approx(float(kept.var(dtype=np.float64)), rel=1e-6)


def test_unit_dropout_zeroes_whole_units_per_trial_and_keeps_the_expected_input() -> None:
    spikes = torch.ones(64, 3, 200)  # (B, T, N)
    gen = torch.Generator().manual_seed(0)
    assert drop_units(spikes, 0.0, gen) is spikes  # off: the input itself, nothing drawn
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())
    out = drop_units(spikes, 0.5, gen)
    assert out.shape == spikes.shape and set(out.unique().tolist()) == {0.0, 2.0}  # kept units x 1/(1-p)
    assert torch.equal(out, out[:, :1].expand_as(out))  # a unit is dropped in every bin of its trial
    dropped = (out[:, 0] == 0).float().mean().item()  # over 64 x 200 trial-units
    assert abs(dropped - 0.5) < 0.03 and abs(out.mean().item() - 1.0) < 0.06
    assert not torch.equal(out[0], out[1])  # each trial draws its own units
    again = drop_units(spikes, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again, drop_units(spikes, 0.5, torch.Generator().manual_seed(0)))  # seeded
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="unit dropout"):
            drop_units(spikes, bad, gen)
