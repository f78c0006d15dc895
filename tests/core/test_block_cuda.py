"""Block-wise FP8 on a CUDA GPU: the 1 x 128 group kernel and torch's block-wise scaled GEMM, run for real.

Kernel tests need the Triton kernels (compute capability >= 8.9); GEMM tests need torch's block-wise
GEMM (compute capability 9.0, CUDA >= 12.9: `scaling.block_gemm_unsupported_reason`). Skipped on CPU
machines (CI); run on an H200 with `pytest tests/core/test_block_cuda.py`. Inputs are fresh random
draws (the seed is in the failure message); kernel outputs are poisoned with NaN bytes first.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fp8kit.core import FP8Linear, kernels, quantize, scaling
from fp8kit.core.graphs import CUDAGraphRunner

from fp8_reference import BLOCK, emulate
from tiny_models import make_tiny_llama


def _kernel_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (compute capability >= 8.9) and triton"
    return kernels.unavailable_reason(torch.device("cuda"))


def _gemm_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU of compute capability 9.0"
    return scaling.block_gemm_unsupported_reason(torch.device("cuda", torch.cuda.current_device()))


KERNEL_REASON, GEMM_REASON = _kernel_reason(), _gemm_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(KERNEL_REASON is not None, reason=f"Triton FP8 kernels unavailable: {KERNEL_REASON}")]
needs_block_gemm = pytest.mark.skipif(GEMM_REASON is not None, reason=f"no block-wise GEMM: {GEMM_REASON}")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# M = 1, K with a partial last group (576 = 4.5 groups, 100 < one group), long rows, empty.
SHAPES = [(1, 4096), (7, 576), (33, 1536), (16, 14336), (257, 14336), (3, 100), (1000, 4096), (0, 4096), (8192, 8192)]
NAN_BYTE = 0x7F  # float8_e4m3fn NaN


def fresh_input(shape, dtype):
    """Random values on the GPU whose magnitude changes by row and by 128-column group, exact zeros; (x, seed)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator(device="cuda").manual_seed(seed)
    m, k = shape
    x = torch.randn(shape, generator=g, device="cuda")
    x = x * torch.exp2(torch.randint(-8, 8, (m, 1), generator=g, device="cuda").float())
    x = x * torch.exp2(torch.randint(-4, 4, (1, -(-k // 128)), generator=g, device="cuda").float()).repeat_interleave(128, 1)[:, :k]
    x[..., ::5] = 0.0
    return x.to(dtype), seed


def poisoned(shape):
    return torch.full(shape, NAN_BYTE, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)


def group_reference(x, group_size=128):
    block = (1, group_size)
    scale = scaling.block_scale(x, block)
    return scaling.quantize(x, scale, block=block), scale


@pytest.mark.parametrize("group_size", [128, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_group_kernel_bit_exact_against_torch(shape, dtype, group_size):
    x, seed = fresh_input(shape, dtype)
    out = poisoned(shape)
    q, scale = kernels.quantize_per_group(x, group_size, out=out)
    torch.cuda.synchronize()
    assert q is out
    ref_q, ref_scale = group_reference(x, group_size)
    assert scale.shape == ref_scale.shape and scale.dtype == torch.float32
    if shape[0] > 1:
        assert scale.stride() == (1, shape[0])  # column-major: torch's block-wise GEMM layout
    assert not q.float().isnan().any(), f"unwritten (NaN-poisoned) elements remain, seed {seed}"
    assert torch.equal(scale, ref_scale), f"scales differ, seed {seed}"
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), f"fp8 bytes differ, seed {seed}"


def test_group_kernel_within_the_fp8_bound_of_float64():
    x, seed = fresh_input((257, 14336), torch.bfloat16)
    q, scale = kernels.quantize_per_group(x)
    x64 = x.double()
    scale64 = torch.stack([c.abs().amax(1) for c in x64.split(128, dim=1)], dim=1).clamp(min=1e-12) / 448
    torch.testing.assert_close(scale.double(), scale64, rtol=2**-23, atol=0)
    per_element = scaling.expand_block_scale(scale64, tuple(x.shape), (1, 128))
    err = (scaling.dequantize(q, scale, torch.float64, block=(1, 128)) - x64).abs()
    bound = 2**-4 * x64.abs() + 2**-10 * per_element + 1e-6 * x64.abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}, seed {seed}"


def test_group_kernel_nan_and_inf_like_torch():
    x, seed = fresh_input((6, 576), torch.bfloat16)
    x[1, 17] = float("nan")  # group (1, 0)
    x[2, 520] = float("inf")  # group (2, 4): the partial one
    q, scale = kernels.quantize_per_group(x)
    ref_q, ref_scale = group_reference(x)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0, equal_nan=True)
    assert scale.isnan().nonzero().tolist() == [[1, 0]] and scale[2, 4].isinf()
    q32, ref32 = q.float(), ref_q.float()
    assert torch.equal(q32.isnan(), ref32.isnan()), f"NaN positions differ, seed {seed}"
    assert q32[1, :128].isnan().all() and not q32[1, 128:].isnan().any()  # a NaN spoils its group only
    finite = ~ref32.isnan()
    assert torch.equal(q.view(torch.uint8)[finite], ref_q.view(torch.uint8)[finite])


def test_group_kernel_is_cuda_graph_capturable():
    shape = (8, 4096)
    runner = CUDAGraphRunner(kernels.quantize_per_group, fresh_input(shape, torch.bfloat16)[0])
    for _ in range(3):
        x, seed = fresh_input(shape, torch.bfloat16)
        q, scale = runner(x)
        ref_q, ref_scale = group_reference(x)
        assert torch.equal(scale, ref_scale) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), seed


# --- torch's block-wise GEMM through FP8Linear


@pytest.fixture
def block_gemm_calls(caplog, monkeypatch):
    """Counts the block-wise GEMM calls (F.scaled_mm where torch has it, else torch._scaled_mm); fails on a fallback."""
    calls = []
    module, name = (torch.nn.functional, "scaled_mm") if hasattr(torch.nn.functional, "scaled_mm") else (torch, "_scaled_mm")
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    scaling._warned.clear()
    with caplog.at_level(logging.WARNING, logger="fp8kit.core.scaling"):
        yield calls
    assert not [r for r in caplog.records if "falls back" in r.getMessage()], caplog.text


def check_block_linear(k, n, bias, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias).to(dtype)
    x, seed = fresh_input((4 * 33, k), dtype)
    x = x.reshape(4, 33, k).cpu()
    expected = emulate(linear.float(), x.float(), BLOCK, None)
    fp8 = FP8Linear.from_linear(linear, BLOCK).cuda()
    out = fp8(x.cuda())
    assert out.dtype == dtype and out.shape == (4, 33, n)
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-3}[dtype]
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item(), msg=f"seed {seed}")


