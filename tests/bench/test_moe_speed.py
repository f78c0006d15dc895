"""`--suite moe` (fp8kit.bench.moe_speed) on a CPU: tiny MoE block, the same rows a GPU run writes."""

import torch

from fp8kit.bench.__main__ import main
from fp8kit.bench.moe_speed import FP8_SCHEMES, MOE_SHAPES, build_block, run_moe_speed
from fp8kit.bench.report import read_csv
from fp8kit.bench.timing import TimingConfig

FAST = TimingConfig(warmup=0, min_runs=1, max_runs=1, budget_ms=1.0)


def test_blocks_are_transformers_grouped_mm_blocks_with_the_named_shapes():
    block = build_block(MOE_SHAPES["tiny"], "cpu", torch.float32)
    assert type(block).__name__ == "MixtralSparseMoeBlock"
    assert block.experts.config._experts_implementation == "grouped_mm"
    assert tuple(block.experts.gate_up_proj.shape) == (4, 64, 64) and tuple(block.experts.down_proj.shape) == (4, 64, 32)
    again = build_block(MOE_SHAPES["tiny"], "cpu", torch.float32)
    assert torch.equal(block.experts.down_proj, again.experts.down_proj)  # seeded: the same weights every run


def test_rows_prefill_timed_decode_needs_cuda():
    frame = run_moe_speed(("tiny",), prefill_tokens=(16,), decode_tokens=(1,), device="cpu", timing=FAST)
    prefill = frame[frame["target"] == "prefill"].set_index("backend")
    assert list(prefill.index) == ["torch-bf16", *FP8_SCHEMES]
    assert (prefill["status"] == "ok").all() and (prefill["M"] == 16).all()
    assert prefill.loc["torch-bf16", "impl"] == "transformers grouped_mm"
    assert prefill.loc["fp8-tensor", "impl"] == "fp8_matmul loop"
    assert prefill.loc["torch-bf16", "speedup_vs_baseline"] == 1.0
    # bf16 rounding against the fp32 block (~50 dB) vs FP8 (two quantized GEMMs, ~25 dB)
    assert prefill.loc["torch-bf16", "sqnr_db"] > 40 and all(15 < prefill.loc[s, "sqnr_db"] < 35 for s in FP8_SCHEMES)
    decode = frame[frame["target"] == "decode"]
    assert list(decode["backend"]) == ["torch-bf16-graph"] + [f"{s}-graph" for s in FP8_SCHEMES]
    assert (decode["status"] == "not run: CUDA graphs need a CUDA GPU; this run is on cpu").all()


def test_cli_suite_moe_writes_its_report(tmp_path, capsys):
    assert main(["--suite", "moe", "--out", str(tmp_path), "--quiet", "--min-runs", "1", "--max-runs", "1", "--warmup", "0", "--budget-ms", "1"]) == 0
    frame = read_csv(tmp_path / "moe.csv")
    assert set(frame["workload"]) == {"moe-tiny"} and (tmp_path / "moe.md").is_file()
    assert "rows ran" in capsys.readouterr().out
