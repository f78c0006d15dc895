"""Static calibration, quantization and saving of models dispatched by accelerate (CPU / disk offload)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from fp8kit.core import FP8Linear, QuantConfig, load_quantized, quantize, save_quantized
from fp8kit.core.offload import execution_device, is_offloaded

from tiny_models import make_tiny_llama, make_tiny_tokenizer

accelerate = pytest.importorskip("accelerate")

STATIC_KV = QuantConfig(activation="static", kv_cache=True)


def calibration():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 256, (1, 24), generator=g) for _ in range(3)]
    return batches + [{"input_ids": torch.randint(0, 256, (2, 16), generator=g), "attention_mask": torch.tensor([[1] * 16, [1] * 10 + [0] * 6])}]


def read_all(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)) if a[key].dtype == torch.float8_e4m3fn else torch.equal(a[key], b[key]), key


def partly_offloaded(tmp_path, device="cpu"):
    """Layer 0 offloaded to CPU memory, layer 1 to disk (memmaps in tmp_path / 'offload'); the rest stays put."""
    model = make_tiny_llama().to(device)
    accelerate.cpu_offload(model.model.layers[0], execution_device=torch.device(device))
    accelerate.disk_offload(model.model.layers[1], str(tmp_path / "offload"), execution_device=torch.device(device))
    return model


def test_offload_setup_really_offloads(tmp_path):
    model = partly_offloaded(tmp_path)
    q_proj = model.model.layers[1].self_attn.q_proj
    assert q_proj.weight.is_meta and is_offloaded(q_proj) and is_offloaded(model.model.layers[0].mlp.up_proj)
    assert not is_offloaded(model.lm_head) and any((tmp_path / "offload").iterdir())


@pytest.mark.parametrize("config", [STATIC_KV, QuantConfig()], ids=["static-kv", "dynamic"])
def test_quantize_under_offload_matches_the_plain_model(tmp_path, config):
    reference = quantize(make_tiny_llama(), config, calibration())
    model = partly_offloaded(tmp_path)

    resident_at_quantization: list[int] = []
    real_from_linear = FP8Linear.from_linear.__func__

    def spy(cls, linear, cfg, *args, **kwargs):
        # Offloaded Linear layers currently holding real weights: only the one being quantized.
        resident_at_quantization.append(
            sum(1 for m in model.modules() if type(m) is nn.Linear and is_offloaded(m) and not m.weight.is_meta)
        )
        assert not linear.weight.is_meta
        return real_from_linear(cls, linear, cfg, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FP8Linear, "from_linear", classmethod(spy))
        quantize(model, config, calibration())
    assert resident_at_quantization and max(resident_at_quantization) == 1
    assert model.fp8kit_report.quantized == reference.fp8kit_report.quantized
    assert model.fp8kit_report.kv_cache_layers == reference.fp8kit_report.kv_cache_layers

    # The quantized offloaded layers are offloaded again (meta between forwards), their maps hold FP8.
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, FP8Linear) and is_offloaded(down) and down.weight.is_meta
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert down.weight.is_meta  # put back after the forward

    # Saving materializes offloaded tensors from their maps: the files equal the plain model's bit for bit.
    save_quantized(model, tmp_path / "offloaded", make_tiny_tokenizer())
    save_quantized(reference, tmp_path / "plain")
    saved = read_all(tmp_path / "offloaded")
    assert_same_tensors(saved, read_all(tmp_path / "plain"))
    if config.activation == "static":
        assert "model.layers.1.mlp.down_proj.input_scale" in saved and "model.layers.0.self_attn.k_scale" in saved
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "offloaded")(ids).logits, reference(ids).logits)


def test_static_scales_come_from_real_activations_under_offload(tmp_path):
    """Calibration hooks see the activations: the scales equal absmax / 448 of a float64 replay."""
    model = partly_offloaded(tmp_path)
    plain = make_tiny_llama()
    seen: dict[str, float] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, max(seen.get(name, 0.0), args[0].double().abs().max().item())))
        for name, m in plain.named_modules()
        if name == "model.layers.1.mlp.down_proj"
    ]
    with torch.no_grad():
        for batch in calibration()[:3]:
            plain(batch)
    for h in handles:
        h.remove()
    quantize(model, QuantConfig(activation="static"), calibration()[:3])
    scale = model.model.layers[1].mlp.down_proj._hf_hook.weights_map["input_scale"]
    assert scale.item() == pytest.approx(seen["model.layers.1.mlp.down_proj"] / 448, rel=1e-6)


def test_device_map_auto_with_disk_offload(tmp_path):
    """`load_model(device_map="auto")` with a CPU budget too small for the model offloads to disk."""
    from fp8kit.core.models import load_model

    make_tiny_llama().save_pretrained(tmp_path / "hf")
    model, _ = load_model(tmp_path / "hf", device_map="auto", max_memory={"cpu": 200_000}, offload_folder=tmp_path / "offload")
    assert "disk" in set(model.hf_device_map.values())
    assert execution_device(model) == torch.device("cpu")
    reference = quantize(make_tiny_llama(), STATIC_KV, calibration())
    quantize(model, STATIC_KV, calibration())
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    save_quantized(model, tmp_path / "out", format="fp8")  # scalar scales on disk, as in the state dict
    assert_same_tensors(read_all(tmp_path / "out"), {k: v for k, v in reference.state_dict().items()})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_offload_to_gpu_execution(tmp_path):
    """Execution on the GPU with weights offloaded to CPU memory / disk: quantized on the GPU, kept off it."""
    model = partly_offloaded(tmp_path, device="cuda")
    reference = quantize(make_tiny_llama().cuda(), STATIC_KV, calibration())
    before = torch.cuda.memory_allocated()
    quantize(model, STATIC_KV, calibration())
    assert torch.cuda.memory_allocated() <= before + 2**20  # FP8 copies went to the CPU map, not the GPU
    ids = torch.randint(0, 256, (2, 20), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    save_quantized(model, tmp_path / "a")
    save_quantized(reference, tmp_path / "b")
    assert_same_tensors(read_all(tmp_path / "a"), read_all(tmp_path / "b"))


# --------------------------------------------------------------------------- device maps (issue 11)

SPLIT_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def test_load_quantized_over_a_device_map_gives_the_same_logits(tmp_path):
    """A checkpoint reloaded split over devices (here CPU + disk, the devices a CPU runner has) computes what
    the plain reload computes, bit for bit: the FP8 layers of each block run where accelerate put them."""
    save_quantized(quantize(make_tiny_llama(), STATIC_KV, calibration()), tmp_path / "q")
    plain = load_quantized(tmp_path / "q")
    split = load_quantized(tmp_path / "q", device_map=SPLIT_MAP, offload_folder=tmp_path / "offload")
    assert split.hf_device_map == SPLIT_MAP and any((tmp_path / "offload").iterdir())
    assert isinstance(split.model.layers[1].mlp.down_proj, FP8Linear) and split.model.layers[1].mlp.down_proj.weight.is_meta
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(split(ids).logits, plain(ids).logits, rtol=0, atol=0)


def test_load_quantized_auto_map_that_fits_nowhere_names_the_fix(tmp_path):
    from fp8kit.core import ModelLoadError

    save_quantized(quantize(make_tiny_llama(), QuantConfig()), tmp_path / "q")
    with pytest.raises(ModelLoadError, match=r"q: does not fit in the GPUs and CPU memory allowed .* pass an offload folder"):
        load_quantized(tmp_path / "q", device_map="auto", max_memory={"cpu": 50_000})
    with pytest.raises(ModelLoadError, match=r"device_map 'everywhere' is not 'auto'"):
        load_quantized(tmp_path / "q", device_map="everywhere")


def test_cli_device_map_with_max_memory_writes_the_single_device_checkpoint(tiny_llama_dir, tmp_path, capsys):
    """`--device-map auto --max-memory cpu=...` (too small: part goes to disk) writes the checkpoint a plain run writes."""
    from fp8kit.core.__main__ import main

    common = [str(tiny_llama_dir), "--activation", "static", "--kv-cache", "--num-samples", "2", "--seq-len", "32"]
    assert main([common[0], str(tmp_path / "plain"), *common[1:]]) == 0
    assert main([
        common[0], str(tmp_path / "split"), *common[1:],
        "--device-map", "auto", "--max-memory", "cpu=200000", "--offload-folder", str(tmp_path / "offload"),
    ]) == 0
    assert "FP8 layers per device: cpu 14\n" in capsys.readouterr().out  # disk-offloaded layers execute on the CPU
    assert_same_tensors(read_all(tmp_path / "split"), read_all(tmp_path / "plain"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("0=70GiB,1", "--max-memory: '1' is not DEVICE=SIZE (e.g. 0=70GiB or cpu=200GiB)"),
        ("gpu0=70GiB", "--max-memory: device 'gpu0' is not a GPU index, 'cpu' or 'disk'"),
        ("0=lots", "--max-memory: size 'lots' for device 0 is not bytes or a size like 70GiB"),
        ("0=1GiB,0=2GiB", "--max-memory: device 0 is given twice"),
    ],
)
def test_cli_rejects_a_bad_max_memory(tiny_llama_dir, tmp_path, capsys, text, message):
    from fp8kit.core.__main__ import main

    assert main([str(tiny_llama_dir), str(tmp_path / "out"), "--device-map", "auto", "--max-memory", text]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_cli_max_memory_needs_a_device_map(tiny_llama_dir, tmp_path, capsys):
    from fp8kit.core.__main__ import main

    assert main([str(tiny_llama_dir), str(tmp_path / "out"), "--max-memory", "0=1GiB"]) == 2
    assert "--max-memory and --offload-folder apply with --device-map only" in capsys.readouterr().err


def test_parse_max_memory_keys_are_gpu_indices():
    from fp8kit.core.__main__ import parse_max_memory

    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=1000") == {0: "70GiB", 1: "70GiB", "cpu": 1000}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpu_split_matches_one_gpu(tmp_path):
    """Calibrated and quantized while split over two GPUs: the same scales and checkpoint as on one GPU, and the
    sharded reload gives the one-GPU logits."""
    half = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    one = quantize(make_tiny_llama().cuda(), STATIC_KV, calibration())
    two = accelerate.dispatch_model(make_tiny_llama(), device_map=half)
    quantize(two, STATIC_KV, calibration())
    assert two.model.layers[1].mlp.down_proj.weight.device == torch.device("cuda:1")
    save_quantized(one, tmp_path / "one")
    save_quantized(two, tmp_path / "two")
    assert_same_tensors(read_all(tmp_path / "two"), read_all(tmp_path / "one"))
    reloaded = load_quantized(tmp_path / "two", device_map=half)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits.cpu(), one(ids).logits.cpu(), rtol=0, atol=0)
