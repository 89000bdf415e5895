"""Streaming training data: continuous windows cut anywhere, per-bin labels, and training on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neds_rt.errors import DataError
from training.arrays import TEST, TRAIN, VAL, ContinuousArrays, Normalisation
from training.masking import eval_mask, masked_losses
from training.windows import build_window_arrays, excluded_bins


def _continuous(n_bins: int = 3000, n_units: int = 8, seed: int = 0) -> ContinuousArrays:
    rng = np.random.default_rng(seed)
    # trials of 150 bins separated by 30-bin gaps; each trial has a split, a choice and a block
    choice = np.full(n_bins, -1, dtype=np.int64)
    block = np.full(n_bins, -1, dtype=np.int64)
    split = np.zeros(n_bins, dtype=np.int8)
    for k, start in enumerate(range(0, n_bins, 180)):
        choice[start:start + 150] = k % 2
        block[start:start + 150] = k % 3
        split[start:start + 180] = (TRAIN, TRAIN, VAL, TRAIN, TEST)[k % 5]
    drive = np.where(choice == 1, 2.0, 0.3)  # unit 0 fires with the choice
    spikes = rng.poisson(np.column_stack([drive] + [np.full(n_bins, 0.3)] * (n_units - 1)))
    return ContinuousArrays(
        eid="e1", probe="probe00", unit_ids=np.arange(n_units), regions=np.array(["CA1"] * n_units),
        t0=10.0, spikes=spikes.astype(np.uint16),
        wheel=(0.7 * (choice == 1) + 0.1 * rng.random(n_bins)).astype(np.float32),  # follows unit 0's drive
        whisker=rng.random(n_bins).astype(np.float32), choice=choice, block=block, split=split,
        norm=Normalisation(0, 1, 0, 1),
    )


def test_windows_lie_inside_one_split_and_keep_per_bin_labels() -> None:
    cont = _continuous()
    arr = build_window_arrays(cont, window_bins=100, seed=3)
    assert arr.spikes.shape[1:] == (100, 8) and arr.choice.shape == arr.spikes.shape[:2]
    for k in range(arr.spikes.shape[0]):
        s = int(arr.trial_index[k])
        assert (cont.split[s:s + 100] == arr.split[k]).all()
        np.testing.assert_array_equal(arr.spikes[k], cont.spikes[s:s + 100])
        np.testing.assert_array_equal(arr.choice[k], cont.choice[s:s + 100])
        assert arr.window_start[k] == pytest.approx(10.0 + s * 0.02)
    assert {int(x) for x in np.unique(arr.split)} == {TRAIN, VAL, TEST}
    assert (arr.choice == -1).any()  # windows span inter-trial gaps, not only trials
    starts = np.sort(arr.trial_index[arr.split == TRAIN])
    assert len({int(s) % 180 for s in starts}) > 3  # cut at many phases, not only at trial onsets


def test_excluded_ranges_are_kept_out_of_every_window() -> None:
    cont = _continuous()  # t0 = 10 s, 20 ms bins
    # two test-trial-like ranges off the bin grid, and one partly before the session start
    ranges = np.array([[18.031, 22.047], [40.005, 40.51], [5.0, 10.03]])
    blocked = excluded_bins(cont, ranges)
    bin_lo = cont.t0 + np.arange(cont.spikes.shape[0]) * cont.bin_size  # (T_total,) bin starts
    touches = ((bin_lo[:, None] < ranges[None, :, 1]) & (bin_lo[:, None] + cont.bin_size
                                                             > ranges[None, :, 0])).any(axis=1)
    np.testing.assert_array_equal(blocked, touches)
    assert blocked[:2].all() and not blocked[2] and blocked[401] and not blocked[400]
    arr = build_window_arrays(cont, window_bins=50, stride=10, seed=1, exclude=ranges)
    plain = build_window_arrays(cont, window_bins=50, stride=10, seed=1)
    for s in arr.trial_index:
        assert not blocked[int(s):int(s) + 50].any()
    assert any(blocked[int(s):int(s) + 50].any() for s in plain.trial_index)  # the ranges mattered
    assert 0 < arr.spikes.shape[0] < plain.spikes.shape[0] and arr.meta["excluded_ranges"] == 3
    with pytest.raises(DataError, match="exclude"):
        excluded_bins(cont, np.array([[12.0, 11.0]]))


def test_too_short_stretches_are_a_clear_error() -> None:
    with pytest.raises(DataError, match="session e1: has no stretch of 500 bins"):
        build_window_arrays(_continuous(), window_bins=500)


def test_per_bin_losses_ignore_unlabelled_bins() -> None:
    from tests._models import tiny_streaming_model

    model = tiny_streaming_model(n_units=8)
    eid = model.eids[0]
    spikes = torch.poisson(torch.full((2, 20, 8), 0.5))
    choice = torch.full((2, 20), -1, dtype=torch.int64)
    choice[0, 5:] = 1
    block = torch.ones(2, 20, dtype=torch.int64)
    mask = eval_mask("decoding", 2, 20)
    out = model(eid, spikes, torch.zeros(2, 20), torch.zeros(2, 20), choice, block, mask)
    losses = masked_losses(out, spikes, torch.zeros(2, 20), torch.zeros(2, 20), choice, block, mask)
    expected = torch.nn.functional.cross_entropy(out.choice[0, 5:], choice[0, 5:])
    assert torch.allclose(losses["choice"], expected)
    # an unlabelled bin behaves as masked even when the mask shows it: its input is the mask token
    visible = torch.zeros_like(mask)
    visible[:, 0] = True  # only spikes masked: behaviour "visible"
    a = model(eid, spikes, torch.zeros(2, 20), torch.zeros(2, 20), choice, block, visible)
    b = model(eid, spikes, torch.zeros(2, 20), torch.zeros(2, 20), torch.where(choice < 0, 0, choice), block,
              visible)
    assert not torch.allclose(a.spikes[1], b.spikes[1])


def test_streaming_training_on_windows_lowers_heldout_loss(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from training.config import NEDSConfig, TrainConfig
    from training.train import build_model, masked_eval_loss, train

    arrays = {"e1": build_window_arrays(_continuous(n_bins=6000), window_bins=50, seed=0)}
    cfg = NEDSConfig.preset("tiny", mode="streaming", n_bins=50, dropout=0.0)
    before = masked_eval_loss(build_model(cfg, arrays, seed=0), arrays, VAL)
    result = train(arrays, tmp_path / "run", cfg, TrainConfig(epochs=4, batch_size=8, lr=3e-3,
                                                              progress=False))
    assert masked_eval_loss(result.model, arrays, VAL) < before
    assert (tmp_path / "run" / "best.pt").exists()
