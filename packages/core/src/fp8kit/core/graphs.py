"""CUDA graphs for inference: capture a callable once, replay it with new inputs of the same shapes.

At decode sizes a transformer step is hundreds of small kernels, and the host's launch overhead,
not the GPU, sets the speed (an FP8 linear adds its activation-quantization launches on top). A
CUDA graph records the kernels once and replays them with one launch. `CUDAGraphRunner` is the
user-facing way to do that with fp8kit models:

    runner = CUDAGraphRunner(model, example_x)      # warm-up on a side stream, then capture
    y = runner(x)                                    # copies x into the static input, replays

Rules of a captured graph (they are what CUDA graphs are, not fp8kit choices):

- Static shapes: every tensor input keeps the shape, dtype and (CUDA) device it was captured with,
  and every non-tensor argument keeps its value. A different shape is a `GraphCaptureError` that
  says so: capture one runner per shape (e.g. one per decode batch size; share memory between them
  with ``pool=torch.cuda.graph_pool_handle()``).
- Static addresses: the graph reads its inputs from the runner's own buffers (new inputs are copied
  in) and the module's weights where they live (FP8Linear keeps its FP8 weight and scales as
  buffers, so they stay put). Do not replace a parameter / buffer tensor after capture; in-place
  updates (``.copy_``) are seen by the next replay.
- Outputs are the runner's static buffers, overwritten by the next call: ``.clone()`` what you keep.
- Nothing in the captured region may wait for the host: ``.item()``, ``.cpu()``, printing a tensor,
  or a Python branch on a tensor's value fails the capture with a `GraphCaptureError`. fp8kit's
  FP8Linear forward has none (its scales are computed on the device).
- Warm-up runs the callable ``warmup`` times eagerly before capture, so in-place state (a KV
  cache) is written by those calls; pass such state tensors as ``restore=`` to have them put back
  after capture.

For Hugging Face decoders with a static KV cache, `static_cache_decode_fn` gives a decode step
``step(input_ids [B,1], cache_position [1]) -> logits [B,1,vocab]`` that is capturable (it builds
its own attention mask on the device, so nothing syncs), and `capture_decode_step` captures it.

Grouped-query attention without copying the KV cache: transformers' "sdpa" attention expands the
keys / values of every layer to all query heads (`repeat_kv`, a copy of the whole cache per layer
and step) whenever a mask is passed. `sdpa_gqa_attention` (registered as "fp8kit_sdpa_gqa" by
`register_gqa_attention`, switched on by `use_gqa_attention`) folds the G = Hq / Hkv query heads of
each KV head into the query-length axis instead and calls SDPA on the unexpanded cache; the decode
step uses it by default (``gqa_attention=False`` keeps the model's own).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import GraphCaptureError

__all__ = [
    "GraphCaptureError",
    "CUDAGraphRunner",
    "capture",
    "static_cache_decode_fn",
    "capture_decode_step",
    "GQA_SDPA",
    "sdpa_gqa_attention",
    "register_gqa_attention",
    "use_gqa_attention",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Input structure: (nested) tuples / lists / dicts of tensors and plain values.


def _flatten(obj: Any, path: str, out: list[tuple[str, Any]]) -> Any:
    """Replace every tensor in `obj` (tuples, lists, dicts recursed) by a placeholder index; the
    leaves go to `out` as (path, tensor). Returns the structure with placeholders."""
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        return _Slot(len(out) - 1)
    if isinstance(obj, (tuple, list)):
        items = [_flatten(v, f"{path}[{i}]", out) for i, v in enumerate(obj)]
        return type(obj)(items) if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        return {k: _flatten(v, f"{path}[{k!r}]", out) for k, v in obj.items()}
    return obj


def _unflatten(structure: Any, tensors: Sequence[torch.Tensor]) -> Any:
    if isinstance(structure, _Slot):
        return tensors[structure.index]
    if isinstance(structure, (tuple, list)):
        items = [_unflatten(v, tensors) for v in structure]
        return items if isinstance(structure, list) else tuple(items)
    if isinstance(structure, dict):
        return {k: _unflatten(v, tensors) for k, v in structure.items()}
    return structure


class _Slot:
    """Placeholder for the i-th tensor input in a flattened structure."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Slot) and other.index == self.index

    def __repr__(self) -> str:
        return f"<tensor #{self.index}>"


