"""Parity of the exported ONNX with the fp8kit model in torch, in ONNX Runtime's CPU provider.

ONNX Runtime fuses FP8 Q/DQ graphs wrongly in several versions (REFERENCE section 5), so parity is
measured with graph optimizations disabled (`ORT_DISABLE_ALL`), cross-checked on a small case
with `onnx.reference.ReferenceEvaluator`; the default level (`ORT_ENABLE_ALL`, what users run)
is then tried separately and a failure is reported with the way around it.

Error metric: ``rel = max|onnx - torch| / max|torch|`` over the valid (unpadded) positions of
the main output, and top-1 agreement of logits. Tolerances (`DEFAULT_TOLERANCE`) are justified
by measurements recorded in tests/export/test_validate.py.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ParityError

__all__ = [
    "DEFAULT_TOLERANCE",
    "DEFAULT_MEAN_TOLERANCE",
    "DEFAULT_TOP1",
    "LEVELS",
    "ParityReport",
    "LevelResult",
    "make_feeds",
    "ort_session",
    "run_ort",
    "run_reference",
    "torch_outputs",
    "compare",
    "validate_onnx",
    "default_level_advice",
    "dequantized_copy",
    "try_level",
    "NOISE_FACTOR",
]

logger = logging.getLogger(__name__)

# Tolerances, on rel = max|onnx - torch| / max|torch| over valid positions, the torch side being
# the same fp8kit model run in fp32. Each is a dtype term plus NOISE_FACTOR x the noise that FP8
# activation quantization itself adds (torch FP8 vs the same FP8 weights with unquantized
# activations), measured on the same inputs:
# - dtype term, fp32: ORT and onnx.reference agree to ~3e-7; torch computes norms / attention in
#   another order, which sometimes flips one FP8 code (one step = 6% of that element): tiny Llama
#   max rel 2e-7..5.4e-3 per batch, mean <= 6e-6. fp16: ONNX divides by the scale and multiplies
#   in fp16, so codes flip at every Q: tiny Llama max rel 1.0e-2..4.8e-2, mean 2.0e-3..3.3e-3,
#   top-1 96-99% (3 seeds x 2 weight modes x 9 batches); onnx.reference vs ORT also differ 2-3e-2.
# - noise term: in a deep model each flipped code moves later activations across other rounding
#   boundaries, so two correct FP8 evaluations drift apart up to the quantization noise. SmolLM2
#   (30 layers), ORT vs torch: mean rel 1.5e-2 (fp32) / 1.7e-2 (fp16), max rel 0.26 / 0.21,
#   top-1 92%; its activation noise: mean rel 1.5e-2, max rel 0.19. An export bug (wrong scale,
#   axis or fusion) gives 0.4-1.2 max rel (tests/export/test_validate.py).
DEFAULT_TOLERANCE = {torch.float32: 1e-2, torch.float16: 1e-1}
DEFAULT_MEAN_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}
DEFAULT_TOP1 = {torch.float32: 0.99, torch.float16: 0.9}
# Tolerances widen by this many times the activation-quantization noise (see validate_onnx).
NOISE_FACTOR = 2.0

LEVELS = ("disable_all", "basic", "extended", "all")


@dataclass
class LevelResult:
    """ONNX Runtime at one graph-optimization level: loaded?, error vs torch, and the verdict."""

    level: str
    ort_version: str
    ok: bool
    max_rel: float | None = None
    top1: float | None = None
    error: str | None = None

    def describe(self) -> str:
        if self.error is not None:
            return f"ORT {self.ort_version} level={self.level}: FAILED to run ({self.error})"
        verdict = "ok" if self.ok else "WRONG"
        top1 = f", top-1 {self.top1:.1%}" if self.top1 is not None else ""
        return f"ORT {self.ort_version} level={self.level}: {verdict} (max rel err {self.max_rel:.2e}{top1})"


@dataclass
class ParityReport:
    """ONNX Runtime (optimizations disabled) vs the fp8kit model in torch, on the same inputs."""

    dtype: torch.dtype
    ort_version: str
    sequences: int  # distinct sequences (the single-sequence runs; all rows when every run is a batch)
    tokens: int
    max_abs: float
    max_rel: float
    mean_rel: float
    top1: float | None
    tolerance: float
    min_top1: float
    mean_tolerance: float = float("inf")
    reference_max_rel: float | None = None
    noise_max_rel: float = 0.0
    noise_mean_rel: float = 0.0
    noise_top1: float | None = None
    per_batch_rel: list[float] = field(default_factory=list)
    levels: list[LevelResult] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)  # rows of each ORT run, in order
    logits: bool = True
    expected: list[np.ndarray] = field(default_factory=list, repr=False)  # torch outputs, for try_level

    @property
    def passed(self) -> bool:
        ok = self.max_rel <= self.tolerance and self.mean_rel <= self.mean_tolerance
        ok = ok and (self.top1 is None or self.top1 >= self.min_top1)
        return ok and (self.reference_max_rel is None or self.reference_max_rel <= self.tolerance)

    def summary(self) -> str:
        top1 = f", top-1 agreement {self.top1:.2%} (min {self.min_top1:.1%})" if self.top1 is not None else ""
        ref = f"; onnx.reference vs ORT max rel err {self.reference_max_rel:.2e}" if self.reference_max_rel is not None else ""
        noise = (
            f"; FP8 activation noise (torch, FP8 vs unquantized activations): max rel {self.noise_max_rel:.2e}, "
            f"mean rel {self.noise_mean_rel:.2e}"
        )
        batched = [b for b in self.batch_sizes if b > 1]
        again = (
            f", then {' and '.join(str(b) for b in batched)} of them again in {'a' if len(batched) == 1 else len(batched)} "
            f"right-padded batch{'es' if len(batched) > 1 else ''}" if batched and 1 in self.batch_sizes else ""
        )
        return (
            f"parity (ORT {self.ort_version}, optimizations disabled, {self.sequences} sequences{again}; "
            f"{self.tokens} token positions compared, vs the fp8kit model in torch fp32): "
            f"max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.2e} (tolerance {self.tolerance:.1e}), "
            f"mean rel err {self.mean_rel:.2e} (tolerance {self.mean_tolerance:.1e}){top1}{ref}{noise}"
        )


def make_feeds(
    sequences: Sequence[torch.Tensor], input_names: Sequence[str], pad_id: int = 0, padded_batch: int = 4
) -> list[dict[str, np.ndarray]]:
    """Model inputs: each sequence alone ([1, L]), plus one right-padded batch of up to `padded_batch`
    sequences of unequal lengths (attention_mask 0 on padding). Arrays are int64.
    """
    seqs = [torch.as_tensor(s).reshape(-1).long() for s in sequences]
    seqs = [s for s in seqs if s.numel()]
    feeds = [_feed([s], input_names, pad_id) for s in seqs]
    if padded_batch > 1 and len(seqs) > 1:
        lengths = sorted({int(s.numel()) for s in seqs})
        group = sorted(seqs, key=lambda s: -s.numel())[:padded_batch]
        if len(lengths) == 1:  # make them unequal: shorten all but the first
            group = [s if i == 0 else s[: max(1, s.numel() - 2 * i)] for i, s in enumerate(group)]
        feeds.append(_feed(group, input_names, pad_id))
    return feeds


def _feed(seqs: list[torch.Tensor], input_names: Sequence[str], pad_id: int) -> dict[str, np.ndarray]:
    length = max(int(s.numel()) for s in seqs)
    ids = np.full((len(seqs), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : s.numel()] = s.numpy()
        mask[i, : s.numel()] = 1
    out: dict[str, np.ndarray] = {}
    for name in input_names:
        if name == "input_ids":
            out[name] = ids
        elif name == "attention_mask":
            out[name] = mask
        elif name == "position_ids":
            out[name] = np.broadcast_to(np.arange(length, dtype=np.int64), ids.shape).copy()
        else:  # token_type_ids
            out[name] = np.zeros_like(ids)
    return out


def ort_session(path: str | os.PathLike, level: str = "disable_all"):  # noqa: ANN201 - onnxruntime type
    """A CPU `InferenceSession` at graph-optimization `level` (one of `LEVELS`)."""
    import onnxruntime as ort

    levels = {
        "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_ort(session: Any, feeds: Iterable[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
    """Output 0 of `session` for each feed."""
    names = {i.name for i in session.get_inputs()}
    return [session.run(None, {k: v for k, v in feed.items() if k in names})[0] for feed in feeds]


def run_reference(path: str | os.PathLike, feed: Mapping[str, np.ndarray]) -> np.ndarray:
    """Output 0 of the ONNX file under `onnx.reference.ReferenceEvaluator` (slow: small cases only)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path), load_external_data=True)
    names = {i.name for i in model.graph.input}
    return ReferenceEvaluator(model).run(None, {k: v for k, v in feed.items() if k in names})[0]


