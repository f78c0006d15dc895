"""`load_quantized`: a checkpoint directory (fp8kit's, AutoFP8's or llm-compressor's) -> a model with FP8 layers.

Reads safetensors only (never pickles); every missing, unexpected or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import CheckpointError
from ..files import INDEX_NAME, check_config_dict, check_safetensors_dir, read_index, read_json
from ..linear import FP8Linear
from ..offload import dispatch, resolve_device
from ..scaling import FP8_DTYPE
from ..surgery import QuantReport
from .formats import check_block_scale, parse_quantization_config
from .moe import experts_from_disk
from .writer import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["load_quantized", "read_quantization_config", "build_meta_model", "check_fp8_tensors", "CONFIG_ERRORS"]

logger = logging.getLogger(__name__)

_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


def read_quantization_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config.json as a dict without quantization_config, the quantization_config or None).

    config.json must be a regular file holding a JSON object whose model fields have sane types and
    values (`files.check_config_dict`); anything else is a `CheckpointError` naming the file and field.
    """
    config_path = Path(path) / CONFIG_NAME
    if not os.path.lexists(config_path):
        raise CheckpointError(f"{config_path}: not found; a checkpoint directory needs a config.json")
    config_dict = check_config_dict(read_json(config_path, "config.json"), config_path)
    return config_dict, config_dict.pop("quantization_config", None)


_SCALE_SUFFIXES = (".weight_scale", ".input_scale", ".k_scale", ".v_scale")
_BLOCK_SCALE_SUFFIX = ".weight_scale_inv"  # the "fp8" format's block scales (a multiplier despite the name)
_ZERO_POINT_SUFFIXES = (".weight_zero_point", ".input_zero_point", ".k_zero_point", ".v_zero_point")


def _normalize_tensors(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Map other tools' layouts onto fp8kit's: scales to fp32 (exact), [N] channel scales to [N, 1],
    block scales ``weight_scale_inv`` to ``weight_scale``, AutoFP8's ``k_proj.output_scale`` to ``k_scale``,
    all-zero symmetric zero points dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.endswith(_ZERO_POINT_SUFFIXES):
            if tensor.numel() and bool((tensor.float() != 0).any()):
                raise CheckpointError(
                    f"{where}: tensor {key} holds non-zero zero points (asymmetric quantization); "
                    "fp8kit reads symmetric FP8 only"
                )
            logger.debug("dropping all-zero zero point %s", key)
            continue
        if key.endswith(_BLOCK_SCALE_SUFFIX):
            key = key[: -len(_BLOCK_SCALE_SUFFIX)] + ".weight_scale"
        for proj, kv in ((".k_proj.output_scale", ".k_scale"), (".v_proj.output_scale", ".v_scale")):
            if key.endswith(proj):  # AutoFP8's KV-cache scales, as vLLM remaps them
                key = key[: -len(proj)] + kv
        if key.endswith(_SCALE_SUFFIXES):
            if not tensor.is_floating_point() or tensor.dtype == FP8_DTYPE:
                raise CheckpointError(f"{where}: tensor {key} has dtype {tensor.dtype}; scales must be float")
            tensor = tensor.float()
        if key.endswith(".weight_scale") and tensor.dim() == 1 and tensor.numel() > 1:
            tensor = tensor.reshape(-1, 1)  # [N] -> [N, 1]
        if key in out:
            raise CheckpointError(f"{where}: tensor {key} is stored twice (under two names)")
        out[key] = tensor
    return out


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """({tensor name: tensor}, {tensor name: the file holding it}) of the checkpoint in `path`."""
    from safetensors import SafetensorError, safe_open

    by_file: dict[str, list[str] | None] | None = read_index(path)  # a bad index or missing shard: named
    if by_file is None:
        if not (path / WEIGHTS_NAME).is_file():
            pickles = [name for name in _PICKLE_NAMES if (path / name).exists()]
            hint = f" (found {pickles}: fp8kit never loads pickles; convert them to safetensors)" if pickles else ""
            raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}{hint}")
        by_file = {WEIGHTS_NAME: None}
    # Headers only: a truncated / corrupt shard, or one lacking a tensor the index puts in it, is named.
    check_safetensors_dir(path)

    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, Path] = {}
    for filename, listed in by_file.items():
        file = path / filename
        allowed = None if listed is None else set(listed)
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if allowed is not None and key not in allowed:
                        raise CheckpointError(f"{file}: tensor {key} is not listed for this file in {INDEX_NAME}")
                    tensors[key] = f.get_tensor(key)
                    files[key] = file
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
    return tensors, files


