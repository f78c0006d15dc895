"""Perplexity of SmolLM2-135M per FP8 scheme x algorithm (CPU): the table of docs/BENCHMARKS.md.

    python tools/accuracy_sweep.py --split tuning  --runs dyn-token:max,dyn-token:mse      # choose settings
    python tools/accuracy_sweep.py --split heldout --runs all --out sweep.csv             # report

A run is SCHEME:ALGORITHM[:key=value,...] with SCHEME one of `SCHEMES` and extra `QuantConfig`
fields (e.g. ``static:gptq:smoothing=0.5``). Calibration: the built-in calibration text (32 x 512
tokens by default); `--split tuning` measures on the tuning text, `heldout` on the demo's held-out
text. Prints one markdown row per run (perplexity, change, quantization seconds) as it finishes.

`--emulate-gemm` runs each FP8 GEMM as `scaling`'s fallback (dequantize both FP8 operands, fp32
`F.linear`): the same FP8 values, fp32 accumulation in another order, 4-5x faster than torch's CPU
`_scaled_mm`. Quantization itself is unchanged.
"""

from __future__ import annotations

import argparse
import copy
import csv
import time

import torch

from fp8kit.core import QuantConfig, quantize, scaling
from fp8kit.core.data import _token_ids, calibration_batches, default_texts, perplexity, python_version, tuning_texts
from fp8kit.core.models import load_model

SCHEMES = {
    "dyn-tensor": {},
    "dyn-token": {"weight": "channel", "activation_granularity": "token"},
    "static": {"activation": "static"},
}
ALGORITHMS = ("max", "mse", "gptq")


def parse_run(text: str) -> QuantConfig:
    """'static:gptq:smoothing=0.5,gptq_act_order=True' -> QuantConfig."""
    scheme, algorithm, *rest = text.split(":") + [""]
    fields = dict(SCHEMES[scheme], algorithm=algorithm)
    for item in filter(None, ",".join(rest).split(",")):
        key, value = item.split("=")
        fields[key] = None if value == "None" else value == "True" if value in ("True", "False") else type_of(key)(value)
    return QuantConfig(**fields)


def type_of(key: str):
    return int if key == "gptq_block_size" else float


_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # code -> value (fp32)
_dequantized_weights: dict[tuple[int, int], torch.Tensor] = {}


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in fp32 through a 256-entry table (torch's CPU float8 -> float cast is slow)."""
    return _FP8_VALUES[q.view(torch.uint8).long()] * scale


def emulated_fp8_matmul(x_fp8, weight_fp8, x_scale, weight_scale, bias=None, out_dtype=torch.bfloat16, use_fast_accum=False):
    """`scaling.fp8_matmul` as fp32 `F.linear` of the dequantized operands (dequantized weights cached)."""
    key = (weight_fp8.data_ptr(), weight_scale.data_ptr())
    if key not in _dequantized_weights:
        _dequantized_weights[key] = _dequantize(weight_fp8, weight_scale.reshape(-1, 1) if weight_scale.dim() else weight_scale)
    out = torch.nn.functional.linear(_dequantize(x_fp8, x_scale), _dequantized_weights[key])
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=["tuning", "heldout"], required=True)
    parser.add_argument("--runs", default="all", help="comma-free list separated by ';', or 'all'")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="CSV file to append rows to")
    parser.add_argument("--base", type=float, help="the original model's perplexity on the split, if known (skips measuring it)")
    parser.add_argument("--emulate-gemm", action="store_true", help="fp32 GEMM on dequantized FP8 operands (faster on CPU)")
    args = parser.parse_args()
    if args.emulate_gemm:
        scaling.fp8_matmul = emulated_fp8_matmul
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs = [f"{s}:{a}" for s in SCHEMES for a in ALGORITHMS] if args.runs == "all" else args.runs.split(";")
    model, tokenizer = load_model("default")
    calibration_docs, heldout = default_texts()
    texts = tuning_texts() if args.split == "tuning" else heldout
    calibration = calibration_batches(tokenizer, calibration_docs, args.num_samples, args.seq_len)
    if args.base is None:
        base, tokens = perplexity(model, tokenizer, texts, args.seq_len)
    else:
        base, tokens = args.base, sum(w.numel() - 1 for w in _token_ids(tokenizer, texts).split(args.seq_len) if w.numel() > 1)
    print(f"split {args.split}: {tokens} tokens, Python {python_version()}, torch {torch.__version__}, "
          f"{args.threads} threads, original perplexity {base:.4f}", flush=True)
    print("| run | perplexity | change | quantize s |\n|---|---|---|---|", flush=True)
    for run in runs:
        config = parse_run(run)
        start = time.perf_counter()
        quantized = quantize(copy.deepcopy(model), config, calibration if config.needs_calibration else None)
        seconds = time.perf_counter() - start
        ppl, _ = perplexity(quantized, tokenizer, texts, args.seq_len)
        print(f"| {run} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% | {seconds:.1f} |", flush=True)
        if args.out:
            with open(args.out, "a", newline="") as f:
                csv.writer(f).writerow(
                    [args.split, tokens, run, args.num_samples, args.emulate_gemm, f"{base:.4f}", f"{ppl:.4f}", f"{seconds:.1f}", python_version()]
                )
        del quantized
        _dequantized_weights.clear()


if __name__ == "__main__":
    main()
