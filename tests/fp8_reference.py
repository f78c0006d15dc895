"""float64 emulation of FP8 linears, and the schemes tests cover."""

import torch
from torch import nn

from fp8kit.core import QuantConfig
from fp8kit.core.scaling import block_scale, dequantize, quantize, rowwise_scale, tensor_scale

SCHEMES = {
    "dynamic-tensor/w-tensor": QuantConfig(),
    "dynamic-tensor/w-channel": QuantConfig(weight="channel"),
    "dynamic-token/w-tensor": QuantConfig(activation_granularity="token"),
    "dynamic-token/w-channel": QuantConfig(weight="channel", activation_granularity="token"),
    "static-tensor/w-tensor": QuantConfig(activation="static"),
    "static-tensor/w-channel": QuantConfig(activation="static", weight="channel"),
}

BLOCK = QuantConfig(weight="block", activation_granularity="group")


def emulate(linear: nn.Linear, x: torch.Tensor, config: QuantConfig, input_scale: torch.Tensor | None) -> torch.Tensor:
    """float64 emulation of the FP8 linear: quantize both operands as specified, multiply exactly."""
    w = linear.weight.detach()
    x2 = x.reshape(-1, x.shape[-1])
    if config.weight == "block":  # 128 x 128 weight blocks, 1 x 128 activation groups (edge blocks partial)
        wb, xb = config.block_size, (1, config.group_size)
        ws, xs = block_scale(w, wb), block_scale(x2, xb)
        out = dequantize(quantize(x2, xs, block=xb), xs, torch.float64, block=xb) @ dequantize(
            quantize(w, ws, block=wb), ws, torch.float64, block=wb
        ).T
        if linear.bias is not None:
            out = out + linear.bias.double()
        return out.reshape(*x.shape[:-1], -1)
    ws = rowwise_scale(w) if config.weight == "channel" else tensor_scale(w)
    if config.activation == "static":
        xs = input_scale
    else:
        xs = rowwise_scale(x2) if config.activation_granularity == "token" else tensor_scale(x2)
    out = dequantize(quantize(x2, xs), xs, torch.float64) @ dequantize(quantize(w, ws), ws, torch.float64).T
    if linear.bias is not None:
        out = out + linear.bias.double()
    return out.reshape(*x.shape[:-1], -1)
