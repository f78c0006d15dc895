"""python -m export MODEL OUT.onnx: FP8 Q/DQ ONNX for TensorRT, checked and validated in ONNX Runtime.

MODEL: an fp8kit / AutoFP8 checkpoint directory (static scales used as they are; dynamic ones are
calibrated), a full-precision Hugging Face directory or .gguf file (quantized with static
activation scales calibrated on --calibration-file or the default text), or 'default'
(the embedded SmolLM2-135M). OUT.onnx only appears once it passed the TensorRT-rule check
and the ONNX Runtime parity validation.

Exit codes: 0 ok; 2 bad input, failed check or parity; 3 --engine asked but TensorRT is missing
(the ONNX is written and validated first).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fp8kit.core.errors import CheckpointError, FP8KitError
from fp8kit.core.files import check_disjoint

from .errors import ExportError, OnnxCheckError

__all__ = ["main", "build_parser", "run"]

logger = logging.getLogger("fp8kit.export")

EXIT_ERROR = 2
EXIT_NO_TENSORRT = 3
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="fp8kit / AutoFP8 checkpoint dir, Hugging Face dir, .gguf file, or 'default'")
    p.add_argument("out", type=Path, help="output ONNX file (OUT.onnx; external data OUT.onnx.data when over 2 GB)")
    p.add_argument("--calibration-file", type=Path, help="UTF-8 text for calibration and validation (default: built-in text)")
    p.add_argument("--num-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="compute dtype of the graph (default fp16)")
    p.add_argument("--weight", choices=["tensor", "channel"], default=None,
                   help="weight scale granularity when quantizing here (default tensor; a checkpoint keeps its own)")
    p.add_argument("--ignore", nargs="*", default=None, help="module names or 're:' patterns to keep unquantized (default: lm_head)")
    p.add_argument("--opset", type=int, default=19, help="ONNX opset, >= 19 (default 19)")
    p.add_argument("--batch-range", default="1:8:32",
                   help="MIN:OPT:MAX batch sizes of the TensorRT profile in the printed trtexec line (default 1:8:32)")
    p.add_argument("--seq-range", default="1:128:2048",
                   help="MIN:OPT:MAX sequence lengths of the TensorRT profile (default 1:128:2048)")
    p.add_argument("--validate-samples", type=int, default=8, help="sequences for the parity check (default 8, at least 2)")
    p.add_argument("--validate-seq-len", type=int, default=64, help="longest validation sequence in tokens (default 64)")
    p.add_argument("--engine", type=Path,
                   help="also build a strongly typed TensorRT engine here (needs tensorrt; default: only print the "
                   "trtexec command)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run model code shipped with MODEL (auto_map); only for code you trust (default off)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.onnx (default: refuse)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also log fp8kit's details (default: one line per step on stderr)")
    return p


def _check_inputs(args: argparse.Namespace) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Every check that needs no model: fail in a second, before loading anything."""
    from .onnx import MAX_OPSET, MIN_OPSET, _check_destination
    from .tensorrt import parse_range

    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise ExportError(
            f"--opset {args.opset}: FP8 QuantizeLinear / DequantizeLinear need opset >= {MIN_OPSET} "
            f"(supported {MIN_OPSET}..{MAX_OPSET}); TensorRT reads FP8 Q/DQ from opset 19 on"
        )
    for flag in ("num_samples", "seq_len", "validate_seq_len"):
        if getattr(args, flag) < 1:
            raise ExportError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.validate_samples < 2:
        raise ExportError("--validate-samples must be at least 2 (one padded batch of unequal lengths is part of it)")
    try:
        batch, seq = parse_range(args.batch_range, "batch"), parse_range(args.seq_range, "seq")
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    if args.out.suffix != ".onnx":
        raise ExportError(f"output {args.out} must end in .onnx")
    _check_destination(args.out, args.overwrite)
    if args.model != "default" and not Path(args.model).exists():
        raise ExportError(f"model {args.model}: no such file or directory (give a Hugging Face / fp8kit directory, a .gguf file or 'default')")
    if args.calibration_file is not None and not args.calibration_file.is_file():
        raise ExportError(f"--calibration-file {args.calibration_file}: no such file")
    if args.engine is not None and args.engine.resolve() == args.out.resolve():
        raise ExportError("--engine must differ from OUT.onnx")
    if args.model != "default":  # the output must not replace or land inside the model (symlinks, `..` resolved)
        try:
            check_disjoint(args.model, args.out, "MODEL", "OUT.onnx")
            if args.engine is not None:
                check_disjoint(args.model, args.engine, "MODEL", "--engine")
        except CheckpointError as exc:
            raise ExportError(str(exc)) from None
    return batch, seq


