"""Per-call host overhead of eager `FP8Linear` (old vs new host path) and torch.compile on CUDA.

Run on an H100 from the repo root:
    PYTHONPATH=packages/core/src python tools/gpu/overhead_check.py --out $OUT

"old" is a verbatim copy (below) of the host path before the overhead work: per-call
`torch.device(...)` / `is_available()` / capability queries and Triton's `kernel[grid](...)`
launcher with keyword constexprs; it launches the same Triton kernels. "new" is the library
(`kernels._launch` direct launches, per-device caches); "new-tritonlaunch" is the library with
`kernels.DIRECT_LAUNCH = False` (isolates the launcher's share). Per shape: bf16 `nn.Linear` and
FP8Linear at M in {1, 16}, N x K in {4096 x 4096, 14336 x 4096}, modules rotated (not L2-resident).
Numbers per call: host (enqueue time of 50 back-to-back calls, no sync), wall (100 calls + sync),
event (CUDA events around single calls: latency of one call as issued), medians of 7 repeats.
Then: old == new == new-tritonlaunch bit for bit, and `torch.compile(fullgraph=True)` of FP8Linear
(its output within FP8 rounding of eager, and its per-call times). CSV under --out; table last.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
import triton
from torch import nn

from fp8kit.core import FP8Linear, QuantConfig, kernels, scaling

ROWS: list[dict] = []


# ---------------------------------------------------------------------------------------------
# The old host path, copied from kernels.py / scaling.py / linear.py before this change.
# ---------------------------------------------------------------------------------------------
import functools  # noqa: E402


@functools.lru_cache(maxsize=None)
def _old_cuda_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < (8, 9):
        return "old GPU"
    return None


def old_unavailable_reason(device) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return f"Triton FP8 kernels need a CUDA device, not {device.type!r}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return _old_cuda_reason(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _old_build():
    return kernels._build()


@functools.lru_cache(maxsize=None)
def _old_num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _old_warps(elements: int, programs: int, device: torch.device) -> int:
    if programs < _old_num_sms(device):
        return max(4, min(32, elements // 256))
    return max(4, min(16, elements // 1024))


def _old_prepare(x, name, out, out_dtype):
    if x.dim() != 2:
        raise ValueError(name)
    if x.dtype not in kernels._INPUT_DTYPES:
        raise ValueError(name)
    if out_dtype not in kernels._OUT_DTYPES:
        raise ValueError(name)
    x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != out_dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(name)
    return x, out


def old_quantize_per_token(x, *, out=None, out_dtype=torch.float8_e4m3fn):
    k_ = kernels
    x, out = _old_prepare(x, "quantize_per_token", out, out_dtype)
    m, k = x.shape
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0:
        return out, scale
    one_pass = k <= k_._MAX_ONE_PASS_K
    block_k = max(16, k_._next_pow2(k)) if one_pass else k_._LOOP_BLOCK_K
    block_m = min(k_._next_pow2(m), max(1, 4096 // block_k))
    programs = k_._cdiv(m, block_m)
    _old_build().per_token[(programs,)](
        x, out, scale, m, k, FLOOR_BITS=k_._FLOOR_BITS, BLOCK_M=block_m, BLOCK_K=block_k, ONE_PASS=one_pass,
        num_warps=_old_warps(block_m * block_k, programs, x.device),
    )  # fmt: skip
    return out, scale


def old_quantize_static(x, scale, *, out=None, out_dtype=torch.float8_e4m3fn):
    k_ = kernels
    x, out = _old_prepare(x, "quantize_static", out, out_dtype)
    if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != x.device:
        raise ValueError("scale")
    n = x.numel()
    if n == 0:
        return out
    block, warps = k_._flat_block(n)
    _old_build().static[(k_._cdiv(n, block),)](x, out, scale, n, BLOCK=block, num_warps=warps)
    return out


def old_quantize_per_tensor(x, *, out=None, out_dtype=torch.float8_e4m3fn):
    k_ = kernels
    x, out = _old_prepare(x, "quantize_per_tensor", out, out_dtype)
    n = x.numel()
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    ks = _old_build()
    if n <= k_._SMALL_NUMEL:
        block_a = min(max(16, k_._next_pow2(n)), k_._SMALL_BLOCK_A)
        ks.per_tensor_small[(max(1, k_._cdiv(n, k_._SMALL_SLICE)),)](
            x, out, scale, n, FLOOR_BITS=k_._FLOOR_BITS, BLOCK_A=block_a, SLICE=k_._SMALL_SLICE,
            num_warps=max(4, min(32, block_a // 256)),
        )  # fmt: skip
        return out, scale
    block, warps = k_._flat_block(n)
    blocks = k_._cdiv(n, block)
    parts = min(blocks, k_._PARTIALS_PER_SM * _old_num_sms(x.device))
    partials = torch.empty(parts, dtype=torch.int32, device=x.device)
    ks.amax_partial[(parts,)](x, partials, n, BLOCK=block, num_warps=warps)
    ks.per_tensor_quant[(blocks,)](
        x, out, partials, scale, n, parts, FLOOR_BITS=k_._FLOOR_BITS, BLOCK=block, BLOCK_P=k_._next_pow2(parts),
        num_warps=warps,
    )  # fmt: skip
    return out, scale


def old_quantize_activation(x2d, granularity="tensor", scale=None):
    fast = old_unavailable_reason(x2d.device) is None
    if scale is not None:
        if fast:
            return old_quantize_static(x2d, scale.to(device=x2d.device, dtype=torch.float32)), scale
        return scaling.quantize(x2d, scale), scale
    if granularity == "token":
        if fast:
            return old_quantize_per_token(x2d)
        x_scale = scaling.rowwise_scale(x2d)
    else:
        if fast:
            return old_quantize_per_tensor(x2d)
        x_scale = scaling.tensor_scale(x2d)
    return scaling.quantize(x2d, x_scale), x_scale


def old_scaled_mm_unsupported_reason(device):
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return "old GPU"
    elif device.type != "cpu":
        return "other"
    return None


def old_fp8_matmul(x_fp8, weight_fp8, x_scale, weight_scale, bias=None, out_dtype=torch.bfloat16, use_fast_accum=False):
    m, n = x_fp8.shape[0], weight_fp8.shape[0]
    if m == 0:
        return torch.zeros(0, n, dtype=out_dtype, device=x_fp8.device)
    reason = old_scaled_mm_unsupported_reason(x_fp8.device)
    if reason is not None:
        raise RuntimeError(reason)
    scale_a, scale_b = x_scale, weight_scale
    if scale_a.dim() or scale_b.dim():
        scale_a = scale_a.expand(m, 1).contiguous()
        scale_b = scale_b.reshape(1, -1).expand(1, n).contiguous()
    gemm_dtype = out_dtype
    if x_fp8.is_cuda and scale_a.dim() and out_dtype == torch.float16:
        gemm_dtype = torch.float32
    fused_bias = bias
    if bias is not None and x_fp8.is_cuda and (gemm_dtype == torch.float32 or bias.dtype != gemm_dtype):
        fused_bias = None
    try:
        out = torch._scaled_mm(
            x_fp8, weight_fp8.t(), scale_a, scale_b, bias=fused_bias, out_dtype=gemm_dtype, use_fast_accum=use_fast_accum
        )
    except RuntimeError:
        raise
    if isinstance(out, tuple):
        out = out[0]
    if bias is not None and fused_bias is None:
        out = out.float() + bias.float()
    return out.to(out_dtype)


def old_forward(self: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    x2d = x.reshape(-1, self.in_features)
    granularity = self.activation_granularity
    x_fp8, x_scale = old_quantize_activation(x2d, granularity, self.input_scale)
    out = old_fp8_matmul(
        x_fp8, self.weight, x_scale, self.weight_scale, bias=self.bias, out_dtype=x.dtype,
        use_fast_accum=self.use_fast_accum,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], self.out_features)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def per_call_times(fns: list, reps: int = 7) -> dict:
    """host / wall / event µs per call for the callables `fns` (called in rotation)."""
    for fn in fns * 5:
        fn()
    torch.cuda.synchronize()
    host, wall, event = [], [], []
    n = len(fns)
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(50):
            fns[i % n]()
        host.append((time.perf_counter() - t0) / 50 * 1e6)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(100):
            fns[i % n]()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) / 100 * 1e6)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(60)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(60)]
    for i in range(60):
        torch.cuda.synchronize()
        starts[i].record()
        fns[i % n]()
        ends[i].record()
    torch.cuda.synchronize()
    event = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return {k: round(statistics.median(v), 2) for k, v in (("host_us", host), ("wall_us", wall), ("event_us", event))}


def record(**row) -> None:
    ROWS.append(row)
    print(row, flush=True)


SCHEMES = {
    "dyn-tensor/w-tensor": QuantConfig(),
    "dyn-token/w-channel": QuantConfig(weight="channel", activation_granularity="token"),
    "static/w-tensor": QuantConfig(activation="static"),
}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def timing(shapes, ms) -> None:
    torch.manual_seed(0)
    for n, k in shapes:
        copies = max(2, -(-200_000_000 // (n * k * 2)))  # bf16 weights over ~200 MB: from HBM
        linears = [nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = per_call_times([lambda lin=lin: lin(x) for lin in linears])
            record(shape=f"{m}x{n}x{k}", scheme="-", path="bf16", **t_bf16)
            for scheme, config in SCHEMES.items():
                input_scale = scaling.tensor_scale(x) if config.activation == "static" else None
                fp8s = [FP8Linear.from_linear(lin, config, input_scale) for lin in linears]
                old = [old_forward(f, x) for f in fp8s[:1]][0]
                new = fp8s[0](x)
                kernels.DIRECT_LAUNCH = False
                tl_out = fp8s[0](x)
                kernels.DIRECT_LAUNCH = True
                torch.cuda.synchronize()
                assert same(old, new) and same(new, tl_out), f"{scheme} {m}x{n}x{k}: old / new / triton-launch differ"
                variants = {
                    "old": [lambda f=f: old_forward(f, x) for f in fp8s],
                    "new": [lambda f=f: f(x) for f in fp8s],
                }
                for path, fns in variants.items():
                    t = per_call_times(fns)
                    record(shape=f"{m}x{n}x{k}", scheme=scheme, path=path, **t,
                           wall_speedup_vs_bf16=round(t_bf16["wall_us"] / t["wall_us"], 2))  # fmt: skip
                kernels.DIRECT_LAUNCH = False
                t = per_call_times(variants["new"])
                kernels.DIRECT_LAUNCH = True
                record(shape=f"{m}x{n}x{k}", scheme=scheme, path="new-tritonlaunch", **t,
                       wall_speedup_vs_bf16=round(t_bf16["wall_us"] / t["wall_us"], 2))  # fmt: skip
                del fp8s
        del linears
        torch.cuda.empty_cache()


def components() -> None:
    """Host µs of the pieces, one M=16 x 4096 per-token quantization."""
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    ks = kernels._build()
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device="cuda")
    scale = torch.empty(16, 1, dtype=torch.float32, device="cuda")
    consts = (kernels._FLOOR_BITS, 1, 4096, True)
    cases = {
        "triton kernel[grid](kw constexprs)": lambda: ks.per_token[(16,)](
            x, out, scale, 16, 4096, FLOOR_BITS=kernels._FLOOR_BITS, BLOCK_M=1, BLOCK_K=4096, ONE_PASS=True, num_warps=16
        ),
        "kernels._launch (direct)": lambda: kernels._launch(ks.per_token, 16, (x, out, scale, 16, 4096), consts, 16, x.device),
        "old quantize_per_token": lambda: old_quantize_per_token(x),
        "new quantize_per_token": lambda: kernels.quantize_per_token(x),
        "old unavailable_reason": lambda: old_unavailable_reason(x.device),
        "new unavailable_reason": lambda: kernels.unavailable_reason(x.device),
        "old scaled_mm_unsupported_reason": lambda: old_scaled_mm_unsupported_reason(x.device),
        "new scaled_mm_unsupported_reason": lambda: scaling.scaled_mm_unsupported_reason(x.device),
        "torch.empty(16x4096 fp8)": lambda: torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
        "x.clone() (one eager copy)": lambda: x.clone(),
    }
    for name, fn in cases.items():
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            samples.append((time.perf_counter() - t0) / 200 * 1e6)
            torch.cuda.synchronize()
        record(shape="16x4096", scheme="component", path=name, host_us=round(statistics.median(samples), 2))


def compiled_check() -> None:
    """torch.compile(fullgraph=True) of FP8Linear on CUDA: no graph break, output ~ eager."""
    torch.manual_seed(0)
    n = k = 4096
    for scheme in ("dyn-tensor/w-tensor", "dyn-token/w-channel"):
        torch._dynamo.reset()
        lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        fp8 = FP8Linear.from_linear(lin, SCHEMES[scheme])
        x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
        eager = fp8(x)
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(fp8, fullgraph=True)
            out = compiled(x)
            torch.cuda.synchronize()
        except Exception as exc:  # report, go on
            record(shape="16x4096x4096", scheme=scheme, path="compiled", error=f"{type(exc).__name__}: {exc}"[:500])
            continue
        compile_s = time.perf_counter() - t0
        rel = ((out.float() - eager.float()).norm() / eager.float().norm()).item()
        exact = torch.equal(out, eager)
        t = per_call_times([lambda: compiled(x)])
        record(shape="16x4096x4096", scheme=scheme, path="compiled", **t, compile_s=round(compile_s, 1),
               rel_diff_vs_eager=f"{rel:.2e}", bit_equal=exact)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--quick", action="store_true", help="one shape, M=1 only")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    print(f"direct launch bound: {kernels._build() is not None and kernels._driver.ok}", flush=True)
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (14336, 4096)]
    ms = [1] if args.quick else [1, 16]
    components()
    timing(shapes, ms)
    compiled_check()
    args.out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(key for row in ROWS for key in row))
    path = args.out / "overhead_check.csv"
    with open(path.with_suffix(".tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(ROWS)
    path.with_suffix(".tmp").rename(path)
    print(f"\n{'shape':14} {'scheme':22} {'path':36} {'host':>8} {'wall':>8} {'event':>8} {'x bf16':>7}")
    for row in ROWS:
        print(
            f"{row['shape']:14} {row['scheme']:22} {row['path']:36} {row.get('host_us', ''):>8} "
            f"{row.get('wall_us', ''):>8} {row.get('event_us', ''):>8} {row.get('wall_speedup_vs_bf16', ''):>7} "
            f"{row.get('rel_diff_vs_eager', '')} {row.get('error', '')}"
        )


if __name__ == "__main__":
    main()
