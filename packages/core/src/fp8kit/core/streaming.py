"""Stream-quantize a safetensors checkpoint tensor by tensor, never materializing the model.

For the schemes that need no calibration (dynamic activations), `quantize_checkpoint` reads each
tensor's bytes straight from its file (the safetensors header is parsed here: an 8-byte
little-endian length, a JSON header, then raw data), quantizes the weights of the selected
`nn.Linear` layers with `fp8kit.core.scaling` on the GPU when there is one, copies every other
tensor byte for byte (kernel-side with ``copy_file_range`` where available), and writes the output
shards incrementally (`checkpoint.SafetensorsWriter`). Peak resident memory is about the largest
quantized weight (its bytes plus its FP8 copy) plus a constant, whatever the model size.

The layer names come from a module tree built on the meta device from config.json, and the
selection is `surgery.select_linears`; the tensors and `quantization_config` written are those of
`quantize()` + `save_quantized()` on the model loaded in its stored dtype (sharding may differ).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import scaling
from .checkpoint import (
    CONFIG_NAME,
    DEFAULT_FORMAT,
    WEIGHTS_NAME,
    SafetensorsWriter,
    atomic_directory,
    build_meta_model,
    check_format,
    layer_tensors,
    quantization_config_dict,
    read_quantization_config,
)
from .checkpoint.formats import warn_partial_blocks
from .checkpoint.moe import disk_expert_linears, disk_renamer, disk_state, ignored_layers
from .checkpoint.writer import SAFETENSORS_DTYPES, pack_shards, shard_names, write_config, write_index
from .config import QuantConfig
from .errors import CheckpointError, ConfigError, ModelLoadError
from .files import INDEX_NAME, check_disjoint, check_safetensors_dir, copy_model_files, read_index, read_safetensors_header
from .offload import resolve_device
from .surgery import select_experts, select_linears, warn_if_outliers

__all__ = [
    "TensorEntry",
    "StreamReport",
    "checkpoint_entries",
    "read_tensor",
    "is_safetensors_checkpoint",
    "quantize_checkpoint",
]

logger = logging.getLogger(__name__)

CPU_CHUNK_ELEMENTS = 2**20  # elements per quantization step on CPU: 4 MiB fp32 temporaries
DEFAULT_SHARD_BYTES = 5 * 2**30
_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
# Files never copied to the output: weights (rewritten), config.json (rewritten) and pickled weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".pkl")
_SKIP_NAMES = {CONFIG_NAME, INDEX_NAME, "pytorch_model.bin.index.json"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are and what they hold.

    offset: absolute byte offset of the data in `file`; nbytes = numel * dtype.itemsize.
    """

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class StreamReport:
    """What `quantize_checkpoint` did. Bytes are of tensor data; seconds are wall time."""

    path: Path
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    tensors_out: int = 0
    shards_out: int = 0
    device: str = "cpu"
    seconds: float = 0.0


# --------------------------------------------------------------------------- reading


def _data_start(file: Path) -> int:
    """Byte offset where the tensor data of safetensors `file` begins (8 + header length)."""
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _file_entries(file: Path) -> dict[str, TensorEntry]:
    """The tensors of `file` from its validated header (`files.read_safetensors_header`)."""
    header = read_safetensors_header(file)
    try:
        start = _data_start(file)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read: {exc}") from exc
    entries = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {name}: dtype {info['dtype']} is not supported here; supported: {sorted(_DTYPES)}")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(name, file, dtype, tuple(info["shape"]), start + begin, end - begin)
    return entries