def check_fp8_tensors(
    tensors: dict[str, torch.Tensor], file_of: Any, block: tuple[int, int] | None = None
) -> None:
    """Refuse (`CheckpointError` naming the tensor and `file_of(name)`) what would make an FP8 model
    compute garbage: an FP8 weight that is not E4M3 [N, K] or holds NaN codes, a weight without its
    weight_scale, and a scale (weight_scale, input_scale, k_scale, v_scale) that is not float32, not
    finite and > 0 everywhere, or not shaped [] / [1] (per tensor), [N, 1] (a weight's per channel) or,
    with `block` (bn, bk), the weight's block grid (`formats.check_block_scale`).

    `tensors` are in fp8kit's names and dtypes (`_normalize_tensors`). The loader runs it on what it
    read, `save_quantized` on what it is about to write: fp8kit never writes a checkpoint it would
    refuse to load.
    """
    for key, tensor in tensors.items():
        where = f"{file_of(key)}: tensor {key}"
        if tensor.dtype == torch.float8_e5m2:
            raise CheckpointError(f"{where} is float8_e5m2; fp8kit reads FP8 E4M3 (float8_e4m3fn) weights only")
        if key.endswith(".weight") and tensor.dtype == FP8_DTYPE:
            if tensor.dim() != 2:
                raise CheckpointError(f"{where}: an FP8 weight must be 2-D [N, K], got shape {tuple(tensor.shape)}")
            if bool(((tensor.view(torch.uint8) & 0x7F) == 0x7F).any()):  # E4M3 NaN: S.1111.111
                raise CheckpointError(f"{where}: holds NaN codes (0x7f / 0xff); the weight is corrupted")
            name = key[: -len(".weight")]
            if f"{name}.weight_scale" not in tensors:
                raise CheckpointError(f"{file_of(key)}: tensor {name}.weight_scale is missing for FP8 weight {key}")
        if not key.endswith(_SCALE_SUFFIXES):
            continue
        if tensor.dtype != torch.float32:
            raise CheckpointError(f"{where}: a scale must be float32, got {tensor.dtype}")
        shape = tuple(tensor.shape)
        weight = tensors.get(key[: -len("_scale")]) if key.endswith(".weight_scale") else None
        weight_shape = tuple(weight.shape) if weight is not None and weight.dim() == 2 else None
        if block is not None and weight_shape is not None:
            check_block_scale(where, tensor, weight_shape, block)
        elif tensor.numel() != 1 and not (weight_shape is not None and shape == (weight_shape[0], 1)):
            rows = weight_shape[0] if weight_shape is not None else None
            want = "[] or [1]" + (f" (per tensor) or [{rows}, 1] (per channel)" if rows is not None else "")
            raise CheckpointError(f"{where}: scale of shape {list(shape)}; expected {want}")
        elif tensor.numel() == 1 and len(shape) > 1 and not (weight_shape is not None and weight_shape[0] == 1):
            raise CheckpointError(f"{where}: scale of shape {list(shape)}; expected [] or [1]")
        bad = ~(torch.isfinite(tensor) & (tensor > 0))
        if bool(bad.any()):
            index = int(bad.reshape(-1).nonzero()[0])
            value = tensor.reshape(-1)[index].item()
            raise CheckpointError(
                f"{where}: scale {value} (element {index}) is not finite and positive; dequantized values would be garbage"
            )


def _strict_dataclass_errors() -> tuple[type[Exception], ...]:
    try:  # transformers >= 5 validates configs with huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


#: What transformers raises building a config or model from a config.json whose values it cannot use.
CONFIG_ERRORS: tuple[type[Exception], ...] = (
    TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError, RuntimeError,
    *_strict_dataclass_errors(),
)


