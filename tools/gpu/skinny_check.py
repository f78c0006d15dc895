"""GPU timing of the skinny row-wise FP8 GEMM path of `scaling.fp8_matmul` (issue 5, target 3).

Run on an H100 from the repo root:
    PYTHONPATH=packages/core/src python tools/gpu/skinny_check.py --out $OUT
For Llama-3-8B decode shapes and M in {1, 8, 16, 32, 64}: µs per call under CUDA-graph replay,
weights rotated (each graph cycles through enough weight copies to exceed 3x the L2), of bf16
`F.linear`, bare per-tensor and row-wise `_scaled_mm`, the skinny path (unit-scale `_scaled_mm` to
fp32 + `kernels.scale_epilogue`) and the whole dynamic per-token linear (Triton quantization +
`fp8_matmul`) with the skinny path off / on. Also the mean / max error of both paths against a
float64 reference. Writes skinny_check.csv under --out and prints a table last.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import torch.nn.functional as F

from fp8kit.core import kernels, scaling
from kernels_check import graph_us  # tools/gpu is the script directory, first on sys.path

SHAPES = ((14336, 4096), (4096, 14336), (4096, 4096))
M_VALUES = (1, 8, 16, 32, 64)
L2_BYTES = 50 * 2**20


def with_threshold(max_m: int, fn):
    def call():
        old = scaling.ROWWISE_SKINNY_MAX_M
        scaling.ROWWISE_SKINNY_MAX_M = max_m
        try:
            return fn()
        finally:
            scaling.ROWWISE_SKINNY_MAX_M = old

    return call


def errors(n: int, k: int, m: int) -> dict:
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda") * 0.02
    xq, xs = kernels.quantize_per_token(x)
    wq, ws = kernels.quantize_per_token(w)
    ref = (xq.double() * xs.double()) @ (wq.double() * ws.double()).t()
    row = with_threshold(0, lambda: scaling.fp8_matmul(xq, wq, xs, ws))()
    skinny = with_threshold(1 << 30, lambda: scaling.fp8_matmul(xq, wq, xs, ws))()
    e_row, e_skinny = (row.double() - ref).abs(), (skinny.double() - ref).abs()
    return {
        "err_mean_rowwise": f"{e_row.mean().item():.4g}", "err_mean_skinny": f"{e_skinny.mean().item():.4g}",
        "err_max_rowwise": f"{e_row.max().item():.4g}", "err_max_skinny": f"{e_skinny.max().item():.4g}",
    }  # fmt: skip


def host_times() -> list[dict]:
    """Host µs per eager call (enqueue time of 200 calls, the GPU queue never full), 4096 x 14336."""
    import time

    n, k = 4096, 14336
    wq, ws = kernels.quantize_per_token(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    rows = []
    one = torch.ones((), device="cuda")
    for m in (1, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        xq, xs = kernels.quantize_per_token(x)
        acc = torch.empty(m, n, device="cuda")
        variants = {
            "quantize_per_token": lambda: kernels.quantize_per_token(x),
            "matmul_rowwise": with_threshold(0, lambda: scaling.fp8_matmul(xq, wq, xs, ws)),
            "matmul_skinny": with_threshold(1 << 30, lambda: scaling.fp8_matmul(xq, wq, xs, ws)),
            "scale_epilogue": lambda: kernels.scale_epilogue(acc, xs, ws),
            "mm_unit_fp32": lambda: torch._scaled_mm(xq, wq.t(), one, one, out_dtype=torch.float32),
            "mm_rowwise": lambda: torch._scaled_mm(xq, wq.t(), xs, ws.reshape(1, -1), out_dtype=torch.bfloat16),
            "empty": lambda: torch.empty(m, n, device="cuda", dtype=torch.bfloat16),
        }
        for name, fn in variants.items():
            best = float("inf")
            for _ in range(5):
                fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(200):
                    fn()
                best = min(best, (time.perf_counter() - t0) / 200 * 1e6)
                torch.cuda.synchronize()
            rows.append({"M": m, "N": n, "K": k, "variant": name, "host_us": round(best, 2)})
            print(rows[-1], flush=True)
    direct = [key for key, entry in kernels._launchers.items() if key[0] == id(kernels._build().scale_epilogue)]
    print(f"scale_epilogue direct-launch entries: {len(direct)}, usable: "
          f"{sum(kernels._launchers[key][0] is not None for key in direct)}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/skinny")
    parser.add_argument("--host-only", action="store_true", help="only the eager host-time section")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name()
    import triton

    print(f"{dev}, torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}", flush=True)
    host = host_times()
    with (out_dir / "skinny_host.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(host[0]))
        writer.writeheader()
        writer.writerows(host)
    if args.host_only:
        return
    one = torch.ones((), device="cuda")
    rows = []
    for n, k in SHAPES:
        copies = max(4, -(-3 * L2_BYTES // (n * k)))  # fp8 bytes; bf16 copies are twice as large
        w_bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        wq = [kernels.quantize_per_token(w) for w in w_bf16]  # (fp8 [N,K], scale [N,1])
        wq_tensor = [kernels.quantize_per_tensor(w) for w in w_bf16]
        for m in M_VALUES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq_row, xs_row = kernels.quantize_per_token(x)
            xq_t, xs_t = kernels.quantize_per_tensor(x)
            variants = {
                "bf16": [lambda w=w: F.linear(x, w) for w in w_bf16],
                "mm_tensor": [
                    lambda w=w: torch._scaled_mm(xq_t, w[0].t(), xs_t, w[1], out_dtype=torch.bfloat16) for w in wq_tensor
                ],
                "mm_rowwise": [
                    lambda w=w: torch._scaled_mm(xq_row, w[0].t(), xs_row, w[1].reshape(1, -1), out_dtype=torch.bfloat16)
                    for w in wq
                ],
                "mm_unit_fp32": [lambda w=w: torch._scaled_mm(xq_row, w[0].t(), one, one, out_dtype=torch.float32) for w in wq],
                "skinny": [with_threshold(1 << 30, lambda w=w: scaling.fp8_matmul(xq_row, w[0], xs_row, w[1])) for w in wq],
            }  # fmt: skip

            def token(max_m):
                def make(w):
                    def call():
                        q, s = kernels.quantize_per_token(x)
                        return scaling.fp8_matmul(q, w[0], s, w[1])

                    return with_threshold(max_m, call)

                return [make(w) for w in wq]

            variants["token_old"] = token(0)
            variants["token_new"] = token(1 << 30)
            row = {"device": dev, "N": n, "K": k, "M": m, "copies": copies}
            for name, fns in variants.items():
                row[name] = round(graph_us(fns, warmup_ms=20, rep_ms=80), 2)
            row["token_new_vs_bf16"] = round(row["bf16"] / row["token_new"], 3)
            row["token_old_vs_bf16"] = round(row["bf16"] / row["token_old"], 3)
            if m in (1, 16, 64):
                row.update(errors(n, k, m))
            rows.append(row)
            print(row, flush=True)
        del w_bf16, wq, wq_tensor
        torch.cuda.empty_cache()
    keys = list(dict.fromkeys(key for row in rows for key in row))
    tmp = out_dir / "skinny_check.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.rename(out_dir / "skinny_check.csv")
    cols = ["bf16", "mm_tensor", "mm_rowwise", "mm_unit_fp32", "skinny", "token_old", "token_new"]
    print("\nµs per call, CUDA-graph replay, rotated weights (" + dev + ")")
    print("| N x K | M | " + " | ".join(cols) + " | old/bf16 | new/bf16 |")
    for row in rows:
        vals = " | ".join(f"{row[c]:.1f}" for c in cols)
        print(f"| {row['N']}x{row['K']} | {row['M']} | {vals} | {row['token_old_vs_bf16']:.2f}x | {row['token_new_vs_bf16']:.2f}x |")


if __name__ == "__main__":
    main()
