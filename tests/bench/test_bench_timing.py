"""Host timing on CPU: warm-up excluded, run-count bounds, budget; CUDA-graph timing refuses the CPU."""

from __future__ import annotations

import time

import pytest

from fp8kit.bench import TimingConfig, time_calls
from fp8kit.bench.timing import time_cuda_graph


def test_warmup_calls_are_not_timed_and_rotation_is_round_robin():
    calls: list[str] = []

    def make(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)
        return fn

    config = TimingConfig(warmup=2, min_runs=4, max_runs=4, budget_ms=1.0)
    times = time_calls([make("a", 0.002), make("b", 0.002)], "cpu", config)
    assert calls == ["a", "b", "a", "b", "a", "b"]  # 2 warm-up + 4 timed
    assert len(times) == 4
    assert all(t >= 2.0 for t in times)  # ms: each call sleeps 2 ms
    assert all(t < 200.0 for t in times)


def test_budget_stops_after_min_runs_and_max_runs_caps():
    slow = time_calls([lambda: time.sleep(0.005)], "cpu", TimingConfig(warmup=0, min_runs=3, max_runs=100, budget_ms=1.0))
    assert len(slow) == 3  # budget already spent after the minimum
    fast = time_calls([lambda: None], "cpu", TimingConfig(warmup=0, min_runs=1, max_runs=7, budget_ms=1e6))
    assert len(fast) == 7


@pytest.mark.parametrize("kwargs", [{"warmup": -1}, {"min_runs": 0}, {"min_runs": 5, "max_runs": 4}, {"budget_ms": 0}])
def test_timing_config_validates(kwargs):
    with pytest.raises(ValueError, match="TimingConfig"):
        TimingConfig(**kwargs)


def test_time_calls_needs_callables_and_graphs_need_cuda():
    with pytest.raises(ValueError, match="no callables"):
        time_calls([], "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        time_cuda_graph([lambda: None], "cpu")
