"""Backends: stable ids, numerics against FP8Linear / float64, and "not run" rows with the reason."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from fp8kit.bench import LinearWorkload, TimingConfig, get_backend, parse_backends, run_benchmarks, sqnr_db
from fp8kit.bench.backends import FP8Backend, GraphTimed, OrtCpuBackend, TensorRTBackend, TorchaoBackend, TorchBackend
from fp8kit.bench.workloads import TORCHAO_BACKENDS
from fp8kit.core.config import QuantConfig
from fp8kit.core.errors import ConfigError
from fp8kit.core.linear import FP8Linear

FAST = TimingConfig(warmup=1, min_runs=2, max_runs=3, budget_ms=1.0)
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "backend_id,cls,weight,granularity,compiled",
    [
        ("torch-bf16", TorchBackend, None, None, False),
        ("torch-fp32-compiled", TorchBackend, None, None, True),
        ("fp8-dynamic-tensor", FP8Backend, "tensor", "tensor", False),
        ("fp8-dynamic-token", FP8Backend, "channel", "token", False),
        ("fp8-dynamic-token-wtensor", FP8Backend, "tensor", "token", False),
        ("fp8-dynamic-group-fastacc", FP8Backend, "block", "group", False),
        ("fp8-static-tensor-wchannel-fastacc-compiled", FP8Backend, "channel", "tensor", True),
        ("ort-cpu", OrtCpuBackend, None, None, False),
        ("tensorrt-fp8", TensorRTBackend, None, None, False),
        ("fp8-dynamic-token-graph", GraphTimed, None, None, False),
    ],
)
def test_ids_round_trip(backend_id, cls, weight, granularity, compiled):
    backend = get_backend(backend_id)
    assert isinstance(backend, cls)
    assert backend.id == backend_id
    assert backend.compiled == compiled
    if isinstance(backend, FP8Backend):
        assert backend.config.weight == weight
        assert backend.config.activation_granularity == granularity


@pytest.mark.parametrize("bad", ["fp8-static-token", "fp8-static-group", "fp8-dynamic-group-wtensor", "fp8-dynamic-row", "torch-int8", "tensorrt", ""])
def test_bad_ids_raise_config_error_naming_the_id(bad):
    with pytest.raises(ConfigError, match="backend|no backend"):
        parse_backends(bad)


def test_presets_expand_without_duplicates():
    ids = [b.id for b in parse_backends("cpu,torch-fp32,fp8-dynamic-token")]
    assert ids[0] == "torch-fp32" and len(ids) == len(set(ids))
    assert {"tensorrt-fp8", "ort-cpu"} <= set(ids)
    gpu = [b.id for b in parse_backends("gpu")]
    assert "torch-bf16" in gpu and "fp8-static-tensor-compiled" in gpu and "fp8-dynamic-token-graph" in gpu


@pytest.mark.parametrize("backend_id", ["fp8-dynamic-tensor", "fp8-dynamic-token", "fp8-static-tensor", "fp8-dynamic-group"])
def test_fp8_backend_matches_fp8linear_and_the_fp8_accuracy_bound(backend_id):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 64, generator=gen) / 8  # (N, K)
    calib = torch.randn(128, 64, generator=gen)
    x = torch.randn(5, 64, generator=gen)  # (M, K)
    backend = get_backend(backend_id)
    fn = backend.build_linear(weight, calib)
    linear = nn.Linear(64, 48, bias=False)
    linear.weight.data.copy_(weight)
    scale = calib.abs().max().reshape(()) / 448 if backend.config.activation == "static" else None
    expected = FP8Linear.from_linear(linear, backend.config, scale)(x)
    torch.testing.assert_close(fn(x), expected, rtol=0, atol=0)
    assert sqnr_db(fn(x), x.double() @ weight.double().T) > 20.0


def test_weight_bytes_reflect_storage():
    assert get_backend("torch-bf16").weight_bytes(4096, 4096, torch.bfloat16) == 2 * 4096 * 4096
    assert get_backend("fp8-dynamic-tensor").weight_bytes(4096, 4096, torch.bfloat16) == 4096 * 4096 + 4
    assert get_backend("fp8-dynamic-token").weight_bytes(4096, 4096, torch.bfloat16) == 4096 * 4096 + 4 * 4096
    # One fp32 scale per 128 x 128 block, partial edge blocks included: ceil(14336 / 128) x ceil(576 / 128) = 112 x 5.
    assert get_backend("fp8-dynamic-group").weight_bytes(14336, 576, torch.bfloat16) == 14336 * 576 + 4 * 112 * 5
    assert get_backend("scaled-mm-block-graph").weight_bytes(14336, 576, torch.bfloat16) == 14336 * 576 + 4 * 112 * 5


def test_unavailable_backends_give_not_run_rows_with_the_reason(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def no_tensorrt(name, *args, **kwargs):
        return None if name == "tensorrt" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_tensorrt)
    workloads = [LinearWorkload("proj", m, 32, 48) for m in (1, 4)]
    backends = [get_backend(b) for b in ("torch-fp32", "tensorrt-fp8", "fp8-dynamic-token-graph", "fp8-dynamic-token")]
    frame = run_benchmarks(workloads, backends, device="cpu", timing=FAST, progress=False)
    status = frame.groupby("backend")["status"].unique().to_dict()
    assert list(status["tensorrt-fp8"]) == ["not run: tensorrt not installed"]
    assert list(status["fp8-dynamic-token-graph"]) == ["not run: CUDA-graph timing needs a CUDA GPU"]
    assert list(status["torch-fp32"]) == ["ok"] and list(status["fp8-dynamic-token"]) == ["ok"]
    not_run = frame[frame["status"].str.startswith("not run")]
    assert len(not_run) == 4
    # never a number for a row that did not run
    for column in ("latency_ms_median", "tflops", "speedup_vs_baseline", "sqnr_db"):
        assert not_run[column].isna().all(), column
    assert not_run["runs"].isna().all() and not_run["weight_bytes"].isna().all()


def test_missing_export_package_gives_a_reason(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "fp8kit.export" else real_find_spec(name, *a, **k)
    )
    assert OrtCpuBackend().unavailable_reason(CPU) == "fp8kit-export not installed (needed for the ONNX export)"


def test_scaled_mm_shape_rule_skips_with_reason():
    frame = run_benchmarks(
        [LinearWorkload("odd", 2, 40, 24)], [get_backend("torch-fp32"), get_backend("fp8-dynamic-tensor")],
        device="cpu", timing=FAST, progress=False,
    )
    fp8 = frame[frame["backend"] == "fp8-dynamic-tensor"].iloc[0]
    assert fp8["status"].startswith("not run: torch._scaled_mm needs N and K divisible by 16 (N=40, K=24)")


def test_a_failing_backend_becomes_an_error_row_not_a_crash():
    class Broken(TorchBackend):
        def build_linear(self, weight_hp, calib_x):
            raise RuntimeError("engine build exploded")

    broken = Broken(torch.float32)
    broken.id = "broken"
    frame = run_benchmarks([LinearWorkload("p", 2, 16, 16)], [get_backend("torch-fp32"), broken], device="cpu",
                           timing=FAST, progress=False)
    row = frame[frame["backend"] == "broken"].iloc[0]
    assert row["status"] == "error: RuntimeError: engine build exploded"
    assert frame[frame["backend"] == "torch-fp32"]["status"].item() == "ok"


def test_compiled_fp8_backend_compiles_once_for_every_weight_copy_and_m():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    backend = get_backend("fp8-dynamic-token-compiled")
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(32, 64, generator=gen) for _ in range(3)]  # 3 rotated copies of one (N, K)
    fns = [backend.build_linear(w, weights[0]) for w in weights]
    eager = get_backend("fp8-dynamic-token")
    for m in (3, 8, 17):
        x = torch.randn(m, 64, generator=gen)
        for fn, w in zip(fns, weights):
            torch.testing.assert_close(fn(x), eager.build_linear(w, weights[0])(x), rtol=1e-5, atol=1e-5)
    # one graph for all copies and M >= 2 (M is dynamic), none per weight copy
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend_id", ["torchao-fp8-row", "torchao-fp8-tensor-compiled", "torchao-fp8-row-compiled-graph"])
def test_torchao_ids_round_trip(backend_id):
    backend = get_backend(backend_id)
    inner = backend.inner if isinstance(backend, GraphTimed) else backend
    assert isinstance(inner, TorchaoBackend) and backend.id == backend_id
    assert inner.granularity == backend_id.split("-")[2] and backend.compiled == ("compiled" in backend_id)
    assert inner.weight_bytes(4096, 1024, torch.bfloat16) == 4096 * 1024 + 4 * (4096 if inner.granularity == "row" else 1)


def test_torchao_rows_are_skipped_with_the_reason_without_torchao(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "torchao" else real_find_spec(name, *a, **k))
    backends = parse_backends("torch-fp32,peers")
    assert [b.id for b in backends][1:] == list(TORCHAO_BACKENDS)
    frame = run_benchmarks([LinearWorkload("proj", 2, 32, 48)], backends, device="cpu", timing=FAST, progress=False)
    status = dict(zip(frame["backend"], frame["status"]))
    assert status.pop("torch-fp32") == "ok"
    graph_reason = "not run: CUDA-graph timing needs a CUDA GPU"
    for backend_id, reason in status.items():  # never a number
        expected = graph_reason if backend_id.endswith("-graph") else "not run: torchao not installed (pip install torchao>=0.18 for the peer rows)"
        assert reason == expected, backend_id
    assert frame.loc[frame["backend"] != "torch-fp32", "latency_ms_median"].isna().all()


def test_torchao_needs_a_gpu_even_where_it_is_installed(monkeypatch):
    # As if torchao were importable: on a CPU the rows still say why they do not run.
    import sys
    import types

    fake = types.ModuleType("torchao")
    quantization = types.ModuleType("torchao.quantization")
    quantization.Float8DynamicActivationFloat8WeightConfig = object
    monkeypatch.setitem(sys.modules, "torchao", fake)
    monkeypatch.setitem(sys.modules, "torchao.quantization", quantization)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object() if name == "torchao" else real_find_spec(name, *a, **k))
    assert get_backend("torchao-fp8-row").unavailable_reason(CPU) == "torchao's FP8 inference path needs a CUDA GPU (compute capability >= 8.9)"
