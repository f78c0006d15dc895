"""The "fp8" format (AutoFP8 / vLLM, REFERENCE §3; block-wise: DeepSeek-V3 / transformers FineGrainedFP8, §8).

``quantization_config = {"quant_method": "fp8", "activation_scheme": "static"|"dynamic", "ignored_layers":
[...], "kv_cache_scheme": "static" (only with KV scales), "fp8kit": {"format_version": 1, "config": ...}}``.
Tensors: ``<layer>.weight`` F8_E4M3 [N,K]; ``<layer>.weight_scale`` F32 []; ``<layer>.input_scale`` F32 []
(static only); ``<attn>.k_scale`` / ``<attn>.v_scale`` F32 []; everything else in its original dtype.
Per-tensor weights (vLLM would misread [N,1] scales) or 128 x 128 blocks: ``"fmt": "e4m3",
"weight_block_size": [128, 128]``, dynamic activations (1 x 128 groups at run time), and per layer
``<layer>.weight_scale_inv`` F32 [ceil(N/128), ceil(K/128)], a multiplier despite its name
(``W_block ≈ weight_block * weight_scale_inv``), edge blocks partial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import QuantConfig
from ..errors import CheckpointError, ConfigError
from ._schema import fp8kit_block, read_fp8kit_block

NAME = "fp8"
TITLE = "AutoFP8 / vLLM 'fp8'"
QUANT_METHOD = "fp8"
SCALAR_SHAPE: tuple[int, ...] = ()  # shape of a per-tensor scale on disk
WEIGHT_GRANULARITIES = ("tensor", "block")
BLOCK_SCALE_NAME = "weight_scale_inv"
#: Who reads it correctly. transformers (5.x) takes every quant_method "fp8" checkpoint for its block-wise
#: FineGrainedFP8: block weights load right, but per-tensor ones lose every weight_scale / input_scale as
#: unexpected and run as raw FP8 codes (wrong outputs, a warning only).
READERS = (
    "vLLM, SGLang, AutoFP8, fp8kit; transformers only with block weights (it misreads per-tensor 'fp8' "
    "as block-wise FineGrainedFP8: wrong outputs)"
)


def quantization_config(config: QuantConfig, ignored_layers: list[str], kv_cache: bool) -> dict[str, Any]:
    """The ``quantization_config`` of config.json for a model quantized with `config`."""
    if config.weight not in WEIGHT_GRANULARITIES:
        raise CheckpointError(
            "save_quantized: per-channel weight scales cannot be written in the AutoFP8 / vLLM 'fp8' format "
            "(it holds one scale per weight or per 128 x 128 block; vLLM would misread [N,1] scales). Quantize "
            "with weight='tensor' or 'block', or save with format='compressed-tensors'"
        )
    qc: dict[str, Any] = {"quant_method": QUANT_METHOD}
    if config.weight == "block":
        qc["fmt"] = "e4m3"
        qc["weight_block_size"] = list(config.block_size)
    qc["activation_scheme"] = config.activation
    qc["ignored_layers"] = list(ignored_layers)
    if kv_cache:
        qc["kv_cache_scheme"] = "static"
    qc["fp8kit"] = fp8kit_block(config)
    return qc


def block_scale_tensor(name: str, weight_scale: torch.Tensor, scale_dtype: torch.dtype) -> tuple[str, torch.Tensor]:
    """How this format stores a layer's block scales: ``<name>.weight_scale_inv`` F32 [ceil(N/bn), ceil(K/bk)]."""
    return f"{name}.{BLOCK_SCALE_NAME}", weight_scale.float()


def _block_size(qc: dict[str, Any], where: Path) -> tuple[int, int] | None:
    block = qc.get("weight_block_size")
    if block is None:
        return None
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size must be two positive ints, got {block!r}")
    scale_fmt = qc.get("scale_fmt", "float")
    if scale_fmt != "float":
        raise CheckpointError(
            f"{where}: quantization_config.scale_fmt is {scale_fmt!r}; fp8kit reads block scales stored as floats "
            "(scale_fmt 'float', DeepSeek-V3 style)"
        )
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(
            f"{where}: quantization_config has weight_block_size with activation_scheme "
            f"{qc.get('activation_scheme')!r}; block-wise checkpoints quantize activations dynamically"
        )
    return block[0], block[1]


def parse(qc: dict[str, Any], where: Path) -> QuantConfig:
    """The QuantConfig of an "fp8" quantization_config (fp8kit's own block when present); `where` is config.json.

    ``weight_block_size`` (DeepSeek-V3 / Qwen3-FP8 checkpoints) means block weights with dynamic
    1 x block[1] activation groups; ``ignored_layers`` or transformers' ``modules_to_not_convert``
    name the layers kept in high precision.
    """
    block = _block_size(qc, where)
    ours = read_fp8kit_block(qc, where)
    if ours is not None:
        return ours
    ignored = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ()
    blocks = {} if block is None else dict(weight="block", activation_granularity="group", block_size=block, group_size=block[1])
    try:
        return QuantConfig(
            activation=qc.get("activation_scheme", "dynamic"),
            ignore=tuple(ignored),
            kv_cache=qc.get("kv_cache_scheme") is not None,
            **blocks,
        )
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{where}: invalid quantization_config: {exc}") from exc
