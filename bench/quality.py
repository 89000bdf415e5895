"""``neds-rt bench quality``: NEDS against its baselines and its oracle ceiling, on held-out sessions.

Sessions of the ONE cache at ``data`` (simulated there first when it holds none) are sorted by id; the first
``n_pretrain`` pretrain a multi-session NEDS, the last ``n_heldout`` are evaluated. On each held-out session,
on the same TRAIN / VAL / TEST splits (trained on TRAIN, selected on VAL, scored on TEST):

- ``linear``: ridge / logistic decoders (:mod:`training.baselines`); ``rrr``: reduced-rank Poisson encoder;
  ``psth``: its smoothed TRAIN PSTH alone;
- ``neds_encoding`` / ``neds_decoding``: NEDS trained with one masking scheme only; ``neds_single``: NEDS,
  all schemes, on the session alone; ``neds_multi``: the pretrained NEDS fine-tuned on the session;
- ``oracle`` (simulated sessions): true rates for bits/spike, linear decoders on the true latents; and
  ``latent_variance``, the share of the session's log-rate variance each simulated latent drives;
- ``neds_streaming`` (unless ``streaming=False``): a causal NEDS trained on continuous windows of the session
  and run as the step runtime runs it, with its gap to ``neds_single`` (:mod:`bench.quality_streaming`).

Region classification uses each neuron's NEDS embedding (its column of the spike stitching layer and its row
of the spike output head) from the pretrained model and the fine-tuned ones, against chance and PSTH
features. Everything lands in ``out``: ``report.json``, ``report.md``, PNGs, and the models under ``models/``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from bench import quality_plots as plots
from bench.quality_bootstrap import HeldOut, region_intervals, trial_intervals
from bench.quality_report import (
    REGION_CHECKS,
    add_model_rows,
    assemble,
    clean,
    trial_comparisons,
    write_report,
)
from bench.quality_seeds import SeedRun, combine, seed_folder
from neds_rt.errors import ConfigError, DataError, invalid

if TYPE_CHECKING:
    from training.arrays import TrialArrays
    from training.config import NEDSConfig, TrainConfig
    from training.model import NEDS

log = logging.getLogger(__name__)

_PRESETS = ("tiny", "small", "default")
_NOISE_LATENTS = ("noise_fast", "noise_mid", "noise_slow")  # the simulator's latents no behaviour reveals
# the single-session NEDS trained on each held-out session: name -> (tasks scored, masking schemes drawn;
# None: every scheme)
VARIANTS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]]] = {
    "neds_encoding": (("encoding",), ("encoding",)),
    "neds_decoding": (("decoding",), ("decoding",)),
    "neds_single": (("encoding", "decoding"), None),
}


@dataclass
class QualityConfig:
    """Size of the comparison. The defaults are the full benchmark; :meth:`quick` is the few-minute one.

    Run times (2-core CPU shared with other jobs, 1 torch thread): ``--quick`` measured 225-517 s. Full size
    (10 + 2 IBL-like sessions of 260-680 TRAIN trials, ``default`` preset, 30 epochs per run), measured in
    part on that CPU with ``--jobs 2``: the pretraining's 309 steps an epoch at 11.8-12.9 s a step (~1 h an
    epoch, ~30 h for 30), a held-out run's 31 steps an epoch at 5-8 min an epoch (~3-4 h a run): use a GPU.
    """

    n_pretrain: int = 10  # sessions the multi-session NEDS pretrains on
    n_heldout: int = 2  # sessions every model is evaluated on
    n_trials: int | None = None  # trials per simulated session (None: IBL-like draw); only when simulating
    preset: str = "default"  # NEDSConfig preset of every NEDS
    epochs: int = 30  # single-session and unimodal NEDS
    pretrain_epochs: int = 30
    finetune_epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    simulate: bool = True  # simulate sessions into an empty ``data`` folder
    threads: int = 1  # torch CPU threads (the machine is shared)
    device: str = "auto"
    region_folds: int = 5
    plot_trials: tuple[int, ...] = (0, 1, 2)
    plot_neurons: int = 4
    streaming: bool = True  # also train and score a streaming (causal) NEDS per held-out session (issue 5)
    int8: bool = True  # also score the streaming NEDS exported with int8 weights, run by the step engine
    int4: bool = True  # ... and with 4-bit block-quantized weights
    resume: bool = False  # reuse the finished training runs under OUT/models, continue the ones cut short
    # training seeds: > 1 runs the comparison for seed, seed + 1, ... into OUT/seed_S and judges the checks on
    # the seed means (bench.quality_seeds); the data are simulated once, with ``seed``
    seeds: int = 1
    # the multi-session NEDS's fine-tuning trains the held-out session's own layers alone for this many epochs
    # first (TrainConfig.frozen_epochs; the README, "A frozen start for fine-tuning")
    frozen_epochs: int = 0
    # training runs at once, each in its own process (bench.quality_jobs; with seeds > 1, the runs of every
    # seed in one pool); 1 trains them one after another
    jobs: int = 1
    # every training run also saves its last.pt this often inside an epoch (TrainConfig.checkpoint_minutes):
    # with --resume, a run cut short loses at most this much (a full-size pretraining epoch takes about an
    # hour on this 2-core CPU)
    checkpoint_minutes: float = 10.0

    def __post_init__(self) -> None:
        counts = ("n_pretrain", "n_heldout", "epochs", "pretrain_epochs", "finetune_epochs", "batch_size",
                  "threads", "region_folds", "seeds", "jobs")
        for name, lowest in [(name, 1) for name in counts] + [("frozen_epochs", 0)]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise invalid(f"QualityConfig.{name}", f"must be an integer >= {lowest}", value,
                              kind=ConfigError)
        if self.preset not in _PRESETS:
            raise invalid("QualityConfig.preset", f"must be one of {_PRESETS}", self.preset, kind=ConfigError)
        from training.config import TrainConfig

        TrainConfig(checkpoint_minutes=self.checkpoint_minutes)  # its rule, before any run starts

    @property
    def reuses_runs(self) -> bool:
        """Whether a finished training run under ``OUT/models`` is loaded rather than trained again: with
        ``resume``, and with ``jobs`` > 1, where every run was trained ahead (:mod:`bench.quality_jobs`)."""
        return self.resume or self.jobs > 1

    @classmethod
    def quick(cls, **overrides: Any) -> QualityConfig:
        """4 pretraining + 1 held-out session of 150 trials, tiny model, few epochs: minutes on a CPU."""
        base: dict[str, Any] = dict(n_pretrain=4, n_heldout=1, n_trials=150, preset="tiny", epochs=15,
                                    pretrain_epochs=10, finetune_epochs=15)
        base.update(overrides)
        return cls(**base)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- data ----------------------------------------------------------------------------------------------
def prepare_sessions(data: Path, cfg: QualityConfig) -> tuple[list[str], list[str]]:
    """(pretraining eids, held-out eids) of the ONE cache at ``data``, simulated first when it is empty."""
    from streams.load import open_one

    data = Path(data)
    need = cfg.n_pretrain + cfg.n_heldout
    if not (data / "sessions.pqt").exists():
        if not cfg.simulate:
            raise invalid("--data", "holds no ONE cache (sessions.pqt)", str(data),
                          "point it at a ONE cache, or let bench quality simulate one", kind=DataError)
        from streams.simulate import simulate_cache

        log.info("simulating %s sessions into %s", need, data)
        simulate_cache(data, need, seed=cfg.seed, n_trials=cfg.n_trials)
    eids = sorted(str(e) for e in open_one(data).search())
    if len(eids) < need:
        raise invalid("--data", f"must hold n_pretrain + n_heldout = {need} sessions", len(eids),
                      "lower the session counts, or simulate into an empty folder", kind=DataError)
    return eids[: cfg.n_pretrain], eids[-cfg.n_heldout :]


def _has_ground_truth(data: Path, arr: TrialArrays) -> bool:
    from streams.ground_truth import ground_truth_path

    return ground_truth_path(Path(data), arr.eid, arr.probe).exists()


# ---- NEDS ----------------------------------------------------------------------------------------------
def _train_neds(arrays: Mapping[str, TrialArrays], out: Path, cfg: QualityConfig, epochs: int, *,
                schemes: tuple[str, ...] | None = None, finetune_from: Path | None = None) -> NEDS:
    """Train (or fine-tune) and return the VAL-best model (``best.pt``; a unimodal variant, drawing
    ``schemes``, is scored on its own task: :func:`training.train.scored_metrics`)."""
    from training.config import SCHEMES, NEDSConfig, TrainConfig

    tcfg = TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, progress=False,
                       device=cfg.device, schemes=schemes or SCHEMES,
                       checkpoint_minutes=cfg.checkpoint_minutes,
                       frozen_epochs=cfg.frozen_epochs if finetune_from else 0)
    model_cfg = None if finetune_from else NEDSConfig.preset(cfg.preset, n_sessions=len(arrays))
    return train_or_reuse(arrays, out, model_cfg, tcfg, finetune_from=finetune_from, resume=cfg.reuses_runs)


def pretrain_dir(out: Path) -> Path:
    """Folder of the multi-session pretraining run."""
    return Path(out) / "models" / "pretrain"


def array_cache_dir(out: Path) -> Path:
    """Where the comparison caches the sessions' arrays (built once, read by every run)."""
    return Path(out) / "array_cache"


