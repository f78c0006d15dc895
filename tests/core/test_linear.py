import logging

import pytest
import torch
from torch import nn

from fp8kit.core import FP8Linear, QuantConfig, kernels, scaling
from fp8kit.core.scaling import tensor_scale

from fp8_reference import SCHEMES, emulate

@pytest.fixture
def scaled_mm_calls(monkeypatch):
    calls = []
    real = torch._scaled_mm

    def spy(a, b, scale_a, scale_b, **kwargs):
        calls.append((a.shape, b.shape, b.stride(), scale_a.shape, scale_b.shape, kwargs))
        return real(a, b, scale_a, scale_b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    return calls


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("bias", [True, False])
def test_fp8linear_matches_emulation_and_uses_scaled_mm(name, bias, scaled_mm_calls):
    torch.manual_seed(0)
    config = SCHEMES[name]
    linear = nn.Linear(64, 48, bias=bias)
    x = torch.randn(3, 5, 64)  # rank 3: flattened to (15, 64)
    input_scale = tensor_scale(x) * 1.25 if config.activation == "static" else None
    fp8 = FP8Linear.from_linear(linear, config, input_scale)
    out = fp8(x)
    assert out.shape == (3, 5, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), emulate(linear, x, config, input_scale), rtol=1e-5, atol=1e-5)
    # Within the FP8 error of the exact full-precision result (SQNR well above 20 dB).
    exact = linear(x).double()
    sqnr_db = 10 * torch.log10(exact.pow(2).sum() / (out.double() - exact).pow(2).sum())
    assert sqnr_db > 20
    # _scaled_mm ran (not the fallback) with the weight's free transpose, 2-D input and right scale shapes.
    assert len(scaled_mm_calls) == 1
    a_shape, b_shape, b_stride, sa, sb, kwargs = scaled_mm_calls[0]
    assert a_shape == (15, 64) and b_shape == (64, 48) and b_stride == (1, 64)
    rowwise = config.weight == "channel" or config.activation_granularity == "token"
    assert (sa, sb) == (((15, 1), (1, 48)) if rowwise else ((), ()))
    assert kwargs["out_dtype"] == torch.float32 and kwargs["use_fast_accum"] is False


def test_buffers_layout():
    fp8 = FP8Linear.from_linear(nn.Linear(32, 16), QuantConfig(weight="channel", activation="static"), torch.tensor(0.5))
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.shape == (16, 32) and fp8.weight.is_contiguous()
    assert fp8.weight_scale.shape == (16, 1) and fp8.weight_scale.dtype == torch.float32
    assert fp8.input_scale.shape == () and fp8.input_scale.item() == 0.5
    assert "activation=static-tensor" in repr(fp8)


@pytest.mark.parametrize("convert", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.to("cpu", torch.float16), lambda m: m.float()])
def test_dtype_conversions_keep_fp8_weight_and_fp32_scales(convert):
    model = nn.Sequential(FP8Linear.from_linear(nn.Linear(32, 16), QuantConfig(activation="static"), torch.tensor(0.01234567)))
    weight_bits = model[0].weight.view(torch.uint8).clone()
    scale = model[0].weight_scale.clone()
    convert(model)
    layer = model[0]
    assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(layer.weight.view(torch.uint8), weight_bits)
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert layer.input_scale.dtype == torch.float32 and layer.input_scale.item() == pytest.approx(0.01234567, rel=1e-7)
    assert layer.bias.dtype != torch.float8_e4m3fn


def test_half_model_runs_in_half():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    fp8 = FP8Linear.from_linear(linear, QuantConfig()).half()
    x = torch.randn(4, 32)
    out = fp8(x.half())
    assert out.dtype == torch.float16 and fp8.bias.dtype == torch.float16
    torch.testing.assert_close(out.double(), emulate(linear, x.half().float(), QuantConfig(), None), rtol=2e-3, atol=2e-3)


def test_fallback_computes_the_same_function_with_one_warning(monkeypatch, caplog):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    fp8 = FP8Linear.from_linear(linear, QuantConfig(weight="channel", activation_granularity="token"))
    x = torch.randn(6, 64)
    expected = emulate(linear, x, QuantConfig(weight="channel", activation_granularity="token"), None).float()

    def rejecting(*args, **kwargs):
        raise RuntimeError("Invalid scaling configuration")

    monkeypatch.setattr(torch, "_scaled_mm", rejecting)
    scaling._warned.clear()
    with caplog.at_level(logging.WARNING, logger="fp8kit.core.scaling"):
        first, second = fp8(x), fp8(x)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, first)
    warnings = [r for r in caplog.records if "falls back" in r.getMessage()]
    assert len(warnings) == 1 and "Invalid scaling configuration" in warnings[0].getMessage()


def test_old_gpu_falls_back(monkeypatch):
    monkeypatch.setattr(scaling, "scaled_mm_unsupported_reason", lambda device: "compute capability 8.0")
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: pytest.fail("_scaled_mm must not run"))
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    x = torch.randn(2, 32)
    out = FP8Linear.from_linear(linear, QuantConfig())(x)
    torch.testing.assert_close(out.double(), emulate(linear, x, QuantConfig(), None), rtol=1e-5, atol=1e-5)


def test_use_fast_accum_is_passed(scaled_mm_calls):
    fp8 = FP8Linear.from_linear(nn.Linear(32, 16), QuantConfig(use_fast_accum=True))
    fp8(torch.randn(2, 32))
    assert scaled_mm_calls[0][-1]["use_fast_accum"] is True


def test_static_needs_input_scale():
    with pytest.raises(ValueError, match="static activations need an input_scale"):
        FP8Linear.from_linear(nn.Linear(32, 16), QuantConfig(activation="static"))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", SCHEMES)
def test_torch_compile_fullgraph_matches_eager(name, backend, monkeypatch):
    # Under torch.compile FP8Linear must trace without graph breaks (fullgraph=True raises on one)
    # and run the torch reference ops, even where the Triton kernels would run in eager.
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = SCHEMES[name]
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    input_scale = tensor_scale(x) * 1.25 if config.activation == "static" else None
    fp8 = FP8Linear.from_linear(linear, config, input_scale)
    expected = fp8(x)  # eager, the torch path on CPU
    expected_2d = fp8(x[0])

    def no_kernel(*args, **kwargs):
        raise AssertionError("a Triton kernel was called under torch.compile")

    monkeypatch.setattr(kernels, "unavailable_reason", lambda device: None)  # kernels "available"
    for kernel in ("quantize_per_token", "quantize_per_tensor", "quantize_static"):
        monkeypatch.setattr(kernels, kernel, no_kernel)
    compiled = torch.compile(fp8, fullgraph=True, backend=backend)
    out = compiled(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, 48)
    assert torch.equal(out, expected)
    assert torch.equal(compiled(x[0]), expected_2d)  # 2-D input: the no-reshape branch
    torch._dynamo.reset()


def test_forward_with_2d_input_skips_reshapes_and_matches_3d():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    fp8 = FP8Linear.from_linear(linear, QuantConfig(activation_granularity="token"))
    x = torch.randn(4, 32)
    assert torch.equal(fp8(x), fp8(x[None])[0])
