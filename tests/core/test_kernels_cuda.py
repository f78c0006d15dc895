"""fp8kit.core.kernels on a CUDA GPU: bit-exact against the torch path, bounded against float64.

Skipped where the kernels cannot run (no CUDA, compute capability < 8.9, no triton); run on an
H100 with `pytest tests/core/test_kernels_cuda.py`. Inputs are fresh random draws on every run
(the seed is in the failure message); outputs are poisoned with NaN bytes before each launch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fp8_reference import emulate
from fp8kit.core import FP8Linear, QuantConfig, kernels, scaling, skinny


def _reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (compute capability >= 8.9) and triton"
    return kernels.unavailable_reason(torch.device("cuda"))


REASON = _reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"Triton FP8 kernels unavailable: {REASON}")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# M = 1, M not a multiple of any block, K not a power of two / not a multiple of 16, K above the
# one-pass limit (looping path), sizes on both sides of the one-launch per-tensor limit (2^15) and
# of the flat kernels' block switch (2^22 elements).
SHAPES = [(1, 4096), (7, 576), (33, 1536), (16, 14336), (257, 14336), (5, 20000), (3, 100), (1000, 4096), (1100, 4096), (0, 4096)]
NAN_BYTE = 0x7F  # float8_e4m3fn NaN


def fresh_input(shape, dtype):
    """Random rows of very different magnitudes on the GPU, plus exact zeros; returns (x, seed)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda")
    x = x * torch.exp2(torch.randint(-10, 10, (shape[0], 1), generator=g, device="cuda").float())
    x[..., ::5] = 0.0
    return x.to(dtype), seed


def poisoned(shape):
    return torch.full(shape, NAN_BYTE, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)


def run_kernel(op, x, out):
    """(q, scale) from the kernel `op` with a preallocated, poisoned `out`."""
    if op == "token":
        return kernels.quantize_per_token(x, out=out)
    if op == "tensor":
        return kernels.quantize_per_tensor(x, out=out)
    scale = scaling.tensor_scale(x) * 0.75  # some values clamp at 448
    return kernels.quantize_static(x, scale, out=out), scale


def torch_reference(op, x, scale):
    """(q, scale) from the torch path (`scaling`), the static scale passed through."""
    ref_scale = {"token": scaling.rowwise_scale, "tensor": scaling.tensor_scale}[op](x) if op != "static" else scale
    return scaling.quantize(x, ref_scale), ref_scale


@pytest.mark.parametrize("op", ["token", "tensor", "static"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_exact_against_torch_and_every_element_written(shape, dtype, op):
    x, seed = fresh_input(shape, dtype)
    out = poisoned(shape)
    q, scale = run_kernel(op, x, out)
    torch.cuda.synchronize()
    assert q is out
    ref_q, ref_scale = torch_reference(op, x, scale)
    assert not q.float().isnan().any(), f"unwritten (NaN-poisoned) elements remain, seed {seed}"
    assert scale.dtype == torch.float32 and scale.shape == ref_scale.shape
    assert torch.equal(scale, ref_scale), f"scales differ, seed {seed}"
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), f"fp8 bytes differ, seed {seed}"


@pytest.mark.parametrize("op", ["token", "tensor"])
@pytest.mark.parametrize("shape", [(1, 4096), (33, 1536), (257, 14336), (5, 20000)], ids=str)
def test_within_the_fp8_bound_of_a_float64_reference(shape, op):
    x, seed = fresh_input(shape, torch.bfloat16)
    q, scale = run_kernel(op, x, poisoned(shape))
    x64 = x.double()
    amax64 = x64.abs().amax(dim=1, keepdim=True) if op == "token" else x64.abs().amax()
    scale64 = amax64.clamp(min=1e-12) / 448
    torch.testing.assert_close(scale.double(), scale64, rtol=2**-23, atol=0)  # one fp32 rounding
    # E4M3 round-to-nearest: half an ulp is 2^-4 relative for normals, 2^-10 absolute (in units of
    # the scale) for subnormals; amax maps to 448 exactly up to the scale's own rounding.
    err = (q.double() * scale.double() - x64).abs()
    bound = 2**-4 * x64.abs() + 2**-10 * scale64 + 1e-6 * x64.abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}, seed {seed}"


