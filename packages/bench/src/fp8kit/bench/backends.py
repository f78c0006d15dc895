"""Backends: one interface, stable ids used in every report.

- ``torch-bf16`` / ``torch-fp16`` / ``torch-fp32`` [``-compiled``]: eager (or compiled) torch in that dtype.
- ``fp8-<activation>-<granularity>[-w<weight>][-fastacc][-compiled]``: fp8kit `FP8Linear` through
  `torch._scaled_mm`. The weight granularity defaults to the activation's natural partner
  (per-tensor weights for per-tensor activations, per-channel weights for per-token ones, 128 x 128
  blocks for 1 x 128 groups: ``fp8-dynamic-group`` runs torch's block-wise GEMM);
  ``-wchannel`` / ``-wtensor`` names the other; ``-fastacc`` sets ``use_fast_accum``.
- ``torchao-fp8-<row|tensor>[-compiled]``: the nearest peer, torchao's
  `Float8DynamicActivationFloat8WeightConfig` (dynamic activations; PerRow: per-token activations with
  per-channel weights, PerTensor: per-tensor both; torchao's defaults, fast accumulation on) applied by
  `torchao.quantization.quantize_`; rows say "not run: torchao not installed" where it is missing.
- ``ort-cpu``: ONNX Runtime CPU on the fp8kit Q/DQ ONNX export (accuracy cross-check).
- ``tensorrt-fp8``: a TensorRT engine built from the same ONNX, timed with its execution context.
- ``scaled-mm-<rowwise|tensor|block>[-fastacc]``: the bare scaled GEMM on pre-quantized inputs (the
  activation is quantized once, outside the timed region): the FP8 GEMM ceiling of the fp8 rows.

Quantization backends (for `QuantWorkload`, an activation x [M,K]):
- ``copy``: `x.clone()`, the memory-bandwidth reference (read 2 + write 2 bytes per bf16 element).
- ``quant-<dynamic-token|dynamic-group|static-tensor|dynamic-tensor>``: `scaling.quantize_activation` (the
  Triton kernels on GPU, what `FP8Linear` uses); ``-torch``: the unfused torch path
  (`scaling.quantize` with `rowwise_scale` / `tensor_scale`); ``-torch-compiled``: `torch.compile` of it.

A backend that cannot run somewhere says why (`unavailable_reason`); the runner turns that into a
"not run: <reason>" row, never a number.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fp8kit.core.config import QuantConfig
from fp8kit.core.errors import ConfigError
from fp8kit.core.linear import FP8Linear
from fp8kit.core.scaling import tensor_scale

from .workloads import FP8_ID, QUANT_BACKENDS, QUANT_GRAPH_BACKENDS, SCALED_MM_BACKENDS, TORCHAO_BACKENDS

__all__ = [
    "Backend",
    "BuiltModel",
    "TorchBackend",
    "FP8Backend",
    "TorchaoBackend",
    "OrtCpuBackend",
    "TensorRTBackend",
    "ScaledMMBackend",
    "QuantBackend",
    "CopyBackend",
    "GraphTimed",
    "quant_impl",
    "get_backend",
    "cast_model",
    "parse_backends",
    "BACKEND_PRESETS",
]

logger = logging.getLogger(__name__)

LinearFn = Callable[[torch.Tensor], torch.Tensor]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """"bf16" / "fp16" / "fp32" for a torch dtype (else its torch name)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass
class BuiltModel:
    """A model prepared by a backend: `module` (eager, for perplexity) and `forward` (what is timed)."""

    module: nn.Module
    forward: Callable[[torch.Tensor], Any]


def _raise_dynamo_cache_limits() -> None:
    # One compiled code object serves every (N, K) and scheme; the default limit of 8 cache
    # entries would silently fall back to eager after the 8th shape.
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name) and getattr(torch._dynamo.config, name) < 1024:
            setattr(torch._dynamo.config, name, 1024)


