"""Timers: CUDA events on GPU, `time.perf_counter` (wall) or `time.process_time` (CPU time) on CPU;
warm-up first, then many timed calls.

Each timed call is one sample, so the report can give a median and tail percentiles. On GPU the
events bracket each call on the stream (launch gaps included: that is what eager users see), and
all events are read after one final synchronize, so timing adds no host-device round trip.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "HOST_CLOCKS", "TimingConfig", "DeviceClock", "time_calls", "time_cuda_graph", "capture_cuda_graph",
    "peak_memory_mb", "reset_peak_memory", "sync", "free_memory",
]  # fmt: skip


#: TimingConfig.clock -> what it reads (seconds), for host-timed (CPU) calls.
HOST_CLOCKS: dict[str, str] = {"wall": "perf_counter", "cpu": "process_time"}


@dataclass(frozen=True)
class TimingConfig:
    """How long to time one (workload, backend) pair.

    warmup: untimed calls first (module loading, cuBLAS handle / autotuning, allocator growth).
    min_runs / max_runs: bounds on the number of timed calls.
    budget_ms: stop adding runs past `min_runs` once the timed calls have used this much time.
    clock: how host-timed calls (CPU devices) are measured: "wall" (`time.perf_counter`, what a
        user waits) or "cpu" (`time.process_time`, the CPU time of the whole process: with one
        thread, the latency on an idle core, without the time other processes held it; with several
        threads it sums them, so the CLI uses it only for single-threaded runs). CUDA rows use events.
    """

    warmup: int = 5
    min_runs: int = 10
    max_runs: int = 200
    budget_ms: float = 200.0
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_runs < 1 or self.max_runs < self.min_runs or self.budget_ms <= 0:
            raise ValueError(
                f"TimingConfig: need warmup >= 0, 1 <= min_runs <= max_runs and budget_ms > 0; got {self}"
            )
        if self.clock not in HOST_CLOCKS:
            raise ValueError(f"TimingConfig: clock {self.clock!r} is not one of {', '.join(HOST_CLOCKS)}")


def sync(device: torch.device) -> None:
    """Wait for `device`'s queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached GPU blocks, so the next workload starts from a clean pool."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_calls(
    fns: Sequence[Callable[[], Any]],
    device: torch.device | str,
    config: TimingConfig = TimingConfig(),  # noqa: B008 - frozen, immutable default
) -> list[float]:
    """Per-call times in ms of calling `fns` eagerly, round-robin.

    Several `fns` rotate through distinct weights so that small-M GEMMs read them from HBM rather
    than from L2 (REFERENCE section 6); pass a one-element list when rotation is not needed.
    On CUDA one sample is one back-to-back round over all `fns` (a chain of eager calls, as a decode
    loop makes them), timed by one CUDA-event pair and divided by len(fns): while the host launches
    faster than the device runs, that is device time; when it cannot keep up, the gaps count. (An
    event pair around each call would instead add the host's time to reach the launch to every call
    that finds the device idle, and measure latency, not what a chain of calls takes.) On a CPU
    device one call is one sample, timed on the host clock.
    """
    if not fns:
        raise ValueError("time_calls: no callables given")
    device = torch.device(device)
    cycle = itertools.cycle(fns)
    for _ in range(config.warmup):
        next(cycle)()
    if device.type == "cuda":
        return _time_cuda(cycle, len(fns), device, config)
    return _time_host(cycle, config)


def _time_host(cycle: itertools.cycle, config: TimingConfig) -> list[float]:
    clock = getattr(time, HOST_CLOCKS[config.clock])  # looked up per call: tests substitute a fake `time`
    times: list[float] = []
    total = 0.0
    while len(times) < config.max_runs and (len(times) < config.min_runs or total < config.budget_ms):
        fn = next(cycle)
        start = clock()
        fn()
        elapsed = (clock() - start) * 1e3
        times.append(elapsed)
        total += elapsed
    return times


