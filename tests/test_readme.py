"""The README's examples run as written: every Python block (in order, in one session, in an empty
directory, on the default model), and its command-line synopses list every option the CLIs take."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def code_blocks(language: str) -> list[str]:
    """The README's fenced blocks of `language`, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def needs_cuda(block: str) -> bool:
    return '"cuda"' in block


def needs_model(block: str) -> str | None:
    """The model directory a block loads when it is not the default model we ship (e.g. an MoE model), else None."""
    names = [n for n in re.findall(r'load_model\("([^"]+)"', block) if n != "default"]
    return names[0] if names else None


def skip_reason(block: str, cuda: bool) -> str | None:
    if needs_model(block):
        return f"needs the model directory {needs_model(block)}"
    if needs_cuda(block) and not cuda:
        return "needs CUDA"
    return None


# ---- command-line synopses ------------------------------------------------------------------------------


def synopsis(command: str) -> str:
    """The synopsis of `command` in the README's bash blocks: its line and the indented lines after it."""
    for block in code_blocks("bash"):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.startswith(command + " "):
                rest = [line]
                for more in lines[i + 1:]:
                    if not more.startswith(" "):
                        break
                    rest.append(more)
                return "\n".join(rest)
    raise AssertionError(f"README.md has no synopsis line starting with {command!r}")


def _parsers():
    from fp8kit.core.__main__ import build_parser as core_parser
    from fp8kit.core.models import build_parser as models_parser
    from fp8kit.export.__main__ import build_parser as export_parser

    return {
        "python -m fp8kit.core MODEL": core_parser(),
        "python -m fp8kit.core.models MODEL": models_parser(),
        "python -m export MODEL": export_parser(),
    }


@pytest.mark.parametrize("command", ["python -m fp8kit.core MODEL", "python -m fp8kit.core.models MODEL", "python -m export MODEL"])
def test_readme_synopsis_lists_every_option(command):
    parser = _parsers()[command]
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    text = synopsis(command).removeprefix(command)
    listed = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-z])\b", text))
    missing = [a.option_strings[-1] for a in actions if not listed & set(a.option_strings)]
    assert missing == [], f"README.md's synopsis of `{command}` lacks {missing}"
    unknown = listed - {o for a in actions for o in a.option_strings}
    assert unknown == set(), f"README.md's synopsis of `{command}` lists options the CLI does not take: {sorted(unknown)}"
    for action in parser._actions:  # the choices shown are the ones the CLI takes
        if action.choices and action.option_strings:
            shown = re.search(rf"{re.escape(max(action.option_strings, key=len))} ([\w|-]+)", text)  # e.g. a|b|c
            assert shown and set(shown.group(1).split("|")) == set(action.choices), (action.option_strings, shown)


# ---- Python blocks ------------------------------------------------------------------------------------

RUNNER = textwrap.dedent(
    """
    import json, sys
    blocks, reasons = json.load(open(sys.argv[1]))
    namespace = {"__name__": "__readme__"}
    for i, (block, reason) in enumerate(zip(blocks, reasons)):
        if reason:
            print(f"block {i}: skipped ({reason})", flush=True)
            continue
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        print(f"block {i}: ok", flush=True)
    """
)


def test_readme_has_the_python_blocks_this_test_expects():
    blocks = code_blocks("python")
    assert 'load_model("default")' in blocks[0] and "quantize_checkpoint(" in blocks[0]
    assert sum(needs_cuda(b) and not needs_model(b) for b in blocks) == 1  # CUDA graphs (the GPU test below)
    runs_on_cpu = [b for b in blocks if skip_reason(b, cuda=False) is None]
    assert len(runs_on_cpu) >= 2 and runs_on_cpu[0] == blocks[0]


@pytest.mark.slow
def test_readme_python_blocks_run_as_written(tmp_path):
    """Each block as a user pastes it, in order, in one interpreter, in an empty directory (the CUDA
    graph block only where a GPU is visible; a block that loads a model we do not ship, such as the MoE
    example, is skipped by name); then what the first block claims to write is checked."""
    blocks = code_blocks("python")
    cuda = torch.cuda.is_available()
    reasons = [skip_reason(b, cuda) for b in blocks]
    (tmp_path / "blocks.json").write_text(json.dumps([blocks, reasons]))
    (tmp_path / "run.py").write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in
                                                       ("packages/core/src", "packages/export/src", "packages/bench/src"))}
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "blocks.json")], cwd=work,
                            capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    expected = [f"block {i}: " + (f"skipped ({r})" if r else "ok") for i, r in enumerate(reasons)]
    assert [line for line in result.stdout.splitlines() if line.startswith("block ")] == expected

    assert sorted(p.name for p in work.iterdir()) == ["smollm2-fp8", "smollm2-fp8-token", "smollm2-hf"]
    hf = json.loads((work / "smollm2-hf" / "config.json").read_text())
    assert "quantization_config" not in hf and hf["architectures"] == ["LlamaForCausalLM"]
    for name, strategy in (("smollm2-fp8", "tensor"), ("smollm2-fp8-token", "channel")):
        text = (work / name / "config.json").read_text()
        assert str(tmp_path) not in text and "site-packages" not in text and "gguf" not in text, name
        qc = json.loads(text)["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors"
        assert qc["config_groups"]["group_0"]["weights"]["strategy"] == strategy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the README's CUDA-graph block needs a CUDA GPU")
def test_readme_cuda_block_runs_as_written_on_a_gpu(tmp_path, monkeypatch):
    """The CUDA-graph block exactly as written, with the names it takes from the first block bound to a tiny
    FP8 Llama saved as "smollm2-fp8" and its tokenizer (the GPU machine has no GGUF reader for the default)."""
    from fp8kit.core import QuantConfig, load_quantized, quantize, save_quantized

    from tiny_models import make_tiny_llama, make_tiny_tokenizer

    block = next(b for b in code_blocks("python") if needs_cuda(b) and not needs_model(b))
    monkeypatch.chdir(tmp_path)
    save_quantized(quantize(make_tiny_llama(attn_implementation="sdpa"), QuantConfig()), "smollm2-fp8")
    namespace = {"load_quantized": load_quantized, "tokenizer": make_tiny_tokenizer()}
    exec(compile(block, "README.md CUDA-graph block", "exec"), namespace)
    model, step = namespace["model"], namespace["step"]
    assert namespace["logits"].shape == (1, 1, model.config.vocab_size)
    assert namespace["next_ids"].shape == (1, 1) and namespace["next_ids"].device.type == "cuda"
    assert type(step).__name__ == "CUDAGraphRunner" and type(namespace["runner"]).__name__ == "CUDAGraphRunner"