class Backend(ABC):
    """One way of running a linear layer or a model. Subclasses set `id` and implement the builders."""

    id: str
    kind: str = "linear"  # "linear": linear and model workloads; "quant": QuantWorkload
    compiled: bool = False
    cuda_graph: bool = False  # time by CUDA-graph replay instead of eager launches

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run at all on `device` (None when it can)."""
        return None

    def workload_skip_reason(self, m: int, n: int, k: int) -> str | None:
        """Why one linear workload is not run by this backend (None when it is)."""
        return None

    def run_device(self, device: torch.device) -> torch.device:
        """Where this backend actually computes (ort-cpu computes on the CPU whatever the run's device)."""
        return device

    def activation_dtype(self, run_dtype: torch.dtype) -> torch.dtype:
        """dtype of the inputs and outputs (the run's high-precision dtype unless the backend fixes it)."""
        return run_dtype

    def dtype_label(self, run_dtype: torch.dtype) -> str:
        """The report's `dtype` column: weight / activation storage, e.g. "bf16" or "fp8-e4m3/bf16"."""
        return dtype_name(self.activation_dtype(run_dtype))

    @abstractmethod
    def weight_bytes(self, n: int, k: int, run_dtype: torch.dtype) -> int:
        """Bytes of one [N,K] weight as this backend stores it (scales included)."""

    def element_bytes(self, run_dtype: torch.dtype) -> tuple[float, float, float]:
        """(input, weight, output) bytes per element, for the fewest-bytes bandwidth figure."""
        size = torch.finfo(self.activation_dtype(run_dtype)).bits / 8
        return size, size, size

    def prepare_input(self, x: torch.Tensor) -> Any:
        """What the built callables take, made from x [M,K] once, outside the timed region (x itself by default)."""
        return x

    def impl(self, device: torch.device) -> str:
        """The report's `impl` column: which code computes the activation quantization ("" if none)."""
        return ""

    @abstractmethod
    def build_linear(self, weight_hp: torch.Tensor, calib_x: torch.Tensor) -> LinearFn:
        """A callable y = f(x) for the weight `weight_hp` [N,K] (run dtype); `calib_x` [*,K] calibrates static scales."""

    def build_model(self, model: nn.Module, calibration: list[Any]) -> BuiltModel:
        """The model prepared for this backend (a copy: `model` is left as it is); `calibration` is a
        list of input-id tensors or dicts of model inputs, for static activation scales."""
        raise NotImplementedError(f"backend {self.id} does not run whole models yet")


class TorchBackend(Backend):
    """Plain `F.linear` / the unmodified model in one dtype, eager or under `torch.compile`."""

    def __init__(self, dtype: torch.dtype | None, compiled: bool = False) -> None:
        self.dtype = dtype  # None: the run's dtype (bf16 on GPU, fp32 on CPU)
        self.compiled = compiled
        name = "default" if dtype is None else dtype_name(dtype)
        self.id = f"torch-{name}" + ("-compiled" if compiled else "")
        self._compiled_linear: Callable[..., torch.Tensor] | None = None

    def activation_dtype(self, run_dtype: torch.dtype) -> torch.dtype:
        return self.dtype or run_dtype

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type == "cpu" and self.dtype == torch.float16:
            return "fp16 GEMMs on CPU are not a meaningful baseline; use torch-fp32 or torch-bf16"
        return None

    def weight_bytes(self, n: int, k: int, run_dtype: torch.dtype) -> int:
        return n * k * torch.finfo(self.activation_dtype(run_dtype)).bits // 8

    def build_linear(self, weight_hp: torch.Tensor, calib_x: torch.Tensor) -> LinearFn:
        return _f_linear(self, weight_hp.to(self.activation_dtype(weight_hp.dtype)).contiguous())

    def build_model(self, model: nn.Module, calibration: list[Any]) -> BuiltModel:
        module = cast_model(copy.deepcopy(model), self.activation_dtype(next(model.parameters()).dtype)).eval()
        forward = _compile_model(module) if self.compiled else module
        return BuiltModel(module, forward)


def _f_linear(backend: TorchBackend | TorchaoBackend, weight: torch.Tensor) -> LinearFn:
    """``x -> F.linear(x, weight)``; for a compiled backend under one `torch.compile` (dynamic shapes) that
    the backend shares across its weight copies and M values (`backend._compiled_linear`)."""
    if not backend.compiled:
        return lambda x: F.linear(x, weight)
    if backend._compiled_linear is None:
        _raise_dynamo_cache_limits()
        backend._compiled_linear = torch.compile(F.linear, dynamic=True)
    fn = backend._compiled_linear
    return lambda x: fn(x, weight)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every floating parameter / buffer of `model` to `dtype` in place (FP8 tensors untouched).

    Works on models that transformers marks as quantized (GGUF-loaded), whose `.float()` / `.to()` refuse.
    """
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point() and tensor.dtype != dtype and tensor.element_size() > 1:
            tensor.data = tensor.data.to(dtype)
    return model


def _compile_model(module: nn.Module) -> Callable[[torch.Tensor], Any]:
    _raise_dynamo_cache_limits()
    return torch.compile(module, dynamic=False)


def _scaled_mm_shape_reason(n: int, k: int, consequence: str = "") -> str | None:
    """Why `torch._scaled_mm` cannot take an [N, K] weight (N or K not divisible by 16), else None."""
    if n % 16 or k % 16:
        return f"torch._scaled_mm needs N and K divisible by 16 (N={n}, K={k}){consequence}"
    return None


class _FP8Weights(Backend):
    """What every FP8-weight linear backend shares: the N, K rule, the dtype label and bytes per element
    (the run-dtype activation in and out, one byte per weight element)."""

    def workload_skip_reason(self, m: int, n: int, k: int) -> str | None:
        return _scaled_mm_shape_reason(n, k)

    def dtype_label(self, run_dtype: torch.dtype) -> str:
        return f"fp8-e4m3/{dtype_name(run_dtype)}"

    def element_bytes(self, run_dtype: torch.dtype) -> tuple[float, float, float]:
        size = torch.finfo(run_dtype).bits / 8
        return size, 1.0, size


class FP8Backend(_FP8Weights):
    """fp8kit `FP8Linear` (weights FP8 E4M3, activations quantized per `activation` / `granularity`)."""

    def __init__(
        self,
        activation: str,
        granularity: str,
        weight: str | None = None,
        *,
        use_fast_accum: bool = False,
        compiled: bool = False,
    ) -> None:
        natural = {"token": "channel", "group": "block"}.get(granularity, "tensor")
        weight = weight or natural
        self.config = QuantConfig(
            weight=weight,  # type: ignore[arg-type]
            activation=activation,  # type: ignore[arg-type]
            activation_granularity=granularity,  # type: ignore[arg-type]
            ignore=("re:.*lm_head",),
            use_fast_accum=use_fast_accum,
        )
        self.compiled = compiled
        self.id = (
            f"fp8-{activation}-{granularity}"
            + ("" if weight == natural else f"-w{weight}")
            + ("-fastacc" if use_fast_accum else "")
            + ("-compiled" if compiled else "")
        )
        # (N, K) -> (template FP8Linear, compiled functional forward); see build_linear.
        self._compiled: dict[tuple[int, int, bool], tuple[FP8Linear, Callable[..., torch.Tensor]]] = {}

    def unavailable_reason(self, device: torch.device) -> str | None:
        from fp8kit.core.scaling import block_gemm_unsupported_reason, scaled_mm_unsupported_reason

        if self.config.weight == "block" and device.type == "cuda":  # a GPU without it would time the fallback
            return block_gemm_unsupported_reason(device)
        return scaled_mm_unsupported_reason(device)

    def workload_skip_reason(self, m: int, n: int, k: int) -> str | None:
        return _scaled_mm_shape_reason(n, k, "; fp8kit keeps such layers in high precision")

    def impl(self, device: torch.device) -> str:
        return quant_impl(device) + (" under torch.compile" if self.compiled else "")

    def weight_bytes(self, n: int, k: int, run_dtype: torch.dtype) -> int:
        return n * k + 4 * _weight_scales(self.config.weight, n, k)

    def build_linear(self, weight_hp: torch.Tensor, calib_x: torch.Tensor) -> LinearFn:
        n, k = weight_hp.shape
        shell = nn.Linear(k, n, bias=False, device="meta")
        shell.weight = nn.Parameter(weight_hp, requires_grad=False)
        input_scale = tensor_scale(calib_x) if self.config.activation == "static" else None
        module = FP8Linear.from_linear(shell, self.config, input_scale).eval()
        if not self.compiled:
            return module
        key = (n, k, module.input_scale is not None)
        if key not in self._compiled:
            _raise_dynamo_cache_limits()
            # A template whose own tensors are never passed in (on meta: no memory): every call
            # swaps in one weight copy's buffers, so all copies share one graph.
            template = copy.deepcopy(module).to("meta")

            def forward(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
                return torch.func.functional_call(template, tensors, (x,))

            # dynamic=True: one graph for every M (M=1 gets its own, dynamo specializes size 1).
            self._compiled[key] = (template, torch.compile(forward, dynamic=True))
        _, compiled = self._compiled[key]
        tensors = dict(module.named_buffers())
        return lambda x: compiled(x, tensors)

    def build_model(self, model: nn.Module, calibration: list[Any]) -> BuiltModel:
        from fp8kit.core import quantize

        module = copy.deepcopy(model).eval()
        with torch.no_grad():
            quantize(module, self.config, calibration=calibration if self.config.activation == "static" else None)
        forward = _compile_model(module) if self.compiled else module
        return BuiltModel(module, forward)

    def release(self) -> None:
        """Forget compiled per-shape graphs (call between shape groups to free their templates)."""
        self._compiled.clear()


class TorchaoBackend(_FP8Weights):
    """torchao's FP8 inference (`Float8DynamicActivationFloat8WeightConfig`, torchao >= 0.18), the peer
    fp8kit is compared with: PerRow (per-token activations, per-channel weights) or PerTensor, its
    defaults otherwise (fast accumulation on: compare with fp8kit's ``-fastacc`` rows). Inductor settings
    are left alone (``set_inductor_config=False``) so compiled rows of both libraries share one config.
    `-compiled`: `torch.compile` of the linear (dynamic shapes, one graph for every weight copy) or model.
    """

    def __init__(self, granularity: str, compiled: bool = False) -> None:
        if granularity not in ("row", "tensor"):
            raise ConfigError(f"TorchaoBackend: granularity {granularity!r} must be 'row' or 'tensor'")
        self.granularity = granularity
        self.compiled = compiled
        self.id = f"torchao-fp8-{granularity}" + ("-compiled" if compiled else "")
        self._compiled_linear: Callable[..., torch.Tensor] | None = None

    def unavailable_reason(self, device: torch.device) -> str | None:
        if importlib.util.find_spec("torchao") is None:
            return "torchao not installed (pip install torchao>=0.18 for the peer rows)"
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - an old or broken torchao: say which
            return f"torchao has no usable Float8DynamicActivationFloat8WeightConfig ({type(exc).__name__}: {exc})"
        if device.type != "cuda":
            return "torchao's FP8 inference path needs a CUDA GPU (compute capability >= 8.9)"
        from fp8kit.core.scaling import scaled_mm_unsupported_reason

        return scaled_mm_unsupported_reason(device)

    def impl(self, device: torch.device) -> str:
        return "torchao" + (" under torch.compile" if self.compiled else "")

    def weight_bytes(self, n: int, k: int, run_dtype: torch.dtype) -> int:
        return n * k + 4 * (n if self.granularity == "row" else 1)

    def _quantize(self, module: nn.Module) -> nn.Module:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

        config = Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow() if self.granularity == "row" else PerTensor(), set_inductor_config=False
        )
        # As fp8kit's default config: every Linear but the lm_head, whose N or K divides by 16.
        quantize_(
            module,
            config,
            filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear)
            and not fqn.endswith("lm_head")
            and mod.in_features % 16 == 0
            and mod.out_features % 16 == 0,
        )
        return module

    def build_linear(self, weight_hp: torch.Tensor, calib_x: torch.Tensor) -> LinearFn:
        n, k = weight_hp.shape
        linear = nn.Linear(k, n, bias=False, device=weight_hp.device, dtype=weight_hp.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight_hp)
        return _f_linear(self, self._quantize(linear).weight)  # weight: a torchao Float8Tensor [N, K]

    def build_model(self, model: nn.Module, calibration: list[Any]) -> BuiltModel:
        module = self._quantize(copy.deepcopy(model)).eval()
        forward = _compile_model(module) if self.compiled else module
        return BuiltModel(module, forward)

    def release(self) -> None:
        """Forget the compiled linear (between shape groups)."""
        self._compiled_linear = None


def _weight_scales(weight: str, n: int, k: int) -> int:
    """fp32 scales of one [N,K] FP8 weight: 1 per tensor, N per channel, one per 128 x 128 block."""
    return {"tensor": 1, "channel": n, "block": -(-n // 128) * -(-k // 128)}[weight]


def _export_reason() -> str | None:
    if importlib.util.find_spec("fp8kit.export") is None:
        return "fp8kit-export not installed (needed for the ONNX export)"
    try:
        _export_fn()
    except ImportError as exc:
        return f"fp8kit.export has no usable export_onnx: {exc}"
    return None


def _export_fn() -> Callable[..., Any]:
    try:
        from fp8kit.export import export_onnx
    except ImportError:
        from fp8kit.export.onnx import export_onnx
    return export_onnx


def _export_static_linear(weight_hp: torch.Tensor, calib_x: torch.Tensor, dtype: torch.dtype, path: Path) -> FP8Linear:
    """Export one static per-tensor FP8Linear ([N,K] weight) as Q/DQ ONNX at `path`; returns the module."""
    n, k = weight_hp.shape
    shell = nn.Linear(k, n, bias=False, device="meta")
    shell.weight = nn.Parameter(weight_hp.detach().to("cpu", dtype), requires_grad=False)
    config = QuantConfig(weight="tensor", activation="static", activation_granularity="tensor")
    module = FP8Linear.from_linear(shell, config, tensor_scale(calib_x.cpu())).eval()
    sample = calib_x[:4].detach().to("cpu", dtype)
    _export_fn()(nn.Sequential(module), path, example_inputs=(sample,), dtype=dtype, overwrite=True)
    return module


class OrtCpuBackend(Backend):
    """ONNX Runtime (CPU provider) on the fp8kit ONNX export.

    ``ort-cpu`` runs with graph optimizations off (ORT_DISABLE_ALL), the level at which ORT's FP8
    Q/DQ results are trustworthy (REFERENCE section 5); ``ort-cpu-optimized`` runs ORT's default
    (ORT_ENABLE_ALL), what users get, whose fusions have broken FP8 graphs on some ORT versions.
    The export needs static activation scales, so this is the static per-tensor scheme. ORT CPU
    runs fp32 graphs (not bf16). Workloads above `max_flops` are skipped (it is an accuracy
    cross-check, not a speed contender).
    """

    def __init__(self, max_flops: float = 2e10, level: str = "disable_all") -> None:
        if level not in ("disable_all", "enable_all"):
            raise ConfigError(f"OrtCpuBackend: level {level!r} must be 'disable_all' or 'enable_all'")
        self.max_flops = max_flops
        self.level = level
        self.id = "ort-cpu" if level == "disable_all" else "ort-cpu-optimized"
        self._tmp = tempfile.TemporaryDirectory(prefix="fp8kit-bench-ort-")

    def unavailable_reason(self, device: torch.device) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime not installed"
        return _export_reason()

    def run_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu")

    def workload_skip_reason(self, m: int, n: int, k: int) -> str | None:
        if 2 * m * n * k > self.max_flops:
            return f"skipped above {self.max_flops:.0e} FLOP (ort-cpu is an accuracy cross-check on CPU)"
        return None

    def activation_dtype(self, run_dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def dtype_label(self, run_dtype: torch.dtype) -> str:
        return "fp8-e4m3/fp32"

    def weight_bytes(self, n: int, k: int, run_dtype: torch.dtype) -> int:
        return n * k + 4

    def element_bytes(self, run_dtype: torch.dtype) -> tuple[float, float, float]:
        return 4.0, 1.0, 4.0

    def build_linear(self, weight_hp: torch.Tensor, calib_x: torch.Tensor) -> LinearFn:
        import numpy as np
        import onnxruntime as ort

        n, k = weight_hp.shape
        path = Path(self._tmp.name) / f"linear_{n}x{k}.onnx"
        _export_static_linear(weight_hp, calib_x, torch.float32, path)
        options = ort.SessionOptions()
        # As many threads as torch's rows use (1 on a CPU run by default), so ratios compare like with like.
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if self.level == "disable_all"
            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            x_np = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
            return torch.from_numpy(session.run(None, {input_name: x_np})[0])

        return run


class TensorRTBackend(Backend):
    """A TensorRT engine (strongly typed, FP8 Q/DQ) built from the fp8kit ONNX export of a static
    per-tensor FP8 linear, run with `IExecutionContext.execute_async_v3` on torch's current stream.

    Written against TensorRT 10's documented Python API; rows say "not run: tensorrt not installed"
    where `tensorrt` cannot be imported.
    """

    id = "tensorrt-fp8"

    def __init__(self, max_m: int = 8192) -> None:
        self.max_m = max_m
        self._tmp = tempfile.TemporaryDirectory(prefix="fp8kit-bench-trt-")

    def unavailable_reason(self, device: torch.device) -> str | None:
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt not installed"
        if device.type != "cuda":
            return "tensorrt needs a CUDA GPU"
        return _export_reason()

    def workload_skip_reason(self, m: int, n: int, k: int) -> str | None:
        if m > self.max_m:
            return f"M={m} is above the engine profile's max M={self.max_m}"
        return None

    def activation_dtype(self, run_dtype: torch.dtype) -> torch.dtype:
        # The fp8kit export writes fp16 or fp32 graphs (scales in the compute dtype, REFERENCE
        # section 4); fp16 is TensorRT's FP8 partner. bf16 inputs convert to fp16 exactly in range.
        return torch.float16

    def dtype_label(self, run_dtype: torch.dtype) -> str:
        return "fp8-e4m3/fp16"

    def weight_bytes(self, n: int, k: int, run_dtype: torch.dtype) -> int:
        return n * k + 2

    def element_bytes(self, run_dtype: torch.dtype) -> tuple[float, float, float]:
        size = torch.finfo(self.activation_dtype(run_dtype)).bits / 8
        return size, 1.0, size

    def build_linear(self, weight_hp: torch.Tensor, calib_x: torch.Tensor) -> LinearFn:
        import tensorrt as trt

        n, k = weight_hp.shape
        dtype = self.activation_dtype(weight_hp.dtype)
        path = Path(self._tmp.name) / f"linear_{n}x{k}.onnx"
        _export_static_linear(weight_hp, calib_x, dtype, path)

        from fp8kit.export.tensorrt import parse_strongly_typed

        trt_logger, builder, network = parse_strongly_typed(trt, path)
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        input_name = network.get_input(0).name
        opt_m = min(self.max_m, 1024)
        profile.set_shape(input_name, (1, k), (opt_m, k), (self.max_m, k))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {path.name}")
        engine = trt.Runtime(trt_logger).deserialize_cuda_engine(serialized)
        context = engine.create_execution_context()
        output_name = next(
            engine.get_tensor_name(i)
            for i in range(engine.num_io_tensors)
            if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT
        )

        def run(x: torch.Tensor) -> torch.Tensor:
            x = x.to(dtype).contiguous()
            out = torch.empty(x.shape[0], n, dtype=dtype, device=x.device)
            context.set_input_shape(input_name, tuple(x.shape))
            context.set_tensor_address(input_name, x.data_ptr())
            context.set_tensor_address(output_name, out.data_ptr())
            if not context.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            return out

        run.engine = engine  # type: ignore[attr-defined] - keep the engine alive with the closure
        return run


def quant_impl(device: torch.device) -> str:
    """What `scaling.quantize_activation` runs on `device`: "triton" when fp8kit's kernels can run
    there, else "torch" (with the kernels' reason when they exist but cannot run)."""
    try:
        from fp8kit.core import kernels
    except ImportError:
        return "torch"
    try:
        reason = kernels.unavailable_reason(device)
    except Exception as exc:  # noqa: BLE001 - informational column
        reason = f"{type(exc).__name__}: {exc}"
    return "triton" if reason is None else f"torch ({reason})"


def _quantize_activation_reason() -> str | None:
    from fp8kit.core import scaling

    if not hasattr(scaling, "quantize_activation"):
        return "fp8kit.core.scaling has no quantize_activation (fp8kit-core without the quantization kernels)"
    return None


class ScaledMMBackend(_FP8Weights):
    """``scaled-mm-<rowwise|tensor|block>[-fastacc]``: the bare scaled GEMM on an activation quantized
    once before timing (`prepare_input`), against an FP8 weight [N,K] passed as its column-major view.

    rowwise: `torch._scaled_mm` with scale_a [M,1] (per token), scale_b [1,N] (per channel); tensor:
    both fp32 []; block: torch's block-wise GEMM (`scaling.fp8_block_matmul`: 1 x 128 groups [M, K/128]
    by 128 x 128 blocks). This is the FP8 GEMM ceiling: an `FP8Linear` row's time over it is the
    cost of quantizing the activation and of the Python around the GEMM.
    """

    def __init__(self, scaling: str, *, use_fast_accum: bool = False) -> None:
        if scaling not in ("rowwise", "tensor", "block"):
            raise ConfigError(f"ScaledMMBackend: scaling {scaling!r} must be 'rowwise', 'tensor' or 'block'")
        self.scaling = scaling
        self.use_fast_accum = use_fast_accum
        self.id = f"scaled-mm-{scaling}" + ("-fastacc" if use_fast_accum else "")

    def unavailable_reason(self, device: torch.device) -> str | None:
        from fp8kit.core.scaling import block_gemm_unsupported_reason, scaled_mm_unsupported_reason

        if self.scaling == "block":  # the ceiling is the GEMM itself, never the fallback
            return block_gemm_unsupported_reason(device)
        return scaled_mm_unsupported_reason(device)

    def weight_bytes(self, n: int, k: int, run_dtype: torch.dtype) -> int:
        return n * k + 4 * _weight_scales({"rowwise": "channel"}.get(self.scaling, self.scaling), n, k)

    def element_bytes(self, run_dtype: torch.dtype) -> tuple[float, float, float]:
        return 1.0, 1.0, torch.finfo(run_dtype).bits / 8  # x is already FP8

    def impl(self, device: torch.device) -> str:
        return "pre-quantized"

    def prepare_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        """(x_fp8 [M,K], scale_a fp32 [M,1], [] or, block, [M, K/128] column-major, out dtype) for the GEMM."""
        from fp8kit.core import scaling

        if self.scaling == "block":
            return (*scaling.quantize_activation(x, "group"), x.dtype)
        scale_a = scaling.rowwise_scale(x) if self.scaling == "rowwise" else scaling.tensor_scale(x)  # [M,1] or []
        return scaling.quantize(x, scale_a), scale_a.contiguous(), x.dtype

    def build_linear(self, weight_hp: torch.Tensor, calib_x: torch.Tensor) -> Callable[[Any], torch.Tensor]:
        from fp8kit.core import scaling

        n = weight_hp.shape[0]
        fast = self.use_fast_accum
        if self.scaling == "block":
            weight_fp8, w_blocks = scaling.quantize_weight(weight_hp, "block")  # (N, K), (N/128, K/128)

            def run_block(prepared: tuple[torch.Tensor, torch.Tensor, torch.dtype]) -> torch.Tensor:
                x_fp8, scale_a, out_dtype = prepared
                return scaling.fp8_block_matmul(x_fp8, weight_fp8, scale_a, w_blocks, out_dtype=out_dtype, use_fast_accum=fast)

            return run_block
        if self.scaling == "rowwise":
            w_scale = scaling.rowwise_scale(weight_hp)  # (N, 1)
            scale_b = w_scale.reshape(1, n).contiguous()  # (1, N)
        else:
            w_scale = scaling.tensor_scale(weight_hp)  # ()
            scale_b = w_scale
        weight_fp8 = scaling.quantize(weight_hp, w_scale).contiguous()  # (N, K)

        def run(prepared: tuple[torch.Tensor, torch.Tensor, torch.dtype]) -> torch.Tensor:
            x_fp8, scale_a, out_dtype = prepared
            out = torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a, scale_b, out_dtype=out_dtype, use_fast_accum=fast)
            return out[0] if isinstance(out, tuple) else out  # torch < 2.5 returned (out, amax)

        return run


QuantFn = Callable[[torch.Tensor], Any]


class QuantBackend(Backend):
    """``quant-<activation>-<granularity>[-torch[-compiled]]``: FP8 quantization of an activation x [M,K].

    impl "kernel": `scaling.quantize_activation` (Triton on GPU); "torch": `scaling.quantize` with
    `rowwise_scale` / `tensor_scale` / `block_scale` (several kernels); "torch-compiled": `torch.compile`
    of that (static shapes, one graph per M x K). Each call returns (x_fp8 [M,K], scale fp32 [M,1],
    [] or, per 1 x 128 group, [M, K/128]).
    """

    kind = "quant"

    def __init__(self, activation: str, granularity: str, impl: str = "kernel") -> None:
        if (activation, granularity) not in (("dynamic", "token"), ("dynamic", "group"), ("dynamic", "tensor"), ("static", "tensor")):
            raise ConfigError(
                f"quant backend: {activation}-{granularity} is not a scheme; "
                "use dynamic-token, dynamic-group, dynamic-tensor or static-tensor"
            )
        if impl not in ("kernel", "torch", "torch-compiled"):
            raise ConfigError(f"QuantBackend: impl {impl!r} must be 'kernel', 'torch' or 'torch-compiled'")
        self.activation = activation
        self.granularity = granularity
        self.impl_name = impl
        self.compiled = impl == "torch-compiled"
        self.id = f"quant-{activation}-{granularity}" + ("" if impl == "kernel" else f"-{impl}")
        self._compiled_fn: Callable[..., Any] | None = None

    @property
    def passes(self) -> int:
        """Reads of x the algorithm needs: 2 for dynamic per-tensor (amax, then quantize), else 1."""
        return 2 if (self.activation, self.granularity) == ("dynamic", "tensor") else 1

    def unavailable_reason(self, device: torch.device) -> str | None:
        return _quantize_activation_reason() if self.impl_name == "kernel" else None

    def dtype_label(self, run_dtype: torch.dtype) -> str:
        return f"{dtype_name(run_dtype)}->fp8-e4m3"

    def impl(self, device: torch.device) -> str:
        return quant_impl(device) if self.impl_name == "kernel" else self.impl_name.replace("-compiled", ".compile")

    def weight_bytes(self, n: int, k: int, run_dtype: torch.dtype) -> int:
        return 0

    def quant_bytes(self, m: int, k: int, run_dtype: torch.dtype) -> int:
        """The algorithm's fewest bytes: read x `passes` times, write x_fp8 once (scales not counted):
        3 bytes per bf16 element for one pass, 5 for two."""
        size = torch.finfo(run_dtype).bits // 8
        return m * k * (self.passes * size + 1)

    def build_linear(self, weight_hp: torch.Tensor, calib_x: torch.Tensor) -> LinearFn:
        raise NotImplementedError(f"backend {self.id} quantizes activations; it runs QuantWorkload only")

    def build_quant(self, static_scale: torch.Tensor) -> QuantFn:
        """f(x [M,K]) -> (x_fp8 [M,K], scale); `static_scale` fp32 [] is the static scheme's calibrated scale."""
        from fp8kit.core import scaling

        if self.impl_name == "kernel":
            if self.activation == "static":
                return lambda x: scaling.quantize_activation(x, "tensor", scale=static_scale)
            granularity = self.granularity
            return lambda x: scaling.quantize_activation(x, granularity)
        fn = _torch_quant_fn(self.activation, self.granularity)
        if self.compiled:
            if self._compiled_fn is None:
                _raise_dynamo_cache_limits()
                self._compiled_fn = torch.compile(fn, dynamic=False)
            fn = self._compiled_fn
        return lambda x: fn(x, static_scale)


def _torch_quant_fn(activation: str, granularity: str) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    from fp8kit.core import scaling

    if activation == "static":
        return lambda x, scale: (scaling.quantize(x, scale), scale)
    if granularity == "group":

        def groups(x: torch.Tensor, _unused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            scale = scaling.block_scale(x, (1, 128))  # [M, K/128]
            return scaling.quantize(x, scale, block=(1, 128)), scale

        return groups
    scale_fn = scaling.rowwise_scale if granularity == "token" else scaling.tensor_scale

    def dynamic(x: torch.Tensor, _unused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = scale_fn(x)  # [M,1] or []
        return scaling.quantize(x, scale), scale

    return dynamic


class CopyBackend(QuantBackend):
    """``copy``: `x.clone()` of the activation: the memory bandwidth the quantization rows are measured
    against (read + write 2 bytes each per bf16 element)."""

    def __init__(self) -> None:
        self.activation, self.granularity, self.impl_name = "none", "none", "copy"
        self.compiled = False
        self.id = "copy"

    @property
    def passes(self) -> int:
        return 1

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def dtype_label(self, run_dtype: torch.dtype) -> str:
        return dtype_name(run_dtype)

    def impl(self, device: torch.device) -> str:
        return "copy"

    def quant_bytes(self, m: int, k: int, run_dtype: torch.dtype) -> int:
        return 2 * m * k * (torch.finfo(run_dtype).bits // 8)

    def build_quant(self, static_scale: torch.Tensor) -> QuantFn:
        return torch.clone


class GraphTimed(Backend):
    """`<inner id>-graph`: the inner backend, timed by CUDA-graph replay (launch overhead removed)."""

    cuda_graph = True

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.id = f"{inner.id}-graph"
        self.compiled = inner.compiled
        self.kind = inner.kind

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "CUDA-graph timing needs a CUDA GPU"
        if isinstance(self.inner, (OrtCpuBackend, TensorRTBackend)):
            return f"{self.inner.id} cannot be captured in a torch CUDA graph"
        return self.inner.unavailable_reason(device)

    def workload_skip_reason(self, m: int, n: int, k: int) -> str | None:
        return self.inner.workload_skip_reason(m, n, k)

    def activation_dtype(self, run_dtype: torch.dtype) -> torch.dtype:
        return self.inner.activation_dtype(run_dtype)

    def dtype_label(self, run_dtype: torch.dtype) -> str:
        return self.inner.dtype_label(run_dtype)

    def weight_bytes(self, n: int, k: int, run_dtype: torch.dtype) -> int:
        return self.inner.weight_bytes(n, k, run_dtype)

    def element_bytes(self, run_dtype: torch.dtype) -> tuple[float, float, float]:
        return self.inner.element_bytes(run_dtype)

    def impl(self, device: torch.device) -> str:
        return self.inner.impl(device)

    def prepare_input(self, x: torch.Tensor) -> Any:
        return self.inner.prepare_input(x)

    def quant_bytes(self, m: int, k: int, run_dtype: torch.dtype) -> int:
        return self.inner.quant_bytes(m, k, run_dtype)  # type: ignore[attr-defined]

    def build_quant(self, static_scale: torch.Tensor) -> QuantFn:
        return self.inner.build_quant(static_scale)  # type: ignore[attr-defined]

    def build_linear(self, weight_hp: torch.Tensor, calib_x: torch.Tensor) -> LinearFn:
        return self.inner.build_linear(weight_hp, calib_x)

    def build_model(self, model: nn.Module, calibration: list[Any]) -> BuiltModel:
        return self.inner.build_model(model, calibration)

    def release(self) -> None:
        if isinstance(self.inner, (FP8Backend, TorchaoBackend)):
            self.inner.release()


BACKEND_PRESETS: dict[str, tuple[str, ...]] = {
    "gpu": (
        "torch-bf16",
        "fp8-dynamic-tensor",
        "fp8-dynamic-token",
        "fp8-static-tensor",
        "fp8-dynamic-tensor-wchannel",
        "fp8-dynamic-tensor-compiled",
        "fp8-dynamic-token-compiled",
        "fp8-static-tensor-compiled",
        "fp8-dynamic-token-fastacc-compiled",
        "fp8-static-tensor-fastacc-compiled",
        "torch-bf16-graph",
        "fp8-dynamic-token-graph",
        "fp8-dynamic-token-fastacc-compiled-graph",
        "fp8-static-tensor-fastacc-compiled-graph",
        "tensorrt-fp8",
        "ort-cpu",
        "ort-cpu-optimized",
    ),
    "cpu": (
        "torch-fp32",
        "fp8-dynamic-tensor",
        "fp8-dynamic-token",
        "fp8-static-tensor",
        "tensorrt-fp8",
        "ort-cpu",
    ),
    # Quantization kernels vs the torch path vs a copy (QuantWorkload rows).
    "quant": QUANT_BACKENDS + QUANT_GRAPH_BACKENDS,
    # Bare torch._scaled_mm on pre-quantized inputs: the FP8 GEMM ceiling.
    "ceiling": SCALED_MM_BACKENDS,
    # The nearest peer (torchao's FP8 inference), eager / compiled, each also replayed from a CUDA graph.
    "peers": TORCHAO_BACKENDS,
}


def get_backend(backend_id: str) -> Backend:
    """The backend for a stable id; ConfigError listing the accepted forms otherwise.

    Any torch / fp8 id may end in ``-graph``: the same backend timed by CUDA-graph replay.
    """
    text = backend_id.strip()
    if text.endswith("-graph") and not text.startswith(("ort-", "tensorrt-")):
        return GraphTimed(get_backend(text.removesuffix("-graph")))
    torch_match = re.fullmatch(r"torch-(bf16|fp16|fp32)(-compiled)?", text)
    if torch_match:
        return TorchBackend(_DTYPES[torch_match.group(1)], compiled=bool(torch_match.group(2)))
    fp8_match = FP8_ID.fullmatch(text)
    if fp8_match:
        if fp8_match["activation"] == "static" and fp8_match["granularity"] != "tensor":
            raise ConfigError(f"backend {text!r}: static activation scales are per tensor; use fp8-static-tensor")
        try:
            return FP8Backend(
                fp8_match["activation"],
                fp8_match["granularity"],
                fp8_match["weight"],
                use_fast_accum=bool(fp8_match["fastacc"]),
                compiled=bool(fp8_match["compiled"]),
            )
        except ConfigError as exc:  # an impossible scheme, e.g. block weights with per-tensor activations
            raise ConfigError(f"backend {text!r}: {exc}") from exc
    torchao_match = re.fullmatch(r"torchao-fp8-(row|tensor)(-compiled)?", text)
    if torchao_match:
        return TorchaoBackend(torchao_match.group(1), compiled=bool(torchao_match.group(2)))
    mm_match = re.fullmatch(r"scaled-mm-(rowwise|tensor|block)(-fastacc)?", text)
    if mm_match:
        return ScaledMMBackend(mm_match.group(1), use_fast_accum=bool(mm_match.group(2)))
    if text == "copy":
        return CopyBackend()
    quant_match = re.fullmatch(r"quant-(dynamic|static)-(token|tensor|group)(-torch(?:-compiled)?)?", text)
    if quant_match:
        impl = (quant_match.group(3) or "-kernel").removeprefix("-")
        return QuantBackend(quant_match.group(1), quant_match.group(2), impl)
    if text == "ort-cpu":
        return OrtCpuBackend()
    if text == "ort-cpu-optimized":
        return OrtCpuBackend(level="enable_all")
    if text == TensorRTBackend.id:
        return TensorRTBackend()
    raise ConfigError(
        f"unknown backend {text!r}; use torch-bf16|torch-fp16|torch-fp32[-compiled], "
        "fp8-dynamic-tensor|fp8-dynamic-token|fp8-dynamic-group|fp8-static-tensor[-wtensor|-wchannel|-wblock]"
        "[-fastacc][-compiled], torchao-fp8-row|torchao-fp8-tensor[-compiled], "
        "scaled-mm-rowwise|scaled-mm-tensor|scaled-mm-block[-fastacc], ort-cpu, "
        "ort-cpu-optimized, tensorrt-fp8, copy, "
        "quant-dynamic-token|quant-dynamic-group|quant-dynamic-tensor|quant-static-tensor[-torch[-compiled]] "
        "(all but ort / tensorrt ids may end in -graph), or a preset: " + ", ".join(BACKEND_PRESETS)
    )


def parse_backends(text: str) -> list[Backend]:
    """Comma-separated backend ids and/or presets ("gpu", "cpu") -> backends, duplicates dropped, order kept."""
    ids: list[str] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        for backend_id in BACKEND_PRESETS.get(item, (item,)):
            if backend_id not in ids:
                ids.append(backend_id)
    if not ids:
        raise ConfigError("--backends: no backend given")
    backends = [get_backend(i) for i in ids]
    seen: dict[str, Backend] = {}
    for backend in backends:
        seen.setdefault(backend.id, backend)
    return list(seen.values())
