"""Inputs that should never hurt: broken files, bad arguments, pickles and remote code, kills mid-save.

Both CLIs (`python -m fp8kit.core` and `python -m export`) run in subprocesses: exit code 2, a
one-line message naming the file and tensor, no traceback, nothing written.
"""

from __future__ import annotations

import json
import pickle
import re
import select
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fp8kit.core import CheckpointError, QuantConfig, load_quantized, quantize, save_quantized
from fp8kit.core.errors import ModelLoadError
from fp8kit.core.files import check_safetensors_dir, read_safetensors_header
from fp8kit.core.models import load_model

from cli_tools import ENV, EXPORT_FAST, PACKAGES, REPO, assert_clean_failure, run_cli
from tiny_models import make_tiny_llama, make_tiny_tokenizer, tiny_text

TENSOR = "model.layers.1.mlp.up_proj.weight"


# --------------------------------------------------------------------------- building broken model directories


def hf_dir(path: Path, sharded: bool = False) -> Path:
    make_tiny_llama().save_pretrained(path, **({"max_shard_size": "100KB"} if sharded else {}))
    make_tiny_tokenizer().save_pretrained(path)
    return path


def fp8_dir(path: Path, sharded: bool = False) -> Path:
    model = quantize(make_tiny_llama(), QuantConfig())
    save_quantized(model, path, make_tiny_tokenizer(), **({"max_shard_bytes": 20_000} if sharded else {}))
    return path


def header_of(file: Path) -> tuple[bytes, int, dict]:
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data, n, json.loads(data[8 : 8 + n])


def rewrite_header(file: Path, header: dict) -> None:
    data, n, _ = header_of(file)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def shard_of(path: Path, tensor: str) -> Path:
    index = path / "model.safetensors.index.json"
    return path / (json.loads(index.read_text())["weight_map"][tensor] if index.exists() else "model.safetensors")


def bad_header_json(path: Path) -> str:
    file = path / "model.safetensors"
    data, n, _ = header_of(file)
    file.write_bytes(data[:8] + b"[" + data[9 : 8 + n] + data[8 + n :])  # '["name": ...' is not JSON
    return rf"{re.escape(str(file))}: not a readable safetensors file: the header is not valid JSON"


def header_length_beyond_file(path: Path) -> str:
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    return rf"{re.escape(str(file))}: not a readable safetensors file: header length {len(data) * 2} bytes runs past the end of the file \({len(data)} bytes\)"


def offsets_beyond_file(path: Path) -> str:
    file = path / "model.safetensors"
    _, _, header = header_of(file)
    start, end = header[TENSOR]["data_offsets"]
    header[TENSOR]["data_offsets"] = [start, end + 10**6]
    rewrite_header(file, header)
    return rf"{re.escape(str(file))}: not a readable safetensors file: tensor {re.escape(TENSOR)}: data_offsets \[{start}, {end + 10**6}\] run past the end"


def truncated(path: Path) -> str:
    file = path / "model.safetensors"
    data, n, header = header_of(file)
    cut = 8 + n + (len(data) - 8 - n) // 2
    file.write_bytes(data[:cut])
    first_cut = min((e for e in header.values() if "data_offsets" in e and e["data_offsets"][1] > cut - 8 - n),
                    key=lambda e: e["data_offsets"][0])
    name = next(k for k, e in header.items() if e is first_cut)
    return rf"{re.escape(str(file))}: not a readable safetensors file: tensor {re.escape(name)}: data_offsets .* run past the end"


def pickle_named_safetensors(path: Path) -> str:
    file = path / "model.safetensors"
    from safetensors.torch import load

    torch.save(load(file.read_bytes()), file)  # a pickle (zip) under the safetensors name
    return rf"{re.escape(str(file))}: not a readable safetensors file: .*looks like a PyTorch pickle"


