"""FP8 Q/DQ emission: export-only custom ops, their ONNX translations, and the export Linear.

`FP8Linear` (core) runs `torch._scaled_mm`; for ONNX it is swapped, on a copy of the model, for
`QDQLinear`, whose forward is written with two custom ops that `torch.onnx.export` translates
one-to-one into opset-19 QuantizeLinear / DequantizeLinear (REFERENCE section 4):

    x -> Q(x_scale, zp_fp8, saturate=1) -> DQ(x_scale, zp_fp8) -> MatMul <- DQ(w_scale[, axis=1]) <- W_fp8 [K,N]

The weight is kept as an FP8 buffer pre-transposed to [K,N] so that `torch.matmul` needs no
Transpose, and scales are buffers in the compute dtype (an fp32 scale in an fp16 graph would
make DQ emit fp32 and insert Casts that break TensorRT's fusion). Core never imports this module.
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import torch
from torch import nn

from fp8kit.core import scaling
from fp8kit.core.linear import FP8Linear

from .errors import ExportError

__all__ = [
    "QDQLinear",
    "quantize_fp8",
    "dequantize_fp8",
    "translation_table",
    "swap_for_export",
]

logger = logging.getLogger(__name__)

_NAMESPACE = "fp8kit_export"


@torch.library.custom_op(f"{_NAMESPACE}::quantize_fp8", mutates_args=())
def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn ``saturate(round(x / scale))``; x any shape, scale a per-tensor [] constant.

    Computed like ONNX QuantizeLinear: the division happens in the compute dtype of `x`
    (fp16 in an fp16 graph), then the saturated cast.
    """
    return (x / scale.to(x.dtype)).float().clamp(-scaling.FP8_MAX, scaling.FP8_MAX).to(scaling.FP8_DTYPE)


@quantize_fp8.register_fake
def _quantize_fp8_fake(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, dtype=scaling.FP8_DTYPE)


@torch.library.custom_op(f"{_NAMESPACE}::dequantize_fp8", mutates_args=())
def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """``q * scale`` in the dtype of `scale`; scale [] (per tensor) or [q.shape[axis]] (per channel)."""
    if scale.dim():
        shape = [1] * q.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    return q.to(scale.dtype) * scale


@dequantize_fp8.register_fake
def _dequantize_fp8_fake(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty_like(q, dtype=scale.dtype)


def _fp8_zero_point():  # noqa: ANN202 - an onnxscript value
    from onnxscript import ir
    from onnxscript import opset19 as op

    return op.Constant(value=ir.tensor(np.array(0, dtype=ml_dtypes.float8_e4m3fn), name="fp8_zero_point"))


def _quantize_onnx(x, scale):  # noqa: ANN001, ANN202 - onnxscript values
    from onnxscript import opset19 as op

    return op.QuantizeLinear(x, scale, _fp8_zero_point(), saturate=1)


def _dequantize_onnx(q, scale, axis: int):  # noqa: ANN001, ANN202 - onnxscript values
    from onnxscript import opset19 as op

    # `axis` only matters for a per-channel scale; per-tensor DQ nodes lose it in post-processing.
    return op.DequantizeLinear(q, scale, _fp8_zero_point(), axis=axis)


def translation_table() -> dict:
    """`custom_translation_table` for `torch.onnx.export(..., dynamo=True)`."""
    return {
        torch.ops.fp8kit_export.quantize_fp8.default: _quantize_onnx,
        torch.ops.fp8kit_export.dequantize_fp8.default: _dequantize_onnx,
    }


class QDQLinear(nn.Module):
    """Export-only twin of `FP8Linear` with static activation scales.

    Buffers:
        weight_fp8_t: float8_e4m3fn [K, N] (pre-transposed for MatMul).
        weight_scale: compute dtype [] (per tensor) or [N] (per channel, DQ axis=1).
        input_scale: compute dtype [] (static, from calibration).
    Parameter:
        bias: compute dtype [N] or None, added after the GEMM.
    """

    def __init__(self, linear: FP8Linear, dtype: torch.dtype, name: str = "") -> None:
        super().__init__()
        if linear.weight_granularity == "block":
            raise ExportError(block_refusal([name]))
        if linear.input_scale is None:
            raise ExportError(
                f"layer {name!r}: dynamic activation scales cannot be exported as a TensorRT Q/DQ graph; "
                "calibrate static scales first (fp8kit.export.calibrate_activations(model, batches), or "
                "quantize with QuantConfig(activation='static') and calibration data)"
            )
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight_granularity = linear.weight_granularity
        self.register_buffer("weight_fp8_t", linear.weight.detach().t().contiguous())  # (K, N)
        weight_scale = linear.weight_scale.detach().float()
        if weight_scale.dim():
            weight_scale = weight_scale.reshape(-1)  # (N,)
        self.register_buffer("weight_scale", _scale_in(weight_scale, dtype, f"{name}.weight_scale"))
        self.register_buffer("input_scale", _scale_in(linear.input_scale.detach().float(), dtype, f"{name}.input_scale"))
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp8 = quantize_fp8(x, self.input_scale)  # (..., K) fp8
        x_dq = dequantize_fp8(x_fp8, self.input_scale, 1)  # (..., K)
        w_dq = dequantize_fp8(self.weight_fp8_t, self.weight_scale, 1)  # (K, N)
        out = torch.matmul(x_dq, w_dq)  # (..., N)
        if self.bias is not None:
            out = out + self.bias
        return out

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # The FP8 weight must never follow `.half()` / `.to(dtype)`.
        weight = self._buffers.pop("weight_fp8_t")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["weight_fp8_t"] = weight
        return self


def block_refusal(names: list[str]) -> str:
    """Why layers with block-wise weight scales (`names`) are not exported, and what to do instead."""
    listing = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"layer {listing}: block-wise FP8 weights (one scale per 128 x 128 block) have no TensorRT Q/DQ form: "
        "DequantizeLinear takes per-tensor or per-axis scales, and TensorRT builds FP8 GEMMs from those only. "
        "Export the full-precision model instead (python -m export MODEL_DIR OUT.onnx [--weight channel]): "
        "it is quantized per tensor or per channel with static activation scales"
    )


def _scale_in(scale_fp32: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """`scale_fp32` in the compute dtype; an error when it underflows, overflows or is not positive."""
    if not torch.isfinite(scale_fp32).all() or (scale_fp32 <= 0).any():
        raise ExportError(f"{what}: scales must be finite and positive, got min {scale_fp32.min().item():g}")
    scale = scale_fp32.to(dtype)
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ExportError(
            f"{what}: scale {scale_fp32.min().item():g}..{scale_fp32.max().item():g} does not fit {dtype} "
            "(underflow or overflow); export with --dtype fp32"
        )
    if dtype == torch.float16 and (scale < 2.0**-14).any():
        logger.warning("%s: scale %g is subnormal in fp16 (precision loss)", what, scale_fp32.min().item())
    return scale


def swap_for_export(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Replace, in place, every `FP8Linear` of `model` by a `QDQLinear` in `dtype`; the names replaced."""
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, FP8Linear):
                full = f"{name}.{child_name}" if name else child_name
                setattr(module, child_name, QDQLinear(child, dtype, full))
                replaced.append(full)
    return replaced
