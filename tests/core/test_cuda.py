"""FP8Linear on a CUDA GPU (compute capability >= 8.9): the CUDA-only `_scaled_mm` rules, run for real.

Skipped on CPU-only machines (CI); run on an H100 with `pytest tests/core/test_cuda.py`.
"""

import logging

import pytest
import torch
from torch import nn

from fp8kit.core import FP8Linear, QuantConfig, quantize, scaling

from fp8_reference import SCHEMES, emulate
from tiny_models import make_tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="needs a CUDA GPU with compute capability >= 8.9 (FP8 tensor cores)",
    ),
]


@pytest.fixture
def no_fallback(caplog, monkeypatch):
    calls = []
    real = torch._scaled_mm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    scaling._warned.clear()
    with caplog.at_level(logging.WARNING, logger="fp8kit.core.scaling"):
        yield calls
    assert not [r for r in caplog.records if "falls back" in r.getMessage()], caplog.text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("bias", [True, False])
def test_fp8linear_on_cuda_matches_emulation(name, dtype, bias, no_fallback):
    torch.manual_seed(0)
    config = SCHEMES[name]
    linear = nn.Linear(256, 128, bias=bias).to(dtype)
    x = torch.randn(4, 33, 256, dtype=dtype)
    input_scale = scaling.tensor_scale(x) if config.activation == "static" else None
    expected = emulate(linear.float(), x.float(), config, input_scale)
    fp8 = FP8Linear.from_linear(linear.to(dtype), config, input_scale).cuda()
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.is_cuda
    out = fp8(x.cuda())
    assert out.dtype == dtype and out.shape == (4, 33, 128)
    # Hopper's FP8 tensor cores accumulate with fewer bits than fp32 (~1e-4 relative measured at K=256),
    # so even fp32 output differs from the exact float64 emulation by more than fp32 rounding.
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-3}[dtype]
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    assert len(no_fallback) == 1


def test_fast_accum_on_cuda(no_fallback):
    torch.manual_seed(0)
    linear = nn.Linear(512, 256).to(torch.bfloat16)
    fp8 = FP8Linear.from_linear(linear, QuantConfig(use_fast_accum=True)).cuda()
    x = torch.randn(64, 512, dtype=torch.bfloat16)
    out = fp8(x.cuda()).double().cpu()
    expected = emulate(linear.float(), x.float(), QuantConfig(), None)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-2
    assert no_fallback[0]["use_fast_accum"] is True


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(weight="channel", activation_granularity="token"), QuantConfig(activation="static", kv_cache=True)], ids=["dyn", "token", "static-kv"])
def test_tiny_llama_on_cuda_in_bf16(config, no_fallback):
    torch.manual_seed(1)
    model = make_tiny_llama().to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.double()
        quantize(model, config, [ids])
        out = model(ids).logits.double()
    assert ((out - ref).norm() / ref.norm()).item() < 0.08
    assert all(model.get_submodule(n).weight.is_cuda for n in model.fp8kit_report.quantized)
