"""The report DataFrame schema, its writers (CSV / Markdown / PNG), and pytest-benchmark JSON conversion."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from fp8kit.bench import COLUMNS, from_pytest_benchmark_json, make_frame, read_csv, to_markdown, write_report
from fp8kit.bench.report import add_speedup, speedup_pivot

ISSUE_COLUMNS = (
    "workload, backend, dtype, M, N, K, runs, latency_ms_median, latency_ms_p90, latency_ms_p99, "
    "latency_ms_mean, latency_ms_std, tflops, gbps, speedup_vs_baseline, rel_error, sqnr_db, "
    "peak_mem_mb, weight_bytes, status"
).split(", ")

ENV = {"date": "2026-11-25 00:00 UTC", "gpu": "test GPU", "torch": "2.x", "tensorrt": "not installed"}


def _row(backend, m, latency, *, status="ok", sqnr=28.0, workload="linear:proj", n=64, k=32):
    row = {"workload": workload, "backend": backend, "dtype": "bf16", "M": m, "N": n, "K": k, "status": status}
    if status == "ok":
        row.update(
            runs=10,
            latency_ms_median=latency,
            latency_ms_p90=latency * 1.1,
            latency_ms_p99=latency * 1.2,
            latency_ms_mean=latency,
            latency_ms_std=0.01,
            tflops=1.5,
            gbps=100.0,
            rel_error=10 ** (-sqnr / 20),
            sqnr_db=sqnr,
            peak_mem_mb=12.5,
            weight_bytes=n * k,
            device="cuda:0",
        )
    return row


@pytest.fixture
def frame() -> pd.DataFrame:
    rows = [
        _row("torch-bf16", 1, 0.02, sqnr=55.0),
        _row("torch-bf16", 16, 0.04, sqnr=55.0),
        _row("fp8-dynamic-token", 1, 0.04),  # slower than bf16: 0.5x
        _row("fp8-dynamic-token", 16, 0.02),  # faster: 2x
        _row("tensorrt-fp8", 1, 0.0, status="not run: tensorrt not installed"),
        {"workload": "model:tiny", "backend": "torch-bf16", "dtype": "bf16", "M": 64, "status": "ok",
         "latency_ms_median": 1.0, "top1_agreement": 1.0, "sqnr_db": 40.0, "device": "cuda:0"},
    ]
    return add_speedup(make_frame(rows), "torch-bf16")


def test_schema_has_the_issue_columns_first(frame):
    assert list(COLUMNS) == ISSUE_COLUMNS
    assert list(frame.columns[: len(COLUMNS)]) == ISSUE_COLUMNS
    for column in ("M", "N", "K", "runs", "weight_bytes"):
        assert pd.api.types.is_integer_dtype(frame[column]), column
    for column in ("latency_ms_median", "tflops", "speedup_vs_baseline", "sqnr_db", "peak_mem_mb"):
        assert pd.api.types.is_float_dtype(frame[column]), column
    model = frame[frame["workload"] == "model:tiny"].iloc[0]
    assert model["N"] is pd.NA and model["K"] is pd.NA  # numeric column, missing value


def test_speedup_is_baseline_over_row_within_a_shape(frame):
    fp8 = frame[frame["backend"] == "fp8-dynamic-token"].set_index("M")["speedup_vs_baseline"]
    assert fp8[1] == pytest.approx(0.5)
    assert fp8[16] == pytest.approx(2.0)
    assert (frame[frame["backend"] == "torch-bf16"]["speedup_vs_baseline"] == 1.0).all()
    not_run = frame[frame["backend"] == "tensorrt-fp8"].iloc[0]
    assert math.isnan(not_run["speedup_vs_baseline"]) and math.isnan(not_run["latency_ms_median"])


def test_speedup_of_graph_rows_uses_the_graph_baseline_and_skips_other_devices():
    rows = [
        _row("torch-bf16", 1, 0.03),
        _row("torch-bf16-graph", 1, 0.01),
        _row("fp8-dynamic-token-graph", 1, 0.005),
        {**_row("ort-cpu", 1, 0.5), "device": "cpu"},
    ]
    frame = add_speedup(make_frame(rows), "torch-bf16")
    by_backend = frame.set_index("backend")["speedup_vs_baseline"]
    assert by_backend["fp8-dynamic-token-graph"] == pytest.approx(2.0)  # vs torch-bf16-graph, not eager
    assert math.isnan(by_backend["ort-cpu"])  # CPU row vs a GPU baseline: no speedup


def test_csv_round_trip_keeps_values_and_dtypes(frame, tmp_path):
    paths = write_report(frame, tmp_path, env=ENV, command="python -m fp8kit.bench --m 1,16")
    back = read_csv(paths["csv"])
    assert list(back.columns) == list(frame.columns)
    pd.testing.assert_frame_equal(back, frame, check_exact=False, rtol=1e-12)
    assert back.loc[back["backend"] == "tensorrt-fp8", "status"].item() == "not run: tensorrt not installed"


def test_read_csv_rejects_foreign_files(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_csv(path)


def test_markdown_report_has_env_pivot_and_marks_slower_rows(frame, tmp_path):
    paths = write_report(frame, tmp_path, env=ENV, command="python -m fp8kit.bench --m 1,16")
    text = Path(paths["markdown"]).read_text()
    assert "| gpu | test GPU |" in text
    assert "Reproduce: `python -m fp8kit.bench --m 1,16`" in text
    assert "**0.50x**" in text  # FP8 slower than bf16 is shown, in bold
    assert "| 2.00x |" in text
    assert "not run: tensorrt not installed" in text
    pivot = speedup_pivot(frame)
    assert pivot.loc[("linear:proj", 64.0, 32.0, 1), "fp8-dynamic-token"] == pytest.approx(0.5)


def test_to_markdown_table_shape_and_escaping():
    frame = make_frame([{"workload": "a|b", "backend": "x", "status": "ok", "M": 1, "speedup_vs_baseline": 1.234}])
    lines = to_markdown(frame, ["workload", "M", "speedup_vs_baseline"]).splitlines()
    assert lines[0] == "| workload | M | speedup_vs_baseline |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| a\\|b | 1 | 1.23x |"


def test_png_plots_are_valid_images(frame, tmp_path):
    paths = write_report(frame, tmp_path, env=ENV)
    plots = paths["plots"]
    names = sorted(p.name for p in plots)
    assert names == ["accuracy_sqnr.png", "speedup_64x32.png"]
    for path in plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] > 300 and image.size[1] > 200


PYTEST_BENCHMARK_DOC = {
    "machine_info": {"node": "x"},
    "benchmarks": [
        {
            "group": "16x64x32",
            "name": "test_linear[16x64x32-torch-bf16]",
            "fullname": "tests/benchmarks/test_bench_linear.py::test_linear[16x64x32-torch-bf16]",
            "extra_info": {"workload": "linear:proj", "backend": "torch-bf16", "dtype": "bf16", "M": 16, "N": 64,
                           "K": 32, "flops": 65536, "sqnr_db": 55.0, "rel_error": 1.8e-3, "weight_bytes": 4096},
            "stats": {"min": 0.0009, "max": 0.0012, "mean": 0.001, "stddev": 0.0001, "rounds": 4,
                      "median": 0.001, "data": [0.0009, 0.001, 0.001, 0.0012]},
        },
        {
            "group": "16x64x32",
            "name": "test_linear[16x64x32-fp8-dynamic-token]",
            "fullname": "tests/benchmarks/test_bench_linear.py::test_linear[16x64x32-fp8-dynamic-token]",
            "extra_info": {"workload": "linear:proj", "backend": "fp8-dynamic-token", "dtype": "fp8-e4m3/bf16",
                           "M": 16, "N": 64, "K": 32, "flops": 65536, "sqnr_db": 28.5, "rel_error": 0.037},
            "stats": {"min": 0.0004, "max": 0.0006, "mean": 0.0005, "stddev": 0.00005, "rounds": 3,
                      "median": 0.0005},
        },
    ],
}


def test_pytest_benchmark_json_conversion_known_values(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(PYTEST_BENCHMARK_DOC))
    frame = from_pytest_benchmark_json(path)
    assert list(frame.columns[: len(COLUMNS)]) == list(COLUMNS)
    bf16, fp8 = frame.iloc[0], frame.iloc[1]
    assert (bf16["backend"], bf16["M"], bf16["N"], bf16["K"], bf16["runs"]) == ("torch-bf16", 16, 64, 32, 4)
    assert bf16["latency_ms_median"] == pytest.approx(1.0)  # seconds -> ms
    assert bf16["latency_ms_std"] == pytest.approx(0.1)
    assert bf16["latency_ms_p90"] == pytest.approx(1.14)  # raw data sorted, position 2.7: 1.0 + 0.7 * (1.2 - 1.0)
    assert bf16["tflops"] == pytest.approx(65536 / 1e-3 / 1e12)
    assert math.isnan(fp8["latency_ms_p90"])  # no raw data kept
    assert fp8["speedup_vs_baseline"] == pytest.approx(2.0)
    assert fp8["sqnr_db"] == 28.5 and fp8["status"] == "ok"


def test_pytest_benchmark_json_rejects_other_documents():
    with pytest.raises(ValueError, match="pytest-benchmark"):
        from_pytest_benchmark_json({"rows": []})


def test_real_pytest_benchmark_output_converts(tmp_path):
    """Run pytest-benchmark for real on a tiny file, then convert its JSON."""
    test_file = tmp_path / "test_tiny_bench.py"
    test_file.write_text(textwrap.dedent('''
        import torch

        def test_tiny(benchmark):
            x, w = torch.randn(4, 32), torch.randn(16, 32)
            benchmark.group = "4x16x32"
            benchmark.extra_info.update(workload="linear:tiny", backend="torch-fp32", dtype="fp32",
                                        M=4, N=16, K=32, sqnr_db=99.0)
            benchmark.pedantic(torch.nn.functional.linear, args=(x, w), rounds=5, iterations=1, warmup_rounds=1)
    '''))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider", "--benchmark-only",
         f"--benchmark-json={out}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    frame = from_pytest_benchmark_json(out)
    row = frame.iloc[0]
    assert (row["workload"], row["backend"], row["M"], row["runs"], row["status"]) == ("linear:tiny", "torch-fp32", 4, 5, "ok")
    assert row["latency_ms_median"] > 0 and row["tflops"] > 0
    assert row["latency_ms_p90"] >= row["latency_ms_median"]
    assert row["speedup_vs_baseline"] == 1.0
