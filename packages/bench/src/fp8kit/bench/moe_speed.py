"""MoE block speed (``--suite moe``): fp8kit `FP8Experts` vs bf16 experts through transformers' own
``grouped_mm`` experts implementation, measured in the same run.

Each workload is one transformers 5 sparse-MoE block (router + fused experts) with random weights
(normal, std 0.02) and random hidden states, so the router's top-k choice of random tokens spreads
them over the experts; the FP8 block is a copy of the bf16 block with its experts quantized by
`fp8kit.core.quantize` (the router stays bf16), so both route every token the same way.

- Shapes (`MOE_SHAPES`): Mixtral-8x7B (E=8, top-2, H=4096, I=14336) and Qwen3-30B-A3B (E=128,
  top-8, H=2048, I=768).
- Prefill: 8192 tokens, eager calls (`timing.time_calls`). Decode: 1, 8 and 64 tokens, replayed as
  CUDA graphs (`timing.time_cuda_graph`, ``-graph`` backends), over enough distinct blocks that the
  active expert weights of one replay exceed twice the L2 cache (no L2-resident replays).
- Backends: ``torch-bf16`` (transformers ``grouped_mm``, `torch.nn.functional.grouped_mm`) and FP8
  schemes (`FP8_SCHEMES`). Rows: M = tokens, N = H, K = I; `rel_error` / `sqnr_db` against the same
  block in fp32 on the same tokens; ``impl`` says which experts path ran.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from fp8kit.core.config import QuantConfig
from fp8kit.core.scaling import grouped_mm_unsupported_reason
from fp8kit.core.surgery import quantize

from . import metrics
from .report import add_speedup, error_status, make_frame
from .timing import TimingConfig, free_memory, time_calls, time_cuda_graph

__all__ = ["MoEShape", "MOE_SHAPES", "FP8_SCHEMES", "PREFILL_TOKENS", "DECODE_TOKENS", "build_block", "run_moe_speed"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoEShape:
    """One sparse-MoE block: `family` ("mixtral" or "qwen3_moe"), E experts, top-k, hidden H, expert intermediate I."""

    family: str
    experts: int
    top_k: int
    hidden: int
    intermediate: int

    def expert_bytes(self, bytes_per_value: float) -> float:
        """Weight bytes of one expert (gate, up and down projections)."""
        return 3 * self.hidden * self.intermediate * bytes_per_value


MOE_SHAPES: dict[str, MoEShape] = {
    "mixtral-8x7b": MoEShape("mixtral", 8, 2, 4096, 14336),
    "qwen3-30b-a3b": MoEShape("qwen3_moe", 128, 8, 2048, 768),
    "tiny": MoEShape("mixtral", 4, 2, 64, 32),  # CPU smoke runs and tests
}
PREFILL_TOKENS: tuple[int, ...] = (8192,)
DECODE_TOKENS: tuple[int, ...] = (1, 8, 64)
#: FP8 schemes: dynamic per-tensor (vLLM "fp8" dynamic), dynamic per-token activations with
#: per-channel weights (compressed-tensors channel / token), the latter with fast accumulation.
FP8_SCHEMES: dict[str, QuantConfig] = {
    "fp8-tensor": QuantConfig(),
    "fp8-token-channel": QuantConfig(weight="channel", activation_granularity="token"),
    "fp8-token-channel-fast": QuantConfig(weight="channel", activation_granularity="token", use_fast_accum=True),
}
BASELINE = "torch-bf16"


def _config(shape: MoEShape) -> Any:
    import transformers

    if shape.family == "mixtral":
        config = transformers.MixtralConfig(
            hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_local_experts=shape.experts,
            num_experts_per_tok=shape.top_k, experts_implementation="grouped_mm",
        )  # fmt: skip
    elif shape.family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate, num_experts=shape.experts,
            num_experts_per_tok=shape.top_k, norm_topk_prob=True, experts_implementation="grouped_mm",
        )  # fmt: skip
    else:
        raise ValueError(f"MoEShape.family must be 'mixtral' or 'qwen3_moe', got {shape.family!r}")
    if getattr(config, "_experts_implementation", None) != "grouped_mm":
        config._experts_implementation = "grouped_mm"  # transformers versions without the kwarg
    return config


def build_block(shape: MoEShape, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A transformers sparse-MoE block of `shape` with random weights (std 0.02), in eval mode."""
    import importlib

    config = _config(shape)
    if shape.family == "mixtral":
        cls = importlib.import_module("transformers.models.mixtral.modeling_mixtral").MixtralSparseMoeBlock
    else:
        cls = importlib.import_module("transformers.models.qwen3_moe.modeling_qwen3_moe").Qwen3MoeSparseMoeBlock
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        block = cls(config)
    block = block.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    return block.eval()


def _blocks_for(shape: MoEShape, tokens: int, decode: bool, device: torch.device) -> int:
    """Distinct blocks one decode replay goes through: enough that the expert weights it reads exceed
    twice the L2 cache in FP8 (else replays read them from L2). Prefill (and CPU): one."""
    if not decode or device.type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    active = min(shape.experts, tokens * shape.top_k)  # experts one call can touch
    return max(1, math.ceil(2 * l2 / (active * shape.expert_bytes(1))))