def run_dir(out: Path, eid: str, name: str) -> Path:
    """Folder of the held-out session ``eid``'s run (or file) ``name``, e.g. ``neds_single``."""
    return Path(out) / "models" / eid / name


def train_pretraining(arrays: Mapping[str, TrialArrays], out: Path, cfg: QualityConfig) -> NEDS:
    """The multi-session NEDS pretrained on the sessions ``arrays`` (the pretraining sessions)."""
    return _train_neds(arrays, pretrain_dir(out), cfg, cfg.pretrain_epochs)


def train_variant(arr: TrialArrays, out: Path, cfg: QualityConfig, name: str) -> NEDS:
    """The single-session NEDS ``name`` (a key of :data:`VARIANTS`) of the held-out session ``arr``."""
    return _train_neds({arr.eid: arr}, run_dir(out, arr.eid, name), cfg, cfg.epochs,
                       schemes=VARIANTS[name][1])


def train_multi(arr: TrialArrays, out: Path, cfg: QualityConfig) -> NEDS:
    """The pretrained NEDS fine-tuned on the held-out session ``arr``."""
    return _train_neds({arr.eid: arr}, run_dir(out, arr.eid, "neds_multi"), cfg, cfg.finetune_epochs,
                       finetune_from=pretrain_dir(out) / "best.pt")


