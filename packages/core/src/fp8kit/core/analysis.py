"""Where FP8 error comes from: per-layer output SQNR, split into weight and activation error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import as_model_inputs
from .config import QuantConfig
from .experts import canonical_weight, experts_layout, gate_function, quantize_expert_weight
from .scaling import amax_to_scale, dequantize, fp8_matmul, quantize_activation
from .surgery import select_experts, select_linears

__all__ = ["LayerError", "sqnr_db", "layer_errors"]


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