def _row(workload: str, backend: str, shape: MoEShape, tokens: int, target: str, device: torch.device) -> dict[str, Any]:
    return {
        "workload": workload, "backend": backend, "dtype": "bf16", "M": tokens, "N": shape.hidden,
        "K": shape.intermediate, "device": str(device), "shape": f"E={shape.experts} top-{shape.top_k}",
        "target": target,
    }  # fmt: skip


def _hidden(out: Any) -> torch.Tensor:
    """A block's hidden states: some transformers versions return (hidden_states, router_logits)."""
    return out[0] if isinstance(out, tuple) else out


def _fp8_impl(device: torch.device) -> str:
    reason = grouped_mm_unsupported_reason(device)
    return "torch._scaled_grouped_mm" if reason is None else "fp8_matmul loop"


def _time(fns: Sequence[Callable[[], Any]], graph: bool, device: torch.device, timing: TimingConfig) -> list[float]:
    return time_cuda_graph(fns, device, timing) if graph else time_calls(fns, device, timing)


@torch.no_grad()
def run_moe_speed(
    shapes: Sequence[str] = ("mixtral-8x7b", "qwen3-30b-a3b"),
    *,
    prefill_tokens: Sequence[int] = PREFILL_TOKENS,
    decode_tokens: Sequence[int] = DECODE_TOKENS,
    schemes: Sequence[str] = tuple(FP8_SCHEMES),
    device: torch.device | str | None = None,
    timing: TimingConfig | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Time the MoE blocks of `shapes` in bf16 (transformers grouped_mm) and in each FP8 scheme.

    Decode rows are CUDA-graph replays (``-graph`` backends); on a CPU they are rows whose status
    says why. Speedups are against ``torch-bf16`` (``torch-bf16-graph``) of the same workload and M.
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timing = timing or TimingConfig()
    rows: list[dict[str, Any]] = []
    for shape_name in shapes:
        shape = MOE_SHAPES[shape_name]
        workload = f"moe-{shape_name}"
        plan = [(t, False, "prefill") for t in prefill_tokens] + [(t, True, "decode") for t in decode_tokens]
        counts = {tokens: _blocks_for(shape, tokens, graph, device) for tokens, graph, _ in plan}
        try:  # every block once per shape; each plan entry uses the first counts[tokens] of them
            blocks = [build_block(shape, device, torch.bfloat16, seed + i) for i in range(max(counts.values()))]
            reference = copy.deepcopy(blocks[0]).float()
            variants = {BASELINE: (blocks, "transformers grouped_mm")}
            for scheme in schemes:
                variants[scheme] = ([quantize(copy.deepcopy(b), FP8_SCHEMES[scheme]) for b in blocks], _fp8_impl(device))
        except Exception as exc:  # noqa: BLE001 - out of memory, a missing kernel: the rows say so
            logger.exception("building %s failed", workload)
            for tokens, graph, target in plan:
                for backend in (BASELINE, *schemes):
                    row = _row(workload, backend + ("-graph" if graph else ""), shape, tokens, target, device)
                    rows.append({**row, "status": error_status(exc)})
            continue
        for tokens, graph, target in plan:
            generator = torch.Generator(device="cpu").manual_seed(seed + tokens)
            x = torch.randn(1, tokens, shape.hidden, generator=generator).to(device, torch.bfloat16)  # (1, T, H)
            expected = _hidden(reference(x.float()))
            for backend, (modules, impl) in variants.items():
                used = modules[: counts[tokens]]
                row = _row(workload, backend + ("-graph" if graph else ""), shape, tokens, target, device)
                row.update(impl=impl, weight_copies=len(used))
                rows.append(row)
                if graph and device.type != "cuda":
                    row["status"] = f"not run: CUDA graphs need a CUDA GPU; this run is on {device.type}"
                    continue
                try:
                    out = _hidden(used[0](x))
                    row.update(rel_error=metrics.rel_error(out, expected), sqnr_db=metrics.sqnr_db(out, expected))
                    times = _time([lambda m=m: m(x) for m in used], graph, device, timing)
                    row.update(metrics.latency_stats(times), status="ok")
                except Exception as exc:  # noqa: BLE001
                    logger.exception("%s %s failed", workload, backend)
                    row["status"] = error_status(exc)
        del blocks, variants, reference
        free_memory(device)
    frame = make_frame(rows)
    return add_speedup(frame, BASELINE)


def run_cli(args: Any, command: str) -> int:
    """``--suite moe``: run `run_moe_speed` and write moe.csv / moe.md / moe.env.json under ``args.out``."""
    from .report import write_report

    device = torch.device(args.device) if args.device else None
    gpu = (device or torch.device("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    timing = TimingConfig(
        warmup=args.warmup if args.warmup is not None else (3 if gpu else 1),
        min_runs=args.min_runs if args.min_runs is not None else (10 if gpu else 2),
        max_runs=max(args.max_runs, args.min_runs or 1),
        budget_ms=args.budget_ms if args.budget_ms is not None else (200.0 if gpu else 50.0),
    )
    shapes = ("mixtral-8x7b", "qwen3-30b-a3b") if gpu else ("tiny",)
    frame = run_moe_speed(shapes, device=device, timing=timing, prefill_tokens=PREFILL_TOKENS if gpu else (64,))
    written = write_report(frame, args.out, command=command, stem="moe", title="fp8kit.bench suite moe: MoE block, FP8 vs bf16 grouped_mm")
    ok = int((frame["status"] == "ok").sum())
    print(f"{ok}/{len(frame)} rows ran; report: {written['markdown']} {written['csv']}")
    return 0
