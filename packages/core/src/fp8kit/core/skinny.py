"""Where `FP8Linear` runs the fused skinny-M kernel (`kernels.fused_linear`): a table filled from measurements.

At decode sizes (M of a few rows) an FP8 linear is bound by reading its weight, and the existing path
(quantize kernel, `_scaled_mm`, for row-wise scales a scale epilogue) spends 2-3 launches around it:
about 2 µs each under CUDA graphs and 10-30 µs each of host time eagerly. The fused kernel quantizes
the activation, streams the FP8 weight and applies both scales in one launch. Whether that is faster
depends on the scheme (the dynamic ones reduce the whole activation in every program), M and the
weight's shape, so the choice is a table per (scheme, shape class), filled from GPU runs of
`tools/gpu/fused_decode_check.py` (numbers in docs/dev/kernels-notes.md). A (scheme, class) that is not
in the table keeps the existing path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .kernels import FusedTiles

__all__ = ["Rule", "TABLE", "MAX_M", "ENABLED", "scheme_of", "shape_class", "rule_for", "plan_for"]


@dataclass(frozen=True)
class Rule:
    """Run the fused kernel for M <= max_m with these tiles; ``tiles.split_k == 0`` picks split-K so that
    the grid has about `programs_per_sm` programs per multiprocessor (at most `max_split_k`)."""

    max_m: int
    tiles: FusedTiles
    programs_per_sm: float = 1.0
    max_split_k: int = 8


#: (scheme, shape class) -> Rule. Scheme: "static" (calibrated per-tensor activation scale), "tensor"
#: (dynamic per-tensor), "token" (dynamic per-token); shape class: `shape_class(N, K)`. Empty until
#: measured: every linear then takes the existing path.
TABLE: dict[tuple[str, str], Rule] = {}
#: No rule goes above this M (a cheap first test in `FP8Linear.forward`); the kernel takes M <= 64.
MAX_M = 16
#: Switch the fused path off everywhere (benchmarks of the existing path, bisecting).
ENABLED = True


def scheme_of(activation: str, activation_granularity: str, weight_granularity: str) -> str | None:
    """The table's scheme name for an `FP8Linear` configuration, or None (block weights: not fused)."""
    if weight_granularity not in ("tensor", "channel"):
        return None
    if activation == "static":
        return "static"
    return activation_granularity if activation_granularity in ("tensor", "token") else None


def shape_class(n: int, k: int) -> str:
    """"small" (N * K < 2^23, e.g. Llama-3-8B's k/v 1024 x 4096), "deep" (K >= 2N: down_proj),
    "wide" (N >= 2K: gate / up), else "square" (q / o)."""
    if n * k < 1 << 23:
        return "small"
    if k >= 2 * n:
        return "deep"
    if n >= 2 * k:
        return "wide"
    return "square"


def rule_for(scheme: str | None, m: int, n: int, k: int) -> Rule | None:
    """The table's rule for an [M, K] x [N, K] linear of `scheme`, or None (existing path)."""
    if not ENABLED or scheme is None or m > MAX_M:
        return None
    rule = TABLE.get((scheme, shape_class(n, k)))
    return rule if rule is not None and m <= rule.max_m else None


def _tiles(rule: Rule, n: int, k: int, device: torch.device) -> FusedTiles:
    tiles = rule.tiles
    if tiles.split_k:
        return tiles
    tiles_n = -(-n // tiles.block_n)
    want = max(1, round(rule.programs_per_sm * kernels._num_sms(device) / tiles_n))
    split = min(want, rule.max_split_k, max(1, -(-k // tiles.block_k) // 2))
    return FusedTiles(**{**tiles.__dict__, "split_k": split})


def plan_for(
    scheme: str | None,
    m: int,
    n: int,
    k: int,
    *,
    x_dtype: torch.dtype,
    weight_scale_rows: bool,
    has_bias: bool,
    device: torch.device,
) -> kernels.FusedPlan | None:
    """A launch plan of the fused kernel where the table says it is faster, else None.

    None also where the kernels cannot run on `device` (CPU, compute capability < 8.9, no triton) and
    for an input dtype the kernel does not take. May return None during CUDA-graph capture (see
    `kernels.fused_plan`): callers then take the existing path for that call and ask again later.
    """
    rule = rule_for(scheme, m, n, k)
    if rule is None or x_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    if kernels.unavailable_reason(device) is not None:
        return None
    return kernels.fused_plan(
        m, n, k, scheme, x_dtype=x_dtype, out_dtype=x_dtype, weight_scale_rows=weight_scale_rows,
        has_bias=has_bias, device=device, tiles=_tiles(rule, n, k, device),
    )  # fmt: skip
