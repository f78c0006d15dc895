"""Shared fixtures (helpers live in tiny_models.py, importable because pytest.ini puts tests/ on the path)."""

from __future__ import annotations

import pytest

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
