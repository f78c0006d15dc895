"""Activation-quantization benchmarks: fp8kit's `quantize_activation` (Triton on GPU) vs the unfused
torch path vs a plain copy of the same activation, on an 8192 x 8192 bf16 activation and a decode
size on GPU (small shapes on CPU). Bytes and bandwidth go into `extra_info` under the report's
column names (`bytes_moved`, `gbps`), so the floor ratio can be computed against the copy row.
On a GPU the time is the device's (`DeviceClock`, CUDA events; see test_bench_linear.py): the decode size
is replayed from a CUDA graph of `GRAPH_CALLS` calls, the large size runs `EAGER_CALLS` back-to-back
calls per round; `extra_info["timer"]` says which.
"""

from __future__ import annotations

import pytest
import torch

from fp8kit.bench import get_backend, sqnr_db
from fp8kit.bench.timing import DeviceClock, capture_cuda_graph, sync
from fp8kit.core import scaling

CUDA = torch.cuda.is_available()
CLOCK = DeviceClock() if CUDA else None
pytestmark = [pytest.mark.benchmark(timer=CLOCK)] if CUDA else []
GRAPH_CALLS, EAGER_CALLS = 32, 10
SIZES = [(8192, 8192), (16, 4096)] if CUDA else [(64, 1536), (1, 576)]
BACKENDS = ["copy"] + [f"quant-{s}{impl}" for s in ("dynamic-token", "static-tensor", "dynamic-tensor") for impl in ("", "-torch")]


@pytest.mark.parametrize("backend_id", BACKENDS)
@pytest.mark.parametrize("m,k", SIZES, ids=[f"{m}x{k}" for m, k in SIZES])
def test_quantize(benchmark, device, backend_id, m, k):
    backend = get_backend(backend_id)
    reason = backend.unavailable_reason(device)
    if reason:
        pytest.skip(f"{backend_id}: {reason}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(m * 7 + k)
    x = torch.randn(m, k, generator=gen).to(device, dtype)  # (M, K)
    static_scale = scaling.tensor_scale(x)  # ()
    fn = backend.build_quant(static_scale)
    with torch.no_grad():
        out = fn(x)
    sync(device)
    values = out if backend_id == "copy" else out[0].double() * out[1].double()  # (M, K) dequantized

    if device.type == "cuda":
        graph = m * k <= 1 << 20  # decode sizes: graph replay (launch overhead out)
        calls = GRAPH_CALLS if graph else EAGER_CALLS
        if graph:
            with torch.no_grad():
                call = capture_cuda_graph([lambda: fn(x)] * calls, device, warmup=2).replay
            timer = f"device (CUDA events): one CUDA-graph replay of {calls} calls per round, time per call"
        else:

            def call() -> None:
                with torch.no_grad():
                    for _ in range(calls):
                        fn(x)

            timer = f"device (CUDA events): {calls} back-to-back eager calls per round, time per call"
        CLOCK.calls_per_round = calls
    else:
        timer = "host (time.perf_counter): one call per round"

        def call() -> None:
            with torch.no_grad():
                fn(x)

    moved = backend.quant_bytes(m, k, dtype)
    benchmark.group = f"quant {m}x{k}"
    benchmark.extra_info.update(
        {
            "workload": f"quant:{m}x{k}", "backend": backend.id, "dtype": backend.dtype_label(dtype), "M": m, "K": k,
            "bytes_moved": moved, "sqnr_db": sqnr_db(values, x.double()), "device": str(device), "target": "quant",
            "impl": backend.impl(device), "timer": timer,
        }
    )
    benchmark.pedantic(call, rounds=50 if CUDA else 10, iterations=1, warmup_rounds=5 if CUDA else 2)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["gbps"] = moved / stats.stats.median / 1e9
    assert torch.isfinite(values).all()
    floor = 100.0 if backend_id == "copy" else 25.0  # a copy is exact (inf dB); one FP8 rounding ~31 dB
    assert benchmark.extra_info["sqnr_db"] > floor
