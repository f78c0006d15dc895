import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8kit.core import scaling
from fp8kit.core.scaling import FP8_MAX, dequantize, quantize, rowwise_scale, tensor_scale

# Round-to-nearest with 3 mantissa bits: relative error <= 2^-4 for normals; values below the
# smallest normal (2^-6 * scale) have an absolute error <= half a subnormal step (2^-10 * scale).
REL_BOUND = 2.0**-4
ABS_BOUND_STEPS = 2.0**-10


def roundtrip_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return REL_BOUND * x.abs() + ABS_BOUND_STEPS * scale


def test_fp8_constants():
    assert FP8_MAX == 448.0
    assert scaling.FP8_DTYPE == torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_tensor_roundtrip_within_fp8_bound(dtype):
    x = (torch.randn(64, 96, dtype=torch.float64) * 3).to(dtype)
    scale = tensor_scale(x)
    assert scale.dtype == torch.float32 and scale.shape == ()
    assert scale.item() == pytest.approx(x.double().abs().max().item() / 448, rel=1e-6)
    q = quantize(x, scale)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    err = (dequantize(q, scale, torch.float64) - x.double()).abs()
    assert (err <= roundtrip_bound(x.double(), scale.double())).all()


def test_rowwise_scales_and_roundtrip():
    x = torch.randn(16, 32, dtype=torch.float64) * torch.logspace(-3, 3, 16, dtype=torch.float64)[:, None]
    scale = rowwise_scale(x)
    assert scale.shape == (16, 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale.double(), x.abs().amax(1, keepdim=True) / 448, rtol=1e-6, atol=0)
    err = (dequantize(quantize(x, scale), scale, torch.float64) - x).abs()
    assert (err <= roundtrip_bound(x, scale.double())).all()
    # Each row's absmax maps exactly onto +-448.
    assert (quantize(x, scale).float().abs().amax(1) == 448).all()


def test_saturation_clamps_to_448():
    scale = torch.tensor(1.0)
    x = torch.tensor([1e6, -1e6, 448.0, 500.0, -460.0, float("inf"), float("-inf")])
    q = quantize(x, scale).float()
    assert q.tolist() == [448.0, -448.0, 448.0, 448.0, -448.0, 448.0, -448.0]


def test_nan_stays_nan():
    q = quantize(torch.tensor([float("nan"), 1.0]), torch.tensor(1.0))
    assert torch.isnan(q.float()[0]) and q.float()[1] == 1.0


def test_zero_tensor_gets_positive_scale_and_exact_zeros():
    x = torch.zeros(4, 8)
    for scale in (tensor_scale(x), rowwise_scale(x)):
        assert (scale > 0).all()
        assert (dequantize(quantize(x, scale), scale) == 0).all()


@pytest.mark.parametrize("shape", [(0, 8), (0,), (4, 0)])
def test_empty_tensors(shape):
    x = torch.empty(shape)
    s = tensor_scale(x)
    assert s.shape == () and s > 0
    assert quantize(x, s).shape == shape
    if len(shape) == 2:
        r = rowwise_scale(x)
        assert r.shape == (shape[0], 1)
        assert quantize(x, r).shape == shape


def test_fp8_matmul_matches_float64_reference():
    torch.manual_seed(0)
    x, w, b = torch.randn(8, 32), torch.randn(48, 32), torch.randn(48)
    for xs, ws in [(tensor_scale(x), tensor_scale(w)), (rowwise_scale(x), rowwise_scale(w)), (rowwise_scale(x), tensor_scale(w)), (tensor_scale(x), rowwise_scale(w))]:
        xq, wq = quantize(x, xs), quantize(w, ws)
        ref = dequantize(xq, xs, torch.float64) @ dequantize(wq, ws, torch.float64).T + b.double()
        out = scaling.fp8_matmul(xq, wq, xs, ws, bias=b, out_dtype=torch.float32)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_fp8_matmul_empty_rows():
    w = quantize(torch.randn(16, 16), torch.tensor(0.01))
    out = scaling.fp8_matmul(torch.empty(0, 16, dtype=torch.float8_e4m3fn), w, torch.tensor(1.0), torch.tensor(1.0), out_dtype=torch.bfloat16)
    assert out.shape == (0, 16) and out.dtype == torch.bfloat16