@needs_block_gemm
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    ("k", "n"),
    [(256, 128), (576, 1536), (1536, 576), (640, 1040), (4096, 14336)],  # ceil(K/128) = 2, 5 (padded), 12, 5; N partial
    ids=str,
)
def test_block_fp8linear_on_cuda_matches_emulation(k, n, bias, block_gemm_calls):
    check_block_linear(k, n, bias, torch.bfloat16)
    assert block_gemm_calls, "the block-wise GEMM did not run"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_block_fp8linear_other_output_dtypes(dtype):
    # Through the block-wise GEMM where cuBLASLt takes the output dtype, else the logged fallback: same function.
    check_block_linear(576, 1536, True, dtype)


@needs_block_gemm
@pytest.mark.parametrize("m", [1, 8, 16, 8192])
def test_block_gemm_llama_shapes_against_float64(m, block_gemm_calls):
    n, k = 4096, 14336
    linear = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(linear, BLOCK)
    x, seed = fresh_input((m, k), torch.bfloat16)
    out = fp8(x).double()
    xq, xs = scaling.quantize_activation(x, "group")
    ref = scaling.dequantize(xq, xs, torch.float64, block=(1, 128)) @ scaling.dequantize(
        fp8.weight, fp8.weight_scale, torch.float64, block=(128, 128)
    ).T
    assert ((out - ref).norm() / ref.norm()).item() < 5e-3, f"seed {seed}"
    assert len(block_gemm_calls) == 1


@needs_block_gemm
def test_block_fp8linear_under_torch_compile_matches_eager():
    torch._dynamo.reset()
    linear = nn.Linear(1536, 576).to(device="cuda", dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(linear, BLOCK)
    x, seed = fresh_input((33, 1536), torch.bfloat16)
    expected = fp8(x)
    out = torch.compile(fp8, fullgraph=True)(x)
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item(), msg=f"seed {seed}")
    torch._dynamo.reset()


@needs_block_gemm
@pytest.mark.parametrize("k", [4096, 576])  # ceil(K/128) % 4 == 0 (free view) and != 0 (padded scales in the graph)
def test_block_fp8linear_is_cuda_graph_capturable(k, block_gemm_calls):
    fp8 = FP8Linear.from_linear(nn.Linear(k, 1536, device="cuda", dtype=torch.bfloat16), BLOCK)
    runner = CUDAGraphRunner(fp8, fresh_input((8, k), torch.bfloat16)[0])
    for _ in range(3):
        x, seed = fresh_input((8, k), torch.bfloat16)
        assert torch.equal(runner(x), fp8(x)), f"seed {seed}"


def test_block_quantize_on_cpu_then_move_to_cuda_and_half():
    torch.manual_seed(0)
    fp8 = FP8Linear.from_linear(nn.Linear(576, 1536), BLOCK)
    bits, scale = fp8.weight.view(torch.uint8).clone(), fp8.weight_scale.clone()
    fp8 = fp8.to("cuda").half()
    assert fp8.weight.is_cuda and fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.dtype == torch.float32
    assert torch.equal(fp8.weight.view(torch.uint8).cpu(), bits) and torch.equal(fp8.weight_scale.cpu(), scale)
    out = fp8(torch.randn(3, 576, dtype=torch.float16, device="cuda"))
    assert out.dtype == torch.float16 and out.isfinite().all()


def test_tiny_llama_block_on_cuda_in_bf16():
    torch.manual_seed(1)
    model = make_tiny_llama().to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.double()
        quantize(model, BLOCK, None)
        out = model(ids).logits.double()
    assert ((out - ref).norm() / ref.norm()).item() < 0.08
    assert all(model.get_submodule(n).weight_scale.is_cuda for n in model.fp8kit_report.quantized)
