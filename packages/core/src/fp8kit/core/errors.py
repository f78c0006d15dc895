"""One exception hierarchy for fp8kit. Every message names the layer, tensor or file and says the fix."""

from __future__ import annotations

__all__ = [
    "FP8KitError",
    "ConfigError",
    "CalibrationError",
    "CheckpointError",
    "ModelLoadError",
    "GraphCaptureError",
]


class FP8KitError(Exception):
    """Base class of every error fp8kit raises on bad input."""


class ConfigError(FP8KitError, ValueError):
    """An invalid `QuantConfig` or option combination."""


class CalibrationError(FP8KitError, ValueError):
    """Calibration data is missing, empty or unusable."""


class CheckpointError(FP8KitError):
    """A checkpoint cannot be written or read (missing, mismatched or unsafe tensors and files)."""


class ModelLoadError(FP8KitError):
    """A model path or file cannot be loaded, or its weights are unusable (NaN / Inf)."""


class GraphCaptureError(FP8KitError, RuntimeError):
    """A callable cannot be captured as a CUDA graph, or a replay got inputs unlike the captured ones."""
