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


def _fp8kit_loggers() -> dict[str, logging.Logger]:
    names = [n for n in logging.root.manager.loggerDict if n == "fp8kit" or n.startswith("fp8kit.")]
    return {n: logging.getLogger(n) for n in ["fp8kit", *names]}


@pytest.fixture(autouse=True)
def _restore_process_state():
    """CLI mains called in-process set fp8kit's log level (fp8kit.bench: INFO) and torch's thread count
    (fp8kit.bench on a CPU: 1), and libraries they import may reconfigure logging (a `dictConfig` disables
    every existing logger); put fp8kit's loggers (level, disabled, propagate) and the thread count back after
    each test so later tests see the defaults."""
    saved = {n: (lg.level, lg.disabled, lg.propagate) for n, lg in _fp8kit_loggers().items()}
    threads = torch.get_num_threads()
    yield
    for name, logger in _fp8kit_loggers().items():
        level, disabled, propagate = saved.get(name, (logging.NOTSET, False, True))
        logger.setLevel(level)
        logger.disabled, logger.propagate = disabled, propagate
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
