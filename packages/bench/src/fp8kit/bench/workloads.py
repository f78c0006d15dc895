"""What is benchmarked: single linear layers (M x N x K) and whole models (prefill).

Shapes are written M x N x K everywhere: M rows of activation, N = out_features, K = in_features.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fp8kit.core.errors import ConfigError

__all__ = [
    "LinearWorkload",
    "ModelWorkload",
    "SHAPE_PRESETS",
    "M_PRESETS",
    "parse_shape_entries",
    "parse_m_values",
    "linear_grid",
]

# Projection shapes (name, N, K) of the dense decoder layers.
SHAPE_PRESETS: dict[str, tuple[tuple[str, int, int], ...]] = {
    # Llama-3-8B: hidden 4096, intermediate 14336, 32 heads / 8 kv heads of 128.
    "llama3-8b": (
        ("q_proj/o_proj", 4096, 4096),
        ("k_proj/v_proj", 1024, 4096),
        ("qkv_proj(fused)", 6144, 4096),
        ("gate_proj/up_proj", 14336, 4096),
        ("gate_up_proj(fused)", 28672, 4096),
        ("down_proj", 4096, 14336),
    ),
    # Llama-3-70B: hidden 8192, intermediate 28672, 64 heads / 8 kv heads of 128.
    "llama3-70b": (
        ("q_proj/o_proj", 8192, 8192),
        ("k_proj/v_proj", 1024, 8192),
        ("qkv_proj(fused)", 10240, 8192),
        ("gate_proj/up_proj", 28672, 8192),
        ("gate_up_proj(fused)", 57344, 8192),
        ("down_proj", 8192, 28672),
    ),
    # Small shapes for CPU runs and CI.
    "cpu-small": (
        ("small-square", 256, 256),
        ("smollm2-mlp-up", 1536, 576),
        ("smollm2-mlp-down", 576, 1536),
    ),
}

M_PRESETS: dict[str, tuple[int, ...]] = {
    "gpu": (1, 16, 128, 1024, 4096, 8192),
    "cpu": (1, 16, 128),
}

_SHAPE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclass(frozen=True)
class LinearWorkload:
    """One linear layer y = x @ W.T: x [M,K], W [N,K]; `name` is a label (e.g. the projection)."""

    name: str
    m: int
    n: int
    k: int

    @property
    def label(self) -> str:
        return f"linear:{self.name}"


@dataclass(frozen=True)
class ModelWorkload:
    """A whole-model prefill forward: `batch` sequences of `seq_len` tokens (M = batch * seq_len).

    spec: "default" (the embedded SmolLM2-135M), a Hugging Face directory, or "smollm2-arch"
    (SmolLM2-135M's architecture with random weights, for machines the GGUF file cannot reach).
    """

    spec: str
    batch: int
    seq_len: int

    @property
    def m(self) -> int:
        return self.batch * self.seq_len

    @property
    def label(self) -> str:
        return f"model:{self.spec}"


def parse_shape_entries(text: str) -> list[tuple[str, int | None, int, int]]:
    """Comma-separated presets and/or MxNxK shapes -> [(name, M or None for presets, N, K)].

    Raises ConfigError naming the bad entry and the accepted forms.
    """
    entries: list[tuple[str, int | None, int, int]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item in SHAPE_PRESETS:
            entries.extend((name, None, n, k) for name, n, k in SHAPE_PRESETS[item])
            continue
        match = _SHAPE_RE.match(item)
        if match is None:
            raise ConfigError(
                f"--shapes: {item!r} is neither a preset ({', '.join(SHAPE_PRESETS)}) nor MxNxK "
                "(e.g. 16x4096x4096: M rows, N = out_features, K = in_features)"
            )
        m, n, k = (int(g) for g in match.groups())
        if min(m, n, k) < 1:
            raise ConfigError(f"--shapes: {item!r} has a zero dimension; M, N and K must be >= 1")
        entries.append((f"{n}x{k}", m, n, k))
    if not entries:
        raise ConfigError("--shapes: no shape given; name a preset or MxNxK entries")
    return entries


def parse_m_values(text: str) -> tuple[int, ...]:
    """"1,16,128" or a preset name ("gpu", "cpu") -> sorted unique positive ints; ConfigError otherwise."""
    if text.strip() in M_PRESETS:
        return M_PRESETS[text.strip()]
    values: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise ConfigError(f"--m: {item!r} is not a positive integer; give e.g. --m 1,16,128")
        values.add(int(item))
    if not values:
        raise ConfigError("--m: no value given; give e.g. --m 1,16,128")
    return tuple(sorted(values))


def linear_grid(shapes: str, m_values: Sequence[int]) -> list[LinearWorkload]:
    """Workloads for every preset shape x every M, plus each MxNxK entry at its own M.

    Sorted by (N, K, M) so that backends compile once per (N, K) and sweep M.
    """
    grid: set[LinearWorkload] = set()
    for name, m, n, k in parse_shape_entries(shapes):
        for m_value in (m,) if m is not None else m_values:
            grid.add(LinearWorkload(name, m_value, n, k))
    return sorted(grid, key=lambda w: (w.n, w.k, w.name, w.m))
