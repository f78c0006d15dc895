"""Checkpoint formats: "fp8" (AutoFP8 / vLLM) and "compressed-tensors" (float-quantized).

Our output read back by fp8kit (bit-exact) and by the compressed-tensors package itself; checkpoints
written by compressed-tensors and hand-built AutoFP8 ones read by fp8kit; unsupported foreign schemes
refused with the file and the group named.
"""

import json
import logging
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fp8kit.core import CheckpointError, FP8Linear, QuantConfig, load_quantized, quantize, save_quantized
from fp8kit.core.checkpoint import save_hf
from fp8kit.core.streaming import quantize_checkpoint
from fp8kit.core import scaling
from fp8kit.core.checkpoint import FORMATS, layer_tensors, quantization_config_dict

from tiny_models import make_tiny_llama

SCHEMES = {
    "tensor-dynamic": QuantConfig(),
    "tensor-token": QuantConfig(activation_granularity="token"),
    "tensor-static-kv": QuantConfig(activation="static", kv_cache=True),
    "channel-dynamic": QuantConfig(weight="channel"),
    "channel-token": QuantConfig(weight="channel", activation_granularity="token", use_fast_accum=True),
    "channel-static-kv": QuantConfig(weight="channel", activation="static", kv_cache=True),
    "block": QuantConfig(weight="block", activation_granularity="group"),  # tiny Llama: every block partial
    "block-64x32-kv": QuantConfig(weight="block", activation_granularity="group", block_size=(64, 32), group_size=32, kv_cache=True),
}
CASES = [(f, s) for f in FORMATS for s in SCHEMES if not (f == "fp8" and SCHEMES[s].weight == "channel")]
LAYER = "model.layers.0.self_attn.k_proj"  # N=32, K=64
DIVISIBLE_K = dict(hidden_size=128, intermediate_size=256)  # every K a multiple of 128; k/v_proj N=64 partial
ATTN = "model.layers.0.self_attn"
CT_FIX = (
    "fp8kit reads symmetric 8-bit float (FP8 E4M3) quantization: weights per tensor, per channel or in "
    "2-D blocks, activations dynamic per tensor / per token / per group (with block weights) or static per tensor"
)


def calibration():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (1, 16), generator=g) for _ in range(3)]


def quantized_llama(config, **overrides):
    return quantize(make_tiny_llama(**overrides), config, calibration())


def read_tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_qc(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]


def write_qc(path, qc):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config))


