"""fp8kit.bench.model_speed on CPU with a tiny Llama: builds, quantizes, rows in the report schema."""

import math

import pytest
import torch

from fp8kit.bench.__main__ import build_parser
from fp8kit.bench.model_speed import (
    ModelSpeedConfig,
    build_linear_stack,
    llama3_8b_linear_shapes,
    measure_quantize,
    run_model_speed,
)
from fp8kit.bench.report import COLUMNS
from fp8kit.bench.timing import TimingConfig
from fp8kit.bench.workloads import llama3_8b_stack_config, smollm2_arch_config
from fp8kit.core import FP8Linear, QuantConfig
from fp8kit.core.errors import ConfigError
from fp8kit.core.graphs import GQA_SDPA

from tiny_models import tiny_llama_config

TINY = {"tiny": (lambda n: tiny_llama_config(attn_implementation="sdpa"), True)}
FAST = TimingConfig(warmup=1, min_runs=2, max_runs=2, budget_ms=1.0)
SIZES = ModelSpeedConfig(prefill_len=16, decode_batch=2, prompt_len=8, cache_len=16, compile_decode=True)


@pytest.fixture(scope="module")
def frame():
    return run_model_speed(
        ["tiny"],
        device="cpu",
        dtype=torch.bfloat16,
        backends=("fp8-dynamic-token", "fp8-static-tensor-fastacc"),
        sizes=SIZES,
        timing=FAST,
        quantize_layers=0,
        presets=TINY,
    )


def test_rows_have_the_report_columns_and_backends(frame):
    assert list(frame.columns[: len(COLUMNS)]) == list(COLUMNS)
    for column in ("rel_error_vs_bf16", "cache_len", "shape", "setup_s", "attention"):
        assert column in frame.columns
    assert set(frame["attention"]) == {GQA_SDPA}  # bf16 baseline and FP8 rows alike
    prefill = frame[frame["workload"] == "model:tiny:prefill"]
    decode = frame[frame["workload"] == "model:tiny:decode"]
    ids = ["torch-bf16", "fp8-dynamic-token", "fp8-static-tensor-fastacc"]
    assert sorted(prefill["backend"]) == sorted(ids + [i + "-graph" for i in ids])
    assert sorted(decode["backend"]) == sorted(ids + [i + "-graph" for i in ids] + [i + "-compiled-graph" for i in ids])
    assert set(prefill["M"]) == {16} and set(decode["M"]) == {2}
    assert set(prefill["dtype"]) == {"bf16", "fp8-e4m3/bf16"}


def test_eager_rows_ran_and_graph_rows_say_why_not_on_cpu(frame):
    eager = frame[~frame["backend"].str.endswith("-graph")]
    assert (eager["status"] == "ok").all(), eager["status"].tolist()
    assert (eager["latency_ms_median"] > 0).all()
    graph = frame[frame["backend"].str.endswith("-graph")]
    assert graph["status"].str.startswith("not run: CUDA graphs need a CUDA GPU").all()
    assert graph["latency_ms_median"].isna().all()
    baseline = frame[frame["backend"] == "torch-bf16"]
    assert (baseline["speedup_vs_baseline"] == 1.0).all()


def test_accuracy_columns_are_within_the_fp8_bound(frame):
    prefill = frame[frame["workload"] == "model:tiny:prefill"].set_index("backend")
    # bf16 vs its float64 copy: bf16 rounding (2^-8 per op), far below FP8's 2^-4.
    assert 0 < prefill.loc["torch-bf16", "rel_error"] < 0.02
    for backend in ("fp8-dynamic-token", "fp8-static-tensor-fastacc"):
        row = prefill.loc[backend]
        assert 0.005 < row["rel_error"] < 0.15  # FP8 W8A8 through 2 layers: a few %
        assert 0.005 < row["rel_error_vs_bf16"] < 0.15
        # FP8 weights are 1 byte per element, bf16 2; the lm_head stays bf16 on both sides.
        assert 2 * (row["weight_bytes"] - _lm_head_bytes()) == prefill.loc["torch-bf16", "weight_bytes"] - _lm_head_bytes()
    decode = frame[(frame["workload"] == "model:tiny:decode") & (frame["backend"] == "fp8-dynamic-token")]
    assert 0.005 < float(decode["rel_error_vs_bf16"].iloc[0]) < 0.15


def _lm_head_bytes():
    config = tiny_llama_config()
    return config.vocab_size * config.hidden_size * 2  # bf16 [vocab, hidden]


def test_measure_quantize_accounts_bytes_and_quantizes_every_linear():
    shapes = (("self_attn.q_proj", 64, 32), ("mlp.down_proj", 32, 96))
    model = build_linear_stack(3, "cpu", torch.bfloat16, shapes=shapes, seed=1)
    assert model.layers[2].mlp.down_proj.weight.shape == (32, 96)
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    result = measure_quantize(model, QuantConfig(), "cpu")
    assert result["layer_bytes"] == (64 * 32 + 32 * 96) * 2
    assert result["model_bytes"] == 3 * result["layer_bytes"]
    assert result["seconds"] > 0
    assert math.isnan(result["peak_extra_bytes"])  # the CPU allocator keeps no peak
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, FP8Linear))]
    assert len(linears) == 6 and all(isinstance(m, FP8Linear) for m in linears)


