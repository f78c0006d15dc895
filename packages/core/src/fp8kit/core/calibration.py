"""Calibration: observe absmax of unquantized activations (and KV-cache entries) over sample inputs."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import CalibrationError
from .experts import expert_input_amax
from .offload import execution_device

__all__ = ["CalibrationStats", "InputStats", "calibrate", "calibrate_sequential", "decoder_blocks", "as_model_inputs"]

logger = logging.getLogger(__name__)

CalibrationBatch = torch.Tensor | Mapping[str, Any]


@dataclass
class CalibrationStats:
    """Absmax observed during calibration (fp32 0-dim tensors), over valid (unmasked) positions only.

    input_amax: qualified Linear name -> max over batches of the input's absmax.
    expert_amax: fused experts module name -> projection -> (absmax fp32 [E], tokens int64 [E]):
        each expert's input absmax and how many tokens it saw (0: never routed, absmax 0).
    key_amax / value_amax: attention `layer_idx` -> absmax of keys / values entering the KV cache.
    """

    input_amax: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_amax: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    key_amax: dict[int, torch.Tensor] = field(default_factory=dict)
    value_amax: dict[int, torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    tokens: int = 0


def as_model_inputs(batch: CalibrationBatch, device: torch.device) -> dict[str, Any]:
    """A calibration item as keyword arguments on `device`: a tensor is taken as `input_ids`."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch.unsqueeze(0) if batch.dim() == 1 else batch}
    elif not isinstance(batch, Mapping):
        raise CalibrationError(
            f"calibration item of type {type(batch).__name__} is not a tensor of input ids or a dict of model inputs"
        )
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _check_item(index: int, inputs: dict[str, Any], vocab_size: int | None) -> None:
    """Reject calibration item `index` when it has no tokens or token ids outside the vocabulary."""
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return
    if ids.numel() == 0:
        raise CalibrationError(f"calibration item {index}: input_ids of shape {tuple(ids.shape)} holds no tokens")
    if ids.is_floating_point() or ids.is_complex():
        raise CalibrationError(f"calibration item {index}: input_ids must be integer token ids, got {ids.dtype}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise CalibrationError(
            f"calibration item {index}: token ids span [{low}, {high}], outside the model's vocabulary "
            f"[0, {vocab_size}): tokenized with another model's tokenizer?"
        )


def _update_max(store: dict, key: Any, value: torch.Tensor) -> None:
    value = value.detach().float()
    store[key] = value if key not in store else torch.maximum(store[key], value)


