"""TensorRT: the trtexec command, a strongly typed engine build, and which layers run in FP8.

Written against TensorRT's documented Python API (10.x / 11.x). `tensorrt` is imported lazily
and can be passed in (`trt=`), so this module is tested in CI against a stand-in that records
calls; a real build needs an NVIDIA GPU with FP8 (compute capability >= 8.9).

Strongly typed networks take their precisions from the graph (Q/DQ and tensor dtypes): no
precision builder flags (`FP8`, `FP16`, ...) are set, as trtexec's `--stronglyTyped` wants.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EngineError

__all__ = [
    "Range",
    "parse_range",
    "shape_ranges",
    "trtexec_command",
    "tensorrt_available",
    "parse_strongly_typed",
    "build_engine",
    "EngineReport",
    "LayerSummary",
    "summarize_layers",
]

logger = logging.getLogger(__name__)

Range = tuple[int, int, int]  # (min, opt, max)


def parse_range(text: str, what: str) -> Range:
    """'1:8:32' -> (1, 8, 32); min <= opt <= max, all >= 1."""
    parts = text.split(":")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise ValueError(f"--{what}-range {text!r}: expected MIN:OPT:MAX integers with 1 <= MIN <= OPT <= MAX")
    return values  # type: ignore[return-value]


def shape_ranges(
    input_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]], batch: Range, seq: Range
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Input name -> (min, opt, max) shapes of the [batch, seq] token inputs."""
    by_dim = {"batch": batch, "seq": seq}
    out = {}
    for name in input_names:
        axes = dynamic_axes.get(name, {0: "batch", 1: "seq"})
        rank = max(axes) + 1 if axes else 2
        shapes = []
        for i in range(3):
            shapes.append(tuple(by_dim[axes[a]][i] if a in axes else 1 for a in range(rank)))
        out[name] = (shapes[0], shapes[1], shapes[2])
    return out


def _shape_arg(ranges: Mapping[str, tuple], index: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[index])}" for name, shapes in ranges.items())


def trtexec_command(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, ranges: Mapping[str, tuple]) -> str:
    """The trtexec line that builds a strongly typed FP8 engine (no --fp8/--fp16/--best flags)."""
    layers = Path(engine_path).with_suffix(".layers.json")
    args = [
        "trtexec",
        f"--onnx={onnx_path}",
        "--stronglyTyped",
        f"--saveEngine={engine_path}",
        f"--minShapes={_shape_arg(ranges, 0)}",
        f"--optShapes={_shape_arg(ranges, 1)}",
        f"--maxShapes={_shape_arg(ranges, 2)}",
        "--profilingVerbosity=detailed",
        "--dumpLayerInfo",
        f"--exportLayerInfo={layers}",
    ]
    return " ".join(shlex.quote(a) for a in args)


def tensorrt_available() -> bool:
    """True when the `tensorrt` Python package imports."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class LayerSummary:
    """From TensorRT's detailed layer information (engine inspector JSON / trtexec --exportLayerInfo)."""

    layers: int
    fp8_gemms: list[str] = field(default_factory=list)
    other_gemms: list[str] = field(default_factory=list)
    standalone_dequantize: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"{len(self.fp8_gemms)} GEMM layers run in FP8, {len(self.other_gemms)} GEMMs in other precisions, "
            f"{len(self.standalone_dequantize)} standalone Dequantize layers (of {self.layers} layers)"
        )


def _is_gemm(layer: Mapping[str, Any]) -> bool:
    text = " ".join(str(layer.get(k, "")) for k in ("LayerType", "ParameterType", "Name")).lower()
    return any(word in text for word in ("gemm", "matrixmultiply", "matrix multiply", "matmul"))


def _is_fp8(layer: Mapping[str, Any]) -> bool:
    if "e4m3" in str(layer.get("TacticName", "")).lower():
        return True
    formats = [str(t.get("Format/Datatype", "")) for t in layer.get("Inputs", []) if isinstance(t, Mapping)]
    return any("fp8" in f.lower() or "e4m3" in f.lower() for f in formats)


def summarize_layers(info: str | Mapping[str, Any]) -> LayerSummary:
    """Which GEMMs run in FP8 (an `e4m3` tactic or FP8 inputs), and Dequantize layers left unfused."""
    data = json.loads(info) if isinstance(info, str) else info
    layers = data.get("Layers", []) if isinstance(data, Mapping) else []
    summary = LayerSummary(layers=len(layers))
    for layer in layers:
        if not isinstance(layer, Mapping):  # LAYER_NAMES_ONLY verbosity gives bare strings
            raise EngineError("layer information has names only: build with ProfilingVerbosity.DETAILED")
        name = str(layer.get("Name", "?"))
        kind = str(layer.get("LayerType", "")).lower()
        if _is_gemm(layer):
            (summary.fp8_gemms if _is_fp8(layer) else summary.other_gemms).append(name)
        elif kind in ("dequantize", "dequantizelinear") or (kind == "scale" and "dequantize" in name.lower()):
            summary.standalone_dequantize.append(name)
    return summary


@dataclass
class EngineReport:
    """What `build_engine` produced."""

    engine_path: Path
    layer_info_path: Path
    engine_bytes: int
    layers: LayerSummary


def parse_strongly_typed(trt: Any, onnx_path: str | os.PathLike) -> tuple[Any, Any, Any]:
    """(logger, builder, network): `onnx_path` parsed into a strongly typed TensorRT network.

    Strongly typed: precisions come from the graph's Q/DQ types, no builder precision flags.
    Raises `EngineError` with the parser's messages when the ONNX does not parse.
    """
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors or ["no error reported"]))
    return trt_logger, builder, network


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    ranges: Mapping[str, tuple],
    *,
    trt: Any = None,
    workspace_bytes: int | None = None,
) -> EngineReport:
    """Build a strongly typed TensorRT engine from the Q/DQ ONNX with one optimization profile.

    ranges: input name -> (min, opt, max) shapes (see `shape_ranges`). Writes the engine (moved
    into place when complete) and its detailed layer information as `<engine>.layers.json`.
    Raises `EngineError` naming the failing step; ImportError when `tensorrt` is missing.
    """
    if trt is None:
        import tensorrt as trt  # noqa: PLW0127 - optional dependency, imported where needed
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    trt_logger, builder, network = parse_strongly_typed(trt, onnx_path)

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in ranges.items():
        profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(profile)

    logger.info("building TensorRT engine %s (strongly typed, profile %s)", engine_path, dict(ranges))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    data = bytes(memoryview(serialized))
    tmp = engine_path.with_name(f".{engine_path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, engine_path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EngineError(f"cannot write engine {engine_path}: {exc}") from exc

    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise EngineError(f"TensorRT could not deserialize the engine it built ({engine_path})")
    inspector = engine.create_engine_inspector()
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    layer_info_path = engine_path.with_suffix(".layers.json")
    layer_info_path.write_text(info)
    return EngineReport(engine_path, layer_info_path, len(data), summarize_layers(info))
