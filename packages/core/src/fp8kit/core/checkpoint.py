"""Checkpoint I/O in the AutoFP8 / vLLM "fp8" format (REFERENCE §3), written atomically, read without pickles.

Layout of a checkpoint directory:
    config.json         the model's config + ``quantization_config`` (below)
    model.safetensors   or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer files     when a tokenizer is given

``quantization_config = {"quant_method": "fp8", "activation_scheme": "static"|"dynamic",
"ignored_layers": [...], "kv_cache_scheme": "static" (only with KV scales),
"fp8kit": {"format_version": 1, "config": QuantConfig.to_dict()}}``. Tensors: ``<layer>.weight``
F8_E4M3 [N,K]; ``<layer>.weight_scale`` F32 []; ``<layer>.input_scale`` F32 [] (static only);
``<attn>.k_scale`` / ``<attn>.v_scale`` F32 []; everything else in its original dtype.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .errors import CheckpointError, ConfigError
from .linear import FP8Linear
from .scaling import FP8_DTYPE
from .surgery import QuantReport

__all__ = ["FORMAT_VERSION", "save_quantized", "load_quantized", "read_quantization_config", "atomic_directory"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


# --------------------------------------------------------------------------- writing


class atomic_directory:
    """Context manager giving a temporary sibling of `path` that replaces `path` only on success.

    An existing non-empty `path` is refused unless `overwrite`; on error the temporary directory
    is removed and `path` is left as it was.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"{self.path}: exists and is not a directory")
        if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise CheckpointError(f"{self.path}: directory exists and is not empty; pass overwrite=True to replace it")
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot create the output directory: {exc}") from exc
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
        if self.path.exists():
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)


def _quantization_config(model: nn.Module, config: QuantConfig) -> dict[str, Any]:
    ignored = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    qc: dict[str, Any] = {
        "quant_method": "fp8",
        "activation_scheme": config.activation,
        "ignored_layers": ignored,
    }
    if any(hasattr(m, "k_scale") for m in model.modules()):
        qc["kv_cache_scheme"] = "static"
    qc["fp8kit"] = {"format_version": FORMAT_VERSION, "config": config.to_dict()}
    return qc


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied / shared tensors stored once (first name wins), contiguous, on CPU."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:
            raise CheckpointError(f"tensor {name} is on the meta device (offloaded?); materialize it before saving")
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            logger.debug("not storing %s: shares storage with %s", name, seen[key])
            continue
        seen[key] = name
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `model` (quantized by `fp8kit.core.quantize`) as an AutoFP8 / vLLM "fp8" checkpoint.

    Atomic: everything goes to a temporary sibling directory renamed to `path` at the end. Per-channel
    weight scales cannot be expressed in this format and are refused.
    """
    config: QuantConfig | None = getattr(model, "fp8kit_config", None)
    if config is None:
        raise CheckpointError("save_quantized: the model was not quantized with fp8kit.core.quantize")
    if config.weight == "channel":
        raise CheckpointError(
            "save_quantized: per-channel weight scales cannot be written in the AutoFP8 / vLLM 'fp8' format "
            "(it holds one scale per weight; vLLM would misread [N,1] scales). Quantize with weight='tensor', or use "
            "the compressed-tensors 'float-quantized' format (planned; not yet implemented)"
        )
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        raise CheckpointError("save_quantized: the model has no Hugging Face `config`; only transformers models can be saved")
    config_dict = hf_config.to_dict()
    config_dict.pop("quantization_config", None)
    if not config_dict.get("architectures"):
        config_dict["architectures"] = [type(model).__name__]
    config_dict["quantization_config"] = _quantization_config(model, config)
    tensors = _unique_tensors(model)

    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str))
        _write_shards(tensors, tmp, max_shard_bytes)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("saved FP8 checkpoint to %s (%d tensors)", path, len(tensors))
    return Path(path)


# --------------------------------------------------------------------------- reading


def read_quantization_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config.json as a dict without quantization_config, the quantization_config or None)."""
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: not found; a checkpoint directory needs a config.json")
    try:
        config_dict = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not readable JSON: {exc}") from exc
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    return config_dict, config_dict.pop("quantization_config", None)


def _quant_config_from(qc: dict[str, Any], where: Path) -> QuantConfig:
    if qc.get("quant_method") != "fp8":
        raise CheckpointError(
            f"{where}: quantization_config.quant_method is {qc.get('quant_method')!r}; fp8kit reads the 'fp8' format"
        )
    ours = qc.get("fp8kit")
    try:
        if ours is not None:
            version = ours.get("format_version")
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise CheckpointError(
                    f"{where}: fp8kit format_version {version!r} is newer than this fp8kit reads ({FORMAT_VERSION})"
                )
            return QuantConfig.from_dict(ours["config"])
        return QuantConfig(activation=qc.get("activation_scheme", "dynamic"), ignore=tuple(qc.get("ignored_layers", [])))
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: invalid quantization_config: {exc}") from exc


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    index_path = path / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a valid safetensors index: {exc}") from exc
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_NAME).is_file():
        weight_map, files = None, [WEIGHTS_NAME]
    else:
        pickles = [name for name in _PICKLE_NAMES if (path / name).exists()]
        hint = f" (found {pickles}: fp8kit never loads pickles; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}{hint}")

    tensors: dict[str, torch.Tensor] = {}
    for filename in files:
        file = path / filename
        if not file.is_file():
            raise CheckpointError(f"{file}: missing; {INDEX_NAME} names it as a shard")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if weight_map is not None and weight_map.get(key) != filename:
                        raise CheckpointError(f"{file}: tensor {key} is not listed for this file in {INDEX_NAME}")
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{path}: tensors {absent[:5]} listed in {INDEX_NAME} are missing from their shards")
    return tensors


