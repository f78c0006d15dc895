"""Reliability round 2, written as an attacker would: never lose the user's model, never leak a file,
never accept garbage, never show a traceback.

CLI cases run `python -m fp8kit.core` / `python -m export` in subprocesses and check the exit code (2),
the one-line message, the absence of a traceback, the input left untouched and the output either
complete or absent. Parsers get hypothesis-generated headers and config values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fp8kit.core import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    FP8KitError,
    QuantConfig,
    load_quantized,
    quantize,
    quantize_checkpoint,
    save_quantized,
)
from fp8kit.core.files import check_gguf_file, read_safetensors_header
from fp8kit.core.models import load_model

from cli_tools import ENV, REPO, assert_clean_failure, run_cli
from tiny_models import make_tiny_llama, make_tiny_tokenizer, tiny_text


def tree_digest(path: Path) -> dict[str, str]:
    """{relative path: sha256 or symlink target} of everything under `path` (or of the file itself)."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for item in sorted(path.rglob("*")):
        rel = str(item.relative_to(path))
        out[rel] = f"-> {os.readlink(item)}" if item.is_symlink() else (
            hashlib.sha256(item.read_bytes()).hexdigest() if item.is_file() else "dir")
    return out


def hf_dir(path: Path, **save_kwargs) -> Path:
    make_tiny_llama().save_pretrained(path, **save_kwargs)
    make_tiny_tokenizer().save_pretrained(path)
    return path


# --------------------------------------------------------------------------- MODEL / OUT_DIR overlap


def overlap_cases(tmp: Path, model: Path) -> dict[str, tuple[Path, Path]]:
    """(MODEL as given, OUT_DIR as given) pairs that name overlapping places in every direction."""
    (tmp / "link").symlink_to(model)
    (tmp / "sub").mkdir(exist_ok=True)
    return {
        "equal": (model, model),
        "equal-through-dotdot": (model, tmp / "sub" / ".." / model.name),
        "out-inside-model": (model, model / "fp8"),
        "out-inside-model-through-symlink": (model, tmp / "link" / "fp8"),
        "model-inside-out": (model, tmp),
        "model-through-symlink-equal": (tmp / "link", model),
    }


@pytest.mark.parametrize("path", ["streaming", "in-memory"])
def test_cli_refuses_overlapping_model_and_out_dir_and_touches_nothing(tmp_path, path):
    model = hf_dir(tmp_path / "m")
    cases = overlap_cases(tmp_path, model)
    before = tree_digest(tmp_path)
    extra = ["--overwrite"] + (["--no-stream"] if path == "in-memory" else [])
    for name, (src, out) in cases.items():
        if path == "in-memory" and name not in ("equal", "model-inside-out"):
            continue  # the check runs before the path is chosen: two spellings suffice here
        result = run_cli("core", src, out, *extra)
        assert_clean_failure(result, r"OUT_DIR .* (is|is inside|contains) MODEL .*could overwrite or delete the input")
        assert tree_digest(tmp_path) == before, name


def test_python_api_refuses_overlap(tmp_path):
    model_dir = hf_dir(tmp_path / "m")
    cases = overlap_cases(tmp_path, model_dir)
    before = tree_digest(tmp_path)
    for name, (src, out) in cases.items():
        with pytest.raises(CheckpointError, match="could overwrite or delete the input"):
            quantize_checkpoint(src, out, overwrite=True)
        model, tokenizer = load_model(src)
        quantize(model, QuantConfig())
        with pytest.raises(CheckpointError, match="could overwrite or delete the input"):
            save_quantized(model, out, tokenizer, overwrite=True)
        assert tree_digest(tmp_path) == before, name


def test_export_cli_refuses_output_inside_model(tmp_path):
    model = hf_dir(tmp_path / "m")
    (tmp_path / "link").symlink_to(model)
    before = tree_digest(model)
    for out in (model / "x.onnx", tmp_path / "link" / "x.onnx"):
        assert_clean_failure(run_cli("export", model, out, "--overwrite"), r"OUT\.onnx .* is inside MODEL")
    assert tree_digest(model) == before


