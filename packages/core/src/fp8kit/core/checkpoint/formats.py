"""The checkpoint formats fp8kit writes and reads, one module each, and the dispatch between them.

A format module (`fp8`, `compressed_tensors`) defines ``NAME``, ``TITLE`` (for messages), ``READERS`` (who reads it
correctly, for users), ``QUANT_METHOD`` (the config.json ``quant_method`` it reads), ``SCALAR_SHAPE`` (a per-tensor
scale's shape on disk), ``WEIGHT_GRANULARITIES`` (the weight scales it can hold), ``quantization_config(config,
ignored_layers, kv_cache)``, ``parse(qc, where) -> QuantConfig`` and ``block_scale_tensor(name, weight_scale,
scale_dtype) -> (key, tensor)`` (how it stores 128 x 128 block scales). Adding a format means adding its module to
`_MODULES`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..config import QuantConfig
from ..errors import CheckpointError
from ..scaling import FP8_DTYPE
from . import compressed_tensors, fp8

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "DEFAULT_FORMAT",
    "format_readers",
    "check_format",
    "quantization_config_dict",
    "parse_quantization_config",
    "layer_tensors",
    "kv_scale_shape",
    "check_block_scale",
]

_MODULES: dict[str, ModuleType] = {m.NAME: m for m in (fp8, compressed_tensors)}
FORMATS = tuple(_MODULES)
#: What `save_quantized`, `quantize_checkpoint` and the CLI write unless told: the format every consumer,
#: transformers included, reads correctly ("fp8" stays available for AutoFP8 / vLLM pipelines).
DEFAULT_FORMAT = "compressed-tensors"


def _module(format: str) -> ModuleType:
    """The module of `format`; CheckpointError unless it is one of `FORMATS`."""
    if format not in _MODULES:
        raise CheckpointError(f"unknown checkpoint format {format!r}; choose one of {list(FORMATS)}")
    return _MODULES[format]


def format_readers(format: str) -> str:
    """Who reads `format` correctly, in words (for summaries and docs)."""
    return _module(format).READERS


def check_format(format: str) -> None:
    """Raise CheckpointError unless `format` is one of `FORMATS`."""
    _module(format)


def quantization_config_dict(
    config: QuantConfig, ignored_layers: list[str], kv_cache: bool, format: str = "fp8"
) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for a model quantized with `config`.

    ignored_layers: exact names of the nn.Linear modules left in high precision.
    kv_cache: the checkpoint holds per-attention ``k_scale`` / ``v_scale`` tensors.
    format: one of `FORMATS`. Every format carries an ``fp8kit`` block (format_version and the full
        QuantConfig) so that `load_quantized` restores the exact configuration.
    """
    return _module(format).quantization_config(config, ignored_layers, kv_cache)


def parse_quantization_config(qc: Any, where: Path) -> QuantConfig:
    """The QuantConfig of a checkpoint's quantization_config, by its ``quant_method``; `where` is config.json."""
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    for module in _MODULES.values():
        if method == module.QUANT_METHOD:
            return module.parse(qc, where)
    raise CheckpointError(
        f"{where}: quantization_config.quant_method is {method!r}; fp8kit reads the 'fp8' (AutoFP8 / vLLM) "
        "and 'compressed-tensors' (float-quantized) formats"
    )


