"""Layer probes (training.probes): known answers on hand-set stitching layers, and their failure modes."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from neds_rt.errors import DataError
from tests.test_train import synthetic_arrays, tiny_cfg
from training.arrays import TRAIN, TrialArrays
from training.baselines import LinearConfig, chunk_means, fit_trial_logistic
from training.model import NEDS
from training.probes import depth_names, probe_layers
from training.states import decoding_states

EID = "dddddddd-0000-4000-8000-000000000004"


def _model(arr: TrialArrays, **cfg: object) -> NEDS:
    torch.manual_seed(0)
    model = NEDS(tiny_cfg(**cfg))
    model.add_session(arr.eid, arr.spikes.shape[2])
    return model.eval()


def test_encode_layers_are_the_input_each_block_and_the_encoding() -> None:
    arr = synthetic_arrays(EID)
    model = _model(arr)
    x = torch.randn(3, 20 * model.tokens_per_bin, model.cfg.hidden)
    with torch.no_grad():
        states = model.encode_layers(x, 20)
        assert len(states) == model.cfg.layers + 2 == len(depth_names(model))
        assert torch.equal(states[0], x)
        assert torch.equal(states[1], model.blocks[0](x, *model.attention_inputs(20, x.device)))
        assert torch.equal(states[-1], model.encode(x, 20))


def test_a_stitching_that_copies_the_counts_probes_as_the_linear_decoder_on_them() -> None:
    arr = synthetic_arrays(EID, n_trials=120)  # choice moves every unit's rate
    model = _model(arr)
    n = arr.spikes.shape[2]
    with torch.no_grad():  # the spike token enters as the bin's raw counts in its first N dimensions
        stitch = model.session(arr.eid).stitch
        stitch.weight.zero_()
        stitch.weight[:n].copy_(torch.eye(n))
        stitch.bias.zero_()
    scores = probe_layers(model, arr)
    lin = LinearConfig()
    counts = chunk_means(arr.spikes.astype(np.float64), lin.n_chunks)  # (K, n_chunks * N)
    expected = fit_trial_logistic(counts, {"choice": (arr.choice, 2)}, arr.split, Cs=lin.Cs)["choice"]
    assert scores["choice"]["spike"]["input"] == pytest.approx(expected.balanced_accuracy, abs=1e-12)
    assert expected.balanced_accuracy > 0.8  # not a chance-level coincidence
    assert scores["choice"]["choice"]["input"] is None  # hidden in every trial: nothing to read
    assert list(scores) == ["choice", "block"] and list(scores["block"]) == ["spike", "block"]
    assert all(0.0 <= v <= 1.0 for v in scores["choice"]["spike"].values())


def test_a_blank_stitching_carries_nothing_into_the_input_tokens() -> None:
    arr = synthetic_arrays(EID)
    model = _model(arr)
    with torch.no_grad():
        model.session(arr.eid).stitch.weight.zero_()
    scores = probe_layers(model, arr)
    assert scores["choice"]["spike"]["input"] is None and scores["block"]["spike"]["input"] is None
    # behaviour is hidden and the spikes are blank: every depth sees the same tokens in every trial
    assert all(v is None for v in scores["choice"]["spike"].values())


def test_a_label_with_one_class_on_train_scores_none_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    arr = synthetic_arrays(EID)
    block = np.asarray(arr.block).copy()
    block[arr.subset(TRAIN)] = 1
    arr = replace(arr, block=block)
    with caplog.at_level(logging.WARNING, logger="training.probes"):
        scores = probe_layers(_model(arr), arr)
    assert all(v is None for token in scores["block"].values() for v in token.values())
    assert "no block probes" in caplog.text and "at least 2 classes" in caplog.text
    assert all(isinstance(v, float) for v in scores["choice"]["spike"].values())  # choice is still probed


def test_fused_tokens_are_probed_as_the_bin_token() -> None:
    arr = synthetic_arrays(EID)
    scores = probe_layers(_model(arr, tokens="fused"), arr)
    assert list(scores["choice"]) == ["bin"] and list(scores["block"]) == ["bin"]
    assert all(isinstance(v, float) for v in scores["choice"]["bin"].values())


def test_per_bin_labels_are_refused() -> None:
    arr = synthetic_arrays(EID)
    per_bin = replace(arr, choice=np.repeat(np.asarray(arr.choice)[:, None], arr.spikes.shape[1], axis=1))
    with pytest.raises(DataError, match="one per trial window"):
        probe_layers(_model(arr), per_bin)


def test_decoding_states_give_every_depth_and_restore_the_mode_when_left_early() -> None:
    arr = synthetic_arrays(EID)
    model = _model(arr)
    model.train()
    rows = np.arange(arr.spikes.shape[0])
    final = decoding_states(model, arr, rows, batch_size=8)
    (h,) = next(final)
    assert not model.training  # evaluated as in serving: no dropout
    final.close()  # a caller that stops early still gets its model back in training mode
    assert model.training
    every = next(decoding_states(model, arr, rows, batch_size=8, every_depth=True))
    assert len(every) == model.cfg.layers + 2
    assert h.shape == (8, 20, model.tokens_per_bin, model.cfg.hidden)
    torch.testing.assert_close(every[-1], h, rtol=0, atol=0)  # the last depth is the encoding
