"""Property tests (hypothesis) of the FP8 math in `fp8kit.core.scaling`, over every finite input.

Inputs are drawn as raw bit patterns of bf16 / fp16 / fp32, so zeros, subnormals, the largest
finite values and everything between come up equally often; shapes include empty tensors and single
elements.

The round-trip bound, derived for ``q = fp8(clamp(fl32(x / s), ±448))``, ``x' = fl32(q * s)``:
E4M3 has 3 mantissa bits and its smallest normal is 2^-6, subnormal spacing 2^-9. For
``y = |x| / s`` in the binade ``[2^e, 2^(e+1))`` with ``e >= -6`` the spacing is 2^(e-3), so round to
nearest errs by at most half of it, 2^(e-4) (<= 2^-4 * y: the relative 2^-4 bound); below 2^-6 the
spacing is the subnormal 2^-9, so the error is at most 2^-10 (absolute, in units of s). Both cases
are ``s * 2^(max(e, -6) - 4)``. The two fp32 roundings (the division and the dequantizing multiply)
add at most 2^-24 * |x| each (plus 2^-24 of the result), so the test allows ``2^-22 * |x|`` on top.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fp8kit.core import scaling
from fp8kit.core.scaling import AMAX_FLOOR, FP8_MAX, dequantize, quantize, rowwise_scale, tensor_scale

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_BITS = {torch.bfloat16: (16, torch.int16), torch.float16: (16, torch.int16), torch.float32: (32, torch.int32)}


def finite_values(dtype: torch.dtype, min_size: int = 0, max_size: int = 48):
    """Lists of finite `dtype` values drawn as bit patterns (any sign, exponent and mantissa)."""
    bits, _ = _BITS[dtype]
    return st.lists(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1), min_size=min_size, max_size=max_size)


def as_tensor(patterns: list[int], dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    _, int_dtype = _BITS[dtype]
    x = torch.tensor(patterns, dtype=int_dtype).view(dtype)
    x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=dtype))  # Inf / NaN patterns -> 0
    return x.reshape(shape) if shape is not None else x


def expected_scale(amax64: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 max(amax, 1e-12) / 448 (float64 division then one rounding: exact here)."""
    floor = torch.tensor(AMAX_FLOOR, dtype=torch.float32).double()
    return (torch.maximum(amax64, floor) / FP8_MAX).float()


def roundtrip_bound(x64: torch.Tensor, scale64: torch.Tensor) -> torch.Tensor:
    """Largest |x - dq(q(x))| allowed (float64, shape of x): half an FP8 step at |x| / scale, plus fp32 slack."""
    y = x64.abs() / scale64
    exponent = torch.floor(torch.log2(torch.clamp(y, min=2.0**-6)))  # subnormals share the binade of 2^-6
    return scale64 * torch.exp2(exponent - 4) + 2.0**-22 * x64.abs()


def check_roundtrip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = quantize(x, scale)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    qf = q.float()
    assert not torch.isnan(qf).any() and (qf.abs() <= FP8_MAX).all()
    back = dequantize(q, scale, torch.float64)
    assert torch.isfinite(back).all()
    x64, s64 = x.double(), scale.double()
    err = (back - x64).abs()
    bound = roundtrip_bound(x64, s64)
    worst = (err - bound).argmax() if err.numel() else None
    assert (err <= bound).all(), f"x={x64.flatten()[worst]!r} scale={s64.flatten()[0]!r} err={err.flatten()[worst]!r}"
    return q


@SETTINGS
@given(st.sampled_from(list(DTYPES)), st.data())
def test_per_tensor_scale_and_roundtrip(dtype_name, data):
    dtype = DTYPES[dtype_name]
    x = as_tensor(data.draw(finite_values(dtype)), dtype)
    scale = tensor_scale(x)
    assert scale.shape == () and scale.dtype == torch.float32
    assert torch.isfinite(scale) and scale > 0
    amax = x.double().abs().max() if x.numel() else torch.zeros((), dtype=torch.float64)
    assert torch.equal(scale, expected_scale(amax))
    q = check_roundtrip(x, scale)
    if x.numel() and amax >= AMAX_FLOOR:  # the absmax maps exactly onto +-448
        assert q.float().abs().max() == FP8_MAX


