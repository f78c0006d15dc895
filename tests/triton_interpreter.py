"""Triton kernels on CPU under Triton's interpreter, run in a subprocess (TRITON_INTERPRET must be set
before triton is first imported): inputs go there and results come back as safetensors files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

MIN_INTERPRETER_TRITON = (3, 9)  # the interpreter version CI uses (tox); 3.6's fails under numpy 2


def run_interpreted(child: str, tmp: Path, tensors: dict[str, torch.Tensor], spec: Any, *extra: str) -> dict[str, torch.Tensor]:
    """Run the Python source `child` with TRITON_INTERPRET=1 as ``child spec.json inputs.safetensors
    outputs.safetensors *extra`` (spec: JSON data, tensors: its inputs) and return what it saved;
    skips the calling test where triton (>= 3.9) is missing."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed; the interpreter tests need it")
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < MIN_INTERPRETER_TRITON:
        # Seen with Triton 3.6 + numpy 2.x: `range(0, N, BLOCK)` over a runtime int raises
        # "only 0-dimensional arrays can be converted to Python scalars" inside the interpreter.
        pytest.skip(f"Triton {triton.__version__}'s CPU interpreter cannot run these kernels; use triton>=3.9")
    save_file(tensors, tmp / "inputs.safetensors")
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    args = [sys.executable, "-c", child, tmp / "spec.json", tmp / "inputs.safetensors", tmp / "outputs.safetensors", *extra]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return load_file(tmp / "outputs.safetensors")