@torch.no_grad()
def torch_outputs(
    model: nn.Module, feeds: Sequence[Mapping[str, np.ndarray]], dtype: torch.dtype, hf: bool = True
) -> list[np.ndarray]:
    """The fp8kit model's main output in torch, in compute `dtype`, for each feed (the model is not modified)."""
    same_dtype = all(p.dtype == dtype for p in model.parameters() if p.is_floating_point())
    work = model if same_dtype else copy.deepcopy(model).to(dtype)  # no copy when nothing changes
    was_training = work.training
    work.eval()
    try:
        return _run_torch(work, feeds, dtype, hf)
    finally:
        work.train(was_training)


def _run_torch(work: nn.Module, feeds: Sequence[Mapping[str, np.ndarray]], dtype: torch.dtype, hf: bool) -> list[np.ndarray]:
    from .onnx import main_output

    outs = []
    for feed in feeds:
        if hf:
            kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}
            out = work(**kwargs, use_cache=False) if "use_cache" in _params(work) else work(**kwargs)
        else:
            out = work(*(torch.from_numpy(np.asarray(v)).to(dtype) for v in feed.values()))
        outs.append(main_output(out)[1].float().numpy())
    return outs


def _params(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


@dataclass
class _Errors:
    max_abs: float
    max_rel: float
    mean_rel: float
    per_batch: list[float]
    top1: float | None
    tokens: int


def compare(
    actual: Sequence[np.ndarray], expected: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], logits: bool = True
) -> _Errors:
    """Errors of `actual` vs `expected` over valid positions (mask 1); rel err is relative to max|expected|."""
    max_abs, max_rel, rels, agree, count, per_batch = 0.0, 0.0, [], 0, 0, []
    for a, e, mask in zip(actual, expected, masks):
        a = np.asarray(a, dtype=np.float32)
        e = np.asarray(e, dtype=np.float32)
        if mask is not None and a.ndim >= 3 and mask.shape == a.shape[:2]:
            a, e = a[mask.astype(bool)], e[mask.astype(bool)]  # (valid tokens, vocab)
        a = a.reshape(-1, a.shape[-1])
        e = e.reshape(-1, e.shape[-1])
        if not np.all(np.isfinite(a)):
            return _Errors(float("inf"), float("inf"), float("inf"), per_batch + [float("inf")], 0.0 if logits else None, count)
        diff = np.abs(a - e)
        scale = max(float(np.abs(e).max()), 1e-30)
        rel = float(diff.max()) / scale
        per_batch.append(rel)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, rel)
        rels.append(float(diff.mean()) / scale)
        if logits:
            agree += int((a.argmax(-1) == e.argmax(-1)).sum())
        count += a.shape[0]
    return _Errors(max_abs, max_rel, float(np.mean(rels)) if rels else 0.0, per_batch, agree / count if logits and count else None, count)