def test_cli_offload_folder_inside_out_dir_is_refused(tmp_path):
    model = hf_dir(tmp_path / "m")
    result = run_cli("core", model, tmp_path / "out", "--device-map", "auto", "--offload-folder", tmp_path / "out" / "off")
    assert_clean_failure(result, r"OUT_DIR .* contains --offload-folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# --------------------------------------------------------------------------- never leak a file


def test_streaming_copies_only_regular_files_inside_the_model(tmp_path, caplog):
    model = hf_dir(tmp_path / "m")
    secret = tmp_path / "secret.txt"
    secret.write_text("API_KEY=hunter2")
    (model / "notes.txt").symlink_to(secret)  # a cloned repository can plant this
    (model / "tokenizer_extra.json").symlink_to(model / "tokenizer.json")  # inside the folder: fine
    os.mkfifo(model / "special_tokens.txt")  # reading it would block forever
    (tmp_path / "outside").mkdir()
    (model / "subdir").symlink_to(tmp_path / "outside")
    with caplog.at_level(logging.WARNING, logger="fp8kit"):
        quantize_checkpoint(model, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    copied = sorted(p.name for p in out.iterdir())
    assert "notes.txt" not in copied and "special_tokens.txt" not in copied and "subdir" not in copied
    assert (out / "tokenizer_extra.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    assert not any(p.is_symlink() for p in out.iterdir())
    assert not any("hunter2" in p.read_text(errors="ignore") for p in out.iterdir() if p.is_file())
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert f"not copying notes.txt from {model}: a symlink to {secret}, outside the model folder" in warnings
    assert "not copying special_tokens.txt" in warnings and "a FIFO, not a regular file" in warnings


def test_hugging_face_cache_snapshot_symlinks_are_copied(tmp_path):
    """In the HF cache every file of snapshots/<rev>/ is a symlink into the repository's blobs/."""
    repo = tmp_path / "models--org--tiny"
    plain = hf_dir(tmp_path / "plain")
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for item in plain.iterdir():
        blob = repo / "blobs" / hashlib.sha256(item.name.encode()).hexdigest()
        blob.write_bytes(item.read_bytes())
        (snapshot / item.name).symlink_to(os.path.relpath(blob, snapshot))
    quantize_checkpoint(snapshot, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (plain / "tokenizer.json").read_bytes()


# --------------------------------------------------------------------------- QuantConfig and device arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"use_fast_accum": "no"}, r"use_fast_accum='no' must be True or False, not str"),
        ({"kv_cache": 1}, r"kv_cache=1 must be True or False, not int"),
        ({"gptq_act_order": "yes"}, r"gptq_act_order='yes' must be True or False, not str"),
        ({"smoothing": "0.5"}, r"smoothing='0.5' must be a number, not str"),
        ({"gptq_dampening": True}, r"gptq_dampening=True must be a number, not bool"),
        ({"gptq_block_size": 64.0}, r"gptq_block_size=64.0 must be an int, not float"),
        ({"ignore": [1]}, r"ignore: entry 1 is a int"),
        ({"ignore": ["lm_head", None]}, r"ignore: entry None is a NoneType"),
        ({"ignore": "lm_head"}, r"ignore must be a list of names or 're:' patterns, not str"),
        ({"ignore": None}, r"ignore must be a list .* not NoneType"),
        ({"weight": ["tensor"]}, r"weight=\['tensor'\] is not one of"),
        ({"activation": None}, r"activation=None is not one of"),
    ],
)
def test_quant_config_validates_types(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**kwargs)
    with pytest.raises(ConfigError, match=message):
        QuantConfig.from_dict({**QuantConfig().to_dict(), **kwargs})


def test_quant_config_from_dict_needs_an_object():
    with pytest.raises(ConfigError, match="expected an object of fields, got list"):
        QuantConfig.from_dict(["weight"])


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", r"device='tpu' is not a device name"),
        ("cuda:x", r"device='cuda:x' is not a device name"),
        ("mps", r"fp8kit runs on 'cpu' or 'cuda' devices, not 'mps'"),
        (0, r"device=0: expected a device name"),
    ],
)
def test_bad_device_arguments(tmp_path, device, message):
    src = hf_dir(tmp_path / "m")
    with pytest.raises(ConfigError, match=message):
        quantize_checkpoint(src, tmp_path / "out", device=device)
    ckpt = tmp_path / "ckpt"
    save_quantized(quantize(make_tiny_llama(), QuantConfig()), ckpt)
    with pytest.raises(ConfigError, match=message):
        load_quantized(ckpt, device=device)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_cuda_device_without_a_gpu(tmp_path):
    result = run_cli("core", hf_dir(tmp_path / "m"), tmp_path / "out", "--device", "cuda")
    assert_clean_failure(result, r"--device='cuda': this machine has no CUDA GPU usable by torch; use 'cpu'")
    result = run_cli("core", tmp_path / "m", tmp_path / "out", "--device", "tpu")
    assert_clean_failure(result, r"--device='tpu' is not a device name")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- calibration