@pytest.mark.parametrize("op", ["token", "tensor", "static"])
@pytest.mark.parametrize("shape", [(6, 576), (300, 14336)], ids=str)
def test_nan_and_inf_like_torch(shape, op):
    x, seed = fresh_input(shape, torch.bfloat16)
    x[1, 17] = float("nan")
    x[2, 5] = float("inf")
    x[3, 9] = -float("inf")
    q, scale = run_kernel(op, x, poisoned(shape))
    ref_q, ref_scale = torch_reference(op, x, scale)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0, equal_nan=True)
    q32, ref32 = q.float(), ref_q.float()
    assert torch.equal(q32.isnan(), ref32.isnan()), f"NaN positions differ, seed {seed}"
    finite = ~ref32.isnan()
    assert torch.equal(q.view(torch.uint8)[finite], ref_q.view(torch.uint8)[finite])
    if op == "token":
        assert q32[1].isnan().all() and not q32[0].isnan().any()  # a NaN poisons its row only
    if op == "tensor":
        assert q32.isnan().all()


@pytest.mark.parametrize("shape", [(8, 4096), (4096, 4096)], ids=str)  # one launch / two launches
def test_per_tensor_is_cuda_graph_capturable(shape):
    static_x = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    static_x.copy_(fresh_input(shape, torch.bfloat16)[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.quantize_per_tensor(static_x)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, scale = kernels.quantize_per_tensor(static_x)
    for _ in range(3):
        x, seed = fresh_input(shape, torch.bfloat16)
        static_x.copy_(x)
        graph.replay()
        ref_q, ref_scale = torch_reference("tensor", x, None)
        assert torch.equal(scale, ref_scale), f"seed {seed}"
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), f"seed {seed}"


@pytest.mark.parametrize(
    "config, kernel",
    [
        (QuantConfig(), "quantize_per_tensor"),
        (QuantConfig(activation_granularity="token"), "quantize_per_token"),
        (QuantConfig(activation="static", weight="channel"), "quantize_static"),
    ],
    ids=["dynamic-tensor", "dynamic-token", "static-channel"],
)
def test_fp8linear_forward_dispatches_to_the_kernel(monkeypatch, config, kernel):
    linear = nn.Linear(1536, 512).to(device="cuda", dtype=torch.bfloat16)
    x, seed = fresh_input((4 * 33, 1536), torch.bfloat16)
    x = x.reshape(4, 33, 1536)
    input_scale = scaling.tensor_scale(x) if config.activation == "static" else None
    with monkeypatch.context() as m:  # the torch path, for the expected output
        m.setattr(kernels, "unavailable_reason", lambda device: "forced torch path")
        reference = FP8Linear.from_linear(linear, config, input_scale)
        expected = reference(x)
    calls = []
    for name in ("quantize_per_token", "quantize_per_tensor", "quantize_static"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    fp8 = FP8Linear.from_linear(linear, config, input_scale)
    weight_kernel = "quantize_per_token" if config.weight == "channel" else "quantize_per_tensor"
    assert calls == [weight_kernel]
    assert torch.equal(fp8.weight.view(torch.uint8), reference.weight.view(torch.uint8))
    assert torch.equal(fp8.weight_scale, reference.weight_scale)
    calls.clear()
    out = fp8(x)
    assert calls == [kernel]
    assert torch.equal(out, expected), f"seed {seed}"


@pytest.mark.parametrize("weight", ["tensor", "channel"])
def test_from_linear_peak_extra_memory_is_at_most_one_layer(weight):
    # Issue 5 target 5: quantizing a bf16 weight on the GPU allocates no fp32 temporaries.
    linear = nn.Linear(4096, 14336, bias=False, device="cuda", dtype=torch.bfloat16)
    layer_bytes = linear.weight.numel() * linear.weight.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fp8 = FP8Linear.from_linear(linear, QuantConfig(weight=weight))
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base
    assert peak_extra <= layer_bytes + (1 << 20), f"peak extra {peak_extra / 2**20:.1f} MiB"
    ref_scale = scaling.rowwise_scale(linear.weight) if weight == "channel" else scaling.tensor_scale(linear.weight)
    assert torch.equal(fp8.weight_scale.reshape(ref_scale.shape), ref_scale)
    expected = scaling.quantize(linear.weight, ref_scale)
    assert torch.equal(fp8.weight.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("op", ["token", "tensor", "static"])
def test_direct_launches_bit_exact_and_skip_tritons_launcher(op, monkeypatch):
    # After one launch per specialization, `kernels._launch` calls the compiled kernel directly:
    # Triton's JITFunction.run must not run again, and the bits must not change. Shapes in mixed
    # order with M == 1, K not a multiple of 16 and 2-byte-misaligned inputs (other specializations).
    shapes = [(1, 4096), (64, 4096), (3, 100), (16, 14336), (8, 4096)]
    cases = []
    for shape in shapes:
        x, seed = fresh_input(shape, torch.bfloat16)
        buf = torch.empty(x.numel() + 1, dtype=torch.bfloat16, device="cuda")
        misaligned = buf[1:].view(shape)
        misaligned.copy_(x)
        cases += [(x, seed), (misaligned, seed)]
    assert cases[1][0].data_ptr() % 16 != 0
    for x, _ in cases:  # warm-up: compiles every specialization through Triton
        run_kernel(op, x, poisoned(x.shape))
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) not in kernels._DIRECT_LAUNCH_VERSIONS:
        pytest.skip(f"direct launches are verified only on Triton {sorted(kernels._DIRECT_LAUNCH_VERSIONS)}")
    assert kernels._driver.ok, "direct launches are off on this Triton"

    def triton_run(*args, **kwargs):
        raise AssertionError("Triton's launcher ran after warm-up")

    kernel_set = kernels._build()
    for name in ("per_token", "static", "amax_partial", "per_tensor_quant", "per_tensor_small"):
        monkeypatch.setattr(getattr(kernel_set, name), "run", triton_run)
    for x, seed in reversed(cases):
        q, scale = run_kernel(op, x, poisoned(x.shape))
        ref_q, ref_scale = torch_reference(op, x, scale)
        assert torch.equal(scale, ref_scale), f"{tuple(x.shape)}, seed {seed}"
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), f"{tuple(x.shape)}, seed {seed}"


@pytest.mark.parametrize("activation_granularity", ["tensor", "token"])
def test_torch_compile_fullgraph_on_cuda_matches_eager(activation_granularity):
    # Under torch.compile the quantization is Inductor's (torch reference ops, no Triton launcher
    # from fp8kit, no graph break). Inductor may round x / scale differently by an ulp, so a few
    # FP8 values may land on the neighbouring code: compare with eager within that.
    torch._dynamo.reset()
    config = QuantConfig(activation_granularity=activation_granularity)
    linear = nn.Linear(1536, 512).to(device="cuda", dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(linear, config)
    x, seed = fresh_input((33, 1536), torch.bfloat16)
    expected = fp8(x)
    out = torch.compile(fp8, fullgraph=True)(x)
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    torch._dynamo.reset()


# --- skinny row-wise GEMMs: unit-scale `_scaled_mm` (fp32 out) + `kernels.scale_epilogue`


def fp8_operands(m, n, k, x_rowwise=True, w_rowwise=True, bias_dtype=None):
    """Quantized random operands on the GPU: (xq, wq, x_scale, w_scale, bias, seed)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator(device="cuda").manual_seed(seed)
    # Row magnitudes 2^-6 .. 2^2: outputs up to ~2^4 * sqrt(K) * 4 sigma stay finite in fp16 (65504).
    x = torch.randn(m, k, generator=g, device="cuda") * torch.exp2(torch.randint(-6, 3, (m, 1), generator=g, device="cuda").float())
    w = torch.randn(n, k, generator=g, device="cuda") * torch.exp2(torch.randint(-6, 3, (n, 1), generator=g, device="cuda").float())
    xs = scaling.rowwise_scale(x) if x_rowwise else scaling.tensor_scale(x)
    ws = scaling.rowwise_scale(w) if w_rowwise else scaling.tensor_scale(w)
    bias = None if bias_dtype is None else (torch.randn(n, generator=g, device="cuda") * 4).to(bias_dtype)
    return scaling.quantize(x, xs), scaling.quantize(w, ws), xs, ws, bias, seed


def gemm_reference64(xq, wq, xs, ws, bias):
    """(float64 (xq * xs) @ (wq * ws).T + bias, float64 sum of |terms| scaled the same)."""
    sa, sb = xs.double().reshape(-1, 1), ws.double().reshape(1, -1)
    ref = (xq.double() @ wq.double().t()) * sa * sb
    abs_sum = (xq.double().abs() @ wq.double().abs().t()) * sa * sb
    if bias is not None:
        ref = ref + bias.double()
    return ref, abs_sum


def poison_allocator(m, n, dtype):
    """Leave a NaN-filled block of the output's size in the caching allocator, so an output that
    `fp8_matmul` allocates and fails to write would show NaN."""
    torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    torch.cuda.synchronize()


def rowwise_path(monkeypatch, *args, **kwargs):
    """fp8_matmul with the skinny path switched off: torch's row-wise `_scaled_mm`."""
    with monkeypatch.context() as m:
        m.setattr(scaling, "ROWWISE_SKINNY_MAX_M", 0)
        return scaling.fp8_matmul(*args, **kwargs)


@pytest.fixture
def epilogue_calls(monkeypatch):
    calls = []
    real = kernels.scale_epilogue

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "scale_epilogue", spy)
    return calls


@pytest.mark.parametrize("m", [1, 7, 16, 17])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "x_rowwise, w_rowwise, bias_dtype",
    [(True, True, None), (True, True, torch.bfloat16), (True, False, torch.float32), (False, True, None)],
    ids=["row-row", "row-row-bias", "row-tensor-bias32", "tensor-row"],
)
def test_skinny_rowwise_matmul_vs_float64_and_rowwise_scaled_mm(
    m, out_dtype, x_rowwise, w_rowwise, bias_dtype, monkeypatch, epilogue_calls
):
    n, k = 1040, 4096  # N not a multiple of the epilogue's 512-column block
    xq, wq, xs, ws, bias, seed = fp8_operands(m, n, k, x_rowwise, w_rowwise, bias_dtype)
    poison_allocator(m, n, out_dtype)
    out = scaling.fp8_matmul(xq, wq, xs, ws, bias, out_dtype)
    torch.cuda.synchronize()
    skinny = m <= scaling.ROWWISE_SKINNY_MAX_M
    assert epilogue_calls == ([(m, n)] if skinny else []), f"seed {seed}"
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert not out.isnan().any(), f"unwritten (NaN-poisoned) elements remain, seed {seed}"
    baseline = rowwise_path(monkeypatch, xq, wq, xs, ws, bias, out_dtype)
    ref, abs_sum = gemm_reference64(xq, wq, xs, ws, bias)
    finfo = torch.finfo(out_dtype)
    # Hopper's FP8 MMA accumulates with fewer bits than fp32 (test_cuda.py): 2^-12 of the sum of |terms|.
    bound = 2**-12 * abs_sum + finfo.eps / 2 * ref.abs() + finfo.smallest_normal
    err = (out.double() - ref).abs()
    base_err = (baseline.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}, seed {seed}"
    # No worse than torch's row-wise `_scaled_mm`: mean error relative to |ref|, within 25 %.
    rel, base_rel = (err / ref.abs().clamp(min=1e-30)).mean(), (base_err / ref.abs().clamp(min=1e-30)).mean()
    assert rel <= 1.25 * base_rel + 1e-7, f"mean rel err {rel.item():.3g} vs row-wise {base_rel.item():.3g}, seed {seed}"


