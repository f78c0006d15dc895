"""MoE experts in FP8 on tiny random transformers 5 models (Mixtral, Qwen3-MoE, DeepSeek-V3, gpt-oss).

Covers `FP8Experts` (each expert against a float64 emulation and the unquantized expert), the
grouped-GEMM call against the CUDA rules of `torch._scaled_grouped_mm`, surgery (FP8 share, router
gates, the summary), calibration (experts that see no token) and logits against a dense model.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fp8kit.core import FP8Linear, QuantConfig, kernels, quantize, scaling
from fp8kit.core import experts as experts_module
from fp8kit.core.analysis import layer_errors
from fp8kit.core.experts import (
    UNSEEN_FALLBACK_SCALE,
    FP8Experts,
    expert_input_amax,
    experts_layout,
    quantize_expert_weight,
    static_input_scales,
)

from fp8_reference import emulate_expert, reference_expert
from tiny_models import MOE_KINDS, make_tiny_llama, make_tiny_moe, moe_layers
from triton_interpreter import run_interpreted

SCHEMES = {
    "dynamic-tensor/w-tensor": QuantConfig(),
    "dynamic-token/w-channel": QuantConfig(weight="channel", activation_granularity="token"),
    "static/w-tensor": QuantConfig(activation="static"),
}
ROUTER = {"mixtral": "gate", "qwen3_moe": "gate", "deepseek_v3": "gate", "gpt_oss": "router"}


def ids(batch=2, length=32, seed=1):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_expert_matches_float64_emulation_and_reference(kind, scheme):
    torch.manual_seed(0)
    module = moe_layers(make_tiny_moe(kind))[0].experts
    config = SCHEMES[scheme]
    e_count, hidden = module.down_proj.shape[0], module.config.hidden_size
    x = torch.randn(24, hidden)
    scales = None
    if config.activation == "static":  # each expert's own input absmax (all tokens), made distinct on purpose
        amax = expert_input_amax(module, x, torch.zeros(24, 1, dtype=torch.long), None, all_experts=True)
        scales = {proj: scaling.amax_to_scale(a) * torch.linspace(1.0, 1.3, e_count) for proj, (a, _) in amax.items()}
    fp8 = FP8Experts.from_experts(module, config, scales)
    for e in range(e_count):
        out = fp8(x, torch.full((24, 1), e), torch.ones(24, 1))  # every token to expert e, weight 1
        # Same quantized operands, fp32 accumulation instead of float64: only rounding differs.
        assert rel(out, emulate_expert(module, e, x, config, scales)) < 1e-4, e
        # FP8 E4M3 keeps 3 mantissa bits (relative rounding <= 2^-4, ~2.5% RMS per operand on Gaussian
        # data); two chained quantized GEMMs, each with two quantized operands, stay under 10%.
        assert rel(out, reference_expert(module, e, x)) < 0.1, e


def test_top_k_combination_and_unrouted_experts_match_the_original_module():
    torch.manual_seed(0)
    module = moe_layers(make_tiny_moe("mixtral"))[0].experts
    fp8 = FP8Experts.from_experts(module, QuantConfig(weight="channel", activation_granularity="token"))
    x = torch.randn(40, 64)
    top_k = torch.stack([torch.zeros(40, dtype=torch.long), torch.randint(1, 3, (40,))], dim=1)  # expert 3 unused
    weights = torch.rand(40, 2)
    expected = sum(
        weights[:, j : j + 1] * torch.stack([emulate_expert(module, int(e), x[t : t + 1], fp8_config(fp8))[0] for t, e in enumerate(top_k[:, j])])
        for j in range(2)
    )
    out = fp8(x, top_k, weights)
    assert out.shape == (40, 64) and out.dtype == torch.float32
    assert rel(out, expected) < 1e-4


def fp8_config(fp8):
    return QuantConfig(weight=fp8.weight_granularity, activation=fp8.activation, activation_granularity=fp8.activation_granularity)


def test_zero_and_empty_expert_weights_get_valid_scales():
    torch.manual_seed(0)
    module = moe_layers(make_tiny_moe("qwen3_moe"))[0].experts
    with torch.no_grad():
        module.gate_up_proj[2].zero_()
        module.down_proj[2, :, :].zero_()
    fp8 = FP8Experts.from_experts(module, QuantConfig())
    for name in ("gate_up_proj_weight_scale", "down_proj_weight_scale"):
        scale = getattr(fp8, name)
        assert torch.isfinite(scale).all() and (scale > 0).all()
        assert torch.equal(scale[2], torch.full_like(scale[2], scaling.AMAX_FLOOR / scaling.FP8_MAX))
    x = torch.randn(8, 64)
    assert torch.equal(fp8(x, torch.full((8, 1), 2), torch.ones(8, 1)), torch.zeros(8, 64))
    q, s = quantize_expert_weight(torch.empty(0, 64), "tensor", parts=2)  # an expert with no rows
    assert q.shape == (0, 64) and q.dtype == scaling.FP8_DTYPE and torch.isfinite(s).all() and (s > 0).all()
    q, s = quantize_expert_weight(torch.empty(0, 64), "channel")
    assert s.shape == (0, 1)


def test_dtype_conversions_keep_fp8_weights_and_fp32_scales():
    module = moe_layers(make_tiny_moe("gpt_oss"))[0].experts
    fp8 = FP8Experts.from_experts(module, QuantConfig()).to(torch.bfloat16)
    assert fp8.gate_up_proj.dtype == scaling.FP8_DTYPE and fp8.down_proj_weight_scale.dtype == torch.float32
    assert fp8.gate_up_proj_bias.dtype == torch.bfloat16
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    assert fp8(x, torch.randint(0, 4, (6, 2)), torch.rand(6, 2)).dtype == torch.bfloat16


def fake_scaled_grouped_mm(calls):
    """torch._scaled_grouped_mm as CUDA checks it on compute capability 9.0 (REFERENCE §9), computed exactly."""

    def op(mat_a, mat_b, scale_a, scale_b, offs=None, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        s, k = mat_a.shape
        g, k_b, n = mat_b.shape
        assert mat_a.dtype == mat_b.dtype == scaling.FP8_DTYPE and mat_a.is_contiguous()
        assert mat_b.stride(-2) == 1 and mat_b.transpose(-2, -1).is_contiguous(), "mat_b must be column-major"
        assert k == k_b and k % 16 == 0 and n % 16 == 0
        assert scale_a.dtype == scale_b.dtype == torch.float32
        assert scale_a.shape == (s,) and scale_a.is_contiguous() and scale_a.stride() == (1,)
        assert scale_b.shape == (g, n) and scale_b.is_contiguous()
        assert offs.dtype == torch.int32 and offs.shape == (g,) and int(offs[-1]) == s
        assert bias is None and out_dtype == torch.bfloat16
        calls.append(use_fast_accum)
        out, start = torch.zeros(s, n), 0
        for e, end in enumerate(offs.tolist()):
            a = mat_a[start:end].float() * scale_a[start:end, None]
            out[start:end] = a @ (mat_b[e].float() * scale_b[e])
            start = end
        return out.to(torch.bfloat16)

    return op


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_grouped_path_follows_scaled_grouped_mm_rules(kind, scheme, monkeypatch):
    torch.manual_seed(0)
    module = moe_layers(make_tiny_moe(kind))[0].experts
    config = SCHEMES[scheme]
    scales = {p: torch.full((module.down_proj.shape[0],), 0.01) for p in experts_layout(module).projections}
    # bf16, as on the GPU: both paths then round the GEMM's fp32 accumulator to bf16 (grouped_mm's only output).
    fp8 = FP8Experts.from_experts(module, config, scales if config.activation == "static" else None).to(torch.bfloat16)
    x, top_k, weights = torch.randn(33, 64, dtype=torch.bfloat16), torch.randint(0, 4, (33, 2)), torch.rand(33, 2)
    loop = fp8(x, top_k, weights)
    calls = []
    monkeypatch.setattr(scaling, "grouped_mm_unsupported_reason", lambda device: None)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", fake_scaled_grouped_mm(calls), raising=False)
    grouped = fp8(x, top_k, weights)
    assert calls == [False, False]  # one launch per projection
    assert rel(grouped, loop) < 2**-8  # the same math; only the accumulation order differs


@torch.library.custom_op("fp8kit_test::scaled_grouped_mm", mutates_args=())
def _opaque_grouped_mm(
    mat_a: torch.Tensor, mat_b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, offs: torch.Tensor
) -> torch.Tensor:
    return fake_scaled_grouped_mm([])(mat_a, mat_b, scale_a, scale_b, offs=offs, out_dtype=torch.bfloat16)


@_opaque_grouped_mm.register_fake
def _(mat_a, mat_b, scale_a, scale_b, offs):
    return mat_a.new_empty(mat_a.shape[0], mat_b.shape[-1], dtype=torch.bfloat16)


def test_torch_compile_traces_the_grouped_forward_without_graph_breaks(monkeypatch):
    torch.manual_seed(0)
    module = moe_layers(make_tiny_moe("qwen3_moe"))[0].experts
    fp8 = FP8Experts.from_experts(module, QuantConfig(activation_granularity="token"))
    monkeypatch.setattr(scaling, "grouped_mm_unsupported_reason", lambda device: None)
    # An opaque op standing in for the CUDA kernel (as the real one is to the compiler).
    monkeypatch.setattr(
        torch, "_scaled_grouped_mm", lambda a, b, sa, sb, offs, **kw: _opaque_grouped_mm(a, b, sa, sb, offs), raising=False
    )
    x, top_k, weights = torch.randn(10, 64), torch.randint(0, 8, (10, 2)), torch.rand(10, 2)
    expected = fp8(x, top_k, weights)
    torch._dynamo.reset()
    compiled = torch.compile(fp8, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, top_k, weights), expected)


@pytest.mark.parametrize(("capability", "grouped"), [((9, 0), True), ((8, 9), False), ((10, 0), False)])
def test_grouped_path_is_chosen_on_compute_capability_9_0_only(capability, grouped, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
    monkeypatch.setattr(torch, "_scaled_grouped_mm", object(), raising=False)
    monkeypatch.setattr(scaling, "_grouped_reasons", {})
    reason = scaling.grouped_mm_unsupported_reason(torch.device("cuda", 0))
    assert reason is None if grouped else reason == (
        f"Fake GPU has compute capability {capability[0]}.{capability[1]}; torch._scaled_grouped_mm runs FP8 "
        "with row-wise scales on 9.0 (Hopper) only"
    )
    assert scaling.grouped_mm_unsupported_reason(torch.device("cuda", 0)) == reason  # cached, the same answer


def test_loop_fallback_refuses_cuda_graph_capture_by_name(monkeypatch):
    from fp8kit.core import GraphCaptureError

    module = moe_layers(make_tiny_moe("mixtral"))[0].experts
    fp8 = FP8Experts.from_experts(module, QuantConfig())
    monkeypatch.setattr(scaling, "_capturing", lambda device: True)  # as inside torch.cuda.graph(...)
    with pytest.raises(GraphCaptureError, match=r"FP8 experts on cpu cannot be captured in a CUDA graph: torch\._scaled_grouped_mm "
                       r"needs a CUDA device of compute capability 9\.0, not 'cpu', so they run as a per-expert loop"):
        fp8(torch.randn(4, 64), torch.randint(0, 4, (4, 2)), torch.rand(4, 2))


def test_loop_fallback_warns_once(caplog):
    module = moe_layers(make_tiny_moe("mixtral"))[0].experts
    fp8 = FP8Experts.from_experts(module, QuantConfig())
    scaling._warned.clear()
    with caplog.at_level(logging.WARNING, logger="fp8kit.core.scaling"):
        for _ in range(3):
            fp8(torch.randn(4, 64), torch.randint(0, 4, (4, 2)), torch.rand(4, 2))
    warnings = [r.getMessage() for r in caplog.records if "per-expert loop" in r.getMessage()]
    assert warnings == [
        "FP8 experts run as a per-expert loop of FP8 GEMMs: torch._scaled_grouped_mm needs a CUDA device of "
        "compute capability 9.0, not 'cpu'"
    ]


# --------------------------------------------------------------------------- surgery and summary


def expected_fp8_matrices(model, kind):
    """Every weight matrix quantize() must turn to FP8: attention / dense MLP / shared-expert linears and
    both expert projections; not embeddings, router gates or lm_head."""
    out = {}
    for name, p in model.named_parameters():
        if p.dim() < 2 or name.endswith("bias") or "embed_tokens" in name or name.startswith("lm_head") or f"mlp.{ROUTER[kind]}." in name:
            continue
        out[name] = p.numel()
    return out


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_fp8_share_and_summary(kind):
    model = make_tiny_moe(kind)
    expected = expected_fp8_matrices(model, kind)
    matrices = {n: p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("bias")}
    quantize(model, QuantConfig())
    report = model.fp8kit_report
    for mlp in moe_layers(model):
        assert isinstance(mlp.experts, FP8Experts)
        router = getattr(mlp, ROUTER[kind])
        assert router.weight.dtype == torch.float32  # routers stay in high precision
    assert report.fp8_elements == sum(expected.values())
    assert report.matrix_elements == sum(p.numel() for p in matrices.values())
    hp_bytes = sum(p.numel() * 4 for n, p in matrices.items() if n not in expected)
    assert report.fp8_bytes == report.fp8_elements and report.matrix_bytes == report.fp8_bytes + hp_bytes
    routers = {f"model.layers.{i}.mlp.{ROUTER[kind]}.weight" for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}
    assert set(report.high_precision) == {"model.embed_tokens.weight", "lm_head.weight"} | routers
    assert report.high_precision["lm_head.weight"] == "ignored by config"
    assert report.high_precision["model.embed_tokens.weight"] == "embedding (a table lookup, not a GEMM)"
    assert all(report.high_precision[r].startswith("MoE router gate") for r in routers)
    text = report.summary()
    share = 100 * report.fp8_elements / report.matrix_elements
    assert f"FP8 holds {share:.1f}% of the weight-matrix elements ({report.fp8_elements:,} of {report.matrix_elements:,})" in text
    assert f"{len(report.high_precision)} weight matrices kept in high precision:" in text


def test_summary_reasons_and_unknown_module_warning(caplog):
    class Mixer(nn.Module):  # an unknown module type holding a big matrix
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(64, 64))

        def forward(self, x):
            return x @ self.kernel

    model = nn.Sequential()
    model.add_module("up", nn.Linear(64, 64))
    model.add_module("odd", nn.Linear(64, 24))
    model.add_module("back", nn.Linear(24, 64))
    model.add_module("mixer", Mixer())
    model.add_module("tiny", Mixer())
    model.tiny.kernel = nn.Parameter(torch.randn(1, 4))  # 4 elements: under 1% of the parameters, no warning
    total = sum(p.numel() for p in model.parameters()) + 1  # + the FP8 weight scale of `up`
    with caplog.at_level(logging.WARNING, logger="fp8kit.core.surgery"):
        quantize(model, QuantConfig(ignore=["back"]))
    report = model.fp8kit_report
    assert report.high_precision == {
        "odd.weight": "K=64 or N=24 is not a multiple of 16 (torch._scaled_mm needs both)",
        "back.weight": "ignored by config",
        "mixer.kernel": "unsupported module type Mixer (fp8kit quantizes nn.Linear and fused MoE experts)",
        "tiny.kernel": "unsupported module type Mixer (fp8kit quantizes nn.Linear and fused MoE experts)",
    }
    assert (report.fp8_elements, report.matrix_elements) == (64 * 64, 64 * 64 + 24 * 64 * 2 + 64 * 64 + 4)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        f"mixer.kernel (4096 elements, {100 * 4096 / total:.1f}% of the parameters) stays in high precision: "
        "unsupported module type Mixer (fp8kit quantizes nn.Linear and fused MoE experts)"
    ]


def test_experts_with_a_dimension_not_multiple_of_16_stay_with_the_reason():
    model = make_tiny_moe("mixtral", intermediate_size=24)
    quantize(model, QuantConfig())
    name = "model.layers.0.mlp.experts"
    assert model.fp8kit_report.skipped[name] == (
        "K or N is not a multiple of 16 (FP8 GEMMs need both): down_proj [E, N, K] = [4, 64, 24]"
    )
    assert model.fp8kit_report.high_precision[f"{name}.gate_up_proj"] == model.fp8kit_report.skipped[name]
    assert not isinstance(model.model.layers[0].mlp.experts, FP8Experts)


class ListMoE(nn.Module):
    """Per-expert nn.Linear lists (other model code): a router `gate` and `experts.{e}.{w1,w2,w3}`."""

    def __init__(self, hidden=64, inter=32, num_experts=4):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.ModuleDict({"w1": nn.Linear(hidden, inter, bias=False), "w3": nn.Linear(hidden, inter, bias=False), "w2": nn.Linear(inter, hidden, bias=False)})
            for _ in range(num_experts)
        )

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        choice = self.gate(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = choice == e
            if rows.any():
                h = flat[rows]
                out[rows] = expert["w2"](F.silu(expert["w1"](h)) * expert["w3"](h))
        return out.reshape(x.shape)


def test_per_expert_linear_lists_are_swapped_and_an_unrouted_expert_takes_its_siblings_scale():
    torch.manual_seed(0)
    model = ListMoE()
    with torch.no_grad():  # positive inputs: experts 0-2 get positive router logits, expert 3 negative ones
        model.gate.weight.abs_()
        model.gate.weight[3].neg_()
    calibration = [{"x": torch.rand(16, 64)}, {"x": torch.rand(8, 64)}]
    x = torch.rand(5, 64)
    reference = model(x)
    quantize(model, QuantConfig(activation="static"), calibration)
    report = model.fp8kit_report
    assert report.skipped == {"gate": "MoE router gate (routing stays in high precision, as in vLLM and llm-compressor)"}
    assert sorted(report.quantized) == sorted(f"experts.{e}.{w}" for e in range(4) for w in ("w1", "w2", "w3"))
    assert all(isinstance(model.experts[e][w], FP8Linear) for e in range(4) for w in ("w1", "w2", "w3"))
    for w in ("w1", "w2", "w3"):
        siblings = torch.stack([model.experts[e][w].input_scale for e in range(3)])
        assert torch.equal(model.experts[3][w].input_scale, siblings.max()), w
    assert rel(model(x), reference) < 0.2  # per-tensor static scales on a tiny layer of positive inputs


# --------------------------------------------------------------------------- calibration


def test_calibrate_all_experts_gives_every_expert_real_scales_even_when_never_routed():
    model = make_tiny_moe("gpt_oss")
    with torch.no_grad():
        for mlp in moe_layers(model):
            mlp.router.bias[3] = -1e4  # expert 3 is never chosen
    seen = {}
    hooks = [mlp.experts.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, set()).update(a[1].unique().tolist())) for i, mlp in enumerate(moe_layers(model))]
    reference = model(ids()).logits
    for h in hooks:
        h.remove()
    assert all(3 not in s for s in seen.values())

    routed = make_tiny_moe("gpt_oss")
    routed.load_state_dict(model.state_dict())
    quantize(model, QuantConfig(activation="static"), [ids()])
    quantize(routed, QuantConfig(activation="static", calibrate_all_experts=False), [ids()])
    for all_mlp, routed_mlp in zip(moe_layers(model), moe_layers(routed)):
        up_all, down_all = all_mlp.experts.gate_up_proj_input_scale, all_mlp.experts.down_proj_input_scale
        up_routed, down_routed = routed_mlp.experts.gate_up_proj_input_scale, routed_mlp.experts.down_proj_input_scale
        for scale in (up_all, down_all, up_routed, down_routed):
            assert torch.isfinite(scale).all() and (scale > 0).all()
        assert torch.all(up_all == up_all[0])  # every expert saw every token: the layer's input absmax
        assert up_routed[3] == up_routed[:3].max() and down_routed[3] == down_routed[:3].max()  # the documented fallback
        assert len(set(down_all.tolist())) == 4  # expert 3 got its own statistics
    for m in (model, routed):
        assert rel(m(ids()).logits, reference) < 0.15  # calibration itself kept outputs routed


def test_static_input_scales_rules(caplog):
    amax = torch.tensor([2.0, 0.0, 4.0, 0.0])
    tokens = torch.tensor([5, 0, 1, 0])
    assert torch.equal(static_input_scales(amax, tokens, "x"), scaling.amax_to_scale(torch.tensor([2.0, 4.0, 4.0, 4.0])))
    with caplog.at_level(logging.WARNING, logger="fp8kit.core.experts"):
        none_seen = static_input_scales(torch.zeros(3), torch.zeros(3, dtype=torch.int64), "layer.experts.down_proj")
    assert torch.equal(none_seen, torch.full((3,), UNSEEN_FALLBACK_SCALE))
    assert caplog.records[0].getMessage().startswith("layer.experts.down_proj: no expert saw a calibration token")


def test_kv_cache_scales_on_moe_models():
    model = make_tiny_moe("qwen3_moe")
    quantize(model, QuantConfig(activation="static", kv_cache=True), [ids()])
    assert model.fp8kit_report.kv_cache_layers == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(torch.isfinite(layer.self_attn.k_scale) and layer.self_attn.k_scale > 0 for layer in model.model.layers)


# --------------------------------------------------------------------------- whole models


def token_errors(model, config, batch):
    reference = model(batch).logits.double()
    quantize(model, config, [batch] if config.activation == "static" else None)
    out = model(batch).logits.double()
    return ((out - reference).norm(dim=-1) / reference.norm(dim=-1)).flatten()  # (B * T,)


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_logits_error_is_that_of_a_dense_model_of_the_same_size(kind, scheme):
    """The bound comes from a dense Llama of the same size (hidden 64, 2 layers, MLP width 64 = top-2 x 32)
    quantized the same way: per token, an MoE layer runs the same chain of two quantized GEMMs, so
    its median per-token logits error must be of the same size (measured 0.44-1.37x the dense one
    over 3 seeds; bound 1.6x). FP8 noise can flip a discrete top-k routing decision, which changes
    a token's output by far more than rounding does (seen: up to 5% of tokens above 3x the dense
    median error); at most 10% of tokens may do so."""
    config = SCHEMES[scheme]
    dense = token_errors(make_tiny_llama(intermediate_size=64), config, ids()).median()
    errors = token_errors(make_tiny_moe(kind), config, ids())
    assert errors.median() < 1.6 * dense
    assert (errors > 3 * dense).float().mean() <= 0.10


@pytest.mark.parametrize("kind", ["deepseek_v3", "gpt_oss"])
def test_layer_errors_cover_each_expert(kind):
    model = make_tiny_moe(kind)
    errors = layer_errors(model, QuantConfig(), ids(1, 32))
    names = {e.name for e in errors}
    experts = [f"model.layers.{i}.mlp.experts" for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    count = model.config.num_local_experts if kind == "gpt_oss" else model.config.n_routed_experts
    expert_entries = {n for n in names if ".experts." in n}
    assert expert_entries <= {f"{x}.{e}.{p}" for x in experts for e in range(count) for p in ("gate_up_proj", "down_proj")}
    assert len(expert_entries) >= len(experts) * 2 * (count // 2)  # top-2 routing of 32 tokens reaches most experts
    for e in errors:
        assert 15 < e.total_db < 45 and e.total_db <= min(e.weight_only_db, e.activation_only_db) + 1, e


# --------------------------------------------------------------------------- fused gate kernel


def _silu_mul_reference(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up  # in gate_up's dtype, as the unfused experts compute it


@pytest.mark.parametrize(("kind", "scheme", "fused"), [
    ("mixtral", "dynamic-token/w-channel", True), ("qwen3_moe", "dynamic-token/w-channel", True),
    ("gpt_oss", "dynamic-token/w-channel", False), ("mixtral", "dynamic-tensor/w-tensor", False),
])  # fmt: skip
def test_fused_gate_kernel_is_used_only_for_silu_concat_gates_with_per_token_scales(kind, scheme, fused, monkeypatch):
    torch.manual_seed(0)
    module = moe_layers(make_tiny_moe(kind))[0].experts
    fp8 = FP8Experts.from_experts(module, SCHEMES[scheme])
    x, top_k, weights = torch.randn(12, 64), torch.randint(0, module.down_proj.shape[0], (12, 2)), torch.rand(12, 2)
    unfused = fp8(x, top_k, weights)
    calls = []

    def fake_kernel(gate_up):  # the kernel's contract, in torch ops: quantize_per_token(silu(gate) * up)
        calls.append(tuple(gate_up.shape))
        return scaling.quantize_activation(_silu_mul_reference(gate_up), "token")

    monkeypatch.setattr(experts_module, "fused_gate_unavailable_reason", lambda device: None)
    monkeypatch.setattr(kernels, "silu_mul_quantize_per_token", fake_kernel)
    out = fp8(x, top_k, weights)
    assert calls == ([(24, 64)] if fused else [])
    assert torch.equal(out, unfused)


CHILD_SILU = """
import sys, torch
from safetensors.torch import load_file, save_file
from fp8kit.core import kernels
inputs = load_file(sys.argv[2])
outputs = {}
for name, x in inputs.items():
    q, scale = kernels.silu_mul_quantize_per_token(x, out_dtype=torch.float32)
    outputs[name + ".q"], outputs[name + ".scale"] = q, scale