def _valid_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of `x` [..., K] as [R, K], dropping positions the attention mask excludes.

    The mask [B, T] applies when the leading dims of `x` flatten to B*T rows (all Linear inputs
    of a transformer); otherwise every row counts.
    """
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None and rows.shape[0] == mask.numel():
        rows = rows[mask.reshape(-1).to(rows.device)]  # layers of a model split over GPUs see the mask of GPU 0
    return rows


def _observe_kv(cache: Any, stats: CalibrationStats, state: dict) -> None:
    """Wrap this cache instance's `update` to record keys / values as they enter it (after RoPE)."""
    update = cache.update

    def observing_update(key_states, value_states, layer_idx, *args, **kwargs):
        mask = state["mask"]
        for store, states in ((stats.key_amax, key_states), (stats.value_amax, value_states)):
            tokens = states.transpose(1, 2)  # (B, H, T, D) -> (B, T, H, D)
            if mask is not None and tokens.shape[:2] == mask.shape:
                tokens = tokens[mask.to(tokens.device)]  # (valid tokens, H, D)
            if tokens.numel():
                _update_max(store, layer_idx, tokens.abs().amax())
        return update(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = observing_update


class _StopBeforeHead(Exception):
    """Raised by a pre-hook on the output head: calibration needs no logits."""


def _stop_before_head(module: nn.Module, args: tuple) -> None:
    raise _StopBeforeHead


def _output_head(model: nn.Module, modules: dict[str, nn.Module]) -> tuple[str, nn.Module] | None:
    """(name, module) of the model's output head (`get_output_embeddings`, e.g. lm_head), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        return None
    return next(((name, m) for name, m in modules.items() if m is head), None)


def _progress_label(calibration: Iterable[CalibrationBatch]) -> str:
    """The progress bar's label: "calibrating: 32 batches x 512 tokens" when the data says so."""
    if not isinstance(calibration, (list, tuple)) or not calibration:
        return "calibrating"
    first = calibration[0]
    ids = first if isinstance(first, torch.Tensor) else first.get("input_ids") if isinstance(first, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() == 0:
        return f"calibrating: {len(calibration)} batches"
    rows = ids.shape[0] if ids.dim() > 1 else 1
    return f"calibrating: {len(calibration)} batches x {f'{rows} x ' if rows > 1 else ''}{ids.shape[-1]} tokens"


def _cache_kwarg(model: nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use the name this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def calibrate(
    model: nn.Module,
    layer_names: list[str],
    calibration: Iterable[CalibrationBatch],
    *,
    kv_cache: bool = False,
    experts: list[str] = (),
    all_experts: bool = True,
) -> CalibrationStats:
    """Run `calibration` through the unquantized `model`, recording input absmax of `layer_names`.

    Padding excluded: positions where `attention_mask` is 0 do not count, so a right-padded batch
    gives the same statistics as its sequences one by one. With `kv_cache`, keys and values are
    observed as they enter a transformers cache (after RoPE), as vLLM applies its KV scales.
    experts: fused MoE experts modules whose per-expert inputs to observe (`experts.expert_input_amax`);
    with `all_experts` every expert sees every token (the model's outputs stay the routed ones).
    The forward stops before the output head (`get_output_embeddings`, e.g. lm_head) unless it is
    one of `layer_names`: no scale needs the logits (a fifth of SmolLM2-135M's forward).
    """
    stats = CalibrationStats()
    state: dict[str, torch.Tensor | None] = {"mask": None}
    modules = dict(model.named_modules())
    missing = [name for name in layer_names if name not in modules]
    if missing:
        raise CalibrationError(f"calibrate: no modules named {missing}")

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            rows = _valid_rows(args[0], state["mask"])
            if rows.numel():
                _update_max(stats.input_amax, name, rows.abs().amax())

        return hook

    def make_experts_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, top_k_index = (list(args) + list(kwargs.values()))[:2]  # (T, H), (T, k)
            mask = state["mask"]
            valid = mask.reshape(-1) if mask is not None and mask.numel() == hidden.shape[0] else None
            store = stats.expert_amax.setdefault(name, {})
            for proj, (amax, tokens) in expert_input_amax(module, hidden, top_k_index, valid, all_experts).items():
                old_amax, old_tokens = store.get(proj, (torch.zeros_like(amax), torch.zeros_like(tokens)))
                store[proj] = (torch.maximum(old_amax, amax), old_tokens + tokens)

        return hook

    missing = [name for name in experts if name not in modules]
    if missing:
        raise CalibrationError(f"calibrate: no experts modules named {missing}")
    handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in layer_names]
    handles += [modules[n].register_forward_pre_hook(make_experts_hook(n), with_kwargs=True) for n in experts]
    head = _output_head(model, modules)
    if head is not None and head[0] not in layer_names:  # registered last: the head's own observer runs first
        handles.append(head[1].register_forward_pre_hook(_stop_before_head))
    device = execution_device(model)  # offloaded (accelerate) models: where their hooks run the forward
    was_training = model.training
    model.eval()
    try:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        for index, batch in enumerate(tqdm(calibration, desc=_progress_label(calibration), unit="batch")):
            inputs = as_model_inputs(batch, device)
            _check_item(index, inputs, vocab_size)
            mask = inputs.get("attention_mask")
            state["mask"] = mask.bool() if mask is not None else None
            if kv_cache:
                from transformers import DynamicCache

                cache = DynamicCache(config=getattr(model, "config", None))
                _observe_kv(cache, stats, state)
                inputs = {**inputs, _cache_kwarg(model): cache, "use_cache": True}
            try:
                model(**inputs)
            except _StopBeforeHead:
                pass
            stats.batches += 1
            ids = inputs.get("input_ids")
            stats.tokens += int(state["mask"].sum()) if state["mask"] is not None else (ids.numel() if ids is not None else 0)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if stats.batches == 0:
        raise CalibrationError("calibration data is empty: give at least one batch of model inputs")
    if (layer_names or experts) and not stats.input_amax and not stats.expert_amax:
        raise CalibrationError(
            f"calibration: none of the {len(layer_names)} layers saw an unmasked input position in {stats.batches} "
            "batch(es): is every position masked out (attention_mask all 0)?"
        )
    for name, amax in stats.input_amax.items():
        if not torch.isfinite(amax):
            raise CalibrationError(f"layer {name}: calibration saw a non-finite input absmax ({amax.item()})")
    attention = {getattr(m, "layer_idx", None): name for name, m in model.named_modules() if hasattr(m, "k_proj")}
    for what, store in (("keys", stats.key_amax), ("values", stats.value_amax)):
        for idx, amax in store.items():
            if not torch.isfinite(amax):
                raise CalibrationError(
                    f"layer {attention.get(idx, f'with layer_idx {idx}')}: calibration saw non-finite {what} entering "
                    f"the KV cache (absmax {amax.item()}); its FP8 KV scale would be {amax.item()}: check the model's "
                    "weights and the calibration inputs"
                )
    if kv_cache and not stats.key_amax:
        raise CalibrationError(
            "kv_cache=True but no keys or values reached a transformers cache during calibration: "
            "the model does not use `past_key_values`"
        )
    logger.info("calibrated on %d batches, %d tokens", stats.batches, stats.tokens)
    return stats


@dataclass
class InputStats:
    """What one Linear's inputs looked like over the calibration tokens (unmasked rows only).

    channel_amax: fp32 [K], the absmax of each input channel. hessian: fp32 [K, K], the second
    moment ``sum x x^T / tokens`` (None when not asked for). tokens: rows seen.
    """

    channel_amax: torch.Tensor
    hessian: torch.Tensor | None = None
    tokens: int = 0

    def add(self, rows: torch.Tensor) -> None:
        """Fold in rows [R, K] of the input."""
        rows = rows.float()
        self.channel_amax = torch.maximum(self.channel_amax, rows.abs().amax(dim=0))
        if self.hessian is not None:
            total = self.tokens + rows.shape[0]
            self.hessian.mul_(self.tokens / total).addmm_(rows.t(), rows, alpha=1.0 / total)  # running mean
        self.tokens += rows.shape[0]

    def rescale(self, factors: torch.Tensor) -> None:
        """The statistics of the input divided by `factors` [K] per channel (after smoothing)."""
        self.channel_amax = self.channel_amax / factors
        if self.hessian is not None:
            inverse = 1.0 / factors
            self.hessian = self.hessian * inverse[:, None] * inverse[None, :]


class _Captured(Exception):
    """Raised by the hook on the first block: its inputs are recorded, the rest of the model is not run."""


def decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of repeated blocks (transformers' decoder layers): the longest `nn.ModuleList`."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and (best is None or len(module) > len(best)):
            best = module
    return best


@torch.no_grad()
def calibrate_sequential(
    model: nn.Module,
    layer_names: list[str],
    calibration: Iterable[CalibrationBatch],
    on_block: Callable[[dict[str, InputStats]], None],
    *,
    hessians: bool,
) -> int:
    """Calibrate block by block: `on_block` sees each block's input statistics and may quantize it.

    The calibration inputs of the first decoder block are recorded once; then, for each block in
    order, its forward on those inputs gathers `InputStats` of its layers in `layer_names`,
    `on_block(stats)` runs (surgery swaps the block's layers there), and the block's forward again,
    now quantized, gives the next block's inputs. So each layer is calibrated on inputs that carry
    the error of the layers quantized before it (as GPTQ does), and memory holds one block's
    statistics (with `hessians`, a [K, K] matrix per layer) plus the hidden states of the
    calibration tokens. Layers outside the blocks, or a model without a block stack, are calibrated
    in one pass over the whole model instead. Returns the number of calibration tokens.
    """
    modules = dict(model.named_modules())
    missing = [name for name in layer_names if name not in modules]
    if missing:
        raise CalibrationError(f"calibrate_sequential: no modules named {missing}")
    device = execution_device(model)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    blocks = decoder_blocks(model)
    block_of = {}
    if blocks is not None:
        for index, block in enumerate(blocks):
            for name, module in block.named_modules():
                block_of[id(module)] = index
    outside = [name for name in layer_names if id(modules[name]) not in block_of]
    state: dict[str, torch.Tensor | None] = {"mask": None}
    cached: list[tuple[tuple, dict[str, Any], torch.Tensor | None]] = []  # (args, kwargs, mask) of block 0

    def observe(names: list[str]) -> tuple[dict[str, InputStats], list]:
        stats: dict[str, InputStats] = {}

        def make_hook(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                rows = _valid_rows(args[0], state["mask"])  # (R, K)
                if name not in stats:
                    k = rows.shape[-1]
                    h = torch.zeros(k, k, device=rows.device) if hessians else None
                    stats[name] = InputStats(torch.zeros(k, device=rows.device), h)
                if rows.numel():
                    stats[name].add(rows)

            return hook

        return stats, [modules[name].register_forward_pre_hook(make_hook(name)) for name in names]

    def capture(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        cached.append((tuple(args), dict(kwargs), state["mask"]))
        raise _Captured

    outside_stats, handles = observe(outside)
    if blocks is not None:
        handles.append(blocks[0].register_forward_pre_hook(capture, with_kwargs=True))
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for index, batch in enumerate(tqdm(calibration, desc="Calibrating inputs", unit="batch")):
            inputs = as_model_inputs(batch, device)
            _check_item(index, inputs, vocab_size)
            mask = inputs.get("attention_mask")
            state["mask"] = mask.bool() if mask is not None else None
            try:
                model(**inputs, use_cache=False)
            except _Captured:
                pass
            ids = inputs.get("input_ids")
            tokens += int(state["mask"].sum()) if state["mask"] is not None else (ids.numel() if ids is not None else 0)
        if tokens == 0 and not cached:
            raise CalibrationError("calibration data is empty: give at least one batch of model inputs")
        for handle in handles:
            handle.remove()
        handles = []
        if outside_stats or outside:
            on_block(outside_stats)
        if blocks is not None:
            for index, block in enumerate(tqdm(blocks, desc="Quantizing blocks", unit="block")):
                names = [name for name in layer_names if block_of.get(id(modules[name])) == index]
                stats, handles = observe(names)
                for args, kwargs, mask in cached:
                    state["mask"] = mask
                    block(*args, **kwargs)
                for handle in handles:
                    handle.remove()
                handles = []
                empty = [name for name in names if name not in stats or stats[name].tokens == 0]
                if empty:
                    raise CalibrationError(f"calibration: layers {empty} saw no unmasked input position")
                on_block(stats)
                if index + 1 < len(blocks):
                    for i, (args, kwargs, mask) in enumerate(cached):
                        out = block(*args, **kwargs)
                        hidden = out[0] if isinstance(out, tuple) else out
                        cached[i] = ((hidden, *args[1:]), kwargs, mask)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    logger.info("calibrated block by block on %d tokens", tokens)
    return tokens
