"""Checkpoint I/O in the formats vLLM reads (REFERENCE §3), written atomically, read without pickles.

Layout of a checkpoint directory:
    config.json         the model's config + ``quantization_config`` (below)
    model.safetensors   or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer files     when a tokenizer is given

format="fp8" (AutoFP8 / vLLM): ``quantization_config = {"quant_method": "fp8", "activation_scheme":
"static"|"dynamic", "ignored_layers": [...], "kv_cache_scheme": "static" (only with KV scales),
"fp8kit": {"format_version": 1, "config": QuantConfig.to_dict()}}``. Tensors: ``<layer>.weight``
F8_E4M3 [N,K]; ``<layer>.weight_scale`` F32 []; ``<layer>.input_scale`` F32 [] (static only);
``<attn>.k_scale`` / ``<attn>.v_scale`` F32 []; everything else in its original dtype.
Per-tensor weights only.

format="compressed-tensors" (llm-compressor's "float-quantized", read by vLLM, SGLang and
transformers): ``quantization_config = {"quant_method": "compressed-tensors", "format":
"float-quantized", "quantization_status": "compressed", "config_groups": {"group_0": {"targets":
["Linear"], "weights": args, "input_activations": args, ...}}, "ignore": [...], "kv_cache_scheme":
args | null, "fp8kit": {...}}`` where each ``args`` is a compressed-tensors QuantizationArgs (num_bits 8,
type "float", symmetric, strategy "tensor" | "channel" | "token", dynamic). Same tensor names as
"fp8", with scales F32 [1] (per tensor) or [N,1] (per channel); dynamic activations store no input_scale.

`load_quantized` reads both, including checkpoints of AutoFP8 and llm-compressor; schemes FP8Linear
cannot run (int, group / block strategies, asymmetric, packed formats) are refused by name.
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
from .files import INDEX_NAME, check_safetensors_dir, exchange_paths, read_index
from .offload import offloaded_tensor
from .scaling import FP8_DTYPE
from .surgery import QuantReport

__all__ = [
    "FORMAT_VERSION",
    "FORMATS",
    "check_format",
    "save_quantized",
    "load_quantized",
    "read_quantization_config",
    "quantization_config_dict",
    "layer_tensors",
    "kv_scale_shape",
    "atomic_directory",
    "build_meta_model",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FORMATS = ("fp8", "compressed-tensors")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


# --------------------------------------------------------------------------- writing


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


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
            self._remove_stale_siblings()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot create the output directory: {exc}") from exc
        return self.tmp

    def _remove_stale_siblings(self) -> None:
        """Remove `.<name>.tmp-<pid>` / `.<name>.old-<pid>` left by a killed process (its pid is gone)."""
        for kind in ("tmp", "old"):
            for stale in self.path.parent.glob(f".{self.path.name}.{kind}-*"):
                pid = stale.name.rpartition("-")[2]
                if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                    logger.info("removing %s, left by a process that no longer runs", stale)
                    shutil.rmtree(stale, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.path.is_dir() and exchange_paths(self.tmp, self.path):  # one atomic swap: never without `path`
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
        if self.path.exists():
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)


_CT_FORMAT = "float-quantized"


def _ct_args(strategy: str, dynamic: bool) -> dict[str, Any]:
    """One compressed-tensors ``QuantizationArgs`` block: symmetric FP8 E4M3 (num_bits 8, type float)."""
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": None,
        "strategy": strategy,
        "block_structure": None,
        "dynamic": dynamic,
        "actorder": None,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
    }


def quantization_config_dict(
    config: QuantConfig, ignored_layers: list[str], kv_cache: bool, format: str = "fp8"
) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for a model quantized with `config`.

    ignored_layers: exact names of the nn.Linear modules left in high precision.
    kv_cache: the checkpoint holds per-attention ``k_scale`` / ``v_scale`` tensors.
    format: "fp8" (AutoFP8 / vLLM; per-tensor weights only) or "compressed-tensors"
        ("float-quantized", REFERENCE §3). Both carry an ``fp8kit`` block (format_version and
        the full QuantConfig) so that `load_quantized` restores the exact configuration.
    """
    check_format(format)
    ours = {"format_version": FORMAT_VERSION, "config": config.to_dict()}
    if format == "fp8":
        if config.weight == "channel":
            raise CheckpointError(
                "save_quantized: per-channel weight scales cannot be written in the AutoFP8 / vLLM 'fp8' format "
                "(it holds one scale per weight; vLLM would misread [N,1] scales). Quantize with weight='tensor', "
                "or save with format='compressed-tensors'"
            )
        qc: dict[str, Any] = {
            "quant_method": "fp8",
            "activation_scheme": config.activation,
            "ignored_layers": list(ignored_layers),
        }
        if kv_cache:
            qc["kv_cache_scheme"] = "static"
        qc["fp8kit"] = ours
        return qc
    if config.activation == "static":
        activations = _ct_args("tensor", dynamic=False)
    else:
        activations = _ct_args(config.activation_granularity, dynamic=True)
    return {
        "quant_method": "compressed-tensors",
        "format": _CT_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _ct_args(config.weight, dynamic=False),
                "input_activations": activations,
                "output_activations": None,
                "format": _CT_FORMAT,
            }
        },
        "ignore": list(ignored_layers),
        "kv_cache_scheme": _ct_args("tensor", dynamic=False) if kv_cache else None,
        "global_compression_ratio": None,
        "fp8kit": ours,
    }