def _build_model(config_dict: dict[str, Any], where: Path, trust_remote_code: bool) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights

    architectures = config_dict.get("architectures") or []
    model_type = config_dict.get("model_type")
    if not architectures or not model_type:
        raise CheckpointError(f"{where / CONFIG_NAME}: needs 'architectures' and 'model_type' to rebuild the model")
    cls = getattr(transformers, architectures[0], None)
    try:
        kwargs = {k: v for k, v in config_dict.items() if k != "model_type"}
        hf_config = transformers.AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{where / CONFIG_NAME}: model_type {model_type!r} unknown to transformers: {exc}") from exc
    # Parameters on the meta device (filled from the file below); buffers such as RoPE's inv_freq stay real.
    with init_empty_weights(include_buffers=False):
        if cls is not None:
            return cls._from_config(hf_config)
        if not trust_remote_code:
            raise CheckpointError(
                f"{where / CONFIG_NAME}: architecture {architectures[0]!r} is not in transformers; "
                "pass trust_remote_code=True only if you trust the code that comes with this checkpoint"
            )
        return transformers.AutoModelForCausalLM.from_config(hf_config, trust_remote_code=True)


def _swap_in_fp8_layers(model: nn.Module, tensors: dict[str, torch.Tensor], config: QuantConfig, where: Path) -> list[str]:
    modules = dict(model.named_modules())
    quantized = []
    for key, tensor in tensors.items():
        if not key.endswith(".weight") or tensor.dtype != FP8_DTYPE:
            continue
        name = key[: -len(".weight")]
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{where}: tensor {key} is FP8 but {name!r} is not an nn.Linear of the model")
        if tuple(tensor.shape) != (linear.out_features, linear.in_features):
            raise CheckpointError(
                f"{where}: tensor {key} has shape {tuple(tensor.shape)}, the model's layer expects "
                f"{(linear.out_features, linear.in_features)} (config.json does not match the weights)"
            )
        scale = tensors.get(f"{name}.weight_scale")
        if scale is None:
            raise CheckpointError(f"{where}: tensor {name}.weight_scale is missing for FP8 weight {key}")
        bias = tensors.get(f"{name}.bias")
        new = FP8Linear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_granularity="channel" if scale.numel() > 1 else "tensor",
            activation="static" if f"{name}.input_scale" in tensors else "dynamic",
            activation_granularity=config.activation_granularity,
            use_fast_accum=config.use_fast_accum,
            device="meta",
            dtype=bias.dtype if bias is not None else torch.float32,
        )
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new)
        quantized.append(name)
    for key in tensors:
        if key.endswith((".k_scale", ".v_scale")):
            owner = modules.get(key.rpartition(".")[0])
            if owner is None:
                raise CheckpointError(f"{where}: tensor {key} names no module of the model")
            owner.register_buffer(key.rpartition(".")[2], torch.empty((), device="meta"))
    return quantized


def load_quantized(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", trust_remote_code: bool = False
) -> nn.Module:
    """Rebuild a model saved by `save_quantized` (or AutoFP8) with `FP8Linear` layers, outputs bit-identical.

    The class named in `config.architectures` is built from config.json without its
    quantization_config (else transformers' own fp8 integration would take over), then every tensor is
    loaded from safetensors. A missing, unexpected or mis-shaped tensor is an error naming it.
    """
    where = Path(path)
    if not where.is_dir():
        raise CheckpointError(f"{where}: not a checkpoint directory")
    config_dict, qc = read_quantization_config(where)
    if qc is None:
        raise CheckpointError(f"{where / CONFIG_NAME}: has no quantization_config; this is not an FP8 checkpoint")
    config = _quant_config_from(qc, where)
    tensors = _read_tensors(where)
    model = _build_model(config_dict, where, trust_remote_code)
    quantized = _swap_in_fp8_layers(model, tensors, config, where)

    expected = model.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}: tensors {unexpected[:5]} (of {len(unexpected)}) are not in the model")
    mismatched = []
    for key, tensor in tensors.items():
        want = expected[key].shape
        if tensor.shape != want:
            if tensor.numel() == 1 and want.numel() == 1:  # AutoFP8 writes some scalars as [1]
                tensors[key] = tensor.reshape(want)
            else:
                mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(want)}")
    if mismatched:
        raise CheckpointError(f"{where}: shape mismatch (config.json does not match the weights): {mismatched[:5]}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = sorted(
        name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta
    )
    if missing:
        raise CheckpointError(f"{where}: tensors {missing[:5]} (of {len(missing)}) are missing from the checkpoint")
    model.to(device).eval()
    model.fp8kit_config = config
    skipped = {n: "stored in high precision" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    model.fp8kit_report = QuantReport(quantized=quantized, skipped=skipped)
    return model
