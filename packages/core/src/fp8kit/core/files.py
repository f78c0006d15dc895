"""Validation of model files before anything loads them, and the file-system rules of fp8kit's outputs.

Reads only headers (safetensors: 8-byte length + JSON; GGUF: key-value pairs and tensor infos), so it
costs a few KB per file whatever the model size, and turns every way a file can be broken (truncated at
any byte, a header of any JSON shape or nesting, offsets past the end or overlapping, a pickle under a
.safetensors name, an index naming an absent shard, a config.json of wrong types) into a
`CheckpointError` naming the file and, where there is one, the tensor or field. Only regular files are
read (a FIFO, device or socket under a model file's name is refused, never opened).

Outputs: `check_disjoint` keeps an output away from the input it is made from (no overlap in either
direction, through symlinks or ``..``), and `copy_model_files` copies a model folder's extra files
(tokenizer, generation config) as regular files only, never through a symlink that leaves the folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import stat
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CheckpointError

__all__ = [
    "INDEX_NAME",
    "SAFETENSORS_DTYPE_BYTES",
    "read_safetensors_header",
    "read_index",
    "check_safetensors_dir",
    "read_json",
    "check_config_dict",
    "check_gguf_file",
    "check_disjoint",
    "copy_model_files",
    "output_path",
    "output_lock",
    "temp_sibling",
    "remove_stale_temps",
    "fsync_tree",
    "exchange_paths",
]

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
_SUBBYTE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}  # packed: numel * bits must fill whole bytes
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
_MAX_JSON = 64 * 2**20  # config.json / index files: far above any real one
INDEX_NAME = "model.safetensors.index.json"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(file: Path) -> int:
    """A read-only descriptor of `file` (symlinks followed) once fstat shows a regular file.

    O_NONBLOCK keeps the open of a FIFO from waiting for a writer; the check is on the opened
    descriptor, so the file cannot be swapped for a special one between check and read.
    """
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(f"{file}: is {_kind(mode)}; fp8kit reads model files only from regular files")
    os.set_blocking(fd, True)
    return fd


def read_json(file: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed JSON of a regular file of at most 64 MiB; a `CheckpointError` naming the file on any
    problem (special file, not UTF-8, not JSON, nested past the parser's depth limit)."""
    file = Path(file)
    fd = _open_regular(file)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(_MAX_JSON + 1)
    if len(raw) > _MAX_JSON:
        raise CheckpointError(f"{file}: larger than {_MAX_JSON // 2**20} MiB; not a {what}")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"{file}: not readable JSON ({what}): {reason}") from None


def _pickle_hint(head: bytes) -> str:
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return " (it looks like a PyTorch pickle / zip file: fp8kit never loads pickles; convert it to safetensors)"
    return ""


