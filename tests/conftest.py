"""Shared fixtures (helpers live in tiny_models.py, importable because pytest.ini puts tests/ on the path)."""

from __future__ import annotations

import logging

import pytest
import torch

from tiny_models import make_tiny_llama, make_tiny_tokenizer


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A full-precision Hugging Face directory (safetensors + tokenizer) of a tiny Llama."""
    path = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _restore_process_state():
    """CLI mains called in-process set fp8kit's log level (fp8kit.bench: INFO) and torch's thread count
    (fp8kit.bench on a CPU: 1); put both back after each test so later tests see the defaults."""
    level = logging.getLogger("fp8kit").level
    threads = torch.get_num_threads()
    yield
    logging.getLogger("fp8kit").setLevel(level)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