@SETTINGS
@given(st.sampled_from(list(DTYPES)), st.integers(0, 6), st.integers(0, 9), st.data())
def test_rowwise_scale_shapes_and_roundtrip(dtype_name, rows, cols, data):
    """Per-channel weight scales ([N,K] -> [N,1]) and per-token activation scales ([M,K] -> [M,1])."""
    dtype = DTYPES[dtype_name]
    x = as_tensor(data.draw(finite_values(dtype, rows * cols, rows * cols)), dtype, (rows, cols))
    scale = rowwise_scale(x)
    assert scale.shape == (rows, 1) and scale.dtype == torch.float32
    assert torch.isfinite(scale).all() and (scale > 0).all()
    amax = x.double().abs().amax(dim=1, keepdim=True) if cols else torch.zeros(rows, 1, dtype=torch.float64)
    assert torch.equal(scale, expected_scale(amax))
    check_roundtrip(x, scale)


@SETTINGS
@given(st.sampled_from(list(DTYPES)), st.integers(1, 3), st.integers(1, 5), st.integers(1, 8), st.data())
def test_rowwise_scale_of_3d_activations(dtype_name, batch, tokens, hidden, data):
    dtype = DTYPES[dtype_name]
    x = as_tensor(data.draw(finite_values(dtype, batch * tokens * hidden, batch * tokens * hidden)), dtype, (batch, tokens, hidden))
    scale = rowwise_scale(x)
    assert scale.shape == (batch, tokens, 1)
    torch.testing.assert_close(scale, rowwise_scale(x.reshape(-1, hidden)).reshape(batch, tokens, 1), rtol=0, atol=0)
    check_roundtrip(x, scale)


@SETTINGS
@given(st.sampled_from(list(DTYPES)), st.data())
def test_single_elements_and_zero_dim(dtype_name, data):
    dtype = DTYPES[dtype_name]
    value = as_tensor(data.draw(finite_values(dtype, 1, 1)), dtype)
    for x in (value, value.reshape(()), value.reshape(1, 1)):
        scale = tensor_scale(x)
        assert scale > 0 and torch.isfinite(scale)
        q = check_roundtrip(x, scale)
        if value.abs().item() >= AMAX_FLOOR:
            assert q.float().abs().item() == FP8_MAX  # a lone value is its own absmax
    assert rowwise_scale(value.reshape(1, 1)).shape == (1, 1)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (0, 0), (2, 0, 3)])
def test_empty_tensors(dtype, shape):
    x = torch.empty(shape, dtype=dtype)
    scale = tensor_scale(x)
    assert scale.shape == () and scale == AMAX_FLOOR / FP8_MAX
    assert quantize(x, scale).shape == shape and dequantize(quantize(x, scale), scale).shape == shape
    if len(shape) >= 2:
        rows = rowwise_scale(x)
        assert rows.shape == (*shape[:-1], 1) and (rows > 0).all()
        assert quantize(x, rows).shape == shape


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_all_zeros_give_exact_zeros(dtype):
    x = torch.zeros(3, 16, dtype=dtype)
    for scale in (tensor_scale(x), rowwise_scale(x)):
        assert (scale > 0).all()
        q = quantize(x, scale)
        assert (q.view(torch.uint8) == 0).all()  # +0, bit for bit
        assert (dequantize(q, scale) == 0).all()


