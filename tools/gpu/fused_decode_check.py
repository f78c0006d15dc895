"""GPU check of the fused skinny-M FP8 linear (`kernels.fused_linear`, issue 16): correctness, tiles, timings.

Run on the GPU machine from the repository root (about 5 minutes; every section is time-limited and
every row is appended to its CSV as soon as it is measured, so a cut-short run still leaves data):
    PYTHONUNBUFFERED=1 PYTHONPATH=packages/core/src python3 tools/gpu/fused_decode_check.py --out $OUT
Sections:
1. correctness.csv: fused vs a float64 GEMM of the same quantized operands (`scaling.quantize_activation`
   gives the operands; the fused kernel quantizes x bit-identically), and vs the existing path (quantize kernel +
   `scaling.fp8_matmul`), every activation mode, odd M / N / K, bias, split-K, NaN-poisoned outputs.
2. tiles.csv: µs per call under CUDA-graph replay (weights rotated through >= 512 MB) of the fused kernel
   for a grid of tiles (block_n, block_k, split_k, warps, stages, exact division or not).
3. decode.csv: for Llama-3-8B linear shapes and M in {1, 8, 16, 32}: bf16 `F.linear`, the existing FP8
   path, the fused kernel with the best tiles of section 2 and "prequant" (quantize kernel + the fused
   kernel on FP8 x: two launches, no amax reduction in every program), per scheme, under graphs (device µs) and
   eagerly (wall µs per call of 200 back-to-back calls: what host time leaves of it), plus host µs.
The last lines print the best tiles per shape class: what goes into `fp8kit.core.skinny`'s table.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from fp8kit.core import kernels, scaling

try:
    from kernels_check import graph_us  # tools/gpu is the script directory, first on sys.path
except Exception:  # the CPU dry run may not import it (triton.testing)
    graph_us = None

ROTATE_BYTES = 512 * 2**20  # weights rotated through at least this much memory (L2 is 50-60 MB)
SHAPES = ((14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096), (6144, 4096), (28672, 4096))
SWEEP_SHAPES = SHAPES[:4]
DEADLINE = [0.0]
DEVICE = "cuda"  # "cpu" with --dry-run (TRITON_INTERPRET=1, tiny shapes): checks this script, not the GPU


class Csv:
    """Rows appended (and flushed) one at a time; the header grows into a second file if keys change."""

    def __init__(self, path: Path):
        self.path, self.fields, self.file, self.writer = path, None, None, None

    def add(self, row: dict) -> None:
        print(json.dumps(row), flush=True)
        if self.fields is None:
            self.fields = list(row)
            self.file = self.path.open("w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=self.fields, extrasaction="ignore")
            self.writer.writeheader()
        self.writer.writerow({key: row.get(key, "") for key in self.fields})
        self.file.flush()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fns) -> float:
    """µs per call under CUDA-graph replay (on the CPU dry run: one plain pass, wall time)."""
    if DEVICE == "cuda":
        return graph_us(fns, warmup_ms=10, rep_ms=60)
    t0 = time.perf_counter()
    for fn in fns:
        fn()
    return (time.perf_counter() - t0) / len(fns) * 1e6


def left() -> float:
    return DEADLINE[0] - time.monotonic()


def quantized_weight(n: int, k: int, granularity: str, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w = torch.randn(n, k, device=DEVICE, generator=g, dtype=torch.bfloat16) * k**-0.5
    return w, scaling.quantize_weight(w, granularity)


CASES = [
    (1, 14336, 4096), (16, 4096, 14336), (7, 1000, 1040), (3, 4096, 4096), (13, 6144, 4096),
    (32, 1024, 4096), (1, 28672, 4096), (5, 33, 100), (16, 1024, 4096),
]  # fmt: skip


def correctness(out_dir: Path, budget_s: float) -> None:
    table = Csv(out_dir / "correctness.csv")
    end = time.monotonic() + budget_s
    cases = CASES if DEVICE == "cuda" else [(1, 96, 64), (5, 33, 100), (17, 64, 160)]
    tiles_list = [kernels.FusedTiles(), kernels.FusedTiles(block_n=32, split_k=4), kernels.FusedTiles(exact_div=True)]
    for (m, n, k), act, tiles in itertools.product(cases, ("static", "tensor", "token", "fp8"), tiles_list):
        if time.monotonic() > end or left() < 0:
            print("correctness: out of time", flush=True)
            return
        row = {"M": m, "N": n, "K": k, "activation": act, "tiles": str(tiles)}
        try:
            wgran = "channel" if act in ("token", "fp8") else "tensor"
            _, (wq, ws) = quantized_weight(n, k, wgran, seed=m + n)
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            x = x * torch.exp2(torch.randint(-6, 6, (m, 1), device=DEVICE).float()).bfloat16()
            bias = torch.randn(n, device=DEVICE, dtype=torch.bfloat16) if m % 2 else None
            # The quantize kernels on the GPU (the torch ops on the CPU dry run): identical bits.
            static_scale = scaling.tensor_scale(x) * 0.75 if act == "static" else None
            xq, xs = scaling.quantize_activation(x, "tensor" if act in ("static", "tensor") else "token", static_scale)
            ref = (xq.double() * xs.double()) @ (wq.double() * ws.double()).t()
            if bias is not None:
                ref = ref + bias.double()
            out = torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
            fused = kernels.fused_linear(
                xq if act == "fp8" else x, wq, ws, act, x_scale=xs if act in ("static", "fp8") else None,
                bias=bias, out_dtype=torch.bfloat16, tiles=tiles, out=out,
            )  # fmt: skip
            existing = scaling.fp8_matmul(xq, wq, xs, ws, bias=bias, out_dtype=torch.bfloat16)
            sync()
            scale = ref.abs().mean().item()
            e_f = (fused.double() - ref).abs()
            e_e = (existing.double() - ref).abs()
            magnitude = (xq.double() * xs.double()).abs() @ (wq.double() * ws.double()).abs().t()
            if bias is not None:
                magnitude = magnitude + bias.double().abs()
            # bf16 output rounding (half an ulp is 2^-9 relative) + fp32 accumulation (K adds of 2^-24 relative)
            bound = 2**-8 * ref.abs() + 2**-24 * k * magnitude
            row.update(
                nan_left=int(fused.isnan().sum().item()), same_object=fused is out,
                err_max_fused=e_f.max().item(), err_max_existing=e_e.max().item(),
                err_mean_fused=e_f.mean().item(), err_mean_existing=e_e.mean().item(), ref_mean_abs=scale,
                err_over_magnitude_fused=(e_f / magnitude.clamp(min=1e-30)).max().item(),
                err_over_magnitude_existing=(e_e / magnitude.clamp(min=1e-30)).max().item(),
                within_bound=bool((e_f <= bound).all().item()), ok=bool((e_f <= bound).all().item()) and not fused.isnan().any().item(),
            )  # fmt: skip
        except Exception as exc:  # keep going: one failing case must not hide the others
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
            traceback.print_exc()
        table.add(row)


def rotated(n: int, k: int, granularity: str, bytes_per: int):
    copies = max(2, -(-ROTATE_BYTES // (n * k * bytes_per)))
    return [quantized_weight(n, k, granularity, seed=i) for i in range(copies)]


def time_fused(weights, x, act, xs, tiles) -> float:
    fns = [
        (lambda wq=wq, ws=ws: kernels.fused_linear(x, wq, ws, act, x_scale=xs, tiles=tiles))
        for _, (wq, ws) in weights
    ]
    return timed(fns)


def sweep(out_dir: Path, budget_s: float) -> dict:
    """Tile grid for the per-token scheme (the costliest: a full amax per program), M = 1 and 16."""
    table = Csv(out_dir / "tiles.csv")
    end = time.monotonic() + budget_s
    grid = [
        kernels.FusedTiles(block_n=bn, block_k=bk, split_k=sk, num_warps=4, num_stages=3)
        for bn, bk, sk in [*itertools.product((32, 64, 128), (128, 256), (1, 2, 4)), (32, 128, 8), (32, 256, 8), (64, 128, 8)]
    ]
    if DEVICE != "cuda":
        grid = grid[:2]
    best: dict[tuple, tuple[float, kernels.FusedTiles]] = {}
    for n, k in SWEEP_SHAPES:
        if time.monotonic() > end:
            break
        weights = rotated(n, k, "channel", 1)
        xs = {m: torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16) for m in (1, 16)}

        def measure(candidates) -> None:
            for tiles in candidates:
                if time.monotonic() > end or left() < 0:
                    print("sweep: out of time", flush=True)
                    return
                for m, x in xs.items():
                    row = {"N": n, "K": k, "M": m, "activation": "token", **tiles.__dict__}
                    try:
                        us = time_fused(weights, x, "token", None, tiles)
                        row["graph_us"] = round(us, 2)
                        if (n, k, m) not in best or us < best[(n, k, m)][0]:
                            best[(n, k, m)] = (us, tiles)
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    table.add(row)

        measure(grid)
        # Variants around the best tiles of M = 16: pipelining depth, warps, the division, the amax steps.
        if (n, k, 16) in best:
            base = best[(n, k, 16)][1]
            measure([
                kernels.FusedTiles(**{**base.__dict__, **change})
                for change in ({"num_stages": 2}, {"num_stages": 4}, {"num_stages": 5}, {"num_warps": 8},
                               {"exact_div": True}, {"amax_block": 4096}, {"amax_stages": 3})
            ])  # fmt: skip
        del weights
        torch.cuda.empty_cache()
    return best


def host_us(fn, calls: int = 200) -> tuple[float, float]:
    """(host µs per call = enqueue time, wall µs per call including the device) for back-to-back calls."""
    fn()
    sync()
    best_host, best_wall = float("inf"), float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        best_host = min(best_host, (t1 - t0) / calls * 1e6)
        best_wall = min(best_wall, (t2 - t0) / calls * 1e6)
    return best_host, best_wall


def decode(out_dir: Path, best: dict, budget_s: float) -> None:
    table = Csv(out_dir / "decode.csv")
    end = time.monotonic() + budget_s
    default = kernels.FusedTiles()
    schemes = (("token", "channel"), ("static", "tensor"), ("tensor", "tensor"))
    for n, k in SHAPES:
        if time.monotonic() > end or left() < 0:
            print("decode: out of time", flush=True)
            return
        w_bf16 = [quantized_weight(n, k, "tensor", seed=i)[0] for i in range(max(2, -(-ROTATE_BYTES // (n * k * 2))))]
        for (act, wgran), m in itertools.product(schemes, (1, 8, 16, 32)):
            if time.monotonic() > end or left() < 0:
                break
            candidates = [t for (bn, bk, bm), (_, t) in best.items() if (bn, bk) == (n, k) and bm == (1 if m == 1 else 16)]
            tiles = candidates[0] if candidates else default
            row = {"N": n, "K": k, "M": m, "activation": act, "weight": wgran, "tiles": str(tiles)}
            try:
                weights = rotated(n, k, wgran, 1)
                x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
                xs = scaling.tensor_scale(x) * 0.9 if act == "static" else None

                def existing(wq, ws):
                    q, s = scaling.quantize_activation(x, act if act != "static" else "tensor", xs)
                    return scaling.fp8_matmul(q, wq, s, ws, out_dtype=torch.bfloat16)

                def prequant(wq, ws):
                    q, s = scaling.quantize_activation(x, act if act != "static" else "tensor", xs)
                    return kernels.fused_linear(q, wq, ws, "fp8", x_scale=s, out_dtype=torch.bfloat16, tiles=tiles)

                variants = {
                    "bf16": [lambda w=w: F.linear(x, w) for w in w_bf16],
                    "existing": [lambda w=w: existing(*w[1]) for w in weights],
                    "fused": [(lambda w=w: kernels.fused_linear(x, w[1][0], w[1][1], act, x_scale=xs, tiles=tiles)) for w in weights],
                    # two launches: the quantize kernel, then the fused kernel on FP8 x (no amax in every program)
                    "prequant": [(lambda w=w: prequant(*w[1])) for w in weights],
                }
                if act != "token":
                    xq, xsq = scaling.quantize_activation(x, "tensor", xs)
                    one = xsq
                    variants["scaled_mm_bare"] = [
                        lambda w=w: torch._scaled_mm(xq, w[1][0].t(), one, w[1][1], out_dtype=torch.bfloat16) for w in weights
                    ]
                for name, fns in variants.items():
                    row[f"{name}_graph_us"] = round(timed(fns), 2)
                plan = kernels.fused_plan(m, n, k, act, x_dtype=x.dtype, out_dtype=x.dtype,
                                          weight_scale_rows=wgran == "channel", device=x.device, tiles=tiles)  # fmt: skip
                wq0, ws0 = weights[0][1]
                eager = {
                    "bf16": lambda: F.linear(x, w_bf16[0]),
                    "existing": lambda: existing(wq0, ws0),
                    "fused": lambda: kernels.fused_linear(x, wq0, ws0, act, x_scale=xs, tiles=tiles),
                    "fused_plan": lambda: plan(x, wq0, ws0, xs),
                }
                for name, fn in eager.items():
                    h, w = host_us(fn)
                    row[f"{name}_host_us"], row[f"{name}_eager_us"] = round(h, 2), round(w, 2)
                row["speedup_graph_fused"] = round(row["bf16_graph_us"] / row["fused_graph_us"], 3)
                row["speedup_graph_existing"] = round(row["bf16_graph_us"] / row["existing_graph_us"], 3)
                row["speedup_eager_fused_plan"] = round(row["bf16_eager_us"] / row["fused_plan_eager_us"], 3)
                del weights
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                traceback.print_exc()
            table.add(row)
        del w_bf16
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/fused")
    parser.add_argument("--budget-s", type=float, default=330, help="the whole run's time limit (s)")
    parser.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes (tests the script)")
    args = parser.parse_args()
    global SHAPES, SWEEP_SHAPES, ROTATE_BYTES, DEVICE
    if args.dry_run:
        DEVICE, ROTATE_BYTES = "cpu", 2**16
        SHAPES = SWEEP_SHAPES = ((96, 64), (64, 160))
    DEADLINE[0] = time.monotonic() + args.budget_s
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}
    if DEVICE == "cuda":
        info.update(device=torch.cuda.get_device_name(), sms=torch.cuda.get_device_properties(0).multi_processor_count)
    print(info, flush=True)
    (out_dir / "env.json").write_text(json.dumps(info))
    t0 = time.monotonic()
    best: dict = {}
    summary: dict = {}
    try:
        correctness(out_dir, budget_s=min(60, 0.2 * args.budget_s))
    except Exception:
        traceback.print_exc()
    print(f"correctness done after {time.monotonic() - t0:.0f}s", flush=True)
    try:
        best = sweep(out_dir, budget_s=0.4 * args.budget_s)
        summary = {f"{n}x{k} M={m}": {"us": round(us, 2), **tiles.__dict__} for (n, k, m), (us, tiles) in best.items()}
        (out_dir / "best_tiles.json").write_text(json.dumps(summary, indent=1))
    except Exception:
        traceback.print_exc()
    print(f"sweep done after {time.monotonic() - t0:.0f}s", flush=True)
    try:
        decode(out_dir, best, budget_s=max(10.0, left()))
    except Exception:
        traceback.print_exc()
    print(f"done after {time.monotonic() - t0:.0f}s", flush=True)
    print(json.dumps(summary, indent=1), flush=True)


if __name__ == "__main__":
    main()