def same_bits(a, b):
    """Bit-for-bit equality (FP8 compared through its bytes, so NaN encodings count too)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float8_e4m3fn:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def logits(model, seed=7):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt, scheme", CASES)
def test_round_trip_is_bit_exact(fmt, scheme, tmp_path):
    model = quantized_llama(SCHEMES[scheme])
    save_quantized(model, tmp_path / "ckpt", format=fmt)
    loaded = load_quantized(tmp_path / "ckpt")
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.fp8kit_config == model.fp8kit_config
    assert sorted(loaded.fp8kit_report.quantized) == sorted(model.fp8kit_report.quantized)
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert same_bits(got[key], want[key]), key
    for name in model.fp8kit_report.quantized:
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert isinstance(b, FP8Linear)
        assert (b.weight_granularity, b.activation, b.activation_granularity, b.use_fast_accum) == (
            a.weight_granularity, a.activation, a.activation_granularity, a.use_fast_accum
        )


def test_fp8_format_refuses_per_channel_weights_with_a_pointer(tmp_path):
    model = quantized_llama(SCHEMES["channel-dynamic"])
    with pytest.raises(CheckpointError) as info:
        save_quantized(model, tmp_path / "ckpt", format="fp8")
    assert str(info.value) == (
        "save_quantized: per-channel weight scales cannot be written in the AutoFP8 / vLLM 'fp8' format "
        "(it holds one scale per weight or per 128 x 128 block; vLLM would misread [N,1] scales). Quantize "
        "with weight='tensor' or 'block', or save with format='compressed-tensors'"
    )
    assert not (tmp_path / "ckpt").exists()


def test_unknown_format_is_refused(tmp_path):
    model = quantized_llama(SCHEMES["tensor-dynamic"])
    with pytest.raises(CheckpointError, match=re.escape("unknown checkpoint format 'awq'; choose one of ['fp8', 'compressed-tensors']")):
        save_quantized(model, tmp_path / "ckpt", format="awq")
    assert not (tmp_path / "ckpt").exists()


# --------------------------------------------------------------------------- exact layout


def ct_args(strategy, dynamic, group_size=None, block_structure=None):
    return {
        "num_bits": 8, "type": "float", "symmetric": True, "group_size": group_size, "strategy": strategy,
        "block_structure": block_structure, "dynamic": dynamic, "actorder": None,
        "observer": None if dynamic else "minmax", "observer_kwargs": {},
    }


def test_compressed_tensors_config_and_tensors_are_exact(tmp_path):
    config = SCHEMES["channel-static-kv"]
    model = quantized_llama(config)
    save_quantized(model, tmp_path / "ckpt", format="compressed-tensors")
    assert read_qc(tmp_path / "ckpt") == {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": ct_args("channel", False),
                "input_activations": ct_args("tensor", False),
                "output_activations": None,
                "format": "float-quantized",
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": ct_args("tensor", False),
        "global_compression_ratio": None,
        "fp8kit": {"format_version": 1, "config": config.to_dict()},
    }
    tensors = read_tensors(tmp_path / "ckpt")
    layer = model.get_submodule(LAYER)
    expected = {
        f"{LAYER}.weight": (torch.float8_e4m3fn, (32, 64)),
        f"{LAYER}.weight_scale": (torch.float32, (32, 1)),
        f"{LAYER}.input_scale": (torch.float32, (1,)),
        f"{ATTN}.k_scale": (torch.float32, (1,)),
        f"{ATTN}.v_scale": (torch.float32, (1,)),
        "lm_head.weight": (torch.float32, (256, 64)),
    }
    for key, (dtype, shape) in expected.items():
        assert (tensors[key].dtype, tuple(tensors[key].shape)) == (dtype, shape), key
    assert same_bits(tensors[f"{LAYER}.weight"], layer.weight)
    assert torch.equal(tensors[f"{LAYER}.weight_scale"], layer.weight_scale)
    assert torch.equal(tensors[f"{LAYER}.input_scale"], layer.input_scale.reshape(1))
    assert torch.equal(tensors[f"{ATTN}.k_scale"], model.get_submodule(ATTN).k_scale.reshape(1))
    assert not any("zero_point" in k for k in tensors)
    assert set(tensors) == set(model.state_dict())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compressed_tensors_args_per_scheme(scheme, tmp_path):
    config = SCHEMES[scheme]
    model = quantized_llama(config)
    save_quantized(model, tmp_path / "ckpt", format="compressed-tensors")
    group = read_qc(tmp_path / "ckpt")["config_groups"]["group_0"]
    block = config.weight == "block"
    assert group["weights"] == ct_args(config.weight, False, block_structure=list(config.block_size) if block else None)
    if config.activation == "static":
        assert group["input_activations"] == ct_args("tensor", False)
    elif block:  # llm-compressor's FP8_BLOCK: dynamic 1 x group_size activation groups
        assert group["input_activations"] == ct_args("group", True, group_size=config.group_size)
    else:
        assert group["input_activations"] == ct_args(config.activation_granularity, True)
    tensors = read_tensors(tmp_path / "ckpt")
    assert (f"{LAYER}.input_scale" in tensors) == (config.activation == "static")  # dynamic: none stored
    bn, bk = config.block_size
    expected = (-(-32 // bn), -(-64 // bk)) if block else (32, 1) if config.weight == "channel" else (1,)
    assert tuple(tensors[f"{LAYER}.weight_scale"].shape) == expected
    assert tensors[f"{LAYER}.weight_scale"].dtype == torch.float32  # the fp32 model's dtype
    assert (f"{ATTN}.k_scale" in tensors) == config.kv_cache


def test_fp8_config_is_unchanged_by_the_new_api():
    config = QuantConfig(activation="static", kv_cache=True)
    assert quantization_config_dict(config, ["lm_head"], True, "fp8") == {
        "quant_method": "fp8",
        "activation_scheme": "static",
        "ignored_layers": ["lm_head"],
        "kv_cache_scheme": "static",
        "fp8kit": {"format_version": 1, "config": config.to_dict()},
    }
    assert "kv_cache_scheme" not in quantization_config_dict(QuantConfig(), [], False, "fp8")


def test_layer_tensors_names_shapes_and_values():
    w = scaling.quantize(torch.randn(32, 64), torch.tensor(0.01))
    s_t, s_c, s_in = torch.tensor(0.01), torch.rand(32, 1) + 0.1, torch.tensor(0.02)
    fp8 = layer_tensors("a.b", w, s_t, s_in, "fp8")
    assert {k: tuple(v.shape) for k, v in fp8.items()} == {"a.b.weight": (32, 64), "a.b.weight_scale": (), "a.b.input_scale": ()}
    ct = layer_tensors("a.b", w, s_t.reshape(1), s_in, "compressed-tensors")
    assert {k: tuple(v.shape) for k, v in ct.items()} == {"a.b.weight": (32, 64), "a.b.weight_scale": (1,), "a.b.input_scale": (1,)}
    ch = layer_tensors("a.b", w, s_c, None, "compressed-tensors")
    assert {k: tuple(v.shape) for k, v in ch.items()} == {"a.b.weight": (32, 64), "a.b.weight_scale": (32, 1)}
    assert same_bits(ch["a.b.weight"], w) and torch.equal(ch["a.b.weight_scale"], s_c)
    assert float(ct["a.b.weight_scale"]) == float(s_t) and float(fp8["a.b.input_scale"]) == float(s_in)
    with pytest.raises(CheckpointError, match=re.escape("a.b.weight_scale: per-channel scales [32, 1] cannot be written in the AutoFP8 / vLLM 'fp8' format; save with format='compressed-tensors'")):
        layer_tensors("a.b", w, s_c, None, "fp8")
    with pytest.raises(CheckpointError, match=re.escape("a.b.weight: expected float8_e4m3fn [N, K], got torch.float32 (32, 64)")):
        layer_tensors("a.b", w.float(), s_t, None, "fp8")
    with pytest.raises(CheckpointError, match=re.escape("a.b.weight_scale: shape (16, 1) is neither one element nor [N, 1] = [32, 1]")):
        layer_tensors("a.b", w, torch.ones(16, 1), None, "compressed-tensors")


# --------------------------------------------------------------------------- read by compressed-tensors


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compressed_tensors_package_reads_our_checkpoint(scheme, tmp_path):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams
    from transformers import AutoModelForCausalLM

    config = SCHEMES[scheme]
    # compressed-tensors' block forward needs K divisible by the block's K (partial rows are fine).
    model = quantized_llama(config, **(DIVISIBLE_K if scheme == "block" else {}))
    save_quantized(model, tmp_path / "ckpt", format="compressed-tensors")

    # Its own schema parses the config (pydantic, extra keys such as "fp8kit" ignored).
    parsed = QuantizationConfig.model_validate(read_qc(tmp_path / "ckpt"))
    assert parsed.format == "float-quantized" and parsed.quantization_status == QuantizationStatus.COMPRESSED
    assert parsed.ignore == ["lm_head"]
    args = parsed.config_groups["group_0"]
    assert (args.weights.strategy, args.weights.type, args.weights.num_bits) == (config.weight, "float", 8)
    assert args.input_activations.dynamic == (config.activation == "dynamic")

    # Its transformers integration (apply config, compress, load weights) sees our tensors unchanged.
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    # compressed-tensors 0.20 attaches no KV-cache scales to transformers 5 attention modules (it looks
    # for a `past_key_values` argument, now called `cache`), so those, and only those, may be unexpected.
    kv_keys = {f"model.layers.{i}.self_attn.{s}" for i in range(2) for s in ("k_scale", "v_scale")}
    assert info["unexpected_keys"] <= (kv_keys if config.kv_cache else set())
    for name in model.fp8kit_report.quantized:
        ours, theirs = model.get_submodule(name), hf.get_submodule(name)
        assert same_bits(theirs.weight, ours.weight), name
        assert torch.equal(theirs.weight_scale, ours.weight_scale.reshape(theirs.weight_scale.shape)), name
        if config.activation == "static":
            assert torch.equal(theirs.input_scale, ours.input_scale.reshape(1)), name
        else:
            assert not hasattr(theirs, "input_scale"), name
    if config.kv_cache:  # the parameters its own initializer creates for kv_cache_scheme fit our tensors
        stored = read_tensors(tmp_path / "ckpt")
        attn = hf.get_submodule(ATTN)
        for base in ("k", "v"):
            key = f"{ATTN}.{base}_scale"
            assert torch.equal(stored[key], getattr(model.get_submodule(ATTN), f"{base}_scale").reshape(1))
            if key in info["unexpected_keys"]:
                initialize_qparams(attn, base, parsed.kv_cache_scheme, (2, None, 16), torch.float32, force_zero_point=False)
                getattr(attn, f"{base}_scale").data.copy_(stored[key])
            theirs = getattr(attn, f"{base}_scale")
            assert (theirs.dtype, theirs.shape) == (stored[key].dtype, stored[key].shape)
            assert torch.equal(theirs, stored[key])

    # Its decompression gives exactly weight * scale, and its fake-quantized forward matches ours.
    ModelCompressor.from_compression_config(hf.config.quantization_config).decompress_model(hf)
    for name in model.fp8kit_report.quantized:
        ours = model.get_submodule(name)
        block = ours.block_size if ours.weight_granularity == "block" else None
        assert torch.equal(hf.get_submodule(name).weight, scaling.dequantize(ours.weight, ours.weight_scale, block=block)), name
    # Same FP8 operands, fp32 products on both sides; only the summation order may differ.
    torch.testing.assert_close(logits(hf), logits(model), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- written by compressed-tensors


def llm_compressor_checkpoint(path, preset, reference, kv_cache=False):
    """A checkpoint laid out by compressed-tensors itself (as llm-compressor saves it), with the scales
    fp8kit computed for `reference` standing in for llm-compressor's observers."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )

    size = {k: getattr(reference.config, k) for k in ("hidden_size", "intermediate_size")}
    model = make_tiny_llama(**size).to(reference.dtype)
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "weight_scale"):
                ours = reference.get_submodule(name)
                module.weight_scale.copy_(ours.weight_scale.reshape(module.weight_scale.shape))
                if hasattr(module, "input_scale"):
                    module.input_scale.copy_(ours.input_scale.reshape(1))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    if kv_cache:  # as llm-compressor writes them: <attn>.k_scale [1] and the kv_cache_scheme args
        tensors = load_file(str(path / "model.safetensors"))
        for i in range(2):
            attn = reference.get_submodule(f"model.layers.{i}.self_attn")
            tensors[f"model.layers.{i}.self_attn.k_scale"] = attn.k_scale.reshape(1).clone()
            tensors[f"model.layers.{i}.self_attn.v_scale"] = attn.v_scale.reshape(1).clone()
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        qc = read_qc(path)
        qc["kv_cache_scheme"] = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False).model_dump()
        write_qc(path, qc)
    return path


