"""The fused skinny-M FP8 linear (`kernels.fused_linear`) on CPU under Triton's interpreter, and its dispatch
(`skinny`, `FP8Linear`) on CPU. The GPU half is in test_kernels_cuda.py.

The kernel runs in a TRITON_INTERPRET=1 subprocess (see test_kernels.py). Its FP8 cast there goes through
the kernel's EMULATE_CAST rounding (the interpreter's own cast does not carry a rounding into the
exponent), so the quantized activation is the torch reference's exactly, and the output must match a
float64 GEMM of the torch-quantized operands to fp32 accumulation accuracy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fp8kit.core import FP8Linear, QuantConfig, kernels, scaling, skinny
from triton_interpreter import run_interpreted

# name: M, N, K, activation, weight granularity, bias, tiles, out dtype. K not a multiple of block_k,
# odd M and N, M above 16 (BLOCK_M 32), split-K with a ragged last split, per-tensor / per-channel weights.
CASES = {
    "token-m1": (1, 48, 100, "token", "channel", True, dict(block_n=32, block_k=64, amax_block=64), "float32"),
    "token-m7-split3": (7, 70, 300, "token", "channel", False, dict(block_n=32, block_k=64, split_k=3), "float32"),
    "token-m20-bm32": (20, 40, 96, "token", "tensor", True, dict(block_n=16, block_k=32, split_k=2), "float32"),
    "tensor-m5-split2": (5, 33, 160, "tensor", "tensor", True, dict(block_n=16, block_k=64, split_k=2), "float32"),
    "tensor-m16": (16, 64, 256, "tensor", "channel", False, dict(block_n=64, block_k=128, amax_block=256), "float32"),
    "token-m12-rows": (12, 48, 200, "token", "channel", False, dict(block_n=16, block_k=32, amax_block=256, amax_stages=2), "float32"),
    "static-m3": (3, 50, 130, "static", "tensor", True, dict(block_n=32, block_k=64, split_k=2), "float32"),
    "static-m16-exact": (16, 32, 64, "static", "channel", False, dict(block_n=32, block_k=32, exact_div=True), "float32"),
    "token-m3-exact": (3, 40, 160, "token", "tensor", True, dict(block_n=16, block_k=64, split_k=2, exact_div=True), "float32"),
    "fp8-token-m9": (9, 40, 200, "fp8", "channel", True, dict(block_n=32, block_k=64, split_k=4), "float32"),
    "fp8-tensor-m2": (2, 24, 48, "fp8-tensor", "tensor", False, dict(block_n=16, block_k=32), "float32"),
    "token-m4-bf16": (4, 40, 96, "token", "channel", True, dict(block_n=32, block_k=32), "bfloat16"),
}

CHILD = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from fp8kit.core import kernels
spec = json.load(open(sys.argv[1]))
t = load_file(sys.argv[2])
outputs = {}
for name, (m, n, k, act, wgran, bias, tiles, out_dtype) in spec.items():
    out = torch.full((m, n), float("nan"), dtype=getattr(torch, out_dtype))
    x_scale = t.get(name + ".x_scale")
    result = kernels.fused_linear(
        t[name + ".x"], t[name + ".wq"], t[name + ".ws"], "fp8" if act.startswith("fp8") else act,
        x_scale=x_scale, bias=t.get(name + ".bias"), out_dtype=out.dtype, tiles=kernels.FusedTiles(**tiles), out=out,
    )
    if result is not out:
        raise SystemExit(name + ": out was not used")
    outputs[name] = out
    outputs[name + ".counters"] = kernels._fused_workspace[torch.device("cpu")][1].clone()
save_file(outputs, sys.argv[3])
"""


def kernel_quantize(x: torch.Tensor, scale: torch.Tensor, exact_div: bool) -> torch.Tensor:
    """The kernel's FP8 activation: ``cast(clamp(x / s))`` (exact_div), else ``cast(clamp(x * (1 / s)))``
    with the IEEE reciprocal and an fp32 multiply, as the kernel computes it by default."""
    if exact_div:
        return scaling.quantize(x, scale)
    inverse = torch.ones_like(scale) / scale
    return (x.float() * inverse).clamp(-scaling.FP8_MAX, scaling.FP8_MAX).to(scaling.FP8_DTYPE)


