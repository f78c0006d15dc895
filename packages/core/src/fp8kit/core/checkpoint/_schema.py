"""What every checkpoint format shares: fp8kit's own ``quantization_config.fp8kit`` block (versioned)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import QuantConfig
from ..errors import CheckpointError, ConfigError

FORMAT_VERSION = 1


def fp8kit_block(config: QuantConfig) -> dict[str, Any]:
    """The ``fp8kit`` entry of a quantization_config: format_version and the full QuantConfig."""
    return {"format_version": FORMAT_VERSION, "config": config.to_dict()}


def read_fp8kit_block(qc: dict[str, Any], where: Path) -> QuantConfig | None:
    """The exact QuantConfig from the ``fp8kit`` block fp8kit writes, or None for other tools' checkpoints."""
    ours = qc.get("fp8kit")
    if ours is None:
        return None
    try:
        version = ours.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: fp8kit format_version {version!r} is newer than this fp8kit reads ({FORMAT_VERSION})"
            )
        return QuantConfig.from_dict(ours["config"])
    except (ConfigError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where}: invalid quantization_config.fp8kit: {exc}") from exc
