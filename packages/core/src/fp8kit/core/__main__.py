"""`python -m fp8kit.core MODEL OUT_DIR [options]`: quantize a model to FP8 and save a vLLM-readable checkpoint.

A safetensors checkpoint directory quantized with a scheme that needs no calibration (dynamic
activations) is streamed tensor by tensor (`fp8kit.core.streaming`: memory about one tensor, not
the model); everything else is loaded whole, quantized and saved (the in-memory path).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import DEFAULT_FORMAT, FORMATS, format_readers, save_quantized
from .config import QuantConfig
from .data import calibration_batches, default_texts, read_text_file
from .errors import CheckpointError, ConfigError, FP8KitError
from .files import check_disjoint, output_path
from .offload import device_summary, resolve_device
from .surgery import quantize

logger = logging.getLogger("fp8kit.core")

_FORMATS_EPILOG = "formats and who reads them correctly:\n" + "\n".join(
    f"  {name}: {format_readers(name)}" for name in FORMATS
)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's unique parameters and buffers."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fp8kit.core", description=__doc__, epilog=_FORMATS_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Hugging Face model directory (safetensors), .gguf file, or 'default' (embedded "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("out_dir", type=Path, help=f"output checkpoint directory, in the --format format (default "
                   f"{DEFAULT_FORMAT}); written atomically")
    p.add_argument("--activation", choices=["dynamic", "static"], default="dynamic",
                   help="activation scales: dynamic (computed per call, no calibration) or static (one per layer, "
                   "calibrated on text; needed for TensorRT export) (default dynamic)")
    p.add_argument(
        "--activation-granularity",
        choices=["tensor", "token", "group"],
        default=None,
        help="dynamic activation scales per tensor, per token (row) or per 1 x GROUP_SIZE group along K; static "
        "is per tensor (default: group with --weight block, else tensor)",
    )
    p.add_argument(
        "--weight",
        choices=["tensor", "channel", "block"],
        default="tensor",
        help="weight scales per tensor, per output channel, or per BLOCK_SIZE block (DeepSeek-V3 style); channel "
        "and block need --format compressed-tensors (default tensor)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        nargs=2,
        metavar=("ROWS", "COLS"),
        default=(128, 128),
        help="weight block for --weight block (default 128 128)",
    )
    p.add_argument("--group-size", type=int, default=None,
                   help="activation group along K for --activation-granularity group (default: block COLS)")
    p.add_argument(
        "--format",
        choices=list(FORMATS),
        default=DEFAULT_FORMAT,
        help=f"checkpoint format: 'compressed-tensors' (llm-compressor's float-quantized, every scheme) or 'fp8' "
        f"(AutoFP8 / vLLM / DeepSeek-V3: per-tensor or block weights; transformers misreads per-tensor ones) "
        f"(default {DEFAULT_FORMAT}); who reads which: see below",
    )
    p.add_argument("--kv-cache", action="store_true",
                   help="also calibrate static FP8 KV-cache scales (k_scale / v_scale, after RoPE; needs calibration, "
                   "so the in-memory path) (default off)")
    p.add_argument("--fast-accum", action="store_true",
                   help="record use_fast_accum: _scaled_mm's faster, slightly less exact accumulation (default off)")
    p.add_argument("--calibration-file", type=Path,
                   help="UTF-8 text for static / KV-cache calibration (default: the built-in text, Python's docstrings)")
    p.add_argument("--num-samples", type=int, default=32, help="calibration windows of --seq-len tokens (default 32)")
    p.add_argument("--algorithm", choices=["max", "mse", "gptq"], default="max",
                   help="weight rounding (README 'Choosing an algorithm'): max scales (default), mse (scale search, "
                   "no data), gptq (error-compensating rounding on calibration data; in-memory path)")
    p.add_argument("--smoothing", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant: move ALPHA (0..1) of the activations' per-channel range into the weights, folded "
                   "into the norms (needs calibration; default off, not recommended for FP8: see README)")
    p.add_argument("--gptq-block-size", type=int, default=128, help="GPTQ lazy-update block in columns (default 128)")
    p.add_argument("--gptq-dampening", type=float, default=0.01,
                   help="GPTQ diagonal dampening, fraction of the mean Hessian diagonal (default 0.01)")
    p.add_argument("--gptq-act-order", action="store_true",
                   help="GPTQ: quantize columns by decreasing input energy (saved in the original order; default off)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--ignore", nargs="*", default=None,
                   help="module names or 're:' patterns to keep in high precision (default: re:.*lm_head)")
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        default=None,
        help="dtype the model is loaded and quantized in, which is also the dtype of the tensors OUT_DIR keeps in "
        "high precision (embeddings, norms, lm_head): bf16 halves them. Default fp32 (in-memory path); streaming "
        "keeps each tensor's stored dtype, so giving --dtype selects the in-memory path",
    )
    p.add_argument("--no-stream", action="store_true",
                   help="load the whole model even where streaming applies (default: stream when possible)")
    p.add_argument("--device", default=None,
                   help="streaming: where to quantize each weight (default: cuda when available, else cpu)")
    p.add_argument(
        "--device-map",
        default=None,
        help="in-memory path: accelerate device map for a model larger than the GPU: 'auto', or a JSON object "
        "of module name -> device ('cuda:0', 'cpu', 'disk'); offloaded layers are calibrated and quantized "
        "one at a time (default: none, the whole model on one device)",
    )
    p.add_argument(
        "--max-memory",
        default=None,
        help="with --device-map: memory each device may hold, e.g. '0=70GiB,1=70GiB,cpu=200GiB' (GPU index or 'cpu' "
        "= bytes or a size with unit; default: what is free)",
    )
    p.add_argument("--offload-folder", type=Path, default=None,
                   help="with --device-map: where accelerate offloads layers to disk (default: none)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run model code shipped with MODEL (auto_map); only for code you trust (default off)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR (default: refuse)")
    return p


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_device_map(text: str | None) -> str | dict[str, str] | None:
    """--device-map: None, a name accelerate knows ('auto', 'balanced', ...) or a JSON object."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        device_map = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--device-map: not valid JSON: {exc}") from exc
    if not all(isinstance(k, str) and isinstance(v, (str, int)) for k, v in device_map.items()):
        raise ConfigError("--device-map: expected a JSON object of module name -> device")
    return device_map


