"""Run workloads x backends and collect one DataFrame row per pair (see `report.COLUMNS`), and
run named suites (`run_suite`) part by part into one frame."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from itertools import groupby
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import metrics
from .backends import Backend, TorchBackend, cast_model, parse_backends
from .report import add_derived, error_status, make_frame
from .timing import TimingConfig, free_memory, sync, time_calls, time_cuda_graph
from .workloads import (
    LinearWorkload,
    ModelWorkload,
    QuantWorkload,
    smollm2_arch_config,
    suite_parts,
)

__all__ = [
    "run_benchmarks",
    "run_suite",
    "default_device",
    "default_dtype",
    "load_bench_model",
]

logger = logging.getLogger(__name__)

Workload = LinearWorkload | ModelWorkload | QuantWorkload
ModelLoader = Callable[[str, torch.dtype, torch.device], tuple[nn.Module, Any]]


def default_device() -> torch.device:
    """cuda:0 when a GPU is visible, else cpu."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """The baseline dtype: bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_bench_model(spec: str, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None) for a `ModelWorkload.spec`.

    "smollm2-arch": SmolLM2-135M's architecture with random weights (seed 0), no tokenizer.
    "default" or a path: `fp8kit.core.models.load_model`.
    """
    if spec == "smollm2-arch":
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(smollm2_arch_config())
        return model.to(device=device, dtype=dtype).eval(), None
    from fp8kit.core.models import load_model

    model, tokenizer = load_model(spec, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def _not_run(reason: str) -> str:
    return reason if reason.startswith(("not run", "error")) else f"not run: {reason}"


def run_benchmarks(
    workloads: Sequence[Workload],
    backends: Sequence[Backend],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    timing: TimingConfig | None = None,
    rotate_bytes: int | None = None,
    baseline: str | None = None,
    perplexity_texts: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    model_loader: ModelLoader | None = None,
) -> pd.DataFrame:
    """Time and check every workload on every backend; one row per (workload, backend).

    device / dtype: default cuda (bf16) when available, else cpu (fp32).
    rotate_bytes: each backend rotates through ceil(rotate_bytes / its weight bytes) distinct weights
        so small-M GEMMs read them from HBM; default 4x the GPU's L2 size on CUDA, none on CPU.
    baseline: backend id for `speedup_vs_baseline` (default: the first torch-* backend).
    perplexity_texts: held-out texts for the perplexity of real-weight language models.
    model_loader: (spec, dtype, device) -> (model, tokenizer or None) for model workloads;
        default `load_bench_model`.
    Quantization workloads pair with quantization backends (``copy``, ``quant-*``) and linear /
    model workloads with the others; other pairs make no row.
    Unavailable backends and failing (workload, backend) pairs become rows whose `status` says why.
    """
    frame = _run_rows(
        workloads, backends, device=device, dtype=dtype, timing=timing, rotate_bytes=rotate_bytes,
        perplexity_texts=perplexity_texts, seed=seed, progress=progress, model_loader=model_loader,
    )
    if baseline is None:
        baseline = next((b.id for b in backends if isinstance(b, TorchBackend)), None)
    return add_derived(frame, baseline)


def run_suite(
    name: str,
    *,
    targets: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    timing: TimingConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every part of suite `name` (`workloads.SUITES`), or those whose target is in `targets`,
    each with its own backends and weight rotation, into one frame (rows labelled by `target`).

    Speedup is against ``torch-bf16`` (``torch-fp32`` on a CPU run's fp32 parts), measured in the same run.
    """
    parts = suite_parts(name, targets)
    device = torch.device(device) if device is not None else default_device()
    frames = []
    for part in parts:
        logger.info("suite %s: target %s, %d workloads", name, part.target, len(part.workloads))
        frames.append(
            _run_rows(
                part.workloads, parse_backends(",".join(part.backends)), device=device, dtype=dtype, timing=timing,
                rotate_bytes=part.rotate_bytes, perplexity_texts=None, seed=seed, progress=progress, model_loader=None,
            )
        )
    rows = pd.concat(frames, ignore_index=True).to_dict("records") if frames else []
    frame = make_frame(rows)
    ids = set(frame["backend"]) if not frame.empty else set()
    baseline = "torch-bf16" if "torch-bf16" in ids else next((b for b in ids if str(b).startswith("torch-")), None)
    return add_derived(frame, baseline)