def check_format(format: str) -> None:
    """Raise CheckpointError unless `format` is one of `FORMATS`."""
    if format not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}; choose one of {list(FORMATS)}")


def layer_tensors(
    name: str,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    format: str = "fp8",
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear `name` (bias excluded; it is stored as is).

    weight: float8_e4m3fn [N, K]. weight_scale: fp32, one element (per tensor) or [N, 1] (per
    channel). input_scale: fp32, one element (static activations) or None (dynamic: not stored).
    Returns ``{name.weight, name.weight_scale[, name.input_scale]}`` with scales shaped [] for
    "fp8" and [1] (per tensor) / [N, 1] (per channel) for "compressed-tensors"; values unchanged.
    """
    check_format(format)
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise CheckpointError(f"{name}.weight: expected float8_e4m3fn [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n = weight.shape[0]
    per_channel = weight_scale.numel() != 1
    if per_channel and tuple(weight_scale.shape) not in ((n, 1), (n,)):
        raise CheckpointError(
            f"{name}.weight_scale: shape {tuple(weight_scale.shape)} is neither one element nor [N, 1] = [{n}, 1]"
        )
    if per_channel and format == "fp8":
        raise CheckpointError(
            f"{name}.weight_scale: per-channel scales [{n}, 1] cannot be written in the AutoFP8 / vLLM 'fp8' "
            "format; save with format='compressed-tensors'"
        )
    scalar_shape: tuple[int, ...] = () if format == "fp8" else (1,)
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
    check_format(format)
    return () if format == "fp8" else (1,)


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


# safetensors dtype names (little-endian); every dtype fp8kit reads or writes.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    **{getattr(torch, n): s for n, s in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")) if hasattr(torch, n)},
}
_COPY_CHUNK = 16 * 2**20  # bytes per read / write when copying between files without copy_file_range


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor (no copy when it is contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)  # (numel,)
    return memoryview(flat.view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class SafetensorsWriter:
    """One safetensors file written incrementally, never holding more than the piece being written.

    The header (every tensor's name, dtype and shape) is written first; each tensor's bytes then go to
    their offset, in any order and in pieces (`write`, `copy_from`). Tensors are laid out by decreasing
    element size, then name (as the `safetensors` package does), so each is aligned to its element size;
    the header is padded with spaces to a multiple of 8 bytes. `close` checks every byte was written.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        self.nbytes: dict[str, int] = {}
        begin = 0
        for name, dtype, shape in sorted(specs, key=lambda s: (-s[1].itemsize, s[0])):
            if dtype not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name}: dtype {dtype} cannot be stored in safetensors")
            if name in self.nbytes or name == "__metadata__":
                raise CheckpointError(f"{self.path}: tensor name {name!r} is used twice or reserved")
            numel = 1
            for dim in shape:
                numel *= int(dim)
            end = begin + numel * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [int(d) for d in shape], "data_offsets": [begin, end]}
            self.nbytes[name] = end - begin
            begin = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self._offsets = {name: self.data_start + h["data_offsets"][0] for name, h in header.items() if name != "__metadata__"}
        self._written = dict.fromkeys(self.nbytes, 0)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _pwrite_all(self._fd, memoryview(len(raw).to_bytes(8, "little") + raw), 0)
            os.ftruncate(self._fd, self.data_start + begin)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot write: {exc}") from exc

    def _claim(self, name: str, start: int, length: int) -> int:
        if name not in self.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name} is not in this file's header")
        if start < 0 or start + length > self.nbytes[name]:
            raise CheckpointError(
                f"{self.path}: tensor {name}: bytes [{start}, {start + length}) are outside its {self.nbytes[name]} bytes"
            )
        self._written[name] += length
        return self._offsets[name] + start

    def write(self, name: str, data: torch.Tensor, start: int = 0) -> None:
        """Write the bytes of the CPU tensor `data` at byte `start` of tensor `name` (whole or a piece)."""
        view = _tensor_bytes(data)
        offset = self._claim(name, start, len(view))
        try:
            _pwrite_all(self._fd, view, offset)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot write tensor {name}: {exc}") from exc

    def copy_from(self, name: str, src_fd: int, src_offset: int) -> None:
        """Copy all bytes of tensor `name` from the open file `src_fd` at byte `src_offset` (kernel-side when possible)."""
        length = self.nbytes[name] if name in self.nbytes else 0
        dst = self._claim(name, 0, length)
        done = 0
        try:
            if hasattr(os, "copy_file_range"):
                try:
                    while done < length:
                        n = os.copy_file_range(src_fd, self._fd, length - done, src_offset + done, dst + done)
                        if n == 0:
                            break
                        done += n
                except OSError:  # e.g. EXDEV / ENOSYS on some file systems: copy through a buffer
                    pass
            while done < length:
                chunk = os.pread(src_fd, min(_COPY_CHUNK, length - done), src_offset + done)
                if not chunk:
                    break
                _pwrite_all(self._fd, memoryview(chunk), dst + done)
                done += len(chunk)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot write tensor {name}: {exc}") from exc
        if done < length:
            raise CheckpointError(f"{self.path}: tensor {name}: source ended after {done} of {length} bytes")

    def close(self) -> None:
        """Close the file; an error names the tensors not (fully) written."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        incomplete = [n for n, size in self.nbytes.items() if self._written[n] != size]
        if incomplete:
            raise CheckpointError(f"{self.path}: tensors {incomplete[:5]} (of {len(incomplete)}) were not fully written")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pack_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped in order into shards of at most `max_shard_bytes` (a larger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _shard_names(count: int) -> list[str]:
    """File names of `count` shards: model.safetensors, or model-0000i-of-0000n.safetensors."""
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    sizes = [(name, t.numel() * t.element_size()) for name, t in tensors.items()]
    shards = _pack_shards(sizes, max_shard_bytes)
    files = _shard_names(len(shards))
    for filename, names in zip(files, shards):
        specs = [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
        with SafetensorsWriter(directory / filename, specs, {"format": "pt"}) as writer:
            for n in names:
                writer.write(n, tensors[n].detach().to("cpu"))
    if len(shards) > 1:
        weight_map = {n: f for f, names in zip(files, shards) for n in names}
        _write_index(directory, weight_map, sum(size for _, size in sizes))


def _checkpoint_tensors(model: nn.Module, format: str) -> dict[str, torch.Tensor]:
    """The tensors to store for `model` in `format` (scale shapes per `layer_tensors` / `kv_scale_shape`)."""
    tensors = _unique_tensors(model)
    kv_shape = kv_scale_shape(format)
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            for key, tensor in layer_tensors(
                name, tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"], tensors.get(f"{name}.input_scale"), format
            ).items():
                if key in tensors:
                    tensors[key] = tensor
        for attr in ("k_scale", "v_scale"):
            key = f"{name}.{attr}" if name else attr
            if isinstance(getattr(module, attr, None), torch.Tensor) and key in tensors:
                tensors[key] = tensors[key].float().reshape(kv_shape)
    return tensors


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    format: str = "fp8",
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `model` (quantized by `fp8kit.core.quantize`) as a checkpoint vLLM reads.

    format: "fp8" (AutoFP8 / vLLM; per-tensor weights only: per-channel weights are refused) or
        "compressed-tensors" (llm-compressor's "float-quantized"; every fp8kit scheme).
    Atomic: everything goes to a temporary sibling directory renamed to `path` at the end.
    """
    check_format(format)
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
    ignored = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    kv_cache = any(isinstance(getattr(m, "k_scale", None), torch.Tensor) for m in model.modules())
    config_dict["quantization_config"] = quantization_config_dict(config, ignored, kv_cache, format)
    tensors = _checkpoint_tensors(model, format)

    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str))
        _write_shards(tensors, tmp, max_shard_bytes)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("saved FP8 checkpoint (%s format) to %s (%d tensors)", format, path, len(tensors))
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


