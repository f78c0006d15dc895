"""Where a decode step's GPU time goes: torch.profiler over eager decode steps of the bf16 and FP8
Llama-3-8B-shaped stack (4 layers, batch 8, StaticCache 512/1024). Kernel times are what a CUDA-graph
replay runs, minus the launch gaps. Per backend it prints GPU microseconds per step split into GEMM,
attention, FP8 activation quantization and everything else (elementwise, norms, RoPE, cache writes,
copies), kernel launches per step, and the top kernels.

Usage (GPU, repository root): python3 tools/gpu/decode_profile.py [--stock-attention] [backend ...]
(--stock-attention: transformers' "sdpa" with its repeat_kv copy, instead of fp8kit_sdpa_gqa; both
sides alike).
"""

import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from fp8kit.bench.model_speed import _Decode, build_model, quantized_copy
from fp8kit.bench.workloads import llama3_8b_stack_config
from fp8kit.core.graphs import use_gqa_attention

STEPS = 5


def category(kernel: str) -> str:
    """A kernel's name -> gemm / attention / quant / other (H100 cuBLAS(Lt), SDPA, Triton names)."""
    name = kernel.lower()
    if any(s in name for s in ("fmha", "flash", "attention", "attn")):
        return "attention"
    if any(s in name for s in ("gemm", "nvjet", "xmma", "cutlass", "splitk", "scaled_mm")):
        return "gemm"
    # fp8kit's Triton activation-quantization kernels (kernels.py) and anything named like one.
    if any(s in name for s in ("quant", "fp8", "amax", "e4m3", "per_token_kernel", "static_kernel", "per_tensor")):
        return "quant"
    return "other"


def kernel_times(prof) -> dict[str, tuple[float, int]]:
    """Kernel name -> (total GPU us, calls) over the profiled steps."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(event, "device_time", None)
        if us is None:
            us = event.cuda_time
        out[event.name][0] += us
        out[event.name][1] += 1
    return {k: (v[0], int(v[1])) for k, v in out.items()}


def main(argv: list[str]) -> None:
    stock = "--stock-attention" in argv
    backends = [a for a in argv if not a.startswith("--")] or ["fp8-static-tensor-fastacc"]
    device = torch.device("cuda")
    config = llama3_8b_stack_config(4)
    base = build_model(config, False, device, torch.bfloat16)
    if not stock:
        use_gqa_attention(base)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (8, 512), generator=gen).to(device)
    ids = torch.randint(0, config.vocab_size, (8, 1), generator=gen).to(device)
    calib = [torch.randint(0, config.vocab_size, (1, 512), generator=gen).to(device)]
    summary = []
    for backend in ["torch-bf16"] + backends:
        model = base if backend == "torch-bf16" else quantized_copy(base, backend, calib)[0]
        decode = _Decode(model, prompt, ids, 1024, gqa_attention=not stock)
        for _ in range(3):
            decode()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(STEPS):
                decode()
            torch.cuda.synchronize()
        kernels = kernel_times(prof)
        split: dict[str, float] = defaultdict(float)
        for name, (us, _) in kernels.items():
            split[category(name)] += us / STEPS
        launches = sum(n for _, n in kernels.values()) / STEPS
        summary.append((backend, model.config._attn_implementation, split, launches))
        print(f"\n== {backend} ({model.config._attn_implementation}): top kernels, GPU us per step")
        for name, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:16]:
            print(f"{us / STEPS:9.1f} us {n / STEPS:6.1f}x  [{category(name):9s}] {name[:110]}")
        del decode
        if model is not base:
            del model
        torch.cuda.empty_cache()
    print("\nGPU us per decode step (eager kernels; a graph replay runs the same kernels):")
    heads = ("gemm", "attn", "quant", "other", "total", "kernels")
    print(f"{'backend':30s} {'attention':16s} " + " ".join(f"{h:>8s}" for h in heads))
    for backend, attn, split, launches in summary:
        total = sum(split.values())
        print(f"{backend:30s} {attn:16s} {split['gemm']:8.1f} {split['attention']:8.1f} {split['quant']:8.1f} "
              f"{split['other']:8.1f} {total:8.1f} {launches:8.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
