"""`FP8Linear`: an `nn.Linear` replacement whose forward is `torch._scaled_mm`."""

from __future__ import annotations

import torch
from torch import nn

from . import algorithms, scaling, skinny
from .config import QuantConfig

__all__ = ["FP8Linear", "FixedDtypeBuffers"]

_MISSING = object()


class FixedDtypeBuffers(nn.Module):
    """A module whose buffers named in `fixed_dtype_buffers` keep their dtype under `.to(dtype)` / `.half()`.

    float8 counts as a floating type, so without this guard `.half()` would turn FP8 weights into
    fp16 (and fp32 scales into fp16). Device moves still apply.
    """

    fixed_dtype_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        kept = {name: self._buffers.pop(name) for name in self.fixed_dtype_buffers if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in kept.items():
                if tensor is not None:
                    # Learn the target device from a probe: `fn` may also change dtype, which we refuse.
                    device = fn(torch.empty(0, device=tensor.device)).device
                    tensor = tensor.to(device)
                self._buffers[name] = tensor
        return self


class FP8Linear(FixedDtypeBuffers):
    """y = x @ W.T + b with W stored in FP8 E4M3 and x quantized to FP8 on the fly.

    Buffers:
        weight: float8_e4m3fn [N, K] contiguous (N = out_features, K = in_features).
        weight_scale: fp32 [] (per tensor), [N, 1] (per channel) or, for block weights,
            [ceil(N / bn), ceil(K / bk)] (one per `block_size` (bn, bk) block, edge blocks partial);
            W ≈ weight * weight_scale (broadcast, or repeated over each block).
        input_scale: fp32 [] for static activations (from calibration), else None.
    Parameter:
        bias: [N] in the model's dtype, or None.
    """

    fixed_dtype_buffers = ("weight", "weight_scale", "input_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_granularity: str = "tensor",
        activation: str = "dynamic",
        activation_granularity: str = "tensor",
        use_fast_accum: bool = False,
        block_size: tuple[int, int] = (128, 128),
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_granularity = weight_granularity
        self.activation = activation
        self.activation_granularity = activation_granularity
        self.use_fast_accum = use_fast_accum
        self.block_size = tuple(block_size)  # (bn, bk): used by block weights (and their 1 x bk activation groups)
        # Block weights: the dtype their scales are exact in (the original weight's; `scaling.quantize_weight`
        # rounds them up to it), which compressed-tensors checkpoints store them in.
        self.scale_dtype = torch.float32
        if weight_granularity == "block":
            bn, bk = self.block_size
            scale_shape = (-(-out_features // bn), -(-in_features // bk))
        else:
            scale_shape = (out_features, 1) if weight_granularity == "channel" else ()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=scaling.FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        input_scale = torch.ones((), dtype=torch.float32, device=device) if activation == "static" else None
        self.register_buffer("input_scale", input_scale)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # Fused skinny-M launches (`skinny.plan_for`), one per (M, input dtype, device); None = existing path.
        self._skinny_scheme = skinny.scheme_of(activation, activation_granularity, weight_granularity)
        self._skinny_plans: dict[tuple, object] = {}

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: QuantConfig,
        input_scale: torch.Tensor | None = None,
        hessian: torch.Tensor | None = None,
    ) -> "FP8Linear":
        """Quantize `linear`'s weight (on its device) per `config`; `input_scale` for static activations.

        hessian: fp32 [K, K] second moment of the layer's inputs, for `config.algorithm` "gptq" (and
        to weight the "mse" search by input channel); see `algorithms.quantize_weight`.
        """
        weight_hp = linear.weight.detach()
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_granularity=config.weight,
            activation=config.activation,
            activation_granularity=config.activation_granularity,
            use_fast_accum=config.use_fast_accum,
            block_size=config.block_size,
            device=weight_hp.device,
            dtype=weight_hp.dtype,
        )
        # "max": Triton kernels on a GPU (no fp32 temporaries), else torch: weight_scale (N, 1), () or blocks.
        weight_fp8, weight_scale = algorithms.quantize_weight(weight_hp, config, hessian)
        new.weight.copy_(weight_fp8)
        new.weight_scale.copy_(weight_scale)
        if config.weight == "block":
            new.scale_dtype = weight_hp.dtype
        if config.activation == "static":
            if input_scale is None:
                raise ValueError("FP8Linear.from_linear: static activations need an input_scale")
            new.input_scale.copy_(input_scale.reshape(()))
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2  # (M, K) already: no reshapes (each costs host time in eager decode)
        x2d = x if flat else x.reshape(-1, self.in_features)  # (M, K), M = prod(leading dims)
        if self.weight_granularity == "block":
            # x_scale (M, ceil(K / bk)) column-major: Triton kernel on GPU in eager, torch ops when compiled.
            x_fp8, x_scale = scaling.quantize_activation(x2d, "group", group_size=self.block_size[1])
            out = scaling.fp8_block_matmul(
                x_fp8,
                self.weight,
                x_scale,
                self.weight_scale,
                self.block_size,
                bias=self.bias,
                out_dtype=x.dtype,
                use_fast_accum=self.use_fast_accum,
            )  # (M, N)
            return out if flat else out.reshape(*x.shape[:-1], self.out_features)
        if x2d.is_cuda and x2d.shape[0] <= skinny.MAX_M:  # device first: no guard on M on CPU
            if not torch.compiler.is_compiling():
                out = self._fused(x2d)  # one launch where measured faster (decode sizes), else None
            elif skinny.rule_for(self._skinny_scheme, x2d.shape[0], self.out_features, self.in_features) is not None:
                # Compiled: the same kernels as one opaque operator (torch ops would replace them).
                out = torch.ops.fp8kit.skinny_linear(
                    x2d, self.weight, self.weight_scale, self.input_scale, self.bias, self._skinny_scheme,
                    self.use_fast_accum,
                )  # fmt: skip
            else:
                out = None
            if out is not None:
                return out if flat else out.reshape(*x.shape[:-1], self.out_features)
        # Triton kernels on GPU in eager; the torch reference ops under torch.compile.
        out = scaling.quantized_linear(
            x2d, self.weight, self.weight_scale, self.input_scale, self.bias, self.activation_granularity,
            out_dtype=x.dtype, use_fast_accum=self.use_fast_accum,
        )  # (M, N)
        return out if flat else out.reshape(*x.shape[:-1], self.out_features)

    def _fused(self, x2d: torch.Tensor) -> torch.Tensor | None:
        """The fused skinny-M kernel's output for x2d [M, K] (CUDA), or None where it does not run.

        Plans are cached per (M, dtype, device, inside CUDA-graph capture or not): `skinny.TABLE` may
        choose another mode under capture (see `skinny.Rule`), so a replay can differ from an eager call
        in the last bits (the same FP8 error bound). The first eager call also compiles the capture-mode
        plan, so that no Triton compilation happens inside a capture.
        """
        capturing = torch.cuda.is_current_stream_capturing()
        key = (x2d.shape[0], x2d.dtype, x2d.device, capturing)
        entry = self._skinny_plans.get(key, _MISSING)
        if entry is _MISSING:
            out = self._plan(key, x2d)
            if not capturing:
                self._plan((*key[:3], True), x2d)  # compile the capture-mode plan now, outside capture
            return out
        if entry is None or not x2d.is_contiguous():
            return None
        return self._run(entry, x2d)

    def _run(self, entry: tuple, x2d: torch.Tensor) -> torch.Tensor:
        return skinny.run_plan(
            entry, x2d, self.weight, self.weight_scale, self.input_scale, self.bias, self.activation_granularity
        )

    def _plan(self, key: tuple, x2d: torch.Tensor) -> torch.Tensor | None:
        """Plan `key` (see `_fused`), run it once (Triton compiles here) and cache it; a plan that fails
        to run is logged once and cached as None, so the layer keeps the existing path."""
        if key in self._skinny_plans:
            return None
        entry, out = skinny.plan_and_run(
            self._skinny_scheme, x2d, self.weight, self.weight_scale, self.input_scale, self.bias,
            self.activation_granularity, capturing=key[3], fast_accum=self.use_fast_accum,
        )  # fmt: skip
        if entry is not None or not torch.cuda.is_current_stream_capturing():  # None in capture: ask again later
            self._skinny_plans[key] = entry
        return out

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_skinny_plans"] = {}  # launch plans hold device workspaces: never copied or pickled
        return state

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        self._skinny_plans.clear()  # a new device or bias dtype: plan again
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        act = f"{self.activation}-{self.activation_granularity}"
        weight = self.weight_granularity
        if weight == "block":
            weight = f"block{self.block_size[0]}x{self.block_size[1]}"
            act = f"{act}1x{self.block_size[1]}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight={weight}, activation={act}, use_fast_accum={self.use_fast_accum}"
        )
