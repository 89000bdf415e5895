"""bench quality --jobs: which runs are trained, in what order, and what a failing run does."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bench.quality import VARIANTS, QualityConfig, run_quality
from bench.quality_jobs import MULTI, PRETRAIN, STREAMING, plan_jobs
from neds_rt.errors import ConfigError


def test_plan_trains_every_run_and_only_the_fine_tunings_wait_for_the_pretraining() -> None:
    jobs = plan_jobs(QualityConfig.quick(), ["a", "b"])
    assert jobs[0].kind == PRETRAIN and jobs[0].eid is None and jobs[0].name == "pretrain"
    assert [j.name for j in jobs[1:]] == [f"{kind}_{eid}" for eid in ("a", "b")
                                          for kind in (*VARIANTS, MULTI, STREAMING)]
    assert {j.name: j.after for j in jobs if j.after} == {"neds_multi_a": PRETRAIN, "neds_multi_b": PRETRAIN}
    quiet = plan_jobs(QualityConfig.quick(streaming=False), ["a"])
    assert STREAMING not in {j.kind for j in quiet} and len(quiet) == 1 + len(VARIANTS) + 1


def test_jobs_must_be_at_least_one() -> None:
    with pytest.raises(ConfigError, match=r"QualityConfig.jobs: must be an integer >= 1 \(got 0\)"):
        QualityConfig(jobs=0)


@pytest.mark.slow
def test_a_failing_run_stops_the_others_from_starting_and_its_error_is_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from streams.simulate import simulate_cache

    data = tmp_path / "data"
    simulate_cache(data, n_sessions=3, seed=1, n_trials=40)
    cfg = QualityConfig.quick(n_pretrain=2, n_heldout=1, epochs=1, pretrain_epochs=1, finetune_epochs=1,
                              device="tpu", jobs=2)  # every run fails in its worker
    with caplog.at_level(logging.INFO, logger="bench.quality_jobs"), \
            pytest.raises(ConfigError, match="device: must be auto, cpu, cuda or cuda:N"):
        run_quality(data, tmp_path / "out", cfg)
    failed = sorted(r.getMessage().split()[1] for r in caplog.records if " failed: " in r.getMessage())
    assert len(failed) == 2 and failed[0].startswith("neds_encoding_") and failed[1] == "pretrain"  # the two
    # runs that started; the runs waiting behind them never did
    models = tmp_path / "out" / "models"
    assert not list(models.glob("*/neds_multi"))  # the pretraining failed: no fine-tuning started
    assert not list(models.glob("**/metrics.json"))  # and no run got as far as an epoch
    assert not (tmp_path / "out" / "report.json").exists()