def checkpoint_entries(directory: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of the safetensors checkpoint in `directory` (single file, or shards + index), in file order.

    Only headers are read. With an index, each shard must exist and hold the tensors the index gives it;
    every error names the file and, where there is one, the tensor.
    """
    path = Path(directory)
    check_safetensors_dir(path)  # the rules of the in-memory path: both accept and refuse the same files
    by_file = read_index(path)
    weight_map = None if by_file is None else {n: f for f, names in by_file.items() for n in names}
    if by_file is None:
        if not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}")
        by_file = {WEIGHTS_NAME: []}

    entries: dict[str, TensorEntry] = {}
    for filename, listed in by_file.items():
        file = path / filename
        found = _file_entries(file)
        if weight_map is not None:
            absent = [n for n in listed if n not in found]
            if absent:
                raise CheckpointError(f"{file}: tensor {absent[0]} is missing; {INDEX_NAME} says this file holds it")
            found = {n: e for n, e in found.items() if weight_map.get(n) == filename}  # as transformers reads it
        entries.update(found)
    return dict(sorted(entries.items(), key=lambda kv: (str(kv[1].file), kv[1].offset)))


def read_tensor(entry: TensorEntry, fd: int | None = None, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor `entry` read into CPU memory (only its own bytes; the file is not mapped).

    fd: an open descriptor of `entry.file` (else opened here). buffer: a CPU uint8 tensor (pinned, for
    fast copies to a GPU) of at least `entry.nbytes`, reused across calls; the returned tensor then views
    it (valid until the next read).
    """
    if buffer is None or buffer.numel() < entry.nbytes:
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    buf = buffer.numpy()
    own = fd is None
    try:
        if own:
            fd = os.open(entry.file, os.O_RDONLY)
        view, done = memoryview(buf), 0  # (nbytes,) uint8
        while done < entry.nbytes:
            n = os.preadv(fd, [view[done:]], entry.offset + done)
            if n == 0:
                raise CheckpointError(f"{entry.file}: tensor {entry.name}: file ended after {done} of {entry.nbytes} bytes")
            done += n
    except OSError as exc:
        raise CheckpointError(f"{entry.file}: tensor {entry.name}: cannot read: {exc}") from exc
    finally:
        if own and fd is not None:
            os.close(fd)
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return buffer[: entry.nbytes].view(entry.dtype).reshape(entry.shape)


def is_safetensors_checkpoint(directory: str | os.PathLike) -> bool:
    """True for a directory with config.json and model.safetensors or model.safetensors.index.json."""
    path = Path(directory)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (
        (path / WEIGHTS_NAME).is_file() or (path / INDEX_NAME).is_file()
    )


# --------------------------------------------------------------------------- planning


@dataclass
class _Out:
    """One output tensor: its name, dtype, shape and how to produce it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: TensorEntry | None  # bytes copied from here (or quantized, for a layer's weight)
    layer: str | None = None  # set on the quantized weight of this layer: its tensors come together
    value: torch.Tensor | None = None  # a buffer of the model missing from the file

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


def _meta_model(src: Path, config_dict: dict[str, Any], trust_remote_code: bool) -> nn.Module:
    model = build_meta_model(config_dict, src, trust_remote_code)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied parameters become one object, as after from_pretrained
    return model


def _plan(
    state: dict[str, torch.Tensor],
    entries: dict[str, TensorEntry],
    targets: list[str],
    config: QuantConfig,
    format: str,
    src: Path,
) -> list[_Out]:
    """The output tensors, in the order of their source bytes (quantized layers keep their tensors together).

    state: the (meta) model's tensors under their on-disk names (`checkpoint.moe.disk_state`); targets:
    on-disk names of the linears to quantize (MoE experts: one per expert and projection part)."""
    aliases: dict[int, list[str]] = {}
    for name, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(name)
    target_weights = {f"{t}.weight": t for t in targets}

    def source_of(name: str) -> TensorEntry | None:
        if name in entries:
            return entries[name]
        return next((entries[a] for a in aliases[id(state[name])] if a in entries), None)

    outs: list[_Out] = []
    stored: set[int] = set()  # ids of non-quantized model tensors already written (ties are stored once)
    missing: list[str] = []
    for name, tensor in state.items():
        entry = source_of(name)
        if entry is None and not (isinstance(tensor, torch.Tensor) and not tensor.is_meta):
            missing.append(name)
            continue
        if entry is not None and tuple(entry.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{entry.file}: tensor {entry.name} has shape {tuple(entry.shape)} but config.json builds "
                f"{name} as {tuple(tensor.shape)} (config.json does not match the weights)"
            )
        layer = target_weights.get(name)
        if layer is not None:
            if entry is None:
                missing.append(name)
                continue
            if not entry.dtype.is_floating_point or entry.dtype.itemsize < 2:
                raise CheckpointError(
                    f"{entry.file}: tensor {entry.name} is {entry.dtype}; quantizing needs fp32 / fp16 / bf16 weights"
                )
            n, k = entry.shape
            meta_weight = torch.empty((n, k), dtype=scaling.FP8_DTYPE, device="meta")
            meta_scale = torch.empty(_scale_shape(config, n, k), dtype=torch.float32, device="meta")
            for key, t in _layer_tensors(layer, meta_weight, meta_scale, config, format, entry.dtype).items():
                outs.append(_Out(key, t.dtype, tuple(t.shape), entry, layer=layer))
            continue
        if entry is None:  # a real (non-persistent-by-accident) buffer the file lacks: write its initial value
            outs.append(_Out(name, tensor.dtype, tuple(tensor.shape), None, value=tensor.detach()))
            continue
        if tensor.numel():
            if id(tensor) in stored:
                logger.debug("not storing %s: tied to a tensor already stored", name)
                continue
            stored.add(id(tensor))
        outs.append(_Out(name, entry.dtype, entry.shape, entry))
    if missing:
        raise CheckpointError(
            f"{src}: tensors {missing[:5]} (of {len(missing)}) of the model built from config.json are missing from "
            "the safetensors files (a layout transformers converts at load time? use the in-memory path, --no-stream)"
        )
    unexpected = [n for n in entries if n not in state]
    if unexpected:
        logger.warning(
            "%s: dropping %d tensors the model does not have (as from_pretrained does): %s",
            src, len(unexpected), unexpected[:5],
        )
    order = {e.name: i for i, e in enumerate(entries.values())}
    outs.sort(key=lambda o: order[o.source.name] if o.source is not None else -1)  # stable: a layer's tensors stay together
    return outs


# --------------------------------------------------------------------------- quantizing


def _scale_shape(config: QuantConfig, n: int, k: int) -> tuple[int, ...]:
    """Shape of the weight scale `config` gives an [N, K] weight: [], [N, 1] or the block grid."""
    if config.weight == "block":
        bn, bk = config.block_size
        return (-(-n // bn), -(-k // bk))
    return (n, 1) if config.weight == "channel" else ()


def _layer_tensors(
    layer: str, weight: torch.Tensor, scale: torch.Tensor, config: QuantConfig, format: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """`layer_tensors` for one streamed layer whose weight was stored in `dtype` (block scales are exact in it)."""
    block = config.block_size if config.weight == "block" else None
    return layer_tensors(layer, weight, scale, None, format, block_size=block, scale_dtype=dtype)


def _block_amax(block: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """``|block|.amax()`` ([] or, rowwise, [rows, 1]) without an ``|block|`` temporary; NaN propagates.

    (Per-block temporaries, stranded behind small live results, grew the heap by a weight's size.)
    """
    low, high = torch.aminmax(block, dim=-1, keepdim=True) if rowwise else torch.aminmax(block)
    return torch.maximum(-low, high)


def _quantize_weight(
    weight_hp: torch.Tensor,
    config: QuantConfig,
    device: torch.device,
    where: str,
    layer: str,
    out_buffer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_fp8 [N,K] on CPU, weight_scale fp32 [] or [N,1] on CPU), equal bit for bit to `FP8Linear.from_linear`.

    On a GPU: `scaling.quantize_weight`, what `from_linear` calls. On CPU: the same torch reference
    math (``amax_to_scale(|w|.amax)``, `scaling.quantize`) in row blocks of about `CPU_CHUNK_ELEMENTS`,
    exact under blocking (max and elementwise ops), so fp32 temporaries stay a few MiB. `out_buffer`
    (uint8, at least N*K bytes) receives the CPU result, reused across calls.
    """
    n, k = weight_hp.shape
    if config.weight == "block":  # the same function as from_linear on `device` (a few weight-sized temporaries)
        w = weight_hp.to(device)
        if not torch.isfinite(w).all():
            raise ModelLoadError(f"layer {layer}: weight {(n, k)} contains NaN or Inf ({where})")
        weight_fp8, scale = scaling.quantize_weight(w, "block", config.block_size)
        warn_if_outliers(layer, w, weight_fp8)
        return weight_fp8.cpu(), scale.cpu()
    if device.type != "cpu":
        w = weight_hp.to(device, non_blocking=True)  # from pinned memory; read again only after the sync below
        if not torch.isfinite(w).all():
            raise ModelLoadError(f"layer {layer}: weight {(n, k)} contains NaN or Inf ({where})")
        weight_fp8, scale = scaling.quantize_weight(w, config.weight)
        warn_if_outliers(layer, w, weight_fp8)
        if out_buffer is not None and out_buffer.numel() >= n * k:
            host = out_buffer[: n * k].view(scaling.FP8_DTYPE).view(n, k)
            return host.copy_(weight_fp8), scale.cpu()
        return weight_fp8.cpu(), scale.cpu()
    rows = max(1, CPU_CHUNK_ELEMENTS // max(k, 1))
    blocks = [slice(i, min(i + rows, n)) for i in range(0, n, rows)]
    channel = config.weight == "channel"
    if n == 0 or k == 0:
        amax = torch.zeros((n, 1) if channel else ())
    elif channel:
        amax = torch.cat([_block_amax(weight_hp[b], rowwise=True) for b in blocks])  # (N, 1)
    else:
        amax = torch.stack([_block_amax(weight_hp[b], rowwise=False) for b in blocks]).amax()  # (); exact in any order
    if not torch.isfinite(amax).all():  # amax propagates NaN, and |inf| = inf
        raise ModelLoadError(f"layer {layer}: weight {(n, k)} contains NaN or Inf ({where})")
    scale = scaling.amax_to_scale(amax.to(weight_hp.dtype))
    if out_buffer is not None and out_buffer.numel() >= n * k:
        weight_fp8 = out_buffer[: n * k].view(scaling.FP8_DTYPE).view(n, k)
    else:
        weight_fp8 = torch.empty((n, k), dtype=scaling.FP8_DTYPE)
    workspace = torch.empty((min(rows, n), k), dtype=torch.float32)  # reused: fresh pages cost more than the math
    for b in blocks:
        scaling.quantize(
            weight_hp[b], scale[b] if channel else scale, out=weight_fp8[b], workspace=workspace[: b.stop - b.start]
        )
    warn_if_outliers(layer, weight_hp, weight_fp8)
    return weight_fp8, scale


def _check_config(config: QuantConfig, format: str) -> None:
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"quantize_checkpoint: config must be a QuantConfig, got {type(config).__name__}")
    if config.activation == "static" or config.kv_cache:
        what = "activation='static'" if config.activation == "static" else "kv_cache=True"
        raise ConfigError(
            f"quantize_checkpoint: {what} needs calibration, which streaming cannot do; load the model and use "
            "fp8kit.core.quantize + save_quantized (the CLI's in-memory path, --no-stream)"
        )
    if config.algorithm != "max" or config.smoothing is not None:
        raise ConfigError(
            f"quantize_checkpoint: algorithm={config.algorithm!r} / smoothing={config.smoothing!r}: streaming rounds "
            "with max scales only; load the model and use fp8kit.core.quantize + save_quantized (the CLI's "
            "in-memory path, --no-stream)"
        )
    check_format(format)


def _copy_other_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation_config and other top-level non-weight files (never pickles or weights), as
    regular files only (`files.copy_model_files`: no symlink out of `src`, no FIFO or device)."""

    def exclude(name: str) -> bool:
        return name in _SKIP_NAMES or name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")

    copy_model_files(src, dst, exclude)


def quantize_checkpoint(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: QuantConfig | None = None,
    *,
    format: str = DEFAULT_FORMAT,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> StreamReport:
    """Quantize the safetensors checkpoint `src_dir` to FP8 in `out_dir`, tensor by tensor; returns a `StreamReport`
    (its `path`, layers, bytes, time).

    For dynamic-activation schemes (static activations or KV-cache scales need calibration: ConfigError).
    src_dir: a Hugging Face directory with config.json and model.safetensors or shards +
        model.safetensors.index.json (a pickle-only directory is refused).
    format: "compressed-tensors" (default) or "fp8" (AutoFP8 / vLLM), as in `save_quantized`.
    device: where weights are quantized; None = "cuda" when available, else "cpu". Results are the same.
    max_shard_bytes: output shard size limit (a larger tensor gets a shard of its own).
    progress: show tqdm bars (bytes and tensors).
    The output holds the tensors (bit for bit, stored dtype kept) and quantization_config that
    `quantize()` + `save_quantized()` write for the model loaded in its stored dtype, plus the
    tokenizer and other non-weight files; it is written to a temporary sibling renamed at the end.
    """
    start = time.perf_counter()
    config = QuantConfig() if config is None else config
    _check_config(config, format)
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise ModelLoadError(f"{src}: no such checkpoint directory")
    check_disjoint(src, out, "the model", "output directory")
    if max_shard_bytes < 1:
        raise ConfigError(f"quantize_checkpoint: max_shard_bytes={max_shard_bytes} must be positive")
    device = resolve_device(device)

    config_dict, existing = read_quantization_config(src)
    if existing is not None:
        raise CheckpointError(
            f"{src / CONFIG_NAME}: already has a quantization_config (quant_method "
            f"{existing.get('quant_method') if isinstance(existing, dict) else existing!r}); streaming quantizes "
            "full-precision checkpoints only"
        )
    entries = checkpoint_entries(src)
    model = _meta_model(src, config_dict, trust_remote_code)
    model_type = config_dict.get("model_type")
    linears, skipped = select_linears(model, config, check_weights=False)
    experts, experts_skipped = select_experts(model, config, check_weights=False)
    skipped.update(experts_skipped)
    to_disk, _ = disk_renamer(model_type)
    # MoE experts are stored per expert: each expert's projections (gate and up apart) are linears on disk.
    targets = [to_disk(name) for name in linears] + list(disk_expert_linears(model, experts, model_type))
    if not targets:
        raise ConfigError(
            f"{src}: no layer could be quantized (no nn.Linear with K and N divisible by 16 outside `ignore`): "
            + "; ".join(f"{n}: {r}" for n, r in skipped.items())
        )
    outs = _plan(disk_state(model, model_type), entries, targets, config, format, src)
    hp_linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in set(linears)]
    config_dict["quantization_config"] = quantization_config_dict(
        config, ignored_layers(model, hp_linears, model_type), False, format
    )
    if not config_dict.get("architectures"):
        config_dict["architectures"] = [type(model).__name__]
    del model

    # Shards of whole layers (a layer's weight, scales: consecutive in `outs`), packed in read order.
    units: list[list[_Out]] = []
    for o in outs:
        if units and o.layer is not None and units[-1][0].layer == o.layer:
            units[-1].append(o)
        else:
            units.append([o])
    packed = pack_shards([(str(i), sum(o.nbytes for o in u)) for i, u in enumerate(units)], max_shard_bytes)
    shards = [[units[int(i)] for i in shard] for shard in packed]  # [shard][unit][tensor]
    files = shard_names(len(shards))
    if config.weight == "block":
        warn_partial_blocks({o.layer: o.shape for o in outs if o.layer is not None and o.dtype == scaling.FP8_DTYPE},
                            config.block_size)  # fmt: skip
    report = StreamReport(path=out, quantized=list(targets), skipped=dict(skipped), device=str(device))
    report.bytes_in = sum(u[0].source.nbytes for u in units if u[0].source is not None)  # bytes read
    report.bytes_out = sum(o.nbytes for o in outs)
    report.tensors_out, report.shards_out = len(outs), len(shards)
    total_units = sum(1 for u in units if u[0].source is not None)
    logger.info(
        "streaming %s -> %s on %s: %d layers to quantize, %d tensors, %.2f GB in",
        src, out, device, len(targets), len(outs), report.bytes_in / 1e9,
    )

    fds: dict[Path, int] = {}
    # Reused for every quantized weight: fresh pages cost about as much as the quantization itself.
    largest = max((o.source.nbytes for o in outs if o.layer is not None and o.source is not None), default=0)
    pin = device.type == "cuda"
    read_buffer = torch.empty(largest, dtype=torch.uint8, pin_memory=pin)
    fp8_buffer = torch.empty(largest // 2, dtype=torch.uint8, pin_memory=pin)
    bar = tqdm(total=report.bytes_in, unit="B", unit_scale=True, desc="Streaming", disable=not progress)
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            done = 0
            for filename, shard in zip(files, shards):
                specs = [(o.name, o.dtype, o.shape) for unit in shard for o in unit]
                with SafetensorsWriter(tmp / filename, specs, {"format": "pt"}) as writer:
                    for unit in shard:
                        first, entry = unit[0], unit[0].source
                        if entry is None:  # a model buffer the file lacks
                            writer.write(first.name, first.value.to("cpu"))
                            continue
                        fd = fds.get(entry.file)
                        if fd is None:
                            try:
                                fd = fds[entry.file] = os.open(entry.file, os.O_RDONLY)
                            except OSError as exc:
                                raise CheckpointError(f"{entry.file}: cannot open (tensor {entry.name}): {exc}") from exc
                        if first.layer is None:
                            writer.copy_from(first.name, fd, entry.offset)
                        else:  # the layer's weight, weight_scale (and whatever `layer_tensors` gives)
                            weight_fp8, scale = _quantize_weight(
                                read_tensor(entry, fd, read_buffer),
                                config,
                                device,
                                f"tensor {entry.name} in {entry.file}",
                                first.layer,
                                fp8_buffer,
                            )
                            produced = _layer_tensors(first.layer, weight_fp8, scale, config, format, entry.dtype)
                            for o in unit:
                                writer.write(o.name, produced[o.name])
                            del weight_fp8, produced
                        done += 1
                        bar.update(entry.nbytes)
                        bar.set_postfix_str(f"{done}/{total_units} tensors", refresh=False)
            weight_map = {o.name: f for f, shard in zip(files, shards) for unit in shard for o in unit}
            if len(shards) > 1:
                write_index(tmp, weight_map, report.bytes_out)
            write_config(tmp, config_dict)
            _copy_other_files(src, tmp)
    finally:
        bar.close()
        for fd in fds.values():
            os.close(fd)
    report.seconds = time.perf_counter() - start
    logger.info(
        "wrote %s: %d tensors in %d shard(s), %.2f GB -> %.2f GB in %.1f s (%.2f GB/s read)",
        out, report.tensors_out, report.shards_out, report.bytes_in / 1e9, report.bytes_out / 1e9,
        report.seconds, report.bytes_in / 1e9 / max(report.seconds, 1e-9),
    )
    return report
