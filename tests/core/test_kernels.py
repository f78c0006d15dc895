"""fp8kit.core.kernels on CPU, under Triton's interpreter, against the torch reference in `scaling`.

The interpreter must be switched on (TRITON_INTERPRET=1) before triton is first imported, so the
kernels run in one subprocess per module: the inputs go there and the results come back as
safetensors files. The interpreter's float8 cast rounds wrongly (127.0 -> 64), so the kernels run
with ``out_dtype=torch.float32``: they then store the clamped ``x / scale`` they would cast, and
the scales; both must equal the torch reference bit for bit. The FP8 cast itself is tested on the
GPU (test_kernels_cuda.py).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fp8kit.core import FP8Linear, QuantConfig, kernels, scaling
from triton_interpreter import run_interpreted

NAN, INF = float("nan"), float("inf")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Block sizes small enough that small tensors take the looping / multi-block / two-launch paths.
SMALL_BLOCKS = {
    "_MAX_ONE_PASS_K": 64, "_LOOP_BLOCK_K": 32, "_SMALL_NUMEL": 0, "_FLAT_BLOCK_SMALL": 128,
    "_GROUP_TILE_K": 64, "_GROUP_TILE": 128,  # per-group: one group per tile column, several row tiles
}  # fmt: skip
# Per-tensor one-launch kernel: several amax steps per program, several programs.
SMALL_ONE_LAUNCH = {"_SMALL_BLOCK_A": 256, "_SMALL_SLICE": 64}
KNOBS = (
    "_MAX_ONE_PASS_K", "_LOOP_BLOCK_K", "_SMALL_NUMEL", "_FLAT_BLOCK_SMALL", "_SMALL_BLOCK_A", "_SMALL_SLICE",
    "_GROUP_TILE_K", "_GROUP_TILE", "_SPLIT_ROW_MIN_K", "_SPLIT_ROW_SLICE", "_SPLIT_ROW_PER_SM",
)  # fmt: skip
# Per-token rows split over several programs (the decode-size kernel), slices not dividing K.
SPLIT_ROWS = {"_SPLIT_ROW_MIN_K": 64, "_SPLIT_ROW_SLICE": 64, "_SPLIT_ROW_PER_SM": 1000}
GROUP_OPS = {"group": 128, "group32": 32}  # per-group quantization and its group size

CHILD = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from fp8kit.core import kernels
spec = json.load(open(sys.argv[1]))
inputs = load_file(sys.argv[2])
outputs = {}
defaults = {name: getattr(kernels, name) for name in json.loads(sys.argv[4])}
for name, case in spec.items():
    for attr, value in {**defaults, **case["overrides"]}.items():
        setattr(kernels, attr, value)
    x = inputs[name]
    if case["transpose"]:
        x = x.t()  # a non-contiguous view
    out = torch.full(x.shape, float("nan")) if case["out"] else None
    for op in case["ops"]:
        if op == "static":
            q = kernels.quantize_static(x, inputs[name + ".static_scale"], out=out, out_dtype=torch.float32)
            scale = inputs[name + ".static_scale"]
        elif op.startswith("group"):
            q, scale = kernels.quantize_per_group(x, int(op[5:] or 128), out=out, out_dtype=torch.float32)
            if scale.shape[0] > 1 and scale.shape[1] > 1 and scale.stride() != (1, scale.shape[0]):
                raise SystemExit(f"{name}: group scales are not column-major: {scale.stride()}")
            scale = scale.contiguous()
        else:
            fn = kernels.quantize_per_token if op == "token" else kernels.quantize_per_tensor
            q, scale = fn(x, out=out, out_dtype=torch.float32)
        if out is not None and q is not out:
            raise SystemExit(f"{name}: out was not used")
        outputs[f"{name}.{op}.q"] = q.clone()
        outputs[f"{name}.{op}.scale"] = scale.clone()
save_file(outputs, sys.argv[3])
"""


