"""`python -m fp8kit.core`: exit codes, messages, nothing left behind on failure."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8kit.core import load_quantized

from tiny_models import tiny_text


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fp8kit.core", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_dynamic_quantize_and_summary(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    result = cli(tiny_llama_dir, out)
    assert result.returncode == 0, result.stderr
    assert "quantized 14 layers, kept 1 in high precision" in result.stdout
    assert "lm_head: ignored by config" in result.stdout
    assert "model bytes:" in result.stdout
    model = load_quantized(out)
    assert model.fp8kit_config.activation == "dynamic" and len(model.fp8kit_report.quantized) == 14
    assert (out / "tokenizer.json").exists()


def test_static_with_calibration_file_and_kv(tiny_llama_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(400) + "\n\n" + tiny_text(300, seed=1))
    out = tmp_path / "out"
    result = cli(tiny_llama_dir, out, "--activation", "static", "--kv-cache", "--calibration-file", text, "--num-samples", 4, "--seq-len", 64)
    assert result.returncode == 0, result.stderr
    assert "KV-cache scales for 2 attention layers" in result.stdout
    qc = json.loads((out / "config.json").read_text())["quantization_config"]  # compressed-tensors by default
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] is False
    assert qc["kv_cache_scheme"]["strategy"] == "tensor"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--activation", "static", "--activation-granularity", "token"], "activation_granularity='token' needs activation='dynamic'"),
        (["--weight", "channel", "--format", "fp8"], "--weight channel cannot be saved in the AutoFP8 / vLLM 'fp8' checkpoint format"),
        (["--activation", "static", "--num-samples", "0"], "--num-samples (0) and --seq-len (512) must be positive"),
        (["--ignore", "re:.*"], "no layer could be quantized"),
        (["--weight", "block", "--activation", "static"], "weight='block' needs activation='dynamic'"),
        (["--weight", "channel", "--activation-granularity", "group"], "weight='channel' with activation_granularity='group'"),
        (["--weight", "block", "--group-size", "64"], "group_size=64 must equal block_size[1]=128"),
    ],
)
def test_bad_options(tiny_llama_dir, tmp_path, args, message):
    out = tmp_path / "out"
    result = cli(tiny_llama_dir, out, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""  # nothing claims success (no "how:" / "path:" line) before the error
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_block_scheme_in_both_formats(tiny_llama_dir, tmp_path, fmt, stream):
    out = tmp_path / "out"
    result = cli(tiny_llama_dir, out, "--weight", "block", "--block-size", "64", "32", "--format", fmt, *([] if stream else ["--no-stream"]))
    assert result.returncode == 0, result.stderr
    assert ("\nhow: streamed" in result.stdout) == stream
    model = load_quantized(out)
    config = model.fp8kit_config
    assert (config.weight, config.activation_granularity, config.block_size, config.group_size) == ("block", "group", (64, 32), 32)
    tensors = load_file(out / "model.safetensors")
    k_proj = "model.layers.0.self_attn.k_proj"  # N=32, K=64: one partial row of blocks, two columns
    scale_key = f"{k_proj}.weight_scale_inv" if fmt == "fp8" else f"{k_proj}.weight_scale"
    assert tensors[scale_key].shape == (1, 2) and f"{k_proj}.weight_scale" not in tensors.keys() - {scale_key}
    assert torch.equal(model.get_submodule(k_proj).weight_scale, tensors[scale_key].float())


def test_unknown_scheme_is_an_argparse_error(tiny_llama_dir, tmp_path):
    result = cli(tiny_llama_dir, tmp_path / "out", "--activation", "smart")
    assert result.returncode == 2 and "invalid choice: 'smart'" in result.stderr


def test_empty_calibration_file(tiny_llama_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    result = cli(tiny_llama_dir, tmp_path / "out", "--activation", "static", "--calibration-file", empty)
    assert result.returncode == 2 and f"{empty}: calibration file is empty" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_model_path(tmp_path):
    result = cli(tmp_path / "nope", tmp_path / "out")
    assert result.returncode == 2 and f"{tmp_path / 'nope'}: no such model file or directory" in result.stderr
    assert not (tmp_path / "out").exists()


def test_nan_weight_is_named_and_nothing_written(tiny_llama_dir, tmp_path):
    file = tiny_llama_dir / "model.safetensors"
    tensors = load_file(str(file))
    tensors["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(tensors, str(file), metadata={"format": "pt"})
    result = cli(tiny_llama_dir, tmp_path / "out")
    assert result.returncode == 2
    assert "layer model.layers.1.self_attn.o_proj: weight (64, 64) contains NaN or Inf" in result.stderr
    assert not (tmp_path / "out").exists()


def test_pickle_only_model_directory_is_refused(tiny_llama_dir, tmp_path):
    tensors = load_file(str(tiny_llama_dir / "model.safetensors"))
    (tiny_llama_dir / "model.safetensors").unlink()
    torch.save(tensors, tiny_llama_dir / "pytorch_model.bin")
    result = cli(tiny_llama_dir, tmp_path / "out")
    assert result.returncode == 2 and "no .safetensors weights (fp8kit never loads pickled" in result.stderr


def test_non_empty_out_dir_needs_overwrite(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    result = cli(tiny_llama_dir, out)
    assert result.returncode == 2 and "pass --overwrite" in result.stderr
    assert (out / "old.txt").read_text() == "keep"
    assert cli(tiny_llama_dir, out, "--overwrite").returncode == 0
    assert not (out / "old.txt").exists()


def test_truncated_model_weights_are_a_clear_error(tiny_llama_dir, tmp_path):
    file = tiny_llama_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:500])
    result = cli(tiny_llama_dir, tmp_path / "out")
    assert result.returncode == 2 and "model.safetensors: not a readable safetensors file" in result.stderr and "Traceback" not in result.stderr


def test_static_calibration_with_layers_offloaded_to_disk(tiny_llama_dir, tmp_path):
    """--device-map with a layer on disk: same checkpoint, bit for bit, as without offload."""
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(400))
    args = ["--activation", "static", "--calibration-file", text, "--num-samples", 2, "--seq-len", 64]
    plain = cli(tiny_llama_dir, tmp_path / "plain", *args)
    assert plain.returncode == 0, plain.stderr
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    offloaded = cli(tiny_llama_dir, tmp_path / "offloaded", *args, "--device-map", json.dumps(device_map),
                    "--offload-folder", tmp_path / "offload")  # fmt: skip
    assert offloaded.returncode == 0, offloaded.stderr
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "offloaded" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)) if a[key].dtype == torch.float8_e4m3fn \
            else torch.equal(a[key], b[key]), key


def test_bad_device_map_json(tiny_llama_dir, tmp_path):
    result = cli(tiny_llama_dir, tmp_path / "out", "--device-map", "{not json")
    assert result.returncode == 2
    assert "--device-map: not valid JSON" in result.stderr and "Traceback" not in result.stderr


def test_help_names_the_format_and_who_reads_it():
    from fp8kit.core.__main__ import build_parser

    parser = build_parser()
    text = parser.format_help()
    out_dir = next(a for a in parser._actions if a.dest == "out_dir")
    assert "--format" in out_dir.help and "compressed-tensors" in out_dir.help
    # which consumers read which format, transformers' misreading of "fp8" included
    assert "compressed-tensors: vLLM, SGLang, transformers" in text
    assert "fp8: vLLM, SGLang, AutoFP8, fp8kit; transformers only with block weights (it misreads per-tensor" in text


def _summary_value(stdout, prefix):
    return next(line for line in stdout.splitlines() if line.strip().startswith(prefix)).strip()


def test_default_output_is_read_by_transformers_and_the_summary_says_where_the_bytes_are(tiny_llama_dir, tmp_path):
    """The default format is the one transformers reads right: its logits equal fp8kit's own; the summary
    splits the bytes (FP8 / scales / high precision) as the files hold them; no local path in config.json."""
    from transformers import AutoModelForCausalLM

    from fp8kit.core.__main__ import checkpoint_bytes

    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(400))
    args = ["--activation", "static", "--calibration-file", text, "--num-samples", 2, "--seq-len", 64]
    result = cli(tiny_llama_dir, tmp_path / "out", *args)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    config_text = (out / "config.json").read_text()
    assert str(tiny_llama_dir) not in config_text and '"/' not in config_text and "_name_or_path" not in config_text

    ours = load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))

    tensors = load_file(out / "model.safetensors")
    fp8 = sum(t.numel() for t in tensors.values() if t.dtype == torch.float8_e4m3fn)
    scales = sum(t.numel() * 4 for k, t in tensors.items() if k.endswith("_scale"))
    high = sum(t.numel() * t.element_size() for k, t in tensors.items()
               if t.dtype != torch.float8_e4m3fn and not k.endswith("_scale"))
    info = checkpoint_bytes(out)
    assert (info["fp8"], info["scales"], info["high"]) == (fp8, scales, high)
    assert info["largest"][0] == ("lm_head.weight", 256 * 64 * 4) and info["high_dtypes"] == ["F32"]
    total = fp8 + scales + high
    assert _summary_value(result.stdout, "FP8 weights:") == (
        f"FP8 weights: {fp8 / 1e6:.1f} MB ({100 * fp8 / total:.0f}%); scales: {scales / 1e3:.1f} kB"
    )
    assert _summary_value(result.stdout, "high precision").startswith(f"high precision (F32): {high / 1e6:.1f} MB")
    assert "--dtype bf16 stores them in half the bytes" in result.stdout
    assert "format compressed-tensors: read by vLLM, SGLang, transformers" in result.stdout

    half = cli(tiny_llama_dir, tmp_path / "bf16", *args, "--dtype", "bf16")
    assert half.returncode == 0, half.stderr
    info16 = checkpoint_bytes(tmp_path / "bf16")
    assert info16["high_dtypes"] == ["BF16"] and info16["high"] * 2 == high and info16["fp8"] == fp8
