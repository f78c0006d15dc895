"""`python -m export MODEL OUT.onnx`: end to end on a tiny Llama directory, and its bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fp8kit.export import check_onnx
from fp8kit.export.__main__ import main
from fp8kit.export.tensorrt import tensorrt_available

FAST = ["--num-samples", "4", "--seq-len", "32", "--validate-samples", "4", "--validate-seq-len", "24"]
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    src = [str(REPO / "packages" / p / "src") for p in ("core", "export")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(src + [os.environ.get("PYTHONPATH", "")])}


def _only(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize(("dtype", "weight"), [("fp16", "tensor"), ("fp32", "channel")])
def test_cli_exports_checks_and_validates(tmp_path, llama_dir, calibration_file, capsys, dtype, weight):
    out = tmp_path / "tiny.onnx"
    code = main([str(llama_dir), str(out), "--calibration-file", str(calibration_file), "--dtype", dtype,
                 "--weight", weight, "--batch-range", "1:2:4", "--seq-range", "1:16:64", *FAST])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert _only(tmp_path) == ["tiny.onnx"]
    steps = [line.split("] ", 1)[1].split(" ")[0] for line in printed.err.splitlines() if line.startswith("[")]
    assert steps == ["loading", "quantizing", "exporting", "checking", "validating"]  # one line per step, stderr
    assert "validating parity on 4 sequences" in printed.err
    assert check_onnx(out) == []
    text = printed.out
    assert "14 of 15 Linear layers quantized; kept in " + dtype + ": lm_head" in text
    assert "for an fp16 export of the same graph" in text
    assert "parity (ORT" in text and "top-1 agreement" in text
    assert "level=all" in text
    assert f"trtexec --onnx={out} --stronglyTyped --saveEngine={tmp_path / 'tiny.plan'}" in text
    assert "--minShapes=input_ids:1x1,attention_mask:1x1 --optShapes=input_ids:2x16,attention_mask:2x16" in text
    assert "--maxShapes=input_ids:4x64,attention_mask:4x64" in text


@pytest.mark.skipif(tensorrt_available(), reason="tensorrt is installed here: the engine step would run")
def test_cli_engine_without_tensorrt_exits_3_after_writing_the_onnx(tmp_path, llama_dir, capsys):
    out = tmp_path / "tiny.onnx"
    code = main([str(llama_dir), str(out), "--engine", str(tmp_path / "tiny.plan"), *FAST])
    printed = capsys.readouterr()
    assert code == 3
    assert "needs the TensorRT Python package" in printed.err and "was written and validated" in printed.err
    assert out.is_file() and check_onnx(out) == [] and not (tmp_path / "tiny.plan").exists()


def test_cli_calibrates_a_checkpoint_with_dynamic_scales(tmp_path, llama_dir, capsys):
    from fp8kit.core import QuantConfig, quantize, save_quantized
    from fp8kit.core.models import load_model

    model, tokenizer = load_model(str(llama_dir))
    quantize(model, QuantConfig(activation="dynamic"))
    checkpoint = tmp_path / "ckpt"
    save_quantized(model, checkpoint, tokenizer)
    out = tmp_path / "ckpt.onnx"
    code = main([str(checkpoint), str(out), *FAST])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "has dynamic activation scales: calibrated static scales for 14 layers" in printed.out
    assert check_onnx(out) == []


def test_cli_refuses_block_checkpoints_with_exit_2(tmp_path, llama_dir, capsys):
    from fp8kit.core import QuantConfig, quantize, save_quantized
    from fp8kit.core.models import load_model

    model, tokenizer = load_model(str(llama_dir))
    quantize(model, QuantConfig(weight="block", activation_granularity="group"))
    checkpoint = tmp_path / "ckpt"
    save_quantized(model, checkpoint, tokenizer)
    out = tmp_path / "ckpt.onnx"
    assert main([str(checkpoint), str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"{checkpoint}: layer 'model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', " in err
    assert "and 11 more: block-wise FP8 weights (one scale per 128 x 128 block) have no TensorRT Q/DQ form" in err
    assert "Export the full-precision model instead" in err and "Traceback" not in err
    assert _only(tmp_path) == ["ckpt"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["{tmp}/missing-model", "{tmp}/o.onnx"], "missing-model: no such file or directory", id="missing-model"),
        pytest.param(["{llama}", "{tmp}/not-a-dir.txt/o.onnx"], "does not exist", id="unwritable-output"),
        pytest.param(["{llama}", "{tmp}/o.onnx", "--opset", "17"], "--opset 17: FP8 QuantizeLinear.*need opset >= 19", id="opset-17"),
        pytest.param(["{llama}", "{tmp}/o.onnx", "--ignore", "re:.*"], "no quantizable layer", id="no-quantizable-layers"),
        pytest.param(["{llama}", "{tmp}/o.onnx", "--batch-range", "8:1"], "MIN:OPT:MAX", id="bad-range"),
        pytest.param(["{llama}", "{tmp}/o.txt"], "must end in .onnx", id="not-onnx"),
    ],
)
def test_cli_bad_inputs_exit_2_and_leave_nothing(tmp_path, llama_dir, capsys, args, message):
    import re

    (tmp_path / "not-a-dir.txt").write_text("x")
    argv = [a.format(tmp=tmp_path, llama=llama_dir) for a in args] + FAST
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), err
    assert _only(tmp_path) == ["not-a-dir.txt"]  # no partial OUT.onnx, no temp directory


def test_cli_refuses_to_overwrite(tmp_path, llama_dir, capsys):
    out = tmp_path / "o.onnx"
    out.write_text("keep me")
    assert main([str(llama_dir), str(out), *FAST]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "keep me"


def test_python_dash_m_export_delegates(tmp_path):
    """`python -m export` is the top-level alias of `python -m fp8kit.export` (not shadowed by tests/export)."""
    out = tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, "-m", "export", str(tmp_path / "nope"), str(out)],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "error: model" in proc.stderr and "no such file or directory" in proc.stderr
    assert not out.exists()
    proc = subprocess.run([sys.executable, "-m", "fp8kit.export", "--help"], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0 and "--batch-range" in proc.stdout and "--engine" in proc.stdout


def test_cli_refuses_a_mixture_of_experts_model(tmp_path, tokenizer_dir, capsys):
    import shutil

    from tiny_models import make_tiny_moe

    model_dir = tmp_path / "tiny-mixtral"
    make_tiny_moe("mixtral").save_pretrained(model_dir)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, model_dir / item.name)
    out = tmp_path / "moe.onnx"
    assert main([str(model_dir), str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {model_dir}: MixtralForCausalLM is a mixture-of-experts model (2 experts modules, e.g. "
        "model.layers.0.mlp.experts); FP8 ONNX export does not support MoE models"
    ) in err
    assert "python -m fp8kit.core MODEL OUT_DIR" in err and "Traceback" not in err
    assert _only(tmp_path) == ["tiny-mixtral"]