def test_presets_have_the_real_shapes():
    llama = llama3_8b_stack_config()
    assert (llama.hidden_size, llama.intermediate_size, llama.num_attention_heads, llama.num_key_value_heads) == (
        4096, 14336, 32, 8
    )
    assert llama.num_hidden_layers == 4
    smol = smollm2_arch_config()
    assert (smol.hidden_size, smol.intermediate_size, smol.num_hidden_layers, smol.vocab_size) == (576, 1536, 30, 49152)
    assert smol.tie_word_embeddings
    per_layer = sum(n * k for _, n, k in llama3_8b_linear_shapes())
    assert per_layer == 4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336  # 218,103,808 parameters


def test_unknown_model_and_bad_backend_are_config_errors():
    with pytest.raises(ConfigError, match=r"--models: unknown \['llama9'\]; choose from tiny"):
        run_model_speed(["llama9"], device="cpu", presets=TINY, quantize_layers=0)
    with pytest.raises(ConfigError, match="fp8 / torchao ids without -compiled / -graph, got .torch-fp32."):
        run_model_speed(["tiny"], device="cpu", backends=("torch-fp32",), presets=TINY, quantize_layers=0)
    with pytest.raises(ConfigError, match="got 'torchao-fp8-row-compiled'"):
        run_model_speed(["tiny"], device="cpu", backends=("torchao-fp8-row-compiled",), presets=TINY, quantize_layers=0)
    with pytest.raises(ConfigError, match="cache_len > prompt_len"):
        ModelSpeedConfig(prompt_len=64, cache_len=64)


def test_decode_only_with_stock_attention():
    frame = run_model_speed(
        ["tiny"],
        device="cpu",
        dtype=torch.bfloat16,
        backends=("fp8-dynamic-token",),
        sizes=ModelSpeedConfig(prefill_len=16, decode_batch=2, prompt_len=8, cache_len=16, phases=("decode",),
                               gqa_attention=False),
        timing=FAST,
        quantize_layers=0,
        presets=TINY,
    )
    assert set(frame["workload"]) == {"model:tiny:decode"}
    backends = ["fp8-dynamic-token", "fp8-dynamic-token-graph", "torch-bf16", "torch-bf16-graph"]
    assert sorted(frame["backend"]) == backends
    assert set(frame["attention"]) == {"sdpa"}
    eager = frame[~frame["backend"].str.endswith("-graph")]
    assert (eager["status"] == "ok").all(), eager["status"].tolist()
    with pytest.raises(ConfigError, match=r"phases \['decoding'\]; choose from prefill, decode"):
        ModelSpeedConfig(phases=("decoding",))


def test_cli_parses_models_options():
    args = build_parser().parse_args(["--models", "llama3-8b-stack,smollm2-arch", "--model-layers", "8", "--out", "x"])
    assert args.models == "llama3-8b-stack,smollm2-arch" and args.model_layers == 8 and args.quantize_layers == 32
    assert args.model_phases == "prefill,decode" and not args.stock_attention
    args = build_parser().parse_args(["--models", "x", "--model-phases", "decode", "--stock-attention", "--out", "x"])
    assert args.model_phases == "decode" and args.stock_attention


def test_speedups_compare_rows_run_the_same_way():
    from fp8kit.bench.model_speed import add_model_speedups
    from fp8kit.bench.report import make_frame

    times = {
        "torch-bf16": 8.0, "torch-bf16-graph": 6.0, "torch-bf16-compiled": 5.0, "torch-bf16-compiled-graph": 4.0,
        "fp8-static-tensor": 4.0, "fp8-static-tensor-graph": 4.0, "fp8-static-tensor-compiled": 2.5,
        "fp8-static-tensor-compiled-graph": 1.0,
    }  # fmt: skip
    rows = [{"workload": "model:x:decode", "backend": b, "latency_ms_median": ms, "status": "ok"} for b, ms in times.items()]
    frame = add_model_speedups(make_frame(rows)).set_index("backend")["speedup_vs_baseline"]
    assert frame["fp8-static-tensor"] == pytest.approx(2.0)
    assert frame["fp8-static-tensor-graph"] == pytest.approx(1.5)
    assert frame["fp8-static-tensor-compiled"] == pytest.approx(2.0)
    assert frame["fp8-static-tensor-compiled-graph"] == pytest.approx(4.0)


def test_generate_rows_give_tokens_per_second_and_torchao_says_why_not(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "torchao" else real_find_spec(name, *a, **k))
    sizes = ModelSpeedConfig(decode_batch=2, prompt_len=8, cache_len=16, phases=("generate",), generate_tokens=3)
    frame = run_model_speed(
        ["tiny"], device="cpu", dtype=torch.bfloat16, backends=("fp8-dynamic-token", "torchao-fp8-row"),
        sizes=sizes, timing=FAST, quantize_layers=0, presets=TINY,
    )  # fmt: skip
    assert set(frame["workload"]) == {"model:tiny:generate", "model:tiny:generate-eager"}
    ok = frame[frame["status"] == "ok"]
    assert sorted(ok["backend"]) == ["fp8-dynamic-token"] * 2 + ["torch-bf16"] * 2
    for _, row in ok.iterrows():  # 2 prompts x 3 new tokens per call
        assert row["tokens_per_s"] == pytest.approx(2 * 3 / (row["latency_ms_median"] / 1e3))
        assert row["M"] == 2 and row["shape"] == "2x8+3"
    fp8 = ok[ok["backend"] == "fp8-dynamic-token"]
    assert fp8["token_agreement_vs_bf16"].between(0, 1).all()
    peer = frame[frame["backend"] == "torchao-fp8-row"]
    assert len(peer) == 2 and (peer["status"] == "not run: torchao not installed (pip install torchao>=0.18 for the peer rows)").all()
    assert peer["latency_ms_median"].isna().all()
