"""fp8kit.core.graphs: CUDA-graph runner errors (CPU), the GQA attention without KV copy (CPU, against
a float64 reference and transformers' "sdpa" / "eager"), the static-cache decode step (CPU, against a
full recompute), and graph replay == eager for an FP8 tiny Llama decode step (GPU only)."""

import dataclasses

import pytest
import torch
from transformers import StaticCache

from fp8kit.core import FP8Linear, QuantConfig, quantize, skinny
from fp8kit.core.errors import FP8KitError
from fp8kit.core import graphs
from fp8kit.core.graphs import (
    GQA_SDPA,
    CUDAGraphRunner,
    GraphCaptureError,
    _check_inputs_match,
    _flatten,
    _same_structure,
    capture_decode_step,
    sdpa_gqa_attention,
    static_cache_decode_fn,
    use_gqa_attention,
)

from tiny_models import TINY_VOCAB, make_tiny_llama

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with compute capability >= 8.9 (FP8 tensor cores)",
)


# ----------------------------------------------------------------------------- errors (CPU)


def test_runner_without_cuda_build_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(GraphCaptureError) as info:
        CUDAGraphRunner(lambda x: x * 2, torch.ones(3))
    assert str(info.value) == (
        f"CUDA graphs need a CUDA GPU: this torch build ({torch.__version__}) has no CUDA support; "
        "call the model eagerly instead"
    )
    assert isinstance(info.value, FP8KitError)


def test_runner_without_visible_gpu_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(GraphCaptureError, match=r"^CUDA graphs need a CUDA GPU: torch.cuda.is_available\(\) is False"):
        CUDAGraphRunner(lambda x: x, torch.ones(3))


def test_runner_rejects_cpu_inputs_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(GraphCaptureError) as info:
        CUDAGraphRunner(lambda ids, mask=None: ids, input_ids=torch.zeros(2, 1, dtype=torch.long))
    assert str(info.value) == (
        "CUDAGraphRunner: input kwargs['input_ids'] is (2, 1) int64 on cpu; graph inputs must be CUDA tensors "
        "(move the model and its inputs to the GPU first)"
    )
    with pytest.raises(GraphCaptureError, match=r"input args\[1\]\[0\] is \(3,\) float32 on cpu"):
        CUDAGraphRunner(lambda a, b: a, 1.0, [torch.ones(3)])


