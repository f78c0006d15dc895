"""Pure math of the accuracy algorithms: MSE scale search, GPTQ on the FP8 grid, SmoothQuant factors.

Every function takes and returns tensors, touches no module, and is deterministic. `scale` is the
dequantization multiplier (``w ≈ q * scale``) as everywhere in fp8kit. Weights are [N, K]
(N = out_features, K = in_features); a weight scale is fp32 [] (per tensor) or [N, 1] (per channel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import scaling
from .scaling import (
    AMAX_FLOOR,
    FP8_MAX,
    amax_to_scale,
    block_scale,
    expand_block_scale,
    quantize,
    rowwise_scale,
    tensor_scale,
)

if TYPE_CHECKING:
    from .config import QuantConfig

__all__ = [
    "CLIP_RATIOS",
    "quantize_weight",
    "max_scale",
    "expand_scale",
    "mse_scale",
    "gptq_quantize",
    "smoothing_factors",
]

#: Candidate ratios of the scale to the max scale (amax / 448) tried by `mse_scale`. Below 1 the
#: largest values clip; above 1 nothing clips and the E4M3 grid shifts against the values (the grid
#: repeats every factor of 2, so (1, 2) covers every shift). 1.0 is included, so the search is never
#: worse than the max scale.
CLIP_RATIOS: tuple[float, ...] = tuple(sorted({1.0, *(0.5 + k / 32 for k in range(16)), *(1 + k / 16 for k in range(1, 16))}))


Block = tuple[int, int]

#: The value of every FP8 E4M3 code (fp32 [256], NaN for the two NaN codes), for `_fp8_to_fp32`.
_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(scaling.FP8_DTYPE).float()


def _fp8_to_fp32(q: torch.Tensor) -> torch.Tensor:
    """``q.float()`` with the same bits; on CPU a table lookup, ~5x faster than torch's cast there."""
    if q.device.type != "cpu":
        return q.float()
    return torch.take(_FP8_VALUES, q.view(torch.uint8).long())


def max_scale(weight: torch.Tensor, granularity: str, block: Block = (128, 128)) -> torch.Tensor:
    """The max scale of `weight` [N, K] = absmax / 448: fp32 [] ("tensor"), [N, 1] ("channel") or
    [ceil(N / bn), ceil(K / bk)] ("block", one per `block` of rows x columns)."""
    if granularity == "channel":
        return rowwise_scale(weight)
    if granularity == "tensor":
        return tensor_scale(weight)
    if granularity == "block":
        return block_scale(weight, block)
    raise ValueError(f"weight granularity must be 'tensor', 'channel' or 'block', got {granularity!r}")


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], granularity: str, block: Block = (128, 128)) -> torch.Tensor:
    """A weight scale of `granularity` (see `max_scale`) as the scale of every element: fp32 [N, K]."""
    if granularity == "block":
        return expand_block_scale(scale.float(), tuple(shape), block)
    return scale.float().expand(shape)


def _sum_per_scale(err: torch.Tensor, granularity: str, block: Block) -> torch.Tensor:
    """Sum the per-element errors [N, K] over the elements that share a scale: the scale's shape."""
    if granularity == "channel":
        return err.sum(dim=-1, keepdim=True)
    if granularity == "tensor":
        return err.sum()
    (n, k), (bn, bk) = err.shape, block
    padded = torch.nn.functional.pad(err, (0, -k % bk, 0, -n % bn))  # zeros add nothing to a sum
    return padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk).sum(dim=(1, 3))