def _is_count(value: Any) -> bool:
    """A JSON integer that fits an unsigned 64-bit field (what safetensors and GGUF store)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _no_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def read_safetensors_header(file: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's header, validated against the file's size.

    Returns {tensor name: {"dtype", "shape", "data_offsets"}} (without "__metadata__"). The rules
    are those of the `safetensors` package, so that the streaming path (which reads this header
    itself) and the in-memory one accept exactly the same files: a JSON object with no key twice,
    each entry a known dtype, a shape of non-negative integers and [start, end] offsets, the tensors'
    byte ranges tiling the data section with no gap or overlap. Raises `CheckpointError` naming the
    file (and tensor) when the file is truncated, special (FIFO, device) or not safetensors.
    """
    file = Path(file)
    bad = f"{file}: not a readable safetensors file"
    fd = _open_regular(file)
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{bad}: truncated ({size} bytes); a safetensors file starts with an 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{bad}: header length {length} bytes runs past the end of the file ({size} bytes): "
                    f"truncated or not a safetensors file{_pickle_hint(head)}"
                )
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read: {exc}") from exc

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{bad}: the header names {key!r} twice")
            out[key] = value
        return out

    try:
        header = json.loads(raw, object_pairs_hook=no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"{bad}: the header is not valid JSON ({reason}){_pickle_hint(head)}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: the header is not a JSON object")
    data_bytes = size - 8 - length
    tensors: dict[str, dict[str, Any]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and (not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values())):
                raise CheckpointError(f"{bad}: __metadata__ must be an object of strings, got {_short(entry)}")
            continue
        ok = isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= set(entry)
        if ok:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (
                isinstance(dtype, str) and (dtype in SAFETENSORS_DTYPE_BYTES or dtype in _SUBBYTE_BITS)
                and isinstance(shape, list) and all(_is_count(d) for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            )
        if not ok:
            raise CheckpointError(f"{bad}: tensor {name}: malformed header entry {_short(entry)}")
        tensors[name] = entry
    in_order = sorted(tensors.items(), key=lambda kv: tuple(kv[1]["data_offsets"]))  # file order
    for name, entry in in_order:  # a truncation names the first tensor cut
        start, stop = entry["data_offsets"]
        if stop > data_bytes or start > stop:
            raise CheckpointError(
                f"{bad}: tensor {name}: data_offsets [{start}, {stop}] run past the end of the data "
                f"({data_bytes} bytes): the file is truncated or corrupted"
            )
    end = 0
    for name, entry in in_order:
        start, stop = entry["data_offsets"]
        if start != end:
            what = "overlap the previous tensor's" if start < end else f"leave a gap after byte {end} of the"
            raise CheckpointError(f"{bad}: tensor {name}: data_offsets [{start}, {stop}] {what} data (corrupted header)")
        dtype, shape = entry["dtype"], entry["shape"]
        bits = math.prod(shape) * (_SUBBYTE_BITS.get(dtype) or 8 * SAFETENSORS_DTYPE_BYTES[dtype])
        need = bits // 8
        if bits % 8 or stop - start != need:
            raise CheckpointError(
                f"{bad}: tensor {name}: {dtype} {shape} needs {need} bytes "
                f"but data_offsets [{start}, {stop}] hold {stop - start}"
            )
        end = stop
    if end != data_bytes:
        raise CheckpointError(f"{bad}: {data_bytes - end} bytes after the last tensor's data (corrupted or appended to)")
    return tensors


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_index(path: str | os.PathLike) -> dict[str, list[str]] | None:
    """{shard file name: [tensor names]} from the directory's model.safetensors.index.json, or None
    when there is no index. Every shard must be a plain file name of an existing file in `path`."""
    path = Path(path)
    index_path = path / INDEX_NAME
    if not index_path.exists():
        return None
    index = read_json(index_path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index_path}: not a valid safetensors index: needs \"weight_map\", an object of tensor name -> file name"
        )
    by_file: dict[str, list[str]] = {}
    for tensor, filename in weight_map.items():
        by_file.setdefault(filename, []).append(tensor)
    for filename, names in sorted(by_file.items()):
        if not filename or Path(filename).name != filename or filename in (".", ".."):
            raise CheckpointError(f"{index_path}: shard {filename!r} of tensor {names[0]} is not a file name in {path}")
        if not (path / filename).is_file():
            shown = ", ".join(sorted(names)[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise CheckpointError(f"{path / filename}: missing; {INDEX_NAME} names it as the shard holding tensor {shown}")
    return dict(sorted(by_file.items()))


def check_safetensors_dir(path: str | os.PathLike) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Validate the safetensors weights of a model directory (index and every shard) from their headers.

    Returns {tensor name: (file, header entry)}: the tensors a loader reads, which are those of
    model.safetensors, or with an index those of every shard it names. Each shard must exist and hold
    the tensors the index assigns to it; a tensor stored in two shards is refused (which copy counts
    would depend on the reader). Other *.safetensors files (adapters, ...) are not weights of the model.
    """
    path = Path(path)
    by_file = read_index(path)
    if by_file is None:
        by_file = {"model.safetensors": []} if (path / "model.safetensors").exists() else {}
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for filename, names in by_file.items():
        file = path / filename
        try:
            header = read_safetensors_header(file)
        except CheckpointError as exc:
            if names and "tensor " not in str(exc):  # name a tensor the broken shard was to hold
                raise CheckpointError(f"{exc} [{INDEX_NAME} puts tensor {sorted(names)[0]} in it]") from None
            raise
        for name in sorted(names):
            if name not in header:
                raise CheckpointError(f"{file}: tensor {name} is missing; {INDEX_NAME} says this file holds it")
        for name, entry in header.items():
            if name in found:
                raise CheckpointError(
                    f"{file}: tensor {name} is also stored in {found[name][0].name}; a tensor must be stored once"
                )
            found[name] = (file, entry)
    return found


# --------------------------------------------------------------------------- config.json

# config.json fields a model is built from: each must be an integer in [1, limit] when present. The limits
# are far above any real model's, and keep a lying config from building millions of layers, even on meta.
_MAX_DIM = 2**24
_POSITIVE_INT_FIELDS = {
    "hidden_size": _MAX_DIM, "intermediate_size": _MAX_DIM, "vocab_size": _MAX_DIM, "max_position_embeddings": 2**31,
    "head_dim": 2**16, "moe_intermediate_size": _MAX_DIM, "num_hidden_layers": 1024, "num_attention_heads": 4096,
    "num_key_value_heads": 4096, "num_local_experts": 2**16, "num_experts": 2**16, "num_experts_per_tok": 2**16,
}
_FLOAT_FIELDS = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "initializer_range")
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_cache")


def check_config_dict(config: Any, file: str | os.PathLike) -> dict[str, Any]:
    """`config` (a parsed config.json) if the fields fp8kit and transformers build the model from have
    sane types and values, else a `CheckpointError` naming `file` and the field.

    architectures: a list of non-empty strings; model_type: a string; sizes and counts: integers in
    [1, limit] (`num_key_value_heads` dividing `num_attention_heads`); eps / theta: finite positive numbers;
    flags: booleans.
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(config).__name__}")

    def bad(field: str, want: str) -> CheckpointError:
        return CheckpointError(f"{file}: {field} must be {want}, got {_short(config[field], 80)}")

    architectures = config.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not all(isinstance(a, str) and a for a in architectures)
    ):
        raise bad("architectures", "a list of class names (strings)")
    if "model_type" in config and not isinstance(config["model_type"], str):
        raise bad("model_type", "a string")
    for field, limit in _POSITIVE_INT_FIELDS.items():
        value = config.get(field)
        if value is not None and not (_is_count(value) and 1 <= value <= limit):
            raise bad(field, f"an integer in [1, {limit}]")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise CheckpointError(f"{file}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    for field in _FLOAT_FIELDS:
        value = config.get(field)
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        ):
            raise bad(field, "a finite positive number")
    for field in _BOOL_FIELDS:
        if config.get(field) is not None and not isinstance(config[field], bool):
            raise bad(field, "true or false")
    return config


