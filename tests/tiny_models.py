"""Tiny random-weight transformers models (fast) and a tiny offline tokenizer, for tests."""

from __future__ import annotations

import torch

TINY_VOCAB = 256


_COMMON = dict(  # the shared size of the tiny models (dense and MoE)
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=TINY_VOCAB,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**_COMMON, "intermediate_size": 128, **overrides})


def make_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def make_tiny_tokenizer():
    """A word-level fast tokenizer over TINY_VOCAB entries (bytes-free, offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>"] + [f"w{i}" for i in range(TINY_VOCAB - 2)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>")


def tiny_text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY_VOCAB - 2, (n_words,), generator=g)
    return " ".join(f"w{i}" for i in ids.tolist())




MOE_KINDS = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")
def tiny_moe_config(kind: str, **overrides):
    """A tiny transformers 5 MoE config: hidden 64, expert intermediate 32, 2 layers, top-2 routing."""
    import transformers

    if kind == "mixtral":
        cls, kwargs = transformers.MixtralConfig, dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    elif kind == "qwen3_moe":
        cls, kwargs = transformers.Qwen3MoeConfig, dict(
            intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16, norm_topk_prob=True
        )
    elif kind == "deepseek_v3":  # layer 0 dense, layer 1 MoE with one shared expert
        cls, kwargs = transformers.DeepseekV3Config, dict(
            intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16,
            q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4,
        )  # fmt: skip
    elif kind == "gpt_oss":  # transposed experts with biases, interleaved gate / up
        cls, kwargs = transformers.GptOssConfig, dict(
            intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )  # fmt: skip
    else:
        raise ValueError(kind)
    kwargs = {**_COMMON, **kwargs, **overrides}
    return cls(**kwargs)


def make_tiny_moe(kind: str, seed: int = 0, **overrides):
    """A tiny random MoE causal LM of `kind` (one of MOE_KINDS), eval mode, fp32.

    transformers initializes expert weights with std 0.02 and biases with zeros; gpt-oss's biases
    are drawn too here, so the bias paths carry real values.
    """
    import transformers

    classes = {
        "mixtral": transformers.MixtralForCausalLM,
        "qwen3_moe": transformers.Qwen3MoeForCausalLM,
        "deepseek_v3": transformers.DeepseekV3ForCausalLM,
        "gpt_oss": transformers.GptOssForCausalLM,
    }
    torch.manual_seed(seed)
    model = classes[kind](tiny_moe_config(kind, **overrides)).eval()
    if kind == "gpt_oss":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_bias"):
                    p.normal_(0, 0.02)
    return model


def moe_layers(model):
    """The MoE blocks (`mlp` modules with `experts`) of a tiny MoE causal LM, first to last."""
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