def parse_max_memory(text: str | None) -> dict[int | str, int | str] | None:
    """--max-memory: '0=70GiB,1=70GiB,cpu=200000' -> {0: '70GiB', 1: '70GiB', 'cpu': 200000} (bytes as int)."""
    if text is None:
        return None
    budget: dict[int | str, int | str] = {}
    for item in text.split(","):
        device, sep, size = (part.strip() for part in item.partition("="))
        if not sep or not device or not size:
            raise ConfigError(f"--max-memory: {item!r} is not DEVICE=SIZE (e.g. 0=70GiB or cpu=200GiB)")
        if not (device.isdigit() or device in ("cpu", "disk", "mps")):
            raise ConfigError(f"--max-memory: device {device!r} is not a GPU index, 'cpu' or 'disk'")
        if not (size.isdigit() or re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)", size, flags=re.IGNORECASE)):
            raise ConfigError(f"--max-memory: size {size!r} for device {device} is not bytes or a size like 70GiB")
        key: int | str = int(device) if device.isdigit() else device
        if key in budget:
            raise ConfigError(f"--max-memory: device {device} is given twice")
        budget[key] = int(size) if size.isdigit() else size
    return budget


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse an OUT_DIR that cannot be replaced whole or overlaps MODEL or the offload folder, and a device
    this machine lacks: before anything is loaded."""
    from .models import DEFAULT_MODEL, default_gguf_path

    model = default_gguf_path() if args.model == DEFAULT_MODEL else Path(args.model)
    output_path(args.out_dir, "OUT_DIR")  # not the current directory, a mount point or "/"
    check_disjoint(model, args.out_dir, "MODEL", "OUT_DIR")
    if args.offload_folder is not None:
        check_disjoint(args.offload_folder, args.out_dir, "--offload-folder", "OUT_DIR")
    if args.device is not None:
        resolve_device(args.device, "--device")


def stream_skip_reason(args: argparse.Namespace, config: QuantConfig) -> str | None:
    """Why the in-memory path must run for these arguments, or None when streaming applies."""
    from .checkpoint import read_quantization_config
    from .streaming import is_safetensors_checkpoint

    if args.no_stream:
        return "--no-stream given"
    if args.device_map is not None:
        return "--device-map given"
    if config.needs_calibration:
        return "static activation / KV-cache scales, gptq and --smoothing need calibration, which runs the whole model"
    if config.algorithm != "max":
        return f"--algorithm {config.algorithm} (streaming rounds with max scales)"
    if args.dtype is not None:
        return "--dtype given (streaming keeps the stored dtype)"
    if not is_safetensors_checkpoint(args.model):
        return "streaming reads a directory of safetensors weights; a .gguf file or 'default' is loaded whole"
    if read_quantization_config(args.model)[1] is not None:
        return "MODEL is already quantized"
    return None


def _print_summary(quantized: list[str], skipped: dict[str, str]) -> None:
    print(f"quantized {len(quantized)} layers, kept {len(skipped)} in high precision:")
    for name, reason in skipped.items():
        print(f"  {name}: {reason}")


def checkpoint_bytes(path: Path) -> dict[str, Any]:
    """Where a checkpoint's bytes are, from its safetensors headers: totals (bytes) of FP8 weights,
    scales (``*_scale``) and high-precision tensors, the high-precision dtypes, and the largest
    high-precision tensors [(name, bytes)] (largest first)."""
    from .checkpoint.writer import SAFETENSORS_DTYPES
    from .files import check_safetensors_dir

    itemsize = {name: dtype.itemsize for dtype, name in SAFETENSORS_DTYPES.items()}
    parts = {"fp8": 0, "scales": 0, "high": 0}
    high: list[tuple[str, int]] = []
    dtypes: set[str] = set()
    files: set[Path] = set()
    for name, (file, entry) in check_safetensors_dir(path).items():
        files.add(file)
        nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
        if entry["dtype"].startswith("F8_"):
            parts["fp8"] += nbytes
        elif name.endswith("_scale"):
            parts["scales"] += nbytes
        else:
            parts["high"] += nbytes
            high.append((name, nbytes))
            if itemsize.get(entry["dtype"], 0) > 1:
                dtypes.add(entry["dtype"])
    high.sort(key=lambda item: -item[1])
    return {**parts, "total": sum(parts.values()), "files": len(files), "high_dtypes": sorted(dtypes), "largest": high}


def _print_result(args: argparse.Namespace, how: str, seconds: float) -> None:
    """The end of a successful run: where the checkpoint's bytes are, who reads its format, how it was made."""
    info = checkpoint_bytes(args.out_dir)
    total = max(info["total"], 1)

    def mb(n: int) -> str:
        return f"{n / 1e6:.1f} MB ({100 * n / total:.0f}%)"

    print(f"checkpoint: {info['total'] / 1e6:.1f} MB in {info['files']} safetensors file(s)")
    print(f"  FP8 weights: {mb(info['fp8'])}; scales: {info['scales'] / 1e3:.1f} kB")
    high = f"  high precision ({', '.join(info['high_dtypes']) or '-'}): {mb(info['high'])}"
    if info["largest"]:
        name, nbytes = info["largest"][0]
        high += f", largest {name} {mb(nbytes)}"
    print(high)
    if info["high"] > info["fp8"] and {"F32"} & set(info["high_dtypes"]):
        print("  (most bytes are high-precision fp32 tensors: --dtype bf16 stores them in half the bytes)")
    print(f"format {args.format}: read by {format_readers(args.format)}")
    print(f"how: {how}")
    print(f"wrote {args.out_dir} in {seconds:.1f} s")


