"""The compressed-tensors format (llm-compressor's "float-quantized", read by vLLM, SGLang and transformers).

``quantization_config = {"quant_method": "compressed-tensors", "format": "float-quantized",
"quantization_status": "compressed", "config_groups": {"group_0": {"targets": ["Linear"], "weights": args,
"input_activations": args, ...}}, "ignore": [...], "kv_cache_scheme": args | null, "fp8kit": {...}}`` where
each ``args`` is a compressed-tensors QuantizationArgs (num_bits 8, type "float", symmetric, strategy "tensor" |
"channel" | "token", dynamic). Same tensor names as "fp8", with scales F32 [1] (per tensor) or [N,1] (per
channel); dynamic activations store no input_scale. Block-wise (llm-compressor's FP8_BLOCK): weights
``strategy "block", block_structure [128, 128]``, activations ``strategy "group", group_size 128, dynamic``;
``<layer>.weight_scale`` [ceil(N/128), ceil(K/128)] in the weight's original dtype (bf16 for a bf16 model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import QuantConfig
from ..errors import CheckpointError, ConfigError
from ._schema import fp8kit_block, read_fp8kit_block

NAME = "compressed-tensors"
TITLE = "compressed-tensors"
QUANT_METHOD = "compressed-tensors"
SCALAR_SHAPE: tuple[int, ...] = (1,)  # shape of a per-tensor scale on disk
WEIGHT_GRANULARITIES = ("tensor", "channel", "block")
#: Who reads it correctly (REFERENCE §3; transformers checked by tests/core/test_cli.py).
READERS = "vLLM, SGLang, transformers (with compressed-tensors installed), compressed-tensors, fp8kit"

_CT_FORMAT = "float-quantized"


def _ct_args(
    strategy: str, dynamic: bool, group_size: int | None = None, block_structure: list[int] | None = None
) -> dict[str, Any]:
    """One compressed-tensors ``QuantizationArgs`` block: symmetric FP8 E4M3 (num_bits 8, type float)."""
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": group_size,
        "strategy": strategy,
        "block_structure": block_structure,
        "dynamic": dynamic,
        "actorder": None,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
    }


def quantization_config(config: QuantConfig, ignored_layers: list[str], kv_cache: bool) -> dict[str, Any]:
    """The ``quantization_config`` of config.json for a model quantized with `config`."""
    if config.activation == "static":
        activations = _ct_args("tensor", dynamic=False)
    elif config.activation_granularity == "group":
        activations = _ct_args("group", dynamic=True, group_size=config.group_size)
    else:
        activations = _ct_args(config.activation_granularity, dynamic=True)
    block = list(config.block_size) if config.weight == "block" else None
    return {
        "quant_method": "compressed-tensors",
        "format": _CT_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _ct_args(config.weight, dynamic=False, block_structure=block),
                "input_activations": activations,
                "output_activations": None,
                "format": _CT_FORMAT,
            }
        },
        "ignore": list(ignored_layers),
        "kv_cache_scheme": _ct_args("tensor", dynamic=False) if kv_cache else None,
        "global_compression_ratio": None,
        "fp8kit": fp8kit_block(config),
    }


def block_scale_tensor(name: str, weight_scale: torch.Tensor, scale_dtype: torch.dtype) -> tuple[str, torch.Tensor]:
    """How this format stores a layer's block scales: ``<name>.weight_scale`` [ceil(N/bn), ceil(K/bk)] in the
    original weight's dtype `scale_dtype` (as llm-compressor writes them); exact, the scales are rounded to it."""
    stored = weight_scale.to(scale_dtype)
    if not stored.is_meta and not torch.equal(stored.float(), weight_scale):  # (meta: streaming's layout plan)
        raise CheckpointError(
            f"{name}.weight_scale: block scales are not exact in {scale_dtype}; quantize with fp8kit "
            "(scaling.quantize_weight rounds them to the weight's dtype) or save with format='fp8' (F32 scales)"
        )
    return f"{name}.weight_scale", stored


_CT_READABLE_FORMATS = ("float-quantized", "naive-quantized")


