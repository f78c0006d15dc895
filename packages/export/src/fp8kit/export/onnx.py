"""Export an fp8kit model (FP8Linear layers with static activation scales) to FP8 Q/DQ ONNX.

The model is copied, cast to the compute dtype (FP8 weights and their scales stay as they are),
its `FP8Linear`s swapped for `QDQLinear`s, and exported with `torch.onnx.export(dynamo=True)`
and the custom-op translations of `qdq`. Post-processing fixes what TensorRT reads: per-tensor
Q/DQ carry no `axis`, every Q has `saturate=1`, `ir_version` 10. The file is written under a
temporary name in the output's directory and moved into place, so no partial file is left.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fp8kit.core.calibration import calibrate
from fp8kit.core.errors import CheckpointError
from fp8kit.core.files import fsync_tree, output_lock, remove_stale_temps, temp_sibling
from fp8kit.core.linear import FP8Linear
from fp8kit.core.scaling import amax_to_scale

from . import qdq
from .errors import ExportError

__all__ = [
    "ExportResult",
    "export_onnx",
    "calibrate_activations",
    "fp8_layers",
    "default_input_names",
    "MIN_OPSET",
    "IR_VERSION",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 19  # FP8 QuantizeLinear / DequantizeLinear
MAX_OPSET = 21
IR_VERSION = 10
_TWO_GB = 2**31
_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, torch.float16: torch.float16, torch.float32: torch.float32}


@dataclass
class ExportResult:
    """What `export_onnx` wrote.

    path: the ONNX file; external_data: its `.data` file when the model is over 2 GB, else None.
    file_bytes: bytes on disk (both files); fp16_bytes: the same graph with every floating
    initializer stored as fp16 (what an fp16 export of the model holds), so `size_ratio` =
    file_bytes / fp16_bytes.
    """

    path: Path
    quantized_layers: list[str]
    input_names: list[str]
    output_name: str
    dtype: torch.dtype
    opset: int
    file_bytes: int
    fp16_bytes: int
    fp8_weight_params: int
    external_data: Path | None = None
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        return self.file_bytes / self.fp16_bytes if self.fp16_bytes else float("nan")


def fp8_layers(model: nn.Module) -> dict[str, FP8Linear]:
    """Qualified name -> `FP8Linear` of every quantized layer of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Sequence[Any]) -> list[str]:
    """Give every dynamic-activation `FP8Linear` of `model` a static per-tensor input scale, in place.

    `batches`: input-id tensors or dicts of model inputs (attention_mask honoured: padding does
    not count). Scale = absmax of the layer's (unquantized) input over the batches / 448. Returns
    the names of the layers calibrated. Needed before `export_onnx` for checkpoints saved with
    dynamic activation scales: TensorRT Q/DQ graphs take static scales only.
    """
    names = [name for name, m in fp8_layers(model).items() if m.input_scale is None]
    if not names:
        return []
    stats = calibrate(model, names, batches)
    modules = fp8_layers(model)
    for name in names:
        amax = stats.input_amax.get(name)
        if amax is None:
            raise ExportError(f"layer {name!r} received no input during calibration, so it has no static scale")
        layer = modules[name]
        layer.register_buffer("input_scale", amax_to_scale(amax).reshape(()).to(layer.weight_scale.device))
        layer.activation = "static"
        layer.activation_granularity = "tensor"
    config = getattr(model, "fp8kit_config", None)
    if config is not None and getattr(config, "activation", "static") != "static":
        model.fp8kit_config = type(config)(**{**config.to_dict(), "activation": "static", "activation_granularity": "tensor"})
    logger.info("calibrated static input scales of %d layers on %d batches", len(names), stats.batches)
    return names