def _time_cuda(cycle: itertools.cycle, calls: int, device: torch.device, config: TimingConfig) -> list[float]:
    stream = torch.cuda.current_stream(device)
    torch.cuda.synchronize(device)
    # Probe a round to size the number of rounds within the budget, then time them all in one go.
    start = time.perf_counter()
    for _ in range(calls):
        next(cycle)()
    torch.cuda.synchronize(device)
    per_round_ms = (time.perf_counter() - start) * 1e3
    rounds = int(min(config.max_runs, max(config.min_runs, config.budget_ms / max(per_round_ms, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
    for begin, end in events:
        begin.record(stream)
        for _ in range(calls):
            next(cycle)()
        end.record(stream)
    torch.cuda.synchronize(device)
    return [begin.elapsed_time(end) / calls for begin, end in events]


def time_cuda_graph(
    fns: Sequence[Callable[[], Any]],
    device: torch.device | str,
    config: TimingConfig = TimingConfig(),  # noqa: B008
) -> list[float]:
    """Per-call latencies in ms from CUDA-graph replay: one graph calls every fn once (each on its
    own weight), each replay is timed with an event pair and counts as len(fns) calls.

    Graph replay removes the host's launch overhead, so this measures the kernels themselves (what
    a serving engine that captures graphs sees); `time_calls` measures eager launches.
    """
    device = torch.device(device)
    graph = capture_cuda_graph(fns, device, config.warmup)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize(device)
    per_replay_ms = (time.perf_counter() - start) * 1e3
    replays = int(min(config.max_runs, max(config.min_runs, config.budget_ms / max(per_replay_ms, 1e-3))))
    stream = torch.cuda.current_stream(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for begin, end in events:
        begin.record(stream)
        graph.replay()
        end.record(stream)
    torch.cuda.synchronize(device)
    del graph
    return [begin.elapsed_time(end) / len(fns) for begin, end in events]


def capture_cuda_graph(fns: Sequence[Callable[[], Any]], device: torch.device | str, warmup: int = 1) -> torch.cuda.CUDAGraph:
    """One CUDA graph that calls every fn of `fns` once, in order, after `warmup` (>= 1) eager rounds on a
    side stream (as capture requires: compilation, cuBLAS handles, allocator growth happen there)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"capture_cuda_graph: CUDA graphs need a CUDA device, got {device}")
    if not fns:
        raise ValueError("capture_cuda_graph: no callables given")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            for fn in fns:
                fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return graph


class DeviceClock:
    """A pytest-benchmark timer that reads the GPU's clock instead of the host's.

    Use it as ``@pytest.mark.benchmark(timer=clock)``: pytest-benchmark calls the timer before and after
    each round and records the difference. Each call records a CUDA event on the current stream and
    waits for it, and returns the device time since the first call in seconds, divided by
    `calls_per_round` (set it to the number of linear calls one round makes: one graph replay of N calls,
    or N back-to-back eager calls), so a round's duration is device time per call. Launch gaps inside a
    round are device idle time and count (an eager round whose host cannot keep up shows it); the
    synchronize at each end does not. Sums are accumulated from event-to-event intervals in float64
    (one interval at a time: `elapsed_time` over a long span would lose microseconds to float32).
    `new_event` makes the events (tests pass a fake): anything with ``record()``, ``synchronize()`` and
    ``elapsed_time(later) -> ms``.
    """

    def __init__(self, new_event: Callable[[], Any] | None = None) -> None:
        self._new_event = new_event or (lambda: torch.cuda.Event(enable_timing=True))
        self._last: Any = None
        self._seconds = 0.0
        self.calls_per_round = 1

    def __call__(self) -> float:
        event = self._new_event()
        event.record()
        event.synchronize()
        if self._last is not None:
            self._seconds += self._last.elapsed_time(event) / 1e3 / self.calls_per_round
        self._last = event
        return self._seconds

    def __repr__(self) -> str:
        return "DeviceClock(CUDA events; device seconds per call)"


def reset_peak_memory(device: torch.device | str) -> None:
    """Reset the CUDA allocator's peak counter (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak CUDA memory allocated since the last reset, in MiB; NaN on CPU (not tracked)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return float("nan")