finite = st.floats(min_value=-(2.0**127), max_value=2.0**127, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64))
def test_property_per_tensor_roundtrip(values):
    x = torch.tensor(values, dtype=torch.float32)
    scale = tensor_scale(x)
    assert torch.isfinite(scale) and scale > 0
    q = quantize(x, scale)
    back = dequantize(q, scale, torch.float64)
    assert not torch.isnan(back).any()
    assert (q.float().abs() <= 448).all()
    assert ((back - x.double()).abs() <= roundtrip_bound(x.double(), scale.double()) * (1 + 1e-6)).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 16), st.floats(1e-6, 1e6), st.data())
def test_property_rowwise_shapes_and_saturation(rows, cols, magnitude, data):
    x = torch.tensor(data.draw(st.lists(finite, min_size=rows * cols, max_size=rows * cols))).reshape(rows, cols)
    x = x / (x.abs().max() + 1) * magnitude
    scale = rowwise_scale(x)
    assert scale.shape == (rows, 1) and (scale > 0).all()
    q = quantize(x, scale)
    assert q.shape == (rows, cols) and (q.float().abs() <= 448).all()
    # Values beyond the scale's range saturate instead of overflowing to NaN.
    assert (quantize(x * 1000, scale).float().abs() <= 448).all()
    assert not math.isnan(dequantize(q, scale).sum().item())


