"""Where FP8 error comes from: per-layer output SQNR (weight / activation split), and per-layer
sensitivity (the KL each layer's quantization costs), from which a mixed-precision plan chooses the
fewest layers to keep in high precision."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import as_model_inputs
from .config import QuantConfig
from .experts import canonical_weight, experts_layout, gate_function, quantize_expert_weight
from .linear import FP8Linear
from .scaling import amax_to_scale, dequantize, fp8_matmul, quantize_activation
from .surgery import select_experts, select_linears

__all__ = [
    "LayerError",
    "LayerSensitivity",
    "sqnr_db",
    "layer_errors",
    "layer_sensitivity",
    "plan_high_precision",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerError:
    """SQNR (dB, higher is better) of one layer's output against full precision on the same input.

    total: FP8 weights and activations as `config` quantizes them; weight_only: FP8 weight,
    full-precision input; activation_only: FP8 input, full-precision weight.
    """

    name: str
    total_db: float
    weight_only_db: float
    activation_only_db: float
    input_absmax: float
    input_rms: float


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2) in dB; inf when equal."""
    noise = (reference.double() - approx.double()).pow(2).sum()
    return float("inf") if noise == 0 else (10 * torch.log10(reference.double().pow(2).sum() / noise)).item()


def _gemm_error(name: str, x: torch.Tensor, w: torch.Tensor, config: QuantConfig, parts: int = 1) -> LayerError:
    """LayerError of x [M, K] @ w[N, K].T quantized per `config` (weights in `parts` row blocks, as
    `experts.quantize_expert_weight`; 1 = as `FP8Linear`); static scales from this x's absmax."""
    x, w = x.float(), w.float()
    reference = F.linear(x.double(), w.double())
    weight_fp8, w_scale = quantize_expert_weight(w, config.weight, parts)
    w_rows = w_scale.repeat_interleave(w.shape[0] // parts).reshape(-1, 1) if config.weight == "tensor" else w_scale
    input_scale = amax_to_scale(x.abs().amax()) if config.activation == "static" else None
    x_fp8, x_scale = quantize_activation(x, config.activation_granularity, input_scale)
    total = fp8_matmul(x_fp8, weight_fp8, x_scale, w_rows, out_dtype=torch.float32, use_fast_accum=config.use_fast_accum)
    return LayerError(
        name=name,
        total_db=sqnr_db(reference, total),
        weight_only_db=sqnr_db(reference, F.linear(x.double(), dequantize(weight_fp8, w_rows, torch.float64))),
        activation_only_db=sqnr_db(reference, F.linear(dequantize(x_fp8, x_scale, torch.float64), w.double())),
        input_absmax=x.abs().max().item(),
        input_rms=x.pow(2).mean().sqrt().item(),
    )


def _expert_errors(name: str, module: nn.Module, args: tuple, config: QuantConfig) -> list[LayerError]:
    """One LayerError per expert and projection (`<name>.<e>.<proj>`) of a fused experts module, on
    the tokens routed to that expert (the down projection's input computed in full precision)."""
    layout = experts_layout(module)
    hidden, top_k_index = args[0], args[1]
    x = hidden.reshape(-1, hidden.shape[-1]).float()  # (T, H)
    ids = top_k_index.reshape(x.shape[0], -1)  # (T, k)
    up_w, down_w = (canonical_weight(module, layout, proj).float() for proj in layout.projections)  # (E, N, K)
    gate = gate_function(module) if layout.up == "gate_up_proj" else None
    out = []
    for e in range(up_w.shape[0]):
        x_e = x[(ids == e).any(dim=-1)]  # (R, H): the tokens routed to expert e
        if x_e.shape[0] == 0:
            continue
        h = F.linear(x_e, up_w[e], getattr(module, f"{layout.up}_bias")[e].float() if layout.has_bias else None)
        h = gate(module, h) if gate is not None else module.act_fn(h)  # (R, I)
        out.append(_gemm_error(f"{name}.{e}.{layout.up}", x_e, up_w[e], config, layout.up_parts))
        out.append(_gemm_error(f"{name}.{e}.down_proj", h, down_w[e], config))
    return out


@torch.no_grad()
def layer_errors(model: nn.Module, config: QuantConfig, batch: Any) -> list[LayerError]:
    """Per-layer FP8 error of the unquantized `model` on one batch of inputs, worst first.

    Each Linear that `quantize` would convert sees its real input from `batch`; so does each
    projection of each expert of a fused MoE experts module (`<experts>.<e>.<proj>`, on the tokens
    routed to expert e). Static activation scales are taken from that same batch's absmax.
    """
    names, _ = select_linears(model, config)
    expert_names, _ = select_experts(model, config)
    inputs: dict[str, tuple] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a))
        for n in names + expert_names
    ]
    try:
        model(**as_model_inputs(batch, next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    out = []
    for name in names:
        linear = model.get_submodule(name)
        out.append(_gemm_error(name, inputs[name][0].reshape(-1, linear.in_features), linear.weight.detach(), config))
    for name in expert_names:
        out += _expert_errors(name, model.get_submodule(name), inputs[name], config)
    return sorted(out, key=lambda e: e.total_db)


@dataclass(frozen=True)
class LayerSensitivity:
    """How much quantizing one layer alone costs: `kl` is the estimated KL divergence of the model's
    next-token distribution from the original (nats per token) on the calibration batches;
    `extra_bytes` what keeping the layer's weight in its original dtype costs over FP8 (bytes)."""

    name: str
    kl: float
    extra_bytes: int


def _proxy_config(config: QuantConfig) -> QuantConfig:
    """`config` with a data-free weight algorithm: GPTQ's layer error is estimated by its MSE rounding."""
    return dataclasses.replace(config, algorithm="mse") if config.algorithm == "gptq" else config


def layer_sensitivity(
    model: nn.Module, config: QuantConfig, batches: Sequence[Any], seed: int = 0
) -> list[LayerSensitivity]:
    """Per-layer KL divergence FP8 quantization costs on `batches` (input-id tensors or dicts), worst first.

    A second-order (Fisher) estimate from one forward and one backward pass per batch of the
    unquantized `model`. With ``dy_t`` the error FP8 puts on the layer's output at token t (the layer
    quantized per `config` on its real input) and ``g_t`` the gradient, with respect to that output,
    of the loss of labels *sampled from the model's own predictions*, the estimate is
    ``sum_t (g_t . dy_t)^2 / 2`` averaged over tokens: the expected KL(original || layer-quantized) in
    nats per token, to second order. Sampled labels make this the true Fisher (the cross terms
    between positions have zero mean); the data's own next tokens would give the empirical Fisher,
    which overweights layers whose output every later token reads (keys). Layers quantized together
    add up to about the sum of their estimates. Static scales come from each batch's own absmax;
    "gptq" is estimated with "mse" rounding. `seed` fixes the sampled labels (deterministic).
    """
    names, _ = select_linears(model, config)
    proxy = _proxy_config(config)
    modules = {name: model.get_submodule(name) for name in names}
    scores = dict.fromkeys(names, 0.0)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    embeddings = model.get_input_embeddings()
    generator = torch.Generator().manual_seed(seed)

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen[name] = (args[0].detach(), output)

        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    handles.append(embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_()))
    device = next(model.parameters()).device
    tokens = 0
    bar = tqdm(total=len(batches) * len(names), desc=f"sensitivity: {len(names)} layers x {len(batches)} batches", unit="layer")
    try:
        for batch in batches:
            inputs = as_model_inputs(batch, device)
            with torch.enable_grad():
                logits = model(**inputs).logits.flatten(0, 1).float()  # (B*T, V)
                probs = torch.softmax(logits.detach(), dim=-1).cpu()
                labels = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)  # (B*T,)
                loss = F.cross_entropy(logits, labels, reduction="sum")
                grads = torch.autograd.grad(loss, [seen[n][1] for n in names])
            tokens += labels.numel()
            with torch.no_grad():
                for name, grad in zip(names, grads):
                    linear, (x, y) = modules[name], seen[name]
                    x2d = x.reshape(-1, linear.in_features).float()  # (M, K)
                    input_scale = x2d.abs().amax() / 448 if config.activation == "static" else None
                    fp8 = FP8Linear.from_linear(linear, proxy, input_scale)
                    dy = fp8(x2d) - y.reshape(x2d.shape[0], -1).float()  # (M, N)
                    per_token = (grad.reshape(dy.shape).float() * dy).sum(dim=-1)  # (M,)
                    scores[name] += 0.5 * per_token.double().pow(2).sum().item()
                    bar.update()
            seen.clear()
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    fp8_bytes = 1
    out = [
        LayerSensitivity(
            name,
            scores[name] / max(tokens, 1),
            modules[name].weight.numel() * (modules[name].weight.element_size() - fp8_bytes),
        )
        for name in names
    ]
    return sorted(out, key=lambda s: s.kl, reverse=True)


def plan_high_precision(
    sensitivities: Sequence[LayerSensitivity], max_kl: float, max_bytes: int | None = None
) -> list[str]:
    """The fewest layers to keep in high precision so that the estimated KL of the rest (the sum of
    their `kl`) is at most `max_kl` nats per token: the most sensitive first (which is the fewest
    for a sum). With `max_bytes`, stops before the kept layers' `extra_bytes` would exceed it (a
    warning says when that misses a positive `max_kl`; ``max_kl=0`` spends the budget on the most
    sensitive layers). The result goes to `QuantConfig.ignore`; checkpoint formats do not change.
    """
    ranked = sorted(sensitivities, key=lambda s: s.kl, reverse=True)
    remaining = sum(s.kl for s in ranked)
    kept: list[str] = []
    spent = 0
    for s in ranked:
        if remaining <= max_kl:
            break
        if max_bytes is not None and spent + s.extra_bytes > max_bytes:
            (logger.warning if max_kl > 0 else logger.info)(
                "plan_high_precision: the byte budget (%d) stops at %d layers; estimated KL %.4g > %.4g",
                max_bytes, len(kept), remaining, max_kl,
            )
            break
        kept.append(s.name)
        spent += s.extra_bytes
        remaining -= s.kl
    return kept