# --------------------------------------------------------------------------- GGUF

_GGUF_MAGIC = b"GGUF"
# GGUF value type -> struct format of one scalar (8 = string, 9 = array are variable-sized)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Cursor:
    """Bounds-checked little-endian reads of a GGUF file's header: every read past the end is named."""

    def __init__(self, file: Path, f: Any, size: int) -> None:
        self.file, self.f, self.size, self.pos = file, f, size, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(
                f"{self.file}: not a readable GGUF file: truncated at byte {self.size} while reading {what} "
                f"(needs bytes [{self.pos}, {self.pos + n}))"
            )
        data = self.f.read(n)
        if len(data) != n:
            raise CheckpointError(f"{self.file}: not a readable GGUF file: the file shrank while being read")
        self.pos += n
        return data

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.unpack("Q", f"the length of {what}"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.file}: not a readable GGUF file: {what} is not UTF-8") from None

    def count(self, what: str, min_item_bytes: int) -> int:
        n = self.unpack("Q", what)
        if n * min_item_bytes > self.size - self.pos:
            raise CheckpointError(
                f"{self.file}: not a readable GGUF file: {what} is {n}, more than the {self.size} byte file can hold"
            )
        return n

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype == 9 and depth == 0:
            item_type = self.unpack("I", f"the item type of {what}")
            n = self.count(f"the length of {what}", 1 if item_type in (0, 1, 7) else 2 if item_type in (2, 3) else 4)
            return [self.value(item_type, f"item {i} of {what}", depth + 1) for i in range(n)]
        raise CheckpointError(f"{self.file}: not a readable GGUF file: {what} has unknown value type {vtype}")


