"""Check an ONNX file against TensorRT's FP8 Q/DQ rules (REFERENCE section 4): our TensorRT stand-in.

`check_onnx(path_or_model)` returns a list of `Violation`s (empty = ready), each naming the node
and the rule it breaks. Rules (ids are stable, used in tests and CLI output):

    onnx-checker     onnx.checker full check and strict shape inference pass
    opset            default-domain opset >= 19
    ir-version       ir_version == 10
    q-zero-point     every QuantizeLinear has a FLOAT8E4M3FN zero point of value 0 (or opset-21 output_dtype FP8)
    q-saturate       QuantizeLinear saturate is 1
    dq-input-fp8     every DequantizeLinear reads FP8 (an FP8 initializer or a QuantizeLinear output), zero point FP8 0
    scale-constant   every Q/DQ scale is a constant (initializer / Constant), strictly positive and finite
    scale-dtype      every Q/DQ scale has the compute dtype (dtype of output 0)
    act-per-tensor   activation (QuantizeLinear) scales are per tensor
    axis             a per-channel weight scale has an explicit axis on the output-channel dim (1 for MatMul [K,N], 0 for Gemm transB=1) and matching length
    weight-fp8       a weight DQ reads an FP8 initializer (stored one byte per parameter)
    dq-feeds-gemm    every DequantizeLinear output goes straight into MatMul / Gemm (no Transpose, Cast, Mul, Reshape between)
    gemm-both-fp8    a MatMul / Gemm fed by one DQ is fed by DQ on both inputs
    q-feeds-dq       every QuantizeLinear output goes straight into DequantizeLinear
    no-fp8-cast      no Cast to or from FP8
    no-dynamic-quant no DynamicQuantizeLinear
    fp8-consumer     no op other than DequantizeLinear consumes an FP8 tensor
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = ["Violation", "check_onnx", "RULES", "MIN_OPSET", "IR_VERSION"]

MIN_OPSET = 19
IR_VERSION = 10
FP8 = TensorProto.FLOAT8E4M3FN
GEMMS = ("MatMul", "Gemm")
RULES = (
    "onnx-checker",
    "opset",
    "ir-version",
    "q-zero-point",
    "q-saturate",
    "dq-input-fp8",
    "scale-constant",
    "scale-dtype",
    "act-per-tensor",
    "axis",
    "weight-fp8",
    "dq-feeds-gemm",
    "gemm-both-fp8",
    "q-feeds-dq",
    "no-fp8-cast",
    "no-dynamic-quant",
    "fp8-consumer",
)


@dataclass(frozen=True)
class Violation:
    """One broken rule: `node` is the node name (or "<model>"), `rule` one of `RULES`."""

    node: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: [{self.rule}] {self.message}"


def _dtype_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type) if elem_type else "unknown"


class _Graph:
    """Index of one graph: producers, consumers, constants and value types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.graph = graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.types: dict[str, int] = {}
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            if vi.type.HasField("tensor_type"):
                self.types[vi.name] = vi.type.tensor_type.elem_type
        for t in graph.initializer:
            self.types[t.name] = t.data_type
        for node in graph.node:  # types that need no inference
            if node.op_type == "Constant":
                value = _attr(node, "value")
                if value is not None:
                    self.types[node.output[0]] = value.data_type
            elif node.op_type == "QuantizeLinear":
                zp = node.input[2] if len(node.input) > 2 else ""
                out_dtype = _attr(node, "output_dtype")
                if zp:
                    self.types.setdefault(node.output[0], self.types.get(zp, 0))
                elif out_dtype:
                    self.types.setdefault(node.output[0], out_dtype)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` when it is an initializer or a Constant node's output."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            value = _attr(node, "value")
            if value is not None:
                return numpy_helper.to_array(value)
        return None

    def dtype(self, name: str) -> int:
        return self.types.get(name, 0)


def _attr(node: onnx.NodeProto, name: str):  # noqa: ANN202 - any attribute value
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _node_name(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name or node.output[0]!r}"


def _load(model_or_path: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto, str | None]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, None
    path = Path(model_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"check_onnx: {path} does not exist")
    return onnx.load(str(path), load_external_data=True), str(path)


def _compute_dtype(model: onnx.ModelProto) -> int:
    """The dtype of the first floating graph output (the model's compute dtype)."""
    floats = (TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    for out in model.graph.output:
        elem = out.type.tensor_type.elem_type
        if elem in floats:
            return elem
    return 0


def check_onnx(model_or_path: onnx.ModelProto | str | os.PathLike) -> list[Violation]:
    """Every violation of TensorRT's FP8 Q/DQ rules in the model (a path or a ModelProto); [] = ready.

    Also runs `onnx.checker.check_model(full_check=True)` (strict shape inference). A graph with
    no Q/DQ at all passes the rules but is not FP8: callers check the Q/DQ count they expect.
    """
    model, path = _load(model_or_path)
    found: list[Violation] = []

    def bad(node: onnx.NodeProto | None, rule: str, message: str) -> None:
        found.append(Violation(_node_name(node) if node is not None else "<model>", rule, message))

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        bad(None, "opset", f"default-domain opset {opset} < {MIN_OPSET}: FP8 QuantizeLinear needs opset >= {MIN_OPSET}")
    if model.ir_version != IR_VERSION:
        bad(None, "ir-version", f"ir_version {model.ir_version}, TensorRT 10 reads ir_version {IR_VERSION}")
    try:
        if path is not None:
            onnx.checker.check_model(path, full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        bad(None, "onnx-checker", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)

    # Infer the rest of the types where possible (checker failures above are already reported).
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    except Exception:  # noqa: BLE001 - inference is best effort here
        inferred = model
    g = _Graph(inferred)
    compute = _compute_dtype(model)

    for node in g.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        op = node.op_type
        if op == "DynamicQuantizeLinear":
            bad(node, "no-dynamic-quant", "DynamicQuantizeLinear is not supported by TensorRT: calibrate static scales")
        elif op == "Cast":
            src, dst = g.dtype(node.input[0]), _attr(node, "to")
            if FP8 in (src, dst):
                bad(node, "no-fp8-cast", f"Cast {_dtype_name(src)} -> {_dtype_name(dst or 0)}: never Cast to or from FP8, use Q/DQ")
        elif op in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq(node, g, compute, bad)
        elif op in GEMMS:
            fed = [bool(i) and g.producer.get(i) is not None and g.producer[i].op_type == "DequantizeLinear" for i in node.input[:2]]
            if any(fed) and not all(fed):
                bad(node, "gemm-both-fp8", "only one GEMM input comes from a DequantizeLinear: quantize both for an FP8 GEMM")
        if op not in ("DequantizeLinear", "Cast"):
            for inp in node.input:
                if inp and g.dtype(inp) == FP8 and not (op == "QuantizeLinear" and inp == (node.input[2] if len(node.input) > 2 else None)):
                    bad(node, "fp8-consumer", f"consumes FP8 tensor {inp!r}: only DequantizeLinear may read FP8")
    return found


def _check_qdq(node: onnx.NodeProto, g: _Graph, compute: int, bad) -> None:  # noqa: ANN001
    is_q = node.op_type == "QuantizeLinear"
    x, scale_name = node.input[0], node.input[1] if len(node.input) > 1 else ""
    zp_name = node.input[2] if len(node.input) > 2 else ""

    # zero point: FP8, value 0
    zp = g.constant(zp_name) if zp_name else None
    if is_q:
        out_dtype = _attr(node, "output_dtype")
        if not zp_name and out_dtype != FP8:
            bad(node, "q-zero-point", "no zero point: TensorRT reads the quantized type from it and would use INT8; add a FLOAT8E4M3FN zero point 0")
        if _attr(node, "saturate") == 0:
            bad(node, "q-saturate", "saturate=0: FP8 quantization must saturate (saturate=1)")
    if zp_name:
        if g.dtype(zp_name) != FP8:
            rule = "q-zero-point" if is_q else "dq-input-fp8"
            bad(node, rule, f"zero point {zp_name!r} is {_dtype_name(g.dtype(zp_name))}, not FLOAT8E4M3FN (TensorRT would use INT8)")
        elif zp is None or np.any(zp.astype(np.float32) != 0):
            rule = "q-zero-point" if is_q else "dq-input-fp8"
            bad(node, rule, f"zero point {zp_name!r} must be a constant FP8 0")
        else:
            scale_value = g.constant(scale_name) if scale_name else None
            if scale_value is not None and zp.size != scale_value.size:
                rule = "q-zero-point" if is_q else "dq-input-fp8"
                bad(node, rule, f"zero point {zp_name!r} has {zp.size} values for {scale_value.size} scales: shapes must match")

    # scale: constant, positive, compute dtype
    scale = g.constant(scale_name) if scale_name else None
    if scale is None:
        bad(node, "scale-constant", f"scale {scale_name!r} is not a constant: TensorRT needs static (calibrated) scales")
    else:
        values = scale.astype(np.float64)
        if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
            bad(node, "scale-constant", f"scale {scale_name!r} must be finite and > 0, min is {values.min() if values.size else 'empty'}")
    if compute and g.dtype(scale_name) and g.dtype(scale_name) != compute:
        bad(
            node,
            "scale-dtype",
            f"scale {scale_name!r} is {_dtype_name(g.dtype(scale_name))} in a {_dtype_name(compute)} graph: "
            "scales must have the compute dtype, else Casts break TensorRT's fusion",
        )
    per_channel = scale is not None and scale.size > 1

    if is_q:
        if per_channel:
            bad(node, "act-per-tensor", f"activation scale {scale_name!r} has {scale.size} values: activation scales must be per tensor")
        for consumer in g.consumers.get(node.output[0], []):
            if consumer.op_type != "DequantizeLinear":
                bad(node, "q-feeds-dq", f"output feeds {_node_name(consumer)}, not a DequantizeLinear")
        return

    # DequantizeLinear: FP8 input
    producer = g.producer.get(x)
    is_weight = x in g.initializers or (producer is not None and producer.op_type == "Constant")
    if is_weight:
        if g.dtype(x) != FP8:
            bad(node, "weight-fp8", f"weight {x!r} is stored as {_dtype_name(g.dtype(x))}, not FLOAT8E4M3FN (one byte per parameter)")
    elif producer is None or producer.op_type != "QuantizeLinear":
        bad(node, "dq-input-fp8", f"input {x!r} comes from {_node_name(producer) if producer else 'a graph input'}, not a QuantizeLinear or FP8 initializer")

    consumers = g.consumers.get(node.output[0], [])
    if not consumers:
        bad(node, "dq-feeds-gemm", "output is unused")
    for consumer in consumers:
        if consumer.op_type not in GEMMS:
            bad(node, "dq-feeds-gemm", f"output feeds {_node_name(consumer)}: DQ must feed MatMul / Gemm directly")

    if per_channel:
        axis = _attr(node, "axis")
        weight = g.constant(x) if is_weight else None
        if axis is None:
            bad(node, "axis", f"per-channel scale {scale_name!r} ({scale.size} values) needs an explicit axis")
            return
        if weight is not None:
            rank = weight.ndim
            axis_n = axis + rank if axis < 0 else axis
            if not 0 <= axis_n < rank or weight.shape[axis_n] != scale.size:
                bad(node, "axis", f"axis={axis} of weight {tuple(weight.shape)} does not match {scale.size} scales")
                return
            for consumer in consumers:
                expected = _output_channel_axis(consumer, node.output[0], rank)
                if expected is not None and axis_n != expected:
                    bad(node, "axis", f"axis={axis} is not the output-channel axis {expected} of {_node_name(consumer)}")


def _output_channel_axis(gemm: onnx.NodeProto, weight: str, rank: int) -> int | None:
    """The output-channel (N) axis of `weight` as `gemm`'s second input, or None when it is the first."""
    if len(gemm.input) < 2 or gemm.input[1] != weight:
        return None
    if gemm.op_type == "Gemm":
        return 0 if _attr(gemm, "transB") else 1
    return rank - 1  # MatMul: [..., K, N]