@pytest.mark.parametrize("n, k", [(14336, 4096), (4096, 14336)], ids=str)
@pytest.mark.parametrize("m", [1, 16])
def test_skinny_rowwise_llama_shapes_no_worse_than_rowwise(n, k, m, monkeypatch, epilogue_calls):
    xq, wq, xs, ws, _, seed = fp8_operands(m, n, k)
    out = scaling.fp8_matmul(xq, wq, xs, ws, None, torch.bfloat16)
    assert epilogue_calls == [(m, n)]
    baseline = rowwise_path(monkeypatch, xq, wq, xs, ws, None, torch.bfloat16)
    ref, _ = gemm_reference64(xq, wq, xs, ws, None)
    err, base_err = (out.double() - ref).abs(), (baseline.double() - ref).abs()
    assert err.mean() <= 1.05 * base_err.mean(), f"{err.mean().item():.4g} vs {base_err.mean().item():.4g}, seed {seed}"
    assert err.max() <= 1.5 * base_err.max(), f"{err.max().item():.4g} vs {base_err.max().item():.4g}, seed {seed}"


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_scale_epilogue_writes_every_element_of_a_poisoned_out(out_dtype):
    m, n = 7, 1000
    g = torch.Generator(device="cuda").manual_seed(0)
    acc = torch.randn(m, n, generator=g, device="cuda") * 1e6
    xs = torch.rand(m, 1, generator=g, device="cuda") * 1e-4
    ws = torch.rand(n, 1, generator=g, device="cuda") * 1e-4
    bias = torch.randn(n, generator=g, device="cuda").to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device="cuda")
    assert kernels.scale_epilogue(acc, xs, ws, bias, out_dtype, out=out) is out
    expected = (acc.double() * xs.double() * ws.double().t() + bias.double()).to(out_dtype)  # one rounding
    finfo = torch.finfo(out_dtype)
    err = (out.double() - expected.double()).abs()
    assert (err <= finfo.eps * expected.double().abs() + 2**-20).all()  # at most one ulp off (fp32 math first)
    if out_dtype != torch.float32:  # round to nearest on the GPU: mostly the float64 result's rounding
        assert (out == expected).float().mean() > 0.99