def default_input_names(model: nn.Module, tokenizer: Any = None) -> list[str]:
    """The tokenizer's `model_input_names` that the model's forward accepts (input_ids first)."""
    names = list(getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"])
    params = inspect.signature(model.forward).parameters  # named parameters only: **kwargs swallow anything
    return [n for n in names if n in params]


class _KeywordModel(nn.Module):
    """Calls a Hugging Face model with keyword inputs and returns only its main output."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        params = inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if "use_cache" in params else {}
        if "return_dict" in params:
            self.extra["return_dict"] = True

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.input_names, inputs)), **self.extra)
        return main_output(out)[1]


def main_output(out: Any) -> tuple[str, torch.Tensor]:
    """(name, tensor) of a model's main output: logits, last_hidden_state, or the first output."""
    if isinstance(out, torch.Tensor):
        return "output", out
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is None and isinstance(out, Mapping):
            value = out.get(name)
        if isinstance(value, torch.Tensor):
            return name, value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return "output", out[0]
    raise ExportError(f"cannot find the main output (logits / last_hidden_state) in {type(out).__name__}")


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "can_generate")


def _example_inputs(model: nn.Module, input_names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Token inputs [2, 8] for a Hugging Face model (sizes above 1 so no axis is specialized)."""
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    gen = torch.Generator().manual_seed(0)
    out = []
    for name in input_names:
        if name == "input_ids":
            out.append(torch.randint(0, vocab, (2, 8), generator=gen))
        elif name == "attention_mask":
            out.append(torch.ones(2, 8, dtype=torch.long))
        else:  # token_type_ids, position_ids, ...
            out.append(torch.zeros(2, 8, dtype=torch.long))
    return tuple(out)


def _postprocess(model: Any) -> None:
    """Fix what TensorRT reads in the onnx-ir model: Q/DQ attributes and ir_version."""
    import onnx_ir as ir

    import ml_dtypes
    import numpy as np

    channel_zero_points: dict[int, Any] = {}
    for node in list(model.graph):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        scale = node.inputs[1]
        shape = scale.shape if scale is not None else None
        per_tensor = shape is not None and (len(shape) == 0 or (len(shape) == 1 and shape[0] == 1))
        if per_tensor:
            node.attributes.pop("axis", None)
        elif shape is not None and len(shape) == 1 and len(node.inputs) > 2:
            # A per-axis zero point must have the scale's shape [N] (ONNX spec; ORT enforces it).
            n = int(shape[0])
            if n not in channel_zero_points:
                zp = ir.Value(
                    name=f"fp8_zero_point_{n}",
                    const_value=ir.tensor(np.zeros(n, dtype=ml_dtypes.float8_e4m3fn), name=f"fp8_zero_point_{n}"),
                )
                zp.shape = ir.Shape([n])
                zp.type = ir.TensorType(ir.DataType.FLOAT8E4M3FN)
                model.graph.register_initializer(zp)
                channel_zero_points[n] = zp
            node.replace_input_with(2, channel_zero_points[n])
        if node.op_type == "QuantizeLinear":
            node.attributes["saturate"] = ir.AttrInt64("saturate", 1)
    model.graph.remove(
        [n for n in model.graph if n.op_type == "Constant" and all(not out.uses() for out in n.outputs)], safe=True
    )
    model.ir_version = IR_VERSION


def _float_bytes_as_fp16(model: Any) -> tuple[int, int]:
    """(bytes of every initializer with floating ones counted at 2 bytes/element, FP8 element count)."""
    import onnx_ir as ir

    total = 0
    fp8 = 0
    floats = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT8E4M3FN, ir.DataType.DOUBLE}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        n = tensor.size
        if tensor.dtype == ir.DataType.FLOAT8E4M3FN:
            fp8 += n
        total += 2 * n if tensor.dtype in floats else tensor.nbytes
    return total, fp8


# Messages torch.onnx's exporter emits on every export that say nothing about the user's model:
# its registry skipping torchvision ops (torchvision is not a dependency), onnxscript / onnx_ir pass logs
# (INFO, e.g. "Removed 7 unused nodes"), the deprecation of a pytree
# class inside torch.export, and dynamic axis names it merges (we name the axes the same on purpose).
_EXPORTER_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir")
_EXPORTER_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r"# The axis name: .* will not be used, since it shares the same shape constraints"),
)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's known irrelevant warnings and INFO logs for the duration of one export;
    anything else (a real problem with the model) still shows."""
    levels = {name: logging.getLogger(name).level for name in _EXPORTER_LOGGERS}
    for name in _EXPORTER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category, message in _EXPORTER_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: Sequence[torch.Tensor] | None = None,
    input_names: Sequence[str] | None = None,
    dtype: str | torch.dtype = torch.float16,
    opset: int = MIN_OPSET,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write `model` (with `FP8Linear` layers carrying static input scales) as FP8 Q/DQ ONNX at `path`.

    model: a Hugging Face model (inputs named `input_names`, default input_ids + attention_mask,
        dynamic batch and sequence axes; output `logits` or `last_hidden_state`) or any module
        called positionally with `example_inputs` (dynamic axis 0 unless `dynamic_axes` says).
    dtype: compute dtype of everything that is not FP8 ("fp16" or "fp32").
    The model itself is not modified (a copy is exported). Raises `ExportError` with the fix
    when the model has no quantized layer, a layer has dynamic activation scales, the opset is
    below 19, or `path` exists without `overwrite` or cannot be written.
    """
    path = Path(path)
    compute_dtype = _DTYPES.get(dtype)
    if compute_dtype is None:
        raise ExportError(f"dtype {dtype!r} is not supported: use fp16 or fp32 (ONNX Runtime CPU cannot run bf16)")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset {opset} cannot express FP8 Q/DQ for TensorRT: FP8 QuantizeLinear needs opset >= {MIN_OPSET} "
            f"(supported: {MIN_OPSET}..{MAX_OPSET})"
        )
    layers = fp8_layers(model)
    if not layers:
        raise ExportError(
            f"{type(model).__name__} has no quantized (FP8Linear) layer: quantize it first with "
            "fp8kit.core.quantize(model, QuantConfig(activation='static'), calibration=...)"
        )
    dynamic = [name for name, m in layers.items() if m.input_scale is None]
    if dynamic:
        raise ExportError(
            f"{len(dynamic)} layers (first: {dynamic[0]!r}) have dynamic activation scales, which a TensorRT "
            "Q/DQ graph cannot express: calibrate static scales with "
            "fp8kit.export.calibrate_activations(model, batches) (the CLI does this on --calibration-file)"
        )
    _check_destination(path, overwrite)

    hf = _is_hf(model)
    if hf:
        input_names = list(input_names or ["input_ids", "attention_mask"])
        example_inputs = tuple(example_inputs) if example_inputs is not None else _example_inputs(model, input_names)
        axes = {name: {0: "batch", 1: "seq"} for name in input_names}
    else:
        if example_inputs is None:
            raise ExportError(f"export_onnx: {type(model).__name__} is not a Hugging Face model: pass example_inputs")
        example_inputs = tuple(example_inputs)
        input_names = list(input_names or (["input"] if len(example_inputs) == 1 else [f"input_{i}" for i in range(len(example_inputs))]))
        axes = {name: {0: "batch"} for name in input_names}
    if dynamic_axes is not None:
        axes = {name: dict(v) for name, v in dynamic_axes.items()}
    if len(input_names) != len(example_inputs):
        raise ExportError(f"export_onnx: {len(input_names)} input names {input_names} for {len(example_inputs)} example inputs")

    work = copy.deepcopy(model).eval().to(compute_dtype)
    replaced = qdq.swap_for_export(work, compute_dtype)
    example_inputs = tuple(t.to(compute_dtype) if t.is_floating_point() else t for t in example_inputs)
    wrapped = _KeywordModel(work, input_names).eval() if hf else work
    with torch.no_grad():
        if hf:
            output_name, _ = main_output(work(**dict(zip(input_names, example_inputs)), **wrapped.extra))
        else:
            output_name, _ = main_output(work(*example_inputs))

    dims: dict[str, Any] = {}
    dynamic_shapes = []
    for name, tensor in zip(input_names, example_inputs):
        spec = {}
        for axis, dim_name in axes.get(name, {}).items():
            if axis < tensor.dim():
                spec[axis] = dims.setdefault(dim_name, torch.export.Dim(dim_name))
        dynamic_shapes.append(spec or None)

    logger.info("exporting %d FP8 layers of %s to ONNX (opset %d, %s)", len(replaced), type(model).__name__, opset, compute_dtype)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                wrapped,
                example_inputs,
                dynamo=True,
                opset_version=opset,
                input_names=list(input_names),
                output_names=[output_name],
                # _KeywordModel.forward(*inputs) takes all inputs as one variadic argument
                dynamic_shapes=(tuple(dynamic_shapes),) if hf else tuple(dynamic_shapes),
                custom_translation_table=qdq.translation_table(),
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # torch.export / onnxscript raise many types
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
    onnx_model = program.model
    _postprocess(onnx_model)
    fp16_bytes, fp8_params = _float_bytes_as_fp16(onnx_model)

    data_path = _write_atomically(program, path)
    file_bytes = path.stat().st_size + (data_path.stat().st_size if data_path else 0)
    del program, work
    return ExportResult(
        path=path,
        quantized_layers=replaced,
        input_names=list(input_names),
        output_name=output_name,
        dtype=compute_dtype,
        opset=opset,
        file_bytes=file_bytes,
        fp16_bytes=fp16_bytes,
        fp8_weight_params=fp8_params,
        external_data=data_path,
        dynamic_axes={k: dict(v) for k, v in axes.items() if k in input_names},
    )


def _check_destination(path: Path, overwrite: bool) -> None:
    """Refuse an output that exists (a dangling symlink included) without `overwrite`, a directory, or an
    unwritable parent. A symlink is written through: the new file replaces the link's target."""
    if path.is_dir():
        raise ExportError(f"output {path} is a directory: give a file name such as {path / 'model.onnx'}")
    if os.path.lexists(path) and not overwrite:
        raise ExportError(f"output {path} already exists: pass overwrite=True (--overwrite) or choose another name")
    parent = Path(os.path.realpath(path)).parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {path}: directory {parent} is not writable")


@contextmanager
def staging_directory(path: Path) -> Iterator[Path]:
    """A private directory beside the output file `path` (symlinks resolved) for the whole write, under
    `files.output_lock`: another writer of `path` is refused, and what killed writers left is removed
    first. Removed on exit; what is moved out of it before (`publish`) stays."""
    target = Path(os.path.realpath(path))
    try:
        with output_lock(target):
            remove_stale_temps(target)
            tmpdir = temp_sibling(target)
            tmpdir.mkdir()
            try:
                yield tmpdir
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None


def publish(staged: Path, path: Path) -> Path | None:
    """Move the finished `staged` file (and any sibling file of its directory, such as external data)
    to `path` (a symlink: its target), fsynced before and after; the external data path or None."""
    target = Path(os.path.realpath(path))
    fsync_tree(staged.parent)
    data_path = None
    for item in sorted(staged.parent.iterdir()):  # data first: OUT.onnx never points at a missing file
        if item != staged and item.is_file():
            data_path = target.parent / item.name
            os.replace(item, data_path)
    os.replace(staged, target)
    fsync_tree(target.parent, recursive=False)
    return data_path


def _write_atomically(program: Any, path: Path) -> Path | None:
    """Save in a private directory beside `path` (`staging_directory`), then move into place; the external data path."""
    with staging_directory(path) as tmpdir:
        try:
            tmp = tmpdir / path.name
            # External data (named <file>.data by the exporter) only when the proto would exceed 2 GB.
            program.save(tmp, external_data=None)
            return publish(tmp, path)
        except OSError as exc:
            raise ExportError(f"cannot write {path}: {exc}") from exc