def _validation_sequences(tokenizer: Any, texts: list[str], count: int, max_len: int) -> list[torch.Tensor]:
    """`count` token sequences of unequal lengths (max_len down to max_len / 2) from the text."""
    from fp8kit.core.data import calibration_batches

    windows = [b["input_ids"][0] for b in calibration_batches(tokenizer, texts, count, max_len)]
    if len(windows) < 2:
        raise ExportError(f"the calibration text gives {len(windows)} validation sequence(s) of {max_len} tokens; give more text")
    step = max(1, max_len // (2 * len(windows)))
    return [w[: max(1, w.numel() - i * step)] for i, w in enumerate(windows)]


def run(args: argparse.Namespace) -> int:
    from fp8kit.core import QuantConfig, quantize
    from fp8kit.core.data import calibration_batches, default_texts, read_text_file
    from fp8kit.core.experts import moe_experts_modules
    from fp8kit.core.models import load_model

    from .check import check_onnx
    from .onnx import calibrate_activations, default_input_names, export_onnx, fp8_layers, publish, staging_directory
    from .qdq import block_refusal
    from .tensorrt import shape_ranges, tensorrt_available, trtexec_command
    from .validate import default_level_advice, make_feeds, try_level, validate_onnx

    start = time.perf_counter()

    def phase(text: str) -> None:
        """One line per step on stderr (the result goes to stdout), so minutes of work are never silent."""
        print(f"[{time.perf_counter() - start:5.0f} s] {text}", file=sys.stderr, flush=True)

    batch_range, seq_range = _check_inputs(args)
    dtype = DTYPES[args.dtype]

    phase(f"loading {args.model}")
    model, tokenizer = load_model(args.model, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    moe = moe_experts_modules(model)
    if moe:
        raise ExportError(
            f"{args.model}: {type(model).__name__} is a mixture-of-experts model ({len(moe)} experts modules, "
            f"e.g. {moe[0]}); FP8 ONNX export does not support MoE models (routed experts have no static FP8 Q/DQ "
            "graph here, and a graph with only its attention in FP8 would be half-quantized). Serve its FP8 "
            "checkpoint instead: python -m fp8kit.core MODEL OUT_DIR, then vLLM / SGLang"
        )
    if tokenizer is None:
        raise ExportError(f"model {args.model}: no tokenizer found, so it cannot be calibrated or validated on text")
    if args.calibration_file:  # only as much of the file as calibration and validation use
        need = max(args.num_samples * args.seq_len, args.validate_samples * args.validate_seq_len)
        texts = read_text_file(args.calibration_file, tokenizer, need)
    else:
        texts = default_texts()[0]
    calibration = calibration_batches(tokenizer, texts, args.num_samples, args.seq_len)
    layers = fp8_layers(model)
    blocks = [name for name, layer in layers.items() if layer.weight_granularity == "block"]
    if blocks:  # refused before calibrating anything
        raise ExportError(f"{args.model}: {block_refusal(blocks)}")
    if layers:  # an fp8kit / AutoFP8 checkpoint
        phase(f"{len(layers)} FP8 layers in the checkpoint; calibrating static scales for any dynamic ones")
        if args.weight is not None:
            logger.warning("--weight is ignored: %s is already quantized (its weight scales are used as they are)", args.model)
        calibrated = calibrate_activations(model, calibration)
        if calibrated:
            print(f"{args.model} has dynamic activation scales: calibrated static scales for {len(calibrated)} layers "
                  f"on {len(calibration)} windows of the {'calibration file' if args.calibration_file else 'default text'}")
        skipped: dict[str, str] = {}
    else:
        phase(f"quantizing with static activation scales calibrated on {len(calibration)} windows of {args.seq_len} tokens")
        ignore = {} if args.ignore is None else {"ignore": tuple(args.ignore)}
        config = QuantConfig(weight=args.weight or "tensor", activation="static", **ignore)
        quantize(model, config, calibration)
        skipped = dict(model.fp8kit_report.skipped)
        if not model.fp8kit_report.quantized:
            raise ExportError(
                f"{args.model}: no quantizable layer (no nn.Linear with K and N divisible by 16 outside the ignore list)"
                + "".join(f"; {n}: {r}" for n, r in list(skipped.items())[:5])
            )

    input_names = default_input_names(model, tokenizer)
    is_lm = hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
    with staging_directory(args.out) as tmpdir:
        staged = tmpdir / args.out.name
        phase(f"exporting {type(model).__name__} to ONNX ({args.dtype}, opset {args.opset}; torch.onnx, the longest step)")
        result = export_onnx(model, staged, input_names=input_names, dtype=dtype, opset=args.opset)
        phase("checking the TensorRT FP8 Q/DQ rules")
        violations = check_onnx(staged)
        if violations:
            listing = "\n  ".join(str(v) for v in violations[:20])
            raise OnnxCheckError(f"{args.out}: the exported graph breaks {len(violations)} TensorRT FP8 rule(s):\n  {listing}", violations)
        sequences = _validation_sequences(tokenizer, texts, args.validate_samples, args.validate_seq_len)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        feeds = make_feeds(sequences, input_names, pad_id=pad_id)
        phase(f"validating parity on {len(sequences)} sequences: the model in torch, then ONNX Runtime")
        parity = validate_onnx(staged, model, feeds, dtype=dtype, logits=is_lm, levels=("all",))
        publish(staged, args.out)  # passed: into place, fsynced

    ranges = shape_ranges(result.input_names, result.dynamic_axes, batch_range, seq_range)
    engine_path = args.engine or args.out.with_suffix(".plan")
    n_linear = len(result.quantized_layers) + len(skipped)
    print(f"wrote {args.out} ({result.file_bytes / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s")
    print(f"  FP8 layers: {len(result.quantized_layers)} of {n_linear} Linear layers quantized"
          + (f"; kept in {args.dtype}: {', '.join(list(skipped)[:4])}{' ...' if len(skipped) > 4 else ''}" if skipped else ""))
    print(f"  size: {result.file_bytes / 2**20:.1f} MiB vs {result.fp16_bytes / 2**20:.1f} MiB for an fp16 export "
          f"of the same graph ({result.size_ratio:.2f}x)")
    print(f"  inputs: {', '.join(result.input_names)} (dynamic batch, seq); output: {result.output_name}; {args.dtype}, opset {result.opset}")
    print("  TensorRT FP8 Q/DQ rules: all passed (fp8kit.export.check_onnx)")
    print(f"  {parity.summary()}")
    for level in parity.levels:
        print(f"  {level.describe()}")
    if any(not level.ok for level in parity.levels):
        basic = try_level(args.out, "basic", feeds, parity)
        print(f"  {basic.describe()}")
        working = ("disable_all", "basic") if basic.ok else ("disable_all",)
        for level in parity.levels:
            advice = default_level_advice(level, working)
            if advice:
                print(f"  WARNING: {advice}")
    print("build the TensorRT engine with:")
    print(f"  {trtexec_command(args.out, engine_path, ranges)}")

    if args.engine is not None:
        if not tensorrt_available():
            print(f"error: --engine {args.engine} needs the TensorRT Python package (pip install tensorrt, on a machine "
                  f"with an NVIDIA GPU); {args.out} was written and validated: run the trtexec command above",
                  file=sys.stderr)
            return EXIT_NO_TENSORRT
        from .tensorrt import build_engine

        engine = build_engine(args.out, args.engine, ranges)
        print(f"wrote TensorRT engine {engine.engine_path} ({engine.engine_bytes / 2**20:.1f} MiB); "
              f"layer info {engine.layer_info_path}")
        print(f"  {engine.layers.describe()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("fp8kit").setLevel(logging.INFO)
    try:
        return run(args)
    except (FP8KitError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
