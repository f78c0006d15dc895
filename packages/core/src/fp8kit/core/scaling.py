"""Pure FP8 E4M3 math: amax -> scale, saturated quantize / dequantize, and the scaled GEMM.

`scale` is always the dequantization multiplier: ``x ≈ q * scale`` with ``scale = amax / 448``,
the convention of `torch._scaled_mm`, ONNX DequantizeLinear, vLLM and compressed-tensors.
Per-tensor scales are 0-dim fp32 tensors; row-wise scales (per-channel weights, per-token
activations) are fp32 [rows, 1].
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "AMAX_FLOOR",
    "amax_to_scale",
    "tensor_scale",
    "rowwise_scale",
    "quantize",
    "dequantize",
    "fp8_matmul",
    "scaled_mm_unsupported_reason",
]

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
AMAX_FLOOR = 1e-12  # keeps the scale of an all-zero tensor positive

_warned: set[str] = set()


def amax_to_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 dequantization scale(s) ``max(amax, 1e-12) / 448``, same shape as `amax`."""
    return amax.float().clamp(min=AMAX_FLOOR) / FP8_MAX


def tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale of `x` (any shape, empty included): fp32 [] = absmax / 448."""
    if x.numel() == 0:
        return amax_to_scale(torch.zeros((), device=x.device))
    return amax_to_scale(x.abs().amax())


def rowwise_scale(x: torch.Tensor) -> torch.Tensor:
    """One scale per row of `x` [..., K]: fp32 [..., 1] = row absmax / 448.

    Per-channel weight scales ([N,K] -> [N,1]) and per-token activation scales ([M,K] -> [M,1]).
    """
    if x.shape[-1] == 0:
        return amax_to_scale(torch.zeros(*x.shape[:-1], 1, device=x.device))
    return amax_to_scale(x.abs().amax(dim=-1, keepdim=True))


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn ``clamp(x / scale, -448, 448)``; `scale` broadcasts against `x`.

    Clamping before the cast saturates out-of-range values instead of relying on the
    cast's (library-dependent) overflow behaviour. NaN stays NaN.
    """
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` computed in fp32, returned in `dtype`; `scale` broadcasts against `q`."""
    return (q.float() * scale).to(dtype)


def scaled_mm_unsupported_reason(device: torch.device) -> str | None:
    """Why `torch._scaled_mm` cannot run on `device`, or None when it can."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            return f"{name} has compute capability {major}.{minor}; FP8 GEMMs need 8.9 or newer"
    elif device.type != "cpu":
        return f"torch._scaled_mm is not available on device type {device.type!r}"
    return None


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("FP8 GEMM falls back to dequantize + F.linear: %s", reason)


def _reference_matmul(
    x_fp8: torch.Tensor,
    weight_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    weight_scale = weight_scale.reshape(-1, 1) if weight_scale.dim() else weight_scale
    out = F.linear(dequantize(x_fp8, x_scale), dequantize(weight_fp8, weight_scale))
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_matmul(
    x_fp8: torch.Tensor,
    weight_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """``(x_fp8 * x_scale) @ (weight_fp8 * weight_scale).T + bias`` in `out_dtype`: [M,N].

    x_fp8: fp8 [M,K] row-major; weight_fp8: fp8 [N,K] contiguous (passed to `_scaled_mm` as the
    free column-major view ``weight.t()``); x_scale: fp32 [] or [M,1]; weight_scale: fp32 [] or
    [N,1]; bias: [N] or None. Per-tensor and row-wise scales mix freely: `_scaled_mm` needs both
    per-tensor or both row-wise, so a per-tensor scale is expanded when the other is row-wise.
    Falls back (with one logged warning) to dequantize + `F.linear` where `_scaled_mm` cannot run.
    """
    m, n = x_fp8.shape[0], weight_fp8.shape[0]
    if m == 0:
        return torch.zeros(0, n, dtype=out_dtype, device=x_fp8.device)
    reason = scaled_mm_unsupported_reason(x_fp8.device)
    if reason is not None:
        _warn_once(reason)
        return _reference_matmul(x_fp8, weight_fp8, x_scale, weight_scale, bias, out_dtype)

    scale_a, scale_b = x_scale, weight_scale
    if scale_a.dim() or scale_b.dim():  # row-wise: scale_a [M,1], scale_b [1,N], both contiguous
        scale_a = scale_a.expand(m, 1).contiguous()
        scale_b = scale_b.reshape(1, -1).expand(1, n).contiguous()
    gemm_dtype = out_dtype
    if x_fp8.is_cuda and scale_a.dim() and out_dtype == torch.float16:
        # Row-wise scaling with fp16 output came out with bf16-level error on H100 (torch 2.11):
        # take fp32 from the GEMM and round once.
        gemm_dtype = torch.float32
    # On CUDA a bias must be bf16/fp16 and is rejected with fp32 output: add it after the GEMM.
    fused_bias = bias
    if bias is not None and x_fp8.is_cuda and (gemm_dtype == torch.float32 or bias.dtype != gemm_dtype):
        fused_bias = None
    try:
        out = torch._scaled_mm(
            x_fp8,
            weight_fp8.t(),  # (K, N) column-major view, no copy
            scale_a,
            scale_b,
            bias=fused_bias,
            out_dtype=gemm_dtype,
            use_fast_accum=use_fast_accum,
        )
    except RuntimeError as exc:
        _warn_once(f"torch._scaled_mm rejected {tuple(x_fp8.shape)} x {tuple(weight_fp8.shape)} -> {out_dtype}: {exc}")
        return _reference_matmul(x_fp8, weight_fp8, x_scale, weight_scale, bias, out_dtype)
    if isinstance(out, tuple):  # torch < 2.5 returned (out, amax)
        out = out[0]
    if bias is not None and fused_bias is None:
        out = out.float() + bias.float()
    return out.to(out_dtype)
