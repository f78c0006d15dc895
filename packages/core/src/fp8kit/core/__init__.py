"""fp8kit.core: FP8 (E4M3) quantization with `torch._scaled_mm` linears, calibration and checkpoints."""

from .checkpoint import load_quantized, save_quantized
from .config import QuantConfig
from .errors import CalibrationError, CheckpointError, ConfigError, FP8KitError, ModelLoadError
from .linear import FP8Linear
from .surgery import QuantReport, quantize

__all__ = [
    "QuantConfig",
    "QuantReport",
    "FP8Linear",
    "quantize",
    "save_quantized",
    "load_quantized",
    "FP8KitError",
    "ConfigError",
    "CalibrationError",
    "CheckpointError",
    "ModelLoadError",
]
