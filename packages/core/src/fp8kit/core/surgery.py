"""Model surgery: the one place that swaps `nn.Linear` for `FP8Linear` and fused MoE experts for `FP8Experts`."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import smoothing_factors
from .calibration import CalibrationBatch, InputStats, calibrate, calibrate_sequential
from .config import QuantConfig
from .errors import CalibrationError, ConfigError, ModelLoadError
from .experts import FP8Experts, canonical_weight, experts_layout, static_input_scales
from .linear import FP8Linear
from .offload import is_offloaded, materialized, module_device, reoffload_like
from .scaling import amax_to_scale

__all__ = [
    "QuantReport",
    "quantize",
    "select_linears",
    "select_experts",
    "is_router",
    "attach_kv_scales",
    "fold_smoothing",
    "SMOOTHING_MAPS",
    "warn_if_outliers",
    "ZEROED_WARN_SHARE",
]

logger = logging.getLogger(__name__)

ROUTER_NAMES = ("gate", "router")  # the router of an MoE block: a sibling of its `experts`
ROUTER_REASON = "MoE router gate (routing stays in high precision, as in vLLM and llm-compressor)"
UNKNOWN_WARN_SHARE = 0.01  # a high-precision matrix of an unknown module type above this share of the parameters warns

#: `warn_if_outliers` warns when more than this share of a weight's non-zero entries become FP8 zeros.
#: A well-behaved weight (amax a few standard deviations) loses far under 0.1 %.
ZEROED_WARN_SHARE = 0.10


@dataclass
class QuantReport:
    """What `quantize` did.

    quantized: names of the layers now in FP8 (`FP8Linear` and `FP8Experts` modules).
    skipped: names of the linear / experts layers left in high precision -> reason.
    kv_cache_layers: attention modules given static KV-cache scales.
    high_precision: every weight matrix (parameter or buffer of 2 or more dims, biases and FP8
        scales excepted) still in high precision after `quantize` -> reason: the skipped layers'
        weights, embeddings, MoE router gates and matrices of module types fp8kit does not
        quantize. Filled by `summarize`.
    fp8_elements / matrix_elements, fp8_bytes / matrix_bytes: elements and bytes of the FP8 weight
        matrices and of all weight matrices (FP8 included; tied tensors counted once).
    """

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    kv_cache_layers: list[str] = field(default_factory=list)
    high_precision: dict[str, str] = field(default_factory=dict)
    fp8_elements: int = 0
    matrix_elements: int = 0
    fp8_bytes: int = 0
    matrix_bytes: int = 0

    @property
    def fp8_element_share(self) -> float:
        """Share of the model's weight-matrix elements stored in FP8 (0 to 1)."""
        return self.fp8_elements / self.matrix_elements if self.matrix_elements else 0.0

    @property
    def fp8_byte_share(self) -> float:
        """Share of the model's weight-matrix bytes that are FP8 (0 to 1)."""
        return self.fp8_bytes / self.matrix_bytes if self.matrix_bytes else 0.0

    def summarize(self, model: nn.Module) -> None:
        """Fill `high_precision` and the element / byte counts from `model` as it is now.

        Warns (naming it) about every high-precision matrix of a module type fp8kit does not know
        that holds more than 1% of the model's parameters: FP8 misses it silently otherwise.
        """
        self.high_precision, self.fp8_elements, self.matrix_elements, self.fp8_bytes, self.matrix_bytes = {}, 0, 0, 0, 0
        total_params, seen, unknown = 0, set(), []
        modules = dict(model.named_modules())
        for module_name, module in modules.items():
            for tensor_name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
                if key in seen or not tensor.is_floating_point():
                    continue
                seen.add(key)
                total_params += tensor.numel()
                fp8_module = isinstance(module, (FP8Linear, FP8Experts))
                if tensor.dim() < 2 or tensor_name.endswith("bias") or (fp8_module and tensor.element_size() != 1):
                    continue  # not a weight matrix: norms, biases, FP8 scales
                size = tensor.numel() * tensor.element_size()
                self.matrix_elements += tensor.numel()
                self.matrix_bytes += size
                if tensor.dtype == torch.float8_e4m3fn:
                    self.fp8_elements += tensor.numel()
                    self.fp8_bytes += size
                    continue
                full_name = f"{module_name}.{tensor_name}" if module_name else tensor_name
                reason = self._hp_reason(module_name, module, modules)
                self.high_precision[full_name] = reason
                if reason.startswith("unsupported module type"):
                    unknown.append((full_name, tensor.numel()))
        for full_name, numel in unknown:
            if numel > UNKNOWN_WARN_SHARE * total_params:
                logger.warning(
                    "%s (%d elements, %.1f%% of the parameters) stays in high precision: %s",
                    full_name, numel, 100 * numel / total_params, self.high_precision[full_name],
                )

    def _hp_reason(self, name: str, module: nn.Module, modules: dict[str, nn.Module]) -> str:
        if name in self.skipped:
            return self.skipped[name]
        if is_router(name, modules):
            return ROUTER_REASON
        if isinstance(module, nn.Embedding):
            return "embedding (a table lookup, not a GEMM)"
        return f"unsupported module type {type(module).__name__} (fp8kit quantizes nn.Linear and fused MoE experts)"

    def summary(self) -> str:
        """A human-readable summary: FP8 shares, then every high-precision matrix with its reason."""
        lines = [
            f"quantized {len(self.quantized)} layers; FP8 holds {100 * self.fp8_element_share:.1f}% of the weight-matrix "
            f"elements ({self.fp8_elements:,} of {self.matrix_elements:,}) and {100 * self.fp8_byte_share:.1f}% of "
            f"their bytes ({self.fp8_bytes / 2**20:.1f} of {self.matrix_bytes / 2**20:.1f} MiB)",
            f"{len(self.high_precision)} weight matrices kept in high precision:",
        ]
        lines += [f"  {name}: {reason}" for name, reason in self.high_precision.items()]
        return "\n".join(lines)