def random_input(shape, dtype, seed):
    """Random rows of very different magnitudes (so the scales differ), plus exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 12, (shape[0], 1), generator=g).float())
    x[..., ::7] = 0.0
    return x.to(dtype)


def _special_values() -> torch.Tensor:
    x = random_input((6, 200), torch.bfloat16, seed=11)
    x[1, 150] = NAN  # row 1: NaN amax -> NaN scale -> the whole row NaN (torch.amax propagates NaN)
    x[2, 3] = INF  # row 2: inf scale -> finite values 0, the inf itself NaN
    x[3, 7] = -INF
    return x


def _tiny_and_huge() -> torch.Tensor:
    x = torch.zeros(3, 64, dtype=torch.float32)  # row 0: all zeros -> the 1e-12 floor
    x[1] = 1e-30  # amax below the floor
    x[2, :32] = 3e38  # near fp32 max
    x[2, 32:] = -1e-40  # fp32 subnormals
    return x


def _cases() -> dict[str, dict]:
    """name -> {input, ops, overrides, transpose, out}."""
    cases = {}
    for dname, dtype in DTYPES.items():
        for shape in [(1, 4096), (5, 576), (3, 1536), (9, 100), (2, 14336), (16, 1536)]:
            cases[f"{dname}-{shape[0]}x{shape[1]}"] = dict(input=random_input(shape, dtype, seed=sum(shape)))
    for shape in [(7, 100), (33, 64), (1, 300), (70, 130)]:
        cases[f"small-blocks-{shape[0]}x{shape[1]}"] = dict(
            input=random_input(shape, torch.bfloat16, seed=5 * sum(shape)), overrides=SMALL_BLOCKS
        )
    for shape in [(7, 100), (1, 300), (16, 200)]:
        cases[f"one-launch-{shape[0]}x{shape[1]}"] = dict(
            input=random_input(shape, torch.float16, seed=7 * sum(shape)), overrides=SMALL_ONE_LAUNCH
        )
    for shape in [(1, 300), (5, 576), (16, 200)]:
        cases[f"split-rows-{shape[0]}x{shape[1]}"] = dict(
            input=random_input(shape, torch.bfloat16, seed=3 * sum(shape)), overrides=SPLIT_ROWS
        )
    cases["special-values"] = dict(input=_special_values())
    cases["special-values-split-rows"] = dict(input=_special_values(), overrides=SPLIT_ROWS)
    cases["special-values-one-launch"] = dict(input=_special_values(), overrides=SMALL_ONE_LAUNCH)
    cases["special-values-small-blocks"] = dict(input=_special_values(), overrides=SMALL_BLOCKS)
    no_nan = _special_values()
    no_nan[1, 150] = 1.0
    cases["inf-small-blocks"] = dict(input=no_nan, overrides=SMALL_BLOCKS)
    cases["tiny-and-huge"] = dict(input=_tiny_and_huge())
    cases["empty-rows"] = dict(input=torch.randn(0, 4096, dtype=torch.bfloat16))
    cases["empty-cols"] = dict(input=torch.randn(4, 0, dtype=torch.bfloat16))
    cases["non-contiguous"] = dict(input=random_input((64, 40), torch.bfloat16, seed=2), transpose=True)
    cases["preallocated-out"] = dict(input=random_input((4, 64), torch.float16, seed=4), out=True)
    for case in cases.values():
        case.setdefault("overrides", {})
        case.setdefault("transpose", False)
        case.setdefault("out", False)
        case["ops"] = ["token", "tensor", "static", *GROUP_OPS]
    return cases


CASES = _cases()


def case_input(name: str) -> torch.Tensor:
    x = CASES[name]["input"]
    return x.t() if CASES[name]["transpose"] else x


def static_scale(x: torch.Tensor) -> torch.Tensor:
    return scaling.tensor_scale(x) * 0.75  # 3/4 of the amax scale: the largest values get clamped


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case run through the kernels in a TRITON_INTERPRET=1 subprocess: {key: tensor}."""
    tensors, spec = {}, {}
    for name, case in CASES.items():
        tensors[name] = case["input"]
        tensors[name + ".static_scale"] = static_scale(case_input(name))
        spec[name] = {key: case[key] for key in ("ops", "overrides", "transpose", "out")}
    return run_interpreted(CHILD, tmp_path_factory.mktemp("interpreter"), tensors, spec, json.dumps(KNOBS))