def _same_structure(a: Any, b: Any) -> bool:
    """Equal structure and equal non-tensor values (compared with `is` first, then `==`)."""
    if isinstance(a, _Slot) or isinstance(b, _Slot):
        return a == b
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_structure(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(
            _same_structure(a[k], b[k]) for k in a
        )
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects whose == is not a bool are compared by identity only
        return False


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def _check_inputs_match(
    captured: Sequence[tuple[str, torch.Tensor]], new: Sequence[tuple[str, torch.Tensor]], structure_ok: bool
) -> None:
    """Raise GraphCaptureError naming the first input whose shape / dtype (or the call structure)
    differs from the captured one. Devices may differ (a CPU tensor is copied to the GPU)."""
    if not structure_ok or len(captured) != len(new):
        raise GraphCaptureError(
            "CUDA graph replay: the arguments differ from the captured call (other arguments, or a "
            "non-tensor argument with another value); capture a new CUDAGraphRunner for this call"
        )
    for (path, old), (_, cur) in zip(captured, new):
        if cur.shape != old.shape or cur.dtype != old.dtype:
            raise GraphCaptureError(
                f"CUDA graph replay: input {path} is {_describe(cur)} but the graph was captured with "
                f"{_describe(old)}; graphs have static shapes: capture one runner per shape"
            )


def _cuda_unavailable_reason() -> str | None:
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    return "torch.cuda.is_available() is False: no CUDA GPU is visible"


# ---------------------------------------------------------------------------------------------


class CUDAGraphRunner:
    """`fn(*args, **kwargs)` captured as one CUDA graph; calling the runner replays it on new inputs.

    fn: a callable (an `nn.Module` or a function) whose work is all on one CUDA device.
    example_args / example_kwargs: inputs of the shapes to capture; tensors (also inside tuples,
        lists and dicts) become the graph's static inputs (copied, so the caller's tensors are free
        to change), other values are fixed at capture.
    warmup: eager calls on a side stream before capture (cuBLAS handles, allocator, autotuning).
    pool: a memory pool handle (`torch.cuda.graph_pool_handle()`) shared with other runners.
    restore: state tensors (e.g. a KV-cache position counter) that the warm-up calls mutate in
        place; they are snapshotted before warm-up and copied back after capture.
    no_grad: run warm-up and capture under `torch.no_grad()` (inference; default True).

    Calling the runner checks that every tensor has the captured shape and dtype (GraphCaptureError
    naming the argument otherwise), copies the tensors into the static inputs and replays. It
    returns the static output (same object every call, overwritten by the next replay).
    Raises GraphCaptureError where CUDA is unavailable, an input lives on the CPU, or the capture
    fails (typically something in `fn` synchronizes with the host).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *example_args: Any,
        warmup: int = 3,
        pool: Any = None,
        restore: Sequence[torch.Tensor] = (),
        no_grad: bool = True,
        **example_kwargs: Any,
    ) -> None:
        reason = _cuda_unavailable_reason()
        if reason is not None:
            raise GraphCaptureError(f"CUDA graphs need a CUDA GPU: {reason}; call the model eagerly instead")
        if warmup < 1:
            raise GraphCaptureError(f"CUDAGraphRunner: warmup={warmup}; at least 1 eager call must precede capture")
        self.fn = fn
        leaves: list[tuple[str, torch.Tensor]] = []
        self._structure = _flatten((tuple(example_args), dict(example_kwargs)), "", leaves)
        self._paths = [_arg_path(p) for p, _ in leaves]
        devices = {t.device for _, t in leaves}
        for path, tensor in zip(self._paths, (t for _, t in leaves)):
            if tensor.device.type != "cuda":
                raise GraphCaptureError(
                    f"CUDAGraphRunner: input {path} is {_describe(tensor)}; graph inputs must be CUDA tensors "
                    "(move the model and its inputs to the GPU first)"
                )
        if len(devices) > 1:
            raise GraphCaptureError(
                f"CUDAGraphRunner: inputs are on several devices {sorted(map(str, devices))}; a graph runs on one"
            )
        self.device = next(iter(devices)) if devices else torch.device("cuda", torch.cuda.current_device())
        # Static input buffers: private copies the graph reads from.
        self.static_inputs: list[torch.Tensor] = [t.detach().clone() for _, t in leaves]
        self._captured_specs = [(path, t) for path, t in zip(self._paths, self.static_inputs)]
        self.graph = torch.cuda.CUDAGraph()
        self.static_output: Any = None
        self._capture(warmup, pool, list(restore), no_grad)

    def _call_fn(self) -> Any:
        args, kwargs = _unflatten(self._structure, self.static_inputs)
        return self.fn(*args, **kwargs)

    def _capture(self, warmup: int, pool: Any, restore: list[torch.Tensor], no_grad: bool) -> None:
        grad_ctx = torch.no_grad if no_grad else torch.enable_grad
        saved = [t.detach().clone() for t in restore]
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(side), grad_ctx():
                    for _ in range(warmup):
                        self._call_fn()
            except Exception as exc:
                raise GraphCaptureError(
                    f"CUDAGraphRunner: the eager warm-up call of {_fn_name(self.fn)} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            try:
                with grad_ctx(), torch.cuda.graph(self.graph, pool=pool):
                    self.static_output = self._call_fn()
            except Exception as exc:
                raise GraphCaptureError(
                    f"CUDAGraphRunner: capturing {_fn_name(self.fn)} failed: {type(exc).__name__}: {exc}. "
                    "Usually something in the captured region waits for the host (.item(), .cpu(), printing "
                    "a tensor, a Python branch on a tensor value, a CPU tensor input) or allocates pinned "
                    "memory; run it eagerly, or move that work out of the captured call"
                ) from exc
            for tensor, value in zip(restore, saved):
                tensor.copy_(value)
            torch.cuda.synchronize(self.device)
        logger.debug("captured %s on %s with %d static inputs", _fn_name(self.fn), self.device, len(self.static_inputs))

    @property
    def pool(self) -> Any:
        """This graph's memory pool handle (pass as `pool=` to share memory with another runner)."""
        return self.graph.pool()

    def replay(self) -> Any:
        """Replay on whatever the static inputs hold now; returns the static output."""
        self.graph.replay()
        return self.static_output

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves: list[tuple[str, torch.Tensor]] = []
        structure = _flatten((tuple(args), dict(kwargs)), "", leaves)
        new = [(_arg_path(p), t) for p, t in leaves]
        _check_inputs_match(self._captured_specs, new, _same_structure(structure, self._structure))
        for static, (_, value) in zip(self.static_inputs, new):
            if value.data_ptr() != static.data_ptr():
                static.copy_(value, non_blocking=value.device.type == "cpu" and value.is_pinned())
        return self.replay()


def _arg_path(path: str) -> str:
    """"[0][1]" -> "args[1]", "[1]['input_ids']" -> "kwargs['input_ids']" (for messages)."""
    if path.startswith("[0]"):
        return "args" + path[3:]
    if path.startswith("[1]"):
        return "kwargs" + path[3:]
    return path


def _fn_name(fn: Callable[..., Any]) -> str:
    if isinstance(fn, nn.Module):
        return type(fn).__name__
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def capture(fn: Callable[..., Any], *example_args: Any, **kwargs: Any) -> CUDAGraphRunner:
    """`CUDAGraphRunner(fn, *example_args, **kwargs)`: capture `fn` for the example inputs' shapes."""
    return CUDAGraphRunner(fn, *example_args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Grouped-query attention over an unexpanded KV cache.

#: Name of `sdpa_gqa_attention` in transformers' AttentionInterface (after `register_gqa_attention()`).
GQA_SDPA = "fp8kit_sdpa_gqa"


def _stock_sdpa() -> Callable[..., Any]:
    """transformers' own "sdpa" attention function (the fallback of `sdpa_gqa_attention`)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _pack_gqa_mask(mask: torch.Tensor, num_kv_heads: int, groups: int, q_len: int) -> torch.Tensor | None:
    """A mask [Bm, 1 or Hq, 1 or q, L] for queries [B, Hq, q, D] -> the mask of the packed queries
    [B, Hkv, G*q, D] (row g*q + t of KV head h is query head h*G + g, token t). None where the mask
    has another layout (the caller falls back to the stock attention)."""
    if mask.ndim != 4:
        return None
    batch, heads, rows, length = mask.shape
    if rows not in (1, q_len) or heads not in (1, num_kv_heads * groups):
        return None
    if heads == 1:
        if rows == 1:
            return mask  # the same row for every query: broadcasts over the G*q packed rows
        expanded = mask[:, :, None].expand(batch, 1, groups, q_len, length)  # (Bm, 1, G, q, L)
        return expanded.reshape(batch, 1, groups * q_len, length)
    expanded = mask.expand(batch, heads, q_len, length)  # (Bm, Hq, q, L)
    return expanded.reshape(batch, num_kv_heads, groups * q_len, length)


def sdpa_gqa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' "sdpa" attention for grouped-query models without expanding the KV heads.

    query [B, Hq, q, D], key / value [B, Hkv, L, D] (the KV cache as it is), Hq = G * Hkv,
    attention_mask None, bool (True = attend) or additive float [B or 1, 1 or Hq, q or 1, L].
    Returns (attn_output [B, q, Hq, D], None), as transformers' attention functions do.

    Query head h*G + g attends to KV head h (`repeat_kv`'s order), so the queries are reshaped to
    [B, Hkv, G*q, D] (the mask likewise) and `F.scaled_dot_product_attention` reads each KV head
    once: no copy of the cache. A causal call without a mask (prefill) and anything this cannot
    pack (no groups, a position bias, softcap, an unusual mask layout) go to the stock "sdpa"
    function, which needs no copy there either (SDPA's enable_gqa). Results equal the stock
    function's within the rounding of the attention kernel's summation order.
    """
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    batch, num_heads, q_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    packable = (
        groups > 1
        and num_heads == num_kv_heads * groups
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
        and not (mask is None and causal and q_len > 1)
    )
    if packable and mask is not None:
        if mask.shape[-1] > key.shape[-2]:
            mask = mask[..., : key.shape[-2]]
        mask = _pack_gqa_mask(mask, num_kv_heads, groups, q_len)
        packable = mask is not None
    if not packable:
        extra = {} if is_causal is None else {"is_causal": is_causal}
        return _stock_sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             **extra, **kwargs)
    packed = query.reshape(batch, num_kv_heads, groups * q_len, head_dim)  # (B, Hkv, G*q, D)
    out = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=False
    )  # (B, Hkv, G*q, Dv)
    out = out.reshape(out.shape[0], num_heads, q_len, value.shape[-1])  # (B, Hq, q, Dv)
    return out.transpose(1, 2).contiguous(), None  # (B, q, Hq, Dv)


