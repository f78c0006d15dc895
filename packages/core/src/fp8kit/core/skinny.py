"""Where `FP8Linear` runs the fused skinny-M kernel (`kernels.fused_linear`): a table filled from measurements.

At decode sizes (M of a few rows) an FP8 linear is bound by reading its weight, and the existing path
(quantize kernel, `_scaled_mm`, for row-wise scales a scale epilogue) spends 2-3 launches around it:
about 2 µs each under CUDA graphs and 10-30 µs each of host time eagerly. The fused kernel quantizes
the activation, streams the FP8 weight and applies both scales in one launch. Whether that is faster
depends on the scheme (the dynamic ones reduce the whole activation in every program), M and the
weight's shape, and differs inside and outside CUDA-graph capture, so the choice is a table per
(scheme, shape class) with an eager and a graph mode, filled from GPU runs of
`tools/gpu/fused_decode_check.py` and `tools/gpu/decode_probe.py` (numbers in docs/dev/kernels-notes.md
and docs/BENCHMARKS.md). A (scheme, class) that is not in the table keeps the existing path.
`skinny_linear` is the same path as a torch operator, which `torch.compile` keeps opaque.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import kernels, scaling
from .kernels import FusedTiles

logger = logging.getLogger(__name__)
_warned: set[str] = set()

__all__ = [
    "MODES", "Rule", "TABLE", "MAX_M", "ENABLED", "scheme_of", "shape_class", "rule_for", "plan_for", "run_plan",
    "plan_and_run", "warn_once", "skinny_linear",
]  # fmt: skip


#: How a skinny linear runs: "fused" (one launch: `kernels.fused_linear` quantizes x itself), "prequant"
#: (two: the quantize kernel, then the fused kernel on the FP8 x, scales in its epilogue) or "existing"
#: (quantize kernel + `scaling.fp8_matmul`: `_scaled_mm`, and for row-wise scales its scale epilogue).
MODES = ("fused", "prequant", "existing")


@dataclass(frozen=True)
class Rule:
    """For M <= max_m: `eager` is the mode of direct calls, `graph` the mode inside CUDA-graph capture (the
    dynamic schemes' fused kernel reduces all of x in every program, which costs more device time than a
    separate quantize launch does under a graph, but less host time than one more launch does eagerly).
    `eager_tiles` (None: `tiles`) are the tiles of direct calls: the dynamic schemes' one-launch kernel
    re-reads x in every program, so it wants fewer programs than the GEMM on a pre-quantized x does.
    ``tiles.split_k == 0`` picks split-K so that the grid has about `programs_per_sm` programs per
    multiprocessor (at most `max_split_k`)."""

    max_m: int
    tiles: FusedTiles
    eager: str = "fused"
    graph: str = "fused"
    programs_per_sm: float = 1.0
    max_split_k: int = 8
    eager_tiles: FusedTiles | None = None


# Tiles per shape class, the fastest of two sweeps on an H200: tools/gpu/fused_decode_check.py (run A,
# 2026-12-01: docs/dev/kernels-notes.md) and tools/gpu/decode_probe.py (static activations, µs per call
# under CUDA graphs, M = 1 / 8 / 16): wide 128 x 256 tiles, 8 warps, 4 stages (18.3-18.8 vs 21.6-22.2
# with 4 warps, 3 stages); deep 64 x 256, split-K 4, 4 stages (19.4-20.6 vs 21.5-22.5 with 128-row
# tiles); square (4096 x 4096) 64 x 256 split-K 4 (8.8-9.2 vs 9.7-10.2 with 128-row tiles); small
# (1024 x 4096) 64 x 256 split-K 8 (5.8-6.2 vs 6.2 with 32-row tiles).
_TILES = {
    "wide": FusedTiles(block_n=128, block_k=256, split_k=1, num_warps=8, num_stages=4),
    "deep": FusedTiles(block_n=64, block_k=256, split_k=4, num_warps=4, num_stages=4),
    "square": FusedTiles(block_n=64, block_k=256, split_k=4),
    "small": FusedTiles(block_n=64, block_k=256, split_k=8),
}

#: (scheme, shape class) -> Rule. Scheme: "static" (calibrated per-tensor activation scale), "tensor"
#: (dynamic per-tensor), "token" (dynamic per-token); shape class: `shape_class(N, K)`. A pair missing
#: here takes the existing path. Filled from the H200 run above (µs per call under CUDA graphs, M = 1 /
#: 8 / 16, existing -> chosen): static fused everywhere (14336 x 4096: 19.8 -> 18.7-19.2; 4096 x 14336:
#: 22.4-22.9 -> 19.9-20.9; 1024 x 4096: 7.5 -> 6.3; 4096 x 4096: a tie, 9.0-9.2 vs 9.0-9.5); per-token
#: under graphs prequant everywhere (22.1-22.7 -> 20.2-20.7; 27.0-28.6 -> 23.7-25.0; 11.3-11.4 ->
#: 10.4-11.0; 9.6-16.5 -> 7.4-7.6); per-tensor under graphs prequant except 4096 x 4096, where the
#: existing path is 0.5-1 µs faster. Eagerly every scheme runs fused: one launch instead of 2-3. (Two
#: launches, "prequant", take 22-24 µs of device time at 4096 x 14336, M = 8 / 16, against 44-47 fused,
#: but on the H200 machine's host they cost 51-92 µs a call in an eager chain: decode_probe.py, run 3.)
#: The dynamic schemes' one-launch kernel keeps run A / B's 128 x 256 split-K 4 tiles on deep and square
#: layers, where `_TILES` has twice the programs (each re-reads x from L2: at 4096 x 14336, M = 16, 256
#: programs read 117 MB).
_EAGER_DYNAMIC_TILES = {cls: FusedTiles(block_n=128, block_k=256, split_k=4) for cls in ("deep", "square")}
TABLE: dict[tuple[str, str], Rule] = {
    **{("static", cls): Rule(16, tiles) for cls, tiles in _TILES.items()},
    **{
        ("token", cls): Rule(16, tiles, graph="prequant", eager_tiles=_EAGER_DYNAMIC_TILES.get(cls))
        for cls, tiles in _TILES.items()
    },
    **{
        ("tensor", cls): Rule(
            16, tiles, graph="existing" if cls == "square" else "prequant", eager_tiles=_EAGER_DYNAMIC_TILES.get(cls)
        )
        for cls, tiles in _TILES.items()
    },
}
#: No rule goes above this M (a cheap first test in `FP8Linear.forward`); the kernel takes M <= 64.
MAX_M = 16
#: Switch the fused path off everywhere (benchmarks of the existing path, bisecting).
ENABLED = True


def warn_once(message: str) -> None:
    """Log `message` once per process (a layer falling back to the existing path)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


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


