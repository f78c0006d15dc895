"""Where FP8 error comes from: per-layer output SQNR, split into weight and activation error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import as_model_inputs
from .config import QuantConfig
from .linear import FP8Linear
from .scaling import dequantize, quantize_activation
from .surgery import select_linears

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


@torch.no_grad()
def layer_errors(model: nn.Module, config: QuantConfig, batch: Any) -> list[LayerError]:
    """Per-layer FP8 error of the unquantized `model` on one batch of inputs, worst first.

    Each Linear that `quantize` would convert sees its real input from `batch`; static activation
    scales are taken from that same batch's absmax.
    """
    names, _ = select_linears(model, config)
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
        for n in names
    ]
    try:
        model(**as_model_inputs(batch, next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    out = []
    for name in names:
        linear = model.get_submodule(name)
        x = inputs[name].reshape(-1, linear.in_features).float()  # (M, K)
        w = linear.weight.float()
        reference = F.linear(x.double(), w.double())
        input_scale = x.abs().amax() / 448 if config.activation == "static" else None
        fp8 = FP8Linear.from_linear(linear, config, input_scale)
        fp8.bias = None  # compare the GEMM alone: the reference has no bias either
        x_fp8, x_scale = quantize_activation(x, fp8.activation_granularity, fp8.input_scale)
        w_scale = fp8.weight_scale
        out.append(
            LayerError(
                name=name,
                total_db=sqnr_db(reference, fp8(x)),
                weight_only_db=sqnr_db(reference, F.linear(x.double(), dequantize(fp8.weight, w_scale, torch.float64))),
                activation_only_db=sqnr_db(reference, F.linear(dequantize(x_fp8, x_scale, torch.float64), w.double())),
                input_absmax=x.abs().max().item(),
                input_rms=x.pow(2).mean().sqrt().item(),
            )
        )
    return sorted(out, key=lambda e: e.total_db)

