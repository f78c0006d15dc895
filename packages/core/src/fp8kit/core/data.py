"""Text for calibration and evaluation that needs no download, and perplexity.

The default text is English prose gathered at run time, deterministically, from the docstrings of
a fixed list of standard-library modules (so it depends on the Python version: record it with any
number). Calibration, tuning and held-out modules are disjoint: calibration text sets scales and
statistics, tuning text chooses hyper-parameters (algorithm settings, mixed-precision plans), and
held-out text only measures.
"""

from __future__ import annotations

import codecs
import importlib
import inspect
import logging
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import CalibrationError

__all__ = [
    "CALIBRATION_MODULES",
    "HELDOUT_MODULES",
    "TUNING_MODULES",
    "tuning_texts",
    "python_version",
    "module_text",
    "default_texts",
    "read_text_file",
    "calibration_batches",
    "perplexity",
]

logger = logging.getLogger(__name__)

CALIBRATION_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "email.message",
    "enum", "fractions", "functools", "heapq", "http.client", "io", "itertools", "json", "logging",
)
HELDOUT_MODULES = ("os", "pathlib", "random", "re", "shutil")  # ~10.5k SmolLM2 tokens on 3.11
TUNING_MODULES = ("threading", "tarfile")  # ~4.3k SmolLM2 tokens on 3.11


def python_version() -> str:
    """The Python version the default text was gathered from, e.g. '3.11.7'."""
    return platform.python_version()


def module_text(name: str) -> str:
    """The docstrings of module `name` and of its public classes, functions and methods, in name order."""
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for attr in sorted(vars(module)):
        obj = getattr(module, attr)
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            parts.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    member = vars(obj)[meth]
                    if not meth.startswith("_") and inspect.isfunction(member):
                        parts.append(inspect.getdoc(member) or "")
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


def default_texts() -> tuple[list[str], list[str]]:
    """(calibration documents, held-out documents): one document per standard-library module."""
    return [module_text(m) for m in CALIBRATION_MODULES], [module_text(m) for m in HELDOUT_MODULES]


def tuning_texts() -> list[str]:
    """Documents for choosing hyper-parameters, disjoint from the calibration and held-out ones."""
    return [module_text(m) for m in TUNING_MODULES]


_FIRST_READ_BYTES = 2**20
_TOKEN_MARGIN = 64  # tokens read past the need, so that the cut cannot change the tokens used


def _documents(text: str) -> list[str]:
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def read_text_file(path: str | os.PathLike, tokenizer: Any = None, min_tokens: int = 0) -> list[str]:
    """A UTF-8 text file as a list of documents (paragraph blocks); empty files are an error.

    With a `tokenizer` and `min_tokens`, only a prefix is read: 1 MiB, then three times more at each
    step, until its whole paragraphs tokenize to `min_tokens` (plus a small margin), so that a
    multi-GB file costs what the samples need. The first `min_tokens` tokens are those of the whole file.
    """
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    text, size = "", _FIRST_READ_BYTES
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(size)
                text += decoder.decode(chunk, final=not chunk)
                if not chunk:
                    break
                if tokenizer is not None and min_tokens > 0:
                    cut = text.rfind("\n\n")
                    if cut > 0 and _token_ids(tokenizer, _documents(text[:cut])).numel() >= min_tokens + _TOKEN_MARGIN:
                        text = text[:cut]
                        logger.info("read the first %d bytes of %s: enough for %d tokens", f.tell(), path, min_tokens)
                        break
                size *= 3
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read calibration text: {exc}") from exc
    docs = _documents(text)
    if not docs:
        raise CalibrationError(f"{path}: calibration file is empty")
    return docs


def _token_ids(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids  # (T,)


def calibration_batches(tokenizer: Any, texts: list[str], num_samples: int = 64, seq_len: int = 512) -> list[dict[str, torch.Tensor]]:
    """Up to `num_samples` consecutive windows of `seq_len` tokens: dicts of input_ids / attention_mask [1, L]."""
    if num_samples < 1 or seq_len < 1:
        raise CalibrationError(f"num_samples ({num_samples}) and seq_len ({seq_len}) must be positive")
    ids = _token_ids(tokenizer, texts)
    if ids.numel() == 0:
        raise CalibrationError("calibration text tokenizes to zero tokens")
    windows = list(ids.split(seq_len))[:num_samples]
    if len(windows) < num_samples:
        logger.warning("calibration text gives %d windows of %d tokens, fewer than %d asked", len(windows), seq_len, num_samples)
    return [{"input_ids": w[None], "attention_mask": torch.ones(1, w.numel(), dtype=torch.long)} for w in windows]


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer: Any, texts: list[str], seq_len: int = 512, *, desc: str = "perplexity"
) -> tuple[float, int]:
    """(perplexity, number of predicted tokens) of a causal LM over `texts` in non-overlapping windows
    of `seq_len` tokens; `desc` labels the progress bar (e.g. "perplexity: fp8 static per-tensor")."""
    ids = _token_ids(tokenizer, texts)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for window in tqdm(list(ids.split(seq_len)), desc=desc, unit="window"):
        if window.numel() < 2:
            continue
        logits = model(input_ids=window[None].to(device)).logits[0].double()  # (L, V)
        nll += torch.nn.functional.cross_entropy(logits[:-1], window[1:].to(device), reduction="sum").item()
        count += window.numel() - 1
    if count == 0:
        raise CalibrationError("perplexity: the evaluation text has fewer than 2 tokens")
    return math.exp(nll / count), count
