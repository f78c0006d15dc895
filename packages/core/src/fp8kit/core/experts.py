"""`FP8Experts`: the fused experts of a mixture-of-experts block with FP8 weights and grouped FP8 GEMMs.

transformers 5 stores the experts of most MoE models (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE,
GLM4-MoE, gpt-oss, ...) in one module decorated with `@use_experts_implementation`, as 3-D
parameters: `gate_up_proj` [E, 2I, H] (gate rows then up rows) and `down_proj` [E, H, I]; gpt-oss
stores them transposed ([E, H, 2I] / [E, I, H]) with gate and up interleaved, plus biases
`gate_up_proj_bias` [E, 2I] / `down_proj_bias` [E, H]. Its forward takes the flattened hidden
states [T, H] and the router's choice, top-k expert ids and weights [T, k], and returns [T, H].

`FP8Experts.from_experts` quantizes such a module; its forward computes the same function:
sort the (token, expert) pairs by expert, one grouped FP8 GEMM for gate/up, the original module's
gate (`_apply_gate`) or activation, one grouped FP8 GEMM for down, routing weights, sum over k.
Models whose experts are `nn.Linear` lists need nothing here: `surgery` swaps those linears for
`FP8Linear` like any other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import kernels, scaling
from .config import QuantConfig
from .linear import FixedDtypeBuffers

__all__ = [
    "ExpertsLayout",
    "FP8Experts",
    "experts_layout",
    "canonical_weight",
    "quantize_expert_weight",
    "expert_input_amax",
    "static_input_scales",
    "moe_experts_modules",
    "UNSEEN_FALLBACK_SCALE",
]

logger = logging.getLogger(__name__)

DOWN = "down_proj"
#: Static input scale of every expert of a layer none of whose experts saw a calibration token
#: (possible only when calibration never reaches the layer): amax 448, i.e. values up to 448 are
#: representable, at FP8's resolution. Positive and finite, never NaN; a warning names the layer.
UNSEEN_FALLBACK_SCALE = 1.0


@dataclass(frozen=True)
class ExpertsLayout:
    """How a high-precision fused experts module stores its weights.

    up: "gate_up_proj" (gated experts) or "up_proj" (`has_gate=False`).
    transposed: weights stored [E, K, N] (gpt-oss) instead of [E, N, K].
    has_bias: `<proj>_bias` [E, N] parameters exist.
    up_parts: how many tensors the up weight holds side by side along N, each with its own
        per-tensor scale: 2 for gate and up concatenated (two tensors per expert on disk, e.g.
        Mixtral `w1` / `w3`), 1 otherwise (interleaved gpt-oss, ungated).
    """

    up: str
    transposed: bool
    has_bias: bool
    up_parts: int

    @property
    def projections(self) -> tuple[str, str]:
        return (self.up, DOWN)

    def parts(self, projection: str) -> int:
        return self.up_parts if projection == self.up else 1


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a fused experts module (3-D `gate_up_proj` / `up_proj` and `down_proj`), else None."""
    if isinstance(module, FP8Experts):
        return None
    gated = getattr(module, "has_gate", True)
    up = "gate_up_proj" if gated else "up_proj"
    weights = [module._parameters.get(name) for name in (up, DOWN)]
    if not all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights):
        return None
    up_w, down_w = weights
    transposed = bool(getattr(module, "is_transposed", False))
    if up_w.shape[0] != down_w.shape[0]:
        return None
    has_bias = isinstance(module._parameters.get(f"{up}_bias"), torch.Tensor)
    concatenated = bool(getattr(module, "is_concatenated", True))
    return ExpertsLayout(up=up, transposed=transposed, has_bias=has_bias, up_parts=2 if gated and concatenated else 1)