@SETTINGS
@given(
    st.floats(min_value=2.0**-40, max_value=2.0**40, allow_nan=False, allow_infinity=False, width=32),
    st.lists(st.floats(min_value=1.0, max_value=2.0**100, allow_nan=False, width=32), min_size=1, max_size=16),
    st.lists(st.booleans(), min_size=16, max_size=16),
)
def test_static_scale_saturates_exactly(scale_value, factors, negative):
    """Beyond amax (448 * scale) a static scale clamps to exactly +-448, i.e. +-448 * scale after dequantizing."""
    scale = torch.tensor(scale_value, dtype=torch.float32)
    signs = torch.tensor([-1.0 if n else 1.0 for n in negative[: len(factors)]])
    x = (torch.tensor(factors) * FP8_MAX * scale * 1.0001 * signs).float()
    assume(torch.isfinite(x).all())
    q = quantize(x, scale).float()
    assert torch.equal(q, signs * FP8_MAX)
    assert torch.equal(dequantize(quantize(x, scale), scale), (signs * FP8_MAX * scale).float())
    # Infinite activations saturate too (a static scale meets values it never saw in calibration).
    assert quantize(torch.tensor([float("inf"), float("-inf")]), scale).float().tolist() == [FP8_MAX, -FP8_MAX]


@SETTINGS
@given(
    st.lists(st.integers(0, 255), min_size=1, max_size=64),
    st.floats(min_value=2.0**-40, max_value=2.0**40, allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(["tensor", "row"]),
)
def test_quantize_is_idempotent_on_the_fp8_grid(codes, scale_value, kind):
    """Values already on the grid (q * scale) quantize back to the same FP8 bits."""
    q = torch.tensor(codes, dtype=torch.uint8).view(torch.float8_e4m3fn)
    q = torch.where(torch.isnan(q.float()), torch.zeros(()), q.float()).to(torch.float8_e4m3fn)  # drop the NaN codes
    if kind == "row":
        q = q.reshape(1, -1).expand(3, -1).contiguous()
        scale = torch.tensor([[scale_value], [scale_value * 3], [scale_value / 5]], dtype=torch.float32)
    else:
        scale = torch.tensor(scale_value, dtype=torch.float32)
    grid = dequantize(q, scale)  # fp32 values on the grid
    again = quantize(grid, scale)
    assert torch.equal(again.view(torch.uint8), q.view(torch.uint8))
    # and once more through the dequantized values: a fixed point
    assert torch.equal(dequantize(again, scale), grid)


_quantize_activation = getattr(scaling, "quantize_activation", None)


@pytest.mark.skipif(_quantize_activation is None, reason="scaling.quantize_activation not available")
@SETTINGS
@given(st.sampled_from(list(DTYPES)), st.integers(0, 5), st.integers(1, 8), st.sampled_from(["tensor", "token", "static"]), st.data())
def test_quantize_activation_matches_the_reference_path(dtype_name, rows, cols, mode, data):
    dtype = DTYPES[dtype_name]
    x = as_tensor(data.draw(finite_values(dtype, rows * cols, rows * cols)), dtype, (rows, cols))
    if mode == "static":
        given_scale = tensor_scale(x) * data.draw(st.sampled_from([0.25, 1.0, 3.0]))
        q, scale = _quantize_activation(x, scale=given_scale)
        assert scale is given_scale or torch.equal(scale, given_scale)
    else:
        q, scale = _quantize_activation(x, granularity=mode)
        want = rowwise_scale(x) if mode == "token" else tensor_scale(x)
        assert scale.shape == want.shape == ((rows, 1) if mode == "token" else ())
        assert torch.equal(scale, want)
        check_roundtrip(x, scale)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(q.view(torch.uint8), quantize(x, scale).view(torch.uint8))


def test_bound_is_tight():
    """The derived bound is reached: half a step at the top binade and half a subnormal step."""
    scale = torch.tensor(1.0)
    # 416 and 448 are neighbours (step 32): 432 is a tie, rounds to even 416 -> error 16 = 2^(8-4).
    x = torch.tensor([432.0, 2.0**-10, 3 * 2.0**-10])
    err = (dequantize(quantize(x, scale), scale, torch.float64) - x.double()).abs()
    bound = roundtrip_bound(x.double(), scale.double())
    assert err[0] == 16.0 and err[0] <= bound[0] < 16.0 * (1 + 2.0**-10) + 1e-3
    assert err[1] == 2.0**-10 and err[2] == 2.0**-10  # ties to even among subnormals
    assert math.isclose(bound[1].item(), 2.0**-10, rel_tol=1e-6)