def test_fp8linear_per_token_dispatches_to_the_skinny_path_by_m(epilogue_calls, monkeypatch):
    monkeypatch.setattr(skinny, "ENABLED", False)  # the unfused path (the fused kernel is tested below)
    linear = nn.Linear(4096, 1040).to(device="cuda", dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(linear, QuantConfig(weight="channel", activation_granularity="token"))
    for m in (1, 16, 17, 64):
        epilogue_calls.clear()
        x, seed = fresh_input((m, 4096), torch.bfloat16)
        out = fp8(x)
        assert epilogue_calls == ([(m, 1040)] if m <= scaling.ROWWISE_SKINNY_MAX_M else []), f"M={m}"
        expected = linear(x).double()
        torch.testing.assert_close(out.double(), expected, rtol=0.1, atol=0.1 * expected.abs().max().item())


def test_skinny_rowwise_matmul_is_cuda_graph_capturable(epilogue_calls):
    m, n, k = 8, 1040, 4096
    xq, wq, xs, ws, bias, _ = fp8_operands(m, n, k, bias_dtype=torch.bfloat16)
    static = [t.clone() for t in (xq, xs)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        scaling.fp8_matmul(static[0], wq, static[1], ws, bias)  # compile / cache outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = scaling.fp8_matmul(static[0], wq, static[1], ws, bias)
    assert len(epilogue_calls) == 2
    for _ in range(3):
        xq2, _, xs2, _, _, seed = fp8_operands(m, n, k)
        static[0].copy_(xq2)
        static[1].copy_(xs2)
        graph.replay()
        expected = scaling.fp8_matmul(xq2, wq, xs2, ws, bias)
        assert torch.equal(out, expected), f"seed {seed}"


def test_skinny_rowwise_under_torch_compile_matches_eager():
    torch._dynamo.reset()
    xq, wq, xs, ws, bias, seed = fp8_operands(8, 1040, 4096, bias_dtype=torch.bfloat16)
    expected = scaling.fp8_matmul(xq, wq, xs, ws, bias)
    compiled = torch.compile(scaling.fp8_matmul, fullgraph=True)
    out = compiled(xq, wq, xs, ws, bias)
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- fused skinny-M linear

FUSED_SHAPES = [(1, 1040, 4096), (7, 999, 1000), (16, 4096, 14336), (13, 333, 4100), (32, 1024, 4096)]
FUSED_TILES = {"default": kernels.FusedTiles(), "split3-bn32": kernels.FusedTiles(block_n=32, split_k=3),
               "bn64-bk128": kernels.FusedTiles(block_n=64, block_k=128, num_stages=4)}  # fmt: skip


def recip_quantize(x, scale):
    """The fused kernel's FP8 activation (default tiles): cast(clamp(x * (1 / scale))), IEEE reciprocal."""
    inverse = torch.ones_like(scale) / scale
    return (x.float() * inverse).clamp(-448, 448).to(torch.float8_e4m3fn)


def fused_inputs(m, n, k, act, bias_dtype):
    """(x for the kernel, wq, ws, x_scale for the kernel, bias, (xq, xs) as the kernel quantizes x, seed)."""
    x_rowwise = act in ("token", "fp8-token")
    _, wq, _, ws, bias, seed = fp8_operands(m, n, k, x_rowwise, act != "static", bias_dtype)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    # bf16 activations off the FP8 grid (their quantization error is FP8's), rows of different magnitudes.
    x = torch.randn(m, k, generator=g, device="cuda") * torch.exp2(torch.randint(-6, 3, (m, 1), generator=g, device="cuda").float())
    x = x.to(torch.bfloat16)
    if act == "static":
        xs = scaling.tensor_scale(x) * 0.8  # the largest values clamp
        return x, wq, ws, xs, bias, (recip_quantize(x, xs), xs), seed
    q, s = (kernels.quantize_per_token if x_rowwise else kernels.quantize_per_tensor)(x)  # the same scale
    if act.startswith("fp8"):
        return q, wq, ws, s, bias, (q, s), seed
    return x, wq, ws, None, bias, (recip_quantize(x, s), s), seed


FUSED_ACTS = ["static", "tensor", "token", "fp8-token", "fp8-tensor"]
# Every shape and scheme with the default tiles; the other tiles on one shape (compilations cost time).
FUSED_CASES = [(shape, act, "default") for shape in FUSED_SHAPES for act in FUSED_ACTS] + [
    ((16, 4096, 14336), act, tiles) for act in FUSED_ACTS for tiles in ("split3-bn32", "bn64-bk128")
]


@pytest.mark.parametrize("shape, act, tiles", FUSED_CASES, ids=[f"{s}-{a}-{t}" for s, a, t in FUSED_CASES])
def test_fused_linear_vs_float64_every_scheme(shape, act, tiles):
    m, n, k = shape
    out_dtype = torch.float32 if m % 2 else torch.bfloat16
    x, wq, ws, x_scale, bias, (xq, xs), seed = fused_inputs(m, n, k, act, torch.bfloat16 if n % 2 else None)
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device="cuda")
    mode = "fp8" if act.startswith("fp8") else act
    result = kernels.fused_linear(x, wq, ws, mode, x_scale=x_scale, bias=bias, out_dtype=out_dtype, tiles=FUSED_TILES[tiles], out=out)
    torch.cuda.synchronize()
    assert result is out
    assert not out.isnan().any(), f"unwritten (NaN-poisoned) elements remain, seed {seed}"
    # The reference is the float64 GEMM of the operands as the kernel quantizes them (the quantize kernels'
    # scale; x times its IEEE reciprocal); Hopper's FP8 MMA accumulates with fewer bits than fp32 (2^-12
    # of the sum of |terms|).
    ref, abs_sum = gemm_reference64(xq, wq, xs, ws, bias)
    finfo = torch.finfo(out_dtype)
    bound = 2**-12 * abs_sum + finfo.eps / 2 * ref.abs() + finfo.smallest_normal
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}, seed {seed}"
    if FUSED_TILES[tiles].split_k > 1:
        counters = kernels._fused_workspace[out.device][1]
        assert not counters.any(), "split-K arrival counters not reset"