def build_meta_model(config_dict: dict[str, Any], where: Path, trust_remote_code: bool) -> nn.Module:
    """The model class config.json names, built from `config_dict` with parameters on the meta device."""
    import transformers
    from accelerate import init_empty_weights

    architectures = config_dict.get("architectures") or []
    model_type = config_dict.get("model_type")
    if not architectures or not model_type:
        raise CheckpointError(f"{where / CONFIG_NAME}: needs 'architectures' and 'model_type' to rebuild the model")
    cls = getattr(transformers, architectures[0], None)
    if model_type not in transformers.CONFIG_MAPPING:
        raise CheckpointError(f"{where / CONFIG_NAME}: model_type {model_type!r} unknown to transformers")
    try:
        kwargs = {k: v for k, v in config_dict.items() if k != "model_type"}
        hf_config = transformers.AutoConfig.for_model(model_type, **kwargs)
    except CONFIG_ERRORS as exc:
        raise CheckpointError(f"{where / CONFIG_NAME}: not a valid {model_type} config: {type(exc).__name__}: {exc}") from exc
    # Parameters on the meta device (filled from the file below); buffers such as RoPE's inv_freq stay real.
    with init_empty_weights(include_buffers=False):
        if cls is not None:
            try:
                return cls._from_config(hf_config)
            except CONFIG_ERRORS as exc:  # a field of the right type but a value the model code cannot use
                raise CheckpointError(
                    f"{where / CONFIG_NAME}: transformers cannot build {architectures[0]} from it: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        if not trust_remote_code:
            raise CheckpointError(
                f"{where / CONFIG_NAME}: architecture {architectures[0]!r} is not in transformers; "
                "pass trust_remote_code=True only if you trust the code that comes with this checkpoint "
                "(--trust-remote-code in the CLIs)"
            )
        return transformers.AutoModelForCausalLM.from_config(hf_config, trust_remote_code=True)


def _swap_in_fp8_layers(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    config: QuantConfig,
    where: Path,
    scale_dtypes: dict[str, torch.dtype],
) -> list[str]:
    """Replace each nn.Linear whose weight is FP8 in `tensors` by an FP8Linear on the meta device
    (filled by load_state_dict); `scale_dtypes`: the stored dtype of each ``weight_scale``."""
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
        if config.activation == "static" and f"{name}.input_scale" not in tensors:
            raise CheckpointError(
                f"{where}: tensor {name}.input_scale is missing; quantization_config declares static activations"
            )
        bias = tensors.get(f"{name}.bias")
        if config.weight == "block":
            check_block_scale(f"{where}: tensor {name}.weight_scale", scale, tuple(tensor.shape), config.block_size)
            granularity = "block"
        else:
            granularity = "channel" if scale.numel() > 1 else "tensor"
        new = FP8Linear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_granularity=granularity,
            activation="static" if f"{name}.input_scale" in tensors else "dynamic",
            activation_granularity=config.activation_granularity,
            use_fast_accum=config.use_fast_accum,
            block_size=config.block_size,
            device="meta",
            dtype=bias.dtype if bias is not None else torch.float32,
        )
        if granularity == "block":
            new.scale_dtype = scale_dtypes[f"{name}.weight_scale"]
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
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> nn.Module:
    """Rebuild a model saved by `save_quantized` (either format), AutoFP8 or llm-compressor (FP8
    "float-quantized") with `FP8Linear` layers; for fp8kit's own checkpoints, outputs are bit-identical.

    The class named in `config.architectures` is built from config.json without its
    quantization_config (else transformers' own fp8 integration would take over), then every tensor is
    loaded from safetensors. A missing, unexpected or mis-shaped tensor is an error naming it.
    device_map ("auto", "balanced", "sequential" or {module: device}) with `max_memory` / `offload_folder`
    spreads the model over several GPUs (then CPU, then disk) with accelerate instead of moving it to `device`.
    """
    where = Path(path)
    if not where.is_dir():
        raise CheckpointError(f"{where}: not a checkpoint directory")
    config_dict, qc = read_quantization_config(where)
    if qc is None:
        raise CheckpointError(f"{where / CONFIG_NAME}: has no quantization_config; this is not an FP8 checkpoint")
    config = parse_quantization_config(qc, where / CONFIG_NAME)
    device = resolve_device(device, "load_quantized: device")
    raw, files = _read_tensors(where)
    scale_dtypes = {k.removesuffix("_inv"): t.dtype for k, t in raw.items() if k.endswith((".weight_scale", _BLOCK_SCALE_SUFFIX))}
    tensors = _normalize_tensors(raw, where)
    block = config.block_size if config.weight == "block" else None
    check_fp8_tensors(tensors, lambda key: files.get(key, where), block)  # a renamed tensor: the directory
    model = build_meta_model(config_dict, where, trust_remote_code)
    quantized = experts_from_disk(model, tensors, config_dict.get("model_type"), config, where)  # MoE: per expert
    quantized += _swap_in_fp8_layers(model, tensors, config, where, scale_dtypes)

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
    if device_map is not None:
        dispatch(model, device_map, max_memory=max_memory, offload_folder=offload_folder, where=str(where))
        model.eval()
    else:
        model.to(device).eval()
    model.fp8kit_config = config
    skipped = {n: "stored in high precision" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    model.fp8kit_report = QuantReport(quantized=quantized, skipped=skipped)
    return model