def _fp8kit_block(qc: dict[str, Any], where: Path) -> QuantConfig | None:
    """The exact QuantConfig from the ``fp8kit`` block fp8kit writes, or None for other tools' checkpoints."""
    ours = qc.get("fp8kit")
    if ours is None:
        return None
    try:
        version = ours.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: fp8kit format_version {version!r} is newer than this fp8kit reads ({FORMAT_VERSION})"
            )
        return QuantConfig.from_dict(ours["config"])
    except (ConfigError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where}: invalid quantization_config.fp8kit: {exc}") from exc


def _quant_config_from(qc: dict[str, Any], where: Path) -> QuantConfig:
    """The QuantConfig of a checkpoint's quantization_config ("fp8" or compressed-tensors); `where` is config.json."""
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _quant_config_from_ct(qc, where)
    if method != "fp8":
        raise CheckpointError(
            f"{where}: quantization_config.quant_method is {method!r}; fp8kit reads the 'fp8' (AutoFP8 / vLLM) "
            "and 'compressed-tensors' (float-quantized) formats"
        )
    ours = _fp8kit_block(qc, where)
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


_CT_READABLE_FORMATS = ("float-quantized", "naive-quantized")


def _ct_check_args(args: Any, where: Path, field: str, strategies: tuple[str, ...]) -> tuple[str, bool]:
    """(strategy, dynamic) of a compressed-tensors QuantizationArgs dict that fp8kit can run, else CheckpointError."""
    fix = (
        "fp8kit reads symmetric 8-bit float (FP8 E4M3) quantization: weights per tensor or per channel, "
        "activations dynamic per tensor / per token or static per tensor"
    )
    if not isinstance(args, dict):
        raise CheckpointError(f"{where}: quantization_config.{field} must be an object, got {args!r}")
    problems = []
    if args.get("num_bits", 8) != 8:
        problems.append(f"num_bits={args.get('num_bits')!r}")
    if str(args.get("type", "int")).lower() != "float":
        problems.append(f"type={args.get('type', 'int')!r}")
    if not args.get("symmetric", True):
        problems.append("symmetric=false (asymmetric, with zero points)")
    strategy = args.get("strategy")
    if strategy is None:  # compressed-tensors infers it from group_size
        strategy = {None: "tensor", -1: "channel"}.get(args.get("group_size"), "group")
    strategy = str(strategy).lower()
    if strategy not in strategies:
        problems.append(f"strategy={strategy!r}")
    group_size = args.get("group_size")
    if group_size not in (None, -1) and strategy != "group":
        problems.append(f"group_size={group_size!r}")
    if args.get("block_structure") is not None:
        problems.append(f"block_structure={args.get('block_structure')!r}")
    dynamic = args.get("dynamic", False)
    if not isinstance(dynamic, bool):
        problems.append(f"dynamic={dynamic!r}")
    elif strategy == "token" and not dynamic:
        problems.append("static per-token strategy")
    if problems:
        raise CheckpointError(f"{where}: quantization_config.{field} has unsupported {', '.join(problems)}; {fix}")
    return strategy, bool(dynamic)


