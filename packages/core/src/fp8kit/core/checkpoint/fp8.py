"""The "fp8" format (AutoFP8 / vLLM, REFERENCE §3).

``quantization_config = {"quant_method": "fp8", "activation_scheme": "static"|"dynamic", "ignored_layers":
[...], "kv_cache_scheme": "static" (only with KV scales), "fp8kit": {"format_version": 1, "config": ...}}``.
Tensors: ``<layer>.weight`` F8_E4M3 [N,K]; ``<layer>.weight_scale`` F32 []; ``<layer>.input_scale`` F32 []
(static only); ``<attn>.k_scale`` / ``<attn>.v_scale`` F32 []; everything else in its original dtype.
Per-tensor weights only (vLLM would misread [N,1] scales).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import QuantConfig
from ..errors import CheckpointError, ConfigError
from ._schema import fp8kit_block, read_fp8kit_block

NAME = "fp8"
TITLE = "AutoFP8 / vLLM 'fp8'"
QUANT_METHOD = "fp8"
SCALAR_SHAPE: tuple[int, ...] = ()  # shape of a per-tensor scale on disk
WEIGHT_GRANULARITIES = ("tensor",)


def quantization_config(config: QuantConfig, ignored_layers: list[str], kv_cache: bool) -> dict[str, Any]:
    """The ``quantization_config`` of config.json for a model quantized with `config`."""
    if config.weight not in WEIGHT_GRANULARITIES:
        raise CheckpointError(
            "save_quantized: per-channel weight scales cannot be written in the AutoFP8 / vLLM 'fp8' format "
            "(it holds one scale per weight; vLLM would misread [N,1] scales). Quantize with weight='tensor', "
            "or save with format='compressed-tensors'"
        )
    qc: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "activation_scheme": config.activation,
        "ignored_layers": list(ignored_layers),
    }
    if kv_cache:
        qc["kv_cache_scheme"] = "static"
    qc["fp8kit"] = fp8kit_block(config)
    return qc


def parse(qc: dict[str, Any], where: Path) -> QuantConfig:
    """The QuantConfig of an "fp8" quantization_config (fp8kit's own block when present); `where` is config.json."""
    ours = read_fp8kit_block(qc, where)
    if ours is not None:
        return ours
    try:
        return QuantConfig(
            activation=qc.get("activation_scheme", "dynamic"),
            ignore=tuple(qc.get("ignored_layers") or ()),
            kv_cache=qc.get("kv_cache_scheme") is not None,
        )
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{where}: invalid quantization_config: {exc}") from exc