def _tiles(rule: Rule, n: int, k: int, device: torch.device, capturing: bool = False) -> FusedTiles:
    tiles = rule.tiles if capturing or rule.eager_tiles is None else rule.eager_tiles
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
    capturing: bool = False,
    fast_accum: bool = False,
) -> tuple[str, kernels.FusedPlan] | None:
    """(mode, launch plan) of the fused kernel where the table says it is faster, else None (existing path).

    fast_accum: `FP8Linear.use_fast_accum` (see `kernels.fused_plan`).
    mode "fused": the plan takes the high-precision x; "prequant": the plan takes x quantized by
    `scaling.quantize_activation` (FP8 [M, K] and its scale). `capturing`: inside CUDA-graph capture
    (the rule's `graph` mode), else its `eager` mode. None also where the kernels cannot run on `device`
    (CPU, compute capability < 8.9, no triton) and for an input dtype the kernel does not take; and
    possibly during capture (see `kernels.fused_plan`): callers then take the existing path and ask later.
    """
    rule = rule_for(scheme, m, n, k)
    if rule is None or x_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    mode = rule.graph if capturing else rule.eager
    if mode == "existing" or kernels.unavailable_reason(device) is not None:
        return None
    prequant = mode == "prequant"
    plan = kernels.fused_plan(
        m, n, k, "fp8" if prequant else scheme, x_dtype=kernels._FP8_DTYPE if prequant else x_dtype,
        out_dtype=x_dtype, x_scale_rows=prequant and scheme == "token" and m > 1,
        weight_scale_rows=weight_scale_rows, has_bias=has_bias, fast_accum=fast_accum, device=device,
        tiles=_tiles(rule, n, k, device, capturing),
    )  # fmt: skip
    return None if plan is None else (mode, plan)