@pytest.mark.parametrize(
    "preset, config",
    [
        ("FP8_DYNAMIC", QuantConfig(weight="channel", activation_granularity="token")),
        ("FP8", QuantConfig(activation="static", kv_cache=True)),
    ],
)
def test_reads_checkpoints_written_by_compressed_tensors(preset, config, tmp_path):
    reference = quantized_llama(config)
    path = llm_compressor_checkpoint(tmp_path / "ckpt", preset, reference, kv_cache=config.kv_cache)
    qc = read_qc(path)
    assert "fp8kit" not in qc and qc["format"] == "float-quantized" and "version" in qc
    loaded = load_quantized(path)
    assert loaded.fp8kit_config == QuantConfig(
        weight=config.weight,
        activation=config.activation,
        activation_granularity=config.activation_granularity,
        ignore=("lm_head",),
        kv_cache=config.kv_cache,
    )
    stored = read_tensors(path)
    for name in reference.fp8kit_report.quantized:
        layer = loaded.get_submodule(name)
        assert same_bits(layer.weight, stored[f"{name}.weight"]), name
        assert torch.equal(layer.weight_scale.flatten(), stored[f"{name}.weight_scale"].flatten()), name
        # compressed-tensors' quantization of the same weight with the same scale is fp8kit's, bit for bit
        assert same_bits(layer.weight, reference.get_submodule(name).weight), name
    if config.kv_cache:
        assert torch.equal(loaded.get_submodule(ATTN).k_scale, reference.get_submodule(ATTN).k_scale)
    assert torch.equal(logits(loaded), logits(reference))


