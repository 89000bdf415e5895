"""The class-head refit: a refitted head gives, through the model's own forward, the predictions of the
logistic regression it was fitted as (binary and 3-class, a class missing from TRAIN); training refits
best.pt and records it; runs that never train the class heads, and per-bin labels, are left alone."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from neds_rt.errors import DataError
from tests.test_train import EIDS, quick, synthetic_arrays, tiny_cfg
from training.arrays import TRAIN, VAL, TrialArrays
from training.checkpoint import load_checkpoint, read_checkpoint
from training.loader import make_batch
from training.masking import eval_mask
from training.model import BLOCK, CHOICE
from training.refit import class_states, refit_class_heads, refit_head, refittable, select_c
from training.train import build_model, evaluate_session, train

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


def _trial_pred(model: torch.nn.Module, arr: TrialArrays, rows: np.ndarray, name: str) -> np.ndarray:
    """Class predicted by the model's forward (decoding mask) for ``rows``: argmax of the trial logits."""
    batch = make_batch(arr, rows)
    with torch.no_grad():
        out = model(batch.eid, batch.spikes, batch.wheel, batch.whisker, batch.choice, batch.block,
                    eval_mask("decoding", batch.size, batch.spikes.shape[1]))
    return getattr(out, name).mean(dim=1).argmax(-1).numpy()


def test_refit_head_predicts_as_the_logistic_regression_it_was_fitted_as() -> None:
    arr = synthetic_arrays(EIDS[0], n_trials=120, n_units=16, seed=3)
    model = build_model(tiny_cfg(), {arr.eid: arr}, seed=0).eval()  # untrained: heads at the class prior
    tr, va = arr.subset(TRAIN), arr.subset(VAL)
    before = evaluate_session(model, arr, TRAIN)
    assert before["choice_bacc"] == pytest.approx(0.5)  # the prior predicts one class
    report = {r.head: r for r in refit_class_heads(model, {arr.eid: arr})}
    assert {r.kept for r in report.values()} == {"refit"}
    states = class_states(model, arr, tr)
    for modality, name, labels in ((CHOICE, "choice", arr.choice), (BLOCK, "block", arr.block)):
        x = states[modality].astype(np.float64)
        mu, sd = x.mean(axis=0), x.std(axis=0)
        clf = LogisticRegression(C=report[name].C, max_iter=2000).fit((x - mu) / sd, labels[tr])
        want = clf.predict((x - mu) / sd)
        got = _trial_pred(model, arr, tr, name)
        assert np.mean(got == want) >= 0.99, name  # float32 head against float64 sklearn: ties may flip
    after_tr, after_va = evaluate_session(model, arr, TRAIN), evaluate_session(model, arr, VAL)
    # the spikes carry choice (the synthetic session's gains), so the random trunk's features hold it
    assert after_tr["choice_bacc"] > 0.8
    assert report["choice"].train_bacc == pytest.approx(after_tr["choice_bacc"])
    assert report["choice"].val_bacc == pytest.approx(after_va["choice_bacc"])
    assert report["block"].train_bacc == pytest.approx(after_tr["block_bacc"])
    assert report["choice"].n_train == tr.size and va.size > 0
    # nothing but the two class heads moved
    fresh = build_model(tiny_cfg(), {arr.eid: arr}, seed=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])}
    assert {k.split(".")[-2] for k in changed} == {"choice_out", "block_out"}


def test_a_class_missing_from_train_is_never_predicted() -> None:
    arr = synthetic_arrays(EIDS[0], n_trials=90, seed=4)
    block = np.where(arr.block == 1, 2, arr.block)  # TRAIN (and every split) without block class 1
    arr = replace(arr, block=block)
    model = build_model(tiny_cfg(), {arr.eid: arr}, seed=0).eval()
    refit_class_heads(model, {arr.eid: arr})
    pred = _trial_pred(model, arr, np.arange(arr.block.size), "block")
    assert set(np.unique(pred)) <= {0, 2} and set(np.unique(pred)) == {0, 2}
    assert torch.isfinite(model.session(arr.eid).block_out.bias).all()


def test_one_or_no_train_class_keeps_the_trained_head_and_too_few_trials_is_an_error() -> None:
    head = torch.nn.Linear(4, 2)
    w0 = head.weight.detach().clone()
    rng = np.random.default_rng(0)
    states = {TRAIN: rng.normal(size=(10, 4)), VAL: rng.normal(size=(4, 4))}
    labels = {TRAIN: np.zeros(10, dtype=np.int64), VAL: np.array([0, 1, 0, 1])}
    done = refit_head(head, states, labels, 2, eid="e", name="choice")
    assert done.kept == "trained" and done.C is None and torch.equal(head.weight, w0)
    unlabelled = refit_head(head, states, {TRAIN: np.full(10, -1), VAL: labels[VAL]}, 2)  # per-bin: no label
    assert unlabelled.kept == "trained" and unlabelled.n_train == 0 and np.isnan(unlabelled.train_bacc)
    assert torch.equal(head.weight, w0)
    with pytest.raises(DataError, match="at least 2 labelled TRAIN trials"):
        select_c(rng.normal(size=(1, 4)), np.array([0]), Cs=(1.0,), folds=5, max_iter=100)