def moe_experts_modules(model: nn.Module) -> list[str]:
    """Names of the mixture-of-experts expert modules of `model`: fused experts (high precision or
    `FP8Experts`) and `experts` module lists (per-expert linears). Empty for a dense model."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, FP8Experts)
        or experts_layout(module) is not None
        or (name.rpartition(".")[2] == "experts" and isinstance(module, nn.ModuleList))
    ]


def canonical_weight(module: nn.Module, layout: ExpertsLayout, projection: str) -> torch.Tensor:
    """The high-precision weight of `projection` as [E, N, K] (a view: transposed layouts are not copied)."""
    weight = getattr(module, projection)
    return weight.transpose(1, 2) if layout.transposed else weight


def quantize_expert_weight(
    weight_hp: torch.Tensor, granularity: str, parts: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize one expert's weight [N, K]: (fp8 [N, K] contiguous, scale fp32 [parts] or [N, 1]).

    "tensor": one scale per part, the part being `N // parts` consecutive rows (gate rows, up rows),
    the scale each part would get as the separate tensor it is on disk; "channel": one per row.
    An empty or all-zero weight gets a positive scale (amax floored at `scaling.AMAX_FLOOR`).
    """
    if granularity not in ("tensor", "channel"):
        raise ValueError(f"quantize_expert_weight: granularity must be 'tensor' or 'channel', got {granularity!r}")
    n, k = weight_hp.shape
    if weight_hp.numel() == 0:
        scale_shape = (n, 1) if granularity == "channel" else (parts,)
        return torch.empty(n, k, dtype=scaling.FP8_DTYPE, device=weight_hp.device), scaling.amax_to_scale(
            torch.zeros(scale_shape, device=weight_hp.device)
        )
    if granularity == "channel" or parts == 1:
        q, scale = scaling.quantize_weight(weight_hp.contiguous(), granularity)
        return q, scale.reshape(n, 1) if granularity == "channel" else scale.reshape(1)
    rows = n // parts
    pieces = [scaling.quantize_weight(weight_hp[p * rows : (p + 1) * rows].contiguous(), "tensor") for p in range(parts)]
    return torch.cat([q for q, _ in pieces]), torch.stack([s.reshape(()) for _, s in pieces])


