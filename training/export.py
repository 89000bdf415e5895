"""Export a trained NEDS to ONNX or TorchScript, as a step graph or a window graph, metadata inside.

- step graph (streaming models): one bin in, its decodes out, key/value ring state passed in and the new
  bin's keys/values passed out (see :mod:`training.streaming` and :mod:`neds_rt.engine`);
- window graph: C bins in, C bins of decodes out (the streaming model's sliding window, or the offline
  model's bidirectional trial window). This is the naive baseline the step graph is benchmarked against.

Every file carries a :class:`neds_rt.model_meta.ModelMeta` JSON: ONNX in ``metadata_props['neds_rt']``,
TorchScript as the extra file ``neds_rt.json``.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Final

import torch
from torch import Tensor, nn

from neds_rt.engine import step_io_names
from neds_rt.errors import ConfigError, invalid
from neds_rt.model_meta import META_KEY, ModelMeta, OutputChannel
from training.model import NEDS
from training.quantize import QUANTIZE, SCHEMES, quantize_onnx
from training.streaming import (
    DECODE_CHANNELS,
    StepState,
    StreamingStep,
    banded_recompute,
    bin_tokens,
    decode_outputs,
)

log = logging.getLogger(__name__)

FORMATS: Final = ("onnx", "torchscript")
GRAPHS: Final = ("step", "window")
OPSET: Final = 17


WINDOW_INPUTS: Final = ["counts"]
WINDOW_OUTPUTS: Final = ["decodes", "log_rates"]


class WindowGraph(nn.Module):
    """counts (B, T, N) -> decodes (B, T, 6), log_rates (B, T, N) for one session, behaviour masked.

    Streaming models use the C-bin sliding window; offline models attend over the whole (<= n_bins) window.
    """

    def __init__(self, model: NEDS, eid: str, context: int) -> None:
        super().__init__()
        self.model, self.eid, self.context = model, eid, context

    def forward(self, counts: Tensor) -> tuple[Tensor, Tensor]:
        model = self.model
        if model.cfg.causal:
            return banded_recompute(model, self.eid, counts, self.context)
        b, t, _ = counts.shape
        k = model.tokens_per_bin
        x = torch.stack([bin_tokens(model, self.eid, counts[:, i]) for i in range(t)], dim=1)  # (B,T,K,h)
        x = x + model.time_embed[:t][None, :, None, :]
        h = model.encode(x.reshape(b, t * k, -1), t).view(b, t, k, -1)  # (B, T, K, hidden)
        return decode_outputs(model, self.eid, h)


def weights_sha256(model: NEDS, eid: str) -> str:
    """Hash of the shared weights plus the session's own, in name order."""
    digest = hashlib.sha256()
    own = f"sessions.{model._key(eid)}."
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("sessions.") and not name.startswith(own):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_meta(model: NEDS, eid: str, graph: str, context: int) -> ModelMeta:
    vocab = model.vocab.get(eid)
    n_units = model.session(eid).n_units
    norm = vocab.norm if vocab is not None else None
    return ModelMeta(
        graph=graph,
        mode=model.cfg.mode,
        bin_size=model.cfg.bin_size,
        context=context,
        session=eid,
        unit_ids=[int(u) for u in vocab.unit_ids] if vocab is not None else list(range(n_units)),
        regions=[str(r) for r in vocab.regions] if vocab is not None else [""] * n_units,
        outputs=[OutputChannel(label, unit) for label, unit in DECODE_CHANNELS],
        normalisation={} if norm is None else {k: float(v) for k, v in vars(norm).items()},
        weights_sha256=weights_sha256(model, eid),
        n_layers=model.cfg.layers,
        n_heads=model.cfg.heads,
        head_dim=model.cfg.head_dim,
        extra={"rope_base": model.cfg.rope_base, "tokens_per_bin": model.tokens_per_bin,
               "probe": vocab.probe if vocab is not None else ""},
    )


def _example_step_inputs(model: NEDS, eid: str, context: int, batch: int = 1) -> tuple[Tensor, ...]:
    state = StepState.empty(model, batch=batch, context=context)
    n = model.session(eid).n_units
    hd = model.cfg.head_dim
    return (torch.zeros(batch, n), torch.zeros_like(state.key_bias), torch.ones(hd), torch.zeros(hd),
            *state.cache())