def precast_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What `scaling.quantize` casts to FP8: clamp(x / scale, -448, 448) in fp32."""
    return (x.float() / scale).clamp(-scaling.FP8_MAX, scaling.FP8_MAX)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values, NaN exactly where the reference has NaN, and the same sign of zero."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(actual[actual == 0]), torch.signbit(expected[expected == 0]))


def test_constants_match_scaling():
    assert kernels._FP8_MAX == scaling.FP8_MAX and kernels._AMAX_FLOOR == scaling.AMAX_FLOOR
    assert kernels._FP8_DTYPE == scaling.FP8_DTYPE


def test_amax_to_scale_is_ieee_division():
    # 1/448 is inexact, so a * fl(1/448) (CUDA torch's shortcut for a Python-scalar divisor)
    # differs from the correctly rounded a / 448 for some a: the scale must be the division.
    amax = torch.rand(10000, dtype=torch.float64).float() * 100
    expected = (amax.double() / 448).float()  # float64 quotient rounded once to fp32: exact here
    assert torch.equal(scaling.amax_to_scale(amax), expected)
    assert not torch.equal(amax * torch.tensor(1 / 448, dtype=torch.float32), expected)


@pytest.mark.parametrize("name", list(CASES))
def test_per_token_matches_reference(interpreted, name):
    x = case_input(name)
    expected_scale = scaling.rowwise_scale(x)
    assert_same_bits(interpreted[f"{name}.token.scale"], expected_scale)  # fp32 [M, 1]
    assert_same_bits(interpreted[f"{name}.token.q"], precast_reference(x, expected_scale))


@pytest.mark.parametrize("name", list(CASES))
def test_per_tensor_matches_reference(interpreted, name):
    x = case_input(name)
    expected_scale = scaling.tensor_scale(x)
    assert_same_bits(interpreted[f"{name}.tensor.scale"], expected_scale)  # fp32 []
    assert_same_bits(interpreted[f"{name}.tensor.q"], precast_reference(x, expected_scale))


@pytest.mark.parametrize("name", list(CASES))
def test_static_matches_reference(interpreted, name):
    x = case_input(name)
    assert_same_bits(interpreted[f"{name}.static.q"], precast_reference(x, static_scale(x)))


@pytest.mark.parametrize("op", list(GROUP_OPS))
@pytest.mark.parametrize("name", list(CASES))
def test_per_group_matches_reference(interpreted, name, op):
    x = case_input(name)
    block = (1, GROUP_OPS[op])
    expected_scale = scaling.block_scale(x, block)  # fp32 [M, ceil(K / group)]
    assert_same_bits(interpreted[f"{name}.{op}.scale"], expected_scale)
    per_element = scaling.expand_block_scale(expected_scale, tuple(x.shape), block)  # (M, K)
    assert_same_bits(interpreted[f"{name}.{op}.q"], precast_reference(x, per_element))


def test_nan_makes_its_row_or_the_whole_tensor_nan(interpreted):
    # The torch reference (checked against above) propagates NaN through amax; make it explicit.
    for name in ("special-values", "special-values-small-blocks", "special-values-one-launch"):
        token_q, token_scale = interpreted[f"{name}.token.q"], interpreted[f"{name}.token.scale"]
        assert token_scale[1].isnan() and token_q[1].isnan().all() and not token_q[0].isnan().any()
        assert token_scale[2].isinf() and token_q[2, 3].isnan() and (token_q[2, 4:] == 0).all()
        assert interpreted[f"{name}.tensor.scale"].isnan() and interpreted[f"{name}.tensor.q"].isnan().all()
    assert interpreted["tiny-and-huge.token.scale"][0].item() == pytest.approx(1e-12 / 448)


def test_bad_inputs_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match=r"quantize_per_token: expected a 2-D activation \[M, K\], got shape \(2, 3, 4\)"):
        kernels.quantize_per_token(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="quantize_per_tensor: input dtype torch.int32 is not supported"):
        kernels.quantize_per_tensor(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="quantize_per_group: group_size must be a power of two >= 16, got 96"):
        kernels.quantize_per_group(torch.zeros(2, 192), 96)
    with pytest.raises(ValueError, match="quantize_static: scale must be one float32 element on cpu"):
        kernels.quantize_static(torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float8_e4m3fn tensor of shape \(2, 3\)"):
        kernels.quantize_per_token(torch.zeros(2, 3), out=torch.empty(3, 2, dtype=torch.float8_e4m3fn))


def test_unavailable_reason():
    assert kernels.unavailable_reason(torch.device("cpu")) == "Triton FP8 kernels need a CUDA device, not 'cpu'"
    assert kernels.unavailable_reason("meta") == "Triton FP8 kernels need a CUDA device, not 'meta'"


def test_quantize_activation_on_cpu_is_the_torch_reference(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a Triton kernel was called on CPU")

    for name in ("quantize_per_token", "quantize_per_tensor", "quantize_static"):
        monkeypatch.setattr(kernels, name, fail)
    x = random_input((5, 48), torch.bfloat16, seed=9)
    q, scale = scaling.quantize_activation(x, "token")
    assert torch.equal(scale, scaling.rowwise_scale(x))
    assert torch.equal(q.view(torch.uint8), scaling.quantize(x, scale).view(torch.uint8))
    q, scale = scaling.quantize_activation(x)
    assert torch.equal(scale, scaling.tensor_scale(x))
    static = torch.tensor(0.01)
    q, scale = scaling.quantize_activation(x, "token", scale=static)  # a scale means static
    assert scale is static and torch.equal(q.view(torch.uint8), scaling.quantize(x, static).view(torch.uint8))
    with pytest.raises(ValueError, match="granularity must be 'tensor', 'token' or 'group', got 'channel'"):
        scaling.quantize_activation(x, "channel")


@pytest.mark.parametrize(
    "config, kernel",
    [
        (QuantConfig(), "quantize_per_tensor"),
        (QuantConfig(activation_granularity="token"), "quantize_per_token"),
        (QuantConfig(activation="static"), "quantize_static"),
    ],
    ids=["dynamic-tensor", "dynamic-token", "static"],
)
def test_fp8linear_dispatches_to_the_kernels_when_available(monkeypatch, config, kernel):
    # Pretend the kernels can run, and stand in for them with the torch reference: FP8Linear must
    # reach them through scaling.quantize_activation / quantize_weight, once per call.
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    input_scale = scaling.tensor_scale(x) if config.activation == "static" else None
    expected = FP8Linear.from_linear(linear, config, input_scale)(x)
    calls = []
    stand_ins = {
        "quantize_per_tensor": lambda t: (scaling.quantize(t, scaling.tensor_scale(t)), scaling.tensor_scale(t)),
        "quantize_per_token": lambda t: (scaling.quantize(t, scaling.rowwise_scale(t)), scaling.rowwise_scale(t)),
        "quantize_static": lambda t, s: scaling.quantize(t, s),
    }
    for name, fn in stand_ins.items():
        monkeypatch.setattr(kernels, name, lambda *a, _n=name, _f=fn: calls.append((_n, a[0].shape)) or _f(*a))
    monkeypatch.setattr(kernels, "unavailable_reason", lambda device: None)
    fp8 = FP8Linear.from_linear(linear, config, input_scale)
    assert calls == [("quantize_per_tensor", (32, 64))]  # the weight, per tensor
    calls.clear()
    out = fp8(x)
    assert calls == [(kernel, (15, 64))]
    assert torch.equal(out, expected)


def test_unavailable_reason_is_computed_once_per_cuda_device(monkeypatch):
    # Pretend two CUDA devices: an H100 (9.0) and an A100 (8.0); the facts are queried once each.
    capability_calls = []

    def capability(index):
        capability_calls.append(index)
        return {0: (9, 0), 1: (8, 0)}[index]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU{index}")
    monkeypatch.setattr(kernels, "_reasons", {})
    monkeypatch.setattr(kernels, "_import_error", None)
    for _ in range(3):
        assert kernels.unavailable_reason(torch.device("cuda", 0)) is None
        assert kernels.unavailable_reason(torch.device("cuda", 1)) == (
            "GPU1 has compute capability 8.0; FP8 kernels need 8.9 or newer"
        )
        assert kernels.unavailable_reason("cuda") == kernels.unavailable_reason("cuda:1")  # current device
    assert capability_calls == [0, 1]
    monkeypatch.setattr(kernels, "_reasons", {})
    monkeypatch.setattr(kernels, "_import_error", "ImportError: no triton")
    assert kernels.unavailable_reason(torch.device("cuda", 0)) == (
        "triton is not importable (ImportError: no triton); install triton to use the FP8 kernels"
    )


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: records direct launches."""

    def __init__(self, launches):
        self.function, self.packed_metadata = "fn-handle", "packed"
        self.run = lambda *a: launches.append(("direct", a))

    def launch_metadata(self, grid, stream, *args):
        return ("meta", grid, stream, len(args))