def is_router(name: str, modules: dict[str, nn.Module]) -> bool:
    """True for the router of an MoE block: a module named `gate` / `router` beside an `experts` module."""
    parent, _, leaf = name.rpartition(".")
    experts = f"{parent}.experts" if parent else "experts"
    return leaf in ROUTER_NAMES and experts in modules


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
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            continue
        n, k = module.out_features, module.in_features
        if is_router(name, modules):
            skipped[name] = ROUTER_REASON
        elif config.is_ignored(name):
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


def select_experts(
    model: nn.Module, config: QuantConfig, *, check_weights: bool = True
) -> tuple[list[str], dict[str, str]]:
    """Names of the fused MoE experts modules to quantize (`experts.experts_layout`), and the others with the reason.

    The rules of `select_linears`, applied to both GEMMs of every expert (gate_up / up and down).
    """
    targets: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        layout = experts_layout(module)
        if layout is None:
            continue
        shapes = {proj: tuple(canonical_weight(module, layout, proj).shape) for proj in layout.projections}
        odd = [f"{proj} [E, N, K] = {list(shape)}" for proj, shape in shapes.items() if shape[1] % 16 or shape[2] % 16]
        if config.is_ignored(name):
            skipped[name] = "ignored by config"
        elif config.weight == "block" or config.activation_granularity == "group":
            skipped[name] = "block-wise FP8 experts are not supported yet (use weight 'tensor' or 'channel')"
        elif odd:
            skipped[name] = f"K or N is not a multiple of 16 (FP8 GEMMs need both): {', '.join(odd)}"
        elif not check_weights or is_offloaded(module):
            targets.append(name)
        else:
            for proj in layout.projections:
                weight = getattr(module, proj)
                if weight.is_meta:
                    raise ModelLoadError(f"layer {name}: {proj} is on the meta device (offloaded?); load it before quantizing")
                if not torch.isfinite(weight).all():
                    raise ModelLoadError(f"layer {name}: {proj} {tuple(weight.shape)} contains NaN or Inf")
            targets.append(name)
    return targets, skipped


