"""Quantized ONNX exports: which weights become integers, how, and the graph rewrite that needs.

Schemes (``neds-rt export --quantize``):

- ``int8``: onnxruntime dynamic quantization. Every MatMul / Gemm weight but the behaviour heads' is int8,
  one scale per output channel (7-bit range, for CPUs without VNNI); activations are quantized per call.
- ``int4``: weight-only block quantization (onnxruntime ``MatMulNBits``). Every weight matrix but the
  behaviour heads' is stored as 4-bit integers in blocks of 32 input rows, each block with its own scale;
  activations are quantized to int8 per block at run time (accuracy level 4). The weights of the default
  model shrink from 12 MB to 2 MB, which is what makes the step fast on a CPU: a 1-token step reads every
  weight once, so it is bound by moving them, not by arithmetic.

Both leave the behaviour heads (``wheel_out``, ``whisker_out``, ``choice_out``, ``block_out``: 1-3 output
rows each) in float32 (:func:`float_heads`). They hold a few hundred weights, so quantizing them saves
nothing, and their rounding lands on the decodes unfiltered. On the quick benchmark's streaming model with
class heads refitted per bin, whose probabilities barely moved, int4 class heads alone cut the R² of the int4
class-probability decodes against float32 from >= 0.92 to 0.78.

The quantizers work on ``MatMul`` nodes, and the exporter writes ``nn.Linear`` on a 2-D input as ``Gemm``
(weight transposed, bias folded in), so :func:`gemm_as_matmul` first rewrites those as ``MatMul`` + ``Add``
under names of ours (which :func:`float_heads` finds); onnxruntime's optimiser fuses them back where it can.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from neds_rt.errors import ConfigError, invalid

INT4_BLOCK: Final = 32  # input rows per scale
FLOAT_HEADS: Final = ("wheel_out", "whisker_out", "choice_out", "block_out")  # SessionModules heads, float32

SCHEMES: Final[dict[str, dict[str, Any]]] = {
    "int8": {"weights": "int8, symmetric, one scale per output channel (7-bit range)",
             "activations": "uint8, scale and zero point computed per call",
             "ops": "MatMul", "tool": "onnxruntime.quantization.quantize_dynamic"},
    "int4": {"weights": f"int4, symmetric, one scale per block of {INT4_BLOCK} input rows",
             "activations": "int8 per block at run time (MatMulNBits accuracy level 4)",
             "ops": "MatMul (Gemm rewritten as MatMul + Add)",
             "tool": "onnxruntime.quantization.matmul_nbits_quantizer"},
}
QUANTIZE: Final = ("none", *SCHEMES)  # neds-rt export --quantize choices


class _QuietQuantizer(logging.Filter):
    """Drops onnxruntime.quantization's INFO chatter (warnings and errors pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "onnxruntime" not in record.pathname


@contextmanager
def _quiet_quantizers() -> Iterator[None]:
    """Silence onnxruntime.quantization below WARNING while the block runs, and undo its side effects.

    ``quantize_dynamic`` logs a line per tensor at INFO on the root logger (a filter there drops them);
    ``matmul_nbits_quantizer`` logs on its own logger (its parent's level drops them) and, on import, calls
    ``logging.basicConfig(level=INFO)``, which would give an unconfigured application a root handler: the
    root logger's handlers and level are put back as they were.
    """
    root, named = logging.getLogger(), logging.getLogger("onnxruntime.quantization")
    handlers, root_level, named_level = list(root.handlers), root.level, named.level
    quiet = _QuietQuantizer()
    root.addFilter(quiet)
    named.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        named.setLevel(named_level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(root_level)


def gemm_as_matmul(proto: Any) -> int:
    """Rewrite, in place, every ``Gemm`` of ``proto`` whose weight is a constant (alpha = beta = 1, A not
    transposed) as ``MatMul`` with a (K, N) weight, plus ``Add`` of the bias; return how many were rewritten.
    The (K, N) copy is a new initializer; the original weight is dropped once no node reads it."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes: list[Any] = []
    rewritten = 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == attrs.get("beta", 1.0) == 1.0
        if node.op_type != "Gemm" or node.input[1] not in inits or not plain:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])  # (N, K) when transB else (K, N)
        if attrs.get("transB", 0):
            weight = weight.T
        w_name = f"{node.input[1]}.kn"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), w_name))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [product],
                                      name=f"{node.name}.matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                          name=f"{node.name}.bias"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return rewritten


def float_heads(proto: Any) -> list[str]:
    """Names of the nodes of ``proto`` that apply a behaviour head's weight (kept float32 by both schemes):
    a ``Gemm`` or ``MatMul`` whose weight input is a ``*_out.weight`` initializer of :data:`FLOAT_HEADS` (or
    its ``.kn`` copy from :func:`gemm_as_matmul`)."""
    inits = {t.name for t in proto.graph.initializer}
    keep: list[str] = []
    for node in proto.graph.node:
        if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
            weight = node.input[1].removesuffix(".kn")
            if any(weight.endswith(f".{head}.weight") for head in FLOAT_HEADS):
                keep.append(node.name)
    return keep


def quantize_onnx(src: Path, dst: Path, scheme: str) -> None:
    """Write ``src`` (a float32 ONNX file) quantized with ``scheme`` (``int8`` or ``int4``) to ``dst``: its
    ``Gemm`` nodes rewritten as ``MatMul`` (:func:`gemm_as_matmul`), the behaviour heads left float32."""
    if scheme not in SCHEMES:
        raise invalid("--quantize", f"must be one of {QUANTIZE}", scheme, kind=ConfigError)
    import onnx

    proto = onnx.load(str(src))
    gemm_as_matmul(proto)  # quantize_dynamic would rewrite Gemm itself, under names of its own
    keep = float_heads(proto)
    with _quiet_quantizers():
        if scheme == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(proto, dst, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                             weight_type=QuantType.QInt8, nodes_to_exclude=keep)
        else:
            _quantize_int4(proto, dst, keep)


def _quantize_int4(proto: Any, dst: Path, keep: list[str]) -> None:
    """Block-quantize the ``MatMul`` weights of ``proto`` (Gemm already rewritten) to 4 bits, but for the
    nodes ``keep``, and save to ``dst``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    algo = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=4, bits=4)
    quantizer = MatMulNBitsQuantizer(proto, bits=4, block_size=INT4_BLOCK, is_symmetric=True,
                                     accuracy_level=4, algo_config=algo, nodes_to_exclude=keep)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), False)
