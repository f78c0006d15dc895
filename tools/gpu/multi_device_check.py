"""Issue 11 proof: calibrate + quantize a Llama-3-8B-shaped model split by accelerate, against one GPU.

Run from the repo root on a GPU machine (random weights; nothing is downloaded):
    PYTHONPATH=packages/core/src python tools/gpu/multi_device_check.py --out $OUT \
        --max-memory 0=10GiB,1=10GiB          # two GPUs: the model must split across both
    PYTHONPATH=packages/core/src python tools/gpu/multi_device_check.py --out $OUT \
        --max-memory 0=8GiB,cpu=200GiB        # one GPU: what does not fit is offloaded to CPU memory

Steps: build the bf16 model on cuda:0 from a seed and save it as a Hugging Face directory; (A) load it on cuda:0
alone (`device_map={"": 0}`), quantize it (static activations + KV-cache scales, 8 x 512 random tokens) and save; (B) load the directory with
`device_map="auto"` and `--max-memory`, calibrate and quantize where each layer lives, save; compare every
tensor of A and B bit for bit; (C) reload B with `load_quantized(device_map="auto", max_memory=...)` and compare
its logits with A reloaded on cuda:0. Writes multi_device.json (times, peak memory per GPU, the device map's
summary, mismatches) under --out and prints it.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from fp8kit.core import QuantConfig, load_quantized, quantize, save_quantized
from fp8kit.core.__main__ import parse_max_memory
from fp8kit.core.models import load_model
from fp8kit.core.offload import device_summary

CONFIG = QuantConfig(activation="static", kv_cache=True)


def llama3_8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def peak_gib() -> dict[str, float]:
    return {f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(torch.cuda.device_count())}


def reset_peaks() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/multi_device_check"))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--max-memory", default="0=10GiB,1=10GiB")
    args = p.parse_args()
    max_memory = parse_max_memory(args.max_memory)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__, "layers": args.layers, "max_memory": args.max_memory,
    }
    from transformers import LlamaForCausalLM, __version__ as tf_version

    result["transformers"] = tf_version
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 128256, (1, 512), generator=g) for _ in range(8)]
    ids = torch.randint(0, 128256, (2, 64), generator=g)

    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda:0"):
        model = LlamaForCausalLM(llama3_8b_config(args.layers)).to(torch.bfloat16).eval()
    for param in model.parameters():  # small random weights, like a trained model's scale
        param.data.normal_(0, 0.02)
    hf = args.work / "hf"
    model.save_pretrained(hf)
    result["build_and_save_bf16_s"] = round(time.perf_counter() - t, 1)

    del model  # (A) one GPU, loaded through the same from_pretrained path as (B), so RoPE buffers etc. are identical
    free()
    reset_peaks()
    model, _ = load_model(hf, dtype=torch.bfloat16, device_map={"": 0})
    t = time.perf_counter()
    quantize(model, CONFIG, calibration)
    torch.cuda.synchronize()
    result["one_gpu_quantize_s"] = round(time.perf_counter() - t, 1)
    result["one_gpu_peak_gib"] = peak_gib()
    save_quantized(model, args.work / "one", overwrite=True)
    del model
    free()

    # (B) split by accelerate
    reset_peaks()
    t = time.perf_counter()
    model, _ = load_model(hf, dtype=torch.bfloat16, device_map="auto", max_memory=max_memory)
    result["split_load_s"] = round(time.perf_counter() - t, 1)
    result["split_device_map"] = dict(Counter(str(d) for d in model.hf_device_map.values()))
    t = time.perf_counter()
    quantize(model, CONFIG, calibration)
    torch.cuda.synchronize()
    result["split_quantize_s"] = round(time.perf_counter() - t, 1)
    result["split_peak_gib"] = peak_gib()
    result["split_fp8_layers_per_device"] = device_summary(model, model.fp8kit_report.quantized)
    save_quantized(model, args.work / "split", overwrite=True)
    del model
    free()

    one, split = read_all(args.work / "one"), read_all(args.work / "split")
    result["tensors"] = len(one)
    result["tensor_names_equal"] = sorted(one) == sorted(split)
    result["tensors_not_bit_equal"] = [
        k for k in one if k in split and not torch.equal(one[k].reshape(-1).view(torch.uint8), split[k].reshape(-1).view(torch.uint8))
    ][:20]
    del one, split

    # (C) sharded reload vs one-GPU reload
    reset_peaks()
    reference = load_quantized(args.work / "one", device="cuda:0")
    with torch.no_grad():
        want = reference(ids.cuda()).logits.float().cpu()
    del reference
    free()
    t = time.perf_counter()
    sharded = load_quantized(args.work / "split", device_map="auto", max_memory=max_memory, offload_folder=args.work / "offload")
    result["sharded_reload_s"] = round(time.perf_counter() - t, 1)
    result["sharded_device_map"] = dict(Counter(str(d) for d in sharded.hf_device_map.values()))
    with torch.no_grad():
        got = sharded(ids.cuda()).logits.float().cpu()
    result["sharded_reload_peak_gib"] = peak_gib()
    result["logits_max_abs_diff"] = float((got - want).abs().max())
    result["logits_equal"] = bool(torch.equal(got, want))
    (args.out / "multi_device.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