@pytest.mark.parametrize("act", ["static", "tensor", "token"])
@pytest.mark.parametrize("n, k", [(14336, 4096), (4096, 14336)], ids=str)
@pytest.mark.parametrize("m", [1, 16])
def test_fused_linear_error_vs_float64_equals_the_existing_paths(m, n, k, act):
    # Against the exact product of the unquantized operands, the fused kernel's error is the existing
    # path's (quantize kernel + `_scaled_mm`, the same FP8 values): the quantization error, not the GEMM.
    x, wq, ws, x_scale, _, (_, xs), seed = fused_inputs(m, n, k, act, None)
    fused = kernels.fused_linear(x, wq, ws, act, x_scale=x_scale)
    xq = kernels.quantize_static(x, xs) if act == "static" else scaling.quantize_activation(x, act)[0]
    existing = scaling.fp8_matmul(xq, wq, xs, ws, out_dtype=torch.bfloat16)
    exact = x.double() @ (wq.double() * ws.double().reshape(-1, 1)).t()
    e_fused, e_existing = (fused.double() - exact).norm(), (existing.double() - exact).norm()
    assert abs(e_fused / e_existing - 1) < 0.02, f"{e_fused.item():.5g} vs {e_existing.item():.5g}, seed {seed}"


def _fused_table(monkeypatch, **tiles):
    rule = skinny.Rule(max_m=16, tiles=kernels.FusedTiles(**tiles))
    table = {(scheme, cls): rule for scheme in ("static", "tensor", "token") for cls in ("small", "square", "wide", "deep")}
    monkeypatch.setattr(skinny, "TABLE", table)