@pytest.mark.parametrize(
    "preset, config, dtype",
    [
        ("FP8_DYNAMIC", QuantConfig(weight="channel", activation_granularity="token"), torch.float32),
        ("FP8", QuantConfig(activation="static"), torch.float32),
        # fp32: compressed-tensors quantizes in the model's dtype, so only an fp32 model gives the same FP8 bits
        ("FP8_BLOCK", QuantConfig(weight="block", activation_granularity="group"), torch.float32),
    ],
)
def test_our_layout_is_the_one_compressed_tensors_writes(preset, config, dtype, tmp_path):
    """Same tensors (names, dtypes, shapes, bits) and the same parsed scheme as compressed-tensors' own save."""
    from compressed_tensors.quantization import QuantizationConfig

    reference = quantize(make_tiny_llama(**DIVISIBLE_K).to(dtype), config, calibration())
    theirs_path = llm_compressor_checkpoint(tmp_path / "theirs", preset, reference)
    save_quantized(reference, tmp_path / "ours", format="compressed-tensors")
    theirs, ours = read_tensors(theirs_path), read_tensors(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert same_bits(ours[key], theirs[key]), key
    parsed_theirs = QuantizationConfig.model_validate(read_qc(theirs_path))
    parsed_ours = QuantizationConfig.model_validate(read_qc(tmp_path / "ours"))
    for attr in ("format", "quantization_status", "ignore", "kv_cache_scheme"):
        assert getattr(parsed_ours, attr) == getattr(parsed_theirs, attr), attr
    scheme_ours, scheme_theirs = parsed_ours.config_groups["group_0"], parsed_theirs.config_groups["group_0"]
    assert scheme_ours.targets == scheme_theirs.targets and scheme_ours.format == scheme_theirs.format
    for part in ("weights", "input_activations"):
        args_ours, args_theirs = getattr(scheme_ours, part), getattr(scheme_theirs, part)
        # observers name the calibration algorithm only; everything that defines the format must agree
        assert args_ours.model_copy(update={"observer": None}) == args_theirs.model_copy(update={"observer": None}), part


def test_reads_llm_compressor_fp8_block_in_bf16(tmp_path):
    # FP8_BLOCK as llm-compressor saves a bf16 model: weight_scale [ceil(N/128), ceil(K/128)] in bf16
    # (k_proj / v_proj: N = 64, a partial row of blocks), dynamic 1 x 128 groups, no input_scale.
    config = QuantConfig(weight="block", activation_granularity="group")
    reference = quantize(make_tiny_llama(**DIVISIBLE_K).to(torch.bfloat16), config)
    path = llm_compressor_checkpoint(tmp_path / "ckpt", "FP8_BLOCK", reference)
    stored = read_tensors(path)
    k_proj = "model.layers.0.self_attn.k_proj"
    assert stored[f"{k_proj}.weight_scale"].dtype == torch.bfloat16 and stored[f"{k_proj}.weight_scale"].shape == (1, 1)
    assert not [k for k in stored if k.endswith("input_scale")]
    loaded = load_quantized(path)
    assert loaded.fp8kit_config == QuantConfig(weight="block", activation_granularity="group", ignore=("lm_head",))
    for name in reference.fp8kit_report.quantized:
        layer = loaded.get_submodule(name)
        assert layer.weight_granularity == "block" and layer.scale_dtype == torch.bfloat16
        assert same_bits(layer.weight, stored[f"{name}.weight"]), name
        assert torch.equal(layer.weight_scale, stored[f"{name}.weight_scale"].float()), name  # bf16 -> fp32: exact
        # compressed-tensors divides by the scale in bf16, fp8kit in fp32: a few values land one FP8 step apart
        ours = reference.get_submodule(name).weight
        assert (layer.weight.view(torch.uint8) == ours.view(torch.uint8)).float().mean() > 0.9, name
        assert ((layer.weight.float() - ours.float()).abs() <= ours.float().abs() * 2**-3 + 2**-6).all(), name
    save_quantized(loaded, tmp_path / "again", format="compressed-tensors")  # and written back the same way
    for key, tensor in read_tensors(tmp_path / "again").items():
        assert same_bits(tensor, stored[key]), key


def block_reference64(w, block):
    """(fp8 weight, fp32 block scales) by explicit loops over blocks, as DeepSeek-V3 quantizes: amax of the
    block's real elements / 448 (float64, rounded once to fp32), each block cast on its own."""
    bn, bk = block
    n, k = w.shape
    scales = torch.empty(-(-n // bn), -(-k // bk), dtype=torch.float32)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].double()
            scales[i, j] = tile.abs().max().item() / 448
            q[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = (tile / scales[i, j].double()).clamp(-448, 448).float().to(torch.float8_e4m3fn)
    return q, scales


@pytest.mark.parametrize("skip_list", ["ignored_layers", "modules_to_not_convert", None])
def test_reads_hand_built_deepseek_fp8_block_checkpoints(skip_list, tmp_path):
    """DeepSeek-V3 / Qwen3-FP8 layout, built by hand: `weight_block_size`, F8_E4M3 weights, F32
    `weight_scale_inv` [ceil(N/128), ceil(K/128)] (a multiplier), partial blocks in N and K, no fp8kit block."""
    sizes = dict(hidden_size=192, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2)  # 1.5 / 2.5 blocks
    original = make_tiny_llama(**sizes)
    path = tmp_path / "deepseek"
    original.save_pretrained(path)
    tensors = {}
    dequantized = {}
    for key, tensor in original.state_dict().items():
        if key.endswith(".weight") and tensor.dim() == 2 and "embed" not in key and "lm_head" not in key:
            q, scale = block_reference64(tensor, (128, 128))
            tensors[key], tensors[key + "_scale_inv"] = q, scale
            dequantized[key] = q.double() * scale.double().repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]
        else:
            tensors[key] = tensor.contiguous()
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 3)  # [ceil(192/128), ceil(320/128)]
    for file in path.glob("*.safetensors"):
        file.unlink()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    if skip_list is not None:
        qc[skip_list] = ["lm_head"]
    write_qc(path, qc)

    loaded = load_quantized(path)
    config = loaded.fp8kit_config
    assert (config.weight, config.activation_granularity, config.block_size, config.group_size) == ("block", "group", (128, 128), 128)
    assert len(loaded.fp8kit_report.quantized) == 14 and type(loaded.lm_head) is torch.nn.Linear
    for key, expected in dequantized.items():
        layer = loaded.get_submodule(key.removesuffix(".weight"))
        assert same_bits(layer.weight, tensors[key]) and torch.equal(layer.weight_scale, tensors[key + "_scale_inv"]), key
        back = scaling.dequantize(layer.weight, layer.weight_scale, torch.float64, block=layer.block_size)
        torch.testing.assert_close(back, expected, rtol=2**-23, atol=0)  # q * scale, one fp32 rounding
        # Each layer computes (x in 1 x 128 FP8 groups) @ (the dequantized weight).T, exactly as emulated.
        x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(len(key)))
        xs = scaling.block_scale(x, (1, 128))
        x64 = scaling.dequantize(scaling.quantize(x, xs, block=(1, 128)), xs, torch.float64, block=(1, 128))
        torch.testing.assert_close(layer(x).double(), x64 @ expected.T, rtol=1e-5, atol=1e-5)
    # The whole model: the dequantized weights in full precision, up to FP8 activation rounding.
    reference = make_tiny_llama(**sizes)
    with torch.no_grad():
        for key, expected in dequantized.items():
            reference.get_submodule(key.removesuffix(".weight")).weight.copy_(expected.float())
    ref, out = logits(reference).double(), logits(loaded).double()
    assert ((out - ref).norm() / ref.norm()).item() < 0.08


def test_block_scales_of_the_wrong_shape_are_named(tmp_path):
    model = quantized_llama(SCHEMES["block"])
    save_quantized(model, tmp_path / "ckpt", format="fp8")
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    tensors[f"{LAYER}.weight_scale_inv"] = torch.ones(2, 1)
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_quantized(tmp_path / "ckpt")
    assert str(info.value) == (
        f"{tmp_path / 'ckpt'}: tensor {LAYER}.weight_scale: block scales of shape (2, 1) do not fit a 32 x 64 weight "
        "in 128 x 128 blocks; expected [ceil(32/128), ceil(64/128)] = [1, 1]"
    )


@pytest.mark.parametrize(
    ("qc", "message"),
    [
        ({"weight_block_size": [128]}, "quantization_config.weight_block_size must be two positive ints, got [128]"),
        ({"weight_block_size": [128, 128], "scale_fmt": "ue8m0"}, "quantization_config.scale_fmt is 'ue8m0'; fp8kit reads block scales stored as floats"),
        ({"weight_block_size": [128, 128], "activation_scheme": "static"}, "weight_block_size with activation_scheme 'static'"),
    ],
)
def test_bad_fp8_block_configs_are_refused(qc, message, tmp_path):
    model = quantized_llama(SCHEMES["block"])
    save_quantized(model, tmp_path / "ckpt", format="fp8")
    write_qc(tmp_path / "ckpt", {"quant_method": "fp8", "activation_scheme": "dynamic", **qc})
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_quantized(tmp_path / "ckpt")


def test_transformers_finegrained_fp8_reads_ours(tmp_path):
    """transformers' own FineGrainedFP8 loader (on CPU it dequantizes: `dequantize=True`) reads our "fp8"
    block checkpoint: exactly our dequantized weights, and our logits up to FP8 activation rounding.
    Its dequantizer derives the block from the shapes, so every dimension here is a multiple of 128
    or at most 128 (a partial block such as K = 576 = 4.5 blocks is refused there; fp8kit and vLLM read it)."""
    from transformers import AutoModelForCausalLM

    model = quantized_llama(SCHEMES["block"], **DIVISIBLE_K)
    save_quantized(model, tmp_path / "ckpt", format="fp8")
    qc = read_qc(tmp_path / "ckpt")
    assert (qc["quant_method"], qc["fmt"], qc["weight_block_size"], qc["activation_scheme"]) == ("fp8", "e4m3", [128, 128], "dynamic")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in hf.state_dict().values())  # dequantized (the file holds FP8 + scales only)
    for name in model.fp8kit_report.quantized:
        ours = model.get_submodule(name)
        theirs = hf.get_submodule(name).weight
        assert theirs.dtype == torch.float32, name
        assert torch.equal(theirs, scaling.dequantize(ours.weight, ours.weight_scale, block=ours.block_size)), name
    assert torch.equal(hf.lm_head.weight, model.lm_head.weight)  # ignored_layers: kept in high precision
    ref, out = logits(hf).double(), logits(model).double()  # ours adds FP8 activation rounding
    assert ((out - ref).norm() / ref.norm()).item() < 0.08