def test_calibration_file_is_read_only_as_far_as_needed(tmp_path):
    """A 4 GiB file (sparse: a paragraph of text, then zeros) calibrates in a small fixed memory."""
    text = tmp_path / "huge.txt"
    with open(text, "wb") as f:
        f.write(("\n\n".join(tiny_text(200, seed=i) for i in range(20)) + "\n\n").encode())
        f.truncate(4 * 2**30)
    model = hf_dir(tmp_path / "m")
    script = (
        "import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
        "try:\n    runpy.run_module('fp8kit.core', run_name='__main__')\n"
        "finally:\n    print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "fp8kit.core", str(model), str(tmp_path / "out"), "--activation", "static",
         "--calibration-file", str(text), "--num-samples", "4", "--seq-len", "64"],
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300,
    )
    assert "maxrss_kb" in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    rss_gib = int(result.stderr.split("maxrss_kb")[-1].split()[0]) / 2**20
    assert rss_gib < 2.0, rss_gib  # reading the file whole would take > 4 GiB
    load_quantized(tmp_path / "out")


def test_lazy_read_gives_the_same_first_tokens_as_a_whole_read(tmp_path):
    from fp8kit.core.data import _token_ids, read_text_file

    tokenizer = make_tiny_tokenizer()
    file = tmp_path / "t.txt"
    file.write_text("\n\n".join(tiny_text(60, seed=i) for i in range(20000)))  # 1.2 M words, ~7 MB
    whole = _token_ids(tokenizer, read_text_file(file))
    for need in (10, 5_000, 500_000):
        prefix = read_text_file(file, tokenizer, need)
        ids = _token_ids(tokenizer, prefix)
        assert ids.numel() >= need and torch.equal(ids[:need], whole[:need])
        assert ids.numel() < whole.numel()


def test_outlier_that_zeroes_most_codes_warns_with_layer_and_share(tmp_path, caplog):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = 1e30
    with caplog.at_level(logging.WARNING, logger="fp8kit"):
        quantize(model, QuantConfig())
    warned = [r.getMessage() for r in caplog.records if "quantize to FP8 zero" in r.getMessage()]
    assert len(warned) == 1
    assert re.match(r"layer model\.layers\.0\.mlp\.up_proj: (99\.9|100\.0)% of its non-zero weights quantize to FP8 zero", warned[0])
    # The same warning on the streaming path, and none for an ordinary model.
    src = tmp_path / "m"
    bad = make_tiny_llama().to(torch.bfloat16)
    with torch.no_grad():
        bad.model.layers[1].self_attn.o_proj.weight[0, 0] = 1e30
    bad.save_pretrained(src)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fp8kit"):
        quantize_checkpoint(src, tmp_path / "out", progress=False)
        quantize(make_tiny_llama(seed=3), QuantConfig())
    warned = [r.getMessage() for r in caplog.records if "quantize to FP8 zero" in r.getMessage()]
    assert len(warned) == 1 and re.match(r"layer model\.layers\.1\.self_attn\.o_proj: (99\.9|100\.0)%", warned[0])


def test_outlier_in_fused_experts_warns_once_naming_the_experts(caplog):
    # Mixtral's fused experts [E, N, K]: an outlier in expert 1's gate rows zeroes its gate part (its own
    # scale); one warning per projection names the expert, none for the clean projection.
    from tiny_models import make_tiny_moe

    model = make_tiny_moe("mixtral")
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[1, 0, 0] = 1e30
    with caplog.at_level(logging.WARNING, logger="fp8kit"):
        quantize(model, QuantConfig())
    warned = [r.getMessage() for r in caplog.records if "quantize to FP8 zero" in r.getMessage()]
    assert len(warned) == 1
    assert re.match(r"layer model\.layers\.0\.mlp\.experts\.gate_up_proj: in experts \[1\], up to (49|50)\.\d% of", warned[0])