def _run_rows(
    workloads: Sequence[Workload],
    backends: Sequence[Backend],
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    timing: TimingConfig | None,
    rotate_bytes: int | None,
    perplexity_texts: Sequence[str] | None,
    seed: int,
    progress: bool,
    model_loader: ModelLoader | None,
) -> pd.DataFrame:
    """The rows of `run_benchmarks`, before the columns computed across rows."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    timing = timing or TimingConfig()
    if rotate_bytes is None:
        rotate_bytes = 4 * torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0

    unavailable = {b.id: b.unavailable_reason(device) for b in backends}
    for backend_id, reason in unavailable.items():
        if reason:
            logger.warning("backend %s not run: %s", backend_id, reason)

    rows: list[dict[str, Any]] = []
    linear = [w for w in workloads if isinstance(w, LinearWorkload)]
    models = [w for w in workloads if isinstance(w, ModelWorkload)]
    quant = [w for w in workloads if isinstance(w, QuantWorkload)]
    linear_backends = [b for b in backends if b.kind == "linear"]
    quant_backends = [b for b in backends if b.kind == "quant"]
    total = (len(linear) + len(models)) * len(linear_backends) + len(quant) * len(quant_backends)
    with tqdm(total=total, desc="fp8kit.bench", unit="row", disable=not progress) as bar:
        if quant and quant_backends:
            rows += _run_quant_group(quant, quant_backends, unavailable, device, dtype, timing, seed, bar)
        if linear_backends:
            for (n, k), group in groupby(sorted(linear, key=lambda w: (w.n, w.k, w.m)), key=lambda w: (w.n, w.k)):
                rows += _run_linear_group(
                    n, k, list(group), linear_backends, unavailable, device, dtype, timing, rotate_bytes, seed, bar
                )
            for spec, group in groupby(sorted(models, key=lambda w: (w.spec, w.m)), key=lambda w: w.spec):
                rows += _run_model_group(
                    spec, list(group), linear_backends, unavailable, device, dtype, timing, perplexity_texts, seed,
                    bar, model_loader or load_bench_model,
                )
    return make_frame(rows)


def _base_row(workload: Workload, backend: Backend, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    is_linear = isinstance(workload, LinearWorkload)
    if is_linear:
        shape = f"{workload.m}x{workload.n}x{workload.k}"
    elif isinstance(workload, QuantWorkload):
        shape = f"{workload.m}x{workload.k}"
    else:
        shape = f"{workload.batch}x{workload.seq_len}"
    return {
        "workload": workload.label,
        "backend": backend.id,
        "dtype": backend.dtype_label(dtype),
        "M": workload.m,
        "N": workload.n if is_linear else None,
        "K": workload.k if isinstance(workload, (LinearWorkload, QuantWorkload)) else None,
        "device": str(backend.run_device(device)),
        "compiled": backend.compiled,
        "shape": shape,
        "target": workload.target,
        "impl": backend.impl(backend.run_device(device)),
    }


def _run_linear_group(
    n: int,
    k: int,
    group: list[LinearWorkload],
    backends: Sequence[Backend],
    unavailable: dict[str, str | None],
    device: torch.device,
    dtype: torch.dtype,
    timing: TimingConfig,
    rotate_bytes: int,
    seed: int,
    bar: tqdm,
) -> list[dict[str, Any]]:
    """Every M of one (N, K) for every backend: weights are made once and rotated."""
    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + n * 131 + k)
    copies = {
        b.id: max(1, math.ceil(rotate_bytes / b.weight_bytes(n, k, dtype))) if rotate_bytes else 1 for b in backends
    }
    available = [b for b in backends if not unavailable[b.id]]
    n_hp = max((copies[b.id] for b in available), default=1)
    # Distinct weights W_i [N,K] ~ N(0, 1/K) in the run dtype (made on CPU with a seeded generator).
    weights_hp = [
        (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(device=device, dtype=dtype) for _ in range(n_hp)
    ]
    calib_x = torch.randn(512, k, generator=gen).to(device=device, dtype=dtype)  # (512, K) calibration rows
    inputs = {w.m: torch.randn(w.m, k, generator=gen).to(device=device, dtype=dtype) for w in group}  # (M, K)
    refs = {m: (x.double() @ weights_hp[0].double().T) for m, x in inputs.items()}  # (M, N) float64 reference

    for backend in backends:
        reason = unavailable[backend.id]
        fns: list[Callable[[torch.Tensor], torch.Tensor]] = []
        build_error: str | None = None
        setup_s = float("nan")
        if not reason:
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    fns = [backend.build_linear(w, calib_x) for w in weights_hp[: copies[backend.id]]]
            except Exception as exc:  # noqa: BLE001 - one failing backend must not stop the run
                logger.exception("backend %s failed to build %dx%d", backend.id, n, k)
                build_error = error_status(exc)
            setup_s = time.perf_counter() - start
        for workload in group:
            row = _base_row(workload, backend, dtype, device)
            skip = reason or build_error or backend.workload_skip_reason(workload.m, n, k)
            if skip:
                row["status"] = _not_run(skip)
            else:
                row["weight_bytes"] = backend.weight_bytes(n, k, dtype)
                row["weight_copies"] = len(fns)
                row.update(_measure_linear(backend, fns, inputs[workload.m], refs[workload.m], workload, device, dtype, timing))
                row["setup_s"] = setup_s
                setup_s = 0.0  # only the first M of a group carries the build / first-compile time
            rows.append(row)
            bar.update(1)
        del fns
        if hasattr(backend, "release"):
            backend.release()
        free_memory(device)
    del weights_hp, inputs, refs
    free_memory(device)
    return rows


def _measure_linear(
    backend: Backend,
    fns: list[Callable[[torch.Tensor], torch.Tensor]],
    x_hp: torch.Tensor,
    ref: torch.Tensor,
    workload: LinearWorkload,
    device: torch.device,
    dtype: torch.dtype,
    timing: TimingConfig,
) -> dict[str, Any]:
    m, n, k = workload.m, workload.n, workload.k
    x_raw = x_hp.to(backend.activation_dtype(dtype))
    try:
        with torch.no_grad():
            x = backend.prepare_input(x_raw)  # x itself, or a pre-quantized input (scaled-mm)
            first = time.perf_counter()
            out = fns[0](x)  # first call: compilation for compiled backends
            sync(device)
            first_call_s = time.perf_counter() - first
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out = fns[0](x)  # (M, N)
            sync(device)
            peak = (
                (torch.cuda.max_memory_allocated(device) - before + backend.weight_bytes(n, k, dtype) + x_raw.nbytes) / 2**20
                if device.type == "cuda"
                else float("nan")
            )
            if out.shape != (m, n):
                raise RuntimeError(f"backend returned shape {tuple(out.shape)}, expected {(m, n)}")
            poisoned = not bool(torch.isfinite(out).all())
            rel = metrics.rel_error(out, ref)
            sqnr = metrics.sqnr_db(out, ref)
            del out
            calls = [lambda f=f: f(x) for f in fns]
            times = time_cuda_graph(calls, device, timing) if backend.cuda_graph else time_calls(calls, device, timing)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        logger.exception("backend %s failed on %dx%dx%d", backend.id, m, n, k)
        return {"status": error_status(exc)}
    stats = metrics.latency_stats(times)
    median = stats["latency_ms_median"]
    in_b, w_b, out_b = backend.element_bytes(dtype)
    moved = metrics.linear_bytes(m, n, k, input_bytes=in_b, weight_bytes=w_b, output_bytes=out_b)
    return {
        **stats,
        "tflops": metrics.tflops(metrics.linear_flops(m, n, k), median),
        "gbps": metrics.gbps(moved, median),
        "bytes_moved": moved,
        "rel_error": rel,
        "sqnr_db": sqnr,
        "peak_mem_mb": peak,
        "first_call_s": first_call_s,
        "status": "ok" if not poisoned else "ok (non-finite outputs)",
    }


_GRAPH_QUANT_CALLS = 10  # quantization calls captured per CUDA graph (per-call time = replay / 10)


def _run_quant_group(
    group: list[QuantWorkload],
    backends: Sequence[Backend],
    unavailable: dict[str, str | None],
    device: torch.device,
    dtype: torch.dtype,
    timing: TimingConfig,
    seed: int,
    bar: tqdm,
) -> list[dict[str, Any]]:
    """Every quantization backend on one random activation x [M,K] per workload (not rotated: an
    8192 x 8192 bf16 x is 128 MB, over the L2; decode sizes are launch-bound by nature)."""
    from fp8kit.core.scaling import tensor_scale

    rows: list[dict[str, Any]] = []
    for workload in sorted(group, key=lambda w: (w.k, w.m)):
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + workload.m * 131 + workload.k)
        x = torch.randn(workload.m, workload.k, generator=gen).to(device=device, dtype=dtype)  # (M, K)
        static_scale = tensor_scale(x)  # () calibrated on x itself: no clipping
        x64 = x.double()  # (M, K) reference
        for backend in backends:
            row = _base_row(workload, backend, dtype, device)
            reason = unavailable[backend.id]
            if reason:
                row["status"] = _not_run(reason)
            else:
                try:
                    start = time.perf_counter()
                    fn = backend.build_quant(static_scale)  # type: ignore[attr-defined]
                    row["setup_s"] = time.perf_counter() - start  # compilation shows in first_call_s
                    row["bytes_moved"] = backend.quant_bytes(workload.m, workload.k, dtype)  # type: ignore[attr-defined]
                    row.update(_measure_quant(backend, fn, x, x64, static_scale, device, timing))
                except Exception as exc:  # noqa: BLE001 - one failing backend must not stop the run
                    logger.exception("backend %s failed on %s", backend.id, workload.label)
                    row["status"] = error_status(exc)
            rows.append(row)
            bar.update(1)
        del x, x64
        free_memory(device)
    return rows


def _expected_scale(backend: Backend, x64: torch.Tensor, static_scale: torch.Tensor) -> torch.Tensor | None:
    """The scale a quantization backend must return for x (float64), None for a copy."""
    activation = getattr(getattr(backend, "inner", backend), "activation", "none")
    granularity = _granularity(backend)
    if activation == "static":
        return static_scale.double()
    if activation != "dynamic":
        return None
    if granularity == "group":  # one per 1 x 128 group along K: [M, ceil(K / 128)]
        amax = torch.stack([g.abs().amax(dim=-1) for g in x64.split(128, dim=-1)], dim=-1)
    else:
        amax = x64.abs().amax(dim=-1, keepdim=True) if granularity == "token" else x64.abs().amax()
    return amax.clamp(min=1e-12) / 448.0


def _granularity(backend: Backend) -> str:
    """The activation granularity a quantization backend computes ("none" for a copy)."""
    return getattr(getattr(backend, "inner", backend), "granularity", "none")


def _measure_quant(
    backend: Backend,
    fn: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    x64: torch.Tensor,
    static_scale: torch.Tensor,
    device: torch.device,
    timing: TimingConfig,
) -> dict[str, Any]:
    """Check one quantization callable against float64 (dequantized values, scale) and time it."""
    m, k = x.shape
    with torch.no_grad():
        first = time.perf_counter()
        fn(x)  # first call: compilation / autotuning
        sync(device)
        first_call_s = time.perf_counter() - first
        out = fn(x)
        sync(device)
        expected = _expected_scale(backend, x64, static_scale)
        status = "ok"
        if expected is None:  # copy
            values = out
        else:
            q, scale = out
            if q.shape != (m, k) or q.dtype != torch.float8_e4m3fn:
                raise RuntimeError(f"returned {q.dtype} {tuple(q.shape)}, expected float8_e4m3fn {(m, k)}")
            scale64 = scale.double()
            if scale64.shape != expected.shape:
                raise RuntimeError(f"returned a scale of shape {tuple(scale.shape)}, expected {tuple(expected.shape)}")
            scale_err = ((scale64 - expected).abs() / expected).max().item()
            if not scale_err <= 1e-6:
                status = f"error: scale differs from amax / 448 by {scale_err:.2e} (relative)"
            if _granularity(backend) == "group":  # (M, K / 128) -> one per element
                scale64 = scale64.repeat_interleave(128, dim=-1)[:, :k]
            values = q.double() * scale64  # (M, K) dequantized
        if not bool(torch.isfinite(values).all()):
            status = "ok (non-finite outputs)" if status == "ok" else status
        rel = metrics.rel_error(values, x64)
        sqnr = metrics.sqnr_db(values, x64)
        del out, values
        if backend.cuda_graph:  # several calls per graph so the replay's own launch is amortized
            times = time_cuda_graph([lambda: fn(x)] * _GRAPH_QUANT_CALLS, device, timing)
        else:
            times = time_calls([lambda: fn(x)], device, timing)
    stats = metrics.latency_stats(times)
    moved = backend.quant_bytes(m, k, x.dtype)  # type: ignore[attr-defined]
    return {
        **stats,
        "gbps": metrics.gbps(moved, stats["latency_ms_median"]),
        "rel_error": rel,
        "sqnr_db": sqnr,
        "first_call_s": first_call_s,
        "status": status,
    }


def _model_flops(model: nn.Module, batch: int, seq_len: int) -> int:
    """2 * tokens * (weights of every Linear, lm_head included) + causal-free attention 4*B*S^2*H*L."""
    linear_params = sum(
        m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")
    )
    cfg = getattr(model, "config", None)
    attn = 0
    if cfg is not None and hasattr(cfg, "num_hidden_layers"):
        attn = 4 * batch * seq_len * seq_len * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
        attn *= cfg.num_hidden_layers
    return 2 * batch * seq_len * linear_params + attn


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _run_model_group(
    spec: str,
    group: list[ModelWorkload],
    backends: Sequence[Backend],
    unavailable: dict[str, str | None],
    device: torch.device,
    dtype: torch.dtype,
    timing: TimingConfig,
    perplexity_texts: Sequence[str] | None,
    seed: int,
    bar: tqdm,
    model_loader: ModelLoader,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        model, tokenizer = model_loader(spec, dtype, device)
    except Exception as exc:  # noqa: BLE001
        logger.exception("could not load model %s", spec)
        for workload in group:
            for backend in backends:
                row = _base_row(workload, backend, dtype, device)
                row["status"] = _not_run(f"model {spec!r} could not be loaded: {type(exc).__name__}: {exc}")
                rows.append(row)
                bar.update(1)
        return rows

    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(seed + 7)
    calibration: list[Any] = [torch.randint(0, vocab, (4, 256), generator=gen).to(device)]  # (4, 256) ids
    if tokenizer is not None:
        try:
            from fp8kit.core.data import calibration_batches, default_texts

            calibration = calibration_batches(tokenizer, default_texts()[0], num_samples=16, seq_len=256)
        except Exception:  # noqa: BLE001 - random ids still calibrate a static scale
            logger.warning("fp8kit.core.data unavailable: calibrating %s on random token ids", spec, exc_info=True)
    inputs = {w: _prefill_ids(w, tokenizer, perplexity_texts, vocab, gen).to(device) for w in group}
    # Reference logits: the model in fp32 (float64 is too slow for whole models).
    try:
        with torch.no_grad():
            ref_model = model if dtype == torch.float32 else cast_model(copy.deepcopy(model), torch.float32)
            refs = {w: ref_model(input_ids=ids).logits.float().cpu() for w, ids in inputs.items()}
            del ref_model
    except Exception as exc:  # noqa: BLE001
        logger.exception("reference forward of %s failed", spec)
        for workload in group:
            for backend in backends:
                row = _base_row(workload, backend, dtype, device)
                row["status"] = error_status(exc)
                rows.append(row)
                bar.update(1)
        return rows
    free_memory(device)

    for backend in backends:
        reason = unavailable[backend.id]
        built = None
        setup_s = float("nan")
        if not reason:
            start = time.perf_counter()
            try:
                built = backend.build_model(model, calibration)
            except NotImplementedError as exc:
                reason = str(exc)
            except Exception as exc:  # noqa: BLE001
                logger.exception("backend %s failed to prepare %s", backend.id, spec)
                reason = error_status(exc)
            setup_s = time.perf_counter() - start
        ppl: tuple[float, int] | None = None
        for workload in group:
            row = _base_row(workload, backend, dtype, device)
            if reason or built is None:
                row["status"] = _not_run(reason or "not built")
                rows.append(row)
                bar.update(1)
                continue
            row["weight_bytes"] = _model_bytes(built.module)
            row.update(_measure_model(built, backend.cuda_graph, inputs[workload], refs[workload], workload, device, timing))
            row["setup_s"] = setup_s
            setup_s = 0.0
            if tokenizer is not None and perplexity_texts and row["status"] == "ok":
                if ppl is None:
                    ppl = _perplexity(built.module, tokenizer, perplexity_texts)
                row["perplexity"], row["ppl_tokens"] = ppl
            rows.append(row)
            bar.update(1)
        del built
        free_memory(device)
    return rows


def _prefill_ids(
    workload: ModelWorkload, tokenizer: Any, texts: Sequence[str] | None, vocab: int, gen: torch.Generator
) -> torch.Tensor:
    """(batch, seq_len) token ids: real held-out text when a tokenizer and texts are given and long
    enough (top-1 agreement on random ids says little: their predictions are near-flat), else random."""
    if tokenizer is not None and texts:
        try:
            ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            need = workload.batch * workload.seq_len
            if ids.numel() >= need:
                return ids[:need].reshape(workload.batch, workload.seq_len)  # (B, S)
            logger.warning("held-out text has %d tokens < %d: timing on random ids", ids.numel(), need)
        except Exception:  # noqa: BLE001 - fall back to random ids
            logger.warning("could not tokenize the held-out text: timing on random ids", exc_info=True)
    return torch.randint(0, vocab, (workload.batch, workload.seq_len), generator=gen)  # (B, S)


def _perplexity(module: nn.Module, tokenizer: Any, texts: Sequence[str]) -> tuple[float, int]:
    from fp8kit.core.data import perplexity

    with torch.no_grad():
        value, n_tokens = perplexity(module, tokenizer, list(texts), seq_len=512)
    return float(value), int(n_tokens)


def _measure_model(
    built: Any, built_graph: bool, ids: torch.Tensor, ref_logits: torch.Tensor, workload: ModelWorkload, device: torch.device, timing: TimingConfig
) -> dict[str, Any]:
    try:
        with torch.no_grad():
            first = time.perf_counter()
            built.forward(input_ids=ids)
            sync(device)
            first_call_s = time.perf_counter() - first
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            logits = built.forward(input_ids=ids).logits  # (B, S, vocab)
            sync(device)
            peak = (
                (torch.cuda.max_memory_allocated(device) - before + _model_bytes(built.module)) / 2**20
                if device.type == "cuda"
                else float("nan")
            )
            logits = logits.float().cpu()
            rel = metrics.rel_error(logits, ref_logits)
            sqnr = metrics.sqnr_db(logits, ref_logits)
            top1 = metrics.top1_agreement(logits, ref_logits)
            del logits
            call = [lambda: built.forward(input_ids=ids)]
            times = time_cuda_graph(call, device, timing) if built_graph else time_calls(call, device, timing)
    except Exception as exc:  # noqa: BLE001
        logger.exception("model forward failed")
        return {"status": error_status(exc)}
    stats = metrics.latency_stats(times)
    return {
        **stats,
        "tflops": metrics.tflops(_model_flops(built.module, workload.batch, workload.seq_len), stats["latency_ms_median"]),
        "gbps": float("nan"),
        "rel_error": rel,
        "sqnr_db": sqnr,
        "top1_agreement": top1,
        "peak_mem_mb": peak,
        "first_call_s": first_call_s,
        "status": "ok",
    }