def test_reads_compressed_tensors_scales_in_bf16_and_1d_channel_scales(tmp_path):
    reference = quantized_llama(QuantConfig(weight="channel"))
    path = llm_compressor_checkpoint(tmp_path / "ckpt", "FP8_DYNAMIC", reference)
    tensors = load_file(str(path / "model.safetensors"))
    for key in [k for k in tensors if k.endswith(".weight_scale")]:
        tensors[key] = tensors[key].to(torch.bfloat16)
    tensors[f"{LAYER}.weight_scale"] = tensors[f"{LAYER}.weight_scale"].flatten()  # [N] instead of [N, 1]
    save_file(tensors, str(path / "model.safetensors"))
    loaded = load_quantized(path)
    for key in [k for k in tensors if k.endswith(".weight_scale")]:
        scale = loaded.get_submodule(key.rpartition(".")[0]).weight_scale
        assert scale.dtype == torch.float32 and scale.shape[1] == 1
        assert torch.equal(scale.flatten(), tensors[key].float().flatten()), key  # bf16 -> fp32 is exact


# --------------------------------------------------------------------------- hand-built AutoFP8


@pytest.mark.parametrize("activation", ["static", "dynamic"])
def test_reads_hand_built_autofp8_checkpoints(activation, tmp_path):
    """AutoFP8's layout: scalars of shape [1], `ignored_layers`, no fp8kit block; KV scales as
    `k_proj.output_scale` / `v_proj.output_scale` (which vLLM maps to `self_attn.k_scale`)."""
    kv = activation == "static"
    reference = quantized_llama(QuantConfig(activation=activation, kv_cache=kv))
    path = tmp_path / "autofp8"
    reference.save_pretrained(path)  # config.json; the tensors are replaced below
    tensors = {}
    for key, tensor in reference.state_dict().items():
        if key.endswith((".weight_scale", ".input_scale")):
            tensor = tensor.reshape(1)
        if key.endswith((".k_scale", ".v_scale")):
            key = key.replace(".k_scale", ".k_proj.output_scale").replace(".v_scale", ".v_proj.output_scale")
            tensor = tensor.reshape(1)
        tensors[key] = tensor.contiguous()
    for file in path.glob("*.safetensors"):
        file.unlink()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    qc = {"quant_method": "fp8", "activation_scheme": activation, "ignored_layers": ["lm_head"]}
    if kv:
        qc["kv_cache_scheme"] = "static"
    write_qc(path, qc)

    loaded = load_quantized(path)
    assert loaded.fp8kit_config == QuantConfig(activation=activation, ignore=("lm_head",), kv_cache=kv)
    assert torch.equal(logits(loaded), logits(reference))
    for key, tensor in reference.state_dict().items():
        assert same_bits(loaded.state_dict()[key], tensor), key