def _ct_check_args(args: Any, where: Path, field: str, strategies: tuple[str, ...]) -> tuple[str, bool]:
    """(strategy, dynamic) of a compressed-tensors QuantizationArgs dict that fp8kit can run, else CheckpointError."""
    fix = (
        "fp8kit reads symmetric 8-bit float (FP8 E4M3) quantization: weights per tensor, per channel or in "
        "2-D blocks, activations dynamic per tensor / per token / per group (with block weights) or static per tensor"
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
    block_structure = args.get("block_structure")
    if strategy == "block":
        if not (
            isinstance(block_structure, list)
            and len(block_structure) == 2
            and all(isinstance(b, int) and b > 0 for b in block_structure)
        ):
            problems.append(f"block_structure={block_structure!r} (two positive ints needed)")
    elif block_structure is not None:
        problems.append(f"block_structure={block_structure!r}")
    if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
        problems.append(f"group_size={group_size!r} (a positive int needed)")
    dynamic = args.get("dynamic", False)
    if not isinstance(dynamic, bool):
        problems.append(f"dynamic={dynamic!r}")
    elif strategy == "token" and not dynamic:
        problems.append("static per-token strategy")
    if problems:
        raise CheckpointError(f"{where}: quantization_config.{field} has unsupported {', '.join(problems)}; {fix}")
    return strategy, bool(dynamic)


def parse(qc: dict[str, Any], where: Path) -> QuantConfig:
    """QuantConfig of a compressed-tensors quantization_config, refusing what FP8Linear cannot run; `where` is config.json."""
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
    schemes: dict[str, tuple[str, str, str]] = {}  # group -> (weight, activation, activation granularity)
    sizes: dict[str, tuple[tuple[int, ...] | None, int | None]] = {}  # group -> (block_structure, group_size)
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
        weight, _ = _ct_check_args(scheme.get("weights"), where, f"{field}.weights", ("tensor", "channel", "block"))
        if scheme.get("input_activations") is None:
            raise CheckpointError(
                f"{where}: quantization_config.{field} quantizes weights only (input_activations is null); "
                "fp8kit runs FP8 weights with FP8 activations (W8A8) only"
            )
        act, dynamic = _ct_check_args(
            scheme["input_activations"], where, f"{field}.input_activations", ("tensor", "token", "group")
        )
        if scheme.get("output_activations") is not None:
            raise CheckpointError(f"{where}: quantization_config.{field}.output_activations is not supported by fp8kit")
        schemes[group] = (weight, "dynamic" if dynamic else "static", act)
        sizes[group] = (
            tuple(scheme["weights"]["block_structure"]) if weight == "block" else None,
            scheme["input_activations"].get("group_size") if act == "group" else None,
        )
    if len(set(schemes.values())) > 1 or len(set(sizes.values())) > 1:
        mixed = schemes if len(set(schemes.values())) > 1 else {g: (*schemes[g], *sizes[g]) for g in schemes}
        raise CheckpointError(
            f"{where}: quantization_config.config_groups mix schemes {mixed}; fp8kit applies one scheme to the model"
        )
    kv = qc.get("kv_cache_scheme")
    if kv is not None:
        _, kv_dynamic = _ct_check_args(kv, where, "kv_cache_scheme", ("tensor",))
        if kv_dynamic:
            raise CheckpointError(f"{where}: quantization_config.kv_cache_scheme is dynamic; fp8kit reads static KV scales")
    ours = read_fp8kit_block(qc, where)
    if ours is not None:
        return ours
    weight, activation, granularity = next(iter(schemes.values()))
    block, group_size = next(iter(sizes.values()))
    blocks = {} if block is None else {"block_size": block}
    if group_size is not None:
        blocks["group_size"] = group_size
    try:
        return QuantConfig(
            weight=weight,
            activation=activation,
            activation_granularity=granularity,
            ignore=tuple(qc.get("ignore") or ()),
            kv_cache=kv is not None,
            **blocks,
        )
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{where}: invalid quantization_config: {exc}") from exc
