"""Pure FP8 E4M3 math: amax -> scale, saturated quantize / dequantize, and the scaled GEMM.

`scale` is always the dequantization multiplier: ``x ≈ q * scale`` with ``scale = amax / 448``,
the convention of `torch._scaled_mm`, ONNX DequantizeLinear, vLLM and compressed-tensors.
Per-tensor scales are 0-dim fp32 tensors; row-wise scales (per-channel weights, per-token
activations) are fp32 [rows, 1]; block-wise scales (DeepSeek-V3 style: one per 128 x 128 block of a
weight [N, K], one per 1 x 128 group of an activation row) are fp32 [ceil(rows / br), ceil(cols / bc)]
for blocks of br x bc elements, partial blocks at the edges scaled by the amax of their real elements.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import kernels
from .errors import GraphCaptureError

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "AMAX_FLOOR",
    "amax_to_scale",
    "tensor_scale",
    "rowwise_scale",
    "block_scale",
    "expand_block_scale",
    "round_up_to_dtype",
    "quantize",
    "quantize_activation",
    "quantize_weight",
    "dequantize",
    "zeroed_fraction",
    "quantized_linear",
    "fp8_matmul",
    "fp8_block_matmul",
    "scaled_mm_unsupported_reason",
    "block_gemm_unsupported_reason",
    "fp8_grouped_matmul",
    "grouped_mm_unsupported_reason",
]

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
AMAX_FLOOR = 1e-12  # keeps the scale of an all-zero tensor positive

_warned: set[str] = set()
_UNKNOWN = object()


def amax_to_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 dequantization scale(s) ``max(amax, 1e-12) / 448``, same shape as `amax`.

    Correctly rounded (IEEE) division on every device: the divisor is a tensor on amax's device,
    because CUDA torch turns division by a Python scalar into a multiply by its reciprocal, which
    is off by one ulp for some amax (the Triton kernels in `kernels` compute the same IEEE value).
    """
    amax_fp32 = amax.float().clamp(min=AMAX_FLOOR)
    return amax_fp32 / amax_fp32.new_full((), FP8_MAX)


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


def _check_block(block: tuple[int, int], where: str) -> tuple[int, int]:
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"{where}: block must be two positive ints (rows, cols), got {block!r}")
    return int(block[0]), int(block[1])


