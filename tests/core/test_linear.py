import logging

import pytest
import torch
from torch import nn

from fp8kit.core import FP8Linear, QuantConfig, kernels, scaling
from fp8kit.core.scaling import tensor_scale

from fp8_reference import BLOCK, SCHEMES, emulate

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


# ----------------------------------------------------------------------------- block-wise weights


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("k", "n"), [(200, 160), (576, 192), (128, 16)])
def test_block_fp8linear_matches_emulation(k, n, bias, caplog):
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight[:, :64] *= 50  # an outlier region: only its own blocks get a large scale
    x = torch.randn(3, 5, k)
    fp8 = FP8Linear.from_linear(linear, BLOCK)
    assert fp8.weight_scale.shape == (-(-n // 128), -(-k // 128)) and fp8.weight_scale.dtype == torch.float32
    scaling._warned.clear()
    with caplog.at_level(logging.WARNING, logger="fp8kit.core.scaling"):
        out, again = fp8(x), fp8(x)
    assert out.shape == (3, 5, n) and out.dtype == torch.float32 and torch.equal(out, again)
    torch.testing.assert_close(out.double(), emulate(linear, x, BLOCK, None), rtol=1e-5, atol=1e-5)
    exact = linear(x).double()
    assert 10 * torch.log10(exact.pow(2).sum() / (out.double() - exact).pow(2).sum()) > 25
    # CPU: torch has no block-wise scaled GEMM there; dequantize + F.linear, said once.
    warnings = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert warnings == [
        "FP8 GEMM falls back to dequantize + F.linear: torch's block-wise scaled GEMM needs a CUDA GPU of "
        "compute capability 9.0, not device type 'cpu'"
    ]


def test_an_outlier_spoils_only_its_own_block():
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=False)
    with torch.no_grad():
        linear.weight[:128, :128] *= 1e5  # one outlier block: others fall to FP8 subnormals under its scale
    w = linear.weight.detach().double()
    rest = torch.ones_like(w, dtype=torch.bool)
    rest[:128, :128] = False

    def relative_error_outside(config):
        fp8 = FP8Linear.from_linear(linear, config)
        block = config.block_size if config.weight == "block" else None
        back = scaling.dequantize(fp8.weight, fp8.weight_scale, torch.float64, block=block)
        return ((back - w)[rest].norm() / w[rest].norm()).item()

    block, channel = relative_error_outside(BLOCK), relative_error_outside(QuantConfig(weight="channel"))
    assert block < 2.0**-4  # every other block keeps the plain FP8 rounding error
    assert channel > 4 * block  # rows 0-127 share the outlier's scale per channel
    assert relative_error_outside(QuantConfig()) > channel


def test_block_buffers_repr_and_dtype_conversions():
    fp8 = FP8Linear.from_linear(nn.Linear(300, 160), QuantConfig(weight="block", activation_granularity="group"))
    assert fp8.weight.shape == (160, 300) and fp8.weight_scale.shape == (2, 3) and fp8.input_scale is None
    assert "weight=block128x128, activation=dynamic-group1x128" in repr(fp8)
    bits, scale = fp8.weight.view(torch.uint8).clone(), fp8.weight_scale.clone()
    fp8.half()
    assert fp8.weight.dtype == torch.float8_e4m3fn and torch.equal(fp8.weight.view(torch.uint8), bits)
    assert fp8.weight_scale.dtype == torch.float32 and torch.equal(fp8.weight_scale, scale)
    assert fp8.bias.dtype == torch.float16 and fp8(torch.randn(2, 300, dtype=torch.float16)).dtype == torch.float16


def emulate_block_gemm(a, b, scale_a, scale_b, k_groups, v2):
    """What torch's 1x128 x 128x128 GEMM computes from the scales *as laid out*: checks strides too."""
    m, n = a.shape[0], b.shape[1]
    assert a.is_contiguous() and b.stride() == (1, b.shape[0])  # row-major A, column-major B
    assert scale_a.shape == (m, k_groups) and (scale_a.stride(0) == 1) and (k_groups == 1 or scale_a.stride(1) == m)
    l4 = -(-k_groups // 4) * 4 if v2 else k_groups
    assert scale_b.shape == (l4, -(-n // 128)) and scale_b.stride() == (1, l4)
    if v2:
        assert (scale_b[k_groups:] == 0).all()  # the padding
    ws = scale_b[:k_groups].t()  # (N / 128, L)
    x = scaling.dequantize(a, scale_a, block=(1, 128))
    w = scaling.dequantize(b.t(), ws, block=(128, 128))
    return (x @ w.T).to(torch.bfloat16)


@pytest.mark.parametrize("k", [512, 576, 1024 + 128])  # ceil(K/128) = 4 (no padding), 5, 9
@pytest.mark.parametrize("api", ["v2", "v1"])
def test_block_gemm_layouts_given_to_torch(monkeypatch, k, api):
    # The CPU build has no block-wise GEMM: pretend the device has one and check what it is given.
    torch.manual_seed(0)
    linear = nn.Linear(k, 272, bias=True).to(torch.bfloat16)
    fp8 = FP8Linear.from_linear(linear, BLOCK)
    x = torch.randn(7, k, dtype=torch.bfloat16)
    calls = []
    groups = -(-k // 128)
    monkeypatch.setattr(scaling, "block_gemm_unsupported_reason", lambda device: None)
    if api == "v2":
        recipe = torch.nn.functional.ScalingType

        def v2(a, b, scale_a, recipe_a, scale_b, recipe_b, *, output_dtype, use_fast_accum):
            assert (recipe_a, recipe_b) == (recipe.BlockWise1x128, recipe.BlockWise128x128)
            calls.append(output_dtype)
            return emulate_block_gemm(a, b, scale_a, scale_b, groups, v2=True)

        monkeypatch.setattr(torch.nn.functional, "scaled_mm", v2)
    else:
        monkeypatch.delattr(torch.nn.functional, "scaled_mm")

        def v1(a, b, scale_a, scale_b, *, out_dtype, use_fast_accum):
            calls.append(out_dtype)
            return emulate_block_gemm(a, b, scale_a, scale_b, groups, v2=False)

        monkeypatch.setattr(torch, "_scaled_mm", v1)
    scaling._warned.clear()
    out = fp8(x)
    expected = emulate(linear, x, BLOCK, None)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    if api == "v1" and groups % 4:  # torch._scaled_mm without the padded layout: not trusted, falls back
        assert calls == [] and "is unverified" in next(iter(scaling._warned))
    else:
        assert calls == [torch.bfloat16]