def lying_config(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    return r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape \((64, 128|128, 64)\).*\((64, 96|96, 64)\).*config\.json does not match the weights"


def missing_shard(path: Path) -> str:
    file = shard_of(path, TENSOR)
    file.unlink()
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    first = min(k for k, v in weight_map.items() if v == file.name)
    return rf"{re.escape(str(file))}: missing; model\.safetensors\.index\.json names it as the shard holding (tensor )?{re.escape(first)}"


def index_names_absent_file(path: Path) -> str:
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = "model-extra.safetensors"
    index.write_text(json.dumps(data))
    return rf"{re.escape(str(path / 'model-extra.safetensors'))}: missing; .* holding (tensor )?model\.norm\.weight"


CORRUPTIONS = {  # name -> (breaks the directory and returns the expected message, needs a sharded directory)
    "bad-header-json": (bad_header_json, False),
    "header-length-beyond-file": (header_length_beyond_file, False),
    "data-offsets-beyond-file": (offsets_beyond_file, False),
    "truncated": (truncated, False),
    "pickle-as-safetensors": (pickle_named_safetensors, False),
    "config-lies-about-shapes": (lying_config, False),
    "missing-shard": (missing_shard, True),
    "index-names-absent-file": (index_names_absent_file, True),
}


@pytest.mark.parametrize("kind", ["hf", "fp8"])
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_broken_files_in_python(tmp_path, kind, corruption):
    break_it, sharded = CORRUPTIONS[corruption]
    path = (hf_dir if kind == "hf" else fp8_dir)(tmp_path / "m", sharded)
    message = break_it(path)
    with pytest.raises((CheckpointError, ModelLoadError), match=message):
        load_model(path)
    if kind == "fp8":
        with pytest.raises((CheckpointError, ModelLoadError), match=message):
            load_quantized(path)


@pytest.mark.parametrize("cli", ["core", "export"])
@pytest.mark.parametrize("kind", ["hf", "fp8"])
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_broken_files_exit_2_from_both_clis(tmp_path, cli, kind, corruption):
    break_it, sharded = CORRUPTIONS[corruption]
    path = (hf_dir if kind == "hf" else fp8_dir)(tmp_path / "m", sharded)
    message = break_it(path)
    out = tmp_path / ("out" if cli == "core" else "out.onnx")
    assert_clean_failure(run_cli(cli, path, out), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no OUT, no temporary sibling


def test_header_checks_accept_every_valid_file(tmp_path):
    """The header validator agrees with safetensors on valid files (sharded, fp8, scalars)."""
    path = fp8_dir(tmp_path / "c", sharded=True)
    found = check_safetensors_dir(path)
    from safetensors import safe_open

    seen = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            seen.update({k: (file, list(f.get_slice(k).get_shape())) for k in f.keys()})
    assert {k: (f, e["shape"]) for k, (f, e) in found.items()} == seen
    assert read_safetensors_header(path / sorted(p.name for p in path.glob("*.safetensors"))[0])


def test_empty_and_tiny_files(tmp_path):
    for size in (0, 7):
        file = tmp_path / f"s{size}.safetensors"
        file.write_bytes(b"\0" * size)
        with pytest.raises(CheckpointError, match=rf"{file.name}: not a readable safetensors file: truncated \({size} bytes\)"):
            read_safetensors_header(file)


# --------------------------------------------------------------------------- bad arguments


def odd_shaped_dir(path: Path) -> Path:
    """A Llama whose every Linear has K or N not divisible by 16 (hidden 40, intermediate 72)."""
    make_tiny_llama(hidden_size=40, intermediate_size=72, num_attention_heads=4, num_key_value_heads=2).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


CORE_BAD_ARGS = {
    "unknown-scheme": (["--activation", "smart"], r"invalid choice: 'smart'"),
    "unknown-weight-scheme": (["--weight", "int8"], r"invalid choice: 'int8'"),
    "non-integer-samples": (["--num-samples", "many"], r"invalid int value: 'many'"),
    "zero-samples": (["--activation", "static", "--num-samples", "0"], r"--num-samples \(0\) and --seq-len \(512\) must be positive"),
    "negative-seq-len": (["--activation", "static", "--seq-len", "-5"], r"--seq-len \(-5\) must be positive"),
    "empty-calibration-file": (["--activation", "static", "--calibration-file", "{tmp}/empty.txt"], r"empty\.txt: calibration file is empty"),
    "missing-calibration-file": (["--activation", "static", "--calibration-file", "{tmp}/nope.txt"], r"nope\.txt: cannot read calibration text"),
    "calibration-file-is-a-directory": (["--activation", "static", "--calibration-file", "{tmp}"], r": cannot read calibration text"),
}


@pytest.mark.parametrize("case", CORE_BAD_ARGS)
def test_core_cli_bad_arguments(tiny_llama_dir, tmp_path, case):
    args, message = CORE_BAD_ARGS[case]
    (tmp_path / "empty.txt").write_text("\n \n\n")
    result = run_cli("core", tiny_llama_dir, tmp_path / "out", *[a.format(tmp=tmp_path) for a in args])
    assert_clean_failure(result, message)
    assert not (tmp_path / "out").exists()


def test_core_cli_model_without_quantizable_layers(tmp_path):
    result = run_cli("core", odd_shaped_dir(tmp_path / "odd"), tmp_path / "out")
    assert_clean_failure(result, r"no layer could be quantized.*q_proj: K=40 or N=40 is not a multiple of 16")
    assert not (tmp_path / "out").exists()


def test_core_cli_missing_model_and_out_dir_that_is_a_file(tiny_llama_dir, tmp_path):
    assert_clean_failure(run_cli("core", tmp_path / "nope", tmp_path / "out"), r"nope: no such model file or directory")
    (tmp_path / "out").write_text("a file")
    assert_clean_failure(run_cli("core", tiny_llama_dir, tmp_path / "out"), r"out: exists and is not a directory")
    assert (tmp_path / "out").read_text() == "a file"


EXPORT_BAD_ARGS = {
    "zero-samples": (["--num-samples", "0"], r"--num-samples must be positive, got 0"),
    "negative-seq-len": (["--seq-len", "-5"], r"--seq-len must be positive, got -5"),
    "unknown-dtype": (["--dtype", "fp8"], r"invalid choice: 'fp8'"),
    "empty-calibration-file": (["--calibration-file", "{tmp}/empty.txt"], r"empty\.txt: calibration file is empty"),
}


@pytest.mark.parametrize("case", EXPORT_BAD_ARGS)
def test_export_cli_bad_arguments(tiny_llama_dir, tmp_path, case):
    args, message = EXPORT_BAD_ARGS[case]
    (tmp_path / "empty.txt").write_text("\n \n\n")
    # argparse keeps the last value of a repeated option: these come after EXPORT_FAST's defaults.
    result = subprocess.run(
        [sys.executable, "-m", "export", str(tiny_llama_dir), str(tmp_path / "o.onnx"), *EXPORT_FAST,
         *[a.format(tmp=tmp_path) for a in args]],
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300,
    )
    assert_clean_failure(result, message)
    assert not (tmp_path / "o.onnx").exists()


def test_export_cli_model_without_quantizable_layers(tmp_path):
    result = run_cli("export", odd_shaped_dir(tmp_path / "odd"), tmp_path / "o.onnx")
    assert_clean_failure(result, r"no quantizable layer.*K=40 or N=40 is not a multiple of 16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shapes", "bogus"], r"--shapes: 'bogus' is neither a preset"),
        (["--device", "tpu"], r"--device:? '?tpu"),
        (["--dtype", "fp8"], r"invalid choice: 'fp8'"),
    ],
)
def test_bench_cli_bad_arguments(tmp_path, args, message):
    result = run_cli("bench", *args, "--out", tmp_path / "bench")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and re.search(message, result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "bench").exists()