def _sibling_expert_scale(name: str, input_scales: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """For a linear of an expert list (`....experts.{e}.<proj>`) that saw no calibration token: the max
    static input scale of the same projection of the other experts of that block (they read the same
    hidden states, or the same kind of intermediate), or None when `name` is no such linear or none saw any."""
    match = re.fullmatch(r"((?:.*\.)?experts)\.(\d+)\.(.+)", name)
    if match is None:
        return None
    prefix, _, suffix = match.groups()
    pattern = re.compile(rf"{re.escape(prefix)}\.\d+\.{re.escape(suffix)}")
    siblings = [scale for other, scale in input_scales.items() if pattern.fullmatch(other)]
    return torch.stack([s.reshape(()) for s in siblings]).max() if siblings else None


def warn_if_outliers(layer: str, weight_hp: torch.Tensor, weight_fp8: torch.Tensor) -> float:
    """Log a warning naming `layer` when its FP8 weight lost most of its values to underflow
    (`scaling.zeroed_fraction` > `ZEROED_WARN_SHARE`: one huge outlier set the scale); returns the share.
    Fused experts ([E, N, K]: one scale set per expert) are judged expert by expert, in one warning that
    names the experts; the worst expert's share is returned."""
    from .scaling import zeroed_fraction

    if weight_hp.dim() == 3:
        shares = [zeroed_fraction(weight_hp[e], weight_fp8[e]) for e in range(weight_hp.shape[0])]
        lost = [e for e, share in enumerate(shares) if share > ZEROED_WARN_SHARE]
        if lost:
            logger.warning(
                "layer %s: in experts %s, up to %.1f%% of the non-zero weights quantize to FP8 zero (set by "
                "outliers); their outputs will be mostly lost: quantize per channel (weight='channel'), ignore the "
                "layer, or fix the weights", layer, lost, 100 * max(shares),
            )  # fmt: skip
        return max(shares, default=0.0)
    share = zeroed_fraction(weight_hp, weight_fp8)
    if share > ZEROED_WARN_SHARE:
        amax = float(weight_hp.abs().amax()) if weight_hp.numel() else 0.0
        logger.warning(
            "layer %s: %.1f%% of its non-zero weights quantize to FP8 zero (weight absmax %.3g, set by outliers); "
            "its outputs will be mostly lost: quantize it per channel (weight='channel'), ignore it, or fix the weight",
            layer, 100 * share, amax,
        )
    return share


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


#: SmoothQuant folds inside a transformers decoder block: (source, layers that read its output), names
#: relative to the block. A norm source divides its weight (and bias) by the factors; a Linear source
#: divides its output rows; the layers multiply their input columns: the block computes the same function.
SMOOTHING_MAPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


def _foldable(source: nn.Module, channels: int) -> str | None:
    """Why `source`'s output cannot absorb per-channel factors, or None when it can."""
    if isinstance(source, nn.Linear):
        return None if source.out_features == channels else f"has {source.out_features} outputs, not {channels}"
    weight = getattr(source, "weight", None)
    name = type(source).__name__
    if not isinstance(weight, torch.Tensor) or weight.shape != (channels,):
        return f"{name} has no per-channel weight of {channels} elements"
    if "Gemma" in name:
        return f"{name} scales by (1 + weight), which a factor on its weight does not fold into"
    if not (name.endswith("RMSNorm") or isinstance(source, nn.LayerNorm)):
        return f"{name} is not a known norm (RMSNorm or LayerNorm)"
    return None


@torch.no_grad()
def fold_smoothing(source: nn.Module, layers: list[nn.Linear], factors: torch.Tensor) -> None:
    """Divide `source`'s output channels by `factors` [K] and multiply `layers`' input columns by them.

    source: a norm (RMSNorm / LayerNorm: weight and bias divided) or an `nn.Linear` (output rows and
    bias divided) whose output is the input of every layer in `layers`. In exact arithmetic the model
    computes the same function; in floating point it differs by the rounding of the products.
    """
    inverse = 1.0 / factors.float()
    if isinstance(source, nn.Linear):
        source.weight.copy_(source.weight.float() * inverse[:, None])
    else:
        source.weight.copy_(source.weight.float() * inverse)
    if getattr(source, "bias", None) is not None:
        source.bias.copy_(source.bias.float() * inverse)
    for layer in layers:
        layer.weight.copy_(layer.weight.float() * factors.float()[None, :])


def _smooth(model: nn.Module, stats: dict[str, InputStats], alpha: float) -> None:
    """Apply `SMOOTHING_MAPS` to the layers in `stats` (one block) and rescale their statistics."""
    for source_suffix, layer_suffixes in SMOOTHING_MAPS:
        for name in [n for n in stats if n.endswith("." + layer_suffixes[0]) or n == layer_suffixes[0]]:
            prefix = name[: len(name) - len(layer_suffixes[0])]
            names = [prefix + suffix for suffix in layer_suffixes]
            source_name = prefix + source_suffix
            if not all(n in stats for n in names):
                logger.info("no smoothing into %s: not every one of %s is quantized", source_name, names)
                continue
            try:
                source = model.get_submodule(source_name)
            except AttributeError:
                continue
            layers = [model.get_submodule(n) for n in names]
            channels = layers[0].in_features
            reason = _foldable(source, channels)
            if reason is not None:
                logger.info("no smoothing into %s: %s", source_name, reason)
                continue
            weight_amax = torch.stack([layer.weight.detach().abs().amax(dim=0).float() for layer in layers]).amax(dim=0)
            factors = smoothing_factors(stats[names[0]].channel_amax, weight_amax, alpha)  # [K]
            fold_smoothing(source, layers, factors)
            for n in names:
                stats[n].rescale(factors)


def _swap(
    model: nn.Module,
    old: nn.Module,
    name: str,
    config: QuantConfig,
    input_scale: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    expert_scales: dict[str, torch.Tensor] | None = None,
    experts: bool = False,
) -> None:
    """Replace `old` (named `name`: an `nn.Linear`, or fused experts when `experts`) by its FP8 module, where
    its weights live; `hessian` of the inputs for GPTQ."""
    with materialized(old) as hook:  # offloaded (accelerate): real weights on the execution device meanwhile
        if experts:
            new = FP8Experts.from_experts(old, config, expert_scales)
            layout = experts_layout(old)
            for proj in layout.projections:
                warn_if_outliers(f"{name}.{proj}", canonical_weight(old, layout, proj).detach(), getattr(new, proj))
        else:
            if hook is not None and not torch.isfinite(old.weight).all():
                raise ModelLoadError(f"layer {name}: weight {tuple(old.weight.shape)} contains NaN or Inf")
            new = FP8Linear.from_linear(old, config, input_scale, hessian)
            warn_if_outliers(name, old.weight.detach(), new.weight)
    if hook is not None:
        reoffload_like(new, hook)  # the FP8 tensors go back to the offload map (CPU), not the GPU
    _replace(model, old, new)


def quantize(
    model: nn.Module,
    config: QuantConfig | None = None,
    calibration: Iterable[CalibrationBatch] | None = None,
) -> nn.Module:
    """Quantize `model` in place to FP8 per `config` and return it.

    Every `nn.Linear` that is not ignored and whose K and N are multiples of 16 becomes an
    `FP8Linear`, and every fused MoE experts module (transformers 5's 3-D `gate_up_proj` /
    `down_proj`, `experts.experts_layout`) an `FP8Experts`, one layer at a time where its weights
    live (no second copy of the model). MoE router gates stay in high precision. `calibration`
    (an iterable of input-id tensors or dicts of model inputs) is required for static activation
    scales, KV-cache scales, GPTQ and smoothing (`config.needs_calibration`). With GPTQ or smoothing
    (`config.sequential`) layers are calibrated and quantized decoder block by decoder block, each on the
    inputs the already-quantized blocks before it produce (`calibration.calibrate_sequential`); static
    scales then come from those inputs too. Sets `model.fp8kit_config` and `model.fp8kit_report` (a
    `QuantReport`, whose `summary()` gives the FP8 share and every high-precision matrix).
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"quantize: config must be a QuantConfig, got {type(config).__name__}")
    done = [name for name, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))]
    if done:
        raise ConfigError(
            f"quantize: the model is already quantized ({len(done)} FP8 layers, e.g. {done[0]}); quantizing "
            "again would mix two configurations in one checkpoint: quantize the original model instead"
        )
    targets, skipped = select_linears(model, config)
    expert_targets, expert_skipped = select_experts(model, config)
    skipped.update(expert_skipped)
    if config.needs_calibration and calibration is None:
        what = (
            "activation='static'" if config.activation == "static"
            else "kv_cache=True" if config.kv_cache
            else f"algorithm={config.algorithm!r}" if config.algorithm == "gptq"
            else "smoothing"
        )
        raise CalibrationError(f"quantize: {what} needs calibration data: pass calibration=[input_ids or dicts, ...]")
    if config.sequential and expert_targets:
        raise ConfigError(
            f"quantize: algorithm={config.algorithm!r} / smoothing={config.smoothing!r} do not handle fused MoE experts "
            f"yet ({expert_targets[:3]}...): use algorithm='max' / 'mse' without smoothing, or ignore the experts"
        )
    if config.needs_calibration:
        calibration = list(calibration)  # may be read twice (KV scales, then block by block)
    static_in_one_pass = config.activation == "static" and not config.sequential

    input_scales: dict[str, torch.Tensor] = {}
    expert_scales: dict[str, dict[str, torch.Tensor]] = {}
    report = QuantReport(skipped=skipped)
    if static_in_one_pass or config.kv_cache:
        static = static_in_one_pass
        stats = calibrate(
            model,
            targets if static else [],
            calibration,
            kv_cache=config.kv_cache,
            experts=expert_targets if static else [],
            all_experts=config.calibrate_all_experts,
        )
        input_scales = {name: amax_to_scale(amax) for name, amax in stats.input_amax.items()}
        expert_scales = {
            name: {proj: static_input_scales(amax, tokens, f"{name}.{proj}") for proj, (amax, tokens) in per_proj.items()}
            for name, per_proj in stats.expert_amax.items()
        }
        if static:
            for name in [t for t in targets if t not in input_scales]:
                sibling = _sibling_expert_scale(name, input_scales)
                if sibling is not None:
                    logger.info("%s saw no calibration token: static scale = max over its sibling experts", name)
                    input_scales[name] = sibling
                else:
                    targets.remove(name)
                    skipped[name] = "received no input during calibration, so it has no static scale"
        if config.kv_cache:
            report.kv_cache_layers = attach_kv_scales(
                model,
                {i: amax_to_scale(a) for i, a in stats.key_amax.items()},
                {i: amax_to_scale(a) for i, a in stats.value_amax.items()},
            )

    modules = dict(model.named_modules())
    if config.sequential:

        def on_block(stats: dict[str, InputStats]) -> None:
            if config.smoothing is not None:
                _smooth(model, stats, config.smoothing)
            for name, layer_stats in stats.items():
                static_scale = amax_to_scale(layer_stats.channel_amax.max()) if config.activation == "static" else None
                _swap(model, modules.pop(name), name, config, static_scale, layer_stats.hessian)
                report.quantized.append(name)

        calibrate_sequential(model, targets, calibration, on_block, hessians=config.algorithm == "gptq")
        for name in [t for t in targets if t not in report.quantized]:
            skipped[name] = "received no input during calibration, so it has no statistics"
    else:
        spread = len({module_device(modules[name]) for name in targets + expert_targets}) > 1  # GPUs / CPU / disk
        scheme = f"{config.activation} {config.activation_granularity} activations, {config.weight} weights"
        bar = tqdm(targets + expert_targets, desc=f"quantizing: {scheme}", unit="layer", disable=len(targets) < 8)
        for name in bar:
            if spread:
                bar.set_postfix_str(module_device(modules[name]), refresh=False)
            experts = name in expert_targets
            _swap(model, modules.pop(name), name, config, input_scales.get(name),
                  expert_scales=expert_scales.get(name), experts=experts)
            report.quantized.append(name)
    for name, reason in skipped.items():
        logger.info("kept %s in high precision: %s", name, reason)
    if not report.quantized:
        logger.warning("quantize: no layer was quantized (%d skipped)", len(skipped))
    report.summarize(model)
    model.fp8kit_config = config
    model.fp8kit_report = report
    return model