@torch.no_grad()
def mse_scale(
    weight: torch.Tensor,
    granularity: str,
    column_weight: torch.Tensor | None = None,
    ratios: tuple[float, ...] = CLIP_RATIOS,
    block: Block = (128, 128),
) -> torch.Tensor:
    """The scale among ``ratio * max scale`` that minimizes the squared rounding error.

    weight: [N, K], any float dtype. granularity: "tensor" (one scale, its error summed over the
    weight), "channel" (one per row) or "block" (one per `block`), each scale searched on its own
    elements; the result has `max_scale`'s shape (fp32). column_weight: optional fp32 [K] >= 0
    weighting each input column's error (e.g. the diagonal of the layer inputs' Hessian, E[x_k^2],
    which turns the weight error into an estimate of the output error); None weights all columns
    alike and needs no data. Never worse than the max scale: 1.0 is a candidate, taken first.
    """
    weight_fp32 = weight.float()
    shape = tuple(weight_fp32.shape)
    base = max_scale(weight_fp32, granularity, block)
    if weight_fp32.numel() == 0:
        return base
    weights = None if column_weight is None else column_weight.float().reshape(1, -1)

    def error(scale: torch.Tensor) -> torch.Tensor:
        scale_map = expand_scale(scale, shape, granularity, block)  # [N, K]
        err = (_fp8_to_fp32(quantize(weight_fp32, scale_map)) * scale_map - weight_fp32).square_()
        return _sum_per_scale(err if weights is None else err.mul_(weights), granularity, block)

    best_scale, best_err = base.clone(), error(base)
    for ratio in ratios:
        if ratio == 1.0:
            continue
        candidate = amax_to_scale(base * FP8_MAX * ratio)  # positive: base >= AMAX_FLOOR / 448
        err = error(candidate)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, candidate, best_scale)
    return best_scale


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    *,
    block_size: int = 128,
    dampening: float = 0.01,
    act_order: bool = False,
    granularity: str | None = None,
    block: Block = (128, 128),
) -> torch.Tensor:
    """FP8 codes of `weight` by GPTQ: columns rounded in order, each one's error pushed onto the rest.

    weight: [N, K] (any float dtype). hessian: [K, K], the second moment of the layer's inputs
    (``sum x x^T / count`` over calibration tokens; any positive multiple gives the same result).
    scale: the fixed dequantization scale, fp32 [] or [N, 1] (anything broadcastable to [N, K]), or
    block scales with ``granularity="block"`` and `block`. The codes are ``float8_e4m3fn`` [N, K] in
    the original column order, so that ``codes * scale`` approximates `weight` with a smaller output error ``|(W - Q) X|`` than round to
    nearest (GPTQ, Frantar et al. 2022: the optimal-brain-quantizer update with a Cholesky factor of
    the inverse Hessian, processed in blocks of `block_size` columns).
    dampening: added to the diagonal as a fraction of its mean (numerical stability).
    act_order: quantize columns in order of decreasing Hessian diagonal (the codes come back in the
    original order, so the saved format does not change). Columns whose input was always zero
    (diagonal 0) are quantized to 0. Runs in float32 with a float64 Cholesky; deterministic.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq_quantize: weight {tuple(weight.shape)} needs a [K, K] Hessian, got {tuple(hessian.shape)}")
    if block_size < 1 or dampening < 0:
        raise ValueError(f"gptq_quantize: block_size ({block_size}) must be >= 1 and dampening ({dampening}) >= 0")
    n, k = weight.shape
    w = weight.float().clone()  # [N, K], updated in place as errors are pushed forward
    scale_map = expand_scale(scale, (n, k), granularity or "tensor", block).contiguous()  # [N, K] per element
    h = hessian.double().clone()  # [K, K]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, scale_map, h = w[:, perm], scale_map[:, perm], h[perm][:, perm]
    h.diagonal().add_(dampening * torch.diagonal(h).mean())
    # Upper Cholesky factor of H^-1: row i holds the update coefficients of column i onto columns > i.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()  # [K, K]
    codes = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=weight.device)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        w_block = w[:, start:end]  # view: updated in place
        err_block = torch.empty_like(w_block)  # [N, B] scaled errors of this block's columns
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            col_scale = scale_map[:, start + i]  # [N]
            q = quantize(w_block[:, i], col_scale)  # [N] fp8
            codes[:, start + i] = q
            err = (w_block[:, i] - _fp8_to_fp32(q) * col_scale) / hinv_block[i, i]  # [N]
            w_block[:, i:].sub_(err[:, None] * hinv_block[i, i:][None, :])
            err_block[:, i] = err
        w[:, end:].sub_(err_block @ hinv[start:end, end:])  # lazy batch update of the remaining columns
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


def smoothing_factors(activation_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant factors s [K] (fp32): ``amax_x^alpha / amax_w^(1 - alpha)``, per input channel.

    activation_amax: [K], the absmax of each input channel over calibration tokens. weight_amax: [K],
    the absmax of each input column over every weight that reads this input. Dividing the input by s
    and multiplying the weight columns by s leaves the product unchanged and moves the activation's
    per-channel range into the weights (alpha = 0: no move on activations, 1: all of it). Channels
    never active or never read (an amax of 0) get s = 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    a = activation_amax.float()
    w = weight_amax.float()
    s = a.clamp(min=AMAX_FLOOR).pow(alpha) / w.clamp(min=AMAX_FLOOR).pow(1 - alpha)
    s = torch.where((a > 0) & (w > 0) & torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s


def quantize_weight(
    weight_hp: torch.Tensor, config: "QuantConfig", hessian: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 codes [N, K], scale as `max_scale` gives it) of `weight_hp` [N, K] by `config.algorithm`.

    "max": `scaling.quantize_weight` (the Triton kernels on a GPU). "mse": `mse_scale`, its columns
    weighted by the Hessian diagonal when `hessian` [K, K] is given, then round to nearest. "gptq":
    the same MSE scale, then `gptq_quantize` with `hessian` (required).
    """
    if config.algorithm == "max":
        return scaling.quantize_weight(weight_hp, config.weight, config.block_size)
    column_weight = None if hessian is None else torch.diagonal(hessian)
    scale = mse_scale(weight_hp, config.weight, column_weight, block=config.block_size)
    if config.algorithm == "mse":
        return quantize(weight_hp, expand_scale(scale, tuple(weight_hp.shape), config.weight, config.block_size)), scale
    if config.algorithm == "gptq":
        if hessian is None:
            raise ValueError("quantize_weight: algorithm 'gptq' needs the Hessian of the layer inputs")
        codes = gptq_quantize(
            weight_hp,
            hessian,
            scale,
            block_size=config.gptq_block_size,
            dampening=config.gptq_dampening,
            act_order=config.gptq_act_order,
            granularity=config.weight,
            block=config.block_size,
        )
        return codes, scale
    raise ValueError(f"quantize_weight: unknown algorithm {config.algorithm!r}")