def test_runner_needs_a_warmup_call(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(GraphCaptureError, match="warmup=0; at least 1 eager call must precede capture"):
        CUDAGraphRunner(lambda x: x, torch.ones(1), warmup=0)


def _spec(*args, **kwargs):
    leaves = []
    structure = _flatten((tuple(args), dict(kwargs)), "", leaves)
    paths = [p.replace("[0]", "args", 1) if p.startswith("[0]") else p.replace("[1]", "kwargs", 1) for p, _ in leaves]
    return structure, [(p, t) for p, (_, t) in zip(paths, leaves)]


def test_replay_inputs_must_match_the_captured_ones():
    s0, captured = _spec(torch.zeros(8, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), flag=True)
    s1, same = _spec(torch.ones(8, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), flag=True)
    _check_inputs_match(captured, same, _same_structure(s0, s1))  # no error

    s2, other_batch = _spec(torch.ones(4, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), flag=True)
    with pytest.raises(GraphCaptureError) as info:
        _check_inputs_match(captured, other_batch, _same_structure(s0, s2))
    assert str(info.value) == (
        "CUDA graph replay: input args[0] is (4, 1) int64 on cpu but the graph was captured with (8, 1) int64 on cpu; "
        "graphs have static shapes: capture one runner per shape"
    )
    s3, other_dtype = _spec(torch.ones(8, 1, dtype=torch.long), torch.ones(1, dtype=torch.int32), flag=True)
    with pytest.raises(GraphCaptureError, match=r"input args\[1\] is \(1,\) int32"):
        _check_inputs_match(captured, other_dtype, _same_structure(s0, s3))
    s4, other_flag = _spec(torch.ones(8, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), flag=False)
    assert not _same_structure(s0, s4)
    with pytest.raises(GraphCaptureError, match="the arguments differ from the captured call"):
        _check_inputs_match(captured, other_flag, _same_structure(s0, s4))


def test_decode_fn_rejects_a_model_without_a_cache():
    with pytest.raises(GraphCaptureError, match="Linear.forward takes neither past_key_values nor cache"):
        static_cache_decode_fn(torch.nn.Linear(4, 4), cache=None)


# ----------------------------------------------------------------------------- GQA attention (CPU)


class _Attn(torch.nn.Module):
    """The attributes transformers' attention functions read from the attention module."""

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _reference_attention(q, k, v, mask, scale):
    """float64 attention with every KV head repeated to its G query heads (repeat_kv's order:
    query head h uses KV head h // G); mask bool (True = attend) or additive. Returns [B, q, Hq, D]."""
    groups = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(groups, dim=1)  # (B, Hq, L, D)
    v64 = v.double().repeat_interleave(groups, dim=1)
    scores = q.double() @ k64.transpose(-1, -2) * scale  # (B, Hq, q, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return (scores.softmax(-1) @ v64).transpose(1, 2)  # (B, q, Hq, D)


def _stock_calls(monkeypatch):
    """Count the calls that sdpa_gqa_attention hands to transformers' own "sdpa" function."""
    calls = []
    stock = graphs._stock_sdpa()

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return stock(*args, **kwargs)

    monkeypatch.setattr(graphs, "_stock_sdpa", lambda: counting)
    return calls


@pytest.mark.parametrize(
    "q_len,mask_kind",
    [(1, "none"), (1, "bool-row"), (1, "float-row"), (5, "bool-causal"), (5, "bool-per-head"), (1, "bool-longer")],
)
def test_gqa_attention_matches_float64_repeat_kv(monkeypatch, q_len, mask_kind):
    calls = _stock_calls(monkeypatch)
    gen = torch.Generator().manual_seed(q_len)
    batch, kv_heads, groups, length, dim = 2, 3, 4, 11, 8
    q = torch.randn(batch, kv_heads * groups, q_len, dim, generator=gen)  # (B, Hq, q, D)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen)  # (B, Hkv, L, D): distinct heads
    v = torch.randn(batch, kv_heads, length, dim, generator=gen)
    visible = torch.rand(batch, 1, q_len, length, generator=gen) > 0.4
    visible[..., 0] = True  # no empty row
    mask = {
        "none": None,
        "bool-row": visible,
        "float-row": torch.where(visible[:1], 0.0, torch.finfo(torch.float32).min),  # (1, 1, 1, L)
        "bool-causal": torch.ones(q_len, length, dtype=torch.bool).tril(length - q_len).expand(batch, 1, q_len, length),
        "bool-per-head": torch.rand(batch, kv_heads * groups, q_len, length, generator=gen) > 0.3,
        "bool-longer": torch.cat([visible, torch.zeros(batch, 1, q_len, 3, dtype=torch.bool)], -1),  # L + 3
    }[mask_kind]
    if mask_kind == "bool-per-head":
        mask[..., 0] = True
    out, weights = sdpa_gqa_attention(_Attn(groups), q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (batch, q_len, kv_heads * groups, dim)
    ref_mask = mask[..., :length] if mask is not None else None
    torch.testing.assert_close(out.double(), _reference_attention(q, k, v, ref_mask, 0.3), rtol=1e-5, atol=1e-5)
    assert calls == []  # packed, not handed to the stock function


def test_gqa_attention_hands_unmasked_causal_prefill_to_stock_sdpa(monkeypatch):
    calls = _stock_calls(monkeypatch)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 6, 8, generator=gen)  # (B, Hq, q, D)
    k, v = torch.randn(2, 1, 2, 6, 8, generator=gen)  # (B, Hkv, L, D) each
    out, _ = sdpa_gqa_attention(_Attn(2), q, k, v, None, scaling=0.5)
    assert calls == [q.shape]
    causal = torch.ones(6, 6, dtype=torch.bool).tril().view(1, 1, 6, 6)
    torch.testing.assert_close(out.double(), _reference_attention(q, k, v, causal, 0.5), rtol=1e-5, atol=1e-5)


def _padded_batch(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY_VOCAB, (3, 12), generator=gen)  # (B, T)
    pad = torch.ones(3, 12, dtype=torch.long)
    pad[1, :3] = 0  # left padding: row 1 starts at token 3
    pad[2, :1] = 0
    return ids, pad


def _prefill_and_decode(model, ids, pad, prompt=8):
    """Logits of a padded prefill without cache (B, T, V), and of a StaticCache prefill of `prompt`
    tokens followed by one-token decode steps, all with the 2-D padding mask (B, T - prompt, V)."""
    kw = _cache_kwarg(model)
    with torch.no_grad():
        full = model(ids, attention_mask=pad).logits
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(input_ids=ids[:, :prompt], attention_mask=pad[:, :prompt], use_cache=True, **{kw: cache})
        steps = [
            model(input_ids=ids[:, p : p + 1], attention_mask=pad[:, : p + 1], use_cache=True, **{kw: cache}).logits
            for p in range(prompt, ids.shape[1])
        ]
    return full, torch.cat(steps, dim=1)


@pytest.mark.parametrize("stock", ["sdpa", "eager"])
def test_gqa_attention_model_equals_stock_attention_with_padding(monkeypatch, stock):
    ids, pad = _padded_batch(seed=4)
    reference = make_tiny_llama(seed=5, attn_implementation=stock)
    model = make_tiny_llama(seed=5, attn_implementation="sdpa")
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 2  # GQA
    use_gqa_attention(model)
    assert model.config._attn_implementation == GQA_SDPA
    assert model.model.layers[0].self_attn.config._attn_implementation == GQA_SDPA
    calls = _stock_calls(monkeypatch)
    full, steps = _prefill_and_decode(model, ids, pad)
    assert calls == []  # every call had a padding mask: all packed
    ref_full, ref_steps = _prefill_and_decode(reference, ids, pad)
    valid = pad.bool()  # padded query rows attend to nothing: their outputs are arbitrary
    torch.testing.assert_close(full[valid], ref_full[valid], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(steps, ref_steps, rtol=1e-4, atol=1e-5)
    # Unpadded prefill (no mask: causal) goes through the stock function and still agrees.
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    assert len(calls) == model.config.num_hidden_layers


def test_decode_fn_switches_sdpa_models_to_gqa_unless_told_not_to():
    model = make_tiny_llama(seed=1, attn_implementation="sdpa")
    cache = StaticCache(config=model.config, max_cache_len=16)
    static_cache_decode_fn(model, cache, gqa_attention=False)
    assert model.config._attn_implementation == "sdpa"
    static_cache_decode_fn(model, cache)
    assert model.config._attn_implementation == GQA_SDPA
    eager = make_tiny_llama(seed=1, attn_implementation="eager")
    static_cache_decode_fn(eager, StaticCache(config=eager.config, max_cache_len=16))
    assert eager.config._attn_implementation == "eager"  # only "sdpa" is replaced


# ----------------------------------------------------------------------------- decode step (CPU)


def _cache_kwarg(model):
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@pytest.mark.parametrize(
    "fp8,attn,gqa",
    [(False, "sdpa", True), (False, "sdpa", False), (False, "eager", True), (True, "sdpa", True)],
    ids=["fp32-gqa", "fp32-stock-sdpa", "fp32-eager", "fp8-dynamic-token-gqa"],
)
def test_static_cache_decode_step_matches_full_recompute(monkeypatch, fp8, attn, gqa):
    calls = _stock_calls(monkeypatch)
    model = make_tiny_llama(seed=1, attn_implementation=attn)
    if fp8:
        quantize(model, QuantConfig(weight="channel", activation_granularity="token"))
        assert isinstance(model.model.layers[0].mlp.up_proj, FP8Linear)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY_VOCAB, (3, 12), generator=gen)  # (B, T)
    with torch.no_grad():
        full = model(ids).logits  # (B, T, vocab), no cache
        cache = StaticCache(config=model.config, max_cache_len=32)
        model(input_ids=ids[:, :8], use_cache=True, **{_cache_kwarg(model): cache})
        # Garbage in the slots after the prompt: the step's mask must hide them.
        for layer in cache.layers:
            layer.keys[:, :, 8:].fill_(30.0)
            layer.values[:, :, 8:].fill_(-30.0)
        step = static_cache_decode_fn(model, cache, gqa_attention=gqa)
        assert model.config._attn_implementation == (GQA_SDPA if gqa and attn == "sdpa" else attn)
        for pos in range(8, 12):
            logits = step(ids[:, pos : pos + 1], torch.tensor([pos]))  # (B, 1, vocab)
            assert logits.shape == (3, 1, TINY_VOCAB)
            _assert_same_function(logits[:, 0], full[:, pos], fp8)
        # Re-running a position overwrites its slot: same result.
        again = step(ids[:, 10:11], torch.tensor([10]))
        _assert_same_function(again[:, 0], full[:, 10], fp8)
    assert calls == []  # the decode steps' attention was packed (or not ours at all)


def _assert_same_function(out, ref, fp8):
    if not fp8:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)  # fp32, other summation order
    else:
        # Per-token FP8 quantization of one token is the same in both paths, but an fp32 difference
        # in the attention output can flip one FP8 rounding (2^-4 relative) of an element: compare
        # norms. An unmasked stale slot (|k|, |v| = 30) gives a relative error of order 1.
        rel = (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()
        assert rel < 1e-2, rel


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(weight="channel", activation_granularity="token", use_fast_accum=True),
        QuantConfig(activation="dynamic"),
    ],
    ids=["dynamic-token-fastacc", "dynamic-tensor"],
)
def test_graph_replay_equals_eager_fp8_decode(config, monkeypatch):
    # skinny.TABLE may pick another mode under capture than eagerly (last-bit differences): make them
    # the same here, so that the replay must equal the eager step bit for bit.
    monkeypatch.setattr(skinny, "TABLE", {key: dataclasses.replace(rule, graph=rule.eager) for key, rule in skinny.TABLE.items()})
    device = torch.device("cuda")
    model = make_tiny_llama(seed=2, attn_implementation="sdpa").to(device=device, dtype=torch.bfloat16)
    quantize(model, config)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, TINY_VOCAB, (4, 14), generator=gen).to(device)  # (B, T)
    kw = _cache_kwarg(model)
    with torch.no_grad():
        cache_graph = StaticCache(config=model.config, max_cache_len=32)
        cache_eager = StaticCache(config=model.config, max_cache_len=32)
        model(input_ids=ids[:, :8], use_cache=True, **{kw: cache_graph})
        model(input_ids=ids[:, :8], use_cache=True, **{kw: cache_eager})
        runner = capture_decode_step(model, cache_graph, ids[:, 8:9], torch.tensor([8], device=device))
        eager = static_cache_decode_fn(model, cache_eager)
        for pos in range(8, 14):
            position = torch.tensor([pos], device=device)
            out_graph = runner(ids[:, pos : pos + 1], position).clone()  # static buffer: copy it
            out_eager = eager(ids[:, pos : pos + 1], position)
            torch.testing.assert_close(out_graph, out_eager, rtol=0, atol=0)
        for a, b in zip(cache_graph.layers, cache_eager.layers):
            torch.testing.assert_close(a.keys[:, :, :14], b.keys[:, :, :14], rtol=0, atol=0)
        with pytest.raises(GraphCaptureError, match=r"input args\[0\] is \(2, 1\) int64"):
            runner(ids[:2, 8:9], torch.tensor([8], device=device))