@pytest.mark.parametrize(
    "config", [QuantConfig(activation="static"), QuantConfig(), QuantConfig(weight="channel", activation_granularity="token")],
    ids=["static", "dynamic-tensor", "dynamic-token"],
)
def test_fp8linear_dispatch_to_the_fused_kernel_follows_the_table(config, monkeypatch):
    linear = nn.Linear(1000, 1040).to(device="cuda", dtype=torch.bfloat16)
    x_big, _ = fresh_input((40, 1000), torch.bfloat16)
    input_scale = scaling.tensor_scale(x_big) if config.activation == "static" else None
    plans, gemms = [], []
    real_plan, real_mm = skinny.plan_for, torch._scaled_mm
    monkeypatch.setattr(skinny, "plan_for", lambda *a, **k: plans.append((a[1], k["capturing"])) or real_plan(*a, **k))
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: gemms.append(a[0].shape[0]) or real_mm(*a, **k))
    fp8 = FP8Linear.from_linear(linear, config, input_scale)
    # Empty table (the default until measured): the existing path.
    monkeypatch.setattr(skinny, "TABLE", {})
    x = x_big[:5]
    expected = emulate(linear.float(), x.float(), config, input_scale)
    out = fp8(x)
    assert plans == [(5, False), (5, True)] and gemms == [5]  # eager and capture modes both planned: no rule
    _fused_table(monkeypatch, block_n=32, split_k=2)
    fp8 = FP8Linear.from_linear(linear, config, input_scale)
    plans.clear(), gemms.clear()
    for _ in range(3):
        out = fp8(x)
    assert plans == [(5, False), (5, True)] and gemms == []  # planned once, then cached; no `_scaled_mm`
    tol = 2e-2
    torch.testing.assert_close(out.double(), expected.double().cuda(), rtol=tol, atol=tol * expected.abs().max().item())
    fp8(x_big)  # M = 40 > 16: the existing path
    assert gemms == [40]
    fp8(x_big[:16].reshape(2, 8, 1000))  # 3-D input of 16 rows: fused
    assert plans == [(5, False), (5, True), (16, False), (16, True)] and gemms == [40]