class _FakeJIT:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, num_warps=...)` (Triton's launcher)."""

    def __init__(self, launches):
        self.launches = launches

    def __getitem__(self, grid):
        def launch(*args, num_warps):
            self.launches.append(("triton", grid, args, num_warps))
            return _FakeCompiled(self.launches)

        return launch


def test_launch_goes_direct_only_for_an_already_compiled_specialization(monkeypatch):
    launches = []
    kernel = _FakeJIT(launches)
    hooks = SimpleNamespace(launch_enter_hook="enter", launch_exit_hook="exit")
    driver = SimpleNamespace(ok=True, current_device=lambda: 0, current_stream=lambda dev: 1234, runtime=hooks)
    monkeypatch.setattr(kernels, "_driver", driver)
    monkeypatch.setattr(kernels, "_launchers", {})
    cuda = torch.device("cuda", 0)
    buf = torch.zeros(4096, dtype=torch.bfloat16)
    x = buf[:64 * 32].view(64, 32)  # 16-byte aligned
    x_misaligned = buf[1 : 1 + 64 * 32].view(64, 32)  # 2 bytes off
    consts = (kernels._FLOOR_BITS, 1, 32, True)

    def launch(args, warps=4, grid=64):
        launches.clear()
        kernels._launch(kernel, grid, args, consts, warps, cuda)
        return launches[0][0]

    assert launch((x, buf, buf, 64, 32)) == "triton"  # first: compiles through Triton
    assert launch((x, buf, buf, 64, 32), grid=3) == "direct"
    assert launches == [("direct", (3, 1, 1, 1234, "fn-handle", "packed", ("meta", (3, 1, 1), 1234, 9), "enter", "exit",
                                    x, buf, buf, 64, 32, *consts))]  # fmt: skip
    assert launch((x, buf, buf, 48, 32)) == "direct"  # 48: still divisible by 16
    # Anything Triton specializes on differently gets its own compiled kernel:
    assert launch((x, buf, buf, 1, 32)) == "triton"  # M == 1
    assert launch((x, buf, buf, 7, 32)) == "triton"  # M not divisible by 16
    assert launch((x, buf, buf, 64, 2**31)) == "triton"  # a 64-bit int
    assert launch((x_misaligned, buf, buf, 64, 32)) == "triton"  # pointer alignment
    assert launch((x.float(), buf, buf, 64, 32)) == "triton"  # dtype
    assert launch((x, buf, buf, 64, 32), warps=8) == "triton"  # options
    driver.current_device = lambda: 1
    assert launch((x, buf, buf, 64, 32)) == "triton"  # another device
    assert launch((x, buf, buf, 64, 32)) == "direct"
    monkeypatch.setattr(kernels, "DIRECT_LAUNCH", False)
    assert launch((x, buf, buf, 64, 32)) == "triton"
    monkeypatch.setattr(kernels, "DIRECT_LAUNCH", True)
    launches.clear()
    kernels._launch(kernel, 64, (x, buf, buf, 64, 32), consts, 4, torch.device("cpu"))  # the interpreter
    assert launches[0][0] == "triton"
    driver.ok = False  # a Triton without the internals `_launch` relies on
    assert launch((x, buf, buf, 64, 32)) == "triton"


# --- scale epilogue (`kernels.scale_epilogue`, the skinny row-wise GEMM path of `scaling.fp8_matmul`)

EPILOGUE_CHILD = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from fp8kit.core import kernels
spec = json.load(open(sys.argv[1]))
inputs = load_file(sys.argv[2])
outputs = {}
default_block = kernels._EPILOGUE_BLOCK_N
for name, case in spec.items():
    kernels._EPILOGUE_BLOCK_N = case["block_n"] or default_block
    dtype = getattr(torch, case["out_dtype"])
    acc = inputs[name + ".acc"]
    out = torch.full(acc.shape, float("nan"), dtype=dtype) if case["out"] else None
    result = kernels.scale_epilogue(
        acc, inputs[name + ".sa"], inputs[name + ".sb"], inputs.get(name + ".bias"), dtype, out=out
    )
    if out is not None and result is not out:
        raise SystemExit(f"{name}: out was not used")
    outputs[name] = result.clone()
save_file(outputs, sys.argv[3])
"""


def _epilogue_cases() -> dict[str, dict]:
    """name -> {m, n, sa ("tensor" | "row"), sb ("tensor" | "row"), bias dtype or None, out_dtype, block_n, out}."""
    cases = {
        "m1-n100-bias-bf16": dict(m=1, n=100, sa="row", sb="row", bias="bfloat16", out_dtype="float32"),
        "m1-n4096-nobias": dict(m=1, n=4096, sa="row", sb="row", bias=None, out_dtype="bfloat16"),
        "m5-n1000-blocks-wtensor": dict(m=5, n=1000, sa="row", sb="tensor", bias=None, out_dtype="float32", block_n=128),
        "m7-n300-xtensor-bias-fp32": dict(m=7, n=300, sa="tensor", sb="row", bias="float32", out_dtype="bfloat16"),
        "m16-n208-fp16": dict(m=16, n=208, sa="row", sb="row", bias="float16", out_dtype="float16", block_n=64),
        "m3-n48-both-tensor-out": dict(m=3, n=48, sa="tensor", sb="tensor", bias="bfloat16", out_dtype="float32", out=True),
        "m16-n200-w1xN-out": dict(m=16, n=200, sa="row", sb="row-1xN", bias=None, out_dtype="float32", out=True, block_n=64),
    }
    for case in cases.values():
        case.setdefault("block_n", None)
        case.setdefault("out", False)
    return cases


EPILOGUE_CASES = _epilogue_cases()


def epilogue_inputs(name: str, case: dict) -> dict[str, torch.Tensor]:
    """A GEMM accumulator (integers up to K * 448^2 in magnitude, as FP8 products sum to), positive
    scales of very different magnitudes, and a bias."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    m, n = case["m"], case["n"]
    acc = (torch.randn(m, n, generator=g) * 4096 * 448.0**2 / 8).round()
    acc[:, ::9] = 0.0
    tensors = {name + ".acc": acc}

    def scale(rows, kind):
        s = torch.rand(rows, 1, generator=g) * torch.exp2(torch.randint(-24, -12, (rows, 1), generator=g).float())
        s = s + 2**-30
        if kind == "tensor":
            return s[0, 0].clone()
        return s.reshape(1, rows).contiguous() if kind == "row-1xN" else s

    tensors[name + ".sa"] = scale(m, case["sa"])
    tensors[name + ".sb"] = scale(n, case["sb"])
    if case["bias"]:
        tensors[name + ".bias"] = (torch.randn(n, generator=g) * 4).to(getattr(torch, case["bias"]))
    return tensors


@pytest.fixture(scope="module")
def interpreted_epilogue(tmp_path_factory):
    """Every epilogue case run through the kernel in a TRITON_INTERPRET=1 subprocess: (inputs, outputs)."""
    tensors = {}
    for name, case in EPILOGUE_CASES.items():
        tensors.update(epilogue_inputs(name, case))
    return tensors, run_interpreted(EPILOGUE_CHILD, tmp_path_factory.mktemp("epilogue"), tensors, EPILOGUE_CASES)


def epilogue_reference64(acc, sa, sb, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 acc * x_scale[m] * w_scale[n] + bias[n], float64 magnitude |product| + |bias|)."""
    prod = acc.double() * sa.double().reshape(-1, 1) * sb.double().reshape(1, -1)
    bias64 = torch.zeros(()) if bias is None else bias.double()
    return prod + bias64, prod.abs() + bias64.abs()


def assert_epilogue_close(out, acc, sa, sb, bias, label: str, cast_ulps: float = 0.5) -> None:
    ref, magnitude = epilogue_reference64(acc, sa, sb, bias)
    assert not out.isnan().any(), f"{label}: unwritten (NaN-poisoned) elements remain"
    # fp32 math: a few roundings of 2^-24 relative to the terms; then one rounding to out's dtype
    # (round to nearest: half an ulp, eps / 2 relative, plus half its smallest subnormal).
    finfo = torch.finfo(out.dtype)
    bound = 2**-21 * magnitude + cast_ulps * finfo.eps * (ref.abs() + finfo.smallest_normal)
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"{label}: max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("name", list(EPILOGUE_CASES))
def test_scale_epilogue_matches_float64_reference(interpreted_epilogue, name):
    tensors, outputs = interpreted_epilogue
    case = EPILOGUE_CASES[name]
    out = outputs[name]
    acc, sa, sb = tensors[name + ".acc"], tensors[name + ".sa"], tensors[name + ".sb"]
    bias = tensors.get(name + ".bias")
    assert out.dtype == getattr(torch, case["out_dtype"]) and out.shape == (case["m"], case["n"])
    # The interpreter's fp32 -> bf16 cast truncates (1.0 + 3 * 2^-9 -> 1.0): a whole ulp here; the
    # GPU tests check round-to-nearest.
    assert_epilogue_close(out, acc, sa, sb, bias, name, cast_ulps=1.0 if out.dtype == torch.bfloat16 else 0.5)
    if bias is not None:  # the bias really was added (the bound above is far tighter than the bias)
        no_bias, _ = epilogue_reference64(acc, sa, sb, None)
        assert (out.double() - no_bias).abs().max() > 0.5


def test_scale_epilogue_rejects_bad_inputs_with_clear_messages():
    acc = torch.zeros(4, 32)
    one = torch.ones(())
    with pytest.raises(ValueError, match=r"^scale_epilogue: acc must be a 2-D float32 tensor, got torch.bfloat16 \(4, 32\)$"):
        kernels.scale_epilogue(acc.bfloat16(), one, one)
    with pytest.raises(ValueError, match=r"^scale_epilogue: out_dtype must be bfloat16, float16 or float32, got torch.float8_e4m3fn$"):
        kernels.scale_epilogue(acc, one, one, out_dtype=torch.float8_e4m3fn)
    msg = r"^scale_epilogue: weight_scale must be float32 with 1 or 32 elements on cpu, got torch.float32 \(31, 1\) on cpu$"
    with pytest.raises(ValueError, match=msg):
        kernels.scale_epilogue(acc, one, torch.ones(31, 1))
    with pytest.raises(ValueError, match=r"^scale_epilogue: x_scale must be float32 with 1 or 4 elements on cpu"):
        kernels.scale_epilogue(acc, one.double(), one)
    with pytest.raises(ValueError, match=r"^scale_epilogue: bias must have 32 bf16 / fp16 / fp32 elements on cpu"):
        kernels.scale_epilogue(acc, one, one, torch.zeros(16))
    with pytest.raises(ValueError, match=r"^scale_epilogue: out must be a contiguous torch.bfloat16 tensor of shape \(4, 32\)"):
        kernels.scale_epilogue(acc, one, one, out=torch.empty(4, 32))


def _fp8_operands(m, n, k, seed, x_rowwise=True, w_rowwise=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-6, 6, (m, 1), generator=g).float())
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-6, 6, (n, 1), generator=g).float())
    xs = scaling.rowwise_scale(x) if x_rowwise else scaling.tensor_scale(x)
    ws = scaling.rowwise_scale(w) if w_rowwise else scaling.tensor_scale(w)
    return scaling.quantize(x, xs), scaling.quantize(w, ws), xs, ws


@pytest.mark.parametrize("x_rowwise, w_rowwise", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("bias", [None, torch.bfloat16], ids=["no-bias", "bias"])
def test_skinny_rowwise_torch_ops_path_matches_float64(x_rowwise, w_rowwise, bias):
    # The `torch.compile` branch of the skinny path (plain torch ops), run eagerly on CPU.
    xq, wq, xs, ws = _fp8_operands(7, 48, 64, seed=3, x_rowwise=x_rowwise, w_rowwise=w_rowwise)
    b = None if bias is None else (torch.randn(48, generator=torch.Generator().manual_seed(1)) * 4).to(bias)
    out = scaling._skinny_rowwise_matmul(xq, wq, xs, ws, b, torch.float32, False, compiling=True)
    assert out.dtype == torch.float32 and out.shape == (7, 48)
    assert_gemm_close(out, xq, wq, xs, ws, b, "torch-ops")


def assert_gemm_close(out, xq, wq, xs, ws, bias, label: str) -> None:
    """`out` vs the float64 ``(xq * xs) @ (wq * ws).T + bias``: fp32 accumulation of K terms (K
    roundings of 2^-24 relative to the sum of |terms|), the epilogue's few roundings, out's cast."""
    k = xq.shape[1]
    sa, sb = xs.double().reshape(-1, 1), ws.double().reshape(1, -1)
    ref = (xq.double() @ wq.double().t()) * sa * sb
    abs_sum = (xq.double().abs() @ wq.double().abs().t()) * sa * sb
    bias64 = torch.zeros(()) if bias is None else bias.double()
    ref = ref + bias64
    finfo = torch.finfo(out.dtype)
    bound = (k + 4) * 2**-24 * abs_sum + 2**-22 * bias64.abs() + finfo.eps / 2 * (ref.abs() + finfo.smallest_normal)
    assert not out.isnan().any(), f"{label}: unwritten (NaN-poisoned) elements remain"
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"{label}: max excess {(err - bound).max().item()}"


def test_fp8_matmul_on_cpu_never_takes_the_skinny_path(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "scale_epilogue", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(scaling, "_skinny_rowwise_matmul", lambda *a, **k: calls.append(a))
    xq, wq, xs, ws = _fp8_operands(1, 32, 64, seed=5)
    out = scaling.fp8_matmul(xq, wq, xs, ws, out_dtype=torch.float32)
    assert calls == []
    assert_gemm_close(out, xq, wq, xs, ws, None, "cpu")


@pytest.mark.parametrize(("m", "k", "split"), [(1, 14336, 14), (16, 14336, 14), (16, 4096, 0), (64, 14336, 0), (1, 20000, 0)])
def test_per_token_splits_rows_at_decode_sizes_only(monkeypatch, m, k, split):
    # Which kernel quantize_per_token launches (132 SMs): rows of >= 8192 columns split into 1024-column
    # slices while the grid stays within 2 programs per SM; else (and above _MAX_ONE_PASS_K) a row per program.
    launches = []
    monkeypatch.setattr(kernels, "_num_sms", lambda device: 132)
    monkeypatch.setattr(kernels, "_launch", lambda kernel, grid, args, consts, *rest: launches.append((kernel, grid, consts)))
    kernels.quantize_per_token(torch.randn(m, k, dtype=torch.bfloat16))
    ((kernel, grid, consts),) = launches
    if split:
        assert kernel is kernels._build().per_token_split and grid == m * split and consts[1] == split
    else:
        assert kernel is kernels._build().per_token
