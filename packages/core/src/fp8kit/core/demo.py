"""The main job: FP8 perplexity of the embedded SmolLM2-135M-Instruct on the built-in held-out text.

`python -m fp8kit.core.demo [--out DIR]`: quantizes the default model with each FP8 scheme (static
per-tensor activations calibrated on the built-in calibration text), saves and reloads the static
checkpoints (checking bit-identical logits), and prints perplexity per scheme with the relative change.
The GPTQ rows (README "Choosing an algorithm") calibrate on the first `GPTQ_SAMPLES` windows; the
mixed-precision row keeps the layers `analysis.plan_high_precision` picks in full precision.
`--no-algorithms` prints the max-scale rows only (faster).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch

from .analysis import layer_errors, layer_sensitivity, plan_high_precision
from .checkpoint import load_quantized, save_quantized
from .config import QuantConfig
from .data import calibration_batches, default_texts, perplexity, python_version
from .models import load_model
from .surgery import quantize

logger = logging.getLogger(__name__)

SCHEMES: dict[str, QuantConfig] = {
    "fp8 dynamic per-tensor": QuantConfig(),
    "fp8 dynamic per-token, per-channel weights": QuantConfig(weight="channel", activation_granularity="token"),
    "fp8 static per-tensor (saved + reloaded)": QuantConfig(activation="static"),
    "fp8 block 128x128, dynamic 1x128 groups": QuantConfig(weight="block", activation_granularity="group"),
}
#: Rows of the accuracy algorithms; their calibration is the first GPTQ_SAMPLES windows (GPTQ's
#: block-by-block pass costs two forward passes per window).
ALGORITHM_SCHEMES: dict[str, QuantConfig] = {
    "fp8 dynamic per-token, per-channel weights, gptq": QuantConfig(
        weight="channel", activation_granularity="token", algorithm="gptq"
    ),
    "fp8 static per-tensor, gptq (saved + reloaded)": QuantConfig(activation="static", algorithm="gptq"),
}
GPTQ_SAMPLES = 8
#: The mixed-precision row: the most sensitive layers (by `layer_sensitivity` on SENSITIVITY_SAMPLES
#: calibration windows) that fit in MIXED_BYTES_SHARE of the linear weights' extra bytes stay in full
#: precision (a byte budget: on this model the KL estimates rank layers well but overstate their size).
MIXED_BYTES_SHARE = 0.05
SENSITIVITY_SAMPLES = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8kit.core.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out"), help="directory for the FP8 checkpoint (default ./out)")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--analyze", action="store_true", help="also print per-layer FP8 error (SQNR) of the best scheme")
    parser.add_argument("--no-algorithms", action="store_true", help="skip the GPTQ and mixed-precision rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    started = time.perf_counter()

    original, tokenizer = load_model("default")
    calibration_docs, heldout_docs = default_texts()
    calibration = calibration_batches(tokenizer, calibration_docs, args.num_samples, args.seq_len)
    rows = []
    base_ppl, tokens = perplexity(original, tokenizer, heldout_docs, args.seq_len, desc="perplexity: original (fp32)")
    rows.append(("original (fp32, from Q4_1 GGUF)", base_ppl))
    runs = [(name, config, calibration) for name, config in SCHEMES.items()]
    if not args.no_algorithms:
        runs += [(name, config, calibration[:GPTQ_SAMPLES]) for name, config in ALGORITHM_SCHEMES.items()]
        per_token_gptq = next(iter(ALGORITHM_SCHEMES.values()))
        ranked = layer_sensitivity(original, per_token_gptq, calibration[:SENSITIVITY_SAMPLES])
        budget = int(MIXED_BYTES_SHARE * sum(s.extra_bytes for s in ranked))
        kept = plan_high_precision(ranked, 0.0, max_bytes=budget)
        kept_weights = sum(original.get_submodule(n).weight.numel() for n in kept)
        all_weights = sum(original.get_submodule(s.name).weight.numel() for s in ranked)
        share = 100 * kept_weights / all_weights
        name = f"fp8 per-token gptq, {len(kept)} layers full precision ({share:.1f}% of weights)"
        mixed = dataclasses.replace(per_token_gptq, ignore=(*per_token_gptq.ignore, *kept))
        runs.append((name, mixed, calibration[:GPTQ_SAMPLES]))
        print(f"mixed precision keeps: {', '.join(kept)}")
        if args.analyze:
            print_sensitivity(ranked)
    for name, config, batches in runs:
        start = time.perf_counter()
        model = quantize(copy.deepcopy(original), config, batches if config.needs_calibration else None)
        if config.activation == "static":
            path = args.out / ("smollm2-135m-fp8-static" + ("" if config.algorithm == "max" else f"-{config.algorithm}"))
            save_quantized(model, path, tokenizer, overwrite=True)
            reloaded = load_quantized(path)
            probe = calibration[0]["input_ids"][:, :64]
            with torch.no_grad():
                identical = torch.equal(model(probe).logits, reloaded(probe).logits)
            print(f"saved {path}; reloaded logits bit-identical: {identical}")
            if not identical:
                print("error: reloaded checkpoint does not reproduce the saved model", file=sys.stderr)
                return 1
            model = reloaded
        ppl, _ = perplexity(model, tokenizer, heldout_docs, args.seq_len, desc=f"perplexity: {name}")
        rows.append((name, ppl))
        print(f"{name}: perplexity {ppl:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)

    print(f"\nSmolLM2-135M-Instruct perplexity on the held-out text ({tokens} tokens, Python {python_version()}, "
          f"torch {torch.__version__}, windows of {args.seq_len}):")
    width = max(len(name) for name, _ in rows)
    print(f"| {'scheme':<{width}} | {'perplexity':>10} | {'change':>8} |")
    print(f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 10}|")
    for name, ppl in rows:
        print(f"| {name:<{width}} | {ppl:>10.4f} | {100 * (ppl / base_ppl - 1):>+7.2f}% |")
    if args.analyze:
        print_layer_errors(original, calibration[0])
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    return 0


def print_layer_errors(model: torch.nn.Module, batch: dict) -> None:
    """Per-layer SQNR of dynamic per-token / per-channel FP8, worst layers and means per projection."""
    errors = layer_errors(model, QuantConfig(weight="channel", activation_granularity="token"), batch)
    print("\nPer-layer output SQNR in dB (higher is better), dynamic per-token + per-channel, one 512-token batch:")
    print("| layer | total | weight only | activation only |\n|---|---|---|---|")
    for e in errors[:10]:
        print(f"| {e.name} | {e.total_db:.1f} | {e.weight_only_db:.1f} | {e.activation_only_db:.1f} |")
    by_kind: dict[str, list] = {}
    for e in errors:
        by_kind.setdefault(e.name.rsplit(".", 1)[-1], []).append(e)
    print("| mean per projection | total | weight only | activation only |\n|---|---|---|---|")
    for kind, group in sorted(by_kind.items(), key=lambda kv: sum(e.total_db for e in kv[1]) / len(kv[1])):
        mean = lambda field: sum(getattr(e, field) for e in group) / len(group)  # noqa: E731
        print(f"| {kind} ({len(group)}) | {mean('total_db'):.1f} | {mean('weight_only_db'):.1f} | {mean('activation_only_db'):.1f} |")


def print_sensitivity(ranked: list) -> None:
    """The most sensitive layers: estimated loss increase when each alone is FP8 (`layer_sensitivity`)."""
    total = sum(s.kl for s in ranked)
    print(f"\nPer-layer sensitivity (estimated loss increase, nats/token; all {len(ranked)} layers: {total:.5f}):")
    print("| layer | nats / token | share | cumulative |\n|---|---|---|---|")
    cumulative = 0.0
    for s in ranked[:15]:
        cumulative += s.kl
        print(f"| {s.name} | {s.kl:.6f} | {100 * s.kl / total:.1f}% | {100 * cumulative / total:.1f}% |")


if __name__ == "__main__":
    sys.exit(main())