@pytest.mark.gpu
@gpu
def test_capture_of_a_host_sync_is_a_clear_error():
    x = torch.randn(4, device="cuda")

    def syncs(t):
        return t * 2 if t.sum().item() > -1e9 else t

    with pytest.raises(GraphCaptureError, match="waits for the host"):
        CUDAGraphRunner(syncs, x)
    # The device still works after the failed capture.
    runner = CUDAGraphRunner(lambda t: t * 3, x)
    y = torch.randn(4, device="cuda")
    torch.testing.assert_close(runner(y), y * 3)


@pytest.mark.gpu
@gpu
def test_gqa_graph_decode_equals_stock_sdpa_on_gpu():
    """CUDA kernels (SDPA's memory-efficient kernel with the packed queries and the additive mask)
    against transformers' stock "sdpa" (repeat_kv) decode step, bf16."""
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, TINY_VOCAB, (4, 14), generator=gen).to(device)  # (B, T)
    model_stock = make_tiny_llama(seed=6, attn_implementation="sdpa").to(device, torch.bfloat16)
    model_gqa = make_tiny_llama(seed=6, attn_implementation="sdpa").to(device, torch.bfloat16)
    kw = _cache_kwarg(model_stock)
    with torch.no_grad():
        caches = [StaticCache(config=m.config, max_cache_len=32) for m in (model_stock, model_gqa)]
        for m, c in zip((model_stock, model_gqa), caches):
            m(input_ids=ids[:, :8], use_cache=True, **{kw: c})
        stock = static_cache_decode_fn(model_stock, caches[0], gqa_attention=False)
        runner = capture_decode_step(model_gqa, caches[1], ids[:, 8:9], torch.tensor([8], device=device))
        assert model_gqa.config._attn_implementation == GQA_SDPA and model_stock.config._attn_implementation == "sdpa"
        for pos in range(8, 14):
            position = torch.tensor([pos], device=device)
            ref = stock(ids[:, pos : pos + 1], position).float()
            out = runner(ids[:, pos : pos + 1], position).float()
            rel = (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()
            assert rel < 2e-2, (pos, rel)  # bf16 rounding (2^-8 per op) through 2 layers
