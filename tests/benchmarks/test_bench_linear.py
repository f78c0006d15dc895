"""Linear-layer benchmarks: torch baseline vs fp8kit FP8Linear schemes, grouped by M x N x K.

On a GPU the numbers are device time per linear call, read from CUDA events by `DeviceClock` (the
benchmark marker's timer), not the host's clock: one round is one CUDA-graph replay of one call per
weight copy (mode "graph", decode sizes M <= 16: no launch overhead, what a serving engine or
`fp8kit.core.graphs` sees), or the same calls launched back to back eagerly (mode "eager": launch gaps
count as device idle time, what `model.generate()` without graphs sees). A host timer with a
synchronize per call would add the host's launch and sync latency to every sample (20-150 us per call on
the H200 machine) and rank FP8 below bf16 at decode sizes, the opposite of the device's truth.
`extra_info["timer"]` says which clock and how many calls a round makes. On CPU: the host timer, as before.
Weights rotate through enough distinct copies (>= 512 MB, 4x L2) that small-M calls read them from HBM.
Throughput and accuracy go into `extra_info`, under the same names as the fp8kit.bench report columns.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fp8kit.bench import get_backend, rel_error, sqnr_db
from fp8kit.bench.metrics import linear_flops
from fp8kit.bench.timing import DeviceClock, capture_cuda_graph, sync

CUDA = torch.cuda.is_available()
DECODE_MAX_M = 16  # up to here, GPU cases run twice: replayed from a CUDA graph, and eagerly
CLOCK = DeviceClock() if CUDA else None
pytestmark = [pytest.mark.benchmark(timer=CLOCK)] if CUDA else []

# (name, M, N, K): Llama-3-8B projections at decode / prefill M on GPU; small shapes on CPU.
if CUDA:
    SHAPES = [
        ("q_proj/o_proj", 16, 4096, 4096),
        ("q_proj/o_proj", 4096, 4096, 4096),
        ("gate_up_proj(fused)", 16, 28672, 4096),
        ("gate_up_proj(fused)", 4096, 28672, 4096),
        ("down_proj", 16, 4096, 14336),
        ("down_proj", 4096, 4096, 14336),
    ]
    BACKENDS = [
        "torch-bf16", "fp8-dynamic-tensor", "fp8-dynamic-token", "fp8-static-tensor", "fp8-dynamic-token-compiled",
        "scaled-mm-rowwise",
    ]
else:
    SHAPES = [("small-square", 16, 256, 256), ("smollm2-mlp-up", 64, 1536, 576)]
    BACKENDS = ["torch-fp32", "fp8-dynamic-tensor", "fp8-dynamic-token", "fp8-static-tensor", "scaled-mm-rowwise"]

# Accuracy floor per backend family (dB). FP8 E4M3 rounds each operand with relative error <= 2^-4,
# so one W8A8 GEMM output sits near 28-30 dB; 20 dB leaves margin for unlucky draws.
MIN_SQNR_DB = {"torch": 40.0, "fp8": 20.0}


CASES = [(*shape, mode) for shape in SHAPES for mode in (("graph", "eager") if CUDA and shape[1] <= DECODE_MAX_M else ("eager",))]


@pytest.mark.parametrize("backend_id", BACKENDS)
@pytest.mark.parametrize("name,m,n,k,mode", CASES, ids=[f"{m}x{n}x{k}-{mode}" for _, m, n, k, mode in CASES])
def test_linear(benchmark, device, backend_id, name, m, n, k, mode):
    backend = get_backend(backend_id)
    reason = backend.unavailable_reason(device)
    if reason:
        pytest.skip(f"{backend_id}: {reason}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(m * 7 + n * 13 + k)  # GPU: 512 MB of weights in milliseconds
    weight_bytes = backend.weight_bytes(n, k, dtype)
    rotate = max(4 * torch.cuda.get_device_properties(device).L2_cache_size, 512 * 2**20) if device.type == "cuda" else 0
    copies = max(1, math.ceil(rotate / weight_bytes)) if rotate else 1
    weights = [(torch.randn(n, k, generator=gen, device=device) / math.sqrt(k)).to(dtype) for _ in range(copies)]
    calib_x = torch.randn(512, k, generator=gen, device=device).to(dtype)  # (512, K)
    x = torch.randn(m, k, generator=gen, device=device).to(backend.activation_dtype(dtype))  # (M, K)
    with torch.no_grad():
        fns = [backend.build_linear(w, calib_x) for w in weights]
        x_in = backend.prepare_input(x)  # x itself, or pre-quantized (scaled-mm-*)
        out = fns[0](x_in)  # (M, N); also compiles the compiled backends, outside the timed region
        ref = x.double() @ weights[0].double().T  # (M, N) float64 reference
    sync(device)

    if device.type == "cuda":
        calls = [lambda fn=fn: fn(x_in) for fn in fns]
        if mode == "graph":
            with torch.no_grad():
                call = capture_cuda_graph(calls, device, warmup=2).replay
            timer = f"device (CUDA events): one CUDA-graph replay of {copies} calls per round, time per call"
        else:

            def call() -> None:
                with torch.no_grad():
                    for fn in calls:
                        fn()

            timer = f"device (CUDA events): {copies} back-to-back eager calls per round, launch gaps included, time per call"
        CLOCK.calls_per_round = copies  # the clock divides each round by this
    else:
        cycle = itertools.cycle(fns)
        timer = "host (time.perf_counter): one call per round"

        def call() -> None:
            with torch.no_grad():
                next(cycle)(x_in)

    benchmark.group = f"{m}x{n}x{k}" + ("-graph" if mode == "graph" else "")
    benchmark.extra_info.update(
        {
            "workload": f"linear:{name}",
            "backend": backend.id + ("-graph" if mode == "graph" else ""),
            "timer": timer,
            "calls_per_round": copies if device.type == "cuda" else 1,
            "dtype": backend.dtype_label(dtype),
            "M": m,
            "N": n,
            "K": k,
            "flops": linear_flops(m, n, k),
            "weight_bytes": weight_bytes,
            "weight_copies": copies,
            "rel_error": rel_error(out, ref),
            "sqnr_db": sqnr_db(out, ref),
            "device": str(device),
            "compiled": backend.compiled,
        }
    )
    rounds = 30 if device.type == "cuda" else 10
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=3 if device.type == "cuda" else 2)

    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["tflops"] = linear_flops(m, n, k) / stats.stats.median / 1e12
    floor = MIN_SQNR_DB["fp8" if backend_id.startswith(("fp8", "scaled-mm")) else "torch"]
    assert out.shape == (m, n)
    assert torch.isfinite(out).all()
    assert benchmark.extra_info["sqnr_db"] > floor, f"{backend_id} {m}x{n}x{k}: SQNR {benchmark.extra_info['sqnr_db']:.1f} dB"