def check_block_scale(key: str, scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> None:
    """CheckpointError naming `key` unless `scale` is a block-scale grid for a weight of `shape` in `block` blocks:
    [ceil(N / bn), ceil(K / bk)], partial edge blocks included (DeepSeek-V3, transformers, vLLM)."""
    (n, k), (bn, bk) = shape, block
    expected = (-(-n // bn), -(-k // bk))
    if tuple(scale.shape) != expected:
        raise CheckpointError(
            f"{key}: block scales of shape {tuple(scale.shape)} do not fit a {n} x {k} weight in {bn} x {bk} blocks; "
            f"expected [ceil({n}/{bn}), ceil({k}/{bk})] = {list(expected)}"
        )


def layer_tensors(
    name: str,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    format: str = "fp8",
    *,
    block_size: tuple[int, int] | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear `name` (bias excluded; it is stored as is).

    weight: float8_e4m3fn [N, K]. weight_scale: fp32, one element (per tensor), [N, 1] (per
    channel) or, with `block_size` (bn, bk), [ceil(N / bn), ceil(K / bk)] block scales.
    input_scale: fp32, one element (static activations) or None (dynamic: not stored).
    Returns ``{name.weight, name.weight_scale[, name.input_scale]}`` with scales shaped [] for
    "fp8" and [1] (per tensor) / [N, 1] (per channel) for "compressed-tensors"; values unchanged.
    Block scales go under the format's own name and dtype: "fp8" ``weight_scale_inv`` F32,
    "compressed-tensors" ``weight_scale`` in `scale_dtype` (the original weight's; exact, see
    `scaling.round_up_to_dtype`).
    """
    module = _module(format)
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise CheckpointError(f"{name}.weight: expected float8_e4m3fn [N, K], got {weight.dtype} {tuple(weight.shape)}")
    if block_size is not None:
        if input_scale is not None:
            raise CheckpointError(f"{name}.input_scale: block-wise layers quantize activations dynamically; got a static scale")
        check_block_scale(f"{name}.weight_scale", weight_scale, tuple(weight.shape), tuple(block_size))
        key, scale = module.block_scale_tensor(name, weight_scale.float(), scale_dtype)
        return {f"{name}.weight": weight, key: scale}
    n = weight.shape[0]
    per_channel = weight_scale.numel() != 1
    if per_channel and tuple(weight_scale.shape) not in ((n, 1), (n,)):
        raise CheckpointError(
            f"{name}.weight_scale: shape {tuple(weight_scale.shape)} is neither one element nor [N, 1] = [{n}, 1]"
        )
    if per_channel and "channel" not in module.WEIGHT_GRANULARITIES:
        raise CheckpointError(
            f"{name}.weight_scale: per-channel scales [{n}, 1] cannot be written in the {module.TITLE} format; "
            "save with format='compressed-tensors'"
        )
    scalar_shape = module.SCALAR_SHAPE
    out = {
        f"{name}.weight": weight,
        f"{name}.weight_scale": weight_scale.float().reshape((n, 1) if per_channel else scalar_shape),
    }
    if input_scale is not None:
        if input_scale.numel() != 1:
            raise CheckpointError(f"{name}.input_scale: static input scales are per tensor, got {tuple(input_scale.shape)}")
        out[f"{name}.input_scale"] = input_scale.float().reshape(scalar_shape)
    return out


def kv_scale_shape(format: str) -> tuple[int, ...]:
    """Shape of the per-attention ``k_scale`` / ``v_scale`` tensors in `format`: [] ("fp8") or [1]."""
    return _module(format).SCALAR_SHAPE


def warn_partial_blocks(shapes: dict[str, tuple[int, int]], block_size: tuple[int, int]) -> list[str]:
    """Log one warning naming the block-quantized layers whose weight [N, K] is not a whole number of
    `block_size` (bn, bk) blocks; returns their names. fp8kit and vLLM read partial edge blocks;
    transformers' CPU dequantizer refuses or misreads such shapes and compressed-tensors' own forward
    needs K divisible by bk (README, "Partial blocks")."""
    bn, bk = block_size
    partial = [name for name, (n, k) in shapes.items() if n % bn or k % bk]
    if partial:
        shown = ", ".join(partial[:4]) + (f" and {len(partial) - 4} more" if len(partial) > 4 else "")
        logger.warning(
            "%d of %d block-quantized layers have partial %d x %d blocks (%s): fp8kit and vLLM read them, "
            "transformers' CPU dequantizer refuses or misreads them and compressed-tensors' forward needs K "
            "divisible by %d; --ignore those layers if such readers matter",
            len(partial), len(shapes), bn, bk, shown, bk,
        )  # fmt: skip
    return partial
