"""run_benchmarks end to end on tiny workloads, and the CLI (success and bad input)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fp8kit.bench import COLUMNS, LinearWorkload, ModelWorkload, TimingConfig, get_backend, read_csv, run_benchmarks
from fp8kit.bench.__main__ import main
from fp8kit.bench.workloads import linear_grid, parse_m_values

FAST = TimingConfig(warmup=1, min_runs=3, max_runs=3, budget_ms=1.0)
REPO = Path(__file__).resolve().parents[2]


def tiny_llama(spec, dtype, device):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval(), None


def test_linear_rows_have_timings_accuracy_and_speedup():
    frame = run_benchmarks(
        [LinearWorkload("proj", m, 32, 64) for m in (1, 8)],
        [get_backend(b) for b in ("torch-fp32", "fp8-dynamic-tensor", "fp8-static-tensor")],
        device="cpu", timing=FAST, progress=False,
    )
    assert list(frame.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert len(frame) == 6 and (frame["status"] == "ok").all()
    assert (frame["runs"] == 3).all()
    assert (frame["latency_ms_p99"] >= frame["latency_ms_median"]).all()
    base = frame[frame["backend"] == "torch-fp32"]
    assert (base["speedup_vs_baseline"] == 1.0).all() and (base["sqnr_db"] > 100).all()  # fp32 vs float64
    fp8 = frame[frame["backend"] != "torch-fp32"]
    assert fp8["sqnr_db"].between(20, 40).all()  # the E4M3 bound: ~28 dB for a W8A8 GEMM
    assert (fp8["weight_bytes"] < base["weight_bytes"].iloc[0] / 3).all()  # 1 byte vs 4 per weight
    expected_tflops = 2 * 8 * 32 * 64 / (frame["latency_ms_median"] * 1e-3) / 1e12
    m8 = frame["M"] == 8
    assert frame.loc[m8, "tflops"].to_numpy() == pytest.approx(expected_tflops[m8].to_numpy())
    assert frame.attrs["baseline"] == "torch-fp32"


def test_model_rows_have_top1_agreement_and_quantized_weights():
    frame = run_benchmarks(
        [ModelWorkload("tiny", 2, 8)],
        [get_backend(b) for b in ("torch-fp32", "fp8-dynamic-token", "fp8-static-tensor")],
        device="cpu", timing=FAST, progress=False, model_loader=tiny_llama,
    )
    assert (frame["status"] == "ok").all(), frame["status"].tolist()
    assert (frame["M"] == 16).all() and frame["N"].isna().all()
    base, fp8 = frame.iloc[0], frame.iloc[1:]
    assert base["top1_agreement"] == 1.0 and base["speedup_vs_baseline"] == 1.0
    assert (fp8["top1_agreement"] > 0.5).all() and (fp8["sqnr_db"] > 15).all()
    assert (fp8["weight_bytes"] < base["weight_bytes"]).all()


def test_unloadable_model_gives_not_run_rows():
    def broken(spec, dtype, device):
        raise FileNotFoundError(f"{spec}: no such directory")

    frame = run_benchmarks([ModelWorkload("/nope", 1, 4)], [get_backend("torch-fp32")], device="cpu",
                           timing=FAST, progress=False, model_loader=broken)
    assert frame["status"].item() == "not run: model '/nope' could not be loaded: FileNotFoundError: /nope: no such directory"


def test_grid_parsing():
    grid = linear_grid("cpu-small,2x32x64", (1, 16))
    assert len(grid) == 3 * 2 + 1
    assert LinearWorkload("32x64", 2, 32, 64) in grid
    assert parse_m_values("16, 1,16") == (1, 16)
    assert parse_m_values("gpu") == (1, 16, 128, 1024, 4096, 8192)


def test_cli_small_run_writes_the_report(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["--shapes", "4x32x32,8x64x32", "--backends", "torch-fp32,fp8-dynamic-token,tensorrt-fp8",
                 "--device", "cpu", "--out", str(out), "--quiet", "--min-runs", "2", "--budget-ms", "1"])
    assert code == 0
    assert "4/6 rows ran" in capsys.readouterr().out
    frame = read_csv(out / "report.csv")
    assert set(frame["backend"]) == {"torch-fp32", "fp8-dynamic-token", "tensorrt-fp8"}
    assert (frame.loc[frame["backend"] == "tensorrt-fp8", "status"] == "not run: tensorrt not installed").all()
    assert {"report.md", "report.csv", "env.json", "speedup_32x32.png", "speedup_64x32.png"} <= {p.name for p in out.iterdir()}
    assert "python -m fp8kit.bench --shapes 4x32x32,8x64x32" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--shapes", "4096x4096"], "--shapes: '4096x4096' is neither a preset"),
        (["--shapes", "0x16x16"], "zero dimension"),
        (["--m", "1,-3"], "--m: '-3' is not a positive integer"),
        (["--backends", "fp8-static-token"], "static activation scales are per tensor"),
        (["--backends", "cuda-magic"], "unknown backend 'cuda-magic'"),
        (["--device", "tpu"], "--device"),
        (["--baseline", "torch-fp16", "--backends", "torch-fp32"], "--baseline 'torch-fp16' is not among --backends"),
        (["--shapes", "none"], "nothing to run"),
        (["--model", "default", "--batch", "0"], "--batch: '0' is not a positive integer"),
    ],
)
def test_cli_bad_input_exits_2_with_a_clear_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage:" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    env_path = ":".join(str(REPO / "packages" / p / "src") for p in ("core", "export", "bench"))
    proc = subprocess.run(
        [sys.executable, "-m", "fp8kit.bench", "--shapes", "banana"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": env_path},
    )
    assert proc.returncode == 2
    assert "error: --shapes: 'banana' is neither a preset" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_model_prefill_uses_held_out_text_when_a_tokenizer_is_given():
    from fp8kit.bench.runner import _prefill_ids

    class CharTokenizer:
        def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
            return {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])}

    gen = torch.Generator().manual_seed(0)
    ids = _prefill_ids(ModelWorkload("m", 2, 3), CharTokenizer(), ["abcdef", "xyz"], 128, gen)
    assert ids.tolist() == [[97, 98, 99], [100, 101, 102]]  # the text's first 6 tokens, (B=2, S=3)
    short = _prefill_ids(ModelWorkload("m", 4, 8), CharTokenizer(), ["ab"], 128, gen)
    assert short.shape == (4, 8)  # too little text: random ids
    assert _prefill_ids(ModelWorkload("m", 1, 5), None, None, 128, gen).shape == (1, 5)
