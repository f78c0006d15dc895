"""`save_quantized`: a quantized model -> a checkpoint directory in one of `FORMATS`; `save_hf`: an unquantized
model -> a plain Hugging Face safetensors directory (what streaming and other tools read). Both written atomically,
with a config.json fit to share (`writer.portable_config`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import CheckpointError
from ..experts import FP8Experts, experts_layout
from ..files import check_disjoint
from ..linear import FP8Linear
from ..offload import offloaded_tensor
from .formats import DEFAULT_FORMAT, check_format, kv_scale_shape, layer_tensors, quantization_config_dict, warn_partial_blocks
from .moe import INPUT_SCALE_MODES, disk_renamer, experts_to_disk, ignored_layers
from .load import _normalize_tensors, check_fp8_tensors
from .writer import atomic_directory, write_config, write_shards

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

__all__ = ["save_quantized", "save_hf"]

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


def _source_of(model: nn.Module) -> Path | None:
    """Where `model` was loaded from: `fp8kit.core.models.load_model`'s record, else transformers'
    ``config._name_or_path`` when it names an existing local path."""
    source = getattr(model, "fp8kit_source", None)
    if source is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        source = name if isinstance(name, str) and name and os.path.exists(name) else None
    return None if source is None else Path(source)


def _check_not_source(model: nn.Module, path: str | os.PathLike) -> None:
    """Refuse an output `path` that overlaps where `model` was loaded from (`files.check_disjoint`)."""
    source = _source_of(model)
    if source is not None:
        check_disjoint(source, path, "the model's source", "output directory")


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    format: str = DEFAULT_FORMAT,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    moe_input_scales: str = "per-expert",
) -> Path:
    """Write `model` (quantized by `fp8kit.core.quantize`) as a checkpoint vLLM reads.

    format: "compressed-tensors" (default; llm-compressor's "float-quantized", every fp8kit scheme; read by
        vLLM, SGLang and transformers) or "fp8" (AutoFP8 / vLLM; per-tensor or block weights, per-channel weights
        are refused; transformers misreads per-tensor ones). `formats.format_readers` says who reads which.
    MoE experts are written per expert under the original checkpoint's names (`checkpoint.moe`).
    moe_input_scales: "per-expert" (each expert's static input scale) or "layer-max" (the max over a
        layer's experts for every expert: what vLLM runs, as it keeps one input scale per MoE layer).
    Atomic: everything goes to a temporary sibling directory swapped in at the end (`writer.atomic_directory`:
    locked against other writers, fsynced). Refused: a `path` that overlaps the directory or file the model
    was loaded from (either inside the other, through symlinks or ``..``), and tensors the loader would refuse
    (`check_fp8_tensors`: NaN / Inf / non-positive scales, wrong shapes).
    """
    check_format(format)
    if moe_input_scales not in INPUT_SCALE_MODES:
        raise CheckpointError(f"save_quantized: moe_input_scales={moe_input_scales!r} is not one of {list(INPUT_SCALE_MODES)}")
    config: QuantConfig | None = getattr(model, "fp8kit_config", None)
    if config is None:
        raise CheckpointError("save_quantized: the model was not quantized with fp8kit.core.quantize")
    config_dict = _model_config_dict(model, "save_quantized")
    config_dict.pop("quantization_config", None)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    ignored = ignored_layers(model, linears, _model_type(model))
    kv_cache = any(isinstance(getattr(m, "k_scale", None), torch.Tensor) for m in model.modules())
    config_dict["quantization_config"] = quantization_config_dict(config, ignored, kv_cache, format)
    _check_not_source(model, path)
    tensors = _checkpoint_tensors(model, format, moe_input_scales)
    block = config.block_size if config.weight == "block" else None
    check_fp8_tensors(_normalize_tensors(tensors, Path(path)), lambda key: f"{path} (not written)", block)
    if block is not None:
        warn_partial_blocks(
            {name: tuple(m.weight.shape) for name, m in model.named_modules()
             if isinstance(m, FP8Linear) and m.weight_granularity == "block"}, block,
        )  # fmt: skip

    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_config(tmp, config_dict)
        write_shards(tensors, tmp, max_shard_bytes)
        _save_extras(model, tokenizer, tmp)
    logger.info("saved FP8 checkpoint (%s format) to %s (%d tensors)", format, path, len(tensors))
    return Path(path)


def _model_config_dict(model: nn.Module, caller: str) -> dict[str, Any]:
    """The model's Hugging Face config as a dict (architectures filled in); CheckpointError without one."""
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        raise CheckpointError(f"{caller}: the model has no Hugging Face `config`; only transformers models can be saved")
    config_dict = hf_config.to_dict()
    if not config_dict.get("architectures"):
        config_dict["architectures"] = [type(model).__name__]
    return config_dict


def _save_extras(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """generation_config.json (when the model has one) and the tokenizer's files."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_hf(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write an unquantized transformers `model` as a plain Hugging Face safetensors directory.

    For models `save_pretrained` refuses, such as one loaded from a GGUF file (transformers marks it
    quantized): the result has no ``quantization_config``, no local path and no GGUF leftovers, and
    loads with `AutoModelForCausalLM.from_pretrained`, `fp8kit.core.models.load_model` and
    `quantize_checkpoint` (streaming). Tied tensors are stored once (the model re-ties them on load).
    dtype: cast floating tensors to it (e.g. torch.bfloat16 halves the files); default: as they are.
    Refuses a model with FP8 layers (use `save_quantized`), and a `path` overlapping the model's source.
    """
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"save_hf: dtype {dtype} is not one of {sorted(_DTYPE_NAMES.values())}")
    fp8 = [name for name, m in model.named_modules() if isinstance(m, FP8Linear)]
    if fp8:
        raise CheckpointError(
            f"save_hf: the model holds {len(fp8)} FP8 layers (e.g. {fp8[0]}); save it with save_quantized"
        )
    _check_not_source(model, path)
    config_dict = _model_config_dict(model, "save_hf")
    config_dict.pop("quantization_config", None)  # GGUF's: the tensors written here are plain
    tensors = _unique_tensors(model)
    if dtype is not None:
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        config_dict["dtype"] = _DTYPE_NAMES[dtype]
    else:
        floating = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if len(floating) == 1 and next(iter(floating)) in _DTYPE_NAMES:
            config_dict["dtype"] = _DTYPE_NAMES[next(iter(floating))]
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_config(tmp, config_dict)
        write_shards(tensors, tmp, max_shard_bytes)
        _save_extras(model, tokenizer, tmp)
    logger.info("saved %s (%d tensors, unquantized) to %s", type(model).__name__, len(tensors), path)
    return Path(path)