def validate_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    dtype: torch.dtype = torch.float16,
    hf: bool = True,
    logits: bool = True,
    tolerance: float | None = None,
    min_top1: float | None = None,
    mean_tolerance: float | None = None,
    reference: bool = True,
    levels: Sequence[str] = ("all",),
    raise_on_failure: bool = True,
) -> ParityReport:
    """Compare the ONNX file in ONNX Runtime (optimizations disabled) with `model` in torch.

    feeds: input dicts (e.g. from `make_feeds`); the attention_mask, when present, selects the
    positions compared. reference: also run the smallest feed through `onnx.reference` and
    compare it with ORT. levels: further ORT optimization levels to try (default: "all", what
    users run); their results are in `report.levels` and never fail the validation (see
    `default_level_advice`). Raises `ParityError` beyond the tolerance when `raise_on_failure`.
    """
    import onnxruntime as ort

    masks = [feed.get("attention_mask") for feed in feeds]
    batch_sizes = [int(next(iter(feed.values())).shape[0]) for feed in feeds]
    # The torch side runs in fp32 (the higher-precision evaluation of the same FP8 model; CPU
    # fp16 in torch is also slow). fp16 rounding of the graph is covered by the fp16 tolerance.
    expected = torch_outputs(model, feeds, torch.float32, hf=hf)
    # Yardstick: the noise FP8 activation quantization itself adds (same FP8 weights, activations
    # left unquantized). In a deep model a last-bit difference flips an FP8 code at one Q, which
    # moves later activations across other rounding boundaries: two correct FP8 evaluations then
    # differ by up to about this noise (measured on SmolLM2: 30 layers).
    unquantized = torch_outputs(dequantized_copy(model), feeds, torch.float32, hf=hf)
    noise = compare(expected, unquantized, masks, logits)
    logger.info("torch reference outputs done; running ONNX Runtime (optimizations disabled)")
    session = ort_session(path, "disable_all")
    actual = run_ort(session, feeds)
    logger.info("ONNX Runtime done")
    errors = compare(actual, expected, masks, logits)
    base_top1 = DEFAULT_TOP1[dtype] if min_top1 is None else min_top1
    report = ParityReport(
        dtype=dtype,
        ort_version=ort.__version__,
        sequences=batch_sizes.count(1) or sum(batch_sizes),
        batch_sizes=batch_sizes,
        tokens=errors.tokens,
        max_abs=errors.max_abs,
        max_rel=errors.max_rel,
        mean_rel=errors.mean_rel,
        top1=errors.top1,
        tolerance=(DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance) + NOISE_FACTOR * noise.max_rel,
        min_top1=base_top1 - NOISE_FACTOR * (1.0 - noise.top1) if noise.top1 is not None else base_top1,
        mean_tolerance=(DEFAULT_MEAN_TOLERANCE[dtype] if mean_tolerance is None else mean_tolerance)
        + NOISE_FACTOR * noise.mean_rel,
        per_batch_rel=errors.per_batch,
        noise_max_rel=noise.max_rel,
        noise_mean_rel=noise.mean_rel,
        noise_top1=noise.top1,
        logits=logits,
        expected=expected,
    )
    if reference and feeds:
        first = feeds[0]
        # onnx.reference is slow: one sequence of at most 8 tokens (or one row of a plain input)
        small = {k: np.ascontiguousarray(v[:1, :8] if hf else v[:1]) for k, v in first.items()}
        logger.info("cross-checking with onnx.reference on %s tokens", small["input_ids"].shape if "input_ids" in small else "one row")
        with np.errstate(all="ignore"):  # the reference Sigmoid overflows harmlessly in fp16
            ref = run_reference(path, small)
        report.reference_max_rel = compare([ref], [run_ort(session, [small])[0]], [small.get("attention_mask")], logits).max_rel
    for level in levels:
        logger.info("trying ONNX Runtime at optimization level %s", level)
        report.levels.append(try_level(path, level, feeds, report))
    logger.info(report.summary())
    if raise_on_failure and not report.passed:
        raise ParityError(f"{path}: ONNX Runtime output differs from the fp8kit model beyond tolerance: {report.summary()}")
    return report


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose `FP8Linear`s are plain fp32 `nn.Linear`s with the dequantized FP8 weights
    (activations no longer quantized): the reference that isolates activation-quantization noise."""
    from fp8kit.core.linear import FP8Linear
    from fp8kit.core.scaling import dequantize

    work = copy.deepcopy(model)
    for parent in list(work.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FP8Linear):
                scale = child.weight_scale.reshape(-1, 1) if child.weight_scale.dim() else child.weight_scale
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data = dequantize(child.weight, scale, torch.float32)
                if child.bias is not None:
                    linear.bias.data = child.bias.detach().float().clone()
                setattr(parent, name, linear)
    return work


def try_level(
    path: str | os.PathLike, level: str, feeds: Sequence[Mapping[str, np.ndarray]], limits: ParityReport
) -> LevelResult:
    """ONNX Runtime at optimization `level` on `feeds`, judged by the tolerances of `limits` (a finished report)."""
    import onnxruntime as ort

    try:
        actual = run_ort(ort_session(path, level), feeds)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail / RuntimeException types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return LevelResult(level, ort.__version__, ok=False, error=message[:300])
    masks = [feed.get("attention_mask") for feed in feeds]
    errors = compare(actual, limits.expected, masks, limits.logits)
    ok = errors.max_rel <= limits.tolerance and errors.mean_rel <= limits.mean_tolerance
    ok = ok and (errors.top1 is None or errors.top1 >= limits.min_top1)
    return LevelResult(level, ort.__version__, ok=ok, max_rel=errors.max_rel, top1=errors.top1)


def default_level_advice(result: LevelResult, working: Sequence[str] = ("disable_all",)) -> str | None:
    """How to run the graph in ONNX Runtime when `result` (a level above disable_all) failed; None if it passed.

    working: the levels measured to give correct results (disable_all always is, or validation failed).
    """
    if result.ok:
        return None
    what = "cannot load or run" if result.error else "gives wrong results for"
    names = {"disable_all": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
    levels = " or ".join(names[w] for w in working)
    return (
        f"ONNX Runtime {result.ort_version} at optimization level '{result.level}' {what} this FP8 Q/DQ graph "
        f"({result.error or f'max rel err {result.max_rel:.2e}'}): an ONNX Runtime graph-fusion bug; the graph itself "
        "passed the TensorRT rule check and ORT parity with optimizations disabled. To run it in ONNX Runtime set "
        f"SessionOptions.graph_optimization_level = GraphOptimizationLevel.{levels} (verified here), or try another "
        "onnxruntime version (FP8 Q/DQ fusions differ between versions); TensorRT is not affected."
    )
