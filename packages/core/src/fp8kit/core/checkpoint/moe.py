"""MoE experts on disk: fused in memory (transformers 5 experts, `FP8Experts`), per expert on disk.

transformers 5 fuses the per-expert tensors of the original checkpoints when it loads them and splits
them again in `save_pretrained`; vLLM's FusedMoE loader maps the per-expert names into its own
``w13_*`` / ``w2_*`` tensors. fp8kit writes the names the original checkpoint uses:

- Mixtral (model_type mixtral, minimax, minimax_m2): ``<layer>.block_sparse_moe.experts.{e}.{w1,w3,w2}``
  (``.mlp.`` of every in-memory name is ``.block_sparse_moe.`` on disk, router included);
- every other concatenated gate / up layout (Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, GLM4-MoE, ...):
  ``<layer>.mlp.experts.{e}.{gate_proj,up_proj,down_proj}``;
- transposed / interleaved layouts (gpt-oss) stay fused, as transformers saves them:
  ``<experts>.gate_up_proj`` [E, H, 2I] and ``<experts>.down_proj`` [E, I, H] (F8_E4M3 when quantized),
  biases as they are, and fp8kit's scales beside them: ``<experts>.<proj>_weight_scale`` F32 [E, 1]
  (per tensor) or [E, N, 1] (per channel), ``<experts>.<proj>_input_scale`` F32 [E] (static only).

Each per-expert projection is stored like a dense linear (`formats.layer_tensors`: ``weight``,
``weight_scale`` and, static, ``input_scale`` in the format's shapes); gate and up keep their own
per-tensor scales (what vLLM's "fp8" loader reduces to their max per expert, requantizing).
vLLM keeps one static input scale per MoE layer, the max over its experts
("Using the maximum across experts for each layer"): ``input_scales="layer-max"`` writes that max as
every expert's ``input_scale`` so the file says what vLLM will run (load_quantized then reads the max).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import CheckpointError
from ..experts import DOWN, ExpertsLayout, FP8Experts, experts_layout
from ..scaling import FP8_DTYPE
from ..surgery import is_router
from .formats import layer_tensors

__all__ = [
    "ExpertNames",
    "INPUT_SCALE_MODES",
    "expert_names",
    "disk_renamer",
    "experts_to_disk",
    "experts_from_disk",
    "router_names",
    "disk_expert_linears",
    "disk_state",
    "ignored_layers",
]

INPUT_SCALE_MODES = ("per-expert", "layer-max")
MIXTRAL_TYPES = ("mixtral", "minimax", "minimax_m2")


@dataclass(frozen=True)
class ExpertNames:
    """On-disk names of one block's per-expert linears: ``<block>.experts.{e}.<part>`` for each up part, then down."""

    block: str | None  # the on-disk name of the module holding `experts` when it differs ("block_sparse_moe")
    up: tuple[str, ...]  # the up projection's parts, in row order (gate first)
    down: str


MIXTRAL = ExpertNames("block_sparse_moe", ("w1", "w3"), "w2")
QWEN = ExpertNames(None, ("gate_proj", "up_proj"), "down_proj")


def expert_names(model_type: str | None, layout: ExpertsLayout) -> ExpertNames | None:
    """The per-expert naming of experts with `layout` in a `model_type` checkpoint; None: fused on disk."""
    if layout.transposed or layout.up_parts != 2:
        return None
    return MIXTRAL if model_type in MIXTRAL_TYPES else QWEN


def disk_renamer(model_type: str | None) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """(in-memory name -> on-disk name, its inverse): Mixtral's ``.mlp.`` <-> ``.block_sparse_moe.``, else identity."""
    if model_type in MIXTRAL_TYPES:
        return (lambda n: n.replace(".mlp.", ".block_sparse_moe.")), (lambda n: n.replace(".block_sparse_moe.", ".mlp."))
    return (lambda n: n), (lambda n: n)


def _experts_layout(module: nn.Module) -> ExpertsLayout | None:
    return module.layout() if isinstance(module, FP8Experts) else experts_layout(module)


def router_names(model: nn.Module) -> list[str]:
    """Names (in memory) of the MoE router gates of `model` (for the checkpoint's ignore list)."""
    modules = dict(model.named_modules())
    return [name for name in modules if is_router(name, modules)]


def _linear_names(name: str, names: ExpertNames, to_disk: Callable[[str], str], num_experts: int) -> list[tuple[int, str, int, str]]:
    """(expert, projection, part, on-disk linear name) for every per-expert linear of experts `name`."""
    base = to_disk(name + ".")[:-1]  # `<layer>.block_sparse_moe.experts` on disk for Mixtral
    out = []
    for e in range(num_experts):
        for part, leaf in enumerate(names.up):
            out.append((e, "up", part, f"{base}.{e}.{leaf}"))
        out.append((e, DOWN, 0, f"{base}.{e}.{names.down}"))
    return out


