"""FP8Experts on a CUDA GPU: `torch._scaled_grouped_mm` for real on compute capability 9.0 (the
per-expert loop elsewhere), CUDA-graph capture, torch.compile, a whole tiny MoE model in bf16.

Skipped on CPU-only machines (CI); run on an H100 / H200 with `pytest tests/core/test_experts_cuda.py`.
"""

import logging

import pytest
import torch

from fp8kit.core import QuantConfig, quantize, scaling
from fp8kit.core.experts import FP8Experts, experts_layout

from fp8_reference import emulate_expert
from tiny_models import make_tiny_moe, moe_layers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="needs a CUDA GPU with compute capability >= 8.9 (FP8 tensor cores)",
    ),
]

SCHEMES = {
    "dynamic-tensor/w-tensor": QuantConfig(),
    "dynamic-token/w-channel": QuantConfig(weight="channel", activation_granularity="token"),
    "static/w-tensor": QuantConfig(activation="static"),
}
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture
def grouped_calls(caplog, monkeypatch):
    """Calls of torch._scaled_grouped_mm (spied); no fallback warning may be logged on Hopper."""
    calls = []
    real = getattr(torch, "_scaled_grouped_mm", None)
    if real is not None:
        def spy(*args, **kwargs):
            calls.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, "_scaled_grouped_mm", spy)
    scaling._warned.clear()
    with caplog.at_level(logging.WARNING, logger="fp8kit.core.scaling"):
        yield calls
    if HOPPER:
        assert not [r for r in caplog.records if "per-expert loop" in r.getMessage()], caplog.text


def _experts(kind, config):
    torch.manual_seed(0)
    module = moe_layers(make_tiny_moe(kind, hidden_size=128, intermediate_size=64, moe_intermediate_size=64))[0].experts
    scales = None
    if config.activation == "static":
        scales = {p: torch.linspace(3.0, 4.0, module.down_proj.shape[0]) / 448 for p in experts_layout(module).projections}
        scales["down_proj"] = scales["down_proj"] / 20
    return module, scales


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_expert_on_cuda_matches_float64_emulation(kind, scheme, grouped_calls):
    config = SCHEMES[scheme]
    module, scales = _experts(kind, config)
    fp8 = FP8Experts.from_experts(module, config, scales).cuda().to(torch.bfloat16)
    x = torch.randn(40, 128)
    for e in range(module.down_proj.shape[0]):
        out = fp8(x.cuda().bfloat16(), torch.full((40, 1), e, device="cuda"), torch.ones(40, 1, device="cuda"))
        expected = emulate_expert(module, e, x.bfloat16().float(), config, scales)
        # bf16 output of each GEMM, re-quantized between the two: a few FP8 rounding flips (2^-4 each).
        assert ((out.double().cpu() - expected).norm() / expected.norm()).item() < 0.03, e
    if HOPPER:
        assert len(grouped_calls) == 2 * module.down_proj.shape[0]  # one launch per projection per call


def _capture(fn, *static):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, out


@pytest.mark.skipif(not HOPPER, reason="the per-expert loop reads group sizes on the host: not capturable")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_graph_replay_equals_eager(scheme, grouped_calls):
    config = SCHEMES[scheme]
    module, scales = _experts("qwen3_moe", config)
    fp8 = FP8Experts.from_experts(module, config, scales).cuda().to(torch.bfloat16)
    x = torch.randn(8, 128, device="cuda", dtype=torch.bfloat16)
    top_k = torch.randint(0, 8, (8, 2), device="cuda")
    weights = torch.rand(8, 2, device="cuda")
    graph, out = _capture(fp8, x, top_k, weights)
    for seed in range(3):  # new tokens and new routing into the captured buffers
        g = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(8, 128, device="cuda", generator=g))
        top_k.copy_(torch.randint(0, 8, (8, 2), device="cuda", generator=g))
        graph.replay()
        assert torch.equal(out, fp8(x, top_k, weights))


@pytest.mark.skipif(not HOPPER, reason="the grouped path (one traceable op) runs on compute capability 9.0")
def test_torch_compile_fullgraph_matches_eager():
    config = SCHEMES["dynamic-token/w-channel"]
    module, _ = _experts("mixtral", config)
    fp8 = FP8Experts.from_experts(module, config).cuda().to(torch.bfloat16)
    x = torch.randn(33, 128, device="cuda", dtype=torch.bfloat16)
    top_k, weights = torch.randint(0, 4, (33, 2), device="cuda"), torch.rand(33, 2, device="cuda")
    expected = fp8(x, top_k, weights)
    torch._dynamo.reset()
    out = torch.compile(fp8, fullgraph=True)(x, top_k, weights)
    # The compiled activation quantization is torch ops (same bits); the bf16 tail may fuse differently.
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_tiny_moe_model_on_cuda_in_bf16(kind, grouped_calls):
    model = make_tiny_moe(kind).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 24), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    reference = model(ids).logits.float()
    quantize(model, QuantConfig(weight="channel", activation_granularity="token"))
    assert all(isinstance(mlp.experts, FP8Experts) for mlp in moe_layers(model))
    out = model(ids).logits.float()
    assert torch.isfinite(out).all()
    # bf16 + FP8 on a 2-layer random model: per-token error a few percent (CPU fp32 runs: ~4%).
    assert ((out - reference).norm() / reference.norm()).item() < 0.15
    if HOPPER:
        assert grouped_calls


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_fused_gate_kernel_matches_the_unfused_gate(kind, monkeypatch, grouped_calls):
    from fp8kit.core import experts as experts_module
    from fp8kit.core import kernels

    config = SCHEMES["dynamic-token/w-channel"]
    module, _ = _experts(kind, config)
    fp8 = FP8Experts.from_experts(module, config).cuda().to(torch.bfloat16)
    e = module.down_proj.shape[0]
    x = torch.randn(300, 128, device="cuda", dtype=torch.bfloat16)
    top_k, weights = torch.randint(0, e, (300, 2), device="cuda"), torch.rand(300, 2, device="cuda")
    calls = []
    real = kernels.silu_mul_quantize_per_token
    monkeypatch.setattr(kernels, "silu_mul_quantize_per_token", lambda h: calls.append(h.shape) or real(h))
    fused = fp8(x, top_k, weights)
    assert calls == [(600, 128)]
    monkeypatch.setattr(experts_module, "fused_gate_unavailable_reason", lambda device: "off for this test")
    unfused = fp8(x, top_k, weights)
    # Same math; Triton's exp vs torch's may move a bf16 rounding, then an FP8 rounding, by one step.
    assert ((fused.float() - unfused.float()).norm() / unfused.float().norm()).item() < 2e-3
    h = torch.randn(64, 2 * 14336, device="cuda", dtype=torch.bfloat16)  # Mixtral's I: the one-pass branch
    q, scale = real(h)
    gate, up = h.chunk(2, dim=-1)
    ref_q, ref_scale = scaling.quantize_activation(torch.nn.functional.silu(gate) * up, "token")
    torch.testing.assert_close(scale, ref_scale, rtol=2**-7, atol=0)
    assert (q.float() != ref_q.float()).float().mean().item() < 0.01  # a few one-step FP8 rounding flips
