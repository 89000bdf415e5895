"""The ``neds-rt`` command line. Heavy imports happen inside each command so ``--help`` stays fast."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from neds_rt.errors import NedsRtError, invalid
from training.config import FINETUNE_UNIT_DROPOUT, MAX_UNIT_DROPOUT, SPIKE_WEIGHT

app = typer.Typer(
    name="neds-rt",
    help="Real-time closed-loop decoding with NEDS: simulate, train, export, serve, replay, bench.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: print figures, write JSON and PNG.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(err: NedsRtError) -> typer.Exit:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Folder for the ONE cache (created).")],
    sessions: Annotated[int, typer.Option(min=1, help="Number of sessions.")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same cache and ids.")] = 0,
    trials: Annotated[int | None, typer.Option(help="Trials per session (default: IBL-like draw).")] = None,
) -> None:
    """Write IBL-like sessions into a real ONE cache (ALF files + cache tables + ground truth)."""
    from streams.simulate import simulate_cache

    try:
        eids = simulate_cache(out, n_sessions=sessions, seed=seed, n_trials=trials)
    except NedsRtError as err:
        raise _fail(err) from err
    typer.echo(f"wrote {len(eids)} sessions to {out}")
    for eid in eids:
        typer.echo(f"  {eid}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Working folder for the demo.")] = Path("demo_out"),
) -> None:
    """The main job on an embedded default: simulate, load, bin and summarise (more steps as they land)."""
    from neds_rt.demo import run_demo

    try:
        run_demo(out)
    except NedsRtError as err:
        raise _fail(err) from err


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="ONE cache folder (real IBL or `neds-rt simulate`).")],
    out: Annotated[Path, typer.Option(help="Run folder: best.pt, last.pt and metrics.json.")],
    mode: Annotated[str, typer.Option(help="offline (the paper) or streaming (causal).")] = "offline",
    sessions: Annotated[str, typer.Option(help="EID,EID,... or all.")] = "all",
    finetune_from: Annotated[
        Path | None, typer.Option(help="Checkpoint to fine-tune from (keeps shared weights).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    nproc: Annotated[
        int, typer.Option(min=1, help="Processes; N > 1 reruns this command under `python -m "
                          "torch.distributed.run --standalone --nproc_per_node N` (DDP).")
    ] = 1,
    preset: Annotated[str, typer.Option(help="Model size: tiny, small or default (the paper).")] = "default",
    tokens: Annotated[str, typer.Option(
        help="Tokens per bin: modality (the paper's 5 per bin), fused (1 per bin) or auto (fused when "
             "streaming, modality offline).")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Trials per step per process.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle).")] = 1e-3,
    spike_weight: Annotated[float, typer.Option(
        help="Weight of the spike loss (Poisson NLL per neuron and bin) against the behaviour losses.")
    ] = SPIKE_WEIGHT,
    unit_dropout: Annotated[float | None, typer.Option(
        min=0.0, max=MAX_UNIT_DROPOUT, help="Share of units zeroed in each training trial's spike input (the "
        f"loss still scores every unit), against memorising a session's trials. Default "
        f"{FINETUNE_UNIT_DROPOUT} with --finetune-from, else 0.")] = None,
    frozen_epochs: Annotated[int, typer.Option(
        min=0, help="With --finetune-from: epochs at the start that train the sessions' own layers alone "
        "(stitching, embedding, heads), the shared layers kept as pretrained; then every layer trains.")] = 0,
    mask_ratio: Annotated[float | None, typer.Option(
        help="Fraction of bins the within-modality and cross-modal masks hide. Default 0.3, or the "
             "checkpoint's when fine-tuning.")] = None,
    refit_class_heads: Annotated[bool, typer.Option(
        help="At the end, refit best.pt's choice and block heads by logistic regression on its frozen "
             "TRAIN features (C cross-validated on TRAIN).")] = True,
    max_steps: Annotated[int, typer.Option(min=0, help="Stop after this many steps (0: all epochs).")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0: torch's default).")] = 0,
    array_cache: Annotated[Path | None, typer.Option(
        help="Cache of binned session arrays (default: DATA/neds_rt_arrays).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt.")] = False,
    checkpoint_minutes: Annotated[float, typer.Option(
        min=0.0, help="Also save OUT/last.pt this often inside an epoch, so --resume continues at the next "
        "batch (0: at the end of each epoch only).")] = 0.0,
    progress: Annotated[bool, typer.Option(help="Progress bar.")] = True,
) -> None:
    """Train NEDS on one or many sessions (or fine-tune on held-out ones); DDP with --nproc N."""
    import os
    import sys

    if nproc > 1:
        from training.distributed import launch, strip_option

        raise typer.Exit(code=launch(nproc, strip_option(sys.argv[1:], "--nproc")))
    import torch

    from training.config import NEDSConfig, TrainConfig
    from training.model import count_parameters
    from training.train import load_run_arrays
    from training.train import train as run_training

    if int(os.environ.get("RANK", "0")) > 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 alone logs
    if threads:
        torch.set_num_threads(threads)
    try:
        chosen = None if sessions.strip() == "all" else [s.strip() for s in sessions.split(",") if s.strip()]
        arrays = load_run_arrays(data, chosen, cache_root=array_cache, mode=mode, seed=seed)
        model_cfg = None
        if finetune_from is None and not resume:
            model_cfg = NEDSConfig.preset(preset, n_sessions=len(arrays), mode=mode, tokens=tokens)
        tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, max_steps=max_steps,
                           device=device, progress=progress, spike_weight=spike_weight,
                           unit_dropout=unit_dropout, frozen_epochs=frozen_epochs,
                           refit_class_heads=refit_class_heads, checkpoint_minutes=checkpoint_minutes)
        result = run_training(arrays, out, model_cfg, tcfg, finetune_from=finetune_from,
                              mask_ratio=mask_ratio, resume=resume)
    except NedsRtError as err:
        raise _fail(err) from err
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"trained {len(arrays)} sessions, {count_parameters(result.model):,} parameters, "
                   f"{result.steps} steps, {result.trials_per_s:.1f} trials/s")
        typer.echo(f"best epoch {result.best_epoch}, validation score {result.best_score:.4f}")
        for r in result.class_head_refit:
            typer.echo(f"{r.head} head of {r.eid}: {r.kept}, VAL balanced accuracy {r.val_bacc_trained:.3f} "
                       f"-> {r.val_bacc:.3f} (the trained head's is biased up by epoch selection)")
        typer.echo(f"run folder: {out} (best.pt, last.pt, metrics.json)")


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Training checkpoint (.pt) to export.")],
    out: Annotated[Path, typer.Option(help="Model file to write (.onnx or .pt).")],
    format: Annotated[str, typer.Option("--format", help="onnx | torchscript")] = "onnx",
    graph: Annotated[str, typer.Option(help="step (one bin per call, state kept) | window")] = "step",
    session: Annotated[str | None, typer.Option(help="Session (eid) whose units the file serves.")] = None,
    context: Annotated[int | None, typer.Option(help="Context C in bins (default: n_bins).")] = None,
    quantize: Annotated[str, typer.Option(
        help="none | int8 | int4 (ONNX only): int8 weights per output channel, or 4-bit weights in blocks of "
             "32 (onnxruntime MatMulNBits, the fastest CPU step); decodes differ slightly from float32.")
    ] = "none",
) -> None:
    """Export a checkpoint to ONNX or TorchScript; its metadata (units, context, ...) travel inside."""
    from training.export import export_checkpoint

    try:
        meta = export_checkpoint(checkpoint, out, fmt=format, graph=graph, eid=session, context=context,
                                 quantize=quantize)
    except NedsRtError as err:
        raise _fail(err) from err
    typer.echo(
        f"wrote {out}: {meta.mode} {meta.graph} graph, session {meta.session}, {meta.n_units} units, "
        f"context {meta.context} bins of {meta.bin_size * 1000:.0f} ms, outputs "
        f"{', '.join(o.label for o in meta.outputs)}, weights sha256 {meta.weights_sha256[:12]}"
        + (f", {meta.weights} weights" if meta.weights != "float32" else "")
    )


@app.command()
def serve(
    model: Annotated[Path, typer.Option(help="Exported step graph (.onnx or .pt) from `neds-rt export`.")],
    stream: Annotated[str, typer.Option(help="LSL spike stream name (with --zmq-in: the ZMQ topic).")]
    = "spikes",
    engine: Annotated[str, typer.Option(help="onnx or torchscript.")] = "onnx",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    cuda_graph: Annotated[bool, typer.Option(
        "--cuda-graph", help="onnxruntime on CUDA: replay each step as one CUDA graph.")] = False,
    zmq_in: Annotated[str | None, typer.Option(help="Read spikes from this ZMQ PUB (connect), not LSL.")]
    = None,
    zmq_out: Annotated[str | None, typer.Option(help="Also publish decodes on this ZMQ url (bind).")] = None,
    out_stream: Annotated[str, typer.Option(help="Name of the LSL Behavior stream of decodes.")]
    = "neds_decodes",
    log: Annotated[Path | None, typer.Option("--log", help="Decode log CSV (default: decodes_<time>.csv).")]
    = None,
    grace: Annotated[float | None, typer.Option(help="ms a bin stays open after its end (default 5; binned "
                                                     "counts 50).")] = None,
    lsl_scope: Annotated[str, typer.Option(help="LSL discovery scope: machine, link or site.")] = "machine",
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="Engine CPU threads.")] = 1,
    kind: Annotated[str, typer.Option(help="auto, events (Spikes) or counts (SpikeCounts).")] = "auto",
    clock: Annotated[str, typer.Option(help="local (LSL, same-host ZMQ) or stream (newest stream time).")]
    = "local",
    t0: Annotated[float | None, typer.Option(help="Bin-grid origin, stream seconds (default: first event "
                                                  "floored to the bin grid).")] = None,
    stall: Annotated[float, typer.Option(help="Seconds without data before bins are gap-filled.")] = 1.0,
    status_every: Annotated[float, typer.Option(help="Seconds between status lines.")] = 5.0,
    resolve_timeout: Annotated[float, typer.Option(help="Seconds to wait for the input stream to appear.")]
    = 10.0,
    summary_json: Annotated[Path | None, typer.Option(help="Also write the exit summary (stage "
                                                            "percentiles, counts, t0) as JSON here.")] = None,
    realtime: Annotated[bool, typer.Option(
        "--realtime", help="Run every serve thread at SCHED_FIFO (Linux, needs CAP_SYS_NICE; warns "
                           "otherwise).")] = False,
    cpus: Annotated[str | None, typer.Option(help="Pin serve to these CPUs, e.g. 1 or 2-3.")] = None,
    huge_pages: Annotated[bool, typer.Option(
        "--huge-pages/--no-huge-pages",
        help="After warm-up, move the model's memory onto 2 MiB pages (Linux transparent huge pages; ~10% "
             "off a step run alone once per bin).")] = True,
    prewarm_ms: Annotated[float, typer.Option(
        min=0.0, help="This long before each bin closes, run the model once on the current state and "
                      "throw the result away, so the real step finds its weights in cache (local clock; "
                      "the first 16 bins only unless --prewarm-fixed; 0: off).")] = 3.0,
    prewarm_adapt: Annotated[bool, typer.Option(
        "--prewarm-adapt/--prewarm-fixed",
        help="After 16 prewarms, start each one as long before the bin closes as recent prewarms took "
             "(95th percentile) plus 0.3 ms; --prewarm-fixed keeps --prewarm-ms.")] = True,
) -> None:
    """Decode a live spike stream, one step per 20 ms bin: LSL Behavior + ZMQ decodes + decode log."""
    import signal
    import time

    from neds_rt import lsl_scope as scope
    from neds_rt.realtime import parse_cpus
    from neds_rt.serve import ServeConfig, Server

    try:
        scope.configure(lsl_scope)  # before any LSL call
        log_path = log if log is not None else Path(f"decodes_{time.strftime('%Y%m%d_%H%M%S')}.csv")
        cfg = ServeConfig(model=model, stream=stream, engine=engine, device=device, threads=threads,
                          kind=kind, cuda_graph=cuda_graph,
                          zmq_in=zmq_in, zmq_out=zmq_out, out_stream=out_stream, log_path=log_path,
                          grace_ms=grace, duration_s=duration, clock=clock, t0=t0, stall_s=stall,
                          status_s=status_every, resolve_timeout_s=resolve_timeout, realtime=realtime,
                          cpus=parse_cpus(cpus), huge_pages=huge_pages, prewarm_ms=prewarm_ms,
                          prewarm_adapt=prewarm_adapt)
        server = Server(cfg)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: server.stop())
        summary = server.run()
    except NedsRtError as err:
        raise _fail(err) from err
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"decode log: {log_path}")
    if summary_json is not None:
        import json

        doc = {**summary.to_dict(), "t0": server.t0, "first_bin": server.first_bin,
               "last_bin": server.last_bin, "bin_size": server.bin_size, "log": str(log_path),
               "model": str(model), "engine": engine, "late_events": server.late_events()}
        summary_json.write_text(json.dumps(doc, indent=1, default=float))


@app.command()
def replay(
    data: Annotated[Path, typer.Option(help="ONE cache folder (simulated or real IBL).")],
    session: Annotated[str, typer.Option(help="Session eid.")],
    probe: Annotated[str | None, typer.Option(help="Probe, e.g. probe00 (default: the first).")] = None,
    stream: Annotated[str, typer.Option(help="LSL spike stream name and ZMQ topic; behaviour and markers "
                                             "streams get -behaviour / -markers.")] = "spikes",
    speed: Annotated[float, typer.Option(help="Playback speed; above 1 plays faster than real time.")] = 1.0,
    loop: Annotated[bool, typer.Option("--loop", help="Restart at the end; times continue.")] = False,
    zmq_out: Annotated[str | None, typer.Option(help="Also publish spike events on this ZMQ url (bind).")]
    = None,
    start: Annotated[float, typer.Option(help="Segment start, session seconds.")] = 0.0,
    duration: Annotated[float | None, typer.Option(help="Segment length, session seconds (default: to the "
                                                        "end).")] = None,
    lsl_scope: Annotated[str, typer.Option(help="LSL discovery scope: machine, link or site.")] = "machine",
    no_lsl: Annotated[bool, typer.Option("--no-lsl", help="No LSL streams (ZMQ only).")] = False,
    lead: Annotated[float, typer.Option(help="Seconds between opening the streams and the first spike.")]
    = 2.0,
    chunk_ms: Annotated[float, typer.Option(help="Pacing chunk, ms: spikes due in a chunk leave at its end.")]
    = 0.5,
    realtime: Annotated[bool, typer.Option("--realtime", help="Pace from a SCHED_FIFO thread (Linux, needs "
                                                              "CAP_SYS_NICE; warns otherwise).")] = False,
    cpus: Annotated[str | None, typer.Option(help="Pin the pacing thread to these CPUs, e.g. 0.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the replay summary here.")] = None,
) -> None:
    """Play a session as live streams: spikes (LSL/ZMQ), ground-truth behaviour and trial-event markers."""
    import json
    import signal
    import threading

    from neds_rt import lsl_scope as scope
    from neds_rt.realtime import parse_cpus
    from streams.replay import ReplayConfig, Replayer, load_replay_session

    stop = threading.Event()
    try:
        cfg = ReplayConfig(stream=stream, speed=speed, loop=loop, start=start, duration=duration,
                           lsl=not no_lsl, zmq_out=zmq_out, lead_s=lead, chunk_s=chunk_ms / 1000.0,
                           realtime=realtime, cpus=parse_cpus(cpus))
        cfg.check()
        if not no_lsl:
            scope.configure(lsl_scope)  # before any LSL call
        sess = load_replay_session(data, session, probe)
        with Replayer(sess, cfg) as replayer:
            clock = replayer.open()
            old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                typer.echo(f"replaying {sess.summary()}: stream {stream!r}"
                           + (f", ZMQ {zmq_out}" if zmq_out else "")
                           + f"; stream time = session time / speed + {clock.t_offset:.6f} s")
                summary = replayer.run(stop)
                stop.wait(0.5)  # let consumers drain before the outlets close
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)
    except NedsRtError as err:
        raise _fail(err) from err
    for line in summary.lines():
        typer.echo(line)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary.as_dict(), indent=2))
        typer.echo(f"summary: {json_out}")


@bench_app.command("latency")
def bench_latency(
    data: Annotated[Path, typer.Option(help="ONE cache holding the session to replay.")],
    session: Annotated[str, typer.Option(help="Session (eid) to replay; the model must serve its units.")],
    model: Annotated[Path, typer.Option(help="Exported step graph (.onnx; .pt for torchscript).")],
    out: Annotated[Path, typer.Option(help="Folder for latency.json, latency.png and the logs.")]
    = Path("bench_out/latency"),
    duration: Annotated[float, typer.Option(help="Session seconds replayed per engine.")] = 60.0,
    speed: Annotated[float, typer.Option(help="Replay speed (1 = real time).")] = 1.0,
    start: Annotated[float | None, typer.Option(help="Session second to start at.")] = None,
    engines: Annotated[str, typer.Option(help="Comma-separated: onnx,torchscript.")] = "onnx",
    device: Annotated[str, typer.Option(help="Serve's --device: cpu or cuda.")] = "cpu",
    cuda_graph: Annotated[bool, typer.Option(
        "--cuda-graph", help="Serve's --cuda-graph (the onnx engine on CUDA).")] = False,
    torchscript_model: Annotated[Path | None, typer.Option(help="TorchScript file for the torchscript "
                                                                "engine (default: MODEL with .pt).")] = None,
    probe: Annotated[str | None, typer.Option(help="Probe to replay (default: the first).")] = None,
    grace: Annotated[float, typer.Option(help="Serve's grace in ms.")] = 5.0,
    realtime: Annotated[bool, typer.Option(
        "--realtime", help="Serve, the client and replay at SCHED_FIFO, in that order, on any "
                           "CPU.")] = False,
    pin: Annotated[bool, typer.Option(
        "--pin", help="Pin serve to the last CPU, replay and the client to the others.")] = False,
    prewarm_ms: Annotated[float, typer.Option(min=0.0, help="Serve's --prewarm-ms (0: off).")] = 3.0,
    prewarm_adapt: Annotated[bool, typer.Option(
        "--prewarm-adapt/--prewarm-fixed", help="Serve's --prewarm-adapt / --prewarm-fixed.")] = True,
) -> None:
    """Replay, serve and a measuring client as three processes: per-stage latency, missed bins, CPU use and
    live decode quality against the ground truth and the offline evaluation."""
    from bench.latency import LatencyBenchConfig, run_latency_bench
    from neds_rt import lsl_scope

    lsl_scope.configure("machine")
    cfg = LatencyBenchConfig(duration=duration, speed=speed, start=start, probe=probe, grace_ms=grace,
                             engines=tuple(e.strip() for e in engines.split(",") if e.strip()),
                             device=device, cuda_graph=cuda_graph, realtime=realtime, pin=pin,
                             prewarm_ms=prewarm_ms, prewarm_adapt=prewarm_adapt)
    try:
        models = {e: (torchscript_model or model.with_suffix(".pt")) if e == "torchscript" else model
                  for e in cfg.engines}
        run_latency_bench(data, session, models, out, cfg)
    except NedsRtError as err:
        raise _fail(err) from err
    typer.echo(f"wrote {out / 'latency.json'} and {out / 'latency.png'}")


@bench_app.command("binning")
def bench_binning(
    out: Annotated[Path, typer.Option(help="Folder for the JSON result.")] = Path("bench_out"),
    duration: Annotated[float, typer.Option(help="Session length in seconds.")] = 3600.0,
    units: Annotated[int, typer.Option(help="Number of units.")] = 600,
    rate: Annotated[float, typer.Option(help="Mean firing rate, Hz.")] = 7.0,
) -> None:
    """Spikes/s binned by the numba kernels vs the numpy reference vs per-window np.histogram."""
    from bench.binning import run_binning_bench

    run_binning_bench(out, duration=duration, n_units=units, rate_hz=rate)


@bench_app.command("inference")
def bench_inference(
    out: Annotated[Path, typer.Option(help="Folder: inference.json/.png, models/.")] = Path("bench_out"),
    steps: Annotated[int | None, typer.Option(help="Timed steps per step row (default 10000).")] = None,
    warmup: Annotated[int | None, typer.Option(help="Untimed steps first (default 500, >= context).")] = None,
    baseline_steps: Annotated[
        int | None, typer.Option(help="Timed ticks of each naive full-window row (default 300).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Rows run interleaved in this many chunks.")] = None,
    paced_steps: Annotated[int | None, typer.Option(
        help="Timed calls of the paced rows, one per 20 ms bin as served (default 1500; 0: none).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A short run (600 steps, 20 naive ticks).")] = False,
    units: Annotated[int, typer.Option(help="Units of the session.")] = 600,
    context: Annotated[int, typer.Option(help="Context bins (ring of the step, window of the naive).")] = 100,
    rate: Annotated[float, typer.Option(help="Mean firing rate, Hz.")] = 7.0,
    cpu_batch: Annotated[int, typer.Option(help="Streams per call of the batched CPU row (0: none).")] = 8,
    eager_baseline: Annotated[bool, typer.Option(help="Also time the naive recompute in eager.")] = True,
    rows: Annotated[str, typer.Option(help="all, or cuda: only the CUDA rows and the reference rows "
                                           "(1-thread CPU step, eager, naive baseline).")] = "all",
    cuda_batches: Annotated[str, typer.Option(help="Streams per call of the batched CUDA rows, e.g. 8,32.")]
    = "8,32",
    hidden: Annotated[int | None, typer.Option(help="Model width (default: NEDSConfig's 256).")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads (default 8).")] = None,
    mlp: Annotated[int | None, typer.Option(help="MLP width (default 512).")] = None,
    layers: Annotated[int | None, typer.Option(help="Transformer layers (default 5).")] = None,
) -> None:
    """Per-step latency (p50/p99/p99.9/max) of onnxruntime, TorchScript, eager vs the naive recompute."""
    from typing import Any

    from bench.inference import InferenceBenchConfig, run_inference_bench

    given = {k: v for k, v in dict(steps=steps, warmup=warmup, baseline_steps=baseline_steps,
                                   rounds=rounds, paced_steps=paced_steps).items() if v is not None}
    try:
        batches = tuple(int(b) for b in cuda_batches.split(",") if b.strip())
    except ValueError:
        raise _fail(invalid("--cuda-batches", "must be integers separated by commas", cuda_batches)) from None
    fields: dict[str, Any] = dict(n_units=units, context=context, rate_hz=rate, cpu_batch=cpu_batch,
                                  cuda_batches=batches,
                                  eager_baseline=eager_baseline, rows=rows, hidden=hidden, heads=heads,
                                  mlp=mlp, layers=layers) | given
    try:
        cfg = InferenceBenchConfig.quick(**fields) if quick else InferenceBenchConfig(**fields)
        run_inference_bench(out, cfg)
    except NedsRtError as err:
        raise _fail(err) from err


@bench_app.command("quality")
def bench_quality(
    data: Annotated[Path, typer.Option(help="ONE cache folder; an empty or new one is simulated first.")],
    out: Annotated[Path, typer.Option(help="Folder: report.json, report.md, PNGs, models/.")] = Path(
        "bench_out/quality"),
    quick: Annotated[bool, typer.Option("--quick", help="4 + 1 sessions of 150 trials, tiny NEDS.")] = False,
    pretrain: Annotated[int | None, typer.Option(help="Pretraining sessions (default 10, quick 4).")] = None,
    heldout: Annotated[int | None, typer.Option(help="Held-out sessions (default 2, quick 1).")] = None,
    preset: Annotated[str | None, typer.Option(help="NEDS size: tiny|small|default.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs of every NEDS training run.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulation and the training runs.")] = 0,
    seeds: Annotated[int, typer.Option(
        min=1, help="Training seeds (SEED, SEED+1, ...): N > 1 runs the comparison once per seed into "
        "OUT/seed_S and judges the checks on the seed means.")] = 1,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
    jobs: Annotated[int, typer.Option(
        min=1, help="Training runs at once, each in its own process with --threads torch threads (for a "
        "many-core host or a GPU); the report is the same, only sooner.")] = 1,
    streaming: Annotated[bool, typer.Option(
        "--streaming/--no-streaming",
        help="Also train a streaming NEDS per held-out session and score its causal decodes.")] = True,
    int8: Annotated[bool, typer.Option(
        "--int8/--no-int8",
        help="With --streaming: also score the streaming NEDS exported with int8 weights.")] = True,
    int4: Annotated[bool, typer.Option(
        "--int4/--no-int4",
        help="With --streaming: also score the streaming NEDS exported with 4-bit weights.")] = True,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Reuse the training runs that ended under OUT/models and continue the ones cut "
        "short (same settings only); for long runs that get interrupted.")] = False,
    checkpoint_minutes: Annotated[float, typer.Option(
        min=0.0, help="Every training run also saves its last.pt this often inside an epoch, so --resume "
        "loses at most this much of a run (0: at the end of each epoch only).")] = 10.0,
    frozen_epochs: Annotated[int, typer.Option(
        min=0, help="Epochs at the start of the multi-session NEDS's fine-tuning that train the held-out "
        "session's own layers alone (neds-rt train --frozen-epochs).")] = 0,
) -> None:
    """NEDS vs linear, RRR and unimodal baselines and the oracle ceiling, and the streaming NEDS's gap to the
    offline one: report.json/.md and PNGs."""
    import sys
    from typing import Any

    from bench.quality import QualityConfig, run_quality
    from bench.quality_report import gap_table, interval_text, seeds_text, summary_table

    fields: dict[str, Any] = {k: v for k, v in dict(n_pretrain=pretrain, n_heldout=heldout, preset=preset)
                              .items() if v is not None}
    fields |= dict(seed=seed, seeds=seeds, threads=threads, jobs=jobs, streaming=streaming, int8=int8,
                   int4=int4, resume=resume, frozen_epochs=frozen_epochs,
                   checkpoint_minutes=checkpoint_minutes)
    if epochs is not None:
        fields |= dict(epochs=epochs, pretrain_epochs=epochs, finetune_epochs=epochs)
    try:
        cfg = QualityConfig.quick(**fields) if quick else QualityConfig(**fields)
        report = run_quality(data, out, cfg, command=" ".join(["neds-rt", *sys.argv[1:]]))
    except NedsRtError as err:
        raise _fail(err) from err
    typer.echo(summary_table(report))
    gap = gap_table(report)
    if gap:
        typer.echo("streaming vs offline (mean over held-out sessions):\n" + "\n".join(gap))
    for check in report["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[check["passed"]]
        interval = (report.get("check_intervals") or {}).get(check["name"])
        per_seed = (report.get("check_seeds") or {}).get(check["name"])
        typer.echo(f"{verdict:4} {check['name']}: {check['detail']}"
                   + (f"; {interval_text(interval)}" if interval else "")
                   + (f"; {seeds_text(per_seed)}" if per_seed else ""))
    typer.echo(f"report: {out / 'report.md'} ({report['timing']['total_s']:.0f} s)")


if __name__ == "__main__":
    app()
