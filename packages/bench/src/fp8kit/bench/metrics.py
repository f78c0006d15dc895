"""Pure metric functions: latency statistics, throughput, and accuracy against a reference.

Units are in the names: `_ms` milliseconds, `tflops` 10^12 floating-point operations per second,
`gbps` 10^9 bytes per second, `_db` decibels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "NOISE_MEDIAN_CI",
    "NOISE_TAIL",
    "median_ci",
    "latency_stats",
    "linear_flops",
    "linear_bytes",
    "tflops",
    "gbps",
    "rel_error",
    "sqnr_db",
    "top1_agreement",
    "speedup",
    "floor_ms",
    "floor_ratio",
    "ceiling_share",
]


#: A row is `noisy` when the 95% confidence interval of its median (from order statistics, no
#: distribution assumed) is wider than +-10% of the median: too few calls, or calls spread so widely
#: (a busy machine, preemption, a bimodal timer) that the median could be elsewhere ...
NOISE_MEDIAN_CI = 0.10
#: ... or when its p90 is more than 3x the median: a tenth of the calls or more were slowed down that
#: much, so the machine was not the machine the median describes.
NOISE_TAIL = 3.0


def median_ci(sorted_times: np.ndarray) -> tuple[float, float]:
    """The 95% confidence interval of the median of `sorted_times` (ascending): the order statistics
    of ranks n/2 -+ 0.98 sqrt(n) (binomial, normal approximation), clipped to the sample."""
    n = sorted_times.size
    lo = max(0, int(np.floor(n / 2 - 0.98 * np.sqrt(n))))
    hi = min(n - 1, int(np.ceil(n / 2 + 0.98 * np.sqrt(n))))
    return float(sorted_times[lo]), float(sorted_times[hi])


def latency_stats(times_ms: Sequence[float]) -> dict[str, float | bool]:
    """Summary of per-call latencies (ms): runs, median, p90, p99, mean, std, spread, noisy.

    Percentiles interpolate linearly between order statistics (numpy's default, so the median of
    [1, 2, 3, 4] is 2.5); std is the sample standard deviation (ddof=1), 0.0 for a single run.
    latency_spread = (p90 - p10) / median (dimensionless, for the reader); noisy: the median's 95%
    confidence interval (`median_ci`) is wider than +-NOISE_MEDIAN_CI x the median, or p90 exceeds
    NOISE_TAIL x the median: the median cannot be trusted, rerun on an idle machine or with more runs.
    An empty input gives runs=0, NaN for every statistic and noisy=False.
    """
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        nan = float("nan")
        return {
            "runs": 0,
            "latency_ms_median": nan,
            "latency_ms_p90": nan,
            "latency_ms_p99": nan,
            "latency_ms_mean": nan,
            "latency_ms_std": nan,
            "latency_spread": nan,
            "noisy": False,
        }
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError(f"latency_stats: times must be finite and >= 0 ms, got min {t.min()} max {t.max()}")
    median = float(np.median(t))
    p10, p90 = (float(v) for v in np.percentile(t, [10, 90]))
    spread = (p90 - p10) / median if median > 0 else 0.0
    lo, hi = median_ci(np.sort(t))
    noisy = median > 0 and ((hi - lo) / 2 > NOISE_MEDIAN_CI * median or p90 > NOISE_TAIL * median)
    return {
        "runs": int(t.size),
        "latency_ms_median": median,
        "latency_ms_p90": p90,
        "latency_ms_p99": float(np.percentile(t, 99)),
        "latency_ms_mean": float(t.mean()),
        "latency_ms_std": float(t.std(ddof=1)) if t.size > 1 else 0.0,
        "latency_spread": spread,
        "noisy": bool(noisy),
    }


def linear_flops(m: int, n: int, k: int) -> int:
    """Floating-point operations of an M x N x K GEMM: 2*M*N*K (one multiply, one add)."""
    return 2 * m * n * k


def linear_bytes(m: int, n: int, k: int, *, input_bytes: float, weight_bytes: float, output_bytes: float) -> int:
    """Fewest bytes an M x N x K linear moves through memory: read x [M,K] and W [N,K] once, write y [M,N].

    The `*_bytes` arguments are bytes per element (bf16 2, fp8 1). For an FP8 layer with dynamic
    activations, x is read in its high-precision dtype (the quantization reads it).
    """
    return int(m * k * input_bytes + n * k * weight_bytes + m * n * output_bytes)


def tflops(flops: float, latency_ms: float) -> float:
    """Throughput in TFLOP/s of `flops` operations done in `latency_ms`; NaN if the latency is not positive."""
    if not latency_ms > 0:
        return float("nan")
    return flops / (latency_ms * 1e-3) / 1e12


def gbps(num_bytes: float, latency_ms: float) -> float:
    """Bandwidth in GB/s (10^9 bytes/s) of `num_bytes` moved in `latency_ms`; NaN if the latency is not positive."""
    if not latency_ms > 0:
        return float("nan")
    return num_bytes / (latency_ms * 1e-3) / 1e9


def _as_f64(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(t)
    return t.detach().to(device="cpu" if t.device.type != "cuda" else t.device, dtype=torch.float64)


def rel_error(out: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """Relative Frobenius error ||out - ref|| / ||ref||, computed in float64.

    0.0 when both are exactly equal (a zero reference included); inf when `ref` is zero and `out`
    is not; NaN when `out` holds a NaN.
    """
    out64 = _as_f64(out)
    ref64 = _as_f64(ref).to(out64.device)
    if out64.shape != ref64.shape:
        raise ValueError(f"rel_error: output shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    err = torch.linalg.vector_norm(out64 - ref64).item()
    norm = torch.linalg.vector_norm(ref64).item()
    if math.isnan(err):
        return float("nan")
    if norm == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / norm


def sqnr_db(out: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 20*log10(||ref|| / ||ref - out||).

    inf for an exact match, NaN when `out` holds a NaN. FP8 E4M3 has 3 mantissa bits (relative
    rounding error <= 2^-4), so one well-scaled quantized tensor sits near 30 dB and a W8A8 GEMM
    near 25-30 dB; bf16 gives ~50 dB.
    """
    err = rel_error(out, ref)
    if math.isnan(err):
        return float("nan")
    if err == 0.0:
        return float("inf")
    if math.isinf(err):
        return float("-inf")
    return -20.0 * math.log10(err)


