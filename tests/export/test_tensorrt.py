"""TensorRT code against a stand-in `tensorrt` module that records calls, and a layer-info fixture.

These tests check the calls fp8kit makes; they are not TensorRT results. The real build runs only
where `tensorrt` imports (with an FP8 GPU).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from fp8kit.export import EngineError, build_engine, shape_ranges, summarize_layers, trtexec_command
from fp8kit.export.tensorrt import parse_range, tensorrt_available

FIXTURE = Path(__file__).parent / "data" / "layers_fp8_mlp.json"


class FakeTensorRT:
    """Records the TensorRT Python API calls that build_engine makes (documented TensorRT 10 names)."""

    def __init__(self, parse_ok: bool = True, build_ok: bool = True, layer_info: str | None = None) -> None:
        self.calls: list[tuple] = []
        self.flags_set: list = []
        self.parse_ok, self.build_ok = parse_ok, build_ok
        self.layer_info = layer_info or FIXTURE.read_text()
        fake = self

        class Logger:
            WARNING = "WARNING"

            def __init__(self, severity):
                fake.calls.append(("Logger", severity))

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls.append(("set_shape", name, lo, opt, hi))

        class Config:
            def __init__(self):
                self.profiles = []

            def __setattr__(self, name, value):
                if name != "profiles":
                    fake.calls.append(("config." + name, value))
                object.__setattr__(self, name, value)

            def set_flag(self, flag):
                fake.flags_set.append(flag)

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_optimization_profile",))
                self.profiles.append(profile)

        class Builder:
            def __init__(self, logger):
                fake.calls.append(("Builder",))

            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                return SimpleNamespace()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network", len(config.profiles)))
                return b"PLAN" if fake.build_ok else None

        class OnnxParser:
            def __init__(self, network, logger):
                self.num_errors = 0 if fake.parse_ok else 1

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", path))
                return fake.parse_ok

            def get_error(self, i):
                return "In node 3 (QuantizeLinear): unsupported zero point"

        class Engine:
            def create_engine_inspector(self):
                return SimpleNamespace(get_engine_information=lambda fmt: (fake.calls.append(("get_engine_information", fmt)), fake.layer_info)[1])

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                fake.calls.append(("deserialize_cuda_engine", bytes(data)))
                return Engine()

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=5)
        self.ProfilingVerbosity = SimpleNamespace(DETAILED="DETAILED")
        self.LayerInformationFormat = SimpleNamespace(JSON="JSON")
        self.BuilderFlag = SimpleNamespace(FP8="FP8", FP16="FP16", BF16="BF16", INT8="INT8")


RANGES = {"input_ids": ((1, 1), (8, 128), (32, 2048)), "attention_mask": ((1, 1), (8, 128), (32, 2048))}


def test_build_engine_is_strongly_typed_with_one_profile_and_no_precision_flags(tmp_path):
    trt = FakeTensorRT()
    onnx_path, plan = tmp_path / "m.onnx", tmp_path / "m.plan"
    report = build_engine(onnx_path, plan, RANGES, trt=trt)
    assert ("create_network", 1 << 5) in trt.calls  # STRONGLY_TYPED bit
    assert ("parse_from_file", str(onnx_path)) in trt.calls
    assert ("config.profiling_verbosity", "DETAILED") in trt.calls
    shapes = [c for c in trt.calls if c[0] == "set_shape"]
    assert shapes == [("set_shape", name, *map(tuple, r)) for name, r in RANGES.items()]
    assert ("build_serialized_network", 1) in trt.calls
    assert trt.flags_set == []  # strongly typed: precisions come from the graph
    assert plan.read_bytes() == b"PLAN"
    assert json.loads(report.layer_info_path.read_text()) == json.loads(FIXTURE.read_text())
    assert report.layers.fp8_gemms == ["/0/MatMul + /0/Add", "/2/MatMul"]


def test_build_engine_errors_name_the_step(tmp_path):
    with pytest.raises(EngineError, match="could not parse.*QuantizeLinear"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", RANGES, trt=FakeTensorRT(parse_ok=False))
    with pytest.raises(EngineError, match="failed to build"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", RANGES, trt=FakeTensorRT(build_ok=False))
    assert not (tmp_path / "m.plan").exists()


def test_layer_summary_of_the_fixture():
    summary = summarize_layers(FIXTURE.read_text())
    assert summary.layers == 5
    assert summary.fp8_gemms == ["/0/MatMul + /0/Add", "/2/MatMul"]
    assert summary.other_gemms == ["/4/MatMul"]  # its weight DQ was not fused
    assert summary.standalone_dequantize == ["/4/DequantizeLinear_1"]
    assert "2 GEMM layers run in FP8" in summary.describe()
    with pytest.raises(EngineError, match="DETAILED"):
        summarize_layers({"Layers": ["a", "b"]})


def test_trtexec_command_and_ranges():
    ranges = shape_ranges(["input_ids", "attention_mask"], {"input_ids": {0: "batch", 1: "seq"}}, (1, 8, 32), (1, 128, 2048))
    assert ranges["input_ids"] == ((1, 1), (8, 128), (32, 2048))
    cmd = shlex.split(trtexec_command("out dir/m.onnx", "m.plan", ranges))
    assert cmd[:4] == ["trtexec", "--onnx=out dir/m.onnx", "--stronglyTyped", "--saveEngine=m.plan"]
    assert "--minShapes=input_ids:1x1,attention_mask:1x1" in cmd
    assert "--optShapes=input_ids:8x128,attention_mask:8x128" in cmd
    assert "--maxShapes=input_ids:32x2048,attention_mask:32x2048" in cmd
    assert not {"--fp8", "--fp16", "--best", "--int8"} & set(cmd)
    assert parse_range("1:8:32", "batch") == (1, 8, 32)
    for bad in ("8:1:32", "1:8", "a:b:c", "0:1:2"):
        with pytest.raises(ValueError, match="MIN:OPT:MAX"):
            parse_range(bad, "batch")


@pytest.mark.skipif(not tensorrt_available(), reason="the tensorrt Python package is not installed (needs an NVIDIA GPU host)")
def test_real_tensorrt_engine_runs_gemms_in_fp8(tmp_path, models):  # pragma: no cover - GPU hosts only
    import torch

    from fp8kit.export import export_onnx

    path = tmp_path / "mlp.onnx"
    export_onnx(models.quantized_mlp(), path, example_inputs=(torch.randn(4, 32),))
    report = build_engine(path, tmp_path / "mlp.plan", {"input": ((1, 32), (8, 32), (32, 32))})
    assert len(report.layers.fp8_gemms) == 3 and report.layers.standalone_dequantize == []