def test_kv_calibration_never_yields_a_non_finite_scale():
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight.fill_(3e38)  # finite weights, infinite keys
    with pytest.raises(CalibrationError, match=r"layer model\.layers\.1\.self_attn: calibration saw non-finite keys"):
        quantize(model, QuantConfig(kv_cache=True), [torch.arange(8)[None]])


# --------------------------------------------------------------------------- parsers: safetensors headers


def write_with_header(file: Path, header_bytes: bytes, data: bytes) -> None:
    header_bytes += b" " * (-len(header_bytes) % 8)
    file.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
entry_values = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "BF16", "F8_E4M3", "I64", "X9"]) | json_values,
     "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
     "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | json_values},
) | json_values


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), entry_values, max_size=3) | json_values,
       data=st.binary(max_size=64))
def test_any_json_header_is_accepted_or_refused_like_safetensors(tmp_path, header, data):
    """Whatever the header's JSON shape, our reader raises CheckpointError or accepts, and it accepts
    exactly the files the safetensors package reads."""
    from safetensors import safe_open

    file = tmp_path / "h.safetensors"
    write_with_header(file, json.dumps(header).encode(), data)
    try:
        read_safetensors_header(file)
        ours = True
    except CheckpointError:
        ours = False
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
        theirs = True
    except Exception:  # noqa: BLE001 - any refusal by the reference reader
        theirs = False
    assert ours == theirs, (header, len(data))


def test_deeply_nested_header_and_index_are_clear_errors(tmp_path):
    file = tmp_path / "model.safetensors"
    write_with_header(file, b"[" * 100_000 + b"]" * 100_000, b"")
    with pytest.raises(CheckpointError, match=r"the header is not valid JSON \(nested too deeply\)"):
        read_safetensors_header(file)
    model = hf_dir(tmp_path / "m")
    (model / "model.safetensors.index.json").write_text("{" + '"a":{' * 50_000 + "}" * 50_001)
    for path in ("streaming", "in-memory"):
        extra = ["--no-stream"] if path == "in-memory" else []
        assert_clean_failure(run_cli("core", model, tmp_path / "out", *extra),
                             r"model\.safetensors\.index\.json: not readable JSON \(safetensors index\): nested too deeply")


