"""Exports describe themselves, match torch, and bad model files get clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from neds_rt.engine import open_engine
from neds_rt.errors import ConfigError, ModelFileError, StreamError
from neds_rt.model_meta import META_KEY, ModelMeta
from tests._models import export_tiny, tiny_streaming_model
from training.export import export_model, weights_sha256
from training.model import session_key
from training.quantize import FLOAT_HEADS
from training.streaming import banded_recompute

CONTEXT = 16


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny_streaming_model(n_units=12)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("export")
    paths = {}
    for fmt, ext in (("onnx", "onnx"), ("torchscript", "pt")):
        for graph in ("step", "window"):
            paths[f"{fmt}-{graph}"] = out / f"m_{graph}.{ext}"
            export_model(model, model.eids[0], paths[f"{fmt}-{graph}"], fmt=fmt, graph=graph, context=CONTEXT)
    return paths


def _inputs(kind: str, n_bins: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    if kind == "random":
        return rng.normal(0, 2, size=(1, n_bins, 12)).astype(np.float32)  # any float input, even negative
    # realistic: Poisson counts at ~7 Hz per unit per 20 ms bin, with bursts
    rates = rng.lognormal(np.log(0.14), 1.0, size=12)
    return rng.poisson(rates, size=(1, n_bins, 12)).astype(np.float32)


@pytest.mark.parametrize("engine", ["onnx", "torchscript"])
@pytest.mark.parametrize("kind", ["random", "realistic"])
def test_step_graph_equals_torch(model, files: dict[str, Path], engine: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    counts = _inputs(kind, 60)  # 60 steps: the 15-bin ring rolls over 4 times
    with torch.no_grad():
        ref_dec, ref_rates = (t.numpy() for t in banded_recompute(model, model.eids[0],
                                                                  torch.from_numpy(counts), CONTEXT))
    eng = open_engine(files[f"{engine}-step"], engine=engine)
    for t in range(counts.shape[1]):
        dec = eng.step(counts[0, t])
        np.testing.assert_allclose(dec, ref_dec[:, t], atol=1e-4, rtol=0)
        np.testing.assert_allclose(eng.log_rates, ref_rates[:, t], atol=1e-4, rtol=0)
    eng.reset()
    np.testing.assert_allclose(eng.step(counts[0, 0]), ref_dec[:, 0], atol=1e-4, rtol=0)


def test_onnx_io_binding_equals_plain_feeds_for_a_batch(files: dict[str, Path]) -> None:
    from neds_rt.engine import OnnxStepEngine

    counts = np.random.default_rng(5).poisson(0.3, size=(40, 3, 12)).astype(np.float32)  # (T, B, N)
    bound, plain = OnnxStepEngine(files["onnx-step"], batch=3), OnnxStepEngine(files["onnx-step"], batch=3)
    assert bound._binding is not None
    plain._binding = None  # the per-call feed path (the CUDA provider's)
    kept = []
    for t in range(counts.shape[0]):
        dec = bound.step(counts[t])
        np.testing.assert_array_equal(dec, plain.step(counts[t]))
        np.testing.assert_array_equal(bound.log_rates, plain.log_rates)
        kept.append((dec, dec.copy()))
    for dec, snapshot in kept:  # a returned decode is the caller's: later steps do not overwrite it
        np.testing.assert_array_equal(dec, snapshot)
    bound.reset()
    plain.reset()
    np.testing.assert_array_equal(bound.step(counts[0]), plain.step(counts[0]))


@pytest.mark.parametrize("engine", ["onnx", "onnx-feeds", "torchscript"])
def test_prewarm_leaves_the_state_and_decodes_unchanged(files: dict[str, Path], engine: str) -> None:
    counts = _inputs("realistic", 40)  # (1, T, N): the 15-bin ring rolls over twice
    path = files["torchscript-step" if engine == "torchscript" else "onnx-step"]
    kind = "torchscript" if engine == "torchscript" else "onnx"
    warmed, plain = open_engine(path, engine=kind), open_engine(path, engine=kind)
    if engine == "onnx-feeds":
        warmed._binding = None  # type: ignore[union-attr]  # the per-call feed path (the CUDA provider's)
    for t in range(counts.shape[1]):
        for _ in range(t % 3):  # zero, one or two throwaway runs before the step
            warmed.prewarm()
        assert warmed.next_bin == plain.next_bin == t
        np.testing.assert_allclose(warmed.step(counts[0, t]), plain.step(counts[0, t]), atol=1e-6, rtol=0)
        np.testing.assert_allclose(warmed.log_rates, plain.log_rates, atol=1e-6, rtol=0)


def test_window_graphs_equal_torch(model, files: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    counts = _inputs("realistic", CONTEXT)
    with torch.no_grad():
        ref_dec, _ = banded_recompute(model, model.eids[0], torch.from_numpy(counts), CONTEXT)
    sess = ort.InferenceSession(str(files["onnx-window"]), providers=["CPUExecutionProvider"])
    dec, _ = sess.run(None, {"counts": counts})
    np.testing.assert_allclose(dec, ref_dec.numpy(), atol=1e-4, rtol=0)
    ts = torch.jit.load(str(files["torchscript-window"]))
    np.testing.assert_allclose(ts(torch.from_numpy(counts))[0].detach().numpy(), ref_dec.numpy(), atol=1e-4)


def test_metadata_travels_inside_both_formats(model, files: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    for key in ("onnx-step", "torchscript-step"):
        eng = open_engine(files[key], engine=key.split("-")[0])
        meta = eng.meta
        assert meta.graph == "step" and meta.mode == "streaming"
        assert meta.bin_size == 0.02 and meta.context == CONTEXT
        assert meta.session == model.eids[0]
        assert meta.unit_ids == list(range(100, 112))
        assert meta.regions[:5] == ["VISa", "CA1", "DG", "LP", "PO"]
        assert [o.label for o in meta.outputs][:3] == ["wheel_speed", "whisker_motion_energy", "p_choice_cw"]
        assert meta.normalisation == {"wheel_min": 0.0, "wheel_max": 3.0, "whisker_min": 1.0,
                                      "whisker_max": 5.0}
        assert meta.weights_sha256 == weights_sha256(model, model.eids[0])


def test_probabilities_are_probabilities(files: dict[str, Path]) -> None:
    eng = open_engine(files["onnx-step"])
    for t in range(5):
        dec = eng.step(_inputs("realistic", 5)[0, t])
        assert 0.0 <= dec[0, 2] <= 1.0
        assert abs(dec[0, 3:6].sum() - 1.0) < 1e-5


def test_corrupt_and_truncated_files_are_refused(files: dict[str, Path], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelFileError, match=r"garbage.onnx: is not a readable ONNX model"):
        open_engine(garbage)
    for key, engine in (("onnx-step", "onnx"), ("torchscript-step", "torchscript")):
        data = files[key].read_bytes()
        cut = tmp_path / f"cut_{files[key].name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelFileError, match=r"cut_.*(not a readable|truncated)"):
            open_engine(cut, engine=engine)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        open_engine(empty)
    with pytest.raises(ModelFileError, match="does not exist"):
        open_engine(tmp_path / "missing.onnx")


def test_model_without_metadata_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(files["onnx-step"]))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ModelFileError, match=r"bare.onnx: has no 'neds_rt' metadata"):
        open_engine(bare)
    proto.metadata_props.add(key=META_KEY, value='{"graph": "step"}')
    partial = tmp_path / "partial.onnx"
    onnx.save(proto, str(partial))
    with pytest.raises(ModelFileError, match=r"partial.onnx: metadata lacks required keys"):
        open_engine(partial)


def test_window_graph_is_refused_for_serving(files: dict[str, Path]) -> None:
    with pytest.raises(ModelFileError, match="window graph"):
        open_engine(files["onnx-window"])
    with pytest.raises(ModelFileError, match="window graph"):
        open_engine(files["torchscript-window"], engine="torchscript")


def test_wrong_input_shape_and_nan_are_clear_errors(files: dict[str, Path]) -> None:
    eng = open_engine(files["onnx-step"])
    with pytest.raises(StreamError, match=r"counts: must have shape \(B=1, N=12\)"):
        eng.step(np.zeros(11, dtype=np.float32))
    with pytest.raises(StreamError, match="must be finite"):
        eng.step(np.full(12, np.nan, dtype=np.float32))


@pytest.mark.parametrize("engine", ["onnx", "onnx-feeds", "torchscript"])
def test_bad_counts_leave_the_state_untouched(files: dict[str, Path], engine: str) -> None:
    """The bound path checks a (1, N) row with one sum: NaN or inf anywhere, in any dtype, is refused, huge
    finite counts are not, and a refused row moves nothing (the next steps equal an engine that never saw
    it)."""
    path = files["torchscript-step" if engine == "torchscript" else "onnx-step"]
    kind = "torchscript" if engine == "torchscript" else "onnx"
    eng, ref = open_engine(path, engine=kind), open_engine(path, engine=kind)
    if engine == "onnx-feeds":
        eng._binding = None  # type: ignore[union-attr]  # the per-call feed path (the CUDA provider's)
    counts = _inputs("realistic", 24)[0]  # (T, N)
    for t in range(24):
        bad = counts[t:t + 1].copy()  # (1, N), the bound path's fast case
        bad[0, t % 12] = (np.nan, np.inf, -np.inf)[t % 3]
        for row in (bad, bad.astype(np.float64), bad[0]):
            with pytest.raises(StreamError, match="counts: must be finite"):
                eng.step(row)
        assert eng.next_bin == ref.next_bin == t
        if t % 4 == 0:
            eng.prewarm()
        np.testing.assert_array_equal(eng.step(counts[t:t + 1]), ref.step(counts[t:t + 1]))
        np.testing.assert_array_equal(eng.log_rates, ref.log_rates)
    eng.step(np.full((1, 12), 3e38, dtype=np.float32))  # finite, though a float32 sum would overflow
    assert eng.next_bin == 25


def test_stream_with_other_units_is_refused(files: dict[str, Path]) -> None:
    meta = open_engine(files["onnx-step"]).meta
    meta.check_units(list(range(100, 112)), "spikes")  # the right units pass
    with pytest.raises(StreamError, match=r"stream 'spikes' units.*missing from stream \[111\].*\[999\]"):
        meta.check_units([*range(100, 111), 999], "spikes")
    with pytest.raises(StreamError, match="different order"):
        meta.check_units(list(range(111, 99, -1)), "spikes")


def test_export_refuses_bad_requests(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from training.config import NEDSConfig
    from training.model import NEDS

    offline = NEDS(NEDSConfig.preset("tiny"))
    offline.add_session("x", 3)
    with pytest.raises(ConfigError, match="step needs a streaming model"):
        export_model(offline, "x", tmp_path / "o.onnx", graph="step")
    with pytest.raises(ConfigError, match="--format"):
        export_model(model, model.eids[0], tmp_path / "o.bin", fmt="tflite")
    with pytest.raises(ModelFileError, match="not a session of this model"):
        export_model(model, "nope", tmp_path / "o.onnx")


def test_meta_json_round_trip() -> None:
    meta_json = ModelMeta(
        graph="step", mode="streaming", bin_size=0.02, context=100, session="e", unit_ids=[1, 2],
        regions=["CA1", "DG"], outputs=[], normalisation={}, weights_sha256="0", n_layers=1, n_heads=1,
        head_dim=2,
    ).to_json()
    with pytest.raises(ModelFileError, match="outputs"):
        ModelMeta.from_json(meta_json, "m.onnx")  # no output channels
    with pytest.raises(ModelFileError, match="not valid JSON"):
        ModelMeta.from_json("{", "m.onnx")


def test_export_tiny_helper_writes_a_loadable_file(tmp_path: Path) -> None:
    path = export_tiny(tmp_path / "t.onnx")
    assert open_engine(path).meta.n_units == 12


# tolerances: the largest deviation from float32 as a share of each decode channel's range over the run, and
# the smallest correlation with float32 (int4 keeps 16 levels per weight: measured 0.19 and 0.996 on this
# model; on a trained default-size model over 40 held-out trials: at most 0.27 standard deviations off, R2
# against float32 >= 0.993)
@pytest.mark.parametrize(("scheme", "quant_ops", "max_dev", "min_corr"), [
    ("int8", {"MatMulInteger", "DynamicQuantizeLinear"}, 0.1, 0.995),
    ("int4", {"MatMulNBits"}, 0.25, 0.99),
])
def test_quantized_export_quantizes_weights_and_stays_close_to_float32(  # type: ignore[no-untyped-def]
        model, files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, scheme: str,
        quant_ops: set[str], max_dev: float, min_corr: float) -> None:
    import logging

    import onnx

    path = tmp_path / f"{scheme}.onnx"
    with caplog.at_level(logging.INFO):
        meta = export_model(model, model.eids[0], path, graph="step", context=CONTEXT, quantize=scheme)
    chatter = [r for r in caplog.records if "onnxruntime" in r.pathname and r.levelno < logging.WARNING]
    assert not chatter  # the quantizer's per-tensor INFO lines are dropped (its warnings pass)
    assert any("exported onnx step graph" in r.getMessage() for r in caplog.records)  # ours is not
    assert logging.getLogger().filters == []  # and the filter is gone afterwards
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert quant_ops <= ops and meta.extra["quantization"]["scheme"] == scheme
    assert "Gemm" not in ops or scheme == "int8"  # int4: every Linear became a quantized MatMul
    # the exporter names each initializer after its parameter under the wrapper's "model." prefix
    float_copies = {t.name for t in graph.initializer} & {f"model.{name}.kn" for name in model.state_dict()}
    heads = {f"model.sessions.{session_key(model.eids[0])}.{h}.weight.kn" for h in FLOAT_HEADS}
    assert float_copies == heads  # the behaviour heads stay float32 (read by plain MatMuls); no other
    # rewritten weight is left behind in float
    readers = {n.op_type for n in graph.node if set(n.input) & heads}
    assert readers == {"MatMul"}
    q, f = open_engine(path), open_engine(files["onnx-step"])
    assert q.meta.extra["quantization"] == meta.extra["quantization"] and "quantization" not in f.meta.extra
    assert q.meta.weights_sha256 == f.meta.weights_sha256 == weights_sha256(model, model.eids[0])
    assert (q.meta.weights, f.meta.weights) == (scheme, "float32")
    unnamed = dict(q.meta.extra["quantization"])
    del unnamed["scheme"]  # files written before the scheme was named were int8
    assert dataclasses.replace(q.meta, extra={"quantization": unnamed}).weights == "int8"
    counts = _inputs("realistic", 60)[0]  # (60, 12)
    dq = np.concatenate([q.step(c) for c in counts])  # (60, 6)
    df = np.concatenate([f.step(c) for c in counts])  # (60, 6)
    assert not np.array_equal(dq, df)  # really another graph
    spread = df.max(axis=0) - df.min(axis=0)  # (6,) range of each decode channel over the run
    assert np.all(np.abs(dq - df).max(axis=0) <= max_dev * spread + 1e-3)
    for ch in range(df.shape[1]):
        if spread[ch] > 1e-3:
            assert np.corrcoef(dq[:, ch], df[:, ch])[0, 1] > min_corr


def test_quantize_refuses_torchscript_and_unknown_schemes(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="--quantize"):
        export_model(model, model.eids[0], tmp_path / "q.pt", fmt="torchscript", quantize="int8")
    with pytest.raises(ConfigError, match="--quantize"):
        export_model(model, model.eids[0], tmp_path / "q.onnx", quantize="fp4")


def test_quiet_quantizers_undoes_the_quantizers_logging_side_effects() -> None:
    import logging

    from training.quantize import _quiet_quantizers

    root, named = logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    handlers, level = list(root.handlers), root.level
    root.handlers.clear()  # an application that configured no logging
    try:
        with _quiet_quantizers():
            logging.basicConfig(level=logging.INFO)  # what matmul_nbits_quantizer does on import
            assert root.handlers and not named.isEnabledFor(logging.INFO)
            assert named.isEnabledFor(logging.WARNING)
        assert root.handlers == [] and root.level == level and root.filters == []
    finally:
        root.handlers[:] = handlers