def block_scale(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """One scale per (br x bc) block of a 2-D `x` [R, C]: fp32 [ceil(R / br), ceil(C / bc)] = block absmax / 448.

    Blocks at the bottom / right edges are partial: their amax is over their real elements only
    (DeepSeek-V3 pads with zeros for the amax and drops the padding, which is the same). NaN in a
    block makes its scale NaN (as `torch.amax`). Weights use block (128, 128) on [N, K]; activation
    groups use (1, group_size) on [M, K].
    """
    br, bc = _check_block(block, "block_scale")
    if x.dim() != 2:
        raise ValueError(f"block_scale: expected a 2-D tensor, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    nr, nc = -(-rows // br), -(-cols // bc)
    if x.numel() == 0:
        return amax_to_scale(torch.zeros(nr, nc, device=x.device))
    # Zero padding leaves every block's amax unchanged (|x| >= 0) and makes the blocks a plain reshape.
    padded = F.pad(x.abs(), (0, nc * bc - cols, 0, nr * br - rows))  # (nr * br, nc * bc)
    amax = padded.reshape(nr, br, nc, bc).amax(dim=(1, 3))  # (nr, nc)
    return amax_to_scale(amax)


def round_up_to_dtype(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 `scale` rounded up to the nearest value of `dtype` (bf16 / fp16), returned in fp32.

    Identity for fp32 / fp64. Rounding up keeps ``|x| / scale <= 448`` (nothing saturates that would
    not have), and makes the scale exact in `dtype`: block scales of bf16 / fp16 weights are stored
    in that dtype by compressed-tensors (as llm-compressor writes them) and in fp32 by the "fp8"
    format, bit-identically. NaN and inf stay.
    """
    if dtype in (torch.float32, torch.float64):
        return scale
    low = scale.to(dtype)
    up = torch.where(low.float() < scale, torch.nextafter(low, torch.full_like(low, float("inf"))), low)
    return up.float()


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Block scales [ceil(R / br), ceil(C / bc)] repeated to one per element: [R, C] (the edge blocks cut)."""
    br, bc = _check_block(block, "expand_block_scale")
    rows, cols = shape
    expected = (-(-rows // br), -(-cols // bc))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"expand_block_scale: a {rows} x {cols} tensor in {br} x {bc} blocks needs scales of shape {expected}, "
            f"got {tuple(scale.shape)}"
        )
    return scale.repeat_interleave(br, dim=0)[:rows].repeat_interleave(bc, dim=1)[:, :cols]  # (R, C)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    *,
    block: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """float8_e4m3fn ``clamp(x / scale, -448, 448)``; `scale` broadcasts against `x`.

    With `block` (br, bc), `scale` holds one value per block of the 2-D `x` (see `block_scale`).
    Clamping before the cast saturates out-of-range values instead of relying on the
    cast's (library-dependent) overflow behaviour. NaN stays NaN.
    out (float8_e4m3fn) and workspace (fp32), both shaped like `x`, are optional buffers that
    only save allocations (same bits): `fp8kit.core.streaming` reuses them across row blocks.
    """
    if block is not None:
        scale = expand_block_scale(scale, tuple(x.shape), block)
    if out is None and workspace is None:
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    x_fp32 = x.to(torch.float32, copy=True) if workspace is None else workspace.copy_(x)
    x_fp32.div_(scale).clamp_(-FP8_MAX, FP8_MAX)  # fp32 / fp32 in place: the same IEEE ops as above
    return x_fp32.to(FP8_DTYPE) if out is None else out.copy_(x_fp32)


def quantize_activation(
    x2d: torch.Tensor, granularity: str = "tensor", scale: torch.Tensor | None = None, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an activation x2d [M, K]: returns (fp8 [M, K], scale).

    With `scale` (fp32, one element): static, the same scale is returned. Without: dynamic, with
    `granularity` "tensor" (scale fp32 []), "token" (scale fp32 [M, 1]) or "group" (one scale per
    1 x `group_size` group along K: fp32 [M, ceil(K / group_size)], column-major, i.e. strides
    (1, M), the layout torch's block-wise GEMM takes). Runs the Triton kernels of `kernels` where
    they can run (CUDA, compute capability >= 8.9, triton importable), else the torch reference
    (`tensor_scale` / `rowwise_scale` / `block_scale` + `quantize`); both give identical bits.
    Under `torch.compile` it is always the torch reference: the compiler fuses those ops itself
    (near the memory floor) and traces them without graph breaks.
    """
    fast = not torch.compiler.is_compiling() and kernels.unavailable_reason(x2d.device) is None
    if scale is not None:
        if fast:
            if scale.dtype != torch.float32 or scale.device != x2d.device:
                scale = scale.to(device=x2d.device, dtype=torch.float32)
            return kernels.quantize_static(x2d, scale), scale
        return quantize(x2d, scale), scale
    if granularity == "group":
        if fast and group_size >= 16 and not group_size & (group_size - 1):  # the kernel takes powers of two
            return kernels.quantize_per_group(x2d, group_size)
        block = (1, group_size)
        x_scale = block_scale(x2d, block).t().contiguous().t()  # (M, G), strides (1, M)
        return quantize(x2d, x_scale, block=block), x_scale
    if granularity == "token":
        if fast:
            return kernels.quantize_per_token(x2d)
        x_scale = rowwise_scale(x2d)
    elif granularity == "tensor":
        if fast:
            return kernels.quantize_per_tensor(x2d)
        x_scale = tensor_scale(x2d)
    else:
        raise ValueError(
            f"quantize_activation: granularity must be 'tensor', 'token' or 'group', got {granularity!r}"
        )
    return quantize(x2d, x_scale), x_scale


def quantize_weight(
    weight_hp: torch.Tensor, granularity: str = "tensor", block_size: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight [N, K]: returns (fp8 [N, K], scale fp32).

    granularity "tensor": scale []; "channel": [N, 1]; "block": one scale per `block_size` block,
    [ceil(N / bn), ceil(K / bk)] contiguous (`block_scale`, rounded up to the weight's dtype by
    `round_up_to_dtype` so checkpoints can store it in that dtype). For "tensor" / "channel" on a GPU the
    Triton kernels allocate only the fp8 output (the torch path makes several fp32 temporaries of
    the weight's size); results are identical. Under `torch.compile`: the torch path.
    """
    if granularity not in ("tensor", "channel", "block"):
        raise ValueError(
            f"quantize_weight: granularity must be 'tensor', 'channel' or 'block', got {granularity!r}"
        )
    if granularity == "block":
        scale = round_up_to_dtype(block_scale(weight_hp, block_size), weight_hp.dtype)
        return quantize(weight_hp, scale, block=block_size), scale
    if (
        not torch.compiler.is_compiling()
        and weight_hp.dim() == 2
        and kernels.unavailable_reason(weight_hp.device) is None
    ):
        if granularity == "channel":
            return kernels.quantize_per_token(weight_hp)  # one scale per output row
        return kernels.quantize_per_tensor(weight_hp)
    scale = rowwise_scale(weight_hp) if granularity == "channel" else tensor_scale(weight_hp)
    return quantize(weight_hp, scale), scale


def zeroed_fraction(weight_hp: torch.Tensor, weight_fp8: torch.Tensor, block_elements: int = 2**22) -> float:
    """Share (0..1) of the non-zero entries of `weight_hp` [N, K] whose FP8 code in `weight_fp8`
    (float8_e4m3fn [N, K]) is +-0: values lost to underflow because the scale is set by a far larger
    outlier. Computed in row blocks of about `block_elements` (bool temporaries only); 0.0 for an
    all-zero weight.
    """
    rows = max(1, block_elements // max(weight_hp.shape[-1], 1))
    codes = weight_fp8.view(torch.uint8)  # (N, K); E4M3 +-0 are 0x00 and 0x80
    zeroed = torch.zeros((), dtype=torch.int64, device=weight_hp.device)
    nonzero = torch.zeros((), dtype=torch.int64, device=weight_hp.device)
    for i in range(0, weight_hp.shape[0], rows):
        kept = weight_hp[i : i + rows] != 0  # (rows, K)
        nonzero += kept.sum()
        zeroed += (kept & ((codes[i : i + rows] & 0x7F) == 0)).sum()
    total = int(nonzero)
    return int(zeroed) / total if total else 0.0


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, *, block: tuple[int, int] | None = None
) -> torch.Tensor:
    """``q * scale`` computed in fp32, returned in `dtype`; `scale` broadcasts against `q`, or with
    `block` (br, bc) holds one value per block of the 2-D `q` (see `block_scale`)."""
    if block is not None:
        scale = expand_block_scale(scale, tuple(q.shape), block)
    return (q.float() * scale).to(dtype)


_scaled_mm_reasons: dict[torch.device, str | None] = {}

#: Row-wise scaled GEMMs with at most this many rows (M) take the skinny path on CUDA: a per-tensor
#: `_scaled_mm` with unit scales and fp32 output, then `kernels.scale_epilogue` (see `fp8_matmul`).
#: 0 switches it off. Measured on an H100 (docs/dev/kernels-notes.md, tools/gpu/skinny_check.py).
ROWWISE_SKINNY_MAX_M = 16
_unit_scales: dict[torch.device, torch.Tensor] = {}  # fp32 [] 1.0 per CUDA device


@torch.compiler.assume_constant_result  # a fact about the device: torch.compile evaluates it once
def scaled_mm_unsupported_reason(device: torch.device) -> str | None:
    """Why `torch._scaled_mm` cannot run on `device`, or None when it can (cached per device)."""
    if device.type == "cpu":
        return None
    reason = _scaled_mm_reasons.get(device, _UNKNOWN)
    if reason is _UNKNOWN:
        reason = None
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            if (major, minor) < (8, 9):
                name = torch.cuda.get_device_name(index)
                reason = f"{name} has compute capability {major}.{minor}; FP8 GEMMs need 8.9 or newer"
        else:
            reason = f"torch._scaled_mm is not available on device type {device.type!r}"
        if device.type != "cuda" or device.index is not None:  # "cuda" alone follows the current device
            _scaled_mm_reasons[device] = reason
    return reason


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


def _rejected(
    exc: RuntimeError,
    x_fp8: torch.Tensor,
    weight_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The fallback where `torch._scaled_mm` rejected this call: one logged warning, the dequantized reference."""
    _warn_once(f"torch._scaled_mm rejected {tuple(x_fp8.shape)} x {tuple(weight_fp8.shape)} -> {out_dtype}: {exc}")
    return _reference_matmul(x_fp8, weight_fp8, x_scale, weight_scale, bias, out_dtype)


def _unit_scale(device: torch.device) -> torch.Tensor | None:
    """Cached fp32 [] 1.0 on `device`; None when it does not exist yet and the stream is capturing a
    CUDA graph (a tensor made during capture holds its value only in the graph's replays)."""
    one = _unit_scales.get(device)
    if one is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        one = _unit_scales[device] = torch.tensor(1.0, dtype=torch.float32, device=device)  # synchronous copy
    return one


def _skinny_rowwise_matmul(
    x_fp8: torch.Tensor,
    weight_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    use_fast_accum: bool,
    compiling: bool,
) -> torch.Tensor | None:
    """Row-wise scaled GEMM for small M on CUDA as unit-scale `_scaled_mm` (fp32 out) + scale epilogue.

    torch's row-wise `_scaled_mm` (CUTLASS) picks slow tiles at decode sizes (up to ~1.8x the
    per-tensor cuBLAS GEMM on H100 for 4096x14336); the per-tensor GEMM with unit scales gives the
    exact fp32 accumulator, the epilogue applies ``x_scale[m] * weight_scale[n] (+ bias[n])``.
    Not bit-identical to CUTLASS's epilogue (rounding order), equally accurate against float64.
    Returns None where this path does not apply (the caller then takes the plain row-wise path); where
    `_scaled_mm` rejects the shape, the dequantized reference (one attempt per call, as `fp8_matmul`).
    """
    m, n = x_fp8.shape[0], weight_fp8.shape[0]
    if (
        x_scale.dtype != torch.float32
        or weight_scale.dtype != torch.float32
        or x_scale.numel() not in (1, m)
        or weight_scale.numel() not in (1, n)
        or out_dtype not in (torch.bfloat16, torch.float16, torch.float32)
        or (bias is not None and bias.numel() != n)
    ):
        return None
    weight_t = weight_fp8.t()
    if compiling:  # plain ops: Inductor fuses the epilogue itself
        one = torch.ones((), dtype=torch.float32, device=x_fp8.device)
        acc = torch._scaled_mm(x_fp8, weight_t, one, one, out_dtype=torch.float32, use_fast_accum=use_fast_accum)
        out = acc * x_scale.reshape(-1, 1) * weight_scale.reshape(1, -1)
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype)
    if kernels.unavailable_reason(x_fp8.device) is not None:
        return None
    one = _unit_scale(x_fp8.device)
    if one is None:
        return None
    try:
        acc = torch._scaled_mm(x_fp8, weight_t, one, one, out_dtype=torch.float32, use_fast_accum=use_fast_accum)
    except RuntimeError as exc:  # a shape cuBLAS rejects (e.g. K % 16): the row-wise GEMM would too
        return _rejected(exc, x_fp8, weight_fp8, x_scale, weight_scale, bias, out_dtype)
    if isinstance(acc, tuple):  # torch < 2.5 returned (out, amax)
        acc = acc[0]
    return kernels.scale_epilogue(acc, x_scale, weight_scale, bias, out_dtype)


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
    On CUDA, row-wise scales with M <= `ROWWISE_SKINNY_MAX_M` take a faster skinny path (per-tensor
    `_scaled_mm` with unit scales to fp32, then a one-launch Triton scale epilogue; plain torch ops
    under `torch.compile`): the same math, not bit-identical to the row-wise `_scaled_mm`.
    """
    m, n = x_fp8.shape[0], weight_fp8.shape[0]
    if m == 0:
        return torch.zeros(0, n, dtype=out_dtype, device=x_fp8.device)
    compiling = torch.compiler.is_compiling()
    reason = scaled_mm_unsupported_reason(x_fp8.device)
    if reason is not None:
        if not compiling:  # logging would break the graph
            _warn_once(reason)
        return _reference_matmul(x_fp8, weight_fp8, x_scale, weight_scale, bias, out_dtype)

    scale_a, scale_b = x_scale, weight_scale
    rowwise = scale_a.dim() or scale_b.dim()
    if rowwise and x_fp8.is_cuda and m <= ROWWISE_SKINNY_MAX_M:  # device first: no guard on M on CPU
        out = _skinny_rowwise_matmul(
            x_fp8, weight_fp8, x_scale, weight_scale, bias, out_dtype, use_fast_accum, compiling
        )
        if out is not None:
            return out
    if rowwise:  # row-wise: scale_a [M,1], scale_b [1,N], both contiguous (no copy when already so)
        # clone, not .contiguous(): an expanded [1, 1] counts as contiguous with stride 0, which _scaled_mm rejects
        if scale_a.shape != (m, 1) or not scale_a.is_contiguous():
            scale_a = scale_a.expand(m, 1).clone(memory_format=torch.contiguous_format)
        scale_b = scale_b.reshape(1, -1)  # [N,1] -> [1,N] is a free view
        if scale_b.shape[1] != n or not scale_b.is_contiguous():
            scale_b = scale_b.expand(1, n).clone(memory_format=torch.contiguous_format)
    is_cuda = x_fp8.is_cuda
    gemm_dtype = out_dtype
    if is_cuda and rowwise and out_dtype == torch.float16:
        # Row-wise scaling with fp16 output came out with bf16-level error on H100 (torch 2.11):
        # take fp32 from the GEMM and round once.
        gemm_dtype = torch.float32
    # On CUDA a bias must be bf16/fp16 and is rejected with fp32 output: add it after the GEMM.
    fused_bias = bias
    if bias is not None and is_cuda and (gemm_dtype == torch.float32 or bias.dtype != gemm_dtype):
        fused_bias = None
    weight_t = weight_fp8.t()  # (K, N) column-major view, no copy
    if compiling:  # traced as is; the eager fallback on a rejected shape needs a real call
        out = torch._scaled_mm(
            x_fp8, weight_t, scale_a, scale_b, bias=fused_bias, out_dtype=gemm_dtype, use_fast_accum=use_fast_accum
        )
    else:
        try:
            out = torch._scaled_mm(
                x_fp8, weight_t, scale_a, scale_b, bias=fused_bias, out_dtype=gemm_dtype, use_fast_accum=use_fast_accum
            )
        except RuntimeError as exc:
            return _rejected(exc, x_fp8, weight_fp8, x_scale, weight_scale, bias, out_dtype)
    if isinstance(out, tuple):  # torch < 2.5 returned (out, amax)
        out = out[0]
    if bias is not None and fused_bias is None:
        out = out.float() + bias.float()
    return out if out.dtype == out_dtype else out.to(out_dtype)


def quantized_linear(
    x2d: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    granularity: str,
    *,
    out_dtype: torch.dtype,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """x2d [M, K] quantized per `granularity` (or with the static `input_scale`, `quantize_activation`)
    times weight_fp8 [N, K] (`fp8_matmul`): [M, N] in out_dtype. `FP8Linear`'s path outside the fused one."""
    x_fp8, x_scale = quantize_activation(x2d, granularity, input_scale)
    return fp8_matmul(
        x_fp8, weight_fp8, x_scale, weight_scale, bias=bias, out_dtype=out_dtype, use_fast_accum=use_fast_accum
    )


# ----------------------------------------------------------------------------- block-wise GEMM

#: The one block shape torch's block-wise scaled GEMM runs: 128 x 128 weight blocks with 1 x 128
#: activation groups (cuBLASLt "VEC128" x "BLK128x128"). Other block sizes take the fallback.
TORCH_BLOCK = (128, 128)
_block_gemm_reasons: dict[torch.device, str | None] = {}


def _cuda_version() -> tuple[int, ...]:
    return tuple(int(p) for p in (torch.version.cuda or "0").split(".")[:2])


def _cached_reason(
    cache: dict[torch.device, str | None], device: torch.device, probe: Callable[[torch.device], str | None]
) -> str | None:
    """``probe(device)`` (None: supported, else why not), cached per device; plain "cuda" follows the
    current device, so its answer is not cached."""
    reason = cache.get(device, _UNKNOWN)
    if reason is _UNKNOWN:
        reason = probe(device)
        if device.type != "cuda" or device.index is not None:
            cache[device] = reason
    return reason


def _not_hopper(device: torch.device, what: str) -> str | None:
    """Why the CUDA `device` (compute capability other than 9.0) cannot run `what`, or None on Hopper."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) == (9, 0):
        return None
    return f"{torch.cuda.get_device_name(index)} has compute capability {major}.{minor}; {what} on 9.0 (Hopper) only"


def _block_gemm_probe(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"torch's block-wise scaled GEMM needs a CUDA GPU of compute capability 9.0, not device type {device.type!r}"
    reason = _not_hopper(device, "torch's block-wise scaled GEMM runs")
    if reason is None and _cuda_version() < (12, 9):
        reason = f"torch {torch.__version__} is built with CUDA {torch.version.cuda}; block-wise FP8 GEMMs need 12.9 or newer"
    return reason


@torch.compiler.assume_constant_result  # a fact about the device: torch.compile evaluates it once
def block_gemm_unsupported_reason(device: torch.device) -> str | None:
    """Why torch's block-wise (1 x 128 by 128 x 128) scaled GEMM cannot run on `device`, or None.

    It runs on compute capability 9.0 (Hopper) only, with CUDA / cuBLASLt >= 12.9 (torch's check);
    the CPU build has no block-wise scaled GEMM. Cached per device.
    """
    return _cached_reason(_block_gemm_reasons, device, _block_gemm_probe)


def _reference_block_matmul(
    x_fp8: torch.Tensor,
    weight_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    block_size: tuple[int, int],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    x_hp = dequantize(x_fp8, x_scale, block=(1, block_size[1]))  # (M, K) fp32
    out = F.linear(x_hp, dequantize(weight_fp8, weight_scale, block=block_size))  # (M, N) fp32
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _block_scaled_mm(
    x_fp8: torch.Tensor,
    weight_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """torch's 1 x 128 by 128 x 128 scaled GEMM: (M, N) in `out_dtype`, no bias, full FP32 accumulation.

    Layouts (torch ScaledBlas, A = x [M, K] row-major, B = ``weight.t()`` [K, N] column-major,
    L = ceil(K / 128)): scale_a (M, L) with strides (1, M); scale_b for `F.scaled_mm` (torch >= 2.10)
    (L4, ceil(N / 128)) with strides (1, L4), L4 = L rounded up to a multiple of 4 (zero padded);
    `torch._scaled_mm` (older torch) takes ``weight_scale.t()`` unpadded, so it is used only when
    L % 4 == 0 (the padding is then empty and both layouts are the same view).
    """
    m = x_fp8.shape[0]
    pad_m = -m % 4  # cuBLASLt refuses 1 x 128 scales whose leading dimension (M) is not 16-byte aligned (H200: M=1, 33)
    if pad_m:
        x_fp8 = torch.cat([x_fp8.view(torch.uint8), x_fp8.new_zeros(pad_m, x_fp8.shape[1], dtype=torch.uint8)]).view(FP8_DTYPE)
        x_scale = torch.cat([x_scale, x_scale.new_ones(pad_m, x_scale.shape[1])])  # (M4, L)
    m4 = m + pad_m
    if x_scale.stride(0) != 1 or (x_scale.shape[1] > 1 and x_scale.stride(1) != m4):
        x_scale = x_scale.t().contiguous().t()  # (M4, L), strides (1, M4)
    groups = weight_scale.shape[1]  # L
    pad = -groups % 4
    # torch.compile (2.11) cannot trace F.scaled_mm (a graph break: "_scaled_mm_v2 ... marked as skipped"): under
    # compile take torch._scaled_mm, which it traces; `fp8_block_matmul` sends the L % 4 != 0 case to the reference.
    scaled_mm_v2 = None if torch.compiler.is_compiling() else getattr(F, "scaled_mm", None)
    if scaled_mm_v2 is not None:
        scale_b = (F.pad(weight_scale, (0, pad)) if pad else weight_scale).t()  # (L4, N / 128), strides (1, L4)
        recipe = F.ScalingType
        out = scaled_mm_v2(
            x_fp8, weight_fp8.t(), x_scale, recipe.BlockWise1x128, scale_b, recipe.BlockWise128x128,
            output_dtype=out_dtype, use_fast_accum=False,
        )  # fmt: skip
        return out[:m] if pad_m else out
    if pad:
        raise RuntimeError(
            f"torch {torch.__version__} has no F.scaled_mm, and torch._scaled_mm's block-wise layout for "
            f"ceil(K / 128) = {groups} (not a multiple of 4) is unverified"
        )
    out = torch._scaled_mm(
        x_fp8, weight_fp8.t(), x_scale, weight_scale.t(), out_dtype=out_dtype, use_fast_accum=False
    )
    out = out[0] if isinstance(out, tuple) else out
    return out[:m] if pad_m else out


def fp8_block_matmul(
    x_fp8: torch.Tensor,
    weight_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    block_size: tuple[int, int] = TORCH_BLOCK,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """Block-wise scaled ``(x_fp8 * x_scale) @ (weight_fp8 * weight_scale).T + bias`` in `out_dtype`: [M, N].

    x_fp8: fp8 [M, K] row-major; x_scale: fp32 [M, ceil(K / bk)], one per 1 x bk group (any
    strides; column-major saves a copy); weight_fp8: fp8 [N, K] contiguous; weight_scale: fp32
    [ceil(N / bn), ceil(K / bk)] for `block_size` (bn, bk); bias: [N] or None. Runs torch's
    block-wise scaled GEMM where it can (compute capability 9.0, CUDA >= 12.9, block (128, 128));
    elsewhere, or where torch rejects the call, dequantizes and calls `F.linear` (the same
    function in fp32), with one logged warning. The bias is added after the GEMM, in fp32.
    use_fast_accum is accepted for symmetry and ignored: torch has no fast-accumulation block-wise GEMM.
    """
    m, n = x_fp8.shape[0], weight_fp8.shape[0]
    if m == 0:
        return torch.zeros(0, n, dtype=out_dtype, device=x_fp8.device)
    compiling = torch.compiler.is_compiling()
    reason = block_gemm_unsupported_reason(x_fp8.device)
    if reason is None and tuple(block_size) != TORCH_BLOCK:
        reason = f"torch's block-wise scaled GEMM takes 128 x 128 blocks only, not {tuple(block_size)}"
    if reason is None and compiling and weight_scale.shape[1] % 4:
        reason = "under torch.compile, ceil(K / 128) must be a multiple of 4 (torch._scaled_mm's block layout)"
    if reason is not None:
        if not compiling:  # logging would break the graph
            _warn_once(reason)
        return _reference_block_matmul(x_fp8, weight_fp8, x_scale, weight_scale, block_size, bias, out_dtype)
    # torch refuses fast accumulation with 128 x 128 block scales ("scaled_gemm doesn't support fast accum with
    # 128x128 blockwise scaling", H200, torch 2.11): block GEMMs always accumulate in full FP32.
    if compiling:
        out = _block_scaled_mm(x_fp8, weight_fp8, x_scale, weight_scale, out_dtype)
    else:
        try:
            out = _block_scaled_mm(x_fp8, weight_fp8, x_scale, weight_scale, out_dtype)
        except RuntimeError as exc:
            _warn_once(
                f"torch's block-wise scaled GEMM rejected {tuple(x_fp8.shape)} x {tuple(weight_fp8.shape)} -> "
                f"{out_dtype}: {exc}"
            )
            return _reference_block_matmul(x_fp8, weight_fp8, x_scale, weight_scale, block_size, bias, out_dtype)
    if bias is not None:
        out = (out.float() + bias.float()).to(out_dtype)
    return out


_grouped_reasons: dict[torch.device, str | None] = {}


@torch.compiler.assume_constant_result  # a fact about the device: torch.compile evaluates it once
def grouped_mm_unsupported_reason(device: torch.device) -> str | None:
    """Why `torch._scaled_grouped_mm` cannot run on `device`, or None when it can (cached per device).

    It runs FP8 with row-wise scales on compute capability 9.0 only (Hopper: H100 / H200); other
    devices take `fp8_grouped_matmul`'s per-expert loop over `fp8_matmul`.
    """
    return _cached_reason(_grouped_reasons, device, _grouped_probe)


def _grouped_probe(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"torch._scaled_grouped_mm needs a CUDA device of compute capability 9.0, not {device.type!r}"
    if not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    return _not_hopper(device, "torch._scaled_grouped_mm runs FP8 with row-wise scales")


def _capturing(device: torch.device) -> bool:
    """True while the current stream of CUDA `device` captures a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def fp8_grouped_matmul(
    x_fp8: torch.Tensor,
    weight_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """Row group g of x times expert g's weight: ``out[r] = (x_fp8[r] * x_scale[r]) @ (W[g] * s[g]).T``.

    x_fp8: fp8 [S, K] row-major, rows sorted by expert; weight_fp8: fp8 [E, N, K] contiguous;
    x_scale: fp32 [] (one for all rows) or [S, 1]; weight_scale: fp32 [E, N] (one per output row of
    each expert; expand per-tensor scales); offsets: int32 [E], cumulative end row of each expert's
    group (the last equals S). Returns [S, N] in `out_dtype`.

    On compute capability 9.0: one `torch._scaled_grouped_mm` launch (its rules: row-wise fp32
    scales, `W.transpose(-2, -1)` as the column-major B, K and N multiples of 16, bf16 output, which
    is then cast to `out_dtype`); no host sync, so it is CUDA-graph capturable and traces under
    `torch.compile`. Elsewhere: a loop over the experts of `fp8_matmul` (the `FP8Linear` dispatch),
    with one logged warning; it reads the offsets on the host (a sync), so under CUDA-graph capture it
    raises GraphCaptureError saying why, and `torch.compile` breaks the graph there.
    """
    s, n = x_fp8.shape[0], weight_fp8.shape[1]
    if s == 0:
        return torch.zeros(0, n, dtype=out_dtype, device=x_fp8.device)
    reason = grouped_mm_unsupported_reason(x_fp8.device)
    if reason is None:
        scale_a = x_scale.reshape(-1)
        if scale_a.shape[0] != s or not scale_a.is_contiguous():
            scale_a = scale_a.expand(s).contiguous()  # (S,)
        out = torch._scaled_grouped_mm(
            x_fp8,
            weight_fp8.transpose(-2, -1),  # (E, K, N) column-major view, no copy
            scale_a,
            weight_scale.contiguous(),  # (E, N)
            offs=offsets,
            out_dtype=torch.bfloat16,
            use_fast_accum=use_fast_accum,
        )  # (S, N) bf16
        return out if out_dtype == torch.bfloat16 else out.to(out_dtype)
    if not torch.compiler.is_compiling():
        if _capturing(x_fp8.device):
            raise GraphCaptureError(
                f"FP8 experts on {x_fp8.device} cannot be captured in a CUDA graph: {reason}, so they run as a "
                "per-expert loop whose group sizes are read on the host. Run them eagerly here, or on compute "
                "capability 9.0 (H100 / H200), where torch._scaled_grouped_mm needs no host sync"
            )
        if reason not in _warned:
            _warned.add(reason)
            logger.warning("FP8 experts run as a per-expert loop of FP8 GEMMs: %s", reason)
    out = torch.empty(s, n, dtype=out_dtype, device=x_fp8.device)
    start = 0
    for expert, end in enumerate(offsets.tolist()):  # one host sync for all experts
        if end > start:
            rows_scale = x_scale if x_scale.dim() == 0 else x_scale[start:end]
            out[start:end] = fp8_matmul(
                x_fp8[start:end],
                weight_fp8[expert],
                rows_scale,
                weight_scale[expert].reshape(-1, 1),  # (N, 1)
                out_dtype=out_dtype,
                use_fast_accum=use_fast_accum,
            )
        start = end
    return out