def register_gqa_attention() -> str:
    """Register `sdpa_gqa_attention` in transformers' AttentionInterface as "fp8kit_sdpa_gqa", with
    the "sdpa" mask builder in AttentionMaskInterface (so models build the same masks as for
    "sdpa"). Idempotent; nothing is registered at import time. Returns the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(GQA_SDPA, sdpa_gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return GQA_SDPA


def _attn_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def use_gqa_attention(model: nn.Module) -> None:
    """Switch a Hugging Face model to "fp8kit_sdpa_gqa" (registering it first), in place, for every
    later forward (prefill and decode; `model.set_attn_implementation`). Numerically the stock
    "sdpa" attention; use it on models whose attention goes through transformers' AttentionInterface
    (Llama, Mistral, Qwen2, ...)."""
    register_gqa_attention()
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(GQA_SDPA)
    else:
        model.config._attn_implementation = GQA_SDPA
    if _attn_implementation(model) != GQA_SDPA:
        raise GraphCaptureError(
            f"use_gqa_attention: {type(model).__name__} kept attention implementation "
            f"{_attn_implementation(model)!r}; it does not dispatch through transformers' AttentionInterface"
        )


# ---------------------------------------------------------------------------------------------
# Hugging Face decoders with a static KV cache.


def _mask_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the hidden states (the input embedding's), for an additive attention mask; None
    where the model does not say (the step then passes a boolean mask)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return None


def static_cache_decode_fn(
    model: nn.Module, cache: Any, *, gqa_attention: bool = True
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A capturable decode step of a Hugging Face decoder over `cache` (a `transformers.StaticCache`).

    Returns ``step(input_ids, cache_position)``: input_ids int64 [B, 1] (the next token of each of
    the B sequences), cache_position int64 [1] (the position they are written at; every sequence of
    the batch decodes at the same position). It returns the logits [B, 1, vocab] of a
    `...ForCausalLM` (the last hidden state [B, 1, hidden] of a bare decoder), a view of the
    model's output tensor. The step writes the token's keys / values into `cache` at
    `cache_position` and attends to positions 0..cache_position.

    It passes an explicit 4-D attention mask [B, 1, 1, max_cache_len] built on the device from
    `cache_position`, once per step for all layers: additive (0 / dtype min) in the hidden-state
    dtype, which "sdpa" and "eager" attention both take as is (SDPA would otherwise turn a boolean
    mask into this in every layer). So transformers' mask helpers (which read mask values on the
    host) are bypassed, and it works with transformers versions whose forward takes
    `cache_position` (<= 5.2x) and those that keep the write position inside the cache (a
    `cumulative_length` tensor per layer, which the step sets from `cache_position`).

    gqa_attention: a model on transformers' "sdpa" attention is switched in place to
    "fp8kit_sdpa_gqa" (`use_gqa_attention`: same results, no copy of the KV cache per layer);
    False keeps the model's attention as it is. Other implementations are left alone.
    Run the prompt through the model eagerly first (`model(prompt_ids, past_key_values=cache)`):
    that allocates the cache tensors.
    """
    params = inspect.signature(model.forward).parameters
    if "past_key_values" in params:
        cache_kw = "past_key_values"
    elif "cache" in params:
        cache_kw = "cache"
    else:
        raise GraphCaptureError(
            f"static_cache_decode_fn: {type(model).__name__}.forward takes neither past_key_values nor cache; "
            "it is not a Hugging Face decoder with a KV cache"
        )
    if gqa_attention and _attn_implementation(model) == "sdpa":
        use_gqa_attention(model)
    takes_cache_position = "cache_position" in params
    max_len = _max_cache_len(cache)
    mask_dtype = _mask_dtype(model)
    constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}  # made once per device, outside the step's kernels

    def mask_constants(device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in constants:
            slots = torch.arange(max_len, device=device).view(1, 1, 1, max_len)  # (1, 1, 1, L)
            if mask_dtype is None:
                constants[device] = (slots,)
            else:
                zero = torch.zeros((), dtype=mask_dtype, device=device)
                constants[device] = (slots, zero, torch.full((), torch.finfo(mask_dtype).min, dtype=mask_dtype,
                                                             device=device))
        return constants[device]

    def step(input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        batch = input_ids.shape[0]
        slots, *fill = mask_constants(input_ids.device)
        # (1, 1, 1, L): the query at cache_position attends to keys 0..cache_position.
        visible = slots <= cache_position.view(1, 1, 1, 1)
        mask = torch.where(visible, fill[0], fill[1]) if fill else visible  # 2 kernels per step, all layers
        kwargs: dict[str, Any] = {
            cache_kw: cache,
            "attention_mask": mask.expand(batch, 1, 1, max_len),
            "position_ids": cache_position.view(1, 1).expand(batch, 1),  # (B, 1)
            "use_cache": True,
        }
        if takes_cache_position:
            kwargs["cache_position"] = cache_position
        else:
            _set_write_position(cache, cache_position)
        out = model(input_ids=input_ids, **kwargs)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state

    return step


def _max_cache_len(cache: Any) -> int:
    """Slots of a static cache: `get_max_length()` (transformers >= 5.1x), else `max_cache_len`."""
    get_max = getattr(cache, "get_max_length", None)
    value = get_max() if callable(get_max) else getattr(cache, "max_cache_len", None)
    if isinstance(value, int) and value > 0:
        return value
    raise GraphCaptureError(
        f"static_cache_decode_fn: {type(cache).__name__} has no fixed maximum length; use transformers.StaticCache"
    )


def _set_write_position(cache: Any, cache_position: torch.Tensor) -> None:
    """Point each static layer's write counter (transformers >= 5.2x) at `cache_position` (on the device)."""
    for layer in getattr(cache, "layers", None) or []:
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            if counter.device != cache_position.device:
                # The counter moves to the cache's device on the layer's lazy initialization.
                raise GraphCaptureError(
                    "static_cache_decode_fn: the StaticCache is not initialized on "
                    f"{cache_position.device}; run the prompt through the model first"
                )
            counter.copy_(cache_position.reshape(()).to(counter.dtype))


def capture_decode_step(
    model: nn.Module,
    cache: Any,
    input_ids: torch.Tensor,
    cache_position: torch.Tensor,
    *,
    warmup: int = 3,
    pool: Any = None,
    gqa_attention: bool = True,
) -> CUDAGraphRunner:
    """`static_cache_decode_fn(model, cache, gqa_attention=...)` captured for input_ids [B, 1] and
    cache_position [1] (by default on "fp8kit_sdpa_gqa" attention: no KV-cache copy per layer).

    The warm-up calls write keys / values at `cache_position` (a slot the next real step
    overwrites) and move the cache's write counters, which are restored after capture. Call the
    result as ``runner(next_ids, torch.tensor([pos], device=...))``; it returns logits [B, 1, vocab]
    (static buffer, overwritten by the next call).
    """
    restore = [
        layer.cumulative_length
        for layer in getattr(cache, "layers", None) or []
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
        and layer.cumulative_length.device.type == "cuda"
    ]
    return CUDAGraphRunner(
        static_cache_decode_fn(model, cache, gqa_attention=gqa_attention), input_ids, cache_position,
        warmup=warmup, pool=pool, restore=restore,
    )
