"""GPU probe for issue 16's remaining decode gaps: one device call, every section time-limited, rows flushed as measured.

    PYTHONUNBUFFERED=1 PYTHONPATH=packages/core/src:packages/bench/src:tools/gpu python3 tools/gpu/decode_probe.py --out $OUT

Sections (files under --out):
1. quant.csv: per-token quantization at decode sizes under CUDA graphs (µs per call): one program per
   row (the kernel before the split-row change) vs rows split over programs (slice 512 / 1024 / 2048),
   with the static kernel as the floor (no reduction).
2. linear.csv: decode linears (Llama-3-8B gate/up 14336 x 4096 and down 4096 x 14336, M 1 / 8 / 16) under
   CUDA graphs, weights rotated through >= 512 MB: bf16; static fused; per-token and per-tensor as
   "prequant" (quantize kernel + fused kernel on FP8 x) with the old and the split quantizer, and as
   "fused" (one launch, the amax reduced in every program).
3. tiles.csv: static fused-kernel tiles on both shapes at M 1 / 8 / 16 (and the "fp8" activation at M = 16).
4. stack.txt / stack.csv: the Llama-3-8B-shaped 4-layer stack, eager decode steps of batch 1 and 8: step
   wall time, the plan each FP8Linear took (`_skinny_plans`), host µs per linear call (forward hooks),
   and a torch.profiler table of one step (why eager batch 1 ran at 0.54-0.59x bf16).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_decode_check as fdc  # tools/gpu: rotated weights, CSV rows, graph timing
from fp8kit.core import kernels, scaling

SHAPES = ((14336, 4096), (4096, 14336))
MS = (1, 8, 16)
TILE_SHAPES, TILE_MS = SHAPES, MS  # --tile-shapes / --tile-ms


def quant(out: Path, end: float) -> None:
    table = fdc.Csv(out / "quant.csv")
    default = (kernels._SPLIT_ROW_MIN_K, kernels._SPLIT_ROW_SLICE)
    try:
        for k, m in itertools.product((4096, 14336), MS):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
            scale = scaling.tensor_scale(xs[0])
            row = {"M": m, "K": k}
            row["static_us"] = round(fdc.timed([lambda x=x: kernels.quantize_static(x, scale) for x in xs]), 2)
            for name, (min_k, slice_) in {"row": (1 << 30, 1024), "split512": (1, 512), "split1024": (1, 1024),
                                          "split2048": (1, 2048)}.items():  # fmt: skip
                kernels._SPLIT_ROW_MIN_K, kernels._SPLIT_ROW_SLICE = min_k, slice_
                q, s = kernels.quantize_per_token(xs[0])
                kernels._SPLIT_ROW_MIN_K, kernels._SPLIT_ROW_SLICE = 1 << 30, 1024
                q0, s0 = kernels.quantize_per_token(xs[0])
                kernels._SPLIT_ROW_MIN_K, kernels._SPLIT_ROW_SLICE = min_k, slice_
                row[f"{name}_same_bits"] = bool(torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0))
                row[f"{name}_us"] = round(fdc.timed([lambda x=x: kernels.quantize_per_token(x) for x in xs]), 2)
            table.add(row)
            if time.monotonic() > end:
                return
    finally:
        kernels._SPLIT_ROW_MIN_K, kernels._SPLIT_ROW_SLICE = default


def linear(out: Path, end: float) -> None:
    from fp8kit.core import skinny

    table = fdc.Csv(out / "linear.csv")
    default = kernels._SPLIT_ROW_MIN_K
    for n, k in SHAPES:
        tiles = skinny._tiles(skinny.TABLE[("static", skinny.shape_class(n, k))], n, k, torch.device("cuda"))
        w_bf16 = [fdc.quantized_weight(n, k, "tensor", seed=i)[0] for i in range(max(2, -(-fdc.ROTATE_BYTES // (n * k * 2))))]
        weights = {g: fdc.rotated(n, k, g, 1) for g in ("tensor", "channel")}
        for m in MS:
            if time.monotonic() > end:
                return
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xs = scaling.tensor_scale(x) * 0.9
            row = {"N": n, "K": k, "M": m, "tiles": str(tiles)}
            try:
                row["bf16_us"] = round(fdc.timed([lambda w=w: F.linear(x, w) for w in w_bf16]), 2)
                row["static_fused_us"] = round(fdc.time_fused(weights["tensor"], x, "static", xs, tiles), 2)
                for act, gran in (("token", "channel"), ("tensor", "tensor")):
                    ws = weights[gran]
                    row[f"{act}_fused_us"] = round(fdc.time_fused(ws, x, act, None, tiles), 2)
                    for qname, min_k in (("row", 1 << 30), ("split", 1)):
                        kernels._SPLIT_ROW_MIN_K = min_k

                        def prequant(wq, wscale, act=act):
                            q, s = scaling.quantize_activation(x, act)
                            return kernels.fused_linear(q, wq, wscale, "fp8", x_scale=s, out_dtype=torch.bfloat16, tiles=tiles)

                        row[f"{act}_prequant_{qname}_us"] = round(fdc.timed([lambda w=w: prequant(*w[1]) for w in ws]), 2)
                    kernels._SPLIT_ROW_MIN_K = default
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                traceback.print_exc()
            finally:
                kernels._SPLIT_ROW_MIN_K = default
            table.add(row)
        del w_bf16, weights
        torch.cuda.empty_cache()


def tiles_sweep(out: Path, end: float) -> None:
    table = fdc.Csv(out / "tiles.csv")
    for n, k in TILE_SHAPES:
        if n >= 2 * k:  # wide: no split
            grid = itertools.product((64, 128, 256), (256, 512), (1, 2), (4, 8), (3, 4))
        else:  # deep / square / small: split-K; 256-column K steps won every earlier sweep
            grid = itertools.product((32, 64, 128), (256,), (2, 4, 8), (4, 8), (3, 4))
        grid = [
            kernels.FusedTiles(block_n=bn, block_k=bk, split_k=sk, num_warps=nw, num_stages=st)
            for bn, bk, sk, nw, st in grid
            if not (bn == 256 and nw == 4)
        ]
        weights = fdc.rotated(n, k, "tensor", 1)
        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in TILE_MS}
        for tiles in grid:
            if time.monotonic() > end:
                return
            for m, x in xs.items():
                row = {"N": n, "K": k, "M": m, "activation": "static", **tiles.__dict__}
                try:
                    row["us"] = round(fdc.time_fused(weights, x, "static", scaling.tensor_scale(x), tiles), 2)
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                table.add(row)
        del weights
        torch.cuda.empty_cache()


def stack(out: Path, end: float) -> None:
    from torch import nn

    from fp8kit.bench.model_speed import _Decode
    from fp8kit.bench.workloads import llama3_8b_stack_config
    from fp8kit.core import FP8Linear
    from stack_models import stack_models

    report = (out / "stack.txt").open("w")
    table = fdc.Csv(out / "stack.csv")
    device = torch.device(fdc.DEVICE)
    config = llama3_8b_stack_config(4)
    if fdc.DEVICE != "cuda":  # --dry-run: a tiny stack on the CPU (tests this script)
        config = llama3_8b_stack_config(1)
        config.hidden_size, config.intermediate_size, config.num_attention_heads = 64, 128, 4
        config.num_key_value_heads, config.head_dim = 2, 16
    for backend, model in stack_models(config, device, ("torch-bf16", "fp8-static-tensor", "fp8-dynamic-token"), 128):
        for batch in (1, 8):
            if time.monotonic() > end:
                return
            prompt = torch.randint(0, config.vocab_size, (batch, 64), device=device)
            step_ids = torch.randint(0, config.vocab_size, (batch, 1), device=device)
            decode = _Decode(model, prompt, step_ids, 1024)
            for _ in range(3):
                decode()
            fdc.sync()
            t0 = time.perf_counter()
            for _ in range(20):
                decode()
            host = (time.perf_counter() - t0) / 20 * 1e3
            fdc.sync()
            wall = (time.perf_counter() - t0) / 20 * 1e3
            # Host µs per linear call: forward pre / post hooks around every Linear / FP8Linear.
            spent: dict[str, list[float]] = {}
            hooks = []
            for name, mod in model.named_modules():
                if isinstance(mod, (nn.Linear, FP8Linear)):
                    def pre(mod, args, name=name):
                        mod._probe_t0 = time.perf_counter()

                    def post(mod, args, output, name=name):
                        spent.setdefault(name.split(".")[-1], []).append((time.perf_counter() - mod._probe_t0) * 1e6)

                    hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
            for _ in range(10):
                decode()
            fdc.sync()
            for h in hooks:
                h.remove()
            per_linear = {name: round(sorted(v)[len(v) // 2], 1) for name, v in spent.items()}
            plans = {}
            for name, mod in model.named_modules():
                if isinstance(mod, FP8Linear):
                    plans[name.split(".")[-1]] = {str(key[0]) + ("g" if key[3] else "e"): (None if v is None else v[0])
                                                  for key, v in mod._skinny_plans.items()}  # fmt: skip
            row = {"backend": backend, "batch": batch, "step_host_ms": round(host, 3), "step_wall_ms": round(wall, 3),
                   "linear_host_us": json.dumps(per_linear)}  # fmt: skip
            table.add(row)
            print(f"== {backend} batch {batch}: wall {wall:.3f} ms/step, host {host:.3f}", file=report)
            print("host µs per linear call (median):", json.dumps(per_linear), file=report)
            print("plans (first 7 layers' names):", json.dumps(dict(list(plans.items())[:7])), file=report)
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if fdc.DEVICE == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(2):
                    decode()
                fdc.sync()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60), file=report)
            report.flush()
            del decode
        del model
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/probe")
    parser.add_argument("--sections", default="quant,linear,stack,tiles")
    parser.add_argument("--budget-s", type=float, default=300)
    parser.add_argument("--tile-shapes", default="14336x4096,4096x14336", help="N x K of the tile sweep")
    parser.add_argument("--tile-ms", default="1,8,16")
    parser.add_argument("--dry-run", action="store_true", help="the stack section on a tiny CPU model (tests the script)")
    args = parser.parse_args()
    global TILE_SHAPES, TILE_MS
    TILE_SHAPES = tuple(tuple(int(v) for v in shape.split("x")) for shape in args.tile_shapes.split(","))
    TILE_MS = tuple(int(m) for m in args.tile_ms.split(","))
    if args.dry_run:
        fdc.DEVICE = "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limits = {"quant": 0.1, "linear": 0.3, "stack": 0.25, "tiles": 0.35 if len(args.sections.split(",")) > 1 else 1.0}
    start = time.monotonic()
    for name in args.sections.split(","):
        end = min(start + args.budget_s, time.monotonic() + limits[name] * args.budget_s)
        print(f"== {name} after {time.monotonic() - start:.0f}s", flush=True)
        try:
            {"quant": quant, "linear": linear, "stack": stack, "tiles": tiles_sweep}[name](out, end)
        except Exception:
            traceback.print_exc()
    print(f"done after {time.monotonic() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