@pytest.mark.parametrize("scheme", ["token", "tensor"])
def test_prequant_mode_under_capture_matches_the_quantize_kernels_operands(scheme, monkeypatch):
    # The shipped table's capture mode for the dynamic schemes: quantize kernel + fused kernel on FP8 x.
    monkeypatch.setattr(skinny, "TABLE", {(scheme, "small"): skinny.Rule(16, kernels.FusedTiles(block_n=32, split_k=4), graph="prequant")})
    linear = nn.Linear(1000, 1040).to(device="cuda", dtype=torch.bfloat16)
    config = QuantConfig(weight="channel", activation_granularity=scheme)
    fp8 = FP8Linear.from_linear(linear, config)
    static_x = fresh_input((6, 1000), torch.bfloat16)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8(static_x)
    x, seed = fresh_input((6, 1000), torch.bfloat16)
    static_x.copy_(x)
    graph.replay()
    xq, xs = scaling.quantize_activation(x, scheme)  # the quantize kernels' operands, bit for bit
    ref, abs_sum = gemm_reference64(xq, fp8.weight, xs, fp8.weight_scale, fp8.bias)
    bound = 2**-12 * abs_sum + 2**-8 * ref.abs() + 1e-30
    assert ((out.double() - ref).abs() <= bound).all(), f"seed {seed}"


