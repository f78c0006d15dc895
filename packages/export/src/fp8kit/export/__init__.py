"""fp8kit.export: fp8kit FP8 models as TensorRT-ready FP8 Q/DQ ONNX, checked and validated in ONNX Runtime.

    result = export_onnx(model, "model.onnx")          # FP8Linear layers with static input scales
    violations = check_onnx("model.onnx")              # TensorRT FP8 Q/DQ rules; [] = ready
    report = validate_onnx("model.onnx", model, make_feeds(sequences, result.input_names))
"""

from .check import RULES, Violation, check_onnx
from .errors import EngineError, ExportError, OnnxCheckError, ParityError
from .onnx import ExportResult, calibrate_activations, default_input_names, export_onnx, fp8_layers
from .qdq import QDQLinear
from .tensorrt import EngineReport, LayerSummary, build_engine, shape_ranges, summarize_layers, trtexec_command
from .validate import LevelResult, ParityReport, default_level_advice, make_feeds, validate_onnx

__all__ = [
    "export_onnx",
    "ExportResult",
    "calibrate_activations",
    "default_input_names",
    "fp8_layers",
    "QDQLinear",
    "check_onnx",
    "Violation",
    "RULES",
    "validate_onnx",
    "make_feeds",
    "ParityReport",
    "LevelResult",
    "default_level_advice",
    "build_engine",
    "shape_ranges",
    "summarize_layers",
    "trtexec_command",
    "EngineReport",
    "LayerSummary",
    "ExportError",
    "OnnxCheckError",
    "ParityError",
    "EngineError",
]