def check_gguf_file(file: str | os.PathLike) -> dict[str, Any]:
    """Validate a GGUF file's header, tensor table and data size before anything parses it.

    Returns the key-value metadata. Raises `CheckpointError` naming the file and the field being
    read when the file is truncated at any byte, is not GGUF, or holds a tensor whose data runs past
    the end (the `gguf` reader would fail with struct / index / memmap errors instead).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    file = Path(file)
    fd = _open_regular(file)
    with os.fdopen(fd, "rb") as f:
        cur = _Cursor(file, f, os.fstat(f.fileno()).st_size)
        if cur.take(4, "the magic number") != _GGUF_MAGIC:
            raise CheckpointError(f"{file}: not a GGUF file (it does not start with 'GGUF')")
        version = cur.unpack("I", "the version")
        if version not in (2, 3):
            raise CheckpointError(f"{file}: GGUF version {version} is not supported (2 or 3)")
        n_tensors = cur.count("the tensor count", 8 + 4 + 4 + 8)
        n_kv = cur.count("the key-value count", 8 + 4)
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"key {i}")
            metadata[key] = cur.value(cur.unpack("I", f"the type of {key}"), key)
        tensors = []
        for i in range(n_tensors):
            name = cur.string(f"the name of tensor {i}")
            n_dims = cur.unpack("I", f"the rank of tensor {name}")
            if n_dims > 8:
                raise CheckpointError(f"{file}: not a readable GGUF file: tensor {name} has rank {n_dims}")
            dims = [cur.unpack("Q", f"the shape of tensor {name}") for _ in range(n_dims)]
            ggml_type = cur.unpack("I", f"the type of tensor {name}")
            offset = cur.unpack("Q", f"the data offset of tensor {name}")
            try:
                block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise CheckpointError(f"{file}: tensor {name} has unknown GGML type {ggml_type}") from None
            numel = math.prod(dims)
            if numel % block:
                raise CheckpointError(f"{file}: tensor {name}: {numel} elements is not a multiple of its block size {block}")
            tensors.append((name, offset, numel // block * type_bytes))
        alignment = metadata.get("general.alignment", 32)
        if not _is_count(alignment) or alignment == 0:
            raise CheckpointError(f"{file}: general.alignment must be a positive integer, got {_short(alignment, 80)}")
        data_start = -(-cur.pos // alignment) * alignment
        for name, offset, nbytes in tensors:
            if data_start + offset + nbytes > cur.size:
                raise CheckpointError(
                    f"{file}: not a readable GGUF file: tensor {name} ({nbytes} bytes at offset {offset}) runs past the "
                    f"end of the file ({cur.size} bytes): the file is truncated"
                )
    return metadata


# --------------------------------------------------------------------------- outputs


def check_disjoint(source: str | os.PathLike, output: str | os.PathLike, source_name: str, output_name: str) -> None:
    """Refuse (`CheckpointError`) an output that is, contains or lies inside `source` after resolving
    symlinks and ``..`` (for a path that does not exist yet, its existing ancestors are resolved).

    Replacing OUT_DIR then can never delete or rewrite MODEL, whatever the spelling of either.
    """
    src, out = Path(os.path.realpath(source)), Path(os.path.realpath(output))
    if src == out:
        relation = "is"
    elif src in out.parents:
        relation = "is inside"
    elif out in src.parents:
        relation = "contains"
    else:
        return
    resolved = "" if (Path(source), Path(output)) == (src, out) else f" (resolved: {out} and {src})"
    raise CheckpointError(
        f"{output_name} {output} {relation} {source_name} {source}{resolved}: writing there could overwrite or "
        "delete the input; choose an output outside it"
    )


# Extra files of a Hugging Face cache snapshot are symlinks into the repository's blobs/ folder.
_HF_CACHE_SNAPSHOTS = "snapshots"


def _allowed_roots(src: Path) -> list[Path]:
    """Where a symlink in `src` may point: inside `src`, or inside `<repo>/blobs` for a Hugging Face
    cache snapshot `<repo>/snapshots/<revision>` (every file there is such a symlink)."""
    roots = [src]
    if src.parent.name == _HF_CACHE_SNAPSHOTS:
        roots.append(src.parent.parent / "blobs")
    return roots


def copy_model_files(src: str | os.PathLike, dst: str | os.PathLike, exclude: Any) -> list[tuple[str, str]]:
    """Copy the top-level regular files of model folder `src` into `dst`, except those `exclude(name)` rejects.

    Never read: directories, FIFOs, devices, sockets, and symlinks that resolve outside `src` (or outside
    a Hugging Face cache snapshot's blobs/ folder). Each file is opened without following a final symlink
    once resolved, and checked as a regular file on the open descriptor. Returns [(name, reason)] of the
    files skipped; each is logged as a warning.
    """
    src, dst = Path(src), Path(dst)
    roots = [Path(os.path.realpath(r)) for r in _allowed_roots(src)]
    skipped: list[tuple[str, str]] = []
    for item in sorted(src.iterdir()):
        if item.name.startswith(".") or exclude(item.name):
            continue
        target = Path(os.path.realpath(item))
        if item.is_symlink() and not any(r in target.parents for r in roots):
            skipped.append((item.name, f"a symlink to {target}, outside the model folder"))
            continue
        if target.is_dir():
            logger.info("not copying %s: a directory", item)
            continue
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            skipped.append((item.name, f"cannot be opened ({exc.strerror})"))
            continue
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                skipped.append((item.name, f"{_kind(mode)}, not a regular file"))
                continue
            os.set_blocking(fd, True)
            with open(dst / item.name, "xb") as out:
                shutil.copyfileobj(f, out)
            shutil.copymode(target, dst / item.name)
    for name, reason in skipped:
        logger.warning("not copying %s from %s: %s", name, src, reason)
    return skipped


def output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """The absolute path fp8kit writes for the output `path`, or a `CheckpointError` saying why not.

    A symlink is followed (the output replaces what it points to; the link stays). Refused: the
    current directory or one of its ancestors (replacing it would leave the shell in a deleted
    directory), and a mount point (it cannot be renamed: write to a new directory inside it).
    """
    given = Path(path)
    resolved = Path(os.path.realpath(given))
    if resolved == resolved.parent:
        raise CheckpointError(f"{what} {given}: is the file-system root; give a new directory for the output")
    cwd = Path(os.path.realpath(os.getcwd()))
    if resolved == cwd or resolved in cwd.parents:
        raise CheckpointError(
            f"{what} {given}: is the current directory{'' if resolved == cwd else ' or contains it'}; fp8kit replaces "
            "the output as a whole: give it a name of its own (e.g. ./model-fp8)"
        )
    if resolved.is_dir() and os.path.ismount(resolved):
        raise CheckpointError(
            f"{what} {given}: is a mount point, which cannot be replaced atomically; write to a new directory "
            f"inside it (e.g. {given / 'model-fp8'})"
        )
    return resolved


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on output `path` (a file `.<name>.lock` beside it) for the whole block.

    `flock` on an open file: the kernel releases it when the holder exits or is killed, so a lock
    that can be taken proves no live process is writing `path` (on this host or, over an NFSv4 mount,
    on any client: Linux maps flock to NFS byte-range locks). A second writer is refused at once
    (`CheckpointError`), not queued. The lock file is removed on release, while still locked; a
    process that opened it in between notices (its inode is gone) and retries on a fresh one.
    """
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot create the lock file {lock}: {exc.strerror or exc}") from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(
                f"{path}: another process is writing it now (it holds {lock}); wait for it to finish or choose "
                "another output"
            ) from None
        except (OSError, ImportError) as exc:
            os.close(fd)
            raise CheckpointError(
                f"{path}: cannot lock {lock} ({getattr(exc, 'strerror', None) or exc}): this file system does not "
                "support file locks, so concurrent writers could not be kept apart; write to a local disk or an "
                "NFSv4 mount"
            ) from None
        try:
            held, linked = os.fstat(fd), os.stat(lock)
            current = (held.st_dev, held.st_ino) == (linked.st_dev, linked.st_ino)
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # its previous holder removed it between our open and flock: lock the new one
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


