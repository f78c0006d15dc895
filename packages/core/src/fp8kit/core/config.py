"""Quantization configuration: frozen, validated data. Behaviour lives in `surgery` and `linear`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

__all__ = ["QuantConfig", "WeightGranularity", "ActivationScheme", "ActivationGranularity"]

WeightGranularity = Literal["tensor", "channel"]
ActivationScheme = Literal["dynamic", "static"]
ActivationGranularity = Literal["tensor", "token"]

_CHOICES = {
    "weight": ("tensor", "channel"),
    "activation": ("dynamic", "static"),
    "activation_granularity": ("tensor", "token"),
}


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model to FP8 E4M3.

    weight: "tensor" (one scale per weight) or "channel" (one scale per output row, [N,1]).
    activation: "dynamic" (scale computed from each input at run time) or "static"
        (one per-tensor scale per layer, from calibration).
    activation_granularity: "tensor" or "token" (one scale per row of the input; dynamic only).
    ignore: module names to keep in high precision: exact qualified names, or regexes written
        as "re:<pattern>" (matched with `re.fullmatch`).
    kv_cache: also calibrate per-layer static FP8 scales of the attention keys and values.
    use_fast_accum: `_scaled_mm`'s fast accumulation (faster on Hopper, slightly less accurate).
    """

    weight: WeightGranularity = "tensor"
    activation: ActivationScheme = "dynamic"
    activation_granularity: ActivationGranularity = "tensor"
    ignore: tuple[str, ...] = field(default=("re:.*lm_head",))
    kv_cache: bool = False
    use_fast_accum: bool = False

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"QuantConfig.{name}={value!r} is not one of {list(choices)}")
        if self.activation == "static" and self.activation_granularity == "token":
            raise ConfigError(
                "QuantConfig: activation_granularity='token' needs activation='dynamic' "
                "(static scales are per tensor)"
            )
        if isinstance(self.ignore, str):
            raise ConfigError("QuantConfig.ignore must be a list of names or 're:' patterns, not one string")
        object.__setattr__(self, "ignore", tuple(self.ignore))
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ConfigError(f"QuantConfig.ignore: bad regex {pattern!r}: {exc}") from exc

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
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        """The inverse of `to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"QuantConfig: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
