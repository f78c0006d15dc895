"""Peak memory and throughput of `fp8kit.core.streaming` on a synthetic multi-GB Llama-shaped checkpoint.

    python tools/stream_bench.py [--dir /tmp/fp8kit-stream-bench] [--hidden 4096 --inter 14336 --layers 10
        --vocab 32000 --shards 4] [--device cpu] [--keep]

Writes a bf16 checkpoint with Llama tensor names (config.json + shards + index; one tensor in memory
at a time), streams it to FP8 in a child process that reports its peak RSS (VmHWM) after its imports
(baseline) and at the end (peak), prints one JSON line, and deletes everything unless --keep.
Reads come from the page cache when the file was just written (say so when reporting).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from fp8kit.core.checkpoint import SafetensorsWriter, shard_names, write_index

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time

    def peak_rss():  # bytes; VmHWM is per address space (ru_maxrss would keep the forked parent's peak across exec)
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    import torch, transformers, accelerate, safetensors
    import transformers.models.llama.modeling_llama
    from fp8kit.core import QuantConfig
    from fp8kit.core.streaming import quantize_checkpoint
    if int(sys.argv[5]) > 0:
        torch.set_num_threads(int(sys.argv[5]))
    baseline = peak_rss()
    report = quantize_checkpoint(sys.argv[1], sys.argv[2], QuantConfig(), device=sys.argv[3] if sys.argv[3] != "auto" else None,
                               max_shard_bytes=int(sys.argv[4]), progress=False)
    peak = peak_rss()
    print(json.dumps({"baseline_bytes": baseline, "peak_bytes": peak, "bytes_in": report.bytes_in,
                      "bytes_out": report.bytes_out, "seconds": report.seconds, "device": report.device,
                      "layers": len(report.quantized), "shards_out": report.shards_out,
                      "threads": torch.get_num_threads()}))
    """
)


def llama_tensors(hidden: int, inter: int, layers: int, vocab: int) -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    """(config.json dict, [(tensor name, shape)] in Hugging Face order) of a Llama with head_dim 128."""
    kv_heads = max(1, hidden // 512)
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=kv_heads, head_dim=128,
        vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
    )
    kv = kv_heads * 128
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        names += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
        ]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return config, names


def write_synthetic_checkpoint(
    path: Path, hidden: int, inter: int, layers: int, vocab: int, shards: int, seed: int = 0
) -> int:
    """Write a random bf16 Llama-shaped checkpoint in `shards` files (+ index, config.json); returns tensor bytes.

    Values: a 16 Mi-element random block (std 0.02), tiled and scaled per tensor, so writing is I/O-bound.
    """
    config, names = llama_tensors(hidden, inter, layers, vocab)
    sizes = [torch.Size(s).numel() * 2 for _, s in names]
    target = sum(sizes) / shards
    groups: list[list[int]] = [[]]
    acc = 0
    for i in range(len(names)):
        if groups[-1] and acc + sizes[i] > target * 1.02 and len(groups) < shards:
            groups.append([])
            acc = 0
        groups[-1].append(i)
        acc += sizes[i]
    files = shard_names(len(groups))
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    block = (torch.randn(2**24, generator=g) * 0.02).to(torch.bfloat16)  # (16Mi,)
    weight_map, total = {}, 0
    for filename, group in zip(files, groups):
        with SafetensorsWriter(path / filename, [(names[i][0], torch.bfloat16, names[i][1]) for i in group], {"format": "pt"}) as w:
            for i in group:
                name, shape = names[i]
                numel, done = torch.Size(shape).numel(), 0
                factor = 1.0 + (i % 7) / 7
                while done < numel:
                    n = min(block.numel(), numel - done)
                    w.write(name, block[:n] * factor, start=done * 2)
                    done += n
                weight_map[name] = filename
                total += numel * 2
    write_index(path, weight_map, total)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/fp8kit-stream-bench"))
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--out-shard-bytes", type=int, default=2 * 2**30, help="output shard limit (default 2 GiB)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in the child (default: torch's choice)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = p.parse_args(argv)

    src, out = args.dir / "bf16", args.dir / "fp8"
    if args.dir.exists():
        shutil.rmtree(args.dir)
    try:
        t0 = time.perf_counter()
        total = write_synthetic_checkpoint(src, args.hidden, args.inter, args.layers, args.vocab, args.shards)
        write_s = time.perf_counter() - t0
        shard_sizes = [f.stat().st_size for f in sorted(src.glob("*.safetensors"))]
        _, names = llama_tensors(args.hidden, args.inter, args.layers, args.vocab)
        largest_tensor = max(torch.Size(s).numel() * 2 for _, s in names)
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(src), str(out), args.device, str(args.out_shard_bytes), str(args.threads)],
            capture_output=True, text=True,
        )
        if child.returncode:
            print(child.stderr, file=sys.stderr)
            return child.returncode
        r = json.loads(child.stdout.strip().splitlines()[-1])
        result = {
            "input_gb": total / 1e9,
            "input_shards": len(shard_sizes),
            "largest_shard_mib": max(shard_sizes) / 2**20,
            "largest_tensor_mib": largest_tensor / 2**20,
            "write_input_s": round(write_s, 1),
            "stream_s": round(r["seconds"], 2),
            "throughput_gb_per_s": round(r["bytes_in"] / 1e9 / r["seconds"], 3),
            "output_gb": r["bytes_out"] / 1e9,
            "output_shards": r["shards_out"],
            "layers_quantized": r["layers"],
            "device": r["device"],
            "torch_threads": r["threads"],
            "baseline_rss_mib": round(r["baseline_bytes"] / 2**20, 1),
            "peak_rss_mib": round(r["peak_bytes"] / 2**20, 1),
            "rss_growth_mib": round((r["peak_bytes"] - r["baseline_bytes"]) / 2**20, 1),
            "torch": torch.__version__,
            "cpus": len(__import__("os").sched_getaffinity(0)),
        }
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