def case_tensors(name: str) -> dict[str, torch.Tensor]:
    """Inputs of a case, plus the torch-reference quantized activation (xq, xs) it must reproduce."""
    m, n, k, act, wgran, bias, _, _ = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-8, 8, (m, 1), generator=g).float())
    x[:, ::9] = 0.0
    x = x.to(torch.bfloat16)
    wq, ws = scaling.quantize_weight(torch.randn(n, k, generator=g) * k**-0.5, wgran)
    t = {name + ".wq": wq, name + ".ws": ws}
    if bias:
        t[name + ".bias"] = (torch.randn(n, generator=g) * 2).to(torch.bfloat16)
    if act == "static":
        xs = scaling.tensor_scale(x) * 0.75  # the largest values clamp at 448
        t[name + ".x_scale"] = xs
    else:
        xs = scaling.rowwise_scale(x) if act in ("token", "fp8") else scaling.tensor_scale(x)
    xq = kernel_quantize(x, xs, CASES[name][6].get("exact_div", False))
    if act.startswith("fp8"):
        t[name + ".x"], t[name + ".x_scale"] = xq, xs
    else:
        t[name + ".x"] = x
    t[name + ".ref_xq"], t[name + ".ref_xs"] = xq, xs
    return t


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case run through `kernels.fused_linear` in a TRITON_INTERPRET=1 subprocess: (inputs, outputs)."""
    tensors = {}
    for name in CASES:
        tensors.update(case_tensors(name))
    inputs = {key: value for key, value in tensors.items() if ".ref_" not in key}
    return tensors, run_interpreted(CHILD, tmp_path_factory.mktemp("fused"), inputs, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_fused_linear_matches_float64_of_the_quantized_operands(interpreted, name):
    tensors, outputs = interpreted
    m, n, k, act, _, _, _, out_dtype = CASES[name]
    out = outputs[name]
    assert out.shape == (m, n) and out.dtype == getattr(torch, out_dtype)
    assert not out.isnan().any(), "unwritten (NaN-poisoned) elements remain"
    xq64 = tensors[name + ".ref_xq"].double() * tensors[name + ".ref_xs"].double()
    w64 = tensors[name + ".wq"].double() * tensors[name + ".ws"].double()
    ref = xq64 @ w64.t()
    magnitude = xq64.abs() @ w64.abs().t()
    bias = tensors.get(name + ".bias")
    if bias is not None:
        ref, magnitude = ref + bias.double(), magnitude + bias.double().abs()
    # fp32 products and sums (K + 3 roundings of 2^-24 relative to the magnitude), then the output cast:
    # exact for fp32; the interpreter's bf16 cast truncates (a whole ulp, 2^-7 relative).
    cast = 2**-7 * ref.abs() if out.dtype == torch.bfloat16 else 0
    bound = 2**-24 * (k + 3) * magnitude + cast
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    # Not the unquantized product: the activation really was quantized (its error is far above the bound).
    if not act.startswith("fp8") and out.dtype == torch.float32:
        x64 = tensors[name + ".x"].double()
        unquantized = x64 @ w64.t() + (0 if bias is None else bias.double())
        assert (out.double() - unquantized).abs().max() > 8 * bound.max()


def test_split_k_leaves_its_counters_at_zero(interpreted):
    _, outputs = interpreted
    for name, case in CASES.items():
        if case[6].get("split_k", 1) > 1:
            assert torch.equal(outputs[name + ".counters"], torch.zeros_like(outputs[name + ".counters"])), name


def test_fused_linear_rejects_bad_inputs_with_clear_messages():
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    w = torch.zeros(32, 64, dtype=torch.float8_e4m3fn)
    one = torch.ones(())
    with pytest.raises(ValueError, match=r"^fused_linear: expected x \[M, K\] and an fp8 weight \[N, K\], got x torch.bfloat16 \(2, 64\) and weight torch.bfloat16 \(32, 64\)$"):
        kernels.fused_linear(x, w.bfloat16(), one, "token")
    with pytest.raises(ValueError, match=r"^fused_linear: activation 'static' needs x_scale fp32 \[\] \(or \[M, 1\] for 'fp8'\) on cpu$"):
        kernels.fused_linear(x, w, one, "static")
    with pytest.raises(ValueError, match=r"^fused_linear: weight_scale must be fp32 with 1 or 32 elements on cpu, got torch.float32 \(31, 1\)$"):
        kernels.fused_linear(x, w, torch.ones(31, 1), "token")
    with pytest.raises(ValueError, match=r"^fused_plan: activation must be one of \['static', 'tensor', 'token', 'fp8'\], got 'group'$"):
        kernels.fused_linear(x, w, one, "group")
    with pytest.raises(ValueError, match=r"^fused_plan: needs 1 <= M <= 64 and N, K >= 1, got M x N x K = 65 x 32 x 64$"):
        kernels.fused_linear(torch.zeros(65, 64), w, one, "token")
    with pytest.raises(ValueError, match=r"^fused_plan: activation 'fp8' takes x of dtype"):
        kernels.fused_linear(x, w, one, "fp8", x_scale=one)
    with pytest.raises(ValueError, match=r"^fused_linear: bias must have 32 elements on cpu, got \(31,\)$"):
        kernels.fused_linear(x, w, one, "token", bias=torch.zeros(31))


def test_shape_classes_and_schemes():
    assert skinny.shape_class(1024, 4096) == "small"  # Llama-3-8B k / v
    assert skinny.shape_class(4096, 4096) == "square"  # q / o
    assert skinny.shape_class(6144, 4096) == "square"  # fused qkv
    assert skinny.shape_class(14336, 4096) == "wide"  # gate / up
    assert skinny.shape_class(4096, 14336) == "deep"  # down
    assert skinny.scheme_of("static", "tensor", "tensor") == "static"
    assert skinny.scheme_of("dynamic", "token", "channel") == "token"
    assert skinny.scheme_of("dynamic", "tensor", "channel") == "tensor"
    assert skinny.scheme_of("dynamic", "group", "block") is None


def test_rule_for_follows_the_table(monkeypatch):
    rule = skinny.Rule(max_m=8, tiles=kernels.FusedTiles())
    monkeypatch.setattr(skinny, "TABLE", {("token", "wide"): rule})
    assert skinny.rule_for("token", 8, 14336, 4096) is rule
    assert skinny.rule_for("token", 9, 14336, 4096) is None  # above the rule's M
    assert skinny.rule_for("token", 1, 4096, 14336) is None  # another class: not measured, existing path
    assert skinny.rule_for("static", 1, 14336, 4096) is None
    monkeypatch.setattr(skinny, "ENABLED", False)
    assert skinny.rule_for("token", 1, 14336, 4096) is None


def test_auto_split_k_fills_the_gpu(monkeypatch):
    monkeypatch.setattr(kernels, "_sms", {torch.device("cuda", 0): 132})
    rule = skinny.Rule(max_m=16, tiles=kernels.FusedTiles(block_n=64, block_k=128, split_k=0), programs_per_sm=1.0)
    dev = torch.device("cuda", 0)
    assert skinny._tiles(rule, 4096, 14336, dev).split_k == 2  # 64 tiles -> 2 splits (128 programs)
    assert skinny._tiles(rule, 1024, 4096, dev).split_k == 8  # 16 tiles -> 8 (the cap)
    assert skinny._tiles(rule, 14336, 4096, dev).split_k == 1  # 224 tiles already fill it
    assert skinny._tiles(rule, 1024, 256, dev).split_k == 1  # 2 K blocks: no split below 2 blocks each


def test_fp8linear_on_cpu_never_plans_the_fused_kernel(monkeypatch):
    def spy(*args, **kwargs):
        raise AssertionError("skinny.plan_for was called for a CPU input")

    monkeypatch.setattr(skinny, "plan_for", spy)
    monkeypatch.setattr(skinny, "TABLE", {("token", "small"): skinny.Rule(max_m=16, tiles=kernels.FusedTiles())})
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    module = FP8Linear.from_linear(linear, QuantConfig(weight="channel", activation_granularity="token"))
    wq, ws = scaling.quantize_weight(linear.weight.detach(), "channel")
    xq, xs = scaling.quantize_activation(x.reshape(-1, 64), "token")
    expected = scaling.fp8_matmul(xq, wq, xs, ws, bias=linear.bias.detach(), out_dtype=torch.bfloat16)
    assert torch.equal(module(x), expected.reshape(2, 3, 32))  # the existing path, bit for bit
    assert module._skinny_plans == {}


def test_fp8linear_copies_carry_no_launch_plans():
    module = FP8Linear(64, 32, activation_granularity="token", weight_granularity="channel")
    module._skinny_plans[(1, torch.bfloat16, torch.device("cpu"))] = None
    assert copy.deepcopy(module)._skinny_plans == {}
    assert module._skinny_plans  # the original keeps its own
    module.to(torch.float16)
    assert module._skinny_plans == {}  # a new dtype / device: plan again


def test_plan_modes_follow_the_rule_eagerly_and_under_capture(monkeypatch):
    monkeypatch.setattr(kernels, "unavailable_reason", lambda device: None)  # plan on the CPU (no launch)
    rule = skinny.Rule(16, kernels.FusedTiles(block_n=32, split_k=2), eager="fused", graph="prequant")
    monkeypatch.setattr(skinny, "TABLE", {("token", "small"): rule, ("tensor", "small"): skinny.Rule(16, rule.tiles, graph="existing")})
    common = dict(x_dtype=torch.bfloat16, weight_scale_rows=True, has_bias=False, device=torch.device("cpu"))
    mode, plan = skinny.plan_for("token", 4, 64, 128, **common)
    assert mode == "fused" and plan.activation == "token" and plan.out_dtype == torch.bfloat16
    mode, plan = skinny.plan_for("token", 4, 64, 128, capturing=True, **common)
    assert mode == "prequant" and plan.activation == "fp8"
    assert plan.consts[2] is True  # per-row x scales of the quantize kernel (M > 1)
    assert skinny.plan_for("token", 1, 64, 128, capturing=True, **common)[1].consts[2] is False  # M = 1: one scale
    assert skinny.plan_for("tensor", 4, 64, 128, capturing=True, **common) is None  # "existing"
    assert skinny.plan_for("tensor", 4, 64, 128, **common)[0] == "fused"


def test_direct_calls_take_the_eager_tiles_and_capture_the_graph_tiles(monkeypatch):
    monkeypatch.setattr(kernels, "unavailable_reason", lambda device: None)  # plan on the CPU (no launch)
    shipped = skinny.TABLE
    eager_tiles, graph_tiles = kernels.FusedTiles(block_n=32, split_k=2), kernels.FusedTiles(block_n=16, split_k=4)
    rule = skinny.Rule(16, graph_tiles, graph="prequant", eager_tiles=eager_tiles)
    monkeypatch.setattr(skinny, "TABLE", {("token", "small"): rule})
    common = dict(x_dtype=torch.bfloat16, weight_scale_rows=True, has_bias=False, device=torch.device("cpu"))
    mode, plan = skinny.plan_for("token", 4, 64, 1024, **common)
    assert mode == "fused" and plan.grid == 2 * 2  # 64 / 32 column tiles x 2 splits
    mode, plan = skinny.plan_for("token", 4, 64, 1024, capturing=True, **common)
    assert mode == "prequant" and plan.grid == 4 * 4  # 64 / 16 column tiles x 4 splits
    # Shipped: the dynamic schemes' direct calls on deep layers use fewer programs than their capture mode.
    deep = shipped[("token", "deep")]
    assert deep.eager_tiles.block_n > deep.tiles.block_n and shipped[("static", "deep")].eager_tiles is None


def test_the_shipped_table_covers_every_scheme_and_class():
    for scheme in ("static", "tensor", "token"):
        for cls in ("small", "square", "wide", "deep"):
            rule = skinny.TABLE[(scheme, cls)]
            assert rule.max_m == skinny.MAX_M and rule.eager in skinny.MODES and rule.graph in skinny.MODES


@pytest.mark.parametrize("scheme", ["static", "tensor", "token"])
def test_skinny_linear_operator_passes_opcheck_and_compiles_without_graph_breaks(scheme):
    # The operator torch.compile calls for FP8Linear at decode sizes. On the CPU it takes the existing
    # path, so it must equal that path bit for bit, eagerly and compiled (fullgraph: no graph break).
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    config = QuantConfig(activation="static") if scheme == "static" else QuantConfig(weight="channel", activation_granularity=scheme)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    module = FP8Linear.from_linear(linear, config, scaling.tensor_scale(x) if scheme == "static" else None)
    args = (x, module.weight, module.weight_scale, module.input_scale, module.bias, scheme, False)
    torch.library.opcheck(torch.ops.fp8kit.skinny_linear.default, args, test_utils=("test_faketensor",))
    expected = module(x)  # CPU: the existing path
    assert torch.equal(torch.ops.fp8kit.skinny_linear(*args), expected)
    compiled = torch.compile(lambda *a: torch.ops.fp8kit.skinny_linear(*a), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args), expected)


def test_compiled_fp8linear_calls_the_operator_where_the_table_has_a_rule(monkeypatch):
    # While torch.compile traces FP8Linear, a CUDA input of M <= MAX_M with a rule goes to
    # fp8kit::skinny_linear (whose tracing the test above covers). Here on the CPU: the input pretends to
    # be on CUDA, tracing is pretended, and the operator is a recorder.
    calls = []

    def record(x, weight, weight_scale, input_scale, bias, scheme, fast_accum):
        calls.append((tuple(x.shape), scheme, fast_accum))
        return x.new_zeros(x.shape[0], weight.shape[0])

    module = FP8Linear.from_linear(nn.Linear(64, 48).to(torch.bfloat16), QuantConfig(weight="channel", activation_granularity="token"))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch.ops.fp8kit, "skinny_linear", record, raising=False)
    monkeypatch.setattr(skinny, "TABLE", {("token", "small"): skinny.Rule(max_m=16, tiles=kernels.FusedTiles())})
    assert module(torch.randn(2, 3, 64, dtype=torch.bfloat16)).shape == (2, 3, 48)
    assert calls == [((6, 64), "token", False)]
    monkeypatch.setattr(skinny, "TABLE", {})  # no rule: the torch ops path
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: False))
    module(torch.randn(6, 64, dtype=torch.bfloat16))
    assert len(calls) == 1