def top1_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Fraction of positions (all leading dims) whose argmax over the last dim matches the reference's."""
    if logits.shape != ref_logits.shape:
        raise ValueError(f"top1_agreement: logits shape {tuple(logits.shape)} != reference {tuple(ref_logits.shape)}")
    same = logits.argmax(dim=-1) == ref_logits.to(logits.device).argmax(dim=-1)
    return float(same.float().mean().item()) if same.numel() else float("nan")


def speedup(baseline_ms: float, latency_ms: float) -> float:
    """baseline_ms / latency_ms: >1 means faster than the baseline; NaN if either is missing or not positive."""
    if not (baseline_ms > 0 and latency_ms > 0):
        return float("nan")
    return baseline_ms / latency_ms


def floor_ms(num_bytes: float, bandwidth_gbps: float) -> float:
    """Memory floor in ms: `num_bytes` moved at `bandwidth_gbps` (10^9 bytes/s, e.g. the copy
    bandwidth measured in the same run); NaN if the bandwidth is missing or not positive."""
    if not (bandwidth_gbps > 0 and num_bytes >= 0):
        return float("nan")
    return num_bytes / (bandwidth_gbps * 1e9) * 1e3


def floor_ratio(latency_ms: float, floor_latency_ms: float) -> float:
    """latency_ms / floor_latency_ms: 1.0 at the memory floor, 1.3 means 30% slower than it; NaN if
    either is missing or not positive."""
    if not (latency_ms > 0 and floor_latency_ms > 0):
        return float("nan")
    return latency_ms / floor_latency_ms


def ceiling_share(ceiling_ms: float, latency_ms: float) -> float:
    """Share of the FP8 GEMM ceiling: ceiling_ms (bare `_scaled_mm`) / latency_ms (the whole FP8
    linear, quantization included); 1.0 means no overhead over the bare GEMM. NaN if either is
    missing or not positive."""
    if not (ceiling_ms > 0 and latency_ms > 0):
        return float("nan")
    return ceiling_ms / latency_ms
