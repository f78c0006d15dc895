"""Speed suites (issue 5 targets 1-3): quantization / scaled-mm backends, the derived columns
(floor_ratio, ceiling_share) from given timings, suite expansion, the CLI, and CSV compatibility."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from fp8kit.bench import (
    EXTRA_COLUMNS,
    QuantWorkload,
    TimingConfig,
    get_backend,
    make_frame,
    read_csv,
    run_benchmarks,
    sqnr_db,
    write_csv,
)
from fp8kit.bench.__main__ import main
from fp8kit.bench.backends import CopyBackend, QuantBackend, ScaledMMBackend
from fp8kit.bench.metrics import ceiling_share, floor_ms, floor_ratio
from fp8kit.bench.report import add_derived, add_quant_floor
from fp8kit.bench.workloads import TORCHAO_BACKENDS
from fp8kit.bench.workloads import SUITES, LinearWorkload, ceiling_backend_id, suite_parts
from fp8kit.core import scaling
from fp8kit.core.errors import ConfigError

FAST = TimingConfig(warmup=1, min_runs=2, max_runs=2, budget_ms=1.0)


# ---------------------------------------------------------------- metrics from given numbers


def test_floor_and_ceiling_metrics_from_given_numbers():
    # 3 bytes x 1e6 elements at 3000 GB/s: 1 us = 0.001 ms
    assert floor_ms(3e6, 3000.0) == pytest.approx(0.001)
    assert floor_ratio(0.0013, 0.001) == pytest.approx(1.3)
    assert ceiling_share(0.8, 1.0) == pytest.approx(0.8)
    for value in (floor_ms(3e6, 0.0), floor_ms(3e6, float("nan")), floor_ratio(0.0, 1.0), ceiling_share(1.0, float("nan"))):
        assert math.isnan(value)


def _quant_row(backend, latency_ms, bytes_moved, *, m=1024, k=1024, status="ok", gbps=None):
    return {
        "workload": f"quant:{m}x{k}", "backend": backend, "dtype": "bf16", "M": m, "K": k, "status": status,
        "latency_ms_median": latency_ms, "bytes_moved": bytes_moved, "device": "cuda:0", "target": "quant",
        "gbps": bytes_moved / (latency_ms * 1e-3) / 1e9 if gbps is None else gbps,
    }


def test_quant_floor_uses_the_copy_row_of_the_same_size_and_timing_mode():
    elems = 1024 * 1024
    rows = [
        _quant_row("copy", 0.004, 4 * elems),  # 4 B/elem in 4 us: 1048.576 GB/s
        _quant_row("copy-graph", 0.002, 4 * elems),  # twice the bandwidth under graphs
        _quant_row("quant-dynamic-token", 0.0039, 3 * elems),  # floor 3 us -> 1.3x
        _quant_row("quant-dynamic-tensor", 0.006, 5 * elems),  # floor 5 us -> 1.2x
        _quant_row("quant-dynamic-token-graph", 0.0018, 3 * elems),  # floor 1.5 us -> 1.2x
        _quant_row("quant-static-tensor", 0.01, 3 * elems, m=16),  # no copy row of M=16: NaN
        _quant_row("quant-static-tensor-torch", float("nan"), 3 * elems, status="error: boom"),
    ]
    frame = add_quant_floor(make_frame(rows)).set_index("backend")
    assert frame.loc["copy", "floor_ratio"] == pytest.approx(1.0)
    assert frame.loc["quant-dynamic-token", "copy_gbps"] == pytest.approx(4 * elems / 4e-6 / 1e9)
    assert frame.loc["quant-dynamic-token", "floor_ms"] == pytest.approx(0.003)
    assert frame.loc["quant-dynamic-token", "floor_ratio"] == pytest.approx(1.3)
    assert frame.loc["quant-dynamic-tensor", "floor_ratio"] == pytest.approx(1.2)
    assert frame.loc["quant-dynamic-token-graph", "floor_ms"] == pytest.approx(0.0015)
    assert frame.loc["quant-dynamic-token-graph", "floor_ratio"] == pytest.approx(1.2)
    assert math.isnan(frame.loc["quant-static-tensor", "floor_ratio"])
    assert math.isnan(frame.loc["quant-static-tensor-torch", "floor_ms"])


def _linear_row(backend, latency_ms, *, m=8192, n=8192, k=8192, target="prefill"):
    return {
        "workload": f"linear:{n}x{k}", "backend": backend, "dtype": "bf16", "M": m, "N": n, "K": k,
        "status": "ok", "latency_ms_median": latency_ms, "device": "cuda:0", "target": target,
    }


def test_ceiling_share_pairs_each_fp8_row_with_its_bare_gemm():
    rows = [
        _linear_row("torch-bf16", 3.0),
        _linear_row("scaled-mm-rowwise", 1.6),
        _linear_row("scaled-mm-rowwise-fastacc", 1.5),
        _linear_row("scaled-mm-tensor", 1.4),
        _linear_row("fp8-dynamic-token", 2.0),  # rowwise ceiling: 1.6 / 2.0
        _linear_row("fp8-dynamic-token-fastacc", 1.875),  # 1.5 / 1.875
        _linear_row("fp8-static-tensor", 1.75),  # 1.4 / 1.75
        _linear_row("fp8-static-tensor-fastacc", 1.4),  # no tensor-fastacc row: fastest eager scaled-mm (1.4)
        _linear_row("fp8-dynamic-token-graph", 1.0),  # no graph ceiling in this frame: NaN
        _linear_row("fp8-dynamic-token", 4.0, m=4096),  # no ceiling of M=4096: NaN
    ]
    frame = add_derived(make_frame(rows), "torch-bf16")
    big = frame[frame["M"] == 8192].set_index("backend")
    assert big.loc["fp8-dynamic-token", "ceiling_backend"] == "scaled-mm-rowwise"
    assert big.loc["fp8-dynamic-token", "ceiling_share"] == pytest.approx(0.8)
    assert big.loc["fp8-dynamic-token-fastacc", "ceiling_share"] == pytest.approx(0.8)
    assert big.loc["fp8-static-tensor", "ceiling_backend"] == "scaled-mm-tensor"
    assert big.loc["fp8-static-tensor", "ceiling_share"] == pytest.approx(0.8)
    assert big.loc["fp8-static-tensor-fastacc", "ceiling_backend"] == "scaled-mm-tensor"
    assert big.loc["fp8-static-tensor-fastacc", "ceiling_share"] == pytest.approx(1.0)
    assert math.isnan(big.loc["fp8-dynamic-token-graph", "ceiling_share"])
    assert big.loc["fp8-dynamic-token-graph", "ceiling_backend"] == ""
    assert math.isnan(frame.loc[frame["M"] == 4096, "ceiling_share"].item())
    assert big.loc["fp8-dynamic-token", "speedup_vs_baseline"] == pytest.approx(1.5)
    assert math.isnan(big.loc["torch-bf16", "ceiling_share"])  # only fp8-* rows get a share


def test_speedup_does_not_mix_targets():
    rows = [
        _linear_row("torch-bf16", 2.0, m=16, target="prefill"),
        _linear_row("torch-bf16", 1.0, m=16, target="decode"),
        _linear_row("fp8-static-tensor", 0.5, m=16, target="decode"),
    ]
    frame = add_derived(make_frame(rows), "torch-bf16")
    assert frame.loc[2, "speedup_vs_baseline"] == pytest.approx(2.0)  # vs the decode bf16 row only


@pytest.mark.parametrize(
    "backend_id,ceiling",
    [
        ("fp8-dynamic-token", "scaled-mm-rowwise"),
        ("fp8-dynamic-token-fastacc-graph", "scaled-mm-rowwise-fastacc-graph"),
        ("fp8-static-tensor", "scaled-mm-tensor"),
        ("fp8-static-tensor-wchannel-fastacc", "scaled-mm-rowwise-fastacc"),
        ("fp8-dynamic-tensor-compiled-graph", "scaled-mm-tensor-graph"),
        ("fp8-dynamic-token-wtensor", "scaled-mm-rowwise"),
        ("fp8-dynamic-group", "scaled-mm-block"),
        ("fp8-dynamic-group-fastacc-compiled-graph", "scaled-mm-block-fastacc-graph"),
        ("torch-bf16", None),
        ("scaled-mm-tensor", None),
    ],
)
def test_ceiling_backend_id(backend_id, ceiling):
    assert ceiling_backend_id(backend_id) == ceiling


# ---------------------------------------------------------------- backends on CPU


@pytest.mark.parametrize("scheme", ["dynamic-token", "static-tensor", "dynamic-tensor"])
def test_quant_backends_match_the_torch_reference_bit_for_bit(scheme):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 64, generator=gen) * 3  # (M, K), M not a power of two
    static_scale = scaling.tensor_scale(x) * 0.5  # clips: static values beyond the scale saturate
    outs = {
        impl: get_backend(f"quant-{scheme}{impl}").build_quant(static_scale)(x) for impl in ("", "-torch")
    }
    activation, granularity = scheme.split("-")
    expected_scale = {
        "token": x.double().abs().amax(dim=1, keepdim=True) / 448,
        "tensor": x.double().abs().amax() / 448,
    }[granularity]
    if activation == "static":
        expected_scale = static_scale.double()
    for q, scale in outs.values():
        assert q.dtype == torch.float8_e4m3fn and q.shape == (7, 64)
        torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-7, atol=0)
        # x / scale in float64 rounds to the same float32 as a float32 division (53 >= 2 * 24 + 2 bits)
        expected_q = (x.double() / scale.double()).clamp(-448, 448).float().to(torch.float8_e4m3fn)
        assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))
    (q_a, s_a), (q_b, s_b) = outs.values()
    assert torch.equal(q_a.view(torch.uint8), q_b.view(torch.uint8)) and torch.equal(s_a, s_b)


def test_group_quant_backends_match_the_float64_reference_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 300, generator=gen) * torch.tensor([1.0, 1e3, 1e-3]).repeat_interleave(128)[:300]  # 3 groups, last partial
    expected_scale = torch.stack([g.abs().amax(dim=1) for g in x.double().split(128, dim=1)], dim=1) / 448  # (7, 3)
    per_element = expected_scale.repeat_interleave(128, dim=1)[:, :300]
    expected_q = (x.double() / per_element).clamp(-448, 448).float().to(torch.float8_e4m3fn)
    for impl in ("", "-torch"):
        q, scale = get_backend(f"quant-dynamic-group{impl}").build_quant(torch.tensor(1.0))(x)
        assert scale.shape == (7, 3)
        torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-7, atol=0)
        assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8)), impl


def test_block_rows_on_cpu_run_fp8linear_and_say_why_the_bare_gemm_cannot():
    frame = run_benchmarks(
        [QuantWorkload(4, 256), LinearWorkload("p", 4, 160, 256)],
        [get_backend(b) for b in ("torch-fp32", "fp8-dynamic-group", "scaled-mm-block", "quant-dynamic-group", "copy")],
        device="cpu", timing=FAST, progress=False,
    )
    rows = frame.set_index(["workload", "backend"])
    assert rows.loc[("linear:p", "fp8-dynamic-group"), "status"] == "ok"
    assert rows.loc[("linear:p", "fp8-dynamic-group"), "sqnr_db"] > 20
    assert rows.loc[("linear:p", "scaled-mm-block"), "status"] == (
        "not run: torch's block-wise scaled GEMM needs a CUDA GPU of compute capability 9.0, not device type 'cpu'"
    )
    assert rows.loc[("quant:4x256", "quant-dynamic-group"), "status"] == "ok"
    assert rows.loc[("quant:4x256", "quant-dynamic-group"), "bytes_moved"] == 4 * 256 * (4 + 1)


def test_quant_bytes_are_the_algorithms_floor():
    bf16 = torch.bfloat16
    assert get_backend("quant-dynamic-token").quant_bytes(8192, 8192, bf16) == 3 * 8192 * 8192
    assert get_backend("quant-static-tensor-torch").quant_bytes(8192, 8192, bf16) == 3 * 8192 * 8192
    assert get_backend("quant-dynamic-tensor").quant_bytes(8192, 8192, bf16) == 5 * 8192 * 8192
    assert get_backend("copy").quant_bytes(8192, 8192, bf16) == 4 * 8192 * 8192
    assert get_backend("quant-dynamic-tensor-graph").quant_bytes(16, 4096, bf16) == 5 * 16 * 4096


@pytest.mark.parametrize("scaling_kind", ["rowwise", "tensor"])
def test_scaled_mm_backend_is_fp8_matmul_on_pre_quantized_inputs(scaling_kind):
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(48, 64, generator=gen) / 8  # (N, K)
    x = torch.randn(5, 64, generator=gen)  # (M, K)
    backend = get_backend(f"scaled-mm-{scaling_kind}")
    prepared = backend.prepare_input(x)
    out = backend.build_linear(weight, x)(prepared)  # (M, N)
    x_scale = scaling.rowwise_scale(x) if scaling_kind == "rowwise" else scaling.tensor_scale(x)
    w_scale = scaling.rowwise_scale(weight) if scaling_kind == "rowwise" else scaling.tensor_scale(weight)
    expected = scaling.fp8_matmul(
        scaling.quantize(x, x_scale), scaling.quantize(weight, w_scale), x_scale, w_scale, out_dtype=torch.float32
    )
    assert out.shape == (5, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert sqnr_db(out, x.double() @ weight.double().T) > 20.0


@pytest.mark.parametrize(
    "backend_id,cls",
    [
        ("copy", CopyBackend),
        ("quant-dynamic-token", QuantBackend),
        ("quant-static-tensor-torch-compiled", QuantBackend),
        ("scaled-mm-rowwise-fastacc", ScaledMMBackend),
    ],
)
def test_new_ids_round_trip(backend_id, cls):
    backend = get_backend(backend_id)
    assert isinstance(backend, cls) and backend.id == backend_id
    graph = get_backend(backend_id + "-graph")
    assert graph.id == backend_id + "-graph" and graph.kind == backend.kind and graph.cuda_graph


@pytest.mark.parametrize("bad", ["quant-static-token", "quant-dynamic-token-triton", "scaled-mm-blockwise", "copy-fast"])
def test_bad_new_ids_raise(bad):
    with pytest.raises(ConfigError, match="unknown backend|not a scheme"):
        get_backend(bad)


class _WrongScale(QuantBackend):
    def build_quant(self, static_scale):
        inner = super().build_quant(static_scale)

        def run(x):
            q, scale = inner(x)
            return q, scale * 1.01

        return run


def test_a_quantizer_returning_a_wrong_scale_is_flagged():
    frame = run_benchmarks(
        [QuantWorkload(4, 32)], [get_backend("copy"), _WrongScale("dynamic", "token", "torch")],
        device="cpu", timing=FAST, progress=False,
    )
    status = frame.set_index("backend")["status"]
    assert status["copy"] == "ok"
    assert status["quant-dynamic-token-torch"].startswith("error: scale differs from amax / 448 by 1.00e-02")


def test_mixed_workloads_pair_only_with_their_kind_of_backend():
    frame = run_benchmarks(
        [QuantWorkload(4, 32), LinearWorkload("p", 4, 32, 32)],
        [get_backend(b) for b in ("torch-fp32", "copy", "quant-static-tensor", "copy-graph")],
        device="cpu", timing=FAST, progress=False,
    )
    pairs = set(zip(frame["workload"], frame["backend"]))
    assert pairs == {("linear:p", "torch-fp32"), ("quant:4x32", "copy"), ("quant:4x32", "quant-static-tensor"),
                     ("quant:4x32", "copy-graph")}
    rows = frame.set_index("backend")
    assert rows.loc["copy-graph", "status"] == "not run: CUDA-graph timing needs a CUDA GPU"
    assert rows.loc["quant-static-tensor", "bytes_moved"] == 4 * 32 * (4 + 1)  # fp32 run: read 4 B, write 1 B
    assert rows.loc["quant-static-tensor", "floor_ratio"] == pytest.approx(
        rows.loc["quant-static-tensor", "latency_ms_median"] / (5 / 8 * rows.loc["copy", "latency_ms_median"])
    )


# ---------------------------------------------------------------- suites


def test_h100_speed_suite_expands_to_the_issue_grid():
    parts = {p.target: p for p in suite_parts("h100-speed")}
    assert list(parts) == ["quant", "prefill", "decode"]
    assert {(w.m, w.k) for w in parts["quant"].workloads} == {(8192, 8192), (1, 4096), (8, 4096), (16, 4096)}
    prefill = {(w.m, w.n, w.k) for w in parts["prefill"].workloads}
    shapes = {(8192, 8192), (4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336)}
    assert prefill == {(m, n, k) for m in (1024, 4096, 8192) for n, k in shapes}
    decode = {(w.m, w.n, w.k) for w in parts["decode"].workloads}
    assert decode == {(m, n, k) for m in (1, 8, 16) for n, k in ((14336, 4096), (4096, 14336))}
    assert all(w.target == t for t, p in parts.items() for w in p.workloads)
    assert parts["decode"].rotate_bytes >= 256 * 2**20  # several hundred MB: weights come from HBM

    schemes = ("dynamic-token", "static-tensor", "dynamic-tensor")
    assert {"copy", "copy-graph"} <= set(parts["quant"].backends)
    for scheme in schemes:
        assert {f"quant-{scheme}", f"quant-{scheme}-torch", f"quant-{scheme}-torch-compiled"} <= set(parts["quant"].backends)
        for fa in ("", "-fastacc"):
            for target in ("prefill", "decode"):  # eager and CUDA graph, each with its ceiling row
                for backend_id in (f"fp8-{scheme}{fa}", f"fp8-{scheme}{fa}-graph"):
                    assert backend_id in parts[target].backends
                    assert ceiling_backend_id(backend_id) in parts[target].backends
    for target in ("prefill", "decode"):
        assert {"torch-bf16", "torch-bf16-graph"} <= set(parts[target].backends)
    for suite in SUITES.values():  # every id parses
        for part in suite:
            for backend_id in part.backends:
                get_backend(backend_id)


def test_h200_block_suite_expands_to_the_issue_grid():
    parts = {p.target: p for p in suite_parts("h200-block")}
    assert list(parts) == ["quant", "prefill", "decode"]
    shapes = {(8192, 8192), (14336, 4096), (4096, 14336)}
    assert {(w.m, w.n, w.k) for w in parts["prefill"].workloads} == {(8192, n, k) for n, k in shapes}
    assert {(w.m, w.n, w.k) for w in parts["decode"].workloads} == {(m, n, k) for m in (1, 8, 16) for n, k in shapes}
    assert parts["decode"].rotate_bytes >= 256 * 2**20
    for target, suffix in (("prefill", ""), ("decode", "-graph")):  # decode under CUDA graphs only
        backends = set(parts[target].backends)
        assert all(b.endswith("-graph") for b in backends) == (suffix == "-graph")
        assert "torch-bf16" + suffix in backends
        for scheme in ("fp8-dynamic-group", "fp8-dynamic-token", "fp8-dynamic-token-fastacc"):  # block beside per-token
            assert scheme + suffix in backends and ceiling_backend_id(scheme + suffix) in backends
        assert not [b for b in backends if "group-fastacc" in b or "block-fastacc" in b]  # torch has none
    assert {"copy", "quant-dynamic-group", "copy-graph", "quant-dynamic-group-graph"} <= set(parts["quant"].backends)
    assert {(w.m, w.k) for w in parts["quant"].workloads} >= {(8192, 4096), (8192, 14336), (1, 4096)}


def test_h200_decode_suite_expands_to_the_issue_grid():
    parts = {p.target: p for p in suite_parts("h200-decode")}
    assert list(parts) == ["quant", "prefill", "decode"]
    assert {(w.m, w.n, w.k) for w in parts["prefill"].workloads} == {(8192, 8192, 8192)}  # the no-regression row
    assert {(w.m, w.n, w.k) for w in parts["decode"].workloads} == {
        (m, n, k) for m in (1, 8, 16) for n, k in ((14336, 4096), (4096, 14336))
    }
    assert parts["decode"].rotate_bytes >= 512 * 2**20
    decode = set(parts["decode"].backends)
    for scheme in ("fp8-dynamic-token", "fp8-static-tensor", "fp8-dynamic-tensor", "torch-bf16"):
        assert {scheme, scheme + "-graph"} <= decode  # eager chains and CUDA graphs
    assert {"scaled-mm-rowwise-fastacc-graph", "scaled-mm-tensor-fastacc-graph"} <= decode  # the GEMM ceilings
    peers = {p.target: p for p in suite_parts("h200-peers")}
    assert {b for b in TORCHAO_BACKENDS if "compiled" not in b} <= set(peers["decode"].backends)  # eager, replayed
    assert {"torch-bf16", "torch-bf16-graph", "fp8-dynamic-token-graph"} <= set(peers["decode"].backends)
    assert peers["decode"].workloads == parts["decode"].workloads and peers["decode"].rotate_bytes == parts["decode"].rotate_bytes
    assert {"torchao-fp8-row", "torchao-fp8-tensor", "torch-bf16"} <= set(peers["prefill"].backends)
    assert {"copy", "quant-dynamic-token", "quant-dynamic-token-graph"} <= set(parts["quant"].backends)
    for part in [*parts.values(), *peers.values()]:
        for backend_id in part.backends:
            get_backend(backend_id)


def test_suite_parts_filter_and_errors():
    assert [p.target for p in suite_parts("h100-speed", ["decode", "quant"])] == ["quant", "decode"]
    with pytest.raises(ConfigError, match="unknown suite 'h200'"):
        suite_parts("h200")
    with pytest.raises(ConfigError, match="--targets: speed given; choose from quant, prefill, decode"):
        suite_parts("h100-speed", ["speed"])


@pytest.fixture(scope="module")
def cpu_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    code = main(["--suite", "cpu-speed", "--device", "cpu", "--out", str(out), "--quiet",
                 "--warmup", "1", "--min-runs", "2", "--max-runs", "2", "--budget-ms", "1"])
    assert code == 0
    return out, read_csv(out / "cpu-speed.csv")


def test_cli_suite_writes_every_target_with_derived_columns(cpu_suite):
    out, frame = cpu_suite
    assert {"cpu-speed.csv", "cpu-speed.md", "cpu-speed.env.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "report.csv").exists()
    assert (frame["status"] == "ok").all(), frame.loc[frame["status"] != "ok", ["backend", "status"]]
    counts = frame.groupby("target").size().to_dict()
    parts = {p.target: p for p in suite_parts("cpu-speed")}
    assert counts == {t: len(p.workloads) * len(p.backends) for t, p in parts.items()}

    quant = frame[frame["target"] == "quant"]
    assert (quant["workload"].str.startswith("quant:")).all() and quant["N"].isna().all()
    copy = quant[quant["backend"] == "copy"].set_index("M")
    for _, row in quant.iterrows():  # floor recomputed from the row's own timings and its copy row
        copy_gbps = copy.loc[row["M"], "gbps"]
        assert row["copy_gbps"] == pytest.approx(copy_gbps)
        assert row["floor_ratio"] == pytest.approx(row["latency_ms_median"] / (row["bytes_moved"] / (copy_gbps * 1e6)))
    assert copy["floor_ratio"].tolist() == pytest.approx([1.0, 1.0])
    assert (quant.loc[quant["backend"] != "copy", "sqnr_db"] > 25).all()  # one FP8 rounding: ~31 dB

    linear = frame[frame["target"].isin(["prefill", "decode"])]
    fp8 = linear[linear["backend"].str.startswith("fp8-")]
    assert (fp8["ceiling_backend"] == fp8["backend"].map(ceiling_backend_id)).all()
    ceiling = linear.set_index(["target", "M", "backend"])["latency_ms_median"]
    for _, row in fp8.iterrows():
        expected = ceiling[(row["target"], row["M"], row["ceiling_backend"])] / row["latency_ms_median"]
        assert row["ceiling_share"] == pytest.approx(expected)
    base = linear[linear["backend"] == "torch-fp32"]
    assert (base["speedup_vs_baseline"] == 1.0).all() and len(base) == 4
    assert "## Target `quant`" in (out / "cpu-speed.md").read_text()


def test_suite_csv_round_trip(cpu_suite, tmp_path):
    _, frame = cpu_suite
    back = read_csv(write_csv(frame, tmp_path / "again.csv"))
    pd.testing.assert_frame_equal(back, frame, check_exact=False, rtol=1e-12)
    assert (back["target"] != "").all() and back["bytes_moved"].notna().all()


def test_reports_without_the_new_columns_still_read(tmp_path):
    old = make_frame([_linear_row("torch-bf16", 1.0)]).drop(columns=["target", "impl", "ceiling_share", "floor_ratio"])
    path = tmp_path / "old.csv"
    old.to_csv(path, index=False)
    back = read_csv(path)
    assert set(EXTRA_COLUMNS) <= set(back.columns)
    assert back.loc[0, "target"] == "" and math.isnan(back.loc[0, "ceiling_share"])
    assert back.loc[0, "latency_ms_median"] == 1.0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--suite", "cpu-speed", "--shapes", "4x32x32"], "--suite cpu-speed sets the workloads and backends itself; drop --shapes"),
        (["--targets", "quant"], "--targets needs --suite"),
        (["--suite", "nope"], "unknown suite 'nope'"),
        (["--suite", "cpu-speed", "--targets", "prefil"], "--targets: prefil given"),
    ],
)
def test_cli_suite_bad_input_exits_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--device", "cpu", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
