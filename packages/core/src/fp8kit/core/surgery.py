"""Model surgery: the one place that swaps `nn.Linear` for `FP8Linear`."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationBatch, calibrate
from .config import QuantConfig
from .errors import CalibrationError, ConfigError, ModelLoadError
from .linear import FP8Linear
from .offload import is_offloaded, materialized, module_device, reoffload_like
from .scaling import amax_to_scale

__all__ = ["QuantReport", "quantize", "select_linears", "attach_kv_scales"]

logger = logging.getLogger(__name__)


@dataclass
class QuantReport:
    """What `quantize` did: quantized layer names, and skipped layer names -> reason."""

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    kv_cache_layers: list[str] = field(default_factory=list)


def select_linears(
    model: nn.Module, config: QuantConfig, *, check_weights: bool = True
) -> tuple[list[str], dict[str, str]]:
    """Names of the `nn.Linear` layers to quantize, and the others with the reason they stay.

    The selection depends only on names and shapes (`config.ignore`, K and N multiples of 16), so it
    also works on a module tree built on the meta device: pass ``check_weights=False`` there to skip
    the weight checks (on the meta device, finite values) that need real weights.
    """
    targets: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        n, k = module.out_features, module.in_features
        if config.is_ignored(name):
            skipped[name] = "ignored by config"
        elif k % 16 or n % 16:
            skipped[name] = f"K={k} or N={n} is not a multiple of 16 (torch._scaled_mm needs both)"
        elif not check_weights:
            targets.append(name)
        elif is_offloaded(module):  # accelerate offload: weights checked when materialized for quantization
            targets.append(name)
        elif module.weight.is_meta:
            raise ModelLoadError(f"layer {name}: weight is on the meta device (offloaded?); load it before quantizing")
        elif not torch.isfinite(module.weight).all():
            raise ModelLoadError(f"layer {name}: weight {tuple(module.weight.shape)} contains NaN or Inf")
        else:
            targets.append(name)
    return targets, skipped


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Point every parent that holds `old` (shared modules included) at `new`."""
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):  # not named_children(): it hides repeats
            if child is old:
                setattr(parent, child_name, new)


def attach_kv_scales(model: nn.Module, key_scale: dict[int, torch.Tensor], value_scale: dict[int, torch.Tensor]) -> list[str]:
    """Register `k_scale` / `v_scale` (fp32 []) on each attention module whose `layer_idx` has scales."""
    names = []
    for name, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if idx in key_scale and hasattr(module, "k_proj"):
            module.register_buffer("k_scale", key_scale[idx].reshape(()).float().clone())
            module.register_buffer("v_scale", value_scale[idx].reshape(()).float().clone())
            names.append(name)
    return names


def quantize(
    model: nn.Module,
    config: QuantConfig | None = None,
    calibration: Iterable[CalibrationBatch] | None = None,
) -> nn.Module:
    """Quantize `model` in place to FP8 per `config` and return it.

    Every `nn.Linear` that is not ignored and whose K and N are multiples of 16 becomes an
    `FP8Linear`, one layer at a time where its weight lives (no second copy of the model).
    `calibration` (an iterable of input-id tensors or dicts of model inputs) is required for
    static activation scales and for KV-cache scales. Sets `model.fp8kit_config` and
    `model.fp8kit_report` (a `QuantReport`).
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"quantize: config must be a QuantConfig, got {type(config).__name__}")
    targets, skipped = select_linears(model, config)
    needs_calibration = config.activation == "static" or config.kv_cache
    if needs_calibration and calibration is None:
        what = "activation='static'" if config.activation == "static" else "kv_cache=True"
        raise CalibrationError(f"quantize: {what} needs calibration data: pass calibration=[input_ids or dicts, ...]")

    input_scales: dict[str, torch.Tensor] = {}
    report = QuantReport(skipped=skipped)
    if needs_calibration:
        observed = targets if config.activation == "static" else []
        stats = calibrate(model, observed, calibration, kv_cache=config.kv_cache)
        input_scales = {name: amax_to_scale(amax) for name, amax in stats.input_amax.items()}
        if config.activation == "static":
            for name in [t for t in targets if t not in input_scales]:
                targets.remove(name)
                skipped[name] = "received no input during calibration, so it has no static scale"
        if config.kv_cache:
            report.kv_cache_layers = attach_kv_scales(
                model,
                {i: amax_to_scale(a) for i, a in stats.key_amax.items()},
                {i: amax_to_scale(a) for i, a in stats.value_amax.items()},
            )

    modules = dict(model.named_modules())
    spread = len({module_device(modules[name]) for name in targets}) > 1  # over GPUs / CPU / disk (accelerate)
    bar = tqdm(targets, desc="Quantizing", unit="layer", disable=len(targets) < 8)
    for name in bar:
        old = modules.pop(name)
        if spread:
            bar.set_postfix_str(module_device(old), refresh=False)
        with materialized(old) as hook:  # offloaded (accelerate): real weights on the execution device meanwhile
            if hook is not None and not torch.isfinite(old.weight).all():
                raise ModelLoadError(f"layer {name}: weight {tuple(old.weight.shape)} contains NaN or Inf")
            new = FP8Linear.from_linear(old, config, input_scales.get(name))
        if hook is not None:
            reoffload_like(new, hook)  # the FP8 tensors go back to the offload map (CPU), not the GPU
        _replace(model, old, new)
        del old
        report.quantized.append(name)
    for name, reason in skipped.items():
        logger.info("kept %s in high precision: %s", name, reason)
    if not report.quantized:
        logger.warning("quantize: no layer was quantized (%d skipped)", len(skipped))
    model.fp8kit_config = config
    model.fp8kit_report = report
    return model
