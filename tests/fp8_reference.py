"""float64 emulation of FP8 linears and MoE experts, and the schemes tests cover."""

import torch
from torch import nn

from fp8kit.core import QuantConfig
from fp8kit.core.experts import canonical_weight, experts_layout, gate_function
from fp8kit.core.scaling import block_scale, dequantize, quantize, round_up_to_dtype, rowwise_scale, tensor_scale

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
        ws, xs = round_up_to_dtype(block_scale(w, wb), w.dtype), block_scale(x2, xb)  # weight scales exact in w's dtype
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


def emulate_expert(module, e, x, config, input_scales=None):
    """float64 emulation of expert e of the high-precision experts `module` on x [R, H], as FP8Experts
    quantizes it: weights per part (gate / up) or per row, activations per `config`."""
    layout = experts_layout(module)
    gate = gate_function(module) if layout.up == "gate_up_proj" else None

    def fp8_weight(w, parts):
        w = w.double()
        if config.weight == "channel":
            s = rowwise_scale(w)
        else:
            rows = w.shape[0] // parts
            s = torch.cat([tensor_scale(w[p * rows : (p + 1) * rows]).expand(rows, 1) for p in range(parts)])
        return dequantize(quantize(w, s), s, torch.float64)

    def fp8_input(v, proj):
        if input_scales is not None:
            s = input_scales[proj][e]
        else:
            s = rowwise_scale(v) if config.activation_granularity == "token" else tensor_scale(v)
        return dequantize(quantize(v, s), s, torch.float64)

    def bias(proj):
        return getattr(module, f"{proj}_bias")[e].double() if layout.has_bias else 0.0

    up = canonical_weight(module, layout, layout.up)[e]
    down = canonical_weight(module, layout, "down_proj")[e]
    h = fp8_input(x.double(), layout.up) @ fp8_weight(up, layout.up_parts).T + bias(layout.up)
    h = gate(module, h) if gate is not None else module.act_fn(h)
    return fp8_input(h, "down_proj") @ fp8_weight(down, 1).T + bias("down_proj")


def reference_expert(module, e, x):
    """The unquantized expert e in float64."""
    layout = experts_layout(module)
    up = canonical_weight(module, layout, layout.up)[e].double()
    down = canonical_weight(module, layout, "down_proj")[e].double()
    h = x.double() @ up.T + (getattr(module, f"{layout.up}_bias")[e].double() if layout.has_bias else 0.0)
    h = gate_function(module)(module, h) if layout.up == "gate_up_proj" else module.act_fn(h)
    return h @ down.T + (module.down_proj_bias[e].double() if layout.has_bias else 0.0)