def experts_to_disk(
    name: str,
    module: nn.Module,
    tensors: dict[str, torch.Tensor],
    model_type: str | None,
    format: str,
    input_scales: str = "per-expert",
) -> dict[str, torch.Tensor]:
    """Replace the in-memory tensors of the experts module `name` in `tensors` (a CPU state dict)
    by their on-disk form; returns the new tensors (other keys unchanged, not yet renamed)."""
    layout = _experts_layout(module)
    names = expert_names(model_type, layout)
    fp8 = isinstance(module, FP8Experts)
    projections = {"up": layout.up, DOWN: DOWN}
    own = {k: tensors.pop(k) for k in list(tensors) if k.startswith(name + ".") and "." not in k[len(name) + 1 :]}
    if fp8 and input_scales == "layer-max":
        for proj in projections.values():
            key = f"{name}.{proj}_input_scale"
            if key in own:
                own[key] = own[key].max().expand_as(own[key]).clone()
    if names is None:  # fused on disk (gpt-oss): weights in the original [E, K, N] layout, scales as they are
        for key, tensor in own.items():
            leaf = key[len(name) + 1 :]
            if leaf in projections.values() and layout.transposed and fp8:
                tensor = tensor.transpose(1, 2).contiguous()
            tensors[key] = tensor
        return tensors
    to_disk, _ = disk_renamer(model_type)
    num_experts = own[f"{name}.{layout.up}"].shape[0]
    for e, which, part, linear in _linear_names(name, names, to_disk, num_experts):
        proj = projections[which]
        weight = own[f"{name}.{proj}"][e]  # (N, K): the whole projection of expert e
        parts = layout.up_parts if which == "up" else 1
        rows = slice(part * weight.shape[0] // parts, (part + 1) * weight.shape[0] // parts)
        bias = own.get(f"{name}.{proj}_bias")
        if bias is not None:
            tensors[f"{linear}.bias"] = bias[e, rows].contiguous()
        if not fp8:
            tensors[f"{linear}.weight"] = weight[rows].contiguous()
            continue
        scale = own[f"{name}.{proj}_weight_scale"][e]  # (parts,) or (N, 1)
        scale = scale[rows] if scale.dim() == 2 else scale[part]
        input_scale = own.get(f"{name}.{proj}_input_scale")
        tensors.update(layer_tensors(linear, weight[rows].contiguous(), scale, None if input_scale is None else input_scale[e], format))
    return tensors


def disk_expert_linears(model: nn.Module, targets: list[str], model_type: str | None) -> dict[str, tuple[int, int]]:
    """For streaming: on-disk linear name -> (N, K) of every per-expert linear of the experts modules
    `targets` of the (meta) `model`. CheckpointError for experts stored fused on disk (gpt-oss)."""
    to_disk, _ = disk_renamer(model_type)
    out = {}
    for name in targets:
        module = model.get_submodule(name)
        layout = experts_layout(module)
        names = expert_names(model_type, layout)
        if names is None:
            raise CheckpointError(
                f"{name}: experts stored fused on disk ({type(module).__name__}, transposed / interleaved layout) "
                "cannot be streamed expert by expert; use the in-memory path (quantize + save_quantized, --no-stream)"
            )
        up = getattr(module, layout.up)  # (E, N, K)
        down = getattr(module, DOWN)
        for e, which, part, linear in _linear_names(name, names, to_disk, up.shape[0]):
            w = up if which == "up" else down
            out[linear] = (w.shape[1] // (layout.up_parts if which == "up" else 1), w.shape[2])
    return out


def _take(tensors: dict[str, torch.Tensor], key: str, where: Path) -> torch.Tensor:
    tensor = tensors.pop(key, None)
    if tensor is None:
        raise CheckpointError(f"{where}: tensor {key} is missing (an expert of a quantized MoE layer)")
    return tensor


def experts_from_disk(model: nn.Module, tensors: dict[str, torch.Tensor], model_type: str | None, config: QuantConfig, where: Path) -> list[str]:
    """Turn the on-disk experts tensors of `tensors` into the in-memory layout of the (meta) `model`, in
    place, swapping in an `FP8Experts` (meta) wherever they are FP8. Returns the names of those modules.

    Also renames Mixtral's ``.block_sparse_moe.`` keys back to ``.mlp.``.
    """
    to_disk, from_disk = disk_renamer(model_type)
    quantized = []
    for name, module in list(model.named_modules()):
        layout = experts_layout(module)
        if layout is None:
            continue
        names = expert_names(model_type, layout)
        up_key = f"{name}.{layout.up}"
        if names is None:  # fused on disk
            fp8 = up_key in tensors and tensors[up_key].dtype == FP8_DTYPE
            if fp8 and layout.transposed:
                for proj in layout.projections:
                    tensors[f"{name}.{proj}"] = _take(tensors, f"{name}.{proj}", where).transpose(1, 2).contiguous()
        else:
            e_count = getattr(module, layout.up).shape[0]
            linears = _linear_names(name, names, to_disk, e_count)
            first = f"{linears[0][3]}.weight"
            if first not in tensors:
                continue  # absent: the missing-tensor check of load_quantized names them
            fp8 = tensors[first].dtype == FP8_DTYPE
            pieces: dict[str, dict] = {}
            for e, which, part, linear in linears:
                proj = layout.up if which == "up" else DOWN
                slot = pieces.setdefault(proj, {"w": [], "s": [], "i": [], "b": []})
                slot["w"].append((e, _take(tensors, f"{linear}.weight", where)))
                if f"{linear}.bias" in tensors:
                    slot["b"].append((e, tensors.pop(f"{linear}.bias")))
                if fp8:
                    slot["s"].append((e, _take(tensors, f"{linear}.weight_scale", where)))
                    if f"{linear}.input_scale" in tensors:
                        slot["i"].append((e, tensors.pop(f"{linear}.input_scale")))
            for proj, slot in pieces.items():
                parts = len(slot["w"]) // e_count

                def per_expert(items, combine):
                    return torch.stack([combine([t for ex, t in items if ex == e]) for e in range(e_count)])

                tensors[f"{name}.{proj}"] = per_expert(slot["w"], torch.cat)  # (E, N, K)
                if slot["b"]:
                    tensors[f"{name}.{proj}_bias"] = per_expert(slot["b"], torch.cat)
                if fp8:
                    channel = slot["s"][0][1].numel() > 1
                    combine = torch.cat if channel else (lambda ts: torch.stack([t.reshape(()) for t in ts]))
                    tensors[f"{name}.{proj}_weight_scale"] = per_expert(slot["s"], combine)  # (E, N, 1) / (E, parts)
                    if slot["i"]:  # gate and up read the same input: one scale (their max) per expert
                        tensors[f"{name}.{proj}_input_scale"] = per_expert(slot["i"], lambda ts: torch.stack([t.reshape(()) for t in ts]).amax())
                del parts
        if fp8:
            scale = tensors.get(f"{name}.{layout.up}_weight_scale")
            granularity = "channel" if scale is not None and scale.dim() == 3 else "tensor"
            static = f"{name}.{layout.up}_input_scale" in tensors
            module_config = QuantConfig(
                weight=granularity,
                activation="static" if static else "dynamic",
                activation_granularity="tensor" if static else config.activation_granularity,
                use_fast_accum=config.use_fast_accum,
            )
            new = FP8Experts.like(module, module_config)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            quantized.append(name)
    for key in [k for k in tensors if from_disk(k) != k]:  # the rest (router, attention, ...) under in-memory names
        tensors[from_disk(key)] = tensors.pop(key)
    return quantized


def disk_state(model: nn.Module, model_type: str | None) -> dict[str, torch.Tensor]:
    """`model.state_dict(keep_vars=True)` under on-disk names: each fused experts module stored per expert
    on disk becomes one meta tensor per expert linear (``<linear>.weight``, ``<linear>.bias``), and
    Mixtral's ``.mlp.`` reads ``.block_sparse_moe.``. Other tensors keep their objects (ties stay visible)."""
    to_disk, _ = disk_renamer(model_type)
    state = model.state_dict(keep_vars=True)
    for name, module in model.named_modules():
        layout = experts_layout(module)
        names = None if layout is None else expert_names(model_type, layout)
        if names is None:
            continue
        fused = {proj: (state.pop(f"{name}.{proj}"), state.pop(f"{name}.{proj}_bias", None)) for proj in layout.projections}
        for e, which, part, linear in _linear_names(name, names, to_disk, fused[layout.up][0].shape[0]):
            weight, bias = fused[layout.up if which == "up" else DOWN]
            rows = weight.shape[1] // (layout.up_parts if which == "up" else 1)
            state[f"{linear}.weight"] = torch.empty(rows, weight.shape[2], dtype=weight.dtype, device="meta")
            if bias is not None:
                state[f"{linear}.bias"] = torch.empty(rows, dtype=bias.dtype, device="meta")
    return {to_disk(key): tensor for key, tensor in state.items()}


def ignored_layers(model: nn.Module, linears: list[str], model_type: str | None) -> list[str]:
    """The checkpoint's list of layers left in high precision, on-disk names: the given nn.Linear names
    and every MoE router gate (vLLM and llm-compressor keep routers unquantized)."""
    to_disk, _ = disk_renamer(model_type)
    return sorted({to_disk(n) for n in linears} | {to_disk(n) for n in router_names(model)})
