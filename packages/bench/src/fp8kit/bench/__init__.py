"""fp8kit.bench: latency and accuracy of FP8 linears and models (eager torch, torch._scaled_mm,
ONNX Runtime, TensorRT) as pandas DataFrames, with CSV / Markdown / PNG writers."""

from .backends import BACKEND_PRESETS, Backend, FP8Backend, OrtCpuBackend, TensorRTBackend, TorchBackend, get_backend, parse_backends
from .metrics import latency_stats, rel_error, sqnr_db, top1_agreement
from .report import (
    COLUMNS,
    EXTRA_COLUMNS,
    environment_info,
    from_pytest_benchmark_json,
    make_frame,
    read_csv,
    to_markdown,
    write_csv,
    write_markdown,
    write_plots,
    write_report,
)
from .runner import run_benchmarks
from .timing import TimingConfig, time_calls
from .workloads import SHAPE_PRESETS, LinearWorkload, ModelWorkload, linear_grid

__all__ = [
    "run_benchmarks",
    "Backend",
    "TorchBackend",
    "FP8Backend",
    "OrtCpuBackend",
    "TensorRTBackend",
    "get_backend",
    "parse_backends",
    "BACKEND_PRESETS",
    "LinearWorkload",
    "ModelWorkload",
    "SHAPE_PRESETS",
    "linear_grid",
    "TimingConfig",
    "time_calls",
    "latency_stats",
    "rel_error",
    "sqnr_db",
    "top1_agreement",
    "COLUMNS",
    "EXTRA_COLUMNS",
    "make_frame",
    "environment_info",
    "read_csv",
    "write_csv",
    "to_markdown",
    "write_markdown",
    "write_plots",
    "write_report",
    "from_pytest_benchmark_json",
]
