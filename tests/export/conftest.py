"""Shared fixtures for fp8kit.export tests: tiny quantized models and a tiny tokenizer.

No tests/export/__init__.py on purpose: the test tree must never shadow the top-level `export` module.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fp8kit.core import QuantConfig, quantize
from fp8kit.core.linear import FP8Linear

TEXT = (
    "FP8 E4M3 has four exponent bits and three mantissa bits. The largest value is 448. "
    "TensorRT reads the quantized type from the zero point of QuantizeLinear. "
    "A per-channel weight scale needs an explicit axis. Static activation scales come from calibration. "
) * 8


def tiny_llama(seed: int = 0, vocab: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def token_sequences(n: int = 10, vocab: int = 256, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, 40, (n,), generator=gen)
    return [torch.randint(0, vocab, (int(length),), generator=gen) for length in lengths]


def quantized_llama(weight: str = "tensor", seed: int = 0):
    model = tiny_llama(seed)
    calibration = [s[None] for s in token_sequences(6, seed=seed + 100)]
    return quantize(model, QuantConfig(weight=weight, activation="static"), calibration)


class MLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))


@torch.no_grad()
def quantized_mlp(weight: str = "tensor", seed: int = 0) -> nn.Module:
    """A biased MLP with static input scales calibrated by hand (absmax of each layer's input / 448)."""
    torch.manual_seed(seed)
    model = MLP().eval()
    calib = torch.randn(64, 32)
    config = QuantConfig(weight=weight, activation="static")
    x = calib
    for i, layer in enumerate(list(model)):
        if isinstance(layer, nn.Linear):
            scale = x.abs().amax() / 448
            model[i] = FP8Linear.from_linear(layer, config, scale)
        x = layer(x)
    return model


@pytest.fixture
def llama_tensor():
    return quantized_llama("tensor")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer of 256 tokens saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator([TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=["input_ids", "attention_mask"])
    fast.pad_token = fast.convert_ids_to_tokens(0)
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A full-precision tiny Llama Hugging Face directory (safetensors) with its tokenizer."""
    out = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(3)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out, safe_serialization=True)
    for item in tokenizer_dir.iterdir():
        (out / item.name).write_bytes(item.read_bytes())
    return out


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text("\n\n".join([TEXT] * 3), encoding="utf-8")
    return path


@pytest.fixture
def models() -> SimpleNamespace:
    """The model builders of this file (conftest modules cannot be imported by name under importlib mode)."""
    return SimpleNamespace(
        MLP=MLP,
        tiny_llama=tiny_llama,
        token_sequences=token_sequences,
        quantized_llama=quantized_llama,
        quantized_mlp=quantized_mlp,
        TEXT=TEXT,
    )