kernels._MAX_ONE_PASS_K, kernels._LOOP_BLOCK_K = 16, 16  # the two-pass (long row) branch
for name, x in inputs.items():
    q, scale = kernels.silu_mul_quantize_per_token(x, out_dtype=torch.float32)
    outputs[name + ".two_pass.q"], outputs[name + ".two_pass.scale"] = q, scale
save_file(outputs, sys.argv[3])
"""


def test_silu_mul_quantize_kernel_matches_torch_under_the_interpreter(tmp_path):
    g = torch.Generator().manual_seed(3)
    inputs = {
        f"{dtype}-{m}x{n}": (torch.randn(m, 2 * n, generator=g) * torch.exp2(torch.randint(-6, 6, (m, 1), generator=g).float())).to(dtype)
        for dtype in (torch.bfloat16, torch.float32)
        for m, n in ((5, 48), (3, 100), (1, 32))
    }
    out = run_interpreted(CHILD_SILU, tmp_path, inputs, {})
    for name, x in inputs.items():
        gate, up = x.float().chunk(2, dim=-1)
        # The kernel's formula: silu = g / (1 + exp(-g)) in fp32 rounded to x's dtype, times up, rounded.
        h = ((gate / (1 + torch.exp(-gate))).to(x.dtype).float() * up).to(x.dtype)  # (M, N)
        scale = scaling.rowwise_scale(h)
        # fp32: exact but for exp's last bits. bf16: the interpreter truncates fp32 -> bf16 casts (the
        # GPU rounds to nearest; tests/core/test_experts_cuda.py checks that), so up to 2 ulps there.
        ulp = 2 * 2**-7 if x.dtype == torch.bfloat16 else 2**-22
        for variant in ("", ".two_pass"):
            torch.testing.assert_close(out[name + variant + ".scale"], scale, rtol=ulp, atol=0)
            expected = (h.float() / scale).clamp(-448, 448)
            torch.testing.assert_close(out[name + variant + ".q"], expected, rtol=2 * ulp, atol=ulp)
        # ... and torch's F.silu(gate) * up (what the unfused experts compute) within a few ulps.
        unfused = _silu_mul_reference(x)
        torch.testing.assert_close(out[name + ".scale"], scaling.rowwise_scale(unfused), rtol=4 * ulp, atol=0)
