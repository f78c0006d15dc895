"""Errors of fp8kit.export, part of fp8kit's one hierarchy (`fp8kit.core.errors.FP8KitError`)."""

from __future__ import annotations

from fp8kit.core.errors import FP8KitError

__all__ = ["ExportError", "OnnxCheckError", "ParityError", "EngineError"]


class ExportError(FP8KitError):
    """The model cannot be exported as an FP8 Q/DQ ONNX graph (the message says why and the fix)."""


class OnnxCheckError(ExportError):
    """The written ONNX breaks TensorRT FP8 Q/DQ rules; `violations` lists each node and rule."""

    def __init__(self, message: str, violations: list | None = None) -> None:
        super().__init__(message)
        self.violations = list(violations or [])


class ParityError(ExportError):
    """ONNX Runtime's output differs from the fp8kit model in torch beyond the tolerance."""


class EngineError(FP8KitError):
    """The TensorRT engine could not be built or inspected."""