def _default_gate(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up for gate and up concatenated along the last dim (transformers' default gate)."""
    gate, up = gate_up.chunk(2, dim=-1)  # (S, I) each
    return module.act_fn(gate) * up


def gate_function(module: nn.Module) -> Any:
    """The function(module, gate_up [S, N]) -> [S, I] that a gated experts module applies."""
    return getattr(type(module), "_apply_gate", _default_gate)


def is_silu_concat_gate(module: nn.Module) -> bool:
    """True when `module` gates with transformers' default ``silu(gate) * up`` over concatenated
    gate / up columns (Mixtral, Qwen-MoE, DeepSeek, ...): `kernels.silu_mul_quantize_per_token` fuses it."""
    default = getattr(gate_function(module), "__name__", "") in ("_default_apply_gate", "_default_gate")
    concatenated = bool(getattr(module, "is_concatenated", True)) and getattr(module, "has_gate", True)
    return default and concatenated and type(getattr(module, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU")


def fused_gate_unavailable_reason(device: torch.device) -> str | None:
    """Why the fused gate + per-token quantize kernel cannot run on `device` (the Triton kernels' reason)."""
    return kernels.unavailable_reason(device)


class FP8Experts(FixedDtypeBuffers):
    """Fused MoE experts with FP8 E4M3 weights; the same function as the module it was made from.

    For each projection `p` in (`up`, "down_proj"), `up` being "gate_up_proj" or "up_proj":
        p: float8_e4m3fn [E, N, K] contiguous (not transposed, whatever the original layout was):
            gate_up [E, 2I, H] (or up [E, I, H]), down [E, H, I].
        p_weight_scale: fp32 [E, parts] per tensor (parts: see `ExpertsLayout.up_parts`) or
            [E, N, 1] per channel; expert e's W ≈ p[e] * scale of its part / row.
        p_input_scale: fp32 [E], one static activation scale per expert, or None (dynamic).
        p_bias: [E, N] in the model's dtype, or None.
    Activations: dynamic per token or per tensor (one scale for all the rows the projection
    multiplies, over every expert), or static per expert.

    forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], the
    signature of transformers' experts modules. GEMMs go through `scaling.fp8_grouped_matmul`
    (one `torch._scaled_grouped_mm` launch on compute capability 9.0, else a loop of `fp8_matmul`).
    Dynamic activations are quantized once per token before the rows are gathered per expert.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        up: str = "gate_up_proj",
        up_parts: int = 2,
        has_bias: bool = False,
        weight_granularity: str = "tensor",
        activation: str = "dynamic",
        activation_granularity: str = "tensor",
        use_fast_accum: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.up = up
        self.up_parts = up_parts
        self.has_gate = up == "gate_up_proj"
        self.has_bias = has_bias
        self.has_post_expert_norm = False
        self.weight_granularity = weight_granularity
        self.activation = activation
        self.activation_granularity = activation_granularity
        self.use_fast_accum = use_fast_accum
        self.gate_fn: Any = None  # function(module, gate_up) for gated experts (set by `like`)
        self.silu_concat_gate = False  # the gate is silu(gate) * up, concatenated (set by `like`)
        self.source_transposed = False  # the original module stored [E, K, N] (gpt-oss): checkpoints keep that
        up_rows = 2 * intermediate_size if self.has_gate else intermediate_size
        shapes = {up: (up_rows, hidden_size, up_parts), DOWN: (hidden_size, intermediate_size, 1)}
        fixed = []
        for proj, (n, k, parts) in shapes.items():
            scale_shape = (num_experts, n, 1) if weight_granularity == "channel" else (num_experts, parts)
            self.register_buffer(proj, torch.empty(num_experts, n, k, dtype=scaling.FP8_DTYPE, device=device))
            self.register_buffer(f"{proj}_weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
            static = torch.ones(num_experts, dtype=torch.float32, device=device) if activation == "static" else None
            self.register_buffer(f"{proj}_input_scale", static)
            bias = nn.Parameter(torch.zeros(num_experts, n, dtype=dtype, device=device), requires_grad=False)
            self.register_parameter(f"{proj}_bias", bias if has_bias else None)
            fixed += [proj, f"{proj}_weight_scale", f"{proj}_input_scale"]
        self.fixed_dtype_buffers = tuple(fixed)

    @property
    def projections(self) -> tuple[str, str]:
        return (self.up, DOWN)

    def layout(self) -> ExpertsLayout:
        """The layout of the high-precision module this one was made from (checkpoints store that)."""
        return ExpertsLayout(up=self.up, transposed=self.source_transposed, has_bias=self.has_bias, up_parts=self.up_parts)

    @classmethod
    def like(cls, module: nn.Module, config: QuantConfig) -> "FP8Experts":
        """An FP8Experts shaped for the fused experts `module` (weights not filled), on its device.

        Takes over the module's non-tensor attributes and submodules (`act_fn`, `config`, gpt-oss's
        `alpha` / `limit`, a post-expert norm) and its gate function, so the forward is the same.
        """
        layout = experts_layout(module)
        if layout is None:
            raise TypeError(f"{type(module).__name__} is not a fused experts module (3-D gate_up_proj / down_proj)")
        up_w = canonical_weight(module, layout, layout.up)
        down_w = canonical_weight(module, layout, DOWN)
        new = cls(
            down_w.shape[0],
            down_w.shape[1],
            down_w.shape[2],
            up=layout.up,
            up_parts=layout.up_parts,
            has_bias=layout.has_bias,
            weight_granularity=config.weight,
            activation=config.activation,
            activation_granularity=config.activation_granularity,
            use_fast_accum=config.use_fast_accum,
            device=up_w.device,
            dtype=up_w.dtype,
        )
        own = set(vars(new)) | {"is_transposed"}
        for name, value in vars(module).items():
            if not name.startswith("_") and name not in own:
                setattr(new, name, value)  # config, act settings, has_post_expert_norm, ...
        new.has_post_expert_norm = bool(getattr(module, "has_post_expert_norm", False))
        for name, child in module.named_children():
            new.add_module(name, child)  # act_fn, post_expert_norm
        if new.has_gate:
            new.gate_fn = gate_function(module)
        new.silu_concat_gate = is_silu_concat_gate(module)
        new.source_transposed = layout.transposed
        return new

    @classmethod
    def from_experts(
        cls, module: nn.Module, config: QuantConfig, input_scales: dict[str, torch.Tensor] | None = None
    ) -> "FP8Experts":
        """Quantize the fused experts `module` per `config`, expert by expert, on its device.

        input_scales: projection name -> fp32 [E] static activation scales (static configs only).
        """
        layout = experts_layout(module)
        new = cls.like(module, config)
        with torch.no_grad():
            for proj in layout.projections:
                weight_hp = canonical_weight(module, layout, proj).detach()  # (E, N, K)
                scale = getattr(new, f"{proj}_weight_scale")
                for e in range(weight_hp.shape[0]):
                    q, s = quantize_expert_weight(weight_hp[e], config.weight, layout.parts(proj))
                    getattr(new, proj)[e].copy_(q)
                    scale[e].copy_(s)
                if layout.has_bias:
                    getattr(new, f"{proj}_bias").copy_(getattr(module, f"{proj}_bias").detach())
                if config.activation == "static":
                    if input_scales is None or proj not in input_scales:
                        raise ValueError(f"FP8Experts.from_experts: static activations need input_scales[{proj!r}]")
                    getattr(new, f"{proj}_input_scale").copy_(input_scales[proj].reshape(-1))
        return new

    def row_scales(self, projection: str) -> torch.Tensor:
        """The weight scales of `projection` as one per output row of each expert: fp32 [E, N]."""
        scale = getattr(self, f"{projection}_weight_scale")
        e, n = getattr(self, projection).shape[:2]
        if scale.dim() == 3:  # per channel (E, N, 1)
            return scale.reshape(e, n)
        parts = scale.shape[1]
        return scale.unsqueeze(-1).expand(e, parts, n // parts).reshape(e, n)  # (E, N)

    def _project(
        self,
        projection: str,
        x: torch.Tensor,
        token: torch.Tensor | None,
        expert_ids: torch.Tensor,
        offsets: torch.Tensor,
        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Rows [S, N] of `projection` for the sorted rows (x[token] if `token` is given, else x);
        `quantized`: x already quantized, (fp8 rows, scale)."""
        input_scale = getattr(self, f"{projection}_input_scale")
        if quantized is not None:
            x_fp8, x_scale = quantized
        elif input_scale is not None:  # static: each row quantized with its expert's scale
            rows = x if token is None else x[token]  # (S, K)
            x_scale = input_scale[expert_ids].unsqueeze(-1)  # (S, 1)
            x_fp8 = scaling.quantize(rows, x_scale)
        else:
            x_fp8, x_scale = scaling.quantize_activation(x, self.activation_granularity)
            if token is not None:  # quantized once per token, then gathered (1 byte a value)
                x_fp8 = x_fp8.view(torch.uint8)[token].view(scaling.FP8_DTYPE)  # (S, K)
                x_scale = x_scale if x_scale.dim() == 0 else x_scale[token]  # [] or (S, 1)
        out = scaling.fp8_grouped_matmul(
            x_fp8,
            getattr(self, projection),
            x_scale,
            self.row_scales(projection),
            offsets,
            out_dtype=x.dtype,
            use_fast_accum=self.use_fast_accum,
        )  # (S, N)
        bias = getattr(self, f"{projection}_bias")
        return out if bias is None else out + bias[expert_ids]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_size)  # (T, H)
        top_k = top_k_index.shape[-1]
        expert_ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)  # (S,), S = T * k
        token = perm // top_k  # (S,) the token of each sorted row
        bounds = torch.arange(self.num_experts, device=expert_ids.device, dtype=expert_ids.dtype)
        offsets = torch.searchsorted(expert_ids, bounds, right=True, out_int32=True)  # (E,) group ends
        h = self._project(self.up, x, token, expert_ids, offsets)  # (S, 2I) or (S, I)
        if self._fuse_gate(h):  # silu(gate) * up and its per-token quantization in one kernel
            h_fp8, h_scale = kernels.silu_mul_quantize_per_token(h)  # (S, I) fp8, (S, 1)
            out = self._project(DOWN, h[:, : self.intermediate_size], None, expert_ids, offsets, (h_fp8, h_scale))
        else:
            h = self.gate_fn(self, h) if self.gate_fn is not None else self.act_fn(h)  # (S, I)
            out = self._project(DOWN, h, None, expert_ids, offsets)  # (S, H)
        if self.has_post_expert_norm:
            out = self.post_expert_norm(out)
        out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)  # (S, H)
        unsorted = out.new_empty(out.shape).index_copy_(0, perm, out)  # (S, H) in (token, k) order
        return unsorted.view(-1, top_k, self.hidden_size).sum(dim=1).to(hidden_states.dtype).reshape(hidden_states.shape)

    def _fuse_gate(self, h: torch.Tensor) -> bool:
        """Run the gate fused with the down projection's per-token quantization (CUDA, eager)."""
        return (
            self.silu_concat_gate
            and self.down_proj_input_scale is None
            and self.activation_granularity == "token"
            and not torch.compiler.is_compiling()
            and fused_gate_unavailable_reason(h.device) is None
        )

    def extra_repr(self) -> str:
        act = f"{self.activation}-{self.activation_granularity}"
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, up={self.up}, bias={self.has_bias}, "
            f"weight={self.weight_granularity}, activation={act}, use_fast_accum={self.use_fast_accum}"
        )