def run_plan(
    entry: tuple[str, kernels.FusedPlan],
    x2d: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    granularity: str,
) -> torch.Tensor:
    """Run `plan_for`'s (mode, plan) on x2d [M, K] (contiguous): [M, N]. "prequant" quantizes x2d first
    (per `granularity`, or with the static `input_scale`), "fused" passes it as is."""
    mode, plan = entry
    if mode == "prequant":
        x_fp8, x_scale = scaling.quantize_activation(x2d, granularity, input_scale)
        return plan(x_fp8, weight, weight_scale, x_scale, bias)
    return plan(x2d, weight, weight_scale, input_scale, bias)


def plan_and_run(
    scheme: str | None,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    granularity: str,
    *,
    capturing: bool,
    fast_accum: bool,
) -> tuple[tuple[str, kernels.FusedPlan] | None, torch.Tensor | None]:
    """Plan x2d [M, K] @ weight [N, K] (`plan_for`, the mode of `capturing`) and run the plan once (Triton
    compiles here): (entry, output [M, N]), or (None, None) where the existing path runs: no rule, or a
    plan that failed to run (logged once)."""
    m, k = x2d.shape
    n = weight.shape[0]
    entry = plan_for(
        scheme, m, n, k, x_dtype=x2d.dtype, weight_scale_rows=weight_scale.dim() != 0, has_bias=bias is not None,
        device=x2d.device, capturing=capturing, fast_accum=fast_accum,
    )  # fmt: skip
    if entry is None:
        return None, None
    try:
        return entry, run_plan(entry, x2d.contiguous(), weight, weight_scale, input_scale, bias, granularity)
    except Exception as exc:  # noqa: BLE001 - e.g. a Triton that cannot compile it
        warn_once(f"the fused skinny-M path failed for M={m} x [{n}, {k}] ({entry[0]}); the existing path runs "
                  f"instead: {type(exc).__name__}: {exc}")  # fmt: skip
        return None, None


# (rule, scheme, M, N, K, x dtype, device, per-channel weight scales, bias dtype, fast accumulation,
# capturing) -> (mode, plan) or None: the launch plans of `skinny_linear` (the compiled path keeps no
# module state; the rule is in the key so that a changed TABLE / ENABLED plans again).
_op_plans: dict[tuple, tuple | None] = {}
_GRANULARITY = {"static": "tensor", "tensor": "tensor", "token": "token"}


@torch.library.custom_op(
    "fp8kit::skinny_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor weight_scale, Tensor? input_scale, Tensor? bias, str scheme, "
    "bool fast_accum) -> Tensor",
)
def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    scheme: str,
    fast_accum: bool,
) -> torch.Tensor:
    """`FP8Linear`'s decode-size path as one operator, which `torch.compile` keeps as is (its kernels
    would otherwise be traced into torch ops): x [M, K] CUDA with M <= MAX_M, weight fp8 [N, K],
    weight_scale fp32 [] / [N, 1], input_scale fp32 [] (scheme "static") or None, bias [N] or None.
    Returns [M, N] in x's dtype: the fused kernel where `TABLE` has a rule, else the existing path.
    The first call of a shape outside CUDA-graph capture also compiles the capture-mode plan."""
    x = x.contiguous()
    m, k = x.shape
    capturing = torch.cuda.is_current_stream_capturing() if x.is_cuda else False
    base = (rule_for(scheme, m, weight.shape[0], k), scheme, m, weight.shape[0], k, x.dtype, x.device,
            weight_scale.dim() != 0, None if bias is None else bias.dtype, fast_accum)  # fmt: skip
    granularity = _GRANULARITY[scheme]
    out = None
    for mode_capturing in (capturing,) if capturing else (False, True):  # outside capture: both plans compiled
        key = (*base, mode_capturing)
        if key not in _op_plans:
            entry, result = plan_and_run(
                scheme, x, weight, weight_scale, input_scale, bias, granularity, capturing=mode_capturing,
                fast_accum=fast_accum,
            )  # fmt: skip
            if mode_capturing == capturing:
                out = result
            if entry is not None or not capturing:  # None during capture: ask again later
                _op_plans[key] = entry
    if out is not None:
        return out
    entry = _op_plans.get((*base, capturing))
    if entry is not None:
        return run_plan(entry, x, weight, weight_scale, input_scale, bias, granularity)
    return scaling.quantized_linear(
        x, weight, weight_scale, input_scale, bias, granularity, out_dtype=x.dtype, use_fast_accum=fast_accum
    )


@skinny_linear.register_fake
def _skinny_linear_fake(x, weight, weight_scale, input_scale, bias, scheme, fast_accum):  # noqa: ANN001, ANN202
    return x.new_empty((x.shape[0], weight.shape[0]))
