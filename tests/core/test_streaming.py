"""`fp8kit.core.streaming`: the streamed checkpoint equals the in-memory one bit for bit, memory stays
about one tensor, and every broken input is an error naming its file and tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8kit.core import QuantConfig, quantize, save_quantized
from fp8kit.core import streaming
from fp8kit.core.checkpoint import SafetensorsWriter
from fp8kit.core.files import INDEX_NAME
from fp8kit.core.errors import CheckpointError, ConfigError, ModelLoadError
from fp8kit.core.streaming import checkpoint_entries, quantize_checkpoint, read_tensor

from tiny_models import make_tiny_llama, make_tiny_tokenizer


def read_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, through the safetensors package itself."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                assert key not in out, key
                out[key] = f.get_tensor(key)
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        bits_a = a[key].reshape(-1).view(torch.uint8)
        bits_b = b[key].reshape(-1).view(torch.uint8)
        assert torch.equal(bits_a, bits_b), key


def save_bf16_llama(path: Path, *, shards: int = 1, tokenizer: bool = True, **overrides) -> Path:
    import shutil

    model = make_tiny_llama(**overrides).to(torch.bfloat16)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = total // shards + 1
    while True:  # transformers packs greedily: grow the limit until it makes exactly `shards` files
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path, safe_serialization=True, **({} if shards == 1 else {"max_shard_size": size}))
        if len(list(path.glob("*.safetensors"))) <= shards:
            break
        size = int(size * 1.1)
    assert len(list(path.glob("*.safetensors"))) == shards
    if tokenizer:
        make_tiny_tokenizer().save_pretrained(path)
    return path


def in_memory(src: Path, out: Path, config: QuantConfig, format: str) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    quantize(model, config)
    return save_quantized(model, out, format=format)


def qconfig(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


CASES = [
    ("fp8", QuantConfig()),
    ("fp8", QuantConfig(ignore=())),  # lm_head quantized too
    ("compressed-tensors", QuantConfig()),
    ("compressed-tensors", QuantConfig(weight="channel", activation_granularity="token", ignore=("re:.*down_proj",))),
    ("fp8", QuantConfig(weight="block", activation_granularity="group")),  # weight_scale_inv F32, partial blocks
    # bf16 block scales (the source's dtype), several full and partial blocks per weight, lm_head included
    ("compressed-tensors", QuantConfig(weight="block", activation_granularity="group", block_size=(48, 32), group_size=32, ignore=())),
]


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("format, config", CASES)
def test_streamed_equals_in_memory(tmp_path, monkeypatch, shards, tied, format, config):
    src = save_bf16_llama(tmp_path / "src", shards=shards, tie_word_embeddings=tied)
    monkeypatch.setattr(streaming, "CPU_CHUNK_ELEMENTS", 1000)  # several row blocks per weight
    expected = in_memory(src, tmp_path / "mem", config, format)
    out = quantize_checkpoint(src, tmp_path / "stream", config, format=format, device="cpu", max_shard_bytes=60_000).path
    assert_same_tensors(read_dir(expected), read_dir(out))
    assert qconfig(out) == qconfig(expected)
    n_files = len(list(out.glob("*.safetensors")))
    assert n_files > 1 and (out / INDEX_NAME).is_file()
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(read_dir(out))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_dir(out).values())
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (out / "generation_config.json").is_file()
    if tied:
        assert "lm_head.weight" not in read_dir(src)  # tied weights are stored once...
        assert ("lm_head.weight" in read_dir(out)) == (not config.is_ignored("lm_head"))  # ...or quantized from the embedding


def test_single_output_file_and_round_trip(tmp_path):
    from fp8kit.core import load_quantized

    src = save_bf16_llama(tmp_path / "src")
    out = quantize_checkpoint(src, tmp_path / "out", device="cpu").path
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"] and not (out / INDEX_NAME).exists()
    model = load_quantized(out)
    assert len(model.fp8kit_report.quantized) == 14
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_needs_calibration_is_refused(tmp_path):
    src = save_bf16_llama(tmp_path / "src")
    for config in (QuantConfig(activation="static"), QuantConfig(kv_cache=True)):
        with pytest.raises(ConfigError, match=r"needs calibration, which streaming cannot do; .* --no-stream"):
            quantize_checkpoint(src, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_output_inside_source_and_existing_output(tmp_path):
    src = save_bf16_llama(tmp_path / "src")
    with pytest.raises(CheckpointError, match="is inside the model .*: writing there could overwrite or delete the input"):
        quantize_checkpoint(src, src / "fp8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="pass overwrite=True"):
        quantize_checkpoint(src, out)
    assert (out / "old.txt").read_text() == "keep"


def test_nan_weight_is_named_and_old_output_kept(tmp_path):
    src = save_bf16_llama(tmp_path / "src")
    out = quantize_checkpoint(src, tmp_path / "out").path
    before = (out / "model.safetensors").read_bytes()
    tensors = read_dir(src)
    tensors["model.layers.1.mlp.up_proj.weight"][5, 3] = float("nan")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"layer model.layers.1.mlp.up_proj: weight \(128, 64\) contains NaN or Inf \(tensor model.layers.1.mlp.up_proj.weight in .*model.safetensors\)"):
        quantize_checkpoint(src, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["src", "out"] or sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# --------------------------------------------------------------------------- broken inputs


def test_index_naming_a_missing_file(tmp_path):
    src = save_bf16_llama(tmp_path / "src", shards=3)
    victim = sorted(src.glob("model-*.safetensors"))[1]
    first = sorted(n for n, f in json.loads((src / INDEX_NAME).read_text())["weight_map"].items() if f == victim.name)[0]
    victim.unlink()
    with pytest.raises(CheckpointError) as err:
        quantize_checkpoint(src, tmp_path / "out")
    assert str(err.value).startswith(f"{victim}: missing; {INDEX_NAME} names it as the shard holding tensor {first}")
    assert not (tmp_path / "out").exists()


def test_truncated_shard_names_file_and_tensor(tmp_path):
    src = save_bf16_llama(tmp_path / "src", shards=3)
    victim = sorted(src.glob("model-*.safetensors"))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[:-100])  # the last tensor loses its tail
    with pytest.raises(CheckpointError, match=rf"{victim}: .*tensor \S+: data_offsets .* run past the end"):
        quantize_checkpoint(src, tmp_path / "out")


def _rewrite_header(file: Path, edit) -> None:
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def test_header_offsets_beyond_file_end(tmp_path):
    src = save_bf16_llama(tmp_path / "src")
    file = src / "model.safetensors"
    name = "model.layers.0.self_attn.q_proj.weight"

    def shift(header):
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + 10**9, end + 10**9]

    _rewrite_header(file, shift)
    with pytest.raises(CheckpointError, match=rf"{file}: .*tensor {name}: data_offsets .* run past the end"):
        quantize_checkpoint(src, tmp_path / "out")


def test_config_that_lies_about_shapes(tmp_path):
    src = save_bf16_llama(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape \(128, 64\) but config.json builds "
        r"model.layers.0.mlp.gate_proj.weight as \(96, 64\) \(config.json does not match the weights\)",
    ):
        quantize_checkpoint(src, tmp_path / "out")


def test_pickle_instead_of_safetensors(tmp_path):
    src = save_bf16_llama(tmp_path / "src", shards=3)
    victim = sorted(src.glob("model-*.safetensors"))[0]
    first = sorted(n for n, f in json.loads((src / INDEX_NAME).read_text())["weight_map"].items() if f == victim.name)[0]
    torch.save({"x": torch.zeros(3)}, victim)  # a zip pickle under the shard's name
    with pytest.raises(CheckpointError) as err:
        quantize_checkpoint(src, tmp_path / "out")
    message = str(err.value)
    assert message.startswith(f"{victim}: not a readable safetensors file") and "never loads pickles" in message
    assert f"puts tensor {first} in it" in message


def test_tensor_missing_from_checkpoint(tmp_path):
    src = save_bf16_llama(tmp_path / "src")
    tensors = read_dir(src)
    del tensors["model.norm.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensors \['model.norm.weight'\] \(of 1\) .* are missing"):
        quantize_checkpoint(src, tmp_path / "out")


def test_already_quantized_is_refused(tmp_path):
    src = save_bf16_llama(tmp_path / "src")
    out = quantize_checkpoint(src, tmp_path / "out").path
    with pytest.raises(CheckpointError, match="already has a quantization_config"):
        quantize_checkpoint(out, tmp_path / "again")


# --------------------------------------------------------------------------- reader and writer


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(5, 7, dtype=torch.bfloat16),
        torch.tensor(3.5),
        torch.empty(0, 4),
        torch.tensor([True, False, True]),
        torch.randn(16, 16).clamp(-448, 448).to(torch.float8_e4m3fn),
        torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4),
    ],
    ids=["bf16", "scalar", "empty", "bool", "fp8", "int64"],
)
def test_writer_and_reader_round_trip(tmp_path, tensor):
    file = tmp_path / "x.safetensors"
    small = torch.ones(3, dtype=torch.float16)
    with SafetensorsWriter(file, [("t", tensor.dtype, tuple(tensor.shape)), ("s", small.dtype, (3,))], {"format": "pt"}) as w:
        w.write("s", small)
        flat = tensor.reshape(-1)
        half = flat.numel() // 2
        w.write("t", flat[half:], start=half * tensor.element_size())  # pieces, out of order
        w.write("t", flat[:half])
    with safe_open(str(file), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        got = f.get_tensor("t")
    assert got.dtype == tensor.dtype and torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
    assert (8 + int.from_bytes(file.read_bytes()[:8], "little")) % 8 == 0
    entries = checkpoint_entries_of(file)
    assert torch.equal(read_tensor(entries["t"]).reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


def checkpoint_entries_of(file: Path):
    directory = file.parent / "ckpt"
    directory.mkdir(exist_ok=True)
    os.replace(file, directory / "model.safetensors")
    return checkpoint_entries(directory)


def test_writer_refuses_incomplete_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"tensors \['b'\] \(of 1\) were not fully written"):
        with SafetensorsWriter(tmp_path / "x.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]) as w:
            w.write("a", torch.zeros(2))
    with pytest.raises(CheckpointError, match=r"tensor a: bytes \[4, 12\) are outside its 8 bytes"):
        SafetensorsWriter(tmp_path / "y.safetensors", [("a", torch.float32, (2,))]).write("a", torch.zeros(2), start=4)


# --------------------------------------------------------------------------- CLI


def cli(*args):
    return subprocess.run([sys.executable, "-m", "fp8kit.core", *map(str, args)], capture_output=True, text=True)


def test_cli_streams_and_matches_no_stream(tmp_path):
    src = save_bf16_llama(tmp_path / "src", shards=3)
    streamed = cli(src, tmp_path / "a", "--format", "compressed-tensors")
    assert streamed.returncode == 0, streamed.stderr
    assert "quantized 14 layers, kept 1 in high precision" in streamed.stdout
    assert "\nhow: streamed: read and quantized one tensor at a time on " in streamed.stdout
    loaded = cli(src, tmp_path / "b", "--format", "compressed-tensors", "--no-stream", "--dtype", "bf16")
    assert loaded.returncode == 0, loaded.stderr
    assert "\nhow: loaded the whole model into memory, then quantized and saved it (because --no-stream given)\n" in loaded.stdout
    assert_same_tensors(read_dir(tmp_path / "a"), read_dir(tmp_path / "b"))
    assert qconfig(tmp_path / "a") == qconfig(tmp_path / "b")


def test_cli_static_goes_in_memory_and_errors_exit_2(tmp_path):
    src = save_bf16_llama(tmp_path / "src")
    result = cli(src, tmp_path / "out", "--activation", "static", "--num-samples", "0")
    assert result.returncode == 2 and "must be positive" in result.stderr  # fails before any path is taken
    (src / "model.safetensors").write_bytes(b"\x80\x04garbage-pickle" * 10)
    result = cli(src, tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{src / 'model.safetensors'}: not a readable safetensors file" in result.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- peak memory

RSS_CHILD = textwrap.dedent(
    """
    import json, resource, sys

    def peak_rss():  # bytes; VmHWM is per address space (ru_maxrss would keep the forked parent's peak across exec)
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    import torch, transformers, accelerate, safetensors  # the imports count in the baseline
    import transformers.models.llama.modeling_llama  # what the meta model build imports
    from fp8kit.core import QuantConfig
    from fp8kit.core.streaming import quantize_checkpoint
    baseline = peak_rss()
    quantize_checkpoint(sys.argv[1], sys.argv[2], QuantConfig(), device="cpu", max_shard_bytes=int(sys.argv[3]))
    print(json.dumps({"baseline": baseline, "peak": peak_rss()}))
    """
)
RSS_CONSTANT = 64 * 2**20


def load_stream_bench():
    """tools/stream_bench.py, whose synthetic-checkpoint writer the memory test shares."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("stream_bench", Path(__file__).parents[2] / "tools" / "stream_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_rss_stays_under_largest_shard_plus_constant(tmp_path):
    src = tmp_path / "big"
    total = load_stream_bench().write_synthetic_checkpoint(src, hidden=1024, inter=4096, layers=10, vocab=32000, shards=3)
    largest_shard = max(f.stat().st_size for f in src.glob("*.safetensors"))
    entries = checkpoint_entries(src)
    largest_tensor = max(e.nbytes for e in entries.values())
    largest_weight = max(e.nbytes for n, e in entries.items() if n.endswith("proj.weight"))  # read whole: 8 MiB
    result = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(src), str(tmp_path / "out"), str(128 * 2**20)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    growth = rss["peak"] - rss["baseline"]
    print(f"total {total / 2**20:.0f} MiB, largest shard {largest_shard / 2**20:.0f} MiB, tensor "
          f"{largest_tensor / 2**20:.0f} MiB, baseline {rss['baseline'] / 2**20:.0f} MiB, growth {growth / 2**20:.0f} MiB")
    assert total > 300e6 and len(list(src.glob("*.safetensors"))) == 3
    assert growth >= largest_weight  # the measurement sees at least the read buffer of the largest quantized weight
    assert rss["peak"] < rss["baseline"] + largest_shard + RSS_CONSTANT
    # The stronger claim: growth is about one tensor (the largest is 62 MiB, the largest shard 3x that).
    assert growth < 2 * largest_tensor + RSS_CONSTANT
    out_tensors = checkpoint_entries(tmp_path / "out")
    assert out_tensors["model.layers.3.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("format, config", [CASES[0], CASES[3]])
def test_streamed_on_gpu_equals_in_memory_on_cpu(tmp_path, format, config):
    """On a GPU the weights go through `scaling.quantize_weight` (Triton kernels where they run): same bits."""
    src = save_bf16_llama(tmp_path / "src", shards=3, hidden_size=256, intermediate_size=512)
    expected = in_memory(src, tmp_path / "mem", config, format)
    out = quantize_checkpoint(src, tmp_path / "stream", config, format=format).path  # device=None picks cuda
    assert_same_tensors(read_dir(expected), read_dir(out))
    assert qconfig(out) == qconfig(expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rowwise", [False, True], ids=["tensor", "row"])
def test_quantize_into_buffers_is_bit_identical(dtype, rowwise):
    """`scaling.quantize(out=, workspace=)` (streaming's allocation-free form) gives the default's bits, input untouched."""
    from fp8kit.core import scaling

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 96, generator=g) * torch.logspace(-6, 6, 96)).to(dtype)  # (M, K), spans saturation
    x[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0]).to(dtype)
    scale = scaling.rowwise_scale(x.nan_to_num(0.0, 0.0, 0.0)) if rowwise else torch.tensor(0.37)
    before = x.clone()
    expected = scaling.quantize(x, scale)
    out = torch.full_like(expected, 1.0)
    got = scaling.quantize(x, scale, out=out, workspace=torch.empty(64, 96))
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(scaling.quantize(x, scale, out=torch.empty_like(expected)).view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(x.view(torch.uint8) if dtype.itemsize == 1 else x.nan_to_num(), before.nan_to_num())
