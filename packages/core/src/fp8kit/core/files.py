"""Validation of safetensors files and shard indexes before anything loads them.

Reads only headers (8-byte length + JSON), so it costs a few KB per file whatever the model size,
and turns every way a file can be broken (truncated, bad header, offsets past the end, a pickle
under a .safetensors name, an index naming an absent shard) into a `CheckpointError` naming the
file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from .errors import CheckpointError

__all__ = [
    "INDEX_NAME", "SAFETENSORS_DTYPE_BYTES", "read_safetensors_header", "read_index", "check_safetensors_dir", "exchange_paths"]

SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
INDEX_NAME = "model.safetensors.index.json"


def _pickle_hint(head: bytes) -> str:
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return " (it looks like a PyTorch pickle / zip file: fp8kit never loads pickles; convert it to safetensors)"
    return ""


def read_safetensors_header(file: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's header, validated against the file's size.

    Returns {tensor name: {"dtype", "shape", "data_offsets"}} (without "__metadata__"). Raises
    `CheckpointError` naming the file (and tensor) when the file is truncated or not safetensors.
    """
    file = Path(file)
    bad = f"{file}: not a readable safetensors file"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
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
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{bad}: the header is not valid JSON ({exc}){_pickle_hint(head)}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: the header is not a JSON object")
    data_bytes = size - 8 - length
    tensors = {}
    def start(item: tuple[str, Any]) -> int:
        offsets = item[1].get("data_offsets") if isinstance(item[1], dict) else None
        return offsets[0] if isinstance(offsets, list) and offsets and isinstance(offsets[0], int) else -1

    for name, entry in sorted(header.items(), key=start):  # in file order: a truncation names the first tensor cut
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(start, int) and isinstance(end, int)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or dtype not in SAFETENSORS_DTYPE_BYTES:
            raise CheckpointError(f"{bad}: tensor {name}: malformed header entry {entry!r}")
        if not 0 <= start <= end <= data_bytes:
            raise CheckpointError(
                f"{bad}: tensor {name}: data_offsets [{start}, {end}] run past the end of the data "
                f"({data_bytes} bytes): the file is truncated or corrupted"
            )
        need = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
        if dtype != "F4" and end - start != need:
            raise CheckpointError(
                f"{bad}: tensor {name}: {dtype} {shape} needs {need} bytes "
                f"but data_offsets [{start}, {end}] hold {end - start}"
            )
        tensors[name] = entry
    return tensors


def read_index(path: str | os.PathLike) -> dict[str, list[str]] | None:
    """{shard file name: [tensor names]} from the directory's model.safetensors.index.json, or None
    when there is no index. Every shard must be a plain file name of an existing file in `path`."""
    path = Path(path)
    index_path = path / INDEX_NAME
    if not index_path.is_file():
        return None
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of tensor name -> file name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid safetensors index: {exc}") from exc
    by_file: dict[str, list[str]] = {}
    for tensor, filename in weight_map.items():
        by_file.setdefault(filename, []).append(tensor)
    for filename, names in sorted(by_file.items()):
        if Path(filename).name != filename:
            raise CheckpointError(f"{index_path}: shard {filename!r} of tensor {names[0]} is not a file name in {path}")
        if not (path / filename).is_file():
            shown = ", ".join(sorted(names)[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise CheckpointError(f"{path / filename}: missing; {INDEX_NAME} names it as the shard holding tensor {shown}")
    return dict(sorted(by_file.items()))


def check_safetensors_dir(path: str | os.PathLike) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Validate the safetensors weights of a model directory (index and every shard) from their headers.

    Returns {tensor name: (file, header entry)}. With an index, every shard it names must exist and
    hold the tensors the index assigns to it.
    """
    path = Path(path)
    by_file = read_index(path)
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    if by_file is None:
        for file in sorted(path.glob("*.safetensors")):
            found.update({name: (file, entry) for name, entry in read_safetensors_header(file).items()})
        return found
    for filename, names in by_file.items():
        file = path / filename
        header = read_safetensors_header(file)
        for name in sorted(names):
            if name not in header:
                raise CheckpointError(f"{file}: tensor {name} is missing; {INDEX_NAME} says this file holds it")
        found.update({name: (file, entry) for name, entry in header.items()})
    return found


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