def relayout(file: Path, mutate) -> None:
    """Rewrite the safetensors `file` with `mutate(header, data) -> (header, data)` applied."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = mutate(json.loads(raw[8 : 8 + n]), raw[8 + n :])
    write_with_header(file, json.dumps(header).encode(), data)


def overlapping(header, data):
    """The second tensor (in file order) starts 4 bytes early, inside the first one."""
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    begin, end = header[names[1]]["data_offsets"]
    header[names[1]]["data_offsets"] = [begin - 4, end - 4]
    return header, data


def appended(header, data):
    return header, data + b"\0" * 8


def in_two_shards(model: Path) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    first = load_file(model / shards[0])
    second = load_file(model / shards[1])
    second[name] = first[name].clone()
    save_file(second, model / shards[1], metadata={"format": "pt"})


@pytest.mark.parametrize("defect", ["overlapping-offsets", "bytes-after-the-last-tensor", "tensor-in-two-shards"])
def test_streaming_and_in_memory_refuse_the_same_files(tmp_path, defect):
    model = hf_dir(tmp_path / "m", **({"max_shard_size": "100KB"} if defect == "tensor-in-two-shards" else {}))
    if defect == "tensor-in-two-shards":
        in_two_shards(model)
        pattern = r"tensor .* is also stored in model-.*\.safetensors; a tensor must be stored once"
    else:
        relayout(model / "model.safetensors", overlapping if defect == "overlapping-offsets" else appended)
        pattern = (r"data_offsets .* overlap the previous tensor's data" if defect == "overlapping-offsets"
                   else r"8 bytes after the last tensor's data")
    before = tree_digest(model)
    results = [run_cli("core", model, tmp_path / "out", *extra) for extra in ([], ["--no-stream"])]
    for result in results:
        assert_clean_failure(result, pattern)
    assert results[0].stderr.strip().splitlines()[-1] == results[1].stderr.strip().splitlines()[-1]
    assert tree_digest(model) == before and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- parsers: config.json

CONFIG_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "architectures", "model_type",
                 "tie_word_embeddings", "head_dim", "rope_scaling", "hidden_act", "torch_dtype"]


@pytest.fixture(scope="module")
def pristine_hf_dir(tmp_path_factory):
    return hf_dir(tmp_path_factory.mktemp("pristine") / "m")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(CONFIG_FIELDS),
       value=st.integers(-3, 3) | st.sampled_from([0, -1, 10**12, 2**63, 0.5, -1e-6, float("inf")]) | json_values)
def test_config_json_of_any_value_is_loaded_or_refused_cleanly(tmp_path_factory, pristine_hf_dir, field, value):
    model = tmp_path_factory.mktemp("cfg") / "m"
    shutil.copytree(pristine_hf_dir, model)
    config = json.loads((model / "config.json").read_text())
    config[field] = value
    (model / "config.json").write_text(json.dumps(config))
    for attempt in (lambda: load_model(model), lambda: quantize_checkpoint(model, model.parent / "out", progress=False)):
        try:
            attempt()
        except FP8KitError as exc:
            assert str(model / "config.json") in str(exc) or str(model) in str(exc)


def test_config_json_wrong_types_exit_2_from_the_cli(tmp_path):
    model = hf_dir(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    for field, value, message in [
        ("hidden_size", "64", r"config\.json: hidden_size must be an integer in \[1, 16777216\], got '64'"),
        ("num_attention_heads", 0, r"num_attention_heads must be an integer in \[1, 4096\], got 0"),
        ("architectures", "LlamaForCausalLM", r"architectures must be a list of class names"),
        ("num_key_value_heads", 3, r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ]:
        (model / "config.json").write_text(json.dumps({**config, field: value}))
        for extra in ([], ["--no-stream"]):
            assert_clean_failure(run_cli("core", model, tmp_path / "out", *extra), message)
    assert not (tmp_path / "out").exists()


def test_config_json_that_is_a_fifo_is_refused_not_read(tmp_path):
    model = hf_dir(tmp_path / "m")
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json: is a FIFO; fp8kit reads model files only from regular files"):
        load_model(model)


# --------------------------------------------------------------------------- parsers: GGUF


def tiny_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(4, 16))
    writer.add_tensor("output_norm.weight", np.ones(16, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_truncated_at_every_byte_is_a_clear_error(tmp_path):
    full = tiny_gguf(tmp_path / "t.gguf").read_bytes()
    assert check_gguf_file(tmp_path / "t.gguf")["general.name"] == "tiny"
    cut = tmp_path / "cut.gguf"
    for size in range(len(full)):
        cut.write_bytes(full[:size])
        with pytest.raises(CheckpointError, match=r"cut\.gguf: not (a readable GGUF file: |a GGUF file)"):
            check_gguf_file(cut)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_real_gguf_truncated_anywhere_loads_or_fails_cleanly(tmp_path_factory, fraction):
    from fp8kit.core.models import default_gguf_path

    source = default_gguf_path()
    size = int(fraction * min(source.stat().st_size, 4 * 2**20))  # header and tensor table: the first MiBs
    cut = tmp_path_factory.mktemp("gguf") / "cut.gguf"
    with open(source, "rb") as f:
        cut.write_bytes(f.read(size))
    with pytest.raises(CheckpointError, match=r"cut\.gguf: not (a readable GGUF file|a GGUF file)"):
        load_model(cut)


def test_cli_truncated_gguf_exits_2(tmp_path):
    from fp8kit.core.models import default_gguf_path

    cut = tmp_path / "cut.gguf"
    with open(default_gguf_path(), "rb") as f:
        cut.write_bytes(f.read(50_000_000))  # inside the tensor data
    assert_clean_failure(run_cli("core", cut, tmp_path / "out"), r"cut\.gguf: not a readable GGUF file: tensor .* runs past the end")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


# --------------------------------------------------------------------------- load_quantized checks every scale

SCHEMES = {
    "fp8-static-kv": ("fp8", QuantConfig(activation="static", kv_cache=True)),
    "fp8-dynamic": ("fp8", QuantConfig()),
    "ct-channel-token": ("compressed-tensors", QuantConfig(weight="channel", activation_granularity="token")),
    "ct-static-kv": ("compressed-tensors", QuantConfig(activation="static", kv_cache=True)),
}
LAYER = "model.layers.1.mlp.down_proj"


def corrupt(tensors: dict, key: str, how: str) -> str:
    """Apply `how` to tensor `key` in place; the message pattern load_quantized must raise."""
    t = tensors[key]
    if how in ("nan", "inf", "zero", "negative"):
        value = {"nan": float("nan"), "inf": float("inf"), "zero": 0.0, "negative": -0.5}[how]
        t = t.clone()
        t.reshape(-1)[-1] = value
        tensors[key] = t
        return rf"tensor {key}: scale .* is not finite and positive"
    if how == "wrong-shape":
        tensors[key] = torch.ones(3, 2)
        return rf"tensor {key}: scale of shape \[3, 2\]"
    if how == "int-dtype":
        tensors[key] = torch.ones(t.shape, dtype=torch.int32)
        return rf"tensor {key} has dtype torch.int32; scales must be float"
    if how == "transposed-weight":
        tensors[key] = t.t().contiguous()  # per channel, the scale no longer matches the weight's rows
        return rf"tensor {key}( has shape \(\d+, \d+\), the model's layer expects|_scale: scale of shape \[\d+, 1\]; expected)"
    if how == "nan-code":
        codes = t.view(torch.uint8).clone()
        codes[0, 0] = 0x7F
        tensors[key] = codes.view(torch.float8_e4m3fn)
        return rf"tensor {key}: holds NaN codes"
    raise ValueError(how)


CORRUPTIONS = [(f"{LAYER}.weight_scale", how) for how in ("nan", "inf", "zero", "negative", "wrong-shape", "int-dtype")] + [
    (f"{LAYER}.weight", "transposed-weight"), (f"{LAYER}.weight", "nan-code"),
    (f"{LAYER}.input_scale", "nan"), (f"{LAYER}.input_scale", "zero"),
    ("model.layers.0.self_attn.k_scale", "inf"), ("model.layers.0.self_attn.v_scale", "negative"),
]


@pytest.fixture(scope="module")
def saved_schemes(tmp_path_factory):
    calibration = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    out = {}
    for name, (format, config) in SCHEMES.items():
        path = tmp_path_factory.mktemp(name) / "c"
        save_quantized(quantize(make_tiny_llama(), config, calibration), path, format=format)
        out[name] = path
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("key, how", CORRUPTIONS, ids=[f"{k.rpartition('.')[2]}-{h}" for k, h in CORRUPTIONS])
def test_load_quantized_checks_every_scale_and_weight(saved_schemes, tmp_path, scheme, key, how):
    path = tmp_path / "c"
    shutil.copytree(saved_schemes[scheme], path)
    tensors = load_file(path / "model.safetensors")
    if key not in tensors:
        pytest.skip(f"{scheme} stores no {key.rpartition('.')[2]}")
    pattern = corrupt(tensors, key, how)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{path}.*{pattern}"):
        load_quantized(path)


def test_save_never_writes_what_the_loader_refuses(tmp_path):
    model = quantize(make_tiny_llama(), QuantConfig())
    model.model.layers[0].mlp.up_proj.weight_scale.fill_(float("nan"))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight_scale: scale nan .*not finite"):
        save_quantized(model, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_quantize_refuses_an_already_quantized_model(tmp_path):
    model = quantize(make_tiny_llama(), QuantConfig(activation="static"), [torch.arange(16)[None]])
    with pytest.raises(ConfigError, match=r"already quantized \(14 FP8 layers, e\.g\. model\.layers\.0\.self_attn\.q_proj\)"):
        quantize(model, QuantConfig())
    assert model.fp8kit_config.activation == "static"  # unchanged: what it saves still matches its layers
    save_quantized(model, tmp_path / "c")
    assert load_quantized(tmp_path / "c").fp8kit_config.activation == "static"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: checks the message for a GPU index past the last")
def test_cuda_index_past_the_last_gpu(tmp_path):
    count = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"device='cuda:{count}': there are {count} CUDA device\(s\)"):
        quantize_checkpoint(hf_dir(tmp_path / "m"), tmp_path / "out", device=f"cuda:{count}")
    assert not (tmp_path / "out").exists()
