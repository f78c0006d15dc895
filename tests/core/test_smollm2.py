"""The real embedded model: SmolLM2-135M-Instruct (from a Q4_1 GGUF) perplexity under FP8.

Bound: on the held-out text (10.5k tokens, Python 3.11), we measured +1.84% (dynamic per-token,
per-channel weights) and +2.49% (static per-tensor) perplexity; see docs/BENCHMARKS.md. The test
allows +4%: a margin of 1.6x the worst measured scheme for torch / Python differences, while a
broken quantizer (wrong scale, lost bias, dequantizing with the wrong scale) gives +10% or far more.
"""

import pytest
import torch

from fp8kit.core import QuantConfig, load_quantized, quantize, save_quantized
from fp8kit.core.data import calibration_batches, default_texts, perplexity
from fp8kit.core.models import load_model

pytestmark = pytest.mark.slow
MAX_INCREASE = 0.04
# GPTQ (per-token activations, per-channel weights, 8 x 512 calibration tokens): measured +1.45% on the
# held-out text (docs/BENCHMARKS.md, "Accuracy algorithms"); max scales give +1.84%. The bound is the
# max-scale result: GPTQ must stay strictly better than max scales (a margin of 0.39 points, 27% of
# FP8's loss, for torch / Python differences), and a GPTQ that stops compensating errors, or pushes
# them the wrong way, lands at or above +1.84%.
GPTQ_MAX_INCREASE = 0.0184


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("default")
    calibration, heldout = default_texts()
    base, tokens = perplexity(model, tokenizer, heldout)
    return model, tokenizer, calibration, heldout, base, tokens


def test_default_text_is_long_enough(smollm2):
    *_, base, tokens = smollm2
    assert tokens >= 8000
    assert 5 < base < 30  # a working 135M instruct model on English prose


def test_dynamic_token_channel_perplexity(smollm2):
    model, tokenizer, _, heldout, base, _ = smollm2
    import copy

    q = quantize(copy.deepcopy(model), QuantConfig(weight="channel", activation_granularity="token"))
    ppl, _ = perplexity(q, tokenizer, heldout)
    assert 1 - 0.01 < ppl / base < 1 + MAX_INCREASE, (ppl, base)


def test_static_perplexity_after_save_and_reload(smollm2, tmp_path):
    model, tokenizer, calibration, heldout, base, _ = smollm2
    import copy

    batches = calibration_batches(tokenizer, calibration, num_samples=16, seq_len=512)
    q = quantize(copy.deepcopy(model), QuantConfig(activation="static"), batches)
    save_quantized(q, tmp_path / "ckpt", tokenizer)
    reloaded = load_quantized(tmp_path / "ckpt")
    ppl, _ = perplexity(reloaded, tokenizer, heldout)
    assert 1 - 0.01 < ppl / base < 1 + MAX_INCREASE, (ppl, base)
    probe = batches[0]["input_ids"][:, :32]
    with torch.no_grad():
        assert torch.equal(q(probe).logits, reloaded(probe).logits)


def test_gptq_per_token_perplexity_beats_max_scales(smollm2):
    model, tokenizer, calibration, heldout, base, _ = smollm2
    import copy

    batches = calibration_batches(tokenizer, calibration, num_samples=8, seq_len=512)
    config = QuantConfig(weight="channel", activation_granularity="token", algorithm="gptq")
    q = quantize(copy.deepcopy(model), config, batches)
    ppl, _ = perplexity(q, tokenizer, heldout)
    assert 1 - 0.01 < ppl / base < 1 + GPTQ_MAX_INCREASE, (ppl, base)
