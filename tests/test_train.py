"""Training: the loader, the one-cycle schedule, a short run that lowers the held-out masked loss, resume,
fine-tuning, model selection and the errors (bad checkpoint, changed units, empty split, NaN loss)."""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from neds_rt.errors import ConfigError, DataError, ModelFileError
from training import train as train_mod
from training.arrays import TEST, TRAIN, VAL, Normalisation, TrialArrays
from training.checkpoint import load_checkpoint, read_checkpoint
from training.config import FINETUNE_UNIT_DROPOUT, MAX_UNIT_DROPOUT, NEDSConfig, TrainConfig
from training.loader import check_splits, make_batch, plan_epoch
from training.masking import eval_mask, target_variance
from training.train import build_model, finished_run, lr_at, masked_eval_loss, train

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


def synthetic_arrays(
    eid: str, n_trials: int = 60, n_units: int = 12, n_bins: int = 20, seed: int = 0
) -> TrialArrays:
    """A session whose spikes depend on wheel, whisker, choice and block (Poisson counts per bin)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_bins) / n_bins  # (T,) trial time, 0..1
    choice = rng.integers(0, 2, n_trials)  # (K,)
    block = rng.integers(0, 3, n_trials)  # (K,)
    onset = rng.uniform(0.3, 0.5, n_trials)  # (K,) movement onset, share of the window
    bump = np.exp(-(((t[None, :] - onset[:, None] - 0.15) / 0.1) ** 2))  # (K, T)
    wheel = (0.5 + 0.4 * (2 * choice[:, None] - 1) * bump).astype(np.float32)  # (K, T) scaled wheel speed
    whisker = np.cumsum(rng.normal(0, 0.1, (n_trials, n_bins)), axis=1)  # (K, T) random walk
    whisker = ((whisker - whisker.min()) / np.ptp(whisker)).astype(np.float32)
    gains = rng.normal(0, 1.0, (4, n_units))  # (4, N) tuning to wheel, whisker, choice, block
    base = np.log(rng.uniform(0.2, 0.8, n_units))  # (N,) log counts per bin
    log_rate = (
        base[None, None, :]
        + gains[0] * (wheel[..., None] - 0.5) * 2
        + gains[1] * (whisker[..., None] - 0.5)
        + gains[2] * (choice[:, None, None] - 0.5)
        + gains[3] * (block[:, None, None] - 1.0) * 0.5
    )  # (K, T, N)
    spikes = rng.poisson(np.exp(log_rate)).astype(np.uint16)  # (K, T, N) counts per bin
    split = np.zeros(n_trials, dtype=np.int8)  # (K,) 70 / 15 / 15 per cent
    split[int(0.7 * n_trials) : int(0.85 * n_trials)] = VAL
    split[int(0.85 * n_trials) :] = TEST
    return TrialArrays(
        eid=eid, probe="probe00", unit_ids=np.arange(100, 100 + n_units, dtype=np.int64),
        regions=np.array(["VISp", "CA1", "LP"] * n_units)[:n_units], spikes=spikes, wheel=wheel,
        whisker=whisker, choice=choice.astype(np.int64), block=block.astype(np.int64),
        trial_index=np.arange(n_trials, dtype=np.int64) * 2, window_start=np.arange(n_trials) * 3.0,
        split=split, norm=Normalisation(0.0, 10.0, 0.0, 5.0),
    )


def tiny_cfg(**kw: object) -> NEDSConfig:
    return NEDSConfig.preset("tiny", n_bins=20, **kw)  # type: ignore[arg-type]


def quick(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(epochs=2, batch_size=8, lr=3e-3, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


EIDS = ("aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002")


def test_plan_covers_every_train_trial_once_per_epoch() -> None:
    arrays = {e: synthetic_arrays(e, n_trials=50, seed=i) for i, e in enumerate(EIDS)}
    plan = plan_epoch(arrays, TRAIN, batch_size=8, seed=3, epoch=0)
    for eid in EIDS:
        rows = np.concatenate([r for e, r in plan if e == eid])
        assert sorted(rows.tolist()) == arrays[eid].subset(TRAIN).tolist()
    assert all(r.size <= 8 for _, r in plan)
    assert [r.tolist() for _, r in plan_epoch(arrays, TRAIN, 8, 3, 1)] != [r.tolist() for _, r in plan]


def test_plan_ranks_share_sessions_and_split_trials() -> None:
    arrays = {e: synthetic_arrays(e, n_trials=41, seed=i) for i, e in enumerate(EIDS)}
    p0 = plan_epoch(arrays, TRAIN, 4, seed=1, epoch=2, rank=0, world=2)
    p1 = plan_epoch(arrays, TRAIN, 4, seed=1, epoch=2, rank=1, world=2)
    assert [e for e, _ in p0] == [e for e, _ in p1]  # lockstep: same session every step
    for (_, a), (_, b) in zip(p0, p1, strict=True):
        assert a.size >= 1 and b.size >= 1
        assert not set(a.tolist()) & set(b.tolist())  # 28 train trials: no wrap-around padding
    for eid in EIDS:
        got = np.concatenate([r for e, r in p0 + p1 if e == eid])
        assert set(got.tolist()) == set(arrays[eid].subset(TRAIN).tolist())


def test_make_batch_shapes() -> None:
    arr = synthetic_arrays(EIDS[0])
    b = make_batch(arr, np.array([0, 3, 5]))
    assert b.spikes.shape == (3, 20, 12) and b.spikes.dtype == torch.float32
    assert b.wheel.shape == (3, 20) and b.choice.dtype == torch.int64
    assert b.trial_index.tolist() == [0, 6, 10]


def test_one_cycle_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(lr=1e-3, warmup_frac=0.1, final_lr_frac=0.01)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    peak = int(np.argmax(lrs))
    assert 5 <= peak <= 11 and max(lrs) == pytest.approx(1e-3)
    assert all(a <= b for a, b in itertools.pairwise(lrs[: peak + 1]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[peak:]))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)


@pytest.mark.parametrize("mode", ["offline", "streaming"])
def test_untrained_model_predicts_each_sessions_null_model(mode: str) -> None:
    arrays = {e: synthetic_arrays(e, n_trials=50, seed=i) for i, e in enumerate(EIDS)}
    arrays[EIDS[1]].choice[:] = 1  # a session with one class only: its prior is add-one smoothed
    model = build_model(tiny_cfg(mode=mode), arrays, seed=0).eval()
    for eid, arr in arrays.items():
        rows = arr.subset(TRAIN)
        b = make_batch(arr, arr.subset(TEST))
        with torch.no_grad():
            out = model(eid, b.spikes, b.wheel, b.whisker, b.choice, b.block,
                        eval_mask("decoding", b.spikes.shape[0], 20))
        mean_count = arr.spikes[rows].mean(axis=(0, 1))  # (N,)
        assert torch.allclose(out.spikes, torch.log(torch.tensor(mean_count, dtype=torch.float32)).expand_as(
            out.spikes), atol=1e-5)
        assert torch.allclose(out.wheel, torch.tensor(float(arr.wheel[rows].mean())), atol=1e-5)
        assert torch.allclose(out.whisker, torch.tensor(float(arr.whisker[rows].mean())), atol=1e-5)
        counts = np.bincount(arr.choice[rows], minlength=2)
        prior = (counts + 1.0) / (counts.sum() + 2)
        got = out.choice.softmax(-1).reshape(-1, 2)  # (B*T, 2) every bin the same prior
        assert torch.allclose(got, torch.tensor(prior, dtype=torch.float32).expand_as(got), atol=1e-5)
        block_counts = np.bincount(arr.block[rows], minlength=3)
        block_prior = torch.tensor((block_counts + 1.0) / (block_counts.sum() + 3), dtype=torch.float32)
        assert torch.allclose(out.block.softmax(-1)[0, 0], block_prior, atol=1e-5)
    assert int(arrays[EIDS[1]].choice[0]) == 1 and out.choice.softmax(-1)[0, 0, 1] > 0.95


def test_training_lowers_heldout_masked_loss_and_writes_run(tmp_path: Path) -> None:
    arrays = {e: synthetic_arrays(e, n_trials=80, seed=i) for i, e in enumerate(EIDS)}
    cfg = tiny_cfg()
    before = masked_eval_loss(build_model(cfg, arrays, seed=0), arrays, VAL)
    res = train(arrays, tmp_path / "run", cfg, quick(epochs=4))
    after = masked_eval_loss(res.model, arrays, VAL)
    assert after < before
    assert {"best.pt", "last.pt", "metrics.json"} <= {p.name for p in (tmp_path / "run").iterdir()}
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert doc["sessions"] == sorted(EIDS) and len(doc["history"]) == 4
    assert doc["history"][-1]["val_loss"] == pytest.approx(after, rel=1e-5)
    assert set(doc["history"][0]["val"]["mean"]) >= {"bits_per_spike", "wheel_r2", "choice_bacc", "score"}
    best = max(h["val"]["score"] for h in doc["history"])
    assert doc["best"]["score"] == pytest.approx(best)
    ck = read_checkpoint(tmp_path / "run" / "best.pt")
    assert ck["best_score"] == pytest.approx(best) and ck["epoch"] == doc["best"]["epoch"]
    model = load_checkpoint(tmp_path / "run" / "last.pt")
    assert set(model.eids) == set(EIDS)
    assert model.vocab[EIDS[0]].unit_ids.tolist() == arrays[EIDS[0]].unit_ids.tolist()
    assert model.vocab[EIDS[1]].norm == arrays[EIDS[1]].norm
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_training_normalises_regression_losses_by_each_sessions_train_variance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = {e: synthetic_arrays(e, n_trials=40, seed=i) for i, e in enumerate(EIDS)}
    arrays[EIDS[1]].wheel *= 0.1  # another scale (wheel < 0.1): its own variance; tells batches apart
    want = {e: target_variance(a) for e, a in arrays.items()}
    for eid, arr in arrays.items():  # the variance of the training trials' scaled wheel
        assert want[eid]["wheel"] == pytest.approx(float(arr.wheel[arr.subset(TRAIN)].var()), rel=1e-5)
    assert want[EIDS[1]]["wheel"] < 0.05 * want[EIDS[0]]["wheel"]
    seen: list[tuple[str, object]] = []
    real = train_mod.masked_losses

    def spy(*args: Any, **kwargs: Any) -> Any:
        eid = EIDS[1] if float(args[2].max()) < 0.1 else EIDS[0]  # args[2]: the batch's wheel (B, T)
        seen.append((eid, args[7] if len(args) > 7 else kwargs.get("target_var")))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "masked_losses", spy)
    train(arrays, tmp_path / "run", tiny_cfg(), quick(epochs=1))
    assert {eid for eid, _ in seen} == set(EIDS)
    for eid, target_var in seen:
        assert target_var == want[eid], eid


def _killed_in_epoch_2(*args: object, **kwargs: object) -> object:
    """``plan_epoch`` for a run killed in its second epoch, after epoch 1 was checkpointed."""
    if args[4] == 1:
        raise KeyboardInterrupt
    return plan_epoch(*args, **kwargs)  # type: ignore[arg-type]


def test_resume_continues_where_the_run_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = [synthetic_arrays(EIDS[0], n_trials=40)]
    full = train(arrays, tmp_path / "full", tiny_cfg(dropout=0.0), quick(epochs=2))

    monkeypatch.setattr(train_mod, "plan_epoch", _killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(arrays, tmp_path / "part", tiny_cfg(dropout=0.0), quick(epochs=2))
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 1
    sessions = {a.eid: a for a in arrays}
    assert finished_run(tmp_path / "full", sessions, quick(epochs=2), tiny_cfg(dropout=0.0))
    assert not finished_run(tmp_path / "part", sessions, quick(epochs=2), tiny_cfg(dropout=0.0))  # cut short
    assert not finished_run(tmp_path / "none", sessions, quick(epochs=2))
    with pytest.raises(ConfigError, match=r"another configuration.*train_config: epochs=2 \(now 3\)"):
        finished_run(tmp_path / "full", sessions, quick(epochs=3))
    with pytest.raises(ConfigError, match=r"another configuration.*model_config: layers=2 \(now 3\)"):
        finished_run(tmp_path / "full", sessions, quick(epochs=2), tiny_cfg(dropout=0.0, layers=3))
    with pytest.raises(ConfigError, match=r"another configuration.*sessions="):
        finished_run(tmp_path / "full", {EIDS[1]: arrays[0]}, quick(epochs=2))
    older = json.loads((tmp_path / "full" / "metrics.json").read_text())
    del older["train_config"]["unit_dropout"]  # a run from before the setting existed
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "metrics.json").write_text(json.dumps(older))
    with pytest.raises(ConfigError, match=r"train_config: unit_dropout not recorded \(now None\)"):
        finished_run(tmp_path / "older", sessions, quick(epochs=2), tiny_cfg(dropout=0.0))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text('{"sessions": [')  # cut off mid-write
    with pytest.raises(DataError, match=r"metrics.json: is not a readable metrics file"):
        finished_run(tmp_path / "bad", sessions, quick(epochs=2))
    resumed = train(arrays, tmp_path / "part", tiny_cfg(dropout=0.0), quick(epochs=2), resume=True)
    assert finished_run(tmp_path / "part", sessions, quick(epochs=2, progress=True), tiny_cfg(dropout=0.0))
    assert resumed.steps == full.steps
    assert len(resumed.history) == 2
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_resume_inside_an_epoch_continues_at_the_next_batch(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # dropout and unit dropout on: the resumed run must also continue both random streams where they stopped
    arrays = [synthetic_arrays(EIDS[0])]  # 42 TRAIN trials: 6 steps of 8 per epoch
    tcfg = quick(unit_dropout=0.3, checkpoint_minutes=1e-9)  # last.pt after every step
    full = train(arrays, tmp_path / "full", tiny_cfg(dropout=0.1), tcfg)

    draws = itertools.count(1)
    real = train_mod.draw_masks

    def killed_at_step_4(*args: Any, **kwargs: Any) -> Any:
        if next(draws) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "draw_masks", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(arrays, tmp_path / "part", tiny_cfg(dropout=0.1), tcfg)
    monkeypatch.undo()
    saved = read_checkpoint(tmp_path / "part" / "last.pt")
    assert (saved["epoch"], saved["step"]) == (0, 3)
    assert saved["extra"]["within_epoch"]["batches"] == 3
    assert not (tmp_path / "part" / "best.pt").exists()  # no epoch has ended
    sessions = {a.eid: a for a in arrays}
    assert not finished_run(tmp_path / "part", sessions, tcfg)
    # the interval does not change what a run learns, so a run made with another one is the same run
    assert finished_run(tmp_path / "full", sessions, replace(tcfg, checkpoint_minutes=0.0))

    resumed = train(arrays, tmp_path / "part", tiny_cfg(dropout=0.1), replace(tcfg, checkpoint_minutes=0.0),
                    resume=True)
    assert resumed.steps == full.steps == 12
    losses = [h["train_loss"] for h in full.history]
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(losses)
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"TrainConfig\.checkpoint_minutes: must be a finite number"):
            TrainConfig(checkpoint_minutes=bad)


def test_a_run_stopped_by_max_steps_inside_an_epoch_resumes_at_the_next_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = [synthetic_arrays(EIDS[0])]  # 42 TRAIN trials: 6 steps of 8 per epoch
    trained: list[tuple[int, ...]] = []  # the TRAIN rows of every step, in order, over both runs
    real = train_mod._forward

    def recorded(model: Any, batch: Any, *args: Any) -> Any:
        if model.training:  # a training step, not an evaluation
            trained.append(tuple(batch.rows.tolist()))
        return real(model, batch, *args)

    monkeypatch.setattr(train_mod, "_forward", recorded)
    train(arrays, tmp_path / "run", tiny_cfg(), quick(max_steps=3))
    saved = read_checkpoint(tmp_path / "run" / "last.pt")
    assert (saved["epoch"], saved["step"]) == (0, 3)
    assert saved["extra"]["within_epoch"]["batches"] == 3
    best = read_checkpoint(tmp_path / "run" / "best.pt")["extra"]
    assert "rng" not in best and "within_epoch" not in best  # only the checkpoint a run resumes from

    resumed = train(arrays, tmp_path / "run", tiny_cfg(), quick(), resume=True)
    assert resumed.steps == 12  # 3 + the epoch's other 3 + 6, not 3 + 6 + 6
    plans = [[tuple(r.tolist()) for _, r in plan_epoch({a.eid: a for a in arrays}, TRAIN, 8, 0, e, 0, 1)]
             for e in (0, 1)]
    assert trained == plans[0] + plans[1]  # every batch once, none twice
    assert "within_epoch" not in read_checkpoint(tmp_path / "run" / "last.pt")["extra"]  # ended its epochs
    assert [(h["epoch"], h.get("partial")) for h in resumed.history] == [
        (1, {"batches": 3, "of": 6}), (1, None), (2, None)]  # the stop's evaluation kept, marked as such
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["history"][0]["partial"] == {
        "batches": 3, "of": 6}


def test_a_random_state_from_another_process_count_is_not_restored(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    arrays = [synthetic_arrays(EIDS[0])]
    train(arrays, tmp_path / "run", tiny_cfg(), quick(max_steps=3))
    path = tmp_path / "run" / "last.pt"
    ckpt = read_checkpoint(path)
    mine = ckpt["extra"]["rng"]
    ckpt["extra"]["rng"] = {"ranks": [mine, mine]}  # as two DDP processes save it
    torch.save(ckpt, path)
    torch.manual_seed(99)
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="training.train"):
        train_mod._restore_rng(read_checkpoint(path)["extra"]["rng"], torch.device("cpu"),
                               train_mod.init_distributed("cpu"))
    assert "random state is from 2 process(es), this run has 1: dropout draws anew" in caplog.text
    assert torch.equal(torch.get_rng_state(), before)  # left as it was
    train_mod._restore_rng(mine, torch.device("cpu"), train_mod.init_distributed("cpu"))
    assert torch.equal(torch.get_rng_state(), mine["cpu"])  # this run's own count: put back
    resumed = train(arrays, tmp_path / "run", tiny_cfg(), quick(), resume=True)
    assert resumed.steps == 12  # the run still resumes, at its next batch


def test_finetune_keeps_shared_weights_and_rebuilds_session_layers(tmp_path: Path) -> None:
    pre = train([synthetic_arrays(EIDS[0], seed=0)], tmp_path / "pre", tiny_cfg(mask_ratio=0.25),
                quick(epochs=1))
    new = synthetic_arrays("cccccccc-0000-4000-8000-000000000003", n_units=7, seed=5)
    shared_before = {k: v.clone() for k, v in pre.model.shared_parameters().items()}
    res = train([new], tmp_path / "ft", None, quick(epochs=1, max_steps=1, lr=1e-9),
                finetune_from=tmp_path / "pre" / "best.pt")
    assert res.model.eids == [new.eid] and res.model.session(new.eid).n_units == 7
    assert res.model.cfg.mask_ratio == pytest.approx(0.25)  # the pretraining ratio is kept
    for k, v in res.model.shared_parameters().items():  # a 1e-9 lr step leaves them where they were
        torch.testing.assert_close(v.detach(), shared_before[k], rtol=0, atol=1e-6)
    assert load_checkpoint(tmp_path / "ft" / "best.pt").eids == [new.eid]
    other = train([new], tmp_path / "ft2", None, quick(epochs=1, max_steps=1),
                  finetune_from=tmp_path / "pre" / "best.pt", mask_ratio=0.1)
    assert other.model.cfg.mask_ratio == pytest.approx(0.1)  # unless one is given


def test_a_resumed_finetuning_run_keeps_its_origin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train([synthetic_arrays(EIDS[0])], tmp_path / "pre", tiny_cfg(), quick(epochs=1, max_steps=2))
    origin = tmp_path / "pre" / "best.pt"
    new = {EIDS[1]: synthetic_arrays(EIDS[1], n_trials=40, seed=3)}

    monkeypatch.setattr(train_mod, "plan_epoch", _killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(new, tmp_path / "ft", None, quick(epochs=2), finetune_from=origin)
    monkeypatch.undo()
    assert not finished_run(tmp_path / "ft", new, quick(epochs=2), finetune_from=origin)
    train(new, tmp_path / "ft", None, quick(epochs=2), resume=True)
    assert finished_run(tmp_path / "ft", new, quick(epochs=2), finetune_from=origin)
    with pytest.raises(ConfigError, match=r"another configuration.*finetune_from='.*best.pt' \(now None\)"):
        finished_run(tmp_path / "ft", new, quick(epochs=2))


def test_checkpoint_from_another_config_names_file_and_key(tmp_path: Path) -> None:
    train([synthetic_arrays(EIDS[0])], tmp_path / "run", tiny_cfg(), quick(epochs=1, max_steps=2))
    other = tiny_cfg(hidden=48, heads=4)
    with pytest.raises(ModelFileError, match=r"best\.pt.*weight '.*' has shape"):
        train([synthetic_arrays(EIDS[1])], tmp_path / "ft", other, quick(epochs=1),
              finetune_from=tmp_path / "run" / "best.pt")
    with pytest.raises(ModelFileError, match=r"last\.pt.*lacks weight 'blocks\.2\."):
        train([synthetic_arrays(EIDS[0])], tmp_path / "run", tiny_cfg(layers=3), quick(epochs=2), resume=True)


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="cannot be read"):
        load_checkpoint(junk)
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ModelFileError, match="is not a 'neds-rt checkpoint'"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_session_with_other_units_than_checkpoint(tmp_path: Path) -> None:
    arr = synthetic_arrays(EIDS[0])
    train([arr], tmp_path / "run", tiny_cfg(), quick(epochs=1, max_steps=2))
    moved = replace(arr, unit_ids=arr.unit_ids + 1)
    with pytest.raises(DataError, match=f"session {EIDS[0]}: has units that differ.*column 0: unit 101"):
        train([moved], tmp_path / "run", tiny_cfg(), quick(epochs=2), resume=True)
    fewer = replace(arr, unit_ids=arr.unit_ids[:5], spikes=arr.spikes[:, :, :5], regions=arr.regions[:5])
    with pytest.raises(DataError, match="5 units, checkpoint has 12"):
        train([fewer], tmp_path / "run", tiny_cfg(), quick(epochs=2), resume=True)


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    arr = synthetic_arrays(EIDS[0])
    no_val = replace(arr, split=np.where(arr.split == VAL, TEST, arr.split).astype(np.int8))
    with pytest.raises(DataError, match=f"session {EIDS[0]}: has no trial in the 'val' split"):
        train([no_val], tmp_path / "run", tiny_cfg(), quick())
    with pytest.raises(DataError, match="'train' split"):
        check_splits({arr.eid: replace(arr, split=np.full_like(arr.split, VAL))}, (TRAIN,))
    with pytest.raises(DataError, match="at least one session"):
        train([], tmp_path / "run", tiny_cfg(), quick())


def test_spike_weight_reaches_the_loss_and_unimodal_runs_select_on_their_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = {EIDS[0]: synthetic_arrays(EIDS[0], n_trials=40)}
    weights: list[object] = []
    real = train_mod.masked_losses

    def spy(*args: Any, **kwargs: Any) -> Any:
        weights.append(args[8] if len(args) > 8 else kwargs.get("spike_weight"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "masked_losses", spy)
    train(arrays, tmp_path / "enc", tiny_cfg(), quick(epochs=2, schemes=("encoding",), spike_weight=7.0))
    assert weights and set(weights) == {7.0}
    enc = json.loads((tmp_path / "enc" / "metrics.json").read_text())["history"]
    for h in enc:  # encoding-only: scored on bits/spike alone, not on the heads it never trains
        assert h["val"]["score"] == pytest.approx(h["val"]["mean"]["bits_per_spike"])
    train(arrays, tmp_path / "dec", tiny_cfg(), quick(epochs=1, schemes=("decoding",)))
    dec = json.loads((tmp_path / "dec" / "metrics.json").read_text())["history"][0]["val"]["mean"]
    want = np.mean([dec[k] for k in ("wheel_r2", "whisker_r2", "choice_bacc", "block_bacc")])
    assert dec["score"] == pytest.approx(want)
    assert weights[-1] == TrainConfig().spike_weight  # the default
    with pytest.raises(ConfigError, match=r"TrainConfig\.spike_weight"):
        TrainConfig(spike_weight=0.0)


def test_unit_dropout_hides_units_from_the_input_but_the_loss_scores_their_true_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = {EIDS[0]: synthetic_arrays(EIDS[0], n_trials=40, n_units=30)}
    seen: list[torch.Tensor] = []
    scored: list[torch.Tensor] = []
    real_forward, real_losses = train_mod._forward, train_mod.masked_losses

    training = [False]  # whether the last forward pass was a training step

    def forward_spy(model: Any, batch: Any, mask: Any, spikes: Any = None) -> Any:
        training[0] = model.training
        if model.training:
            seen.append((batch.spikes if spikes is None else spikes).detach().clone())
        return real_forward(model, batch, mask, spikes)

    def losses_spy(*args: Any, **kwargs: Any) -> Any:
        if training[0]:
            scored.append(args[1].detach().clone())
        return real_losses(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_forward", forward_spy)
    monkeypatch.setattr(train_mod, "masked_losses", losses_spy)
    train(arrays, tmp_path / "run", tiny_cfg(), quick(epochs=1, unit_dropout=0.5))
    assert seen and len(seen) == len(scored)
    for x, y in zip(seen, scored, strict=True):
        assert torch.all(y == torch.round(y))  # the loss gets the counts themselves
        active = y.sum(dim=1) > 0  # (B, N) units that fired in the trial
        hidden = (x.sum(dim=1) == 0) & active  # ... and that the model did not see
        assert hidden.any() and (~hidden & active).any()
        assert torch.allclose(x, y * 2.0 * (x > 0))  # the seen ones scaled by 1 / (1 - 0.5)
    seen.clear()
    scored.clear()
    train(arrays, tmp_path / "off", tiny_cfg(), quick(epochs=1))  # the default: off, unless fine-tuning
    assert seen and all(torch.equal(x, y) for x, y in zip(seen, scored, strict=True))
    assert json.loads((tmp_path / "off" / "metrics.json").read_text())["unit_dropout"] == 0.0
    seen.clear()
    scored.clear()
    train(arrays, tmp_path / "ft", None, quick(epochs=1), finetune_from=tmp_path / "off" / "best.pt")
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["unit_dropout"] == FINETUNE_UNIT_DROPOUT
    for x, y in zip(seen, scored, strict=True):
        assert torch.allclose(x, y / (1.0 - FINETUNE_UNIT_DROPOUT) * (x > 0))
    assert any(((x.sum(dim=1) == 0) & (y.sum(dim=1) > 0)).any() for x, y in zip(seen, scored, strict=True))
    for bad in (1.0, 0.96, -0.1):  # outside [0, MAX_UNIT_DROPOUT], the bounds the CLI's --unit-dropout shares
        with pytest.raises(ConfigError, match=r"TrainConfig\.unit_dropout: must be in \[0, 0\.95\]"):
            TrainConfig(unit_dropout=bad)
    assert TrainConfig(unit_dropout=MAX_UNIT_DROPOUT).unit_dropout == 0.95


def test_frozen_start_trains_the_session_layers_alone_then_every_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train([synthetic_arrays(EIDS[0])], tmp_path / "pre", tiny_cfg(), quick(epochs=1))
    pretrained = load_checkpoint(tmp_path / "pre" / "best.pt").shared_parameters()
    states: list[dict[str, torch.Tensor]] = []  # every parameter, at the start and after each epoch
    real_finetune, real_eval = train_mod._finetune_model, train_mod.masked_eval_loss

    def snapshot(model: Any) -> None:
        states.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def finetune_spy(*args: Any, **kwargs: Any) -> Any:
        model = real_finetune(*args, **kwargs)
        snapshot(model)
        return model

    def eval_spy(model: Any, *args: Any, **kwargs: Any) -> Any:
        snapshot(model)
        return real_eval(model, *args, **kwargs)

    monkeypatch.setattr(train_mod, "_finetune_model", finetune_spy)
    monkeypatch.setattr(train_mod, "masked_eval_loss", eval_spy)
    arrays = [synthetic_arrays(EIDS[1], seed=1)]
    pre = tmp_path / "pre" / "best.pt"
    train(arrays, tmp_path / "ft", None, quick(epochs=3, frozen_epochs=2), finetune_from=pre)
    assert len(states) == 4
    names = list(states[0])
    shared = [n for n in names if not n.startswith("sessions.")]
    own = [n for n in names if n.startswith("sessions.")]
    assert shared and own and set(shared) == set(pretrained)
    for epoch in (1, 2):  # frozen: the shared layers stay as pretrained, the session's own layers learn
        assert all(torch.equal(states[epoch][n], pretrained[n]) for n in shared)
        assert any(not torch.equal(states[epoch][n], states[epoch - 1][n]) for n in own)
    assert any(not torch.equal(states[3][n], pretrained[n]) for n in shared)  # epoch 3: every layer trains
    ran = json.loads((tmp_path / "ft" / "metrics.json").read_text())["train_config"]
    assert ran["frozen_epochs"] == 2

    states.clear()
    train(arrays, tmp_path / "default", None, quick(epochs=1), finetune_from=pre)  # off by default
    ran = json.loads((tmp_path / "default" / "metrics.json").read_text())["train_config"]
    assert ran["frozen_epochs"] == 0
    assert any(not torch.equal(states[1][n], pretrained[n]) for n in shared)
    with pytest.raises(ConfigError, match=r"TrainConfig\.frozen_epochs: freezes pretrained shared layers, "
                       r"so it needs finetune_from"):
        train(arrays, tmp_path / "scratch", tiny_cfg(), quick(frozen_epochs=1))
    with pytest.raises(ConfigError, match=r"TrainConfig\.frozen_epochs: must be an integer >= 0"):
        TrainConfig(frozen_epochs=-1)


def test_train_command_passes_frozen_epochs_to_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from neds_rt.cli import app

    arrays = {EIDS[0]: synthetic_arrays(EIDS[0], n_trials=40, n_bins=100)}  # the presets' window
    monkeypatch.setattr(train_mod, "load_run_arrays", lambda *a, **k: arrays)
    args = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", "tiny",
            "--epochs", "1", "--no-progress", "--device", "cpu", "--threads", "1", "--frozen-epochs", "3"]
    res = CliRunner().invoke(app, args)  # no --finetune-from: nothing pretrained to freeze
    assert res.exit_code == 2
    want = "TrainConfig.frozen_epochs: freezes pretrained shared layers, so it needs finetune_from (got 3)"
    assert want in res.output, res.output
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_with_step_and_trials(tmp_path: Path) -> None:
    arr = synthetic_arrays(EIDS[0])
    wheel = arr.wheel.copy()
    wheel[5] = np.nan  # one bad trial (array row 5 = trial 10)
    bad = replace(arr, wheel=wheel)
    with pytest.raises(DataError, match=r"not finite at step \d+ on session .*trials \[.*\b10\b.*\]"):
        train([bad], tmp_path / "run", tiny_cfg(), quick(epochs=3))


def test_bins_mismatch_and_bad_train_config(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"20 bins per trial but the model has n_bins=100\. Build"):
        train([synthetic_arrays(EIDS[0])], tmp_path / "run", NEDSConfig.preset("tiny"), quick())
    with pytest.raises(ConfigError, match=r"TrainConfig\.batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="cannot be combined"):
        train([synthetic_arrays(EIDS[0])], tmp_path / "run", tiny_cfg(), quick(), resume=True,
              finetune_from=tmp_path / "x.pt")