# --------------------------------------------------------------------------- unsupported foreign schemes


def foreign_with_group(tmp_path, group, **top):
    reference = quantized_llama(QuantConfig(weight="channel", activation_granularity="token"))
    path = llm_compressor_checkpoint(tmp_path / "ckpt", "FP8_DYNAMIC", reference)
    qc = read_qc(path)
    if group is not None:
        qc["config_groups"]["group_0"] = group
    qc.update(top)
    write_qc(path, qc)
    return path


def preset(name, fmt=None):
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(name, ["Linear"]).model_dump()
    scheme["format"] = fmt
    return scheme


UNSUPPORTED = {
    # llm-compressor's formats for these presets
    "int8 W8A8": (lambda: preset("W8A8", "int-quantized"), {}, "quantization_config.config_groups.group_0 uses format 'int-quantized'; fp8kit reads the unpacked 'float-quantized' / 'naive-quantized' formats"),
    "int4 packed": (lambda: preset("W4A16", "pack-quantized"), {}, "quantization_config.config_groups.group_0 uses format 'pack-quantized'; fp8kit reads the unpacked 'float-quantized' / 'naive-quantized' formats"),
    "nvfp4": (lambda: preset("NVFP4", "nvfp4-pack-quantized"), {}, "quantization_config.config_groups.group_0 uses format 'nvfp4-pack-quantized'; fp8kit reads the unpacked 'float-quantized' / 'naive-quantized' formats"),
    # schemes inside an unpacked format
    "int8 args": (lambda: preset("W8A8", "float-quantized"), {}, f"quantization_config.config_groups.group_0.weights has unsupported type='int'; {CT_FIX}"),
    "int4 group asym": (lambda: preset("W4A16_ASYM", "naive-quantized"), {}, f"quantization_config.config_groups.group_0.weights has unsupported num_bits=4, type='int', symmetric=false (asymmetric, with zero points), strategy='group'; {CT_FIX}"),
    "fp8 group activations with channel weights": (
        lambda: {**preset("FP8_DYNAMIC"), "input_activations": preset("FP8_BLOCK")["input_activations"]}, {},
        "invalid quantization_config: QuantConfig: weight='channel' with activation_granularity='group': block weights "
        "go with 1 x group_size activation groups and nothing else (the pairing torch's block-wise GEMM, vLLM and "
        "transformers run); use weight='block', activation_granularity='group'",
    ),
    "fp8 block without a block structure": (
        lambda: {**preset("FP8_BLOCK"), "weights": {**preset("FP8_BLOCK")["weights"], "block_structure": None}}, {},
        f"quantization_config.config_groups.group_0.weights has unsupported block_structure=None (two positive ints needed); {CT_FIX}",
    ),
    "fp8 block with groups of another size": (
        lambda: {**preset("FP8_BLOCK"), "input_activations": {**preset("FP8_BLOCK")["input_activations"], "group_size": 64}}, {},
        "invalid quantization_config: QuantConfig.group_size=64 must equal block_size[1]=128 (the activation groups "
        "along K line up with the weight blocks, as every block-wise FP8 GEMM needs)",
    ),
    "fp8 block with static activations": (
        lambda: {**preset("FP8_BLOCK"), "input_activations": preset("FP8")["input_activations"]}, {},
        "invalid quantization_config: QuantConfig: weight='block' needs activation='dynamic': block-wise checkpoints "
        "quantize activations per 1 x group_size group at run time (vLLM, transformers and torch's block-wise GEMM "
        "take no static scales); use activation='dynamic', activation_granularity='group'",
    ),
    "asymmetric fp8": (
        lambda: {**preset("FP8_DYNAMIC"), "weights": {**preset("FP8_DYNAMIC")["weights"], "symmetric": False}}, {},
        f"quantization_config.config_groups.group_0.weights has unsupported symmetric=false (asymmetric, with zero points); {CT_FIX}",
    ),
    "weight only": (lambda: preset("FP8_DYNAMIC") | {"input_activations": None}, {}, "quantization_config.config_groups.group_0 quantizes weights only (input_activations is null); fp8kit runs FP8 weights with FP8 activations (W8A8) only"),
    "global pack format": (lambda: preset("FP8_DYNAMIC"), {"format": "pack-quantized"}, "quantization_config.config_groups.group_0 uses format 'pack-quantized'; fp8kit reads the unpacked 'float-quantized' / 'naive-quantized' formats"),
    "frozen": (lambda: None, {"quantization_status": "frozen"}, "quantization_config.quantization_status is 'frozen'; fp8kit reads 'compressed' checkpoints (FP8 weights on disk)"),
    "int8 kv cache": (lambda: None, {"kv_cache_scheme": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}}, f"quantization_config.kv_cache_scheme has unsupported type='int'; {CT_FIX}"),
    "transforms": (lambda: None, {"transform_config": {"config_groups": {"R1": {"type": "hadamard"}}}}, "quantization_config.transform_config is set (rotations / Hadamard transforms); fp8kit does not apply transforms"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_foreign_schemes_are_refused_by_name(case, tmp_path):
    make_group, top, message = UNSUPPORTED[case]
    path = foreign_with_group(tmp_path, make_group(), **top)
    with pytest.raises(CheckpointError) as info:
        load_quantized(path)
    assert str(info.value) == f"{path / 'config.json'}: {message}"


def test_mixed_config_groups_are_refused(tmp_path):
    path = foreign_with_group(tmp_path, None)
    qc = read_qc(path)
    qc["config_groups"]["group_1"] = {**preset("FP8"), "targets": ["re:.*down_proj"]}
    write_qc(path, qc)
    with pytest.raises(CheckpointError) as info:
        load_quantized(path)
    assert str(info.value) == (
        f"{path / 'config.json'}: quantization_config.config_groups mix schemes "
        "{'group_0': ('channel', 'dynamic', 'token'), 'group_1': ('tensor', 'static', 'tensor')}; "
        "fp8kit applies one scheme to the model"
    )


def test_nonzero_zero_points_are_refused(tmp_path):
    path = foreign_with_group(tmp_path, None)
    tensors = load_file(str(path / "model.safetensors"))
    tensors[f"{LAYER}.weight_zero_point"] = torch.ones(32, 1)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_quantized(path)
    assert str(info.value) == (
        f"{path}: tensor {LAYER}.weight_zero_point holds non-zero zero points (asymmetric quantization); "
        "fp8kit reads symmetric FP8 only"
    )


def test_static_scheme_without_input_scales_is_refused(tmp_path):
    reference = quantized_llama(QuantConfig(activation="static"))
    path = llm_compressor_checkpoint(tmp_path / "ckpt", "FP8", reference)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[f"{LAYER}.input_scale"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_quantized(path)
    assert str(info.value) == (
        f"{path}: tensor {LAYER}.input_scale is missing; quantization_config declares static activations"
    )


# --------------------------------------------------------------------------- CLI


def test_cli_writes_per_channel_compressed_tensors(tiny_llama_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "fp8kit.core", str(tiny_llama_dir), str(out), "--weight", "channel",
         "--activation-granularity", "token", "--format", "compressed-tensors"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    qc = read_qc(out)
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    loaded = load_quantized(out)
    assert loaded.fp8kit_config.weight == "channel" and len(loaded.fp8kit_report.quantized) == 14


def test_partial_blocks_are_named_in_one_warning_by_both_save_paths(tmp_path, caplog):
    # The tiny Llama (hidden 64, MLP 128, k / v 32 rows): 128 x 128 blocks are partial in every layer; 16 x 16 in
    # none. In-memory save and streaming warn once each, with the count and the first names.
    model = make_tiny_llama()
    src = tmp_path / "src"
    save_hf(model, src)
    for block, expect in (((128, 128), True), ((16, 16), False)):
        config = QuantConfig(weight="block", activation_granularity="group", block_size=block, group_size=block[1])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fp8kit"):
            qmodel = make_tiny_llama()
            quantize(qmodel, config)
            save_quantized(qmodel, tmp_path / f"mem-{block[0]}")
            quantize_checkpoint(src, tmp_path / f"stream-{block[0]}", config, progress=False)
        warned = [r.getMessage() for r in caplog.records if "partial" in r.getMessage()]
        if expect:
            assert len(warned) == 2
            for message in warned:
                assert re.match(r"14 of 14 block-quantized layers have partial 128 x 128 blocks \(model\.layers\.0\.(self_attn|mlp)\.[a-z]+_proj, ", message)
                assert "and 10 more" in message
        else:
            assert warned == []