def test_scaled_mm_unsupported_reason_is_computed_once_per_device(monkeypatch):
    calls = []

    def capability(index):
        calls.append(index)
        return {0: (9, 0), 1: (8, 6)}[index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU{index}")
    monkeypatch.setattr(scaling, "_scaled_mm_reasons", {})
    for _ in range(3):
        assert scaling.scaled_mm_unsupported_reason(torch.device("cuda", 0)) is None
        assert scaling.scaled_mm_unsupported_reason(torch.device("cuda", 1)) == (
            "GPU1 has compute capability 8.6; FP8 GEMMs need 8.9 or newer"
        )
        assert scaling.scaled_mm_unsupported_reason(torch.device("cpu")) is None
        assert scaling.scaled_mm_unsupported_reason(torch.device("meta")) == (
            "torch._scaled_mm is not available on device type 'meta'"
        )
    assert calls == [0, 1]


@pytest.mark.parametrize("x_rows, w_rows", [(True, False), (False, True), (True, True)])
def test_fp8_matmul_mixed_scales_match_expanded_scales(x_rows, w_rows):
    # A per-tensor scale is expanded when the other operand's is row-wise; passing them expanded
    # must give the same bits (non-contiguous row-wise scales included).
    torch.manual_seed(0)
    x, w = torch.randn(5, 32), torch.randn(12, 32)
    xs = rowwise_scale(x) if x_rows else tensor_scale(x)
    ws = rowwise_scale(w) if w_rows else tensor_scale(w)
    xq, wq = quantize(x, xs), quantize(w, ws)
    out = scaling.fp8_matmul(xq, wq, xs, ws, out_dtype=torch.float32)
    xs_full = xs.expand(5, 1).clone()
    ws_full = torch.cat([ws.expand(12, 1), torch.zeros(12, 1)], dim=1)[:, :1]  # [N,1] with stride (2, 1)
    ws_full.copy_(ws.expand(12, 1))
    assert not ws_full.is_contiguous()
    assert torch.equal(scaling.fp8_matmul(xq, wq, xs_full, ws_full, out_dtype=torch.float32), out)


# ----------------------------------------------------------------------------- block-wise scales


def block_reference(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float64 amax / 448 per block by explicit loops over the blocks (partial edge blocks cut)."""
    br, bc = block
    rows, cols = x.shape
    out = torch.empty(math.ceil(rows / br), math.ceil(cols / bc), dtype=torch.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            tile = x[i * br : (i + 1) * br, j * bc : (j + 1) * bc].double()
            out[i, j] = max(tile.abs().max().item(), scaling.AMAX_FLOOR) / 448
    return out


def blocky_input(shape, seed=0, dtype=torch.float32):
    """Random values whose magnitude changes by block row / column (so the scales differ), one all-zero block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x *= torch.exp2(torch.arange(shape[0], dtype=torch.float64) // 64 - 2)[:, None]
    x *= torch.exp2(-(torch.arange(shape[1], dtype=torch.float64) // 96))[None, :]
    x[:128, 128:256] = 0.0  # block (0, 1) of a 128 x 128 grid: all zero
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "block"),
    [((300, 200), (128, 128)), ((256, 576), (128, 128)), ((576, 576), (128, 128)), ((5, 576), (1, 128)), ((48, 80), (16, 32))],
)
def test_block_scale_matches_float64_reference(shape, block, dtype):
    x = blocky_input(shape, dtype=dtype)
    scale = scaling.block_scale(x, block)
    assert scale.dtype == torch.float32 and scale.is_contiguous()
    assert scale.shape == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    # fp32 amax / 448 correctly rounded equals the float64 quotient rounded to fp32.
    assert torch.equal(scale, block_reference(x, block).float())


def test_block_quantize_equals_per_block_per_tensor_quantize():
    # Independent path: every block quantized on its own with its scalar scale, bit for bit.
    x = blocky_input((300, 200))
    block = (128, 128)
    scale = scaling.block_scale(x, block)
    q = quantize(x, scale, block=block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            expected = quantize(x[rows, cols], scale[i, j])
            assert torch.equal(q[rows, cols].view(torch.uint8), expected.view(torch.uint8)), (i, j)


@pytest.mark.parametrize(("shape", "block"), [((300, 200), (128, 128)), ((7, 576), (1, 128))])
def test_block_roundtrip_within_fp8_bound(shape, block):
    x = blocky_input(shape, seed=3, dtype=torch.float64)
    scale = scaling.block_scale(x, block)
    q = quantize(x, scale, block=block)
    back = dequantize(q, scale, torch.float64, block=block)
    per_element = scaling.expand_block_scale(scale, shape, block).double()
    assert ((back - x).abs() <= roundtrip_bound(x, per_element)).all()
    # Every block that is not all zero maps its absmax onto +-448, partial edge blocks included.
    amax_q = scaling.block_scale(q.float(), block) * 448
    nonzero = block_reference(x, block) > scaling.AMAX_FLOOR / 448
    assert (amax_q[nonzero] == 448).all()


def test_all_zero_block_gets_floor_scale_and_exact_zeros():
    x = blocky_input((256, 256))
    scale = scaling.block_scale(x, (128, 128))
    assert scale[0, 1].item() == pytest.approx(scaling.AMAX_FLOOR / 448) and (scale > 0).all()
    q = quantize(x, scale, block=(128, 128))
    assert (q[:128, 128:].float() == 0).all()
    assert (dequantize(q, scale, block=(128, 128))[:128, 128:] == 0).all()


def test_nan_spoils_only_its_block():
    x = blocky_input((256, 384))
    x[200, 300] = float("nan")  # block (1, 2)
    scale = scaling.block_scale(x, (128, 128))
    assert scale.isnan().nonzero().tolist() == [[1, 2]]
    q = quantize(x, scale, block=(128, 128)).float()
    assert q[128:, 256:].isnan().all() and not q[:128].isnan().any() and not q[:, :256].isnan().any()


@pytest.mark.parametrize(("shape", "expected"), [((0, 200), (0, 2)), ((4, 0), (1, 0)), ((0, 0), (0, 0))])
def test_block_scale_of_empty_tensors(shape, expected):
    x = torch.empty(shape)
    scale = scaling.block_scale(x, (128, 128))
    assert scale.shape == expected
    assert quantize(x, scale, block=(128, 128)).shape == shape


def test_block_scale_bad_arguments():
    with pytest.raises(ValueError, match=r"block_scale: expected a 2-D tensor, got shape \(2, 3, 4\)"):
        scaling.block_scale(torch.zeros(2, 3, 4), (128, 128))
    with pytest.raises(ValueError, match=r"block_scale: block must be two positive ints \(rows, cols\), got \(0, 128\)"):
        scaling.block_scale(torch.zeros(2, 3), (0, 128))
    with pytest.raises(
        ValueError, match=r"a 300 x 200 tensor in 128 x 128 blocks needs scales of shape \(3, 2\), got \(2, 2\)"
    ):
        quantize(torch.zeros(300, 200), torch.ones(2, 2), block=(128, 128))


def test_quantize_weight_block_and_activation_group():
    w = blocky_input((300, 200), seed=5, dtype=torch.bfloat16)
    q, s = scaling.quantize_weight(w, "block", (128, 128))
    exact = scaling.block_scale(w, (128, 128))
    assert s.shape == (3, 2) and s.is_contiguous() and torch.equal(s, scaling.round_up_to_dtype(exact, torch.bfloat16))
    assert torch.equal(s.bfloat16().float(), s) and (s >= exact).all()  # exact in bf16, never below amax / 448
    assert torch.equal(q.view(torch.uint8), quantize(w, s, block=(128, 128)).view(torch.uint8))
    x = blocky_input((9, 200), seed=6, dtype=torch.bfloat16)
    xq, xs = scaling.quantize_activation(x, "group", group_size=128)
    assert xs.shape == (9, 2) and xs.stride() == (1, 9)  # column-major: torch's block-wise GEMM layout
    assert torch.equal(xs, scaling.block_scale(x, (1, 128)))
    assert torch.equal(xq.view(torch.uint8), quantize(x, xs, block=(1, 128)).view(torch.uint8))


@pytest.mark.parametrize(
    "capability, cuda, expected",
    [
        ((9, 0), "13.0", None),
        ((9, 0), "12.4", "built with CUDA 12.4; block-wise FP8 GEMMs need 12.9 or newer"),
        ((8, 9), "13.0", "has compute capability 8.9; torch's block-wise scaled GEMM runs on 9.0 (Hopper) only"),
    ],
)
def test_block_gemm_probe_answers_none_or_a_reason(monkeypatch, capability, cuda, expected):
    """The probe's answer is None (supported) or a str, for a faked device: never a sentinel."""
    monkeypatch.setattr(scaling, "_block_gemm_reasons", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
    monkeypatch.setattr(torch.version, "cuda", cuda)
    reason = scaling.block_gemm_unsupported_reason(torch.device("cuda", 0))
    if expected is None:
        assert reason is None
    else:
        assert isinstance(reason, str) and expected in reason


def test_grouped_probe_answers_none_on_a_faked_hopper(monkeypatch):
    monkeypatch.setattr(scaling, "_grouped_reasons", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert scaling.grouped_mm_unsupported_reason(torch.device("cuda", 0)) is None


@pytest.mark.parametrize("m", [1, 3, 8, 33])
def test_block_gemm_pads_m_to_the_alignment_cublas_needs(monkeypatch, m):
    """On the H200, cuBLASLt refused 1 x 128 scales with M = 1 or 33 (leading dimension not 16-byte aligned):
    fp8_block_matmul pads M to a multiple of 4, always asks for exact accumulation, and returns M rows equal to
    the dequantized reference. Checked here against an emulation of torch's block-wise GEMM that enforces that."""
    import torch.nn.functional as F

    calls = []

    def emulated_scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b, *, output_dtype, use_fast_accum):
        rows, k = a.shape
        groups = -(-k // 128)
        assert rows % 4 == 0 and scale_a.shape == (rows, groups) and scale_a.stride() == (1, rows)
        assert not use_fast_accum and recipe_a == F.ScalingType.BlockWise1x128
        weight_scale = scale_b.t()[:, :groups]  # (N / 128, L)
        x = scaling.dequantize(a, scale_a, block=(1, 128))
        w = scaling.dequantize(b.t(), weight_scale, block=(128, 128))
        calls.append(rows)
        return F.linear(x, w).to(output_dtype)

    monkeypatch.setattr(F, "scaled_mm", emulated_scaled_mm)
    monkeypatch.setattr(scaling, "block_gemm_unsupported_reason", lambda device: None)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 384, generator=g)
    w = torch.randn(256, 384, generator=g)
    w_fp8, w_scale = scaling.quantize_weight(w, "block")
    x_fp8, x_scale = scaling.quantize_activation(x, "group", group_size=128)
    out = scaling.fp8_block_matmul(x_fp8, w_fp8, x_scale, w_scale, out_dtype=torch.float32, use_fast_accum=True)
    want = F.linear(scaling.dequantize(x_fp8, x_scale, block=(1, 128)), scaling.dequantize(w_fp8, w_scale, block=(128, 128)))
    assert calls == [m + (-m % 4)] and out.shape == (m, 256)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)  # fp32 GEMMs of 4 and of m rows sum in other orders


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_up_to_dtype_is_the_smallest_value_not_below(dtype):
    scale = torch.cat([torch.rand(5000, dtype=torch.float64).float() * 2.0 ** torch.randint(-20, 5, (5000,)).float(),
                       torch.tensor([1e-12 / 448, 0.25, float("inf"), float("nan")])])
    up = scaling.round_up_to_dtype(scale, dtype)
    assert up.dtype == torch.float32
    finite = scale.isfinite()
    assert torch.equal(up[finite].to(dtype).float(), up[finite])  # representable
    assert (up[finite] >= scale[finite]).all() and up[-2] == float("inf") and up[-1].isnan()
    below = torch.nextafter(up[finite].to(dtype), torch.zeros_like(up[finite].to(dtype))).float()
    assert (below < scale[finite]).all()  # the next value down is too small: the smallest one above
    assert up[-3] == 0.25 and up[-4] > 0  # exact values kept; the all-zero floor stays positive (fp16 subnormal)
    assert scaling.round_up_to_dtype(scale, torch.float32) is scale
