"""GPU correctness + timing of fp8kit.core.kernels (issue 5, target 1) against memory floors.

Run on an H100 from the repo root:
    PYTHONPATH=packages/core/src python tools/gpu/kernels_check.py --out $OUT
Floors: a plain copy of the 8192x8192 bf16 activation gives the bandwidth (bytes read + written);
per-token and static move 3 bytes/element (read bf16, write fp8), per-tensor's two passes 5.
Decode sizes are timed by CUDA-graph replay over rotated inputs (launch gaps removed). Writes
kernels_check.csv under --out and prints a table last.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from fp8kit.core import kernels, scaling

ROWS: list[dict] = []


def record(name: str, shape, us: float, bytes_moved: float | None = None, floor_us: float | None = None, **extra):
    row = {"name": name, "shape": "x".join(map(str, shape)), "median_us": round(us, 2)}
    if bytes_moved is not None:
        row["GB_per_s"] = round(bytes_moved / us / 1e3, 1)
    if floor_us is not None:
        row["floor_us"] = round(floor_us, 2)
        row["ratio_to_floor"] = round(us / floor_us, 3)
    row.update(extra)
    ROWS.append(row)
    print(row, flush=True)


def bench(fn) -> float:
    return do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3  # µs


def graph_us(fns, warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median µs per call of the callables `fns`, captured in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3 / len(fns)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def torch_per_tensor(x):
    s = scaling.tensor_scale(x)
    return scaling.quantize(x, s), s


def torch_per_token(x):
    s = scaling.rowwise_scale(x)
    return scaling.quantize(x, s), s


def big_activation(args) -> float:
    m, k = 8192, 8192
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
    n = x.numel()
    dst = torch.empty_like(x)
    copy_us = bench(lambda: dst.copy_(x))
    copy_bw = 4 * n / copy_us / 1e3  # GB/s, read + write
    record("copy", (m, k), copy_us, 4 * n, 4 * n / copy_bw / 1e3, copy_GB_per_s=round(copy_bw, 1))
    floor3 = 3 * n / copy_bw / 1e3
    floor5 = 5 * n / copy_bw / 1e3

    # Correctness at full size first (bit-exact against the torch path).
    static_scale = scaling.tensor_scale(x)
    checks = {
        "per_token": (kernels.quantize_per_token(x), torch_per_token(x)),
        "per_tensor": (kernels.quantize_per_tensor(x), torch_per_tensor(x)),
        "static": ((kernels.quantize_static(x, static_scale), static_scale), (scaling.quantize(x, static_scale), static_scale)),
    }
    for name, ((q, s), (rq, rs)) in checks.items():
        ok = same_bytes(q, rq) and torch.equal(s, rs)
        print(f"bit-exact {name} 8192x8192: {ok}", flush=True)
        if not ok:
            sys.exit(f"{name} is not bit-exact against the torch path")

    record("torch_eager_per_tensor", (m, k), bench(lambda: torch_per_tensor(x)), 5 * n, floor5)
    record("torch_eager_per_token", (m, k), bench(lambda: torch_per_token(x)), 3 * n, floor3)
    record("torch_eager_static", (m, k), bench(lambda: scaling.quantize(x, static_scale)), 3 * n, floor3)
    record("triton_per_token", (m, k), bench(lambda: kernels.quantize_per_token(x)), 3 * n, floor3)
    record("triton_static", (m, k), bench(lambda: kernels.quantize_static(x, static_scale)), 3 * n, floor3)
    record("triton_per_tensor", (m, k), bench(lambda: kernels.quantize_per_tensor(x)), 5 * n, floor5)
    if args.variants:
        for warps in (4, 16):
            kernels._warps = lambda elements, programs, device, _w=warps: _w
            record(f"triton_per_token_w{warps}", (m, k), bench(lambda: kernels.quantize_per_token(x)), 3 * n, floor3)
        kernels._warps = _default_warps
        for block in (4096, 16384):
            kernels._FLAT_BLOCK = block
            record(f"triton_static_b{block}", (m, k), bench(lambda: kernels.quantize_static(x, static_scale)), 3 * n, floor3)
            record(f"triton_per_tensor_b{block}", (m, k), bench(lambda: kernels.quantize_per_tensor(x)), 5 * n, floor5)
        kernels._FLAT_BLOCK = _default_flat
        for per_sm in (1, 16):
            kernels._PARTIALS_PER_SM = per_sm
            record(f"triton_per_tensor_p{per_sm}", (m, k), bench(lambda: kernels.quantize_per_tensor(x)), 5 * n, floor5)
        kernels._PARTIALS_PER_SM = _default_parts
    # The weight path of FP8Linear.from_linear: a Llama-3-8B MLP weight.
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    record("torch_eager_weight_per_tensor", w.shape, bench(lambda: torch_per_tensor(w)), 5 * w.numel())
    record("triton_weight_per_tensor", w.shape, bench(lambda: kernels.quantize_per_tensor(w)), 5 * w.numel())
    return copy_bw


def decode_sizes(copy_bw: float) -> None:
    """M in {1, 8, 16}: per-call µs under CUDA graphs, 32 rotated inputs per graph."""
    for k in (4096, 14336):
        for m in (1, 8, 16):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(32)]
            scale = scaling.tensor_scale(xs[0])
            for x in xs[:2]:  # bit-exact at decode sizes too
                assert same_bytes(kernels.quantize_per_tensor(x)[0], torch_per_tensor(x)[0])
                assert same_bytes(kernels.quantize_per_token(x)[0], torch_per_token(x)[0])
            variants = {
                "graph_triton_per_token": lambda x: kernels.quantize_per_token(x),
                "graph_triton_static": lambda x: kernels.quantize_static(x, scale),
                "graph_triton_per_tensor_1launch": lambda x: kernels.quantize_per_tensor(x),
                "graph_torch_per_tensor": torch_per_tensor,
                "graph_torch_per_token": torch_per_token,
            }
            for name, fn in variants.items():
                us = graph_us([lambda x=x, fn=fn: fn(x) for x in xs])
                record(name, (m, k), us, 5 * m * k if "tensor" in name else 3 * m * k)
            kernels._SMALL_NUMEL = 0
            us = graph_us([lambda x=x: kernels.quantize_per_tensor(x) for x in xs])
            record("graph_triton_per_tensor_2launch", (m, k), us, 5 * m * k)
            kernels._SMALL_NUMEL = _default_small


def decode_linear() -> None:
    """What a fused skinny-M kernel must beat: quantize + _scaled_mm vs bf16, 14336x4096, CUDA graphs."""
    n, k, layers = 14336, 4096, 12  # 12 fp8 weights = 705 MB, 12 bf16 = 1.4 GB: not L2-resident
    w_bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    w_fp8 = [kernels.quantize_per_tensor(w) for w in w_bf16]  # (fp8 [N, K], scale [])
    w_fp8_rowwise = [(q, s.expand(1, n).contiguous()) for q, s in w_fp8]  # scale_b [1, N] for row-wise
    for m in (1, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bf16_us = graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in w_bf16])

        def fp8(wq, ws, fast):
            q, s = kernels.quantize_per_token(x)
            return torch._scaled_mm(q, wq.t(), s, ws, out_dtype=torch.bfloat16, use_fast_accum=fast)

        def fp8_tensor(wq, ws, fast):
            q, s = kernels.quantize_per_tensor(x)
            return torch._scaled_mm(q, wq.t(), s, ws, out_dtype=torch.bfloat16, use_fast_accum=fast)

        record("graph_linear_bf16", (m, n, k), bf16_us, n * k * 2)
        for fast in (False, True):
            us = graph_us([lambda w=w, fast=fast: fp8_tensor(*w, fast) for w in w_fp8])
            record(f"graph_linear_fp8_pertensor_fast{int(fast)}", (m, n, k), us, n * k, speedup_vs_bf16=round(bf16_us / us, 3))
            us = graph_us([lambda w=w, fast=fast: fp8(*w, fast) for w in w_fp8_rowwise])
            record(f"graph_linear_fp8_pertoken_fast{int(fast)}", (m, n, k), us, n * k, speedup_vs_bf16=round(bf16_us / us, 3))


_default_warps = kernels._warps
_default_flat = kernels._FLAT_BLOCK
_default_parts = kernels._PARTIALS_PER_SM
_default_small = kernels._SMALL_NUMEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--variants", action="store_true", help="also time block-size / warp variants")
    parser.add_argument("--no-linear", action="store_true", help="skip the decode-linear comparison")
    args = parser.parse_args()
    reason = kernels.unavailable_reason(torch.device("cuda"))
    if reason:
        sys.exit(f"kernels unavailable: {reason}")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    copy_bw = big_activation(args)
    decode_sizes(copy_bw)
    if not args.no_linear:
        decode_linear()
    args.out.mkdir(parents=True, exist_ok=True)
    keys = sorted({key for row in ROWS for key in row}, key=lambda key: list(ROWS[0]).index(key) if key in ROWS[0] else 99)
    with open(args.out / "kernels_check.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(ROWS)
    print("\nname | shape | median_us | GB/s | floor_us | ratio")
    for row in ROWS:
        print(
            f"{row['name']} | {row['shape']} | {row['median_us']} | {row.get('GB_per_s', '')} | "
            f"{row.get('floor_us', '')} | {row.get('ratio_to_floor', row.get('speedup_vs_bf16', ''))}"
        )


if __name__ == "__main__":
    main()