def static_input_scales(amax: torch.Tensor, tokens: torch.Tensor, name: str) -> torch.Tensor:
    """Static activation scales fp32 [E] of one projection of a layer's experts from calibration.

    amax fp32 [E], tokens int [E] (how many tokens each expert saw; `expert_input_amax`). An expert
    that saw tokens gets ``amax_to_scale(amax)``; one that saw none gets the largest scale of the
    experts that did (the same layer's inputs, the same kind of values: a scale that does not clip
    what its siblings saw); if no expert saw a token, `UNSEEN_FALLBACK_SCALE` with a warning.
    """
    seen = tokens > 0
    scales = scaling.amax_to_scale(amax.float())
    if bool(seen.all()):
        return scales
    if not bool(seen.any()):
        logger.warning(
            "%s: no expert saw a calibration token; static input scales set to %s (amax %s)",
            name, UNSEEN_FALLBACK_SCALE, UNSEEN_FALLBACK_SCALE * scaling.FP8_MAX,
        )
        return torch.full_like(scales, UNSEEN_FALLBACK_SCALE)
    unseen = (~seen).nonzero().flatten().tolist()
    logger.info("%s: experts %s saw no calibration token; they take the layer's largest scale", name, unseen)
    return torch.where(seen, scales, scales[seen].max())