def _quant_config_from_ct(qc: dict[str, Any], where: Path) -> QuantConfig:
    """QuantConfig of a compressed-tensors quantization_config, refusing what FP8Linear cannot run."""
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise CheckpointError(
            f"{where}: quantization_config.quantization_status is {status!r}; fp8kit reads 'compressed' checkpoints "
            "(FP8 weights on disk)"
        )
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and sparsity.get("format", "dense") != "dense":
        raise CheckpointError(f"{where}: quantization_config.sparsity_config {sparsity!r} is not supported by fp8kit")
    if qc.get("transform_config"):
        raise CheckpointError(
            f"{where}: quantization_config.transform_config is set (rotations / Hadamard transforms); "
            "fp8kit does not apply transforms"
        )
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{where}: quantization_config.config_groups must be a non-empty object")
    default_format = qc.get("format") or "float-quantized"
    schemes: dict[str, tuple[str, str, str]] = {}
    for group, scheme in groups.items():
        field = f"config_groups.{group}"
        if not isinstance(scheme, dict):
            raise CheckpointError(
                f"{where}: quantization_config.{field} is {scheme!r}; fp8kit needs the expanded scheme "
                "(targets / weights / input_activations), not a preset name"
            )
        fmt = scheme.get("format") or default_format
        if fmt not in _CT_READABLE_FORMATS:
            raise CheckpointError(
                f"{where}: quantization_config.{field} uses format {fmt!r}; fp8kit reads the unpacked "
                f"{' / '.join(repr(f) for f in _CT_READABLE_FORMATS)} formats"
            )
        weight, _ = _ct_check_args(scheme.get("weights"), where, f"{field}.weights", ("tensor", "channel"))
        if scheme.get("input_activations") is None:
            raise CheckpointError(
                f"{where}: quantization_config.{field} quantizes weights only (input_activations is null); "
                "fp8kit runs FP8 weights with FP8 activations (W8A8) only"
            )
        act, dynamic = _ct_check_args(scheme["input_activations"], where, f"{field}.input_activations", ("tensor", "token"))
        if scheme.get("output_activations") is not None:
            raise CheckpointError(f"{where}: quantization_config.{field}.output_activations is not supported by fp8kit")
        schemes[group] = (weight, "dynamic" if dynamic else "static", act)
    if len(set(schemes.values())) > 1:
        raise CheckpointError(
            f"{where}: quantization_config.config_groups mix schemes {schemes}; fp8kit applies one scheme to the model"
        )
    kv = qc.get("kv_cache_scheme")
    if kv is not None:
        _, kv_dynamic = _ct_check_args(kv, where, "kv_cache_scheme", ("tensor",))
        if kv_dynamic:
            raise CheckpointError(f"{where}: quantization_config.kv_cache_scheme is dynamic; fp8kit reads static KV scales")
    ours = _fp8kit_block(qc, where)
    if ours is not None:
        return ours
    weight, activation, granularity = next(iter(schemes.values()))
    try:
        return QuantConfig(
            weight=weight,
            activation=activation,
            activation_granularity=granularity,
            ignore=tuple(qc.get("ignore") or ()),
            kv_cache=kv is not None,
        )
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{where}: invalid quantization_config: {exc}") from exc


