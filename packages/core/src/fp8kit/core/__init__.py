"""fp8kit.core: FP8 (E4M3) quantization with `torch._scaled_mm` linears, calibration and checkpoints."""

from .checkpoint import load_quantized, save_hf, save_quantized
from .config import QuantConfig
from .errors import CalibrationError, CheckpointError, ConfigError, FP8KitError, GraphCaptureError, ModelLoadError
from .linear import FP8Linear
from .streaming import quantize_checkpoint
from .surgery import QuantReport, quantize

__all__ = [
    "QuantConfig",
    "QuantReport",
    "FP8Linear",
    "quantize",
    "save_quantized",
    "save_hf",
    "load_quantized",
    "quantize_checkpoint",
    "FP8KitError",
    "ConfigError",
    "CalibrationError",
    "CheckpointError",
    "ModelLoadError",
    "GraphCaptureError",
]
