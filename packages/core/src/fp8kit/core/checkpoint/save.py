"""`save_quantized`: a quantized model -> a checkpoint directory in one of `FORMATS`, written atomically."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import CheckpointError
from ..experts import FP8Experts, experts_layout
from ..linear import FP8Linear
from ..offload import offloaded_tensor
from .formats import check_format, kv_scale_shape, layer_tensors, quantization_config_dict
from .moe import INPUT_SCALE_MODES, disk_renamer, experts_to_disk, ignored_layers
from .writer import CONFIG_NAME, atomic_directory, write_shards

__all__ = ["save_quantized"]

logger = logging.getLogger(__name__)


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied / shared tensors stored once (first name wins), contiguous, on CPU."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:  # offloaded by accelerate: read it from its hook's offload map (CPU or disk memmap)
            tensor = offloaded_tensor(model, name)
            if tensor is None:
                raise CheckpointError(f"tensor {name} is on the meta device and in no accelerate offload map; materialize it before saving")
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            logger.debug("not storing %s: shares storage with %s", name, seen[key])
            continue
        seen[key] = name
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def _checkpoint_tensors(model: nn.Module, format: str, moe_input_scales: str = "per-expert") -> dict[str, torch.Tensor]:
    """The tensors to store for `model` in `format` (scale shapes per `layer_tensors` / `kv_scale_shape`),
    in state-dict order, each layer's tensors where its weight is, under the original checkpoint's
    names (MoE experts per expert: `moe`)."""
    tensors = _unique_tensors(model)
    kv_shape = kv_scale_shape(format)
    model_type = _model_type(model)
    layers: dict[str, dict[str, torch.Tensor]] = {}  # weight key -> the layer's tensors in `format`
    for name, module in model.named_modules():
        if isinstance(module, FP8Experts) or experts_layout(module) is not None:
            tensors = experts_to_disk(name, module, tensors, model_type, format, moe_input_scales)
        if isinstance(module, FP8Linear) and f"{name}.weight" in tensors:  # (a shared layer is stored once)
            block = module.weight_granularity == "block"
            layers[f"{name}.weight"] = layer_tensors(
                name,
                tensors[f"{name}.weight"],
                tensors[f"{name}.weight_scale"],
                tensors.get(f"{name}.input_scale"),
                format,
                block_size=module.block_size if block else None,
                scale_dtype=module.scale_dtype,
            )
        for attr in ("k_scale", "v_scale"):
            key = f"{name}.{attr}" if name else attr
            if isinstance(getattr(module, attr, None), torch.Tensor) and key in tensors:
                tensors[key] = tensors[key].float().reshape(kv_shape)
    replaced = {key for produced in layers.values() for key in produced}
    replaced |= {key.removesuffix(".weight") + suffix for key in layers for suffix in (".weight_scale", ".input_scale")}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key in layers:
            out.update(layers[key])
        elif key not in replaced:
            out[key] = tensor
    to_disk, _ = disk_renamer(model_type)
    return {to_disk(key): tensor for key, tensor in out.items()}


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)

def save_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    format: str = "fp8",
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    moe_input_scales: str = "per-expert",
) -> Path:
    """Write `model` (quantized by `fp8kit.core.quantize`) as a checkpoint vLLM reads.

    format: "fp8" (AutoFP8 / vLLM; per-tensor weights only: per-channel weights are refused) or
        "compressed-tensors" (llm-compressor's "float-quantized"; every fp8kit scheme).
    MoE experts are written per expert under the original checkpoint's names (`checkpoint.moe`).
    moe_input_scales: "per-expert" (each expert's static input scale) or "layer-max" (the max over a
        layer's experts for every expert: what vLLM runs, as it keeps one input scale per MoE layer).
    Atomic: everything goes to a temporary sibling directory renamed to `path` at the end.
    """
    check_format(format)
    if moe_input_scales not in INPUT_SCALE_MODES:
        raise CheckpointError(f"save_quantized: moe_input_scales={moe_input_scales!r} is not one of {list(INPUT_SCALE_MODES)}")
    config: QuantConfig | None = getattr(model, "fp8kit_config", None)
    if config is None:
        raise CheckpointError("save_quantized: the model was not quantized with fp8kit.core.quantize")
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        raise CheckpointError("save_quantized: the model has no Hugging Face `config`; only transformers models can be saved")
    config_dict = hf_config.to_dict()
    config_dict.pop("quantization_config", None)
    if not config_dict.get("architectures"):
        config_dict["architectures"] = [type(model).__name__]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    ignored = ignored_layers(model, linears, _model_type(model))
    kv_cache = any(isinstance(getattr(m, "k_scale", None), torch.Tensor) for m in model.modules())
    config_dict["quantization_config"] = quantization_config_dict(config, ignored, kv_cache, format)
    tensors = _checkpoint_tensors(model, format, moe_input_scales)

    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str))
        write_shards(tensors, tmp, max_shard_bytes)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("saved FP8 checkpoint (%s format) to %s (%d tensors)", format, path, len(tensors))
    return Path(path)