def train_or_reuse(arrays: Mapping[str, TrialArrays], out: Path, model_cfg: NEDSConfig | None,
                   tcfg: TrainConfig, *, finetune_from: Path | None = None, resume: bool = False) -> NEDS:
    """Train into ``out`` and return its ``best.pt``. With ``resume`` (``--resume``) a run that ended there
    with the same configuration is reused and one that was cut short continues from its ``last.pt``."""
    from training.checkpoint import load_checkpoint
    from training.train import finished_run, train

    if resume and finished_run(out, arrays, tcfg, model_cfg, finetune_from):
        log.info("reusing the finished run in %s", out)
    elif resume and (out / "last.pt").exists():
        log.info("resuming the run in %s", out)
        train(dict(arrays), out, model_cfg, tcfg, resume=True)
    else:
        train(dict(arrays), out, model_cfg, tcfg, finetune_from=finetune_from)
    return load_checkpoint(out / "best.pt")


def neds_predict(
    model: NEDS, arr: TrialArrays, rows: np.ndarray, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Predictions on ``rows``: encoding mask -> ``log_rates`` (K, T, N); decoding mask -> ``wheel``,
    ``whisker`` (K, T) and ``choice`` (K, 2), ``block`` (K, 3) class probabilities."""
    import torch

    from training.loader import make_batch
    from training.masking import eval_mask
    from training.model import trial_logits

    device = next(model.parameters()).device
    model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("log_rates", "wheel", "whisker", "choice", "block")}
    with torch.no_grad():
        for start in range(0, rows.size, batch_size):
            b = make_batch(arr, rows[start : start + batch_size], device)
            args = (b.eid, b.spikes, b.wheel, b.whisker, b.choice, b.block)
            enc = model(*args, eval_mask("encoding", b.size, b.spikes.shape[1]).to(device))
            dec = model(*args, eval_mask("decoding", b.size, b.spikes.shape[1]).to(device))
            parts["log_rates"].append(enc.spikes.cpu().numpy())  # (B, T, N) log expected counts
            parts["wheel"].append(dec.wheel.cpu().numpy())  # (B, T)
            parts["whisker"].append(dec.whisker.cpu().numpy())
            parts["choice"].append(trial_logits(dec.choice).softmax(-1).cpu().numpy())  # (B, 2)
            parts["block"].append(trial_logits(dec.block).softmax(-1).cpu().numpy())  # (B, 3)
    return {k: np.concatenate(v).astype(np.float64) for k, v in parts.items()}


def neds_metrics(pred: Mapping[str, np.ndarray], arr: TrialArrays, rows: np.ndarray,
                 tasks: tuple[str, ...] = ("encoding", "decoding")) -> dict[str, float | None]:
    """Every metric of NEDS predictions on ``rows`` (None for the tasks not in ``tasks``)."""
    from training.metrics import accuracy, balanced_accuracy, bits_per_spike_from_log, r2

    out: dict[str, float | None] = {}
    if "encoding" in tasks:
        out["bits_per_spike"] = clean(bits_per_spike_from_log(pred["log_rates"], arr.spikes[rows]))
    if "decoding" in tasks:
        out["wheel_r2"] = clean(r2(pred["wheel"], arr.wheel[rows]))
        out["whisker_r2"] = clean(r2(pred["whisker"], arr.whisker[rows]))
        for name in ("choice", "block"):
            guess = pred[name].argmax(axis=1)  # (K,)
            true = np.asarray(getattr(arr, name))[rows]
            out[f"{name}_accuracy"] = clean(accuracy(guess, true))
            out[f"{name}_balanced_accuracy"] = clean(balanced_accuracy(guess, true))
    return out


def embedding_parts(model: NEDS, eid: str) -> dict[str, np.ndarray]:
    """Each neuron's learned embeddings: ``stitch`` (N, hidden), its column of the spike stitching, and
    ``head`` (N, hidden), its row of the spike output head."""
    mods = model.session(eid)
    return {
        "stitch": mods.stitch.weight.detach().cpu().numpy().T.astype(np.float64),  # from (hidden, N)
        "head": mods.spikes_out.weight.detach().cpu().numpy().astype(np.float64),  # (N, hidden)
    }


# ---- per-session baselines and oracle --------------------------------------------------------------------
def _baselines(arr: TrialArrays, held: HeldOut) -> dict[str, dict[str, float | None]]:
    from training.baselines import fit_rrr_encoder
    from training.metrics import bits_per_spike

    linear = _linear_decoders(arr, held)
    enc = fit_rrr_encoder(arr)
    y = arr.spikes[held.test]
    held.rates["rrr"] = enc.rates
    psth = float(enc.psth_bits_per_spike)
    return {"linear": linear, "rrr": {"bits_per_spike": clean(bits_per_spike(enc.rates, y))},
            "psth": {"bits_per_spike": clean(psth)}}


def _linear_decoders(arr: TrialArrays, held: HeldOut) -> dict[str, float | None]:
    """The linear decoders' TEST scores; when a label has one class on TRAIN (e.g. no biased block yet in a
    short session) the classifiers are left out (None) and the ridge decoders still run."""
    from training.arrays import TRAIN
    from training.baselines import LinearConfig, fit_lagged_ridge, fit_linear_decoders, spike_features

    try:
        dec = fit_linear_decoders(arr)
        reg = dec.regression
        scores = dec.metrics()
        held.choice["linear"] = dec.classification["choice"].pred  # (K_test,)
        held.block["linear"] = dec.classification["block"].pred
    except DataError as err:
        log.warning("session %s: linear classifiers left out (%s)", arr.eid, err)
        lin = LinearConfig()
        feats = spike_features(arr.spikes, arr.subset(TRAIN), max_components=lin.max_components,
                               sqrt=lin.sqrt_spikes)  # (K, T, D)
        reg = fit_lagged_ridge(feats, {"wheel": arr.wheel, "whisker": arr.whisker}, arr.split, lags=lin.lags,
                               alphas=lin.alphas)
        scores = {f"{k}_r2": v.r2 for k, v in reg.items()}
    held.wheel["linear"] = reg["wheel"].pred
    held.whisker["linear"] = reg["whisker"].pred
    return {k: clean(v) for k, v in scores.items()}


def _oracle(data: Path, arr: TrialArrays, held: HeldOut) -> dict[str, float | None]:
    from training.metrics import bits_per_spike
    from training.oracle import decoding_ceiling, true_latents_for, true_rates_for

    rates = true_rates_for(arr, data)  # (K, T, N) true expected counts
    held.rates["oracle"] = rates[held.test]
    out: dict[str, float | None] = {"bits_per_spike": clean(bits_per_spike(rates[held.test],
                                                                           arr.spikes[held.test]))}
    try:  # the best a model can do without the simulator's private noise latents (behaviour-only encoders)
        known = true_rates_for(arr, data, marginalise=_NOISE_LATENTS)[held.test]  # (K_test, T, N)
        out["bits_per_spike_without_noise_latents"] = clean(bits_per_spike(known, arr.spikes[held.test]))
    except DataError as err:
        log.info("session %s: no noise-marginalised oracle (%s)", arr.eid, err)
    try:
        ceiling = decoding_ceiling(true_latents_for(arr, data), arr)
    except DataError as err:
        log.warning("session %s: no decoding ceiling (%s)", arr.eid, err)
        return out
    out.update({k: clean(v) for k, v in ceiling.metrics().items()})
    return out


# ---- the run ---------------------------------------------------------------------------------------------
def run_quality(data: Path | str, out: Path | str, cfg: QualityConfig | None = None,
                command: str = "neds-rt bench quality") -> dict[str, Any]:
    """Run the whole comparison; write ``report.json``, ``report.md`` and PNGs to ``out``; return it."""
    cfg = cfg or QualityConfig()
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    with _torch_threads(cfg.threads):
        if cfg.seeds == 1:
            report = _run_seed(data, out, cfg, command).report
        else:
            report = _run_seeds(data, out, cfg, command)
    report["timing"]["total_s"] = time.perf_counter() - t_all
    write_report(report, out)
    log.info("quality report in %s (%.0f s)", out, report["timing"]["total_s"])
    return report


def _run_seed(data: Path, out: Path, cfg: QualityConfig, command: str,
              ahead: dict[str, float] | None = None) -> SeedRun:
    """The whole comparison at training seed ``cfg.seed``, streaming NEDS included. With ``jobs`` > 1 the
    training runs are trained first, several at once, and the comparison then loads them (``ahead``: they
    were, with these seconds)."""
    if ahead is None:
        ahead = {}
        if cfg.jobs > 1:
            from bench.quality_jobs import train_ahead

            ahead = train_ahead(data, out, cfg)
    report, helds, region_data = _run(data, out, cfg, command)
    if cfg.streaming:
        from bench.quality_streaming import add_streaming

        report = add_streaming(report, data, out, cfg)
    report["timing"].update({f"trained_ahead_{name}": s for name, s in ahead.items()})
    return SeedRun(cfg.seed, report, helds, region_data)


def _run_seeds(data: Path, out: Path, cfg: QualityConfig, command: str) -> dict[str, Any]:
    """``--seeds N``: one full report per training seed under ``out/seed_S``, combined in ``out``."""
    prepare_sessions(data, cfg)  # simulate (when empty) once, with the base seed
    parts = [(out / seed_folder(seed), replace(cfg, seed=seed, seeds=1))
             for seed in range(cfg.seed, cfg.seed + cfg.seeds)]
    aheads: list[dict[str, float] | None] = [None] * len(parts)
    if cfg.jobs > 1:  # every seed's runs in one pool, the seeds' pretrainings first
        from bench.quality_jobs import train_ahead_seeds

        aheads = list(train_ahead_seeds(data, parts))
    runs = []
    for (folder, seed_cfg), ahead in zip(parts, aheads, strict=True):
        t0 = time.perf_counter()
        seed = seed_cfg.seed
        run = _run_seed(data, folder, seed_cfg, command, ahead)
        run.report["timing"]["total_s"] = time.perf_counter() - t0
        write_report(run.report, folder)
        log.info("seed %s of %s: report in %s", seed - cfg.seed + 1, cfg.seeds, folder)
        runs.append(run)
    report = combine(runs, {"command": command, "config": asdict(cfg),
                            "timing": {f"seed_{r.seed}_s": r.report["timing"]["total_s"] for r in runs}})
    t0 = time.perf_counter()
    report["check_intervals"] = _intervals([r.helds for r in runs], [r.region_data for r in runs], cfg.seed)
    report["timing"]["intervals_s"] = time.perf_counter() - t0
    first = seed_folder(runs[0].seed)
    report["plots"] = [plots.plot_multi_vs_single(report["results"], out / "multi_vs_single.png").name] + [
        f"{first}/{p}" for p in runs[0].report.get("plots", []) if p != "multi_vs_single.png"]
    return report


def _run(data: Path, out: Path, cfg: QualityConfig, command: str
         ) -> tuple[dict[str, Any], dict[str, HeldOut], dict[str, Any]]:
    """One seed's report, and the TEST predictions and region results its intervals were computed from."""
    from streams.load import open_one
    from training.arrays import TEST, TRAIN
    from training.cache import load_arrays
    from training.oracle import chance_levels, latent_shares_for
    from training.probes import Scores, probe_layers

    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    pre, heldout = prepare_sessions(data, cfg)
    one = open_one(data)
    arrays = {e: load_arrays(one, e, cache_root=array_cache_dir(out))[0] for e in (*pre, *heldout)}
    timing["data_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pretrained = train_pretraining({e: arrays[e] for e in pre}, out, cfg)
    timing["pretrain_s"] = time.perf_counter() - t0
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    ceilings: dict[str, dict[str, float | None]] = {}
    chances: dict[str, dict[str, float | None]] = {}
    shares: dict[str, dict[str, float]] = {}  # eid -> latent -> share of the log-rate variance (simulated)
    helds: dict[str, HeldOut] = {}
    finetuned: dict[str, NEDS] = {}
    probes: dict[str, dict[str, Scores]] = {}  # eid -> model -> where it holds choice and block
    for eid in heldout:
        arr = arrays[eid]
        held = helds[eid] = HeldOut(arr=arr, test=arr.subset(TEST))
        probed: dict[str, NEDS] = {}  # the models that decode, for the layer probes
        t0 = time.perf_counter()
        rows = _baselines(arr, held)
        chances[eid] = {k: clean(v) for k, v in chance_levels(arr).items()}
        if _has_ground_truth(data, arr):
            ceilings[eid] = _oracle(data, arr, held)
            rows["oracle"] = dict(ceilings[eid])
            try:
                shares[eid] = latent_shares_for(arr, data)
            except DataError as err:
                log.warning("session %s: no latent variance shares (%s)", eid, err)
        timing[f"baselines_{eid}_s"] = time.perf_counter() - t0
        for name, (tasks, _) in VARIANTS.items():
            t0 = time.perf_counter()
            model = train_variant(arr, out, cfg, name)
            pred = neds_predict(model, arr, held.test)
            rows[name] = neds_metrics(pred, arr, held.test, tasks)
            _keep_preds(held, name, pred)
            timing[f"{name}_{eid}_s"] = time.perf_counter() - t0
            if "decoding" in tasks:
                probed[name] = model
        t0 = time.perf_counter()
        model = train_multi(arr, out, cfg)
        finetuned[eid] = probed["neds_multi"] = model
        pred = neds_predict(model, arr, held.test)
        rows["neds_multi"] = neds_metrics(pred, arr, held.test)
        _keep_preds(held, "neds_multi", pred)
        timing[f"neds_multi_{eid}_s"] = time.perf_counter() - t0
        results[eid] = rows
        t0 = time.perf_counter()
        probes[eid] = {name: probe_layers(m, arr) for name, m in probed.items()}
        timing[f"probes_{eid}_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    regions, region_data = _regions(data, arrays, pre, pretrained, finetuned, cfg)
    timing["regions_s"] = time.perf_counter() - t0
    extra: dict[str, Any] = {
        "command": command, "config": asdict(cfg), "data": str(data), "pretrain_sessions": pre,
        "heldout_sessions": heldout, "timing": timing,
        "n_units": {e: int(arrays[e].n_units) for e in arrays},
        "n_trials": {e: {s: int((arrays[e].split == v).sum()) for s, v in (("train", TRAIN), ("test", TEST))}
                     for e in arrays},
    }
    if shares:
        extra["latent_variance"] = shares
    if probes:
        extra["probes"] = probes
    report = assemble(results, ceilings=ceilings, chances=chances, regions=regions, extra=extra)
    t0 = time.perf_counter()
    report["check_intervals"] = _intervals([helds], [region_data], cfg.seed)
    timing["intervals_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report["plots"] = _plots(out, report, helds, region_data, cfg)
    timing["plots_s"] = time.perf_counter() - t0
    return report, helds, region_data


def _keep_preds(held: HeldOut, name: str, pred: Mapping[str, np.ndarray]) -> None:
    if name in ("neds_single", "neds_multi"):
        held.wheel[name] = pred["wheel"]
        held.whisker[name] = pred["whisker"]
        held.rates[name] = np.exp(pred["log_rates"])  # (K_test, T, N) expected counts
        held.choice[name] = pred["choice"].argmax(axis=1)  # (K_test,)
        held.block[name] = pred["block"].argmax(axis=1)


def _intervals(helds: Sequence[Mapping[str, HeldOut]], region_data: Sequence[Mapping[str, Any]], seed: int
               ) -> dict[str, dict[str, Any]]:
    """Paired-bootstrap intervals of the done-when checks (:mod:`bench.quality_bootstrap`), from one run or
    one per training seed (averaged over seeds on each draw)."""
    out = trial_intervals(helds, trial_comparisons(), seed=seed)
    if all(region_data):
        neds = np.stack([r["neds"].pred == r["neds"].true for r in region_data])  # (S, N) bool
        psth = np.stack([r["psth"].pred == r["psth"].true for r in region_data])
        out.update(region_intervals(neds, psth, region_data[0]["neds"].chance_majority, REGION_CHECKS,
                                    seed=seed))
    return out


def _regions(data: Path, arrays: Mapping[str, TrialArrays], pre: list[str], pretrained: NEDS,
             finetuned: Mapping[str, NEDS], cfg: QualityConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Region classification pooled over all sessions, from NEDS neuron embeddings (the check's features:
    stitching column + spike-head row; each half is also scored alone) vs PSTH features, and, where every
    session is simulated, from the simulator's true loadings: the ceiling."""
    from training.arrays import TRAIN
    from training.oracle import fraction_of_ceiling, true_loadings_for
    from training.regions import classify_regions, psth_features

    parts_by_session, psth, regions, truth = [], [], [], []
    for eid, model in [*((e, pretrained) for e in pre), *finetuned.items()]:
        arr = arrays[eid]
        parts_by_session.append(embedding_parts(model, eid))
        psth.append(psth_features(arr.spikes, rows=arr.subset(TRAIN), choice=arr.choice, smooth_bins=1.0))
        regions.append(np.asarray(arr.regions).astype(str))
        if _has_ground_truth(data, arr):
            truth.append(true_loadings_for(arr, data))
    x_parts = {name: np.concatenate([p[name] for p in parts_by_session]) for name in parts_by_session[0]}
    x_emb = np.concatenate(list(x_parts.values()), axis=1)  # the check's features: the parts side by side
    x_psth, reg = np.concatenate(psth), np.concatenate(regions)
    try:
        neds = classify_regions(x_emb, reg, n_splits=cfg.region_folds, seed=cfg.seed)
        base = classify_regions(x_psth, reg, n_splits=cfg.region_folds, seed=cfg.seed)
        parts = {name: classify_regions(x, reg, n_splits=cfg.region_folds, seed=cfg.seed)
                 for name, x in x_parts.items()}
        if len(truth) == len(parts_by_session):
            parts["oracle"] = classify_regions(np.concatenate(truth), reg, n_splits=cfg.region_folds,
                                               seed=cfg.seed)
    except DataError as err:
        log.warning("region classification skipped: %s", err)
        return {"skipped": str(err)}, {}
    scores: dict[str, Any] = {
        "neds_accuracy": neds.accuracy, "neds_balanced_accuracy": neds.balanced_accuracy,
        "psth_accuracy": base.accuracy, "psth_balanced_accuracy": base.balanced_accuracy,
        "chance_majority": neds.chance_majority, "chance_uniform": neds.chance_uniform,
    }
    for name, res in parts.items():
        scores[f"{name}_accuracy"], scores[f"{name}_balanced_accuracy"] = res.accuracy, res.balanced_accuracy
    if "oracle" in parts:  # accuracy as a fraction of the way from chance (majority) to the ceiling
        for name in ("neds", "psth", "stitch", "head"):
            try:
                scores[f"{name}_fraction_of_ceiling"] = fraction_of_ceiling(
                    scores[f"{name}_accuracy"], parts["oracle"].accuracy, neds.chance_majority)
            except DataError as err:
                log.warning("region classification: no fraction of the ceiling (%s)", err)
    scores.update({
        "n_neurons": int(neds.kept.size), "n_regions": int(neds.classes.size), "n_splits": neds.n_splits,
        "classes": neds.classes.tolist(), "dropped": neds.dropped, "sessions": len(parts_by_session),
        "features": "stitching column + spike-head row of each neuron (pretrained and fine-tuned NEDS)",
        "oracle_features": "the simulator's true loadings of each neuron on its latents" if "oracle" in parts
        else None,
        "confusion": neds.confusion.tolist(), "psth_confusion": base.confusion.tolist(),
    })
    return scores, {"emb": x_emb, "regions": reg, "neds": neds, "psth": base}


def _plots(out: Path, report: Mapping[str, Any], helds: Mapping[str, HeldOut], region_data: Mapping[str, Any],
           cfg: QualityConfig) -> list[str]:
    from training.regions import plot_confusion, plot_projection

    paths = [plots.plot_multi_vs_single(report["results"], out / "multi_vs_single.png")]
    eid, held = next(iter(helds.items()))
    for target in ("wheel", "whisker"):
        true = getattr(held.arr, target)[held.test]
        paths.append(plots.plot_traces(true, getattr(held, target), out / f"traces_{target}.png",
                                       target=target, trials=cfg.plot_trials))
    counts = held.arr.spikes[held.test]  # (K_test, T, N)
    top = np.argsort(counts.sum(axis=(0, 1)))[::-1][: cfg.plot_neurons].tolist()  # the busiest neurons
    paths.append(plots.plot_psths(counts, held.rates, top, out / "psths.png"))
    if region_data:
        paths.append(plot_projection(region_data["emb"], region_data["regions"],
                                     out / "regions_projection.png",
                                     title="NEDS neuron embeddings by region (PCA)"))
        paths.append(plot_confusion(region_data["neds"], out / "regions_confusion.png"))
        paths.append(plot_confusion(region_data["psth"], out / "regions_confusion_psth.png",
                                    title="PSTH baseline"))
    log.info("plots of held-out session %s written", eid)
    return [p.name for p in paths]


def add_streaming_rows(report: dict[str, Any], rows: Mapping[str, Mapping[str, float | None]],
                       out: Path | str | None = None, model: str = "neds_streaming",
                       info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Hook for issue 5: add a streaming model's scores ``{eid: {metric: value}}`` on the held-out sessions
    (e.g. its causal decodes of continuous data), with ``info`` on how they were made under ``streaming``,
    and rewrite the report in ``out`` when given."""
    base = {**report, "streaming": dict(info)} if info is not None else report
    new = add_model_rows(base, model, rows, note="streaming NEDS: causal per-bin decodes (each bin sees only "
                         "itself and the context before it) on the TEST trial windows")
    if out is not None:
        write_report(new, out)
    return new