_TEMP_TAGS = ("tmp", "old")


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A fresh name `.<name>.<tag>-<uuid4>` beside `path`: unique across processes, hosts and containers."""
    if tag not in _TEMP_TAGS:
        raise ValueError(f"temp_sibling: tag must be one of {_TEMP_TAGS}")
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex}"


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove what killed writers of `path` left beside it; call only while holding `output_lock(path)`.

    Holding the lock proves no live writer owns a temporary of `path`, so every `.<name>.tmp-*` is stale.
    A `.<name>.old-*` is the previous output moved aside by a writer killed before its new output took
    its place (the two-rename fallback): it is restored when `path` is missing, else removed.
    """
    removed = []
    for tag in _TEMP_TAGS:
        for stale in sorted(path.parent.glob(f".{path.name}.{tag}-*")):
            if tag == "old" and not os.path.lexists(path):
                logger.warning("restoring %s from %s (left by a killed writer)", path, stale)
                os.rename(stale, path)
                continue
            logger.info("removing %s, left by a writer that was killed", stale)
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    stale.unlink()
            removed.append(stale)
    return removed


def fsync_tree(path: Path, recursive: bool = True) -> None:
    """fsync every regular file under directory `path`, then each directory bottom-up (`recursive`), or
    only `path` itself, so that data and names are on disk before and after a rename publishes them."""

    def sync(p: Path) -> None:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EBADF):  # a directory fsync some file systems refuse
                raise
        finally:
            os.close(fd)

    if not recursive:
        sync(path)
        return
    for root, _dirs, names in os.walk(path, topdown=False):
        for name in names:
            file = Path(root) / name
            if file.is_file() and not file.is_symlink():
                sync(file)
        sync(Path(root))


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported.

    Lets a finished output directory replace an old one with no instant at which neither exists.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28 or another libc
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
