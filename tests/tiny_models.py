"""Tiny random-weight transformers models (fast) and a tiny offline tokenizer, for tests."""

from __future__ import annotations

import torch

TINY_VOCAB = 256


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


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