def export_model(
    model: NEDS, eid: str, out: Path, fmt: str = "onnx", graph: str = "step", context: int | None = None,
    quantize: str = "none",
) -> ModelMeta:
    """Write ``model`` (session ``eid``) to ``out``; return the metadata written into the file.

    ``quantize`` (ONNX only; :mod:`training.quantize`): ``"int8"`` stores every MatMul weight as int8 with one
    scale per output channel and quantizes activations per call; ``"int4"`` stores them as 4-bit blocks of 32
    rows (onnxruntime ``MatMulNBits``). The metadata records the scheme under ``extra["quantization"]``. The
    decodes are no longer equal to the float32 model's: measure the difference on real data before serving
    it (``neds-rt bench quality`` scores both schemes against float32, ``neds-rt bench latency`` gives the
    live decode quality).
    """
    if fmt not in FORMATS:
        raise invalid("--format", f"must be one of {FORMATS}", fmt)
    if graph not in GRAPHS:
        raise invalid("--graph", f"must be one of {GRAPHS}", graph)
    if quantize not in QUANTIZE:
        raise invalid("--quantize", f"must be one of {QUANTIZE}", quantize)
    if quantize != "none" and fmt != "onnx":
        raise invalid("--quantize", "is only available with --format onnx", quantize,
                      "drop --quantize, or export with --format onnx", kind=ConfigError)
    model._key(eid)  # raises a clear error for an unknown session
    c = context or model.cfg.n_bins
    if graph == "step" and not model.cfg.causal:
        raise invalid("--graph", "step needs a streaming model (trained with --mode streaming)", graph,
                      "export the offline model with --graph window", kind=ConfigError)
    if c < 2:
        raise invalid("--context", "must be >= 2 bins", c, kind=ConfigError)
    if not model.cfg.causal and c > model.cfg.n_bins:
        raise invalid("--context", f"an offline model sees at most n_bins={model.cfg.n_bins}", c,
                      kind=ConfigError)
    model = model.eval().cpu()
    meta = model_meta(model, eid, graph, c)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = model.session(eid).n_units
    module: nn.Module
    if graph == "step":
        module = StreamingStep(model, eid)
        args = _example_step_inputs(model, eid, c)
        names_in, names_out = step_io_names(model.cfg.layers)
        batch_axes = {name: {0: "B"} for name in (*names_in[:2], *names_out)} | {
            name: {0: "B"} for name in names_in[4:]}
    else:
        module = WindowGraph(model, eid, c)
        args = (torch.zeros(1, c, n),)
        names_in, names_out = WINDOW_INPUTS, WINDOW_OUTPUTS
        batch_axes = {"counts": {0: "B"}, "decodes": {0: "B"}, "log_rates": {0: "B"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporters warn about their own deprecation
        if fmt == "onnx":
            if quantize != "none":
                meta.extra["quantization"] = {"scheme": quantize, **SCHEMES[quantize]}
            _export_onnx(module, args, out, names_in, names_out, batch_axes, meta, quantize)
        else:
            traced = torch.jit.trace(module, args, check_trace=False)
            torch.jit.save(traced, str(out), _extra_files={f"{META_KEY}.json": meta.to_json()})
    log.info("exported %s %s graph of session %s to %s", fmt, graph, eid, out)
    return meta


def _export_onnx(module: nn.Module, args: tuple[Tensor, ...], out: Path, names_in: list[str],
                 names_out: list[str], axes: dict[str, dict[int, str]], meta: ModelMeta,
                 quantize: str = "none") -> None:
    import onnx

    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.onnx.export(module, args, str(tmp), input_names=names_in, output_names=names_out,
                      dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    if quantize != "none":
        fp32, tmp = tmp, out.with_suffix(f"{out.suffix}.{quantize}.tmp")
        quantize_onnx(fp32, tmp, quantize)
        fp32.unlink()
    proto = onnx.load(str(tmp))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, meta.to_json()
    onnx.save(proto, str(out))
    tmp.unlink()


def export_checkpoint(
    checkpoint: Path, out: Path, fmt: str = "onnx", graph: str = "step", eid: str | None = None,
    context: int | None = None, quantize: str = "none",
) -> ModelMeta:
    """Load a training checkpoint and export one of its sessions (the only one when ``eid`` is None)."""
    from training.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint)
    if eid is None:
        if len(model.eids) != 1:
            raise invalid("--session", f"must name one of the checkpoint's {len(model.eids)} sessions",
                          model.eids[:5], "pass --session EID", kind=ConfigError)
        eid = model.eids[0]
    return export_model(model, eid, out, fmt=fmt, graph=graph, context=context, quantize=quantize)