def test_per_bin_labels_keep_the_trained_heads(tmp_path: Path) -> None:
    arr = synthetic_arrays(EIDS[0], n_trials=40, n_units=16, seed=5)
    t = arr.spikes.shape[1]
    choice = np.repeat(arr.choice[:, None], t, axis=1)  # (K, T) per-bin labels, as continuous windows hold
    block = np.repeat(arr.block[:, None], t, axis=1)
    choice[:, :3] = block[:, :3] = -1  # bins outside any trial have no label
    windows = replace(arr, choice=choice, block=block)
    assert refittable(arr) and not refittable(windows)
    model = build_model(tiny_cfg(mode="streaming"), {arr.eid: windows}, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert refit_class_heads(model, {arr.eid: windows}) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    res = train({arr.eid: windows}, tmp_path / "run", tiny_cfg(mode="streaming"), quick(epochs=1))
    assert res.class_head_refit == []
    assert "class_head_refit" not in read_checkpoint(tmp_path / "run" / "best.pt")["extra"]


def test_training_refits_best_pt_and_records_it(tmp_path: Path) -> None:
    arrays = {e: synthetic_arrays(e, n_trials=60, seed=i) for i, e in enumerate(EIDS)}
    res = train(arrays, tmp_path / "run", tiny_cfg(), quick(epochs=2))
    assert [(r.eid, r.head) for r in res.class_head_refit] == [(e, h) for e in sorted(EIDS)
                                                               for h in ("choice", "block")]
    best = read_checkpoint(tmp_path / "run" / "best.pt")
    record = best["extra"]["class_head_refit"]
    assert [r["head"] for r in record] == ["choice", "block"] * 2
    assert "history" in best["extra"] and best["epoch"] >= 1  # the rest of the checkpoint is kept
    assert "class_head_refit" not in read_checkpoint(tmp_path / "run" / "last.pt")["extra"]
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert doc["class_head_refit"] == record and len(doc["history"]) == 2
    model = load_checkpoint(tmp_path / "run" / "best.pt")
    for r in res.class_head_refit:  # the saved heads are the refitted ones
        got = evaluate_session(model, arrays[r.eid], TRAIN)[f"{r.head}_bacc"]
        assert got == pytest.approx(r.train_bacc), (r.eid, r.head)


def test_runs_that_do_not_train_the_class_heads_are_not_refit(tmp_path: Path) -> None:
    arrays = {EIDS[0]: synthetic_arrays(EIDS[0], n_trials=40)}
    enc = train(arrays, tmp_path / "enc", tiny_cfg(), quick(epochs=1, schemes=("encoding",)))
    off = train(arrays, tmp_path / "off", tiny_cfg(), quick(epochs=1, refit_class_heads=False))
    for res, name in ((enc, "enc"), (off, "off")):
        assert res.class_head_refit == []
        assert "class_head_refit" not in read_checkpoint(tmp_path / name / "best.pt")["extra"]


@pytest.mark.parametrize("flag", [None, "--no-refit-class-heads"])
def test_train_command_refits_unless_told_not_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 flag: str | None) -> None:
    from typer.testing import CliRunner

    from neds_rt.cli import app
    from training import train as train_mod

    arrays = {EIDS[0]: synthetic_arrays(EIDS[0], n_trials=40, n_bins=100)}  # the presets' window
    monkeypatch.setattr(train_mod, "load_run_arrays", lambda *a, **k: arrays)
    args = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", "tiny",
            "--epochs", "1", "--no-progress", "--device", "cpu", "--threads", "1"]
    res = CliRunner().invoke(app, args + ([flag, "--unit-dropout", "0.25"] if flag else []))
    assert res.exit_code == 0, res.output
    record = read_checkpoint(tmp_path / "run" / "best.pt")["extra"].get("class_head_refit")
    ran = json.loads((tmp_path / "run" / "metrics.json").read_text())["train_config"]
    assert ran["unit_dropout"] == (0.25 if flag else None)  # the option reaches the run (None: default)
    if flag is None:
        assert [r["head"] for r in record] == ["choice", "block"]
        assert f"choice head of {EIDS[0]}: refit" in res.output
    else:
        assert record is None and "head of" not in res.output
