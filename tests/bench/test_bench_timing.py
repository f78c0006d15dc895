"""Host timing on CPU: warm-up excluded, run-count bounds, budget; CUDA-graph timing refuses the CPU; the
pytest-benchmark device clock against a fake device."""

from __future__ import annotations

import json
import time

import pytest

from fp8kit.bench import TimingConfig, time_calls
from fp8kit.bench.timing import DeviceClock, time_cuda_graph

pytest_plugins = ["pytester"]


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


class FakeDevice:
    """A device clock the test advances by hand, and CUDA-event stand-ins that read it when recorded."""

    def __init__(self, start_ms: float = 0.0):
        self.now_ms = start_ms
        self.synced = 0

    def new_event(self):
        device = self

        class Event:
            at_ms = None

            def record(self):
                self.at_ms = device.now_ms

            def synchronize(self):
                device.synced += 1

            def elapsed_time(self, later):
                return later.at_ms - self.at_ms

        return Event()


def test_device_clock_reads_device_time_per_call_not_host_time():
    device = FakeDevice(start_ms=5e6)  # far from 0: a float32 difference there would lose microseconds
    clock = DeviceClock(device.new_event)
    clock.calls_per_round = 8
    start = clock()
    time.sleep(0.01)  # host time passes, the device's does not
    device.now_ms += 0.160  # one round: 8 calls of 20 µs on the device
    end = clock()
    assert end - start == pytest.approx(20e-6, rel=1e-9)  # seconds per call
    assert device.synced == 2  # each reading waits for its event
    for _ in range(1000):  # many rounds later, still exact per interval
        device.now_ms += 0.001
        clock()
    a = clock()
    device.now_ms += 0.08
    assert clock() - a == pytest.approx(10e-6, rel=1e-9)


def test_device_clock_drives_pytest_benchmark(pytester):
    # pytest-benchmark with the clock as its timer: the recorded round time is the (fake) device's.
    pytester.makepyfile(
        """
        import pytest
        from fp8kit.bench.timing import DeviceClock

        class FakeDevice:
            now_ms = 0.0

        class Event:
            def record(self):
                self.at_ms = FakeDevice.now_ms

            def synchronize(self):
                pass

            def elapsed_time(self, later):
                return later.at_ms - self.at_ms

        DEVICE = FakeDevice
        CLOCK = DeviceClock(Event)

        @pytest.mark.benchmark(timer=CLOCK)
        def test_replay(benchmark):
            CLOCK.calls_per_round = 4

            def replay():  # one 'graph replay' of 4 calls of 25 us on the device
                DEVICE.now_ms += 0.1

            benchmark.pedantic(replay, rounds=7, iterations=1, warmup_rounds=1)
        """
    )
    result = pytester.runpytest_inprocess("--benchmark-json=out.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    stats = json.loads((pytester.path / "out.json").read_text())["benchmarks"][0]["stats"]
    assert stats["rounds"] == 7
    assert stats["median"] == pytest.approx(25e-6, rel=1e-9) and stats["max"] == pytest.approx(25e-6, rel=1e-9)


def test_eager_cuda_samples_are_rounds_of_back_to_back_calls(monkeypatch):
    # Fake CUDA: every call takes 30 µs on the device; events read the device clock when recorded. One
    # sample is one round over the three rotated fns, divided by 3; the events bracket rounds, not calls.
    import torch

    from fp8kit.bench import timing

    device = FakeDevice(start_ms=1e3)
    calls: list[str] = []

    def new_event(enable_timing=True):
        return device.new_event()

    class Cuda:
        Event = staticmethod(new_event)

        @staticmethod
        def synchronize(device=None):
            pass

        @staticmethod
        def current_stream(device=None):
            return None

    monkeypatch.setattr(timing.torch, "cuda", Cuda)
    recorded = []
    real_new = device.new_event

    def new_event_with_stream():
        event = real_new()
        record = event.record
        event.record = lambda stream=None: (recorded.append(len(calls)), record())
        return event

    device.new_event = new_event_with_stream

    def make(name):
        def fn():
            calls.append(name)
            device.now_ms += 0.030
        return fn

    times = time_calls([make("a"), make("b"), make("c")], torch.device("cuda"), TimingConfig(warmup=1, min_runs=4, max_runs=4, budget_ms=1e-3))
    assert times == pytest.approx([0.030] * 4, rel=1e-9)  # ms per call
    assert calls[:1] == ["a"] and len(calls) == 1 + 3 + 4 * 3  # warm-up, one probe round, four timed rounds
    assert recorded[::2] == [4, 7, 10, 13] and recorded[1::2] == [7, 10, 13, 16]  # begin / end around whole rounds