def run_streaming(args: argparse.Namespace, config: QuantConfig) -> int:
    """Quantize MODEL tensor by tensor into OUT_DIR (`fp8kit.core.streaming`)."""
    from .streaming import quantize_checkpoint

    report = quantize_checkpoint(
        args.model,
        args.out_dir,
        config,
        format=args.format,
        device=args.device,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )
    _print_summary(report.quantized, report.skipped)
    ratio = report.bytes_out / max(report.bytes_in, 1)
    print(f"model bytes: {report.bytes_in / 2**20:.1f} MiB -> {report.bytes_out / 2**20:.1f} MiB ({ratio:.2f}x)")
    _print_result(
        args,
        f"streamed: read and quantized one tensor at a time on {report.device}, never loading the whole model "
        f"({report.tensors_out} tensors, {report.bytes_in / 1e9 / max(report.seconds, 1e-9):.2f} GB/s read)",
        report.seconds,
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from .models import load_model

    start = time.perf_counter()
    ignore = {} if args.ignore is None else {"ignore": tuple(args.ignore)}
    granularity = args.activation_granularity or ("group" if args.weight == "block" else "tensor")
    config = QuantConfig(
        weight=args.weight,
        activation=args.activation,
        activation_granularity=granularity,
        kv_cache=args.kv_cache,
        use_fast_accum=args.fast_accum,
        block_size=tuple(args.block_size),
        group_size=args.block_size[1] if args.group_size is None else args.group_size,
        algorithm=args.algorithm,
        smoothing=args.smoothing,
        gptq_block_size=args.gptq_block_size,
        gptq_dampening=args.gptq_dampening,
        gptq_act_order=args.gptq_act_order,
        **ignore,
    )
    if config.weight == "channel" and args.format == "fp8":
        raise ConfigError(
            "--weight channel cannot be saved in the AutoFP8 / vLLM 'fp8' checkpoint format (one scale per weight); "
            "use --weight tensor, or --format compressed-tensors"
        )
    check_outputs(args)
    if args.out_dir.is_dir() and any(args.out_dir.iterdir()) and not args.overwrite:
        raise CheckpointError(f"{args.out_dir}: directory exists and is not empty; pass --overwrite to replace it")
    if args.device_map is None and (args.max_memory is not None or args.offload_folder is not None):
        raise ConfigError("--max-memory and --offload-folder apply with --device-map only (e.g. --device-map auto)")
    reason = stream_skip_reason(args, config)
    if reason is None:
        logger.info("streaming %s tensor by tensor", args.model)
        return run_streaming(args, config)
    logger.info("loading %s whole (%s)", args.model, reason)
    calibrate = config.needs_calibration
    if calibrate and (args.num_samples < 1 or args.seq_len < 1):
        raise ConfigError(f"--num-samples ({args.num_samples}) and --seq-len ({args.seq_len}) must be positive")
    model, tokenizer = load_model(
        args.model,
        dtype=DTYPES[args.dtype or "fp32"],
        trust_remote_code=args.trust_remote_code,
        device_map=parse_device_map(args.device_map),
        max_memory=parse_max_memory(args.max_memory),
        offload_folder=args.offload_folder,
    )
    calibration = None
    if calibrate:
        if tokenizer is None:
            raise ConfigError(f"{args.model}: has no tokenizer, so text calibration is impossible")
        need = args.num_samples * args.seq_len
        texts = read_text_file(args.calibration_file, tokenizer, need) if args.calibration_file else default_texts()[0]
        calibration = calibration_batches(tokenizer, texts, args.num_samples, args.seq_len)
    bytes_before = model_bytes(model)
    quantize(model, config, calibration)
    report = model.fp8kit_report
    if not report.quantized:
        raise ConfigError(
            f"{args.model}: no layer could be quantized (no nn.Linear with K and N divisible by 16 outside `ignore`): "
            + "; ".join(f"{n}: {r}" for n, r in report.skipped.items())
        )
    bytes_after = model_bytes(model)
    save_quantized(model, args.out_dir, tokenizer, format=args.format, overwrite=args.overwrite)
    print(report.summary())
    if args.device_map is not None:  # where each FP8 layer computes (disk-offloaded layers run on their hook's device)
        per_device = device_summary(model, report.quantized)
        print("FP8 layers per device: " + ", ".join(f"{d} {n}" for d, n in sorted(per_device.items())))
    if report.kv_cache_layers:
        print(f"KV-cache scales for {len(report.kv_cache_layers)} attention layers")
    print(f"model bytes: {bytes_before / 2**20:.1f} MiB -> {bytes_after / 2**20:.1f} MiB ({bytes_after / bytes_before:.2f}x)")
    _print_result(args, f"loaded the whole model into memory, then quantized and saved it (because {reason})",
                  time.perf_counter() - start)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (FP8KitError, OSError) as exc:  # OSError: a disk full or a permission denied while writing
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