_SCALE_SUFFIXES = (".weight_scale", ".input_scale", ".k_scale", ".v_scale")
_ZERO_POINT_SUFFIXES = (".weight_zero_point", ".input_zero_point", ".k_zero_point", ".v_zero_point")


def _normalize_tensors(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Map other tools' layouts onto fp8kit's: scales to fp32 (exact), [N] channel scales to [N, 1],
    AutoFP8's ``k_proj.output_scale`` to ``k_scale``, all-zero symmetric zero points dropped."""
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


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
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
    for filename, listed in by_file.items():
        file = path / filename
        allowed = None if listed is None else set(listed)
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if allowed is not None and key not in allowed:
                        raise CheckpointError(f"{file}: tensor {key} is not listed for this file in {INDEX_NAME}")
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
    return tensors


def build_meta_model(config_dict: dict[str, Any], where: Path, trust_remote_code: bool) -> nn.Module:
    """The model class config.json names, built from `config_dict` with parameters on the meta device."""
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
                "pass trust_remote_code=True only if you trust the code that comes with this checkpoint "
                "(--trust-remote-code in the CLIs)"
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
        if config.activation == "static" and f"{name}.input_scale" not in tensors:
            raise CheckpointError(
                f"{where}: tensor {name}.input_scale is missing; quantization_config declares static activations"
            )
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
    """Rebuild a model saved by `save_quantized` (either format), AutoFP8 or llm-compressor (FP8
    "float-quantized") with `FP8Linear` layers; for fp8kit's own checkpoints, outputs are bit-identical.

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
    config = _quant_config_from(qc, where / CONFIG_NAME)
    tensors = _normalize_tensors(_read_tensors(where), where)
    model = build_meta_model(config_dict, where, trust_remote_code)
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