@torch.no_grad()
def expert_input_amax(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    valid: torch.Tensor | None,
    all_experts: bool,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Absmax of each expert's input to each projection of the high-precision fused experts `module`.

    hidden_states [T, H] (or [..., H]); top_k_index [T, k]; valid: bool [T] (False = padding) or None.
    all_experts: every expert sees every valid token (llm-compressor's calibrate-all-experts), else
    only the tokens routed to it. Returns projection -> (amax fp32 [E], tokens int64 [E]), the
    number of tokens each expert saw (0: no amax, its entry is 0).
    """
    layout = experts_layout(module)
    x = hidden_states.reshape(-1, hidden_states.shape[-1])  # (T, H)
    ids = top_k_index.reshape(x.shape[0], -1)  # (T, k)
    if valid is None:
        valid = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    num_experts = getattr(module, layout.up).shape[0]
    gate = gate_function(module) if layout.up == "gate_up_proj" else None
    stats = {proj: (torch.zeros(num_experts), torch.zeros(num_experts, dtype=torch.int64)) for proj in layout.projections}
    for e in range(num_experts):
        rows = valid if all_experts else valid & (ids == e).any(dim=-1)  # (T,)
        count = int(rows.sum())
        if count == 0:
            continue
        x_e = x[rows]  # (R, H)
        h = x_e @ canonical_weight(module, layout, layout.up)[e].T  # (R, N)
        if layout.has_bias:
            h = h + getattr(module, f"{layout.up}_bias")[e]
        h = gate(module, h) if gate is not None else module.act_fn(h)  # (R, I)
        for proj, inp in ((layout.up, x_e), (DOWN, h)):
            stats[proj][0][e] = inp.abs().amax().float().cpu()
            stats[proj][1][e] = count
    return stats
