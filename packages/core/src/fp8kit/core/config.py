"""Quantization configuration: frozen, validated data. Behaviour lives in `surgery` and `linear`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

__all__ = ["QuantConfig", "WeightGranularity", "ActivationScheme", "ActivationGranularity", "Algorithm"]

WeightGranularity = Literal["tensor", "channel", "block"]
ActivationScheme = Literal["dynamic", "static"]
ActivationGranularity = Literal["tensor", "token", "group"]
Algorithm = Literal["max", "mse", "gptq"]

_CHOICES = {
    "weight": ("tensor", "channel", "block"),
    "activation": ("dynamic", "static"),
    "activation_granularity": ("tensor", "token", "group"),
    "algorithm": ("max", "mse", "gptq"),
}


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model to FP8 E4M3.

    weight: "tensor" (one scale per weight), "channel" (one scale per output row, [N,1]) or
        "block" (one scale per `block_size` block of [N, K], DeepSeek-V3 style; needs
        activation_granularity="group").
    activation: "dynamic" (scale computed from each input at run time) or "static"
        (one per-tensor scale per layer, from calibration).
    activation_granularity: "tensor", "token" (one scale per row of the input; dynamic only) or
        "group" (one scale per 1 x `group_size` group of a row along K; dynamic, block weights only).
    block_size: (rows, cols) of a weight block for weight="block", default (128, 128).
    group_size: elements per activation group along K for "group"; must equal block_size[1].
    ignore: module names to keep in high precision: exact qualified names, or regexes written
        as "re:<pattern>" (matched with `re.fullmatch`).
    kv_cache: also calibrate per-layer static FP8 scales of the attention keys and values.
    use_fast_accum: `_scaled_mm`'s fast accumulation (faster on Hopper, slightly less accurate).
    calibrate_all_experts: with static activations, every expert of a fused MoE experts module sees
        every calibration token (only the routed outputs flow on, as llm-compressor's
        `moe_calibrate_all_experts`), so each expert gets scales from the layer's real inputs.
        False: each expert sees only the tokens routed to it (an expert that saw none takes the
        largest scale of its layer's other experts: see `experts.static_input_scales`).
    algorithm: how weights are rounded (README "Choosing an algorithm"): "max" (scale = absmax / 448,
        round to nearest), "mse" (the scale among clipped / shifted candidates with the least squared
        weight error; no data needed), "gptq" (GPTQ on the FP8 grid with MSE scales: needs calibration
        data, layers calibrated block by block on the already-quantized model's inputs).
    smoothing: SmoothQuant migration strength alpha in [0, 1], or None (off): per-channel activation
        range moved into the weights and folded into the preceding norm / projection, so the
        unquantized model computes the same function. Needs calibration data.
    gptq_block_size / gptq_dampening / gptq_act_order: GPTQ's lazy-update block (columns), diagonal
        dampening (fraction of the mean Hessian diagonal) and column order (decreasing Hessian
        diagonal; codes are saved in the original order either way).
    """

    weight: WeightGranularity = "tensor"
    activation: ActivationScheme = "dynamic"
    activation_granularity: ActivationGranularity = "tensor"
    ignore: tuple[str, ...] = field(default=("re:.*lm_head",))
    kv_cache: bool = False
    use_fast_accum: bool = False
    block_size: tuple[int, int] = (128, 128)
    group_size: int = 128
    calibrate_all_experts: bool = True
    algorithm: Algorithm = "max"
    smoothing: float | None = None
    gptq_block_size: int = 128
    gptq_dampening: float = 0.01
    gptq_act_order: bool = False

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise ConfigError(f"QuantConfig.{name}={value!r} is not one of {list(choices)}")
        for name in ("kv_cache", "use_fast_accum", "calibrate_all_experts", "gptq_act_order"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # "no" is truthy: never guess a flag from a string or a number
                raise ConfigError(f"QuantConfig.{name}={value!r} must be True or False, not {type(value).__name__}")
        self._check_blocks()
        if self.activation == "static" and self.weight == "block":
            raise ConfigError(
                "QuantConfig: weight='block' needs activation='dynamic': block-wise checkpoints quantize "
                "activations per 1 x group_size group at run time (vLLM, transformers and torch's block-wise "
                "GEMM take no static scales); use activation='dynamic', activation_granularity='group'"
            )
        if self.activation == "static" and self.activation_granularity in ("token", "group"):
            raise ConfigError(
                f"QuantConfig: activation_granularity={self.activation_granularity!r} needs activation='dynamic' "
                "(static scales are per tensor)"
            )
        if (self.weight == "block") != (self.activation_granularity == "group"):
            raise ConfigError(
                f"QuantConfig: weight={self.weight!r} with activation_granularity={self.activation_granularity!r}: "
                "block weights go with 1 x group_size activation groups and nothing else (the pairing torch's "
                "block-wise GEMM, vLLM and transformers run); use weight='block', activation_granularity='group'"
            )
        for name, types, kind in (
            ("smoothing", (int, float, type(None)), "a number"),
            ("gptq_dampening", (int, float), "a number"),
            ("gptq_block_size", (int,), "an int"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, types):  # True is an int: refused as well
                raise ConfigError(f"QuantConfig.{name}={value!r} must be {kind}, not {type(value).__name__}")
        if self.smoothing is not None and not 0.0 <= self.smoothing <= 1.0:
            raise ConfigError(f"QuantConfig.smoothing={self.smoothing!r} must be None or an alpha in [0, 1]")
        if self.gptq_block_size < 1:
            raise ConfigError(f"QuantConfig.gptq_block_size={self.gptq_block_size!r} must be a positive number of columns")
        if not 0.0 <= self.gptq_dampening < 1.0:
            raise ConfigError(f"QuantConfig.gptq_dampening={self.gptq_dampening!r} must be in [0, 1) (e.g. 0.01)")
        if isinstance(self.ignore, str) or not isinstance(self.ignore, (list, tuple)):
            raise ConfigError(
                f"QuantConfig.ignore must be a list of names or 're:' patterns, not {type(self.ignore).__name__}"
            )
        object.__setattr__(self, "ignore", tuple(self.ignore))
        for pattern in self.ignore:
            if not isinstance(pattern, str):
                raise ConfigError(
                    f"QuantConfig.ignore: entry {pattern!r} is a {type(pattern).__name__}; "
                    "entries are module names or 're:' patterns (strings)"
                )
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ConfigError(f"QuantConfig.ignore: bad regex {pattern!r}: {exc}") from exc

    def _check_blocks(self) -> None:
        block = self.block_size
        if isinstance(block, list):  # from JSON
            block = tuple(block)
        if (
            not isinstance(block, tuple)
            or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise ConfigError(f"QuantConfig.block_size={self.block_size!r} must be two positive ints (rows, cols)")
        object.__setattr__(self, "block_size", block)
        group = self.group_size
        if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
            raise ConfigError(f"QuantConfig.group_size={group!r} must be a positive int")
        if self.weight == "block":
            if any(b % 16 for b in block):
                raise ConfigError(
                    f"QuantConfig.block_size={block} must be multiples of 16 (FP8 GEMM tiles); the common one is (128, 128)"
                )
            if group != block[1]:
                raise ConfigError(
                    f"QuantConfig.group_size={group} must equal block_size[1]={block[1]} (the activation groups "
                    "along K line up with the weight blocks, as every block-wise FP8 GEMM needs)"
                )
    @property
    def needs_calibration(self) -> bool:
        """True when quantizing needs calibration data (static scales, KV scales, GPTQ or smoothing)."""
        return self.activation == "static" or self.kv_cache or self.algorithm == "gptq" or self.smoothing is not None

    @property
    def sequential(self) -> bool:
        """True when layers are calibrated block by block on the partly quantized model (GPTQ, smoothing)."""
        return self.algorithm == "gptq" or self.smoothing is not None

    def is_ignored(self, name: str) -> bool:
        """True when the module `name` matches an `ignore` entry."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], name):
                    return True
            elif pattern == name:
                return True
        return False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of every field."""
        out = dataclasses.asdict(self)
        out["ignore"] = list(self.ignore)
        out["block_size"] = list(self.block_size)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        """The inverse of `to_dict`; unknown keys are an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"QuantConfig: expected an object of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"QuantConfig: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
