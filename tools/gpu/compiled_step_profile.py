"""Where the compiled 8B-shaped stack decode step spends its device time (issue 16: compiled + graph at 1.28-1.44x).

    PYTHONPATH=packages/core/src:packages/bench/src python3 tools/gpu/compiled_step_profile.py --out $OUT

For bf16, FP8 static and FP8 per-token (batch 8, 4 layers, `torch.compile(step, dynamic=False)`): one
torch.profiler trace of 5 compiled steps (not graph-replayed: the kernels are the same, launch gaps are
not), kernel time per step summed by category: GEMM (cuBLAS / CUTLASS / fp8kit's fused kernel), fp8kit
quantize kernels, attention, Inductor's fused elementwise kernels, other. Writes profile.csv and the top
kernels per backend in profile.txt.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from fp8kit.bench.model_speed import _Decode
from fp8kit.bench.workloads import llama3_8b_stack_config
from stack_models import stack_models

STEPS = 5
CATEGORIES = (
    ("gemm", ("fused_linear_kernel", "gemm", "nvjet", "cutlass", "sm90_xmma", "scaled_mm", "splitk", "gemv")),
    ("quantize", ("per_token", "per_tensor", "static_kernel", "amax_partial", "scale_epilogue")),
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("inductor", ("triton_",)),
)


def category(name: str) -> str:
    low = name.lower()
    for label, keys in CATEGORIES:
        if any(key in low for key in keys):
            return label
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/compiled-profile")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    config = llama3_8b_stack_config(4)
    gen = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (8, 64), device=device, generator=gen)
    ids = torch.randint(0, config.vocab_size, (8, 1), device=device, generator=gen)
    rows, report = [], (out / "profile.txt").open("w")
    for backend, model in stack_models(config, device, ("torch-bf16", "fp8-static-tensor", "fp8-dynamic-token")):
        decode = _Decode(model, prompt, ids, 1024)
        step = torch.compile(decode.step, dynamic=False)
        with torch.no_grad():
            for _ in range(3):
                step(decode.ids, decode.position)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(STEPS):
                    step(decode.ids, decode.position)
                torch.cuda.synchronize()
        per_cat: dict[str, float] = defaultdict(float)
        kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                us = event.time_range.elapsed_us()  # the kernel's duration
                per_cat[category(event.name)] += us / STEPS
                kernels[event.name][0] += us / STEPS
                kernels[event.name][1] += 1
        row = {"backend": backend, **{k: round(v, 1) for k, v in per_cat.items()}, "total_us": round(sum(per_cat.values()), 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        print(f"== {backend}: device µs per step by category {json.dumps(row)}", file=report)
        for name, (us, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]:
            print(f"  {us:8.1f} µs/step  {count // STEPS:4d} launches/step  [{category(name)}] {name[:110]}", file=report)
        report.flush()
        del decode, step
        del model
        torch.cuda.empty_cache()
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "backend", k))
    with (out / "profile.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
