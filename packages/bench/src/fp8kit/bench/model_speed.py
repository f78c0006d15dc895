"""Whole-model speed: bf16 vs fp8kit FP8 decoder stacks (prefill, decode eager and under CUDA graphs),
and the time / peak extra memory of quantizing an 8B-shaped set of weights already on the GPU.

Models (random weights, `transformers.LlamaConfig`, SDPA attention in bf16; by default every model,
the bf16 baseline and each FP8 copy alike, runs fp8kit's "fp8kit_sdpa_gqa" attention
(`fp8kit.core.graphs.use_gqa_attention`: transformers' "sdpa" without the `repeat_kv` copy of the KV
cache that the stock function makes whenever a mask is passed, e.g. every decode step); the rows'
``attention`` column names it, ``--stock-attention`` keeps transformers' "sdpa"):

- ``llama3-8b-stack``: Llama-3-8B layers (hidden 4096, MLP 14336, 32 heads / 8 KV heads of 128),
  `num_layers` of them (default 4), vocab 1024 so the embedding does not matter; a bare
  `LlamaModel` (no lm_head): outputs are the last hidden states.
- ``smollm2-arch``: SmolLM2-135M's architecture (30 layers, hidden 576, MLP 1536, 9 / 3 heads,
  vocab 49152, tied embeddings) as a `LlamaForCausalLM`; its lm_head stays bf16 (ignored by
  fp8kit's default config) and is part of every timing.

Workloads (one report row per backend, in `report.COLUMNS` + extra columns):

- ``model:<name>:prefill``: one eager forward of ``1 x prefill_len`` tokens, no KV cache
  (``-compiled`` backends: the same under `torch.compile`, opt-in).
- ``model:<name>:decode``: one decode step of ``decode_batch`` sequences (input [B,1]) over a
  `transformers.StaticCache` of ``cache_len`` slots filled to ``prompt_len``; eager, and ``-graph``
  rows replayed through `fp8kit.core.graphs.capture_decode_step` (the documented CUDA-graph path).
- ``quantize:llama3-8b-linears``: `fp8kit.core.quantize` over 32 layers' worth of Llama-3-8B
  Linear weights (bf16, on the device); latency = the whole quantize call, ``peak_mem_mb`` = peak
  allocated memory above the bf16 weights' footprint (the extra memory quantizing needs),
  ``layer_bf16_mb`` = one decoder layer's bf16 Linear weights (the target: peak extra <= one layer).

- ``model:<name>:generate`` / ``model:<name>:generate-eager`` (phase "generate", opt-in):
  `model.generate` of ``generate_tokens`` new tokens (greedy) for ``decode_batch`` prompts of
  ``prompt_len`` tokens with transformers' static cache (``cache_implementation="static"``), as a user
  calls it: "generate" with transformers' defaults (it compiles the static-cache decoding step itself
  where it does so; ``compiled_graphs`` counts the graphs dynamo made during warm-up), "generate-eager"
  with ``disable_compile=True`` (every FP8Linear called eagerly). ``tokens_per_s`` = batch x new tokens /
  median seconds per call. A bare-model preset (``llama3-8b-stack``) gets an lm_head for these rows
  (kept in bf16 by fp8kit's and torchao's default filters).

``--model-phases decode`` (``ModelSpeedConfig.phases``) runs the decode rows only (no prefill, no
float64 reference). Backends: fp8kit ids (``fp8-...``) and the torchao peers (``torchao-fp8-row`` /
``torchao-fp8-tensor``), without ``-compiled`` / ``-graph`` (the variants are rows of every backend).

Correctness in the same run: ``rel_error`` / ``sqnr_db`` against a float64 copy of the bf16 model
(prefill; where the device has room), ``rel_error_vs_bf16`` against the bf16 model's output, and
for ``-graph`` rows ``graph_max_abs_diff`` = max |graph replay - eager call| of the same model.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from fp8kit.core.config import QuantConfig
from fp8kit.core.errors import ConfigError
from fp8kit.core.surgery import quantize

from . import metrics
from .backends import FP8Backend, TorchaoBackend, dtype_name, get_backend
from .report import add_speedup, error_status, make_frame
from .timing import TimingConfig, free_memory, sync, time_calls
from .workloads import llama3_8b_stack_config, smollm2_arch_config

__all__ = [
    "MODEL_PRESETS",
    "FP8_MODEL_BACKENDS",
    "ModelSpeedConfig",
    "build_model",
    "quantized_copy",
    "llama3_8b_linear_shapes",
    "build_linear_stack",
    "measure_quantize",
    "run_model_speed",
    "add_cli_arguments",
    "run_cli",
]

logger = logging.getLogger(__name__)

#: FP8 schemes timed against bf16: dynamic per-token activations / per-channel weights, static
#: per-tensor, dynamic per-tensor; each with and without `use_fast_accum`.
FP8_MODEL_BACKENDS: tuple[str, ...] = (
    "fp8-dynamic-token",
    "fp8-dynamic-token-fastacc",
    "fp8-static-tensor",
    "fp8-static-tensor-fastacc",
    "fp8-dynamic-tensor",
    "fp8-dynamic-tensor-fastacc",
)
BASELINE = "torch-bf16"
PHASES: tuple[str, ...] = ("prefill", "decode", "generate")
DEFAULT_PHASES: tuple[str, ...] = ("prefill", "decode")


#: name -> (config factory taking num_layers or None, with_lm_head)
MODEL_PRESETS: dict[str, tuple[Callable[[int | None], Any], bool]] = {
    "llama3-8b-stack": (lambda n: llama3_8b_stack_config(n or 4), False),
    "smollm2-arch": (smollm2_arch_config, True),
}


@dataclass(frozen=True)
class ModelSpeedConfig:
    """Sizes of the model-speed workloads (defaults: the issue's targets)."""

    prefill_len: int = 2048  # tokens of the batch-1 prefill
    decode_batch: int = 8  # sequences per decode step
    prompt_len: int = 512  # tokens in the KV cache before the timed step
    cache_len: int = 1024  # StaticCache slots (the decode attention reads all of them, masked)
    num_layers: int | None = None  # None: 4 for llama3-8b-stack, 30 for smollm2-arch
    reference: bool = True  # float64 reference of the bf16 model's prefill
    compile_prefill: bool = False  # also time prefill under torch.compile (slow to compile)
    compile_decode: bool = False  # also time the decode step compiled (torch.compile) and graph-captured
    phases: tuple[str, ...] = DEFAULT_PHASES  # which of "prefill" / "decode" / "generate" to run
    gqa_attention: bool = True  # every model (bf16 and FP8) on fp8kit's "fp8kit_sdpa_gqa" attention
    generate_tokens: int = 64  # new tokens per `model.generate` call (phase "generate")
    generate_compile: bool = True  # also the "generate" rows (transformers may compile: slow to warm up)

    def __post_init__(self) -> None:
        if (
            min(self.prefill_len, self.decode_batch, self.prompt_len, self.generate_tokens) < 1
            or self.cache_len <= self.prompt_len
        ):
            raise ConfigError(
                f"ModelSpeedConfig: need positive sizes and cache_len > prompt_len, got {self}"
            )
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown or not self.phases:
            raise ConfigError(f"ModelSpeedConfig: phases {list(self.phases)}; choose from {', '.join(PHASES)}")


def build_model(config: Any, with_lm_head: bool, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random-weight `LlamaModel` (or `LlamaForCausalLM` when `with_lm_head`) on `device` in `dtype`, eval mode."""
    from transformers import LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    cls = LlamaForCausalLM if with_lm_head else LlamaModel
    with torch.device(device):
        model = cls(config)
    return model.to(dtype=dtype).eval()


def quantized_copy(model: nn.Module, backend_id: str, calibration: Sequence[Any]) -> tuple[nn.Module, QuantConfig | None]:
    """A deep copy of `model` quantized per the backend id: fp8kit (static scales calibrated on
    `calibration`, a list of input-id tensors; returns its QuantConfig) or a torchao peer (config None)."""
    backend = get_backend(backend_id)
    if isinstance(backend, TorchaoBackend) and not backend.compiled:
        return backend.build_model(model, list(calibration)).module, None
    if not isinstance(backend, FP8Backend):
        raise ConfigError(f"{backend_id!r} is not an fp8 or torchao backend id (e.g. {FP8_MODEL_BACKENDS[0]})")
    config = backend.config
    qmodel = copy.deepcopy(model)
    quantize(qmodel, config, list(calibration) if config.activation == "static" else None)
    return qmodel.eval(), config


# ---------------------------------------------------------------------------------------------
# Quantizing an 8B-shaped set of weights.


def llama3_8b_linear_shapes() -> tuple[tuple[str, int, int], ...]:
    """(qualified name in a layer, N, K) of the 7 Linear layers of one decoder layer of `llama3_8b_stack_config`."""
    config = llama3_8b_stack_config()
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    return (
        ("self_attn.q_proj", hidden, hidden),
        ("self_attn.k_proj", kv, hidden),
        ("self_attn.v_proj", kv, hidden),
        ("self_attn.o_proj", hidden, hidden),
        ("mlp.gate_proj", inter, hidden),
        ("mlp.up_proj", inter, hidden),
        ("mlp.down_proj", hidden, inter),
    )


def build_linear_stack(
    num_layers: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    shapes: Sequence[tuple[str, int, int]] | None = None,
    seed: int = 0,
) -> nn.Module:
    """`layers.<i>.self_attn.q_proj` ... bias-free `nn.Linear`s with N(0, 0.02^2) weights, built
    layer by layer directly on `device` in `dtype` (no second copy)."""
    shapes = shapes or llama3_8b_linear_shapes()
    gen = torch.Generator(device=device).manual_seed(seed)
    root = nn.Module()
    root.layers = nn.ModuleList()
    for _ in range(num_layers):
        layer = nn.Module()
        for qualified, n, k in shapes:
            parent = layer
            *path, leaf = qualified.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            linear = nn.Linear(k, n, bias=False, device="meta")
            weight = torch.randn(n, k, device=device, dtype=dtype, generator=gen)  # (N, K)
            weight.mul_(0.02)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            parent.add_module(leaf, linear)
        root.layers.append(layer)
    return root


def _linear_bytes(module: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules() if isinstance(m, nn.Linear))


def measure_quantize(model: nn.Module, config: QuantConfig, device: torch.device | str) -> dict[str, float]:
    """Quantize `model` in place, timed; returns seconds, bf16 bytes of its Linear weights, the bytes
    of its first layer (``model.layers[0]``), and the peak allocated bytes above the footprint at the
    start (CUDA only; NaN on other devices, whose allocators keep no peak)."""
    device = torch.device(device)
    model_bytes = _linear_bytes(model)
    layer_bytes = _linear_bytes(model.layers[0]) if hasattr(model, "layers") else model_bytes
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    quantize(model, config)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak_extra = float(torch.cuda.max_memory_allocated(device) - base) if cuda else float("nan")
    return {"seconds": seconds, "model_bytes": model_bytes, "layer_bytes": layer_bytes, "peak_extra_bytes": peak_extra}


# ---------------------------------------------------------------------------------------------
# Running the models.


def _cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _main_output(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


class _Decode:
    """A model's StaticCache filled with the prompt, and its eager decode step at `prompt_len`
    (`static_cache_decode_fn`; gqa_attention: switch an "sdpa" model to "fp8kit_sdpa_gqa")."""

    def __init__(
        self, model: nn.Module, prompt: torch.Tensor, step_ids: torch.Tensor, cache_len: int, gqa_attention: bool = True
    ) -> None:
        from transformers import StaticCache

        from fp8kit.core.graphs import static_cache_decode_fn

        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        with torch.no_grad():
            model(input_ids=prompt, use_cache=True, **{_cache_kwarg(model): self.cache})  # fills 0..P-1
        self.step = static_cache_decode_fn(model, self.cache, gqa_attention=gqa_attention)
        self.ids = step_ids  # (B, 1)
        self.position = torch.tensor([prompt.shape[1]], device=prompt.device)  # (1,)

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return self.step(self.ids, self.position)


def _timed(fn: Callable[[], Any], device: torch.device, timing: TimingConfig) -> dict[str, float]:
    with torch.no_grad():
        return metrics.latency_stats(time_calls([fn], device, timing))


def run_model_speed(
    models: Sequence[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    backends: Sequence[str] = FP8_MODEL_BACKENDS,
    sizes: ModelSpeedConfig | None = None,
    timing: TimingConfig | None = None,
    quantize_layers: int = 32,
    seed: int = 0,
    presets: dict[str, tuple[Callable[[int | None], Any], bool]] | None = None,
) -> pd.DataFrame:
    """Rows for every model in `models` (keys of MODEL_PRESETS) x {torch-bf16} + `backends`, plus
    the quantizing rows when `quantize_layers` > 0 (32 layers of Llama-3-8B Linear weights).

    Speedups are against ``torch-bf16`` run the same way (``-graph`` rows against ``torch-bf16-graph``,
    ``-compiled`` against ``torch-bf16-compiled``, ``-compiled-graph`` against ``torch-bf16-compiled-graph``).
    Pairs that cannot run (CUDA graphs on CPU, say) are rows whose status says why.
    presets: name -> (config factory, with_lm_head) replacing MODEL_PRESETS (tests use tiny ones).
    """
    presets = MODEL_PRESETS if presets is None else presets
    device = torch.device(device) if device is not None else (
        torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    )
    sizes = sizes or ModelSpeedConfig()
    timing = timing or TimingConfig()
    unknown = [m for m in models if m not in presets]
    if unknown:
        raise ConfigError(f"--models: unknown {unknown}; choose from {', '.join(presets)}")
    for backend_id in backends:
        if not isinstance(get_backend(backend_id), (FP8Backend, TorchaoBackend)) or backend_id.endswith("-compiled"):
            raise ConfigError(f"model speed backends are fp8 / torchao ids without -compiled / -graph, got {backend_id!r}")
    rows: list[dict[str, Any]] = []
    for name in models:
        factory, with_lm_head = presets[name]
        if "prefill" in sizes.phases or "decode" in sizes.phases:
            rows += _run_one_model(name, factory, with_lm_head, device, dtype, list(backends), sizes, timing, seed)
            free_memory(device)
        if "generate" in sizes.phases:
            rows += _generate_rows(name, factory, device, dtype, list(backends), sizes, timing, seed)
            free_memory(device)
    if quantize_layers > 0:
        rows += _quantize_rows(device, dtype, quantize_layers, seed)
        free_memory(device)
    return add_model_speedups(make_frame(rows))


def add_model_speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """`speedup_vs_baseline` of every row against the bf16 row of its workload run the same way
    (eager, ``-graph``, ``-compiled`` or ``-compiled-graph``)."""
    frame = add_speedup(frame, BASELINE)
    for suffix in ("-compiled", "-compiled-graph"):
        variant = frame["backend"].str.endswith(suffix)
        for workload in frame.loc[variant, "workload"].unique():
            same = variant & (frame["workload"] == workload)
            base_rows = frame[same & (frame["backend"] == f"{BASELINE}{suffix}") & (frame["status"] == "ok")]
            base_ms = float(base_rows["latency_ms_median"].iloc[0]) if len(base_rows) else float("nan")
            frame.loc[same, "speedup_vs_baseline"] = base_ms / frame.loc[same, "latency_ms_median"]
    return frame


def _base_row(
    workload: str, backend: str, dtype_label: str, m: int | None, shape: str, device: torch.device
) -> dict[str, Any]:
    return {
        "workload": workload,
        "backend": backend,
        "dtype": dtype_label,
        "M": m,
        "device": str(device),
        "compiled": backend.endswith("-compiled"),
        "shape": shape,
    }


def _base_model(
    config: Any, with_lm_head: bool, device: torch.device, dtype: torch.dtype, seed: int, sizes: ModelSpeedConfig
) -> nn.Module:
    """The bf16 model every backend copies; on fp8kit's GQA attention when `sizes.gqa_attention` (set before
    any copy, so bf16 and every FP8 copy run the same attention, without a KV-cache copy per layer)."""
    base = build_model(config, with_lm_head, device, dtype, seed)
    if sizes.gqa_attention:
        from fp8kit.core.graphs import use_gqa_attention

        use_gqa_attention(base)
    return base


def _run_one_model(
    name: str,
    factory: Callable[[int | None], Any],
    with_lm_head: bool,
    device: torch.device,
    dtype: torch.dtype,
    backends: list[str],
    sizes: ModelSpeedConfig,
    timing: TimingConfig,
    seed: int,
) -> list[dict[str, Any]]:
    config = factory(sizes.num_layers)
    base = _base_model(config, with_lm_head, device, dtype, seed, sizes)
    attention = base.config._attn_implementation
    vocab = config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    prefill_ids = torch.randint(0, vocab, (1, sizes.prefill_len), generator=gen).to(device)  # (1, S)
    prompt = torch.randint(0, vocab, (sizes.decode_batch, sizes.prompt_len), generator=gen).to(device)  # (B, P)
    step_ids = torch.randint(0, vocab, (sizes.decode_batch, 1), generator=gen).to(device)  # (B, 1)
    calibration = [torch.randint(0, vocab, (1, 512), generator=gen).to(device)]  # static scales
    linear_params = sum(m.weight.numel() for n, m in base.named_modules() if isinstance(m, nn.Linear))
    kv_bytes = (
        2 * config.num_hidden_layers * sizes.decode_batch * sizes.cache_len
        * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * torch.finfo(dtype).bits // 8
    )  # K and V of every layer, read once by the decode attention
    prefill_label, decode_label = f"model:{name}:prefill", f"model:{name}:decode"
    prefill_shape = f"1x{sizes.prefill_len}"
    decode_shape = f"{sizes.decode_batch}x1 (cache {sizes.prompt_len}/{sizes.cache_len})"

    ref64 = None
    if sizes.reference and "prefill" in sizes.phases:
        try:
            with torch.no_grad():
                ref_model = copy.deepcopy(base).to(torch.float64)
                ref64 = _main_output(ref_model(input_ids=prefill_ids, use_cache=False)).cpu()
            del ref_model
        except Exception:  # noqa: BLE001 - the reference is optional (memory)
            logger.warning("float64 reference of %s failed; rel_error left empty", name, exc_info=True)
        free_memory(device)

    baseline_out: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    for backend_id in [BASELINE] + backends:
        label = dtype_name(dtype) if backend_id == BASELINE else f"fp8-e4m3/{dtype_name(dtype)}"
        variant_rows = {
            "prefill": _base_row(prefill_label, backend_id, label, sizes.prefill_len, prefill_shape, device),
            "decode": _base_row(decode_label, backend_id, label, sizes.decode_batch, decode_shape, device),
            "graph": _base_row(decode_label, backend_id + "-graph", label, sizes.decode_batch, decode_shape, device),
            "prefill_graph": _base_row(
                prefill_label, backend_id + "-graph", label, sizes.prefill_len, prefill_shape, device
            ),
        }
        if sizes.compile_decode:
            variant_rows["compiled_graph"] = _base_row(
                decode_label, backend_id + "-compiled-graph", label, sizes.decode_batch, decode_shape, device
            )
        if sizes.compile_prefill:
            variant_rows["compiled"] = _base_row(
                prefill_label, backend_id + "-compiled", label, sizes.prefill_len, prefill_shape, device
            )
        reason = _unavailable(backend_id, device)
        try:
            if reason is not None:
                raise _NotRun(reason)
            start = time.perf_counter()
            if backend_id == BASELINE:
                model = base
            else:
                model, _ = quantized_copy(base, backend_id, calibration)
            sync(device)
            setup_s = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001
            if reason is None:
                logger.exception("could not quantize %s for %s", name, backend_id)
            status = f"not run: {reason}" if reason is not None else error_status(exc)
            rows.extend({**row, "status": status} for key, row in variant_rows.items() if _phase(key) in sizes.phases)
            continue
        weight_bytes = sum(
            t.numel() * t.element_size()
            for mod in model.modules()
            if type(mod).__name__ in ("Linear", "FP8Linear")
            for t in (mod.weight,)
        )
        for row in variant_rows.values():
            row.update(weight_bytes=weight_bytes, setup_s=setup_s, cache_len=sizes.cache_len, attention=attention)

        if "prefill" in sizes.phases:
            # Prefill, eager.
            row = variant_rows["prefill"]
            try:
                with torch.no_grad():
                    out = _main_output(model(input_ids=prefill_ids, use_cache=False)).float()
                row.update(_timed(lambda: model(input_ids=prefill_ids, use_cache=False), device, timing))
                row["tflops"] = metrics.tflops(2 * sizes.prefill_len * linear_params, row["latency_ms_median"])
                _accuracy(row, out, ref64, baseline_out.get("prefill"))
                row["status"] = "ok"
                if backend_id == BASELINE:
                    baseline_out["prefill"] = out
                del out
            except Exception as exc:  # noqa: BLE001
                logger.exception("prefill of %s / %s failed", name, backend_id)
                row["status"] = error_status(exc)

            # Prefill, replayed as a CUDA graph (static shape 1 x prefill_len; no host launch overhead).
            row = variant_rows["prefill_graph"]
            if variant_rows["prefill"]["status"] != "ok":
                row["status"] = "not run: the eager prefill failed"
            else:
                def prefill(ids: torch.Tensor) -> torch.Tensor:
                    return _main_output(model(input_ids=ids, use_cache=False))

                row.update(
                    _graph_row(prefill, (prefill_ids,), [], lambda: prefill(prefill_ids), device, timing,
                               baseline_out.get("prefill"), ref64)
                )
                if row.get("latency_ms_median") is not None:
                    row["tflops"] = metrics.tflops(2 * sizes.prefill_len * linear_params, row["latency_ms_median"])

            if "compiled" in variant_rows:
                row = variant_rows["compiled"]
                try:
                    compiled = torch.compile(model, dynamic=False)
                    first = time.perf_counter()
                    with torch.no_grad():
                        out = _main_output(compiled(input_ids=prefill_ids, use_cache=False)).float()
                    row["first_call_s"] = time.perf_counter() - first
                    row.update(_timed(lambda: compiled(input_ids=prefill_ids, use_cache=False), device, timing))
                    row["tflops"] = metrics.tflops(2 * sizes.prefill_len * linear_params, row["latency_ms_median"])
                    _accuracy(row, out, ref64, baseline_out.get("prefill"))
                    row["status"] = "ok"
                    del out, compiled
                except Exception as exc:  # noqa: BLE001
                    logger.exception("compiled prefill of %s / %s failed", name, backend_id)
                    row["status"] = error_status(exc)

        decode = None
        if "decode" in sizes.phases:
            # Decode, eager then CUDA graph, over the same static cache.
            row = variant_rows["decode"]
            try:
                decode = _Decode(model, prompt, step_ids, sizes.cache_len, sizes.gqa_attention)
                eager_out = decode().float().clone()  # (B, 1, vocab or hidden)
                row.update(_timed(decode, device, timing))
                row["gbps"] = metrics.gbps(weight_bytes + kv_bytes, row["latency_ms_median"])
                row["tflops"] = metrics.tflops(2 * sizes.decode_batch * linear_params, row["latency_ms_median"])
                _accuracy(row, eager_out, None, baseline_out.get("decode"))
                row["status"] = "ok"
                if backend_id == BASELINE:
                    baseline_out["decode"] = eager_out
            except Exception as exc:  # noqa: BLE001
                logger.exception("eager decode of %s / %s failed", name, backend_id)
                row["status"] = error_status(exc)

            row = variant_rows["graph"]
            if decode is None or variant_rows["decode"]["status"] != "ok":
                row["status"] = "not run: the eager decode step failed"
            else:
                row.update(
                    _graph_row(decode.step, (decode.ids, decode.position), _cache_counters(decode.cache), decode,
                               device, timing, baseline_out.get("decode"))
                )
            if "compiled_graph" in variant_rows:
                row = variant_rows["compiled_graph"]
                if decode is None or variant_rows["decode"]["status"] != "ok":
                    row["status"] = "not run: the eager decode step failed"
                else:
                    # torch.compile fuses the decoder's elementwise ops (RMSNorm, RoPE, SiLU, residuals);
                    # the first warm-up call compiles (first_call_s includes it).
                    compiled_step = torch.compile(decode.step, dynamic=False)
                    row.update(
                        _graph_row(compiled_step, (decode.ids, decode.position), _cache_counters(decode.cache), decode,
                                   device, timing, baseline_out.get("decode"))
                    )
                    del compiled_step
            for key in ("graph", "compiled_graph"):
                row = variant_rows.get(key, {})
                if row.get("latency_ms_median") is not None:
                    row["gbps"] = metrics.gbps(weight_bytes + kv_bytes, row["latency_ms_median"])
                    row["tflops"] = metrics.tflops(2 * sizes.decode_batch * linear_params, row["latency_ms_median"])
        rows.extend(row for key, row in variant_rows.items() if _phase(key) in sizes.phases)
        del decode
        if model is not base:
            del model
        free_memory(device)
    del base
    return rows


class _NotRun(Exception):
    """A backend that cannot run on this device (its rows say why)."""


def _unavailable(backend_id: str, device: torch.device) -> str | None:
    return None if backend_id == BASELINE else get_backend(backend_id).unavailable_reason(device)


def _generate_rows(
    name: str,
    factory: Callable[[int | None], Any],
    device: torch.device,
    dtype: torch.dtype,
    backends: list[str],
    sizes: ModelSpeedConfig,
    timing: TimingConfig,
    seed: int,
) -> list[dict[str, Any]]:
    """`model.generate` rows (see the module docstring): tokens / s with transformers' static cache."""
    import torch._dynamo

    config = factory(sizes.num_layers)
    base = _base_model(config, True, device, dtype, seed, sizes)  # a causal LM: generate needs its lm_head
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    prompt = torch.randint(0, config.vocab_size, (sizes.decode_batch, sizes.prompt_len), generator=gen).to(device)
    calibration = [torch.randint(0, config.vocab_size, (1, 512), generator=gen).to(device)]
    new_tokens = sizes.generate_tokens
    shape = f"{sizes.decode_batch}x{sizes.prompt_len}+{new_tokens}"
    baseline_ids: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    for backend_id in [BASELINE] + backends:
        label = dtype_name(dtype) if backend_id == BASELINE else f"fp8-e4m3/{dtype_name(dtype)}"
        reason = _unavailable(backend_id, device)
        try:
            if reason is not None:
                raise _NotRun(reason)
            model = base if backend_id == BASELINE else quantized_copy(base, backend_id, calibration)[0]
        except Exception as exc:  # noqa: BLE001
            if reason is None:
                logger.exception("could not quantize %s for %s", name, backend_id)
            status = f"not run: {reason}" if reason is not None else error_status(exc)
            for variant in ("generate", "generate-eager") if sizes.generate_compile else ("generate-eager",):
                rows.append({**_base_row(f"model:{name}:{variant}", backend_id, label, sizes.decode_batch, shape, device),
                             "status": status})  # fmt: skip
            continue
        variants = (("generate", False), ("generate-eager", True)) if sizes.generate_compile else (("generate-eager", True),)
        for variant, disable_compile in variants:
            row = _base_row(f"model:{name}:{variant}", backend_id, label, sizes.decode_batch, shape, device)
            kwargs = dict(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, cache_implementation="static", pad_token_id=0,
                disable_compile=disable_compile,
            )  # fmt: skip
            try:
                torch._dynamo.reset()
                graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                first = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(**kwargs)  # warm-up (transformers may compile here)
                sync(device)
                row["first_call_s"] = time.perf_counter() - first
                row["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
                seconds = []
                for _ in range(max(2, min(timing.min_runs, 5))):
                    start = time.perf_counter()
                    with torch.no_grad():
                        model.generate(**kwargs)
                    sync(device)
                    seconds.append(time.perf_counter() - start)
                row.update(metrics.latency_stats([s * 1e3 for s in seconds]))
                row["tokens_per_s"] = sizes.decode_batch * new_tokens / (row["latency_ms_median"] / 1e3)
                generated = out[:, sizes.prompt_len :]
                if backend_id == BASELINE:
                    baseline_ids[variant] = generated
                elif variant in baseline_ids:  # how many greedy tokens agree with bf16's (random weights)
                    row["token_agreement_vs_bf16"] = float((generated == baseline_ids[variant]).float().mean().item())
                row["status"] = "ok"
            except Exception as exc:  # noqa: BLE001
                logger.exception("%s of %s / %s failed", variant, name, backend_id)
                row["status"] = error_status(exc)
            rows.append(row)
        if model is not base:
            del model
        torch._dynamo.reset()
        free_memory(device)
    del base
    return rows


def _phase(variant: str) -> str:
    """"prefill" / "prefill_graph" / "compiled" -> prefill; "decode" / "graph" / "compiled_graph" -> decode."""
    return "prefill" if variant in ("prefill", "prefill_graph", "compiled") else "decode"


def _graph_row(
    fn: Callable[..., torch.Tensor],
    args: tuple[torch.Tensor, ...],
    restore: list[torch.Tensor],
    eager: Callable[[], torch.Tensor],
    device: torch.device,
    timing: TimingConfig,
    baseline: torch.Tensor | None,
    ref64: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Capture `fn(*args)` with `fp8kit.core.graphs.CUDAGraphRunner`, time its replays, and compare
    one replay with the eager call `eager()` of the same model (graph_max_abs_diff)."""
    from fp8kit.core.graphs import CUDAGraphRunner, GraphCaptureError

    if device.type != "cuda":
        return {"status": f"not run: CUDA graphs need a CUDA GPU; this run is on {device.type}"}
    try:
        start = time.perf_counter()
        runner = CUDAGraphRunner(fn, *args, restore=restore)
        capture_s = time.perf_counter() - start
    except GraphCaptureError as exc:
        text = str(exc)
        if "CUDA graphs need a CUDA GPU" in text:
            return {"status": "not run: " + text}
        logger.exception("capture failed")
        return {"status": error_status(exc)}
    try:
        with torch.no_grad():
            graph_out = runner(*args).float().clone()
            eager_out = eager().float()
        row: dict[str, Any] = _timed(runner.replay, device, timing)
        row["first_call_s"] = capture_s
        row["graph_max_abs_diff"] = float((graph_out - eager_out).abs().max().item())
        row["graph_bitwise_equal"] = bool(torch.equal(graph_out, eager_out))
        _accuracy(row, graph_out, ref64, baseline)
        row["status"] = "ok"
        return row
    except Exception as exc:  # noqa: BLE001
        logger.exception("graph replay failed")
        return {"status": error_status(exc)}
    finally:
        del runner


def _cache_counters(cache: Any) -> list[torch.Tensor]:
    return [
        layer.cumulative_length
        for layer in getattr(cache, "layers", None) or []
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
        and layer.cumulative_length.device.type == "cuda"
    ]


def _accuracy(row: dict[str, Any], out: torch.Tensor, ref64: torch.Tensor | None, baseline: torch.Tensor | None) -> None:
    if ref64 is not None:
        row["rel_error"] = metrics.rel_error(out.cpu(), ref64)
        row["sqnr_db"] = metrics.sqnr_db(out.cpu(), ref64)
    if baseline is not None:
        row["rel_error_vs_bf16"] = metrics.rel_error(out, baseline)


def _quantize_rows(device: torch.device, dtype: torch.dtype, num_layers: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for backend_id in ("fp8-dynamic-tensor", "fp8-dynamic-token"):
        config = get_backend(backend_id).config  # type: ignore[attr-defined]
        row = _base_row(
            "quantize:llama3-8b-linears", backend_id, f"fp8-e4m3/{dtype_name(dtype)}", None, f"{num_layers} layers", device
        )
        try:
            # Warm-up on 1 layer (kernel compilation / cuBLAS init stay out of the number).
            warm = build_linear_stack(1, device, dtype, seed=seed)
            start = time.perf_counter()
            measure_quantize(warm, config, device)
            row["first_call_s"] = time.perf_counter() - start
            del warm
            free_memory(device)
            model = build_linear_stack(num_layers, device, dtype, seed=seed)
            result = measure_quantize(model, config, device)
            del model
            row.update(
                runs=1,
                latency_ms_median=result["seconds"] * 1e3,
                weight_bytes=result["model_bytes"],
                peak_mem_mb=result["peak_extra_bytes"] / 2**20,
                layer_bf16_mb=result["layer_bytes"] / 2**20,
                gbps=metrics.gbps(result["model_bytes"], result["seconds"] * 1e3),
                status="ok",
            )
        except Exception as exc:  # noqa: BLE001
            logger.exception("quantize timing failed")
            row["status"] = error_status(exc)
        rows.append(row)
        free_memory(device)
    return rows


# ---------------------------------------------------------------------------------------------
# CLI hooks (used by `python -m fp8kit.bench --models ...`).


def add_cli_arguments(parser: Any) -> None:
    """Add ``--models`` and its size options to the bench's argument parser."""
    parser.add_argument(
        "--models",
        default=None,
        help=f"whole-model speed: comma-separated presets ({', '.join(MODEL_PRESETS)}); bf16 vs FP8 prefill, "
        "decode (eager and CUDA graph) and quantizing time; writes its own report to --out (default: none)",
    )
    parser.add_argument("--model-layers", type=int, default=None, help="decoder layers of --models (default 4 / 30)")
    parser.add_argument("--quantize-layers", type=int, default=32, help="Llama-3-8B layers for the quantizing rows (0: skip; default 32)")
    parser.add_argument("--compile-prefill", action="store_true", help="also time --models prefill under torch.compile (default off)")
    parser.add_argument(
        "--compile-decode", action="store_true", help="also time the --models decode step compiled + CUDA graph (default off)"
    )
    parser.add_argument(
        "--model-phases",
        default=",".join(DEFAULT_PHASES),
        help="--models phases to run: prefill,decode (default) and/or generate (model.generate tokens/s, static cache)",
    )
    parser.add_argument("--decode-batch", type=int, default=8, help="--models: sequences per decode step / generate call (default 8)")
    parser.add_argument("--generate-tokens", type=int, default=64, help="--models: new tokens per model.generate call (default 64)")
    parser.add_argument(
        "--generate-eager-only", action="store_true", help="--models generate phase: only the disable_compile=True rows (default: both)"
    )
    parser.add_argument(
        "--stock-attention",
        action="store_true",
        help="--models on transformers' own \"sdpa\" attention (copies the KV cache per layer in decode) instead "
        "of fp8kit_sdpa_gqa; applies to bf16 and FP8 alike (default off)",
    )


def run_cli(args: Any, command: str) -> int:
    """Run `--models` from parsed arguments and write report.csv / report.md under ``args.out``."""
    from .report import environment_info, write_report

    device = torch.device(args.device) if args.device else None
    gpu = (device or torch.device("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    backends = FP8_MODEL_BACKENDS if not args.backends or args.backends in ("gpu", "cpu") else tuple(
        b.strip() for b in args.backends.split(",") if b.strip() and b.strip() != BASELINE
    )
    timing = TimingConfig(
        warmup=args.warmup if args.warmup is not None else (5 if gpu else 1),
        min_runs=args.min_runs if args.min_runs is not None else (10 if gpu else 2),
        max_runs=max(args.max_runs, args.min_runs or 1),
        budget_ms=args.budget_ms if args.budget_ms is not None else (200.0 if gpu else 50.0),
        clock=args.clock or "wall",
    )
    sizes = ModelSpeedConfig(
        num_layers=args.model_layers,
        compile_prefill=args.compile_prefill,
        compile_decode=args.compile_decode,
        phases=tuple(p.strip() for p in args.model_phases.split(",") if p.strip()),
        gqa_attention=not args.stock_attention,
        decode_batch=args.decode_batch,
        generate_tokens=args.generate_tokens,
        generate_compile=not args.generate_eager_only,
    )
    frame = run_model_speed(
        models, device=device, backends=backends, sizes=sizes, timing=timing, quantize_layers=args.quantize_layers
    )
    written = write_report(
        frame, args.out, env=environment_info(timing.clock), command=command, title="fp8kit.bench whole-model speed"
    )
    ok = int((frame["status"] == "ok").sum())
    print(f"{ok}/{len(frame)} rows ran; report: {written['markdown']} {written['csv']}")
    return 0


def summary_table(frame: pd.DataFrame) -> str:
    """A short plain-text table of the rows: workload, backend, median ms, speedup, errors, status."""
    table = pd.DataFrame({
        "workload": frame["workload"].str.replace("model:", "", regex=False),
        "backend": frame["backend"],
        "ms": frame["latency_ms_median"],
        "speedup": frame["speedup_vs_baseline"],
        "GB/s": frame["gbps"],
        "err_f64": frame["rel_error"],
        "err_bf16": frame.get("rel_error_vs_bf16", pd.Series(float("nan"), index=frame.index)),
        "graph_diff": frame.get("graph_max_abs_diff", pd.Series(float("nan"), index=frame.index)),
        "peak_MiB": frame["peak_mem_mb"],
        "status": frame["status"].str.slice(0, 40),
    })
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        return table.to_string(index=False, float_format=lambda v: "" if math.isnan(v) else f"{v:.4g}")
