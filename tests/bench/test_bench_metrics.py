"""fp8kit.bench.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fp8kit.bench import metrics


def test_latency_stats_known_values():
    stats = metrics.latency_stats([1.0, 2.0, 3.0, 4.0])
    assert stats["runs"] == 4
    assert stats["latency_ms_median"] == 2.5
    assert stats["latency_ms_mean"] == 2.5
    # sample std (ddof=1) of 1..4 = sqrt(5/3)
    assert stats["latency_ms_std"] == pytest.approx(math.sqrt(5 / 3))
    # linear interpolation: position 0.9 * 3 = 2.7 -> 3 + 0.7 * (4 - 3)
    assert stats["latency_ms_p90"] == pytest.approx(3.7)
    assert stats["latency_ms_p99"] == pytest.approx(3.97)


def test_latency_stats_percentiles_on_1_to_100():
    stats = metrics.latency_stats(list(range(1, 101)))
    assert stats["latency_ms_median"] == 50.5
    assert stats["latency_ms_p90"] == pytest.approx(90.1)
    assert stats["latency_ms_p99"] == pytest.approx(99.01)


def test_latency_stats_single_and_empty():
    one = metrics.latency_stats([0.25])
    assert one["runs"] == 1 and one["latency_ms_median"] == 0.25 and one["latency_ms_std"] == 0.0
    empty = metrics.latency_stats([])
    assert empty["runs"] == 0 and math.isnan(empty["latency_ms_median"])


@pytest.mark.parametrize("bad", [[1.0, float("nan")], [1.0, -0.5], [float("inf")]])
def test_latency_stats_rejects_invalid_times(bad):
    with pytest.raises(ValueError, match="finite"):
        metrics.latency_stats(bad)


def test_throughput_units():
    # 2*M*N*K = 2 * 1024^3 = 2.147e9 FLOP in 1 ms -> 2.147 TFLOP/s
    flops = metrics.linear_flops(1024, 1024, 1024)
    assert flops == 2 * 1024**3
    assert metrics.tflops(flops, 1.0) == pytest.approx(2.147483648)
    # bf16 16x4096x4096: x 16*4096*2, W 4096*4096*2, y 16*4096*2 bytes
    nbytes = metrics.linear_bytes(16, 4096, 4096, input_bytes=2, weight_bytes=2, output_bytes=2)
    assert nbytes == 16 * 4096 * 2 + 4096 * 4096 * 2 + 16 * 4096 * 2
    assert metrics.gbps(1e9, 1000.0) == pytest.approx(1.0)
    assert math.isnan(metrics.tflops(flops, 0.0)) and math.isnan(metrics.gbps(1.0, float("nan")))


def test_rel_error_and_sqnr_known_values():
    ref = torch.tensor([3.0, 4.0])  # norm 5
    out = torch.tensor([3.0, 4.5])  # error norm 0.5
    assert metrics.rel_error(out, ref) == pytest.approx(0.1)
    assert metrics.sqnr_db(out, ref) == pytest.approx(20.0)
    assert metrics.rel_error(ref, ref) == 0.0
    assert metrics.sqnr_db(ref, ref) == math.inf
    assert metrics.rel_error(np.array([1.0, 0.0]), np.array([0.0, 0.0])) == math.inf
    assert math.isnan(metrics.sqnr_db(torch.tensor([float("nan"), 4.0]), ref))
    with pytest.raises(ValueError, match="shape"):
        metrics.rel_error(torch.zeros(3), torch.zeros(2))


def test_rel_error_is_computed_in_float64():
    ref = torch.full((1000,), 1.0, dtype=torch.float32)
    out = ref + 1e-7  # below fp32's resolution at 1.0 when accumulated naively, exact in fp64
    out64 = ref.double() + 1e-7
    assert metrics.rel_error(out64, ref) == pytest.approx(1e-7, rel=1e-6)
    assert metrics.rel_error(out, ref) < 2e-7


def test_sqnr_of_fp8_quantization_matches_the_e4m3_bound():
    from fp8kit.core.scaling import dequantize, quantize, tensor_scale

    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    scale = tensor_scale(x)
    sqnr = metrics.sqnr_db(dequantize(quantize(x, scale), scale), x)
    # 3 mantissa bits: relative rounding error <= 2^-4 per element (24 dB); RMS is well above that.
    assert 24.0 < sqnr < 40.0


def test_top1_agreement_and_speedup():
    ref = torch.tensor([[[0.1, 0.9], [0.8, 0.2]], [[0.3, 0.7], [0.6, 0.4]]])  # (B=2, S=2, V=2)
    out = ref.clone()
    out[0, 0] = torch.tensor([0.9, 0.1])  # flip one of four argmaxes
    assert metrics.top1_agreement(out, ref) == 0.75
    assert metrics.speedup(2.0, 1.0) == 2.0
    assert metrics.speedup(1.0, 4.0) == 0.25
    assert math.isnan(metrics.speedup(float("nan"), 1.0))
