"""Writing checkpoint directories: the atomic directory swap, incremental safetensors files, shards.

Format-neutral: what goes into the files is decided by `save` and the format modules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..files import INDEX_NAME, exchange_paths, fsync_tree, output_lock, output_path, remove_stale_temps, temp_sibling

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "SAFETENSORS_DTYPES",
    "atomic_directory",
    "SafetensorsWriter",
    "pack_shards",
    "shard_names",
    "write_index",
    "write_shards",
    "portable_config",
    "write_config",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# Keys transformers' GGUF conversion (and loading) leaves in a config that mean nothing to a reader of
# the saved checkpoint: the local path it was loaded from, and the GGUF file's model name.
_LOCAL_KEYS = ("_name_or_path", "_model_name_or_path", "name_or_path")
_DEFAULT_LABELS = {"id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1}}


def portable_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of a model's config.json dict fit to share: without the local path it was loaded from
    (``_name_or_path``), GGUF conversion leftovers (``_model_name_or_path``, a ``quantization_config``
    whose quant_method is "gguf"), and transformers' placeholder labels (``LABEL_0`` / ``LABEL_1``,
    which a causal LM never uses)."""
    out = {k: v for k, v in config_dict.items() if k not in _LOCAL_KEYS}
    qc = out.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "gguf":
        del out["quantization_config"]
    for key, default in _DEFAULT_LABELS.items():
        value = out.get(key)
        if isinstance(value, dict) and {str(k): v for k, v in value.items()} == default:
            del out[key]
    return out


def write_config(directory: Path, config_dict: dict[str, Any]) -> Path:
    """Write `portable_config(config_dict)` as ``directory/config.json`` (sorted keys, indented)."""
    path = directory / CONFIG_NAME
    path.write_text(json.dumps(portable_config(config_dict), indent=2, sort_keys=True, default=str) + "\n")
    return path


class atomic_directory:
    """Context manager giving a private temporary sibling of `path` that replaces `path` only on success.

    - `path` is resolved first (`files.output_path`): a symlink is followed (the directory it points
      to is replaced, the link stays); the current directory, a mount point and "/" are refused.
    - An existing non-empty `path` is refused unless `overwrite` (checked at once, and again under the lock).
    - `__enter__` takes `files.output_lock(path)` and holds it until the end: a second writer of the
      same output is refused, so the "not empty" check and the final swap cannot interleave with
      another writer's. Under the lock it removes what killed writers left (`files.remove_stale_temps`)
      and creates `.<name>.tmp-<uuid4>`, a name no other writer uses or deletes while this one lives.
    - On success: every file and directory of the temporary is fsynced, the temporary is swapped in
      (`renameat2(RENAME_EXCHANGE)`, else a rename; never a moment without `path` where the exchange
      exists), and the parent directory is fsynced, so after return the new output survives a power
      loss. On error the temporary is removed and `path` is left as it was.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        self.given = Path(path)
        self.path = output_path(path, "output directory")
        self.overwrite = overwrite
        self._check_target()
        self.tmp = temp_sibling(self.path)
        self._lock: contextlib.ExitStack | None = None

    def _check_target(self) -> None:
        if os.path.lexists(self.path) and not self.path.is_dir():
            raise CheckpointError(f"{self.given}: exists and is not a directory")
        if self.path.is_dir() and any(self.path.iterdir()) and not self.overwrite:
            raise CheckpointError(f"{self.given}: directory exists and is not empty; pass overwrite=True to replace it")

    def __enter__(self) -> Path:
        stack = contextlib.ExitStack()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(output_lock(self.path))
            remove_stale_temps(self.path)
            self._check_target()  # again, under the lock: nobody can fill `path` between this and the swap
            self.tmp.mkdir()
        except OSError as exc:
            stack.close()
            raise CheckpointError(f"{self.given}: cannot create the output directory: {exc}") from exc
        except BaseException:
            stack.close()
            raise
        self._lock = stack
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._lock is not None, "atomic_directory: __exit__ without __enter__"
        with self._lock:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            try:
                self._publish()
            except OSError as err:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise CheckpointError(f"{self.given}: cannot move the finished output into place: {err}") from err

    def _publish(self) -> None:
        fsync_tree(self.tmp)
        if self.path.is_dir() and any(self.path.iterdir()):
            if exchange_paths(self.tmp, self.path):  # one atomic swap: `path` always exists
                fsync_tree(self.path.parent, recursive=False)
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            old = temp_sibling(self.path, "old")  # restored by the next writer if we die before the rename below
            os.rename(self.path, old)
            try:
                os.rename(self.tmp, self.path)
            except OSError:
                os.rename(old, self.path)
                raise
            fsync_tree(self.path.parent, recursive=False)
            shutil.rmtree(old, ignore_errors=True)
            return
        os.rename(self.tmp, self.path)  # onto nothing, or onto an empty directory: atomic
        fsync_tree(self.path.parent, recursive=False)


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


def pack_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
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


def shard_names(count: int) -> list[str]:
    """File names of `count` shards: model.safetensors, or model-0000i-of-0000n.safetensors."""
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    sizes = [(name, t.numel() * t.element_size()) for name, t in tensors.items()]
    shards = pack_shards(sizes, max_shard_bytes)
    files = shard_names(len(shards))
    for filename, names in zip(files, shards):
        specs = [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
        with SafetensorsWriter(directory / filename, specs, {"format": "pt"}) as writer:
            for n in names:
                writer.write(n, tensors[n].detach().to("cpu"))
    if len(shards) > 1:
        weight_map = {n: f for f, names in zip(files, shards) for n in names}
        write_index(directory, weight_map, sum(size for _, size in sizes))