# --------------------------------------------------------------------------- kill mid-save through the CLI


def test_cli_killed_mid_save_leaves_old_output_intact(tiny_llama_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(300))
    out = tmp_path / "out"
    args = [str(tiny_llama_dir), str(out), "--activation", "static", "--calibration-file", str(text), "--num-samples", "2", "--seq-len", "32"]
    first = run_cli("core", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # The same CLI, stopped (SIGKILL) once the new checkpoint is fully written to its temporary directory,
    # right before it would take OUT_DIR's place (the atomic swap, or the rename fallback).
    wrapper = textwrap.dedent(f"""
        import os, runpy, sys, time
        import fp8kit.core.checkpoint.writer as ck
        def stop(*args, **kwargs):
            print("written", flush=True)
            time.sleep(300)
        ck.exchange_paths = stop
        os.rename = stop
        sys.argv = ["fp8kit.core", *{args[:-1] + ["16", "--overwrite"]!r}]
        runpy.run_module("fp8kit.core", run_name="__main__")
    """)
    proc = subprocess.Popen([sys.executable, "-c", wrapper], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV, cwd=REPO)
    try:
        line = ""
        while line != "written":  # the CLI may print other lines first
            ready, _, _ = select.select([proc.stdout], [], [], 240)
            assert ready, "the CLI never reached the weights write"
            line = proc.stdout.readline().strip()
            assert line or proc.poll() is None, "the CLI exited before writing weights"
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
        assert len(temps) == 1 and any(temps[0].glob("*.safetensors"))  # the new output exists, not yet in place
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    load_quantized(out)  # still the complete old checkpoint


def test_exchange_paths_swaps_directories_atomically(tmp_path):
    from fp8kit.core.files import exchange_paths

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("A")
    (tmp_path / "b" / "y").write_text("B")
    if not exchange_paths(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported here (the two-rename fallback is used)")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["y"] and [p.name for p in (tmp_path / "b").iterdir()] == ["x"]
    assert not exchange_paths(tmp_path / "a", tmp_path / "missing")


# --------------------------------------------------------------------------- no pickles, no remote code


def _package_sources():
    for package in PACKAGES:
        yield from sorted((REPO / "packages" / package / "src").rglob("*.py"))


def test_no_pickle_loading_in_the_sources():
    pattern = re.compile(r"torch\.load\(|\bimport pickle|pickle\.loads?\(|weights_only|allow_pickle=True|\bfrom_pretrained\(")
    offenders = []
    for file in _package_sources():
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{file.relative_to(REPO)}:{number}: {line.strip()}")
    # from_pretrained is allowed only for tokenizers / configs (no weights) or with use_safetensors=True / gguf.
    allowed = ("AutoTokenizer.from_pretrained", "AutoConfig.from_pretrained", "use_safetensors=True", "gguf_file=")
    assert [o for o in offenders if not any(a in o for a in allowed)] == []


def test_loaders_never_unpickle(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle loading attempted")

    hf = hf_dir(tmp_path / "hf")
    fp8 = fp8_dir(tmp_path / "fp8")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model, tokenizer = load_model(hf)
    assert tokenizer is not None and sum(p.numel() for p in model.parameters()) > 0
    loaded = load_quantized(fp8)
    assert loaded.fp8kit_report.quantized
    model, _ = load_model(fp8)
    assert model.fp8kit_report.quantized


def remote_code_dir(path: Path, architecture: str) -> Path:
    """A tiny Llama whose config.json points at model code shipped with it, which records being imported."""
    hf_dir(path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = [architecture]
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    marker = path / "code-ran"
    (path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    return path


def test_remote_code_is_refused_without_the_flag(tmp_path):
    path = remote_code_dir(tmp_path / "evil", "EvilForCausalLM")
    with pytest.raises(ModelLoadError, match=r"declares custom code \(auto_map.*only with --trust-remote-code \(trust_remote_code=True"):
        load_model(path)
    result = run_cli("core", path, tmp_path / "out")
    assert_clean_failure(result, r"'EvilForCausalLM' is not in transformers.*--trust-remote-code")
    result = run_cli("export", path, tmp_path / "out.onnx")
    assert_clean_failure(result, r"'EvilForCausalLM' is not in transformers.*--trust-remote-code")
    assert not (path / "code-ran").exists()


def test_auto_map_with_a_builtin_architecture_runs_no_shipped_code(tmp_path):
    path = remote_code_dir(tmp_path / "m", "LlamaForCausalLM")
    model, _ = load_model(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not (path / "code-ran").exists()


def test_tokenizer_code_is_not_run_without_the_flag(tmp_path):
    path = hf_dir(tmp_path / "m")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    config["tokenizer_class"] = "EvilTokenizer"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "tokenization_evil.py").write_text(f"open({str(path / 'code-ran')!r}, 'w').write('x')\n")
    model, tokenizer = load_model(path)
    assert tokenizer is None and not (path / "code-ran").exists()


# --------------------------------------------------------------------------- calibration data


@pytest.mark.parametrize(
    "calibration, message",
    [
        ([], r"calibration data is empty: give at least one batch"),
        (iter(()), r"calibration data is empty: give at least one batch"),
        ([torch.zeros(1, 0, dtype=torch.long)], r"calibration item 0: input_ids of shape \(1, 0\) holds no tokens"),
        ([torch.ones(1, 4, dtype=torch.long), torch.full((1, 4), 256)], r"calibration item 1: token ids span \[256, 256\], outside the model's vocabulary \[0, 256\)"),
        ([torch.full((1, 3), -1)], r"calibration item 0: token ids span \[-1, -1\]"),
        ([torch.ones(1, 4)], r"calibration item 0: input_ids must be integer token ids, got torch.float32"),
        ([{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4, dtype=torch.long)}],
         r"none of the 14 layers saw an unmasked input position in 1 batch"),
        (["some text"], r"calibration item of type str is not a tensor of input ids or a dict"),
    ],
    ids=["empty-list", "empty-iterator", "zero-tokens", "out-of-vocab", "negative-id", "float-ids", "all-masked", "raw-text"],
)
def test_bad_calibration_data_in_python(calibration, message):
    from fp8kit.core import CalibrationError

    with pytest.raises(CalibrationError, match=message):
        quantize(make_tiny_llama(), QuantConfig(activation="static"), calibration)


def test_calibration_text_of_zero_tokens(tmp_path):
    from fp8kit.core import CalibrationError
    from fp8kit.core.data import calibration_batches

    tokenizer = make_tiny_tokenizer()
    with pytest.raises(CalibrationError, match="calibration text tokenizes to zero tokens"):
        calibration_batches(tokenizer, ["   "], 4, 16)
    with pytest.raises(CalibrationError, match=r"num_samples \(0\) and seq_len \(16\) must be positive"):
        calibration_batches(tokenizer, ["w1 w2"], 0, 16)