def test_fused_fp8linear_is_cuda_graph_capturable_and_deterministic(monkeypatch):
    _fused_table(monkeypatch, block_n=32, split_k=4)
    linear = nn.Linear(4096, 1040).to(device="cuda", dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(linear, QuantConfig(weight="channel", activation_granularity="token"))
    static_x = fresh_input((8, 4096), torch.bfloat16)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8(static_x)  # plan, workspace and compilation outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8(static_x)
    for _ in range(3):
        x, seed = fresh_input((8, 4096), torch.bfloat16)
        static_x.copy_(x)
        graph.replay()
        assert torch.equal(out, fp8(x)), f"replay differs from eager (split-K must be deterministic), seed {seed}"


def test_fused_fp8linear_under_torch_compile_takes_the_torch_path(monkeypatch):
    _fused_table(monkeypatch)
    torch._dynamo.reset()
    linear = nn.Linear(4096, 1040).to(device="cuda", dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(linear, QuantConfig(weight="channel", activation_granularity="token"))
    x = fresh_input((4, 4096), torch.bfloat16)[0]
    eager = fp8(x)
    compiled = torch.compile(fp8, fullgraph=True)(x)
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2 * eager.abs().max().item())
    torch._dynamo.reset()


def test_compiled_fp8linear_runs_the_fused_kernel_through_the_operator(monkeypatch):
    # torch.compile keeps fp8kit::skinny_linear opaque: the compiled module runs the same fused plan as
    # the eager one, so the outputs are the same bits.
    _fused_table(monkeypatch, block_n=32, split_k=2)
    linear = nn.Linear(1024, 1040).to(device="cuda", dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(linear, QuantConfig(weight="channel", activation_granularity="token"))
    x = fresh_input((4, 1024), torch.bfloat16)[0]
    eager = fp8(x).clone()
    modes = []
    real = skinny.run_plan
    monkeypatch.setattr(skinny, "run_plan", lambda entry, *a: modes.append(entry[0]) or real(entry, *a))
    out = torch.compile(fp8, fullgraph=True, dynamic=False)(x)
    assert modes and set(modes) == {"fused"}
    assert torch.equal(out, eager)
