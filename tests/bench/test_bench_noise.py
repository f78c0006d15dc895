"""Honest CPU numbers: the `noisy` mark (metrics -> report -> Markdown / plots) driven by a fake
timer, the CPU-time clock, and the CLI's thread pinning recorded in the report."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from fp8kit.bench import (
    LinearWorkload,
    TimingConfig,
    get_backend,
    metrics,
    read_csv,
    run_benchmarks,
    timing,
    write_csv,
)
from fp8kit.bench.__main__ import main
from fp8kit.bench.report import speedup_figure, write_markdown

ENV = {"date": "2026-12-01 00:00 UTC", "gpu": "none (CPU run)"}


class FakeClock:
    """A stand-in for the `time` module in fp8kit.bench.timing: each timed call (a pair of clock
    reads) lasts the next of `durations_ms`, cycled; both host clocks read the same fake time."""

    def __init__(self, durations_ms: list[float]) -> None:
        self.durations = durations_ms
        self.now = 100.0
        self.reads = 0

    def _read(self) -> float:
        if self.reads % 2:  # the end of a timed call
            self.now += self.durations[(self.reads // 2) % len(self.durations)] / 1e3
        self.reads += 1
        return self.now

    def module(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(perf_counter=self._read, process_time=self._read)


# ---- the criterion (pure) ---------------------------------------------------------------------


def test_steady_latencies_are_not_noisy():
    stats = metrics.latency_stats([1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 0.97, 1.0, 1.0])
    assert stats["noisy"] is False
    assert stats["latency_spread"] == pytest.approx((1.021 - 0.979) / 1.0)


def test_a_long_tail_is_noisy():
    # The case: most calls fast, a tenth of them a scheduler tick (16 ms) later.
    times = [0.01] * 17 + [16.0] * 3
    stats = metrics.latency_stats(times)
    assert stats["latency_ms_median"] == 0.01
    assert stats["latency_spread"] > 100 and stats["noisy"] is True


def test_a_bimodal_row_is_noisy_though_its_tail_is_short():
    # Half the calls at 1.0 ms, half at 1.4 (the machine got busy half-way, or a timer with two states):
    # p90 is only 1.4x the median, but the median could be anywhere from 1.0 to 1.4.
    stats = metrics.latency_stats([1.0] * 10 + [1.4] * 10)
    assert stats["latency_ms_p90"] < metrics.NOISE_TAIL * stats["latency_ms_median"]
    lo, hi = metrics.median_ci(np.sort([1.0] * 10 + [1.4] * 10))
    assert (lo, hi) == (1.0, 1.4) and stats["noisy"] is True


def test_many_runs_make_a_tail_harmless():
    # 200 calls, a fifth of them 2x slower: the median and its confidence interval sit on the fast mode.
    times = ([1.0, 1.01, 0.99, 1.02, 2.0] * 40)
    stats = metrics.latency_stats(times)
    assert stats["latency_ms_median"] == pytest.approx(1.01) and stats["noisy"] is False
    assert metrics.latency_stats(times[:5])["noisy"] is True  # five such calls: the interval is the whole sample


def test_median_ci_ranks():
    t = np.arange(100, dtype=float)  # ranks 50 -+ 9.8 -> [40, 60]
    assert metrics.median_ci(t) == (40.0, 60.0)
    assert metrics.median_ci(np.array([3.0])) == (3.0, 3.0)


# ---- timing with a fake clock -----------------------------------------------------------------


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_calls_reads_the_configured_clock(monkeypatch, clock):
    fake = FakeClock([2.0, 4.0])
    monkeypatch.setattr(timing, "time", fake.module())
    called = []
    times = timing.time_calls([lambda: called.append(1)], "cpu", TimingConfig(warmup=1, min_runs=4, max_runs=4,
                                                                              budget_ms=1.0, clock=clock))
    assert times == pytest.approx([2.0, 4.0, 2.0, 4.0])
    assert len(called) == 5  # 1 warm-up + 4 timed


def test_timing_config_rejects_an_unknown_clock():
    with pytest.raises(ValueError, match="clock 'sundial' is not one of wall, cpu"):
        TimingConfig(clock="sundial")


def _run(monkeypatch, durations):
    monkeypatch.setattr(timing, "time", FakeClock(durations).module())
    return run_benchmarks(
        [LinearWorkload("proj", m, 32, 64) for m in (1, 8)],
        [get_backend(b) for b in ("torch-fp32", "fp8-dynamic-tensor")],
        device="cpu", timing=TimingConfig(warmup=0, min_runs=20, max_runs=20, budget_ms=1.0), progress=False,
    )


def test_steady_fake_timings_give_no_noisy_row(monkeypatch, tmp_path):
    frame = _run(monkeypatch, [1.0, 1.01, 0.99, 1.0])
    assert not frame["noisy"].any()
    assert not read_csv(write_csv(frame, tmp_path / "r.csv"))["noisy"].any()  # "False" reads back False
    assert frame["latency_ms_median"].tolist() == pytest.approx([1.0] * 4)
    text = write_markdown(frame, tmp_path / "r.md", env=ENV).read_text()
    assert "noisy" not in text


def test_noisy_fake_timings_are_marked_in_the_frame_csv_markdown_and_plot(monkeypatch, tmp_path):
    # One call in four takes a 16 ms tick: p90 is a tick, the median is not.
    frame = _run(monkeypatch, [0.05, 0.05, 0.05, 16.0])
    assert frame["noisy"].all() and (frame["latency_spread"] > 100).all()
    assert frame["latency_ms_median"].tolist() == pytest.approx([0.05] * 4)

    assert read_csv(write_csv(frame, tmp_path / "r.csv"))["noisy"].all()  # survives the CSV round trip

    text = write_markdown(frame, tmp_path / "r.md", env=ENV).read_text()
    assert "**4 of 4 rows are noisy**" in text
    pivot = text.split("## Speedup vs baseline")[1].split("##")[0]
    assert pivot.count("(noisy)") == 4  # every speedup cell, baseline included
    all_rows = text.split("## All rows")[1]
    header = all_rows.strip().splitlines()[0].split(" | ")
    assert "noisy" in header
    assert sum(" | noisy | " in line for line in all_rows.splitlines() if line.startswith("| linear:")) == 4

    fig = speedup_figure(frame, list(frame["backend"].unique()), "torch-fp32")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["torch-fp32", "fp8-dynamic-tensor", "noisy (median not trusted)"]
    hollow = [line for line in ax.get_lines() if line.get_markerfacecolor() == "none"]
    assert sum(len(line.get_xdata()) for line in hollow) == 4  # every point drawn hollow


def test_plot_legend_names_only_the_drawn_styles_and_neighbours_differ(monkeypatch):
    frame = _run(monkeypatch, [1.0])
    fig = speedup_figure(frame, ["torch-fp32", "fp8-dynamic-tensor"], "torch-fp32")
    legend = fig.axes[0].get_legend()
    assert legend.get_title().get_text() == ""  # eager only: no line-style key
    assert [t.get_text() for t in legend.get_texts()] == ["torch-fp32", "fp8-dynamic-tensor"]
    mixed = frame.replace({"backend": {"fp8-dynamic-tensor": "fp8-dynamic-tensor-graph"}})
    legend = speedup_figure(mixed, ["torch-fp32", "fp8-dynamic-tensor-graph"], "torch-fp32").axes[0].get_legend()
    assert legend.get_title().get_text() == "solid eager, dotted CUDA graph"  # no "dashed compiled": none drawn
    lines = fig.axes[0].get_lines()
    colours = [np.asarray(line.get_color()) for line in lines if line.get_label() in ("torch-fp32", "fp8-dynamic-tensor")]
    assert np.abs(colours[0] - colours[1]).max() > 0.3  # not a light / dark pair of one hue
    markers = {line.get_marker() for line in lines if not line.get_label().startswith("_")}
    assert len(markers) == 2


# ---- the CLI pins threads and records them ----------------------------------------------------


def test_cli_pins_one_thread_on_cpu_and_records_it(tmp_path):
    torch.set_num_threads(2)
    out = tmp_path / "bench"
    assert main(["--shapes", "4x32x32", "--backends", "torch-fp32", "--device", "cpu", "--out", str(out), "--quiet",
                 "--min-runs", "2", "--budget-ms", "1"]) == 0
    assert torch.get_num_threads() == 1
    env = json.loads((out / "env.json").read_text())
    assert env["torch_threads"] == "1" and env["cpu_timer"] == "cpu (time.process_time)"
    text = (out / "report.md").read_text()
    assert "| torch_threads | 1 |" in text and "| cpu_timer | cpu (time.process_time) |" in text


def test_cli_threads_option_wins_and_uses_the_wall_clock(tmp_path):
    out = tmp_path / "bench"
    assert main(["--shapes", "4x32x32", "--backends", "torch-fp32", "--device", "cpu", "--out", str(out), "--quiet",
                 "--min-runs", "2", "--budget-ms", "1", "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    env = json.loads((out / "env.json").read_text())
    assert env["torch_threads"] == "2" and env["cpu_timer"] == "wall (time.perf_counter)"


def test_cli_refuses_zero_threads(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--threads", "0", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "--threads 0: give a positive number of threads" in capsys.readouterr().err
