"""MoE checkpoints: per-expert on-disk names as the original checkpoint (transformers' save_pretrained) has
them, both formats, bit-exact reload, vLLM's per-layer input-scale max, compressed-tensors parsing,
and streaming equal to the in-memory path."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from fp8kit.core import CheckpointError, QuantConfig, load_quantized, quantize, quantize_checkpoint, save_quantized
from fp8kit.core.experts import FP8Experts

from tiny_models import MOE_KINDS, make_tiny_moe, moe_layers

SCALE_SUFFIXES = ("_scale",)  # weight_scale, input_scale, fp8kit's fused-layout <proj>_weight_scale / _input_scale
EXAMPLES = {  # one per-expert weight of each kind, as the original checkpoint names it
    "mixtral": "model.layers.1.block_sparse_moe.experts.3.w1",
    "qwen3_moe": "model.layers.1.mlp.experts.7.up_proj",
    "deepseek_v3": "model.layers.1.mlp.experts.5.down_proj",
}
ROUTERS = {
    "mixtral": "model.layers.{i}.block_sparse_moe.gate",
    "qwen3_moe": "model.layers.{i}.mlp.gate",
    "deepseek_v3": "model.layers.{i}.mlp.gate",
    "gpt_oss": "model.layers.{i}.mlp.router",
}


def ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def read_tensors(directory):
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def raw(tensor):
    """The bytes of a tensor (bit-exact comparison, FP8 and NaN included)."""
    return tensor.reshape(-1).view(torch.uint8)


def quantization_config(directory):
    return json.loads((directory / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("format", ["fp8", "compressed-tensors"])
def test_save_load_bit_exact_with_the_original_checkpoint_names(kind, format, tmp_path):
    make_tiny_moe(kind).save_pretrained(tmp_path / "hf")  # what transformers writes for the unquantized model
    original_keys = set(read_tensors(tmp_path / "hf"))
    model = make_tiny_moe(kind)
    weight = "tensor" if format == "fp8" else "channel"
    quantize(model, QuantConfig(weight=weight, activation="static"), [ids()])
    save_quantized(model, tmp_path / "ckpt", format=format)
    tensors = read_tensors(tmp_path / "ckpt")
    assert {k for k in tensors if not k.endswith(SCALE_SUFFIXES)} == original_keys
    scalar = () if format == "fp8" else (1,)
    if kind in EXAMPLES:
        linear = EXAMPLES[kind]
        w = tensors[f"{linear}.weight"]
        assert w.dtype == torch.float8_e4m3fn and w.dim() == 2
        assert tensors[f"{linear}.weight_scale"].shape == (scalar if weight == "tensor" else (w.shape[0], 1))
        assert tensors[f"{linear}.input_scale"].shape == scalar
    else:  # gpt-oss: fused on disk, in transformers' transposed layout
        assert tensors["model.layers.1.mlp.experts.gate_up_proj"].dtype == torch.float8_e4m3fn
        assert tensors["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 64, 64)  # [E, H, 2I]
        assert tensors["model.layers.1.mlp.experts.down_proj"].shape == (4, 32, 64)  # [E, I, H]
        assert tensors["model.layers.1.mlp.experts.gate_up_proj_input_scale"].shape == (4,)
    layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    routers = {ROUTERS[kind].format(i=i) for i in layers}
    assert all(tensors[f"{r}.weight"].dtype == torch.float32 for r in routers)
    ignored = quantization_config(tmp_path / "ckpt")["ignored_layers" if format == "fp8" else "ignore"]
    assert routers <= set(ignored) and "lm_head" in ignored

    loaded = load_quantized(tmp_path / "ckpt")
    for mlp in moe_layers(loaded):
        assert isinstance(mlp.experts, FP8Experts)
    expected_state = {k: v for k, v in model.state_dict().items()}
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == expected_state[key].dtype and torch.equal(raw(tensor), raw(expected_state[key])), key
    assert torch.equal(loaded(ids()).logits, model(ids()).logits)


def test_layer_max_input_scales_as_vllm_runs_them(tmp_path):
    model = make_tiny_moe("qwen3_moe")
    quantize(model, QuantConfig(activation="static", calibrate_all_experts=False), [ids()])
    save_quantized(model, tmp_path / "per-expert")
    save_quantized(model, tmp_path / "max", moe_input_scales="layer-max")
    per_expert, layer_max = read_tensors(tmp_path / "per-expert"), read_tensors(tmp_path / "max")
    experts = model.model.layers[1].mlp.experts
    for proj, leaves in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
        scales = getattr(experts, f"{proj}_input_scale")
        assert len(set(scales.tolist())) > 1  # routed-only calibration: the experts' scales differ
        for e in range(8):
            for leaf in leaves:
                key = f"model.layers.1.mlp.experts.{e}.{leaf}.input_scale"
                assert per_expert[key] == scales[e]
                assert layer_max[key] == scales.max()
    loaded = load_quantized(tmp_path / "max")
    assert torch.all(loaded.model.layers[1].mlp.experts.down_proj_input_scale == experts.down_proj_input_scale.max())
    with pytest.raises(CheckpointError, match="moe_input_scales='median' is not one of"):
        save_quantized(model, tmp_path / "bad", moe_input_scales="median")
    assert not (tmp_path / "bad").exists()


def test_compressed_tensors_package_parses_the_moe_config(tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    model = make_tiny_moe("mixtral")
    quantize(model, QuantConfig(weight="channel", activation_granularity="token"))
    save_quantized(model, tmp_path / "ckpt", format="compressed-tensors")
    parsed = QuantizationConfig.model_validate(quantization_config(tmp_path / "ckpt"))
    group = parsed.config_groups["group_0"]
    assert group.targets == ["Linear"] and group.weights.strategy == "channel"
    assert group.input_activations.strategy == "token" and group.input_activations.dynamic
    assert {"model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate", "lm_head"} <= set(parsed.ignore)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("format", ["fp8", "compressed-tensors"])
def test_streaming_equals_in_memory(kind, format, tmp_path):
    make_tiny_moe(kind).save_pretrained(tmp_path / "hf")
    config = QuantConfig() if format == "fp8" else QuantConfig(weight="channel", activation_granularity="token")
    report = quantize_checkpoint(tmp_path / "hf", tmp_path / "streamed", config, format=format, device="cpu", progress=False)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    quantize(model, config)
    save_quantized(model, tmp_path / "memory", format=format)
    streamed, memory = read_tensors(tmp_path / "streamed"), read_tensors(tmp_path / "memory")
    assert set(streamed) == set(memory)
    for key, tensor in memory.items():
        assert streamed[key].dtype == tensor.dtype and torch.equal(raw(streamed[key]), raw(tensor)), key
    assert quantization_config(tmp_path / "streamed") == quantization_config(tmp_path / "memory")
    assert any(".experts.0." in name for name in report.quantized)
    assert not any(name.endswith((".gate", ".router")) for name in report.quantized)


def test_streaming_refuses_experts_stored_fused(tmp_path):
    make_tiny_moe("gpt_oss").save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts: experts stored fused on disk .* --no-stream"):
        quantize_checkpoint(tmp_path / "hf", tmp_path / "out", QuantConfig(), device="cpu", progress=False)
    assert not (tmp_path / "out").exists()
