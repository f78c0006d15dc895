"""MoE numbers for docs/BENCHMARKS.md (CPU, a minute): FP8 share of weight matrices and logits error.

1. Tiny random transformers 5 models (tests/tiny_models.py: hidden 64, 2 layers, experts of width 32,
   top-2) quantized per scheme through `fp8kit.core.quantize`: the QuantReport's FP8 share (elements,
   bytes) and the per-token relative logits error vs the unquantized model (median and 90th
   percentile over 64 tokens), next to a dense tiny Llama of the same size (MLP width 64 = top-2 x 32).
2. The real models' configurations (Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V3, gpt-oss-20b) built on
   the meta device: the share of weight-matrix elements `quantize` would make
   FP8 (`surgery.select_linears` / `select_experts`; embeddings, routers and lm_head stay bf16).

    PYTHONPATH=packages/core/src:tests python tools/moe_accuracy.py
"""

from __future__ import annotations

import logging

import torch

from fp8kit.core import QuantConfig, quantize
from fp8kit.core.experts import canonical_weight, experts_layout
from fp8kit.core.surgery import select_experts, select_linears

from tiny_models import MOE_KINDS, make_tiny_llama, make_tiny_moe

SCHEMES = {
    "dynamic per-tensor": QuantConfig(),
    "dynamic per-token / per-channel": QuantConfig(weight="channel", activation_granularity="token"),
    "static per-tensor": QuantConfig(activation="static"),
}


def token_errors(model, config, ids):
    reference = model(ids).logits.double()
    quantize(model, config, [ids] if config.activation == "static" else None)
    out = model(ids).logits.double()
    return ((out - reference).norm(dim=-1) / reference.norm(dim=-1)).flatten(), model.fp8kit_report


def real_share(kind: str) -> tuple[float, int]:
    import transformers

    cls, config = {
        "Mixtral-8x7B": (transformers.MixtralForCausalLM, transformers.MixtralConfig()),  # the defaults are 8x7B
        "Qwen3-30B-A3B": (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(
            hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
            vocab_size=151936, tie_word_embeddings=False)),
        "DeepSeek-V3": (transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config()),  # the defaults are V3
        "gpt-oss-20b": (transformers.GptOssForCausalLM, transformers.GptOssConfig(
            num_hidden_layers=24, num_local_experts=32, num_attention_heads=64, num_key_value_heads=8,
            head_dim=64, hidden_size=2880, intermediate_size=2880, vocab_size=201088)),
    }[kind]  # fmt: skip
    with torch.device("meta"):
        model = cls(config)
    linears, _ = select_linears(model, QuantConfig(), check_weights=False)
    experts, _ = select_experts(model, QuantConfig(), check_weights=False)
    fp8 = sum(model.get_submodule(n).weight.numel() for n in linears)
    for name in experts:
        module = model.get_submodule(name)
        layout = experts_layout(module)
        fp8 += sum(canonical_weight(module, layout, p).numel() for p in layout.projections)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("bias"))
    return fp8 / matrices, matrices


def main() -> None:
    logging.disable(logging.WARNING)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    print("| model | scheme | FP8 share (elements) | FP8 share (bytes, fp32 model) | median token error | p90 | dense median |")
    print("|---|---|---|---|---|---|---|")
    for scheme, config in SCHEMES.items():
        dense, _ = token_errors(make_tiny_llama(intermediate_size=64), config, ids)
        for kind in MOE_KINDS:
            errors, report = token_errors(make_tiny_moe(kind), config, ids)
            print(
                f"| tiny {kind} | {scheme} | {100 * report.fp8_element_share:.1f}% | {100 * report.fp8_byte_share:.1f}% "
                f"| {errors.median():.4f} | {errors.quantile(0.9):.4f} | {dense.median():.4f} |"
            )
    print()
    print("| model (configuration only, meta device) | weight-matrix elements | FP8 share (elements) |")
    print("|---|---|---|")
    for kind in ("Mixtral-8x7B", "Qwen3-30B-A3B", "DeepSeek-V3", "gpt-oss-20b"):
        share, total = real_share(kind)
        print(f"| {kind} | {total / 1e9:.2f} B | {100 * share:.2f}% |")


if __name__ == "__main__":
    main()
