"""Triton kernels that quantize a 2-D tensor to FP8 E4M3 near the memory floor.

Bit-identical to the torch reference in `scaling` (``scale = max(amax, 1e-12) / 448`` with IEEE fp32
division, ``q = cast_fp8(clamp(x / scale, -448, 448))``, NaN propagated like ``torch.amax``):

- `quantize_per_token`: one launch; one scale per row.
- `quantize_per_group`: one launch; one scale per 1 x group_size group of a row (block-wise FP8),
  written column-major as torch's block-wise GEMM takes it.
- `quantize_per_tensor`: one launch up to 2^15 elements (decode sizes: every program reduces the
  whole small tensor, then quantizes its slice), else two (per-program partial amax, then
  quantize); the scale stays on the device (no host sync, CUDA-graph capturable).
- `quantize_static`: one launch with a given scale.
- `scale_epilogue`: one launch, ``out = acc * x_scale[m] * w_scale[n] (+ bias[n])`` cast to
  bf16 / fp16 / fp32; `scaling.fp8_matmul` runs it after a unit-scale `_scaled_mm` with fp32
  output for skinny row-wise GEMMs (see there).

amax is reduced on the int32 bit patterns of ``|x|`` in fp32: for non-negative floats the integer
order is the float order, and every NaN pattern sorts above +inf, so a NaN anywhere makes the amax
NaN exactly as ``torch.amax`` does. Triton is imported on first use only (`fp8kit.core` imports
without it); inputs must be contiguous or are copied to a contiguous tensor first.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from types import SimpleNamespace

import torch

__all__ = [
    "silu_mul_quantize_per_token",
    "unavailable_reason",
    "quantize_per_token",
    "quantize_per_group",
    "quantize_per_tensor",
    "quantize_static",
    "scale_epilogue",
]

_FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = 448.0  # == scaling.FP8_MAX (checked by the tests)
_AMAX_FLOOR = 1e-12  # == scaling.AMAX_FLOOR
_FLOOR_BITS = struct.unpack("<i", struct.pack("<f", _AMAX_FLOOR))[0]  # int32 pattern of fp32(1e-12)
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_OUT_DTYPES = (_FP8_DTYPE, torch.float32)  # float32: the clamped values before the cast (tests)

# Tuning (H100; see docs/dev/kernels-notes.md). Module attributes so tests can shrink them.
_MAX_ONE_PASS_K = 16384  # rows up to this long are held in registers (read once); longer rows loop twice
_LOOP_BLOCK_K = 4096
_SMALL_NUMEL = 1 << 15  # per-tensor: up to this many elements, one launch (each program reduces it all)
_SMALL_BLOCK_A = 32768  # elements per amax step of that one-launch kernel
_SMALL_SLICE = 2048  # elements each of its programs quantizes
_FLAT_BLOCK = 8192  # elements per program of the flat (static / per-tensor) kernels on large tensors
_FLAT_BLOCK_SMALL = 1024  # ... on tensors under _FLAT_SMALL_NUMEL: more programs for decode sizes
_FLAT_SMALL_NUMEL = 1 << 22
_PARTIALS_PER_SM = 4
# Per-token rows of at least this many columns (and at most _MAX_ONE_PASS_K) are split over several
# programs of _SPLIT_ROW_SLICE columns each when the grid stays within _SPLIT_ROW_PER_SM programs per SM
# (decode sizes).
_SPLIT_ROW_MIN_K = 8192
_SPLIT_ROW_SLICE = 1024
_SPLIT_ROW_PER_SM = 2
_EPILOGUE_BLOCK_N = 512  # output columns per program of the scale epilogue (one row per program)
_GROUP_TILE_K = 1024  # per-group kernel: columns (whole groups) per program
_GROUP_TILE = 4096  # ... and about this many elements per program (rows x columns)
_EPILOGUE_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

triton = None  # bound by _build(), with tl and the @triton.jit helpers below
tl = None
_abs_bits = _scale_from_bits = _quantize = _silu_mul = _to_fp8_grid = _fused_epilogue = None

# Host-side caches (plain dicts, not functools caches: cheaper per call, and nothing here is
# reached under torch.compile, where `scaling` dispatches to the torch reference ops instead).
_UNKNOWN = object()
_reasons: dict[torch.device, str | None] = {}  # unavailable_reason per device (cuda devices with an index)
_import_error: object = _UNKNOWN  # _triton_import_error() once
_kernels: SimpleNamespace | None = None  # _build() once
_sms: dict[torch.device, int] = {}

# Direct launch (see `_launch`): cached CompiledKernel per specialization key. Switch off to use
# Triton's own launcher on every call (same kernels, same bits; ~10-20 µs more host time a call).
DIRECT_LAUNCH = True
_DIRECT_LAUNCH_VERSIONS = {(3, 6)}  # (major, minor) verified bit-exact on an H100 by tests/core/test_kernels_cuda.py
_launchers: dict[tuple, tuple] = {}
_driver = SimpleNamespace(ok=False)  # bound by _build(): current device / stream getters, launch hooks


def _triton_import_error() -> str | None:
    global _import_error
    if _import_error is _UNKNOWN:
        try:
            import triton as _t  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            _import_error = f"{type(exc).__name__}: {exc}"
        else:
            _import_error = None
    return _import_error


def _cuda_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(index)
        return f"{name} has compute capability {major}.{minor}; FP8 kernels need 8.9 or newer"
    error = _triton_import_error()
    if error is not None:
        return f"triton is not importable ({error}); install triton to use the FP8 kernels"
    return None


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the Triton FP8 kernels cannot run on `device`, or None when they can.

    They need a CUDA device of compute capability >= 8.9 and an importable `triton`. The answer
    is cached per device (a tensor's device, e.g. ``cuda:0``): one dict lookup per call.
    """
    reason = _reasons.get(device, _UNKNOWN) if type(device) is torch.device else _UNKNOWN
    if reason is not _UNKNOWN:
        return reason
    device = torch.device(device)
    if device.type != "cuda":
        return f"Triton FP8 kernels need a CUDA device, not {device.type!r}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if device.index is None:  # "cuda": the current device, which may change; cache under its index
        device = torch.device("cuda", torch.cuda.current_device())
    reason = _reasons.get(device, _UNKNOWN)
    if reason is _UNKNOWN:
        reason = _reasons[device] = _cuda_reason(device.index)
    return reason


def _build() -> SimpleNamespace:
    """Import triton and define the kernels (once; `TRITON_INTERPRET` is read here)."""
    if _kernels is None:
        _define_kernels()
    return _kernels


def _define_kernels() -> None:
    # Names the kernels call must be module globals: Triton resolves them there, not in closures.
    global triton, tl, _abs_bits, _scale_from_bits, _quantize, _silu_mul, _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def _abs_bits(x):
        # int32 pattern of |x| in fp32: integer order == float order, any NaN > +inf.
        return tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True)

    @triton.jit
    def _scale_from_bits(bits, FLOOR_BITS: tl.constexpr):
        # max(amax, 1e-12) / 448 with IEEE division; NaN amax stays NaN.
        amax = tl.maximum(bits, FLOOR_BITS).to(tl.float32, bitcast=True)
        return tl.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))

    @triton.jit
    def _quantize(x, scale):
        # clamp(x / scale, -448, 448) in fp32, NaN-propagating (as torch.clamp).
        q = tl.div_rn(x, scale)
        q = tl.maximum(q, -448.0, propagate_nan=tl.PropagateNan.ALL)
        return tl.minimum(q, 448.0, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def per_token_kernel(
        x_ptr, q_ptr, s_ptr, M, K,
        FLOOR_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_mask = rows < M
        row_off = rows.to(tl.int64)[:, None] * K  # (BLOCK_M, 1)
        cols = tl.arange(0, BLOCK_K)[None, :]  # (1, BLOCK_K)
        if ONE_PASS:  # the whole row tile in registers: read once
            mask = row_mask[:, None] & (cols < K)
            x = tl.load(x_ptr + row_off + cols, mask=mask, other=0.0).to(tl.float32)
            scale = _scale_from_bits(tl.max(_abs_bits(x), axis=1), FLOOR_BITS)  # (BLOCK_M,)
            q = _quantize(x, scale[:, None])
            tl.store(q_ptr + row_off + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        else:  # long rows: amax pass, then quantize pass (the second read mostly hits L2)
            acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                mask = row_mask[:, None] & (cols + k0 < K)
                x = tl.load(x_ptr + row_off + k0 + cols, mask=mask, other=0.0)
                acc = tl.maximum(acc, _abs_bits(x))
            scale = _scale_from_bits(tl.max(acc, axis=1), FLOOR_BITS)
            for k0 in range(0, K, BLOCK_K):
                mask = row_mask[:, None] & (cols + k0 < K)
                x = tl.load(x_ptr + row_off + k0 + cols, mask=mask, other=0.0).to(tl.float32)
                q = _quantize(x, scale[:, None])
                tl.store(q_ptr + row_off + k0 + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows, scale, mask=row_mask)

    @triton.jit
    def per_token_split_kernel(
        x_ptr, q_ptr, s_ptr, K, FLOOR_BITS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_K: tl.constexpr,
        SLICE: tl.constexpr,
    ):  # fmt: skip
        # Program p: row p // SPLIT reduced whole (read from L2 by each of its SPLIT programs), then
        # columns [s * SLICE, (s + 1) * SLICE) of it quantized, s = p % SPLIT. Same values as per_token_kernel.
        pid = tl.program_id(0)
        row = pid // SPLIT
        part = pid % SPLIT
        x_row = x_ptr + row.to(tl.int64) * K
        cols = tl.arange(0, BLOCK_K)
        bits = _abs_bits(tl.load(x_row + cols, mask=cols < K, other=0.0))
        scale = _scale_from_bits(tl.max(bits, axis=0), FLOOR_BITS)
        mine = part * SLICE + tl.arange(0, SLICE)
        x = tl.load(x_row + mine, mask=mine < K, other=0.0).to(tl.float32)
        q = _quantize(x, scale)
        tl.store(q_ptr + row.to(tl.int64) * K + mine, q.to(q_ptr.dtype.element_ty), mask=mine < K)
        if part == 0:
            tl.store(s_ptr + row, scale)

    @triton.jit
    def per_group_kernel(
        x_ptr, q_ptr, s_ptr, M, K, TILES_K,
        FLOOR_BITS: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        # Program p: rows of tile p // TILES_K, GROUPS whole groups of tile p % TILES_K; read once.
        pid = tl.program_id(0)
        rows = (pid // TILES_K) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        group0 = (pid % TILES_K) * GROUPS
        cols = group0 * GROUP + tl.arange(0, GROUPS * GROUP)  # (GROUPS * GROUP,)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        offs = rows.to(tl.int64)[:, None] * K + cols[None, :]  # (BLOCK_M, GROUPS * GROUP)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # padding 0: no effect on amax
        x3 = tl.reshape(x, (BLOCK_M, GROUPS, GROUP))
        scale = _scale_from_bits(tl.max(_abs_bits(x3), axis=2), FLOOR_BITS)  # (BLOCK_M, GROUPS)
        q = tl.reshape(_quantize(x3, scale[:, :, None]), (BLOCK_M, GROUPS * GROUP))
        tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        groups = group0 + tl.arange(0, GROUPS)  # (GROUPS,)
        s_offs = groups.to(tl.int64)[None, :] * M + rows[:, None]  # column-major (M, L): [L, M] storage
        s_mask = (rows < M)[:, None] & (groups * GROUP < K)[None, :]
        tl.store(s_ptr + s_offs, scale, mask=s_mask)

    @triton.jit
    def static_kernel(x_ptr, q_ptr, s_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        scale = tl.load(s_ptr)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + offs, _quantize(x, scale).to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def amax_partial_kernel(x_ptr, part_ptr, N, BLOCK: tl.constexpr):
        # Program p reduces blocks p, p + P, p + 2P, ... into part_ptr[p] (int32 bits of the amax).
        pid = tl.program_id(0)
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(pid.to(tl.int64) * BLOCK, N, step):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
            acc = tl.maximum(acc, _abs_bits(x))
        tl.store(part_ptr + pid, tl.max(acc, axis=0))

    @triton.jit
    def per_tensor_quant_kernel(
        x_ptr, q_ptr, part_ptr, s_ptr, N, P, FLOOR_BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr
    ):
        # Every program reduces the P partials (from L2) to the same scale; program 0 stores it.
        pidx = tl.arange(0, BLOCK_P)
        bits = tl.max(tl.load(part_ptr + pidx, mask=pidx < P, other=0), axis=0)
        scale = _scale_from_bits(bits, FLOOR_BITS)
        pid = tl.program_id(0)
        if pid == 0:
            tl.store(s_ptr, scale)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + offs, _quantize(x, scale).to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def per_tensor_small_kernel(
        x_ptr, q_ptr, s_ptr, N, FLOOR_BITS: tl.constexpr, BLOCK_A: tl.constexpr, SLICE: tl.constexpr
    ):
        # One launch for small (decode-size) tensors: every program reduces the whole tensor (L2-resident
        # after the first touch) to the same scale, then quantizes its own SLICE; program 0 stores the scale.
        acc = tl.zeros([BLOCK_A], dtype=tl.int32)
        for start in range(0, N, BLOCK_A):
            offs = start + tl.arange(0, BLOCK_A)
            x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
            acc = tl.maximum(acc, _abs_bits(x))
        scale = _scale_from_bits(tl.max(acc, axis=0), FLOOR_BITS)
        pid = tl.program_id(0)
        if pid == 0:
            tl.store(s_ptr, scale)
        offs = pid * SLICE + tl.arange(0, SLICE)
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + offs, _quantize(x, scale).to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def scale_epilogue_kernel(
        acc_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, N, BLOCKS_N,
        SA_ROWS: tl.constexpr, SB_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # Program p: row p // BLOCKS_N, columns of block p % BLOCKS_N; all math in fp32, one rounding
        # to the output dtype at the end.
        pid = tl.program_id(0)
        row = pid // BLOCKS_N
        cols = (pid % BLOCKS_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < N
        offs = row.to(tl.int64) * N + cols
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
        if SA_ROWS:
            acc = acc * tl.load(sa_ptr + row)
        else:
            acc = acc * tl.load(sa_ptr)
        if SB_ROWS:
            out = acc * tl.load(sb_ptr + cols, mask=mask, other=0.0)
        else:
            out = acc * tl.load(sb_ptr)
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul(g, u, DTYPE: tl.constexpr):
        # silu(gate) * up as torch computes it in DTYPE: silu in fp32 rounded to DTYPE, then the
        # product in fp32 rounded to DTYPE (no-ops for fp32); returned in fp32.
        act = (g / (1.0 + tl.exp(-g))).to(DTYPE).to(tl.float32)
        return (act * u).to(DTYPE).to(tl.float32)

    @triton.jit
    def silu_mul_per_token_kernel(
        x_ptr, q_ptr, s_ptr, M, N,
        FLOOR_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
    ):  # fmt: skip
        # x: (M, 2N) = [gate | up]; q: (M, N) = quantize(silu(gate) * up), one scale per row.
        dtype = x_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_mask = rows < M
        in_off = rows.to(tl.int64)[:, None] * (2 * N)  # (BLOCK_M, 1)
        out_off = rows.to(tl.int64)[:, None] * N
        cols = tl.arange(0, BLOCK_K)[None, :]  # (1, BLOCK_K)
        if ONE_PASS:  # the whole row in registers: gate / up read once
            mask = row_mask[:, None] & (cols < N)
            g = tl.load(x_ptr + in_off + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + in_off + N + cols, mask=mask, other=0.0).to(tl.float32)
            h = _silu_mul(g, u, dtype)
            scale = _scale_from_bits(tl.max(_abs_bits(h), axis=1), FLOOR_BITS)  # (BLOCK_M,)
            tl.store(q_ptr + out_off + cols, _quantize(h, scale[:, None]).to(q_ptr.dtype.element_ty), mask=mask)
        else:  # long rows: amax pass, then recompute and quantize
            acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
            for k0 in range(0, N, BLOCK_K):
                mask = row_mask[:, None] & (cols + k0 < N)
                g = tl.load(x_ptr + in_off + k0 + cols, mask=mask, other=0.0).to(tl.float32)
                u = tl.load(x_ptr + in_off + N + k0 + cols, mask=mask, other=0.0).to(tl.float32)
                acc = tl.maximum(acc, _abs_bits(_silu_mul(g, u, dtype)))
            scale = _scale_from_bits(tl.max(acc, axis=1), FLOOR_BITS)
            for k0 in range(0, N, BLOCK_K):
                mask = row_mask[:, None] & (cols + k0 < N)
                g = tl.load(x_ptr + in_off + k0 + cols, mask=mask, other=0.0).to(tl.float32)
                u = tl.load(x_ptr + in_off + N + k0 + cols, mask=mask, other=0.0).to(tl.float32)
                q = _quantize(_silu_mul(g, u, dtype), scale[:, None])
                tl.store(q_ptr + out_off + k0 + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows, scale, mask=row_mask)

    _bind_driver()
    _kernels = SimpleNamespace(
        silu_mul_per_token=silu_mul_per_token_kernel,
        fused_linear=_define_fused_linear(),
        scale_epilogue=scale_epilogue_kernel,
        per_token=per_token_kernel,
        per_token_split=per_token_split_kernel,
        per_group=per_group_kernel,
        static=static_kernel,
        amax_partial=amax_partial_kernel,
        per_tensor_quant=per_tensor_quant_kernel,
        per_tensor_small=per_tensor_small_kernel,
    )


def _bind_driver() -> None:
    """Bind what `_launch` needs from Triton's runtime, or leave `_driver.ok` False.

    Direct launches rely on Triton internals (`triton.knobs`; the launcher taking every argument,
    constexprs included, in parameter order) whose signature changes between releases, so they are
    used only on the Triton versions the GPU tests ran on (`_DIRECT_LAUNCH_VERSIONS`); any other
    version, or the interpreter, keeps Triton's own launcher.
    """
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) not in _DIRECT_LAUNCH_VERSIONS:
        return
    try:
        from triton.runtime import driver

        knobs = triton.knobs
        if getattr(knobs.runtime, "interpret", False):  # CPU interpreter: nothing to launch directly
            return
        active = driver.active
        _driver.current_device = active.get_current_device
        _driver.current_stream = active.get_current_stream
        _driver.runtime = knobs.runtime
    except Exception:  # an older / different Triton, no GPU driver: Triton's launcher only
        return
    _driver.ok = True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _num_sms(device: torch.device) -> int:
    sms = _sms.get(device)
    if sms is None:
        # The interpreter (tests, CPU tensors): a few partials.
        cuda = device.type == "cuda"
        sms = _sms[device] = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4
    return sms


def _spec(args: tuple) -> tuple:
    """What Triton (3.x) specializes a compiled kernel on, for the runtime arguments `args`:
    a tensor's dtype and 16-byte alignment; an int's value 1, divisibility by 16 and 32/64-bit range."""
    return tuple(
        (a.dtype, a.data_ptr() % 16 == 0)
        if isinstance(a, torch.Tensor)
        else (a == 1, a % 16 == 0, -0x80000000 <= a <= 0x7FFFFFFF)
        for a in args
    )


def _launch(
    kernel, grid: int, args: tuple, consts: tuple, num_warps: int, device: torch.device, num_stages: int | None = None
) -> None:
    """``kernel[(grid,)](*args, *consts, num_warps=num_warps[, num_stages=num_stages])`` with less host time.

    `args`: the runtime arguments (tensors, ints), `consts`: the constexpr values, both in the
    kernel's parameter order (constexprs last). Triton's `JITFunction.run` spends ~10-20 µs a call
    binding arguments, reading knobs and hashing options before it reaches the compiled kernel's
    launcher. On CUDA the first call per specialization key (`_spec` + constexprs + warps + stages +
    current device) goes through it and keeps the CompiledKernel; later calls launch that kernel
    directly, the way `JITFunction.run` does (current stream, launch hooks, launch metadata).
    """
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    if not (DIRECT_LAUNCH and _driver.ok and device.type == "cuda"):
        kernel[(grid,)](*args, *consts, **options)
        return
    dev = _driver.current_device()
    key = (id(kernel), dev, num_warps, num_stages, consts, _spec(args))
    entry = _launchers.get(key)
    if entry is None:
        compiled = kernel[(grid,)](*args, *consts, **options)  # compiles once, launches
        try:
            _launchers[key] = (compiled, compiled.run, compiled.function, compiled.packed_metadata)
        except AttributeError:  # not a CompiledKernel as expected: keep Triton's launcher
            _launchers[key] = (None,)
        return
    compiled = entry[0]
    if compiled is None:
        kernel[(grid,)](*args, *consts, **options)
        return
    _, run, function, packed = entry
    stream = _driver.current_stream(dev)
    runtime = _driver.runtime
    grid3 = (grid, 1, 1)
    metadata = compiled.launch_metadata(grid3, stream, *args, *consts)
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    run(grid, 1, 1, stream, function, packed, metadata, enter, exit_, *args, *consts)


def _prepare(x: torch.Tensor, name: str, out: torch.Tensor | None, out_dtype: torch.dtype) -> tuple:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D activation [M, K], got shape {tuple(x.shape)}; flatten it first")
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(f"{name}: input dtype {x.dtype} is not supported; use bfloat16, float16 or float32")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"{name}: out_dtype must be torch.float8_e4m3fn (or float32 for tests), got {out_dtype}")
    x = x.contiguous()  # no copy when already contiguous
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != out_dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(
            f"{name}: out must be a contiguous {out_dtype} tensor of shape {tuple(x.shape)} on {x.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return x, out


def _warps(elements: int, programs: int, device: torch.device) -> int:
    """Warps per program: ~32 elements a thread on large grids; more threads when the grid is
    smaller than the GPU (decode sizes), where the per-element division would dominate."""
    if programs < _num_sms(device):
        return max(4, min(32, elements // 256))
    return max(4, min(16, elements // 1024))


def _flat_block(n: int) -> tuple[int, int]:
    """(elements per program, warps) of the flat kernels for a tensor of `n` elements."""
    return (_FLAT_BLOCK, 8) if n >= _FLAT_SMALL_NUMEL else (_FLAT_BLOCK_SMALL, 4)


def quantize_per_token(
    x: torch.Tensor, *, out: torch.Tensor | None = None, out_dtype: torch.dtype = _FP8_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (row-wise) quantization in one launch.

    x: [M, K] bf16 / fp16 / fp32. Returns (q fp8 [M, K], scale fp32 [M, 1]) with
    ``scale = max(row absmax, 1e-12) / 448``. `out`: optional preallocated q; `out_dtype=float32`
    returns the clamped ``x / scale`` before the FP8 cast (to test under the Triton interpreter).
    """
    x, out = _prepare(x, "quantize_per_token", out, out_dtype)
    m, k = x.shape
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m and _SPLIT_ROW_MIN_K <= k <= _MAX_ONE_PASS_K and m * _cdiv(k, _SPLIT_ROW_SLICE) <= _SPLIT_ROW_PER_SM * _num_sms(x.device):
        # Decode sizes: a row per program leaves most of the GPU idle and serializes each row's work.
        split = _cdiv(k, _SPLIT_ROW_SLICE)
        _launch(
            _build().per_token_split, m * split, (x, out, scale, k),
            (_FLOOR_BITS, split, max(16, _next_pow2(k)), _SPLIT_ROW_SLICE), 8 if k > 4096 else 4, x.device,
        )  # fmt: skip
    elif m:
        _launch_rows(_build().per_token, x, out, scale, m, k, 1)
    return out, scale


def _launch_rows(kernel, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, m: int, k: int, loads: int) -> None:
    """Launch a row kernel (``kernel(x, out, scale, M, K, FLOOR_BITS, BLOCK_M, BLOCK_K, ONE_PASS)``) over m
    rows of k outputs, each computed from `loads` input values: tiles of BLOCK_M rows, a row read once
    (held in registers) when k <= _MAX_ONE_PASS_K, else in two passes of _LOOP_BLOCK_K columns."""
    one_pass = k <= _MAX_ONE_PASS_K
    block_k = max(16, _next_pow2(k)) if one_pass else _LOOP_BLOCK_K
    block_m = min(_next_pow2(m), max(1, 4096 // block_k))
    programs = _cdiv(m, block_m)
    _launch(
        kernel, programs, (x, out, scale, m, k), (_FLOOR_BITS, block_m, block_k, one_pass),
        _warps(loads * block_m * block_k, programs, x.device), x.device,
    )  # fmt: skip


def silu_mul_quantize_per_token(
    gate_up: torch.Tensor, *, out_dtype: torch.dtype = _FP8_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(gate) * up`` quantized per token in one launch (the gate of SiLU-gated MoE experts).

    gate_up: [M, 2N] bf16 / fp16 / fp32, gate columns then up columns (transformers' concatenated
    layout). Returns (q fp8 [M, N], scale fp32 [M, 1]): `quantize_per_token` of ``silu(gate) * up``
    computed as torch does in gate_up's dtype (silu rounded to it, then the product rounded to it),
    without writing that product to memory. Same values as the unfused ops up to the last bit of
    `exp` (Triton's vs torch's), hence not guaranteed bit-identical.
    """
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul_quantize_per_token: expected [M, 2N], got shape {tuple(gate_up.shape)}")
    if gate_up.dtype not in _INPUT_DTYPES or out_dtype not in _OUT_DTYPES:
        raise ValueError(f"silu_mul_quantize_per_token: unsupported dtypes {gate_up.dtype} -> {out_dtype}")
    m, n = gate_up.shape[0], gate_up.shape[1] // 2
    x = gate_up.contiguous()  # no copy when already contiguous
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _launch_rows(_build().silu_mul_per_token, x, out, scale, m, n, 2)  # reads gate and up
    return out, scale


def quantize_per_group(
    x: torch.Tensor, group_size: int = 128, *, out: torch.Tensor | None = None, out_dtype: torch.dtype = _FP8_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-group quantization (1 x `group_size` groups along each row) in one launch.

    x: [M, K] bf16 / fp16 / fp32; `group_size` a power of two >= 16. Returns (q fp8 [M, K], scale
    fp32 [M, ceil(K / group_size)] with strides (1, M), i.e. column-major as torch's block-wise
    GEMM takes it) with ``scale = max(group absmax, 1e-12) / 448``; the last group of a row is
    partial when group_size does not divide K (its amax is over its real elements).
    """
    x, out = _prepare(x, "quantize_per_group", out, out_dtype)
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"quantize_per_group: group_size must be a power of two >= 16, got {group_size}")
    m, k = x.shape
    groups = _cdiv(k, group_size)
    scale = torch.empty(groups, m, dtype=torch.float32, device=x.device).t()  # (M, L), strides (1, M)
    if m == 0 or k == 0:
        return out, scale
    tile_k = min(max(group_size, _GROUP_TILE_K), _next_pow2(groups) * group_size)
    block_m = min(_next_pow2(m), max(1, _GROUP_TILE // tile_k))
    tiles_k = _cdiv(k, tile_k)
    programs = _cdiv(m, block_m) * tiles_k
    device = x.device
    _launch(
        _build().per_group, programs, (x, out, scale, m, k, tiles_k),
        (_FLOOR_BITS, group_size, tile_k // group_size, block_m),
        _warps(block_m * tile_k, programs, device), device,
    )  # fmt: skip
    return out, scale


def quantize_static(
    x: torch.Tensor, scale: torch.Tensor, *, out: torch.Tensor | None = None, out_dtype: torch.dtype = _FP8_DTYPE
) -> torch.Tensor:
    """Static per-tensor quantization with a given `scale` (fp32, one element, on x's device): one launch.

    x: [M, K] bf16 / fp16 / fp32. Returns q fp8 [M, K] = cast_fp8(clamp(x / scale, -448, 448)).
    """
    x, out = _prepare(x, "quantize_static", out, out_dtype)
    if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != x.device:
        raise ValueError(
            f"quantize_static: scale must be one float32 element on {x.device}, "
            f"got {scale.dtype} {tuple(scale.shape)} on {scale.device}"
        )
    n = x.numel()
    if n == 0:
        return out
    block, warps = _flat_block(n)
    _launch(_build().static, _cdiv(n, block), (x, out, scale, n), (block,), warps, x.device)
    return out


def quantize_per_tensor(
    x: torch.Tensor, *, out: torch.Tensor | None = None, out_dtype: torch.dtype = _FP8_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor quantization; the scale is computed on the device (no host sync).

    x: [M, K] bf16 / fp16 / fp32. Returns (q fp8 [M, K], scale fp32 []) with
    ``scale = max(absmax, 1e-12) / 448`` (an empty tensor gets 1e-12 / 448, as `scaling.tensor_scale`).
    Up to `_SMALL_NUMEL` (2^15) elements: one launch; larger: two (partial amax, then quantize).
    """
    x, out = _prepare(x, "quantize_per_tensor", out, out_dtype)
    n = x.numel()
    device = x.device
    scale = torch.empty((), dtype=torch.float32, device=device)
    kernels = _build()
    if n <= _SMALL_NUMEL:
        block_a = min(max(16, _next_pow2(n)), _SMALL_BLOCK_A)
        _launch(
            kernels.per_tensor_small, max(1, _cdiv(n, _SMALL_SLICE)), (x, out, scale, n),
            (_FLOOR_BITS, block_a, _SMALL_SLICE), max(4, min(32, block_a // 256)), device,
        )  # fmt: skip
        return out, scale
    block, warps = _flat_block(n)
    blocks = _cdiv(n, block)
    parts = min(blocks, _PARTIALS_PER_SM * _num_sms(device))
    partials = torch.empty(parts, dtype=torch.int32, device=device)
    _launch(kernels.amax_partial, parts, (x, partials, n), (block,), warps, device)
    _launch(
        kernels.per_tensor_quant, blocks, (x, out, partials, scale, n, parts),
        (_FLOOR_BITS, block, _next_pow2(parts)), warps, device,
    )  # fmt: skip
    return out, scale


def scale_epilogue(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[m, n] = acc[m, n] * x_scale[m] * weight_scale[n] (+ bias[n])`` in fp32, cast once: one launch.

    acc: fp32 [M, N] contiguous (the unit-scale FP8 GEMM's accumulator); x_scale: fp32 [] or [M, 1];
    weight_scale: fp32 [] or [N, 1] (or [1, N]); bias: [N] bf16 / fp16 / fp32 or None; out_dtype
    bf16 / fp16 / fp32. `out`: optional preallocated contiguous [M, N] tensor of `out_dtype`.
    """
    if acc.dim() != 2 or acc.dtype != torch.float32:
        raise ValueError(f"scale_epilogue: acc must be a 2-D float32 tensor, got {acc.dtype} {tuple(acc.shape)}")
    if out_dtype not in _EPILOGUE_OUT_DTYPES:
        raise ValueError(f"scale_epilogue: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    m, n = acc.shape
    device = acc.device
    for name, scale, rows in (("x_scale", x_scale, m), ("weight_scale", weight_scale, n)):
        if scale.dtype != torch.float32 or scale.numel() not in (1, rows) or scale.device != device:
            raise ValueError(
                f"scale_epilogue: {name} must be float32 with 1 or {rows} elements on {device}, "
                f"got {scale.dtype} {tuple(scale.shape)} on {scale.device}"
            )
    if bias is not None and (bias.numel() != n or bias.dtype not in _EPILOGUE_OUT_DTYPES or bias.device != device):
        raise ValueError(
            f"scale_epilogue: bias must have {n} bf16 / fp16 / fp32 elements on {device}, "
            f"got {bias.dtype} {tuple(bias.shape)} on {bias.device}"
        )
    acc = acc.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=device)
    elif out.shape != acc.shape or out.dtype != out_dtype or not out.is_contiguous() or out.device != device:
        raise ValueError(
            f"scale_epilogue: out must be a contiguous {out_dtype} tensor of shape {(m, n)} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if m == 0 or n == 0:
        return out
    sa_rows, sb_rows = x_scale.numel() != 1, weight_scale.numel() != 1
    sa = x_scale.contiguous() if sa_rows else x_scale  # [M, 1] / [N, 1] / [1, N]: flat when contiguous
    sb = weight_scale.contiguous() if sb_rows else weight_scale
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else acc  # any pointer when there is no bias
    block_n = min(_EPILOGUE_BLOCK_N, max(16, _next_pow2(n)))
    blocks_n = _cdiv(n, block_n)
    _launch(
        _build().scale_epilogue, m * blocks_n, (acc, sa, sb, bias_arg, out, n, blocks_n),
        (sa_rows, sb_rows, has_bias, block_n), 4, device,
    )  # fmt: skip
    return out


# --- Fused skinny-M FP8 linear: quantize x, stream the FP8 weight, scale, in one launch -------------------

#: Activation modes of `fused_linear` (the kernel's ACT constexpr).
FUSED_ACTIVATIONS = {"static": 0, "tensor": 1, "token": 2, "fp8": 3}
_FUSED_MAX_BLOCK_M = 64
# Without fast accumulation the kernel adds the FP8 MMA's partial sums into an fp32 accumulator every this
# many K columns (Hopper's FP8 MMA accumulates in fewer bits than fp32; cuBLAS / CUTLASS promote likewise).
_PROMOTE_K = 128


def _define_fused_linear():
    """The fused skinny-M kernel (called from `_define_kernels`: it uses the helpers bound there)."""
    global _to_fp8_grid, _fused_epilogue

    @triton.jit
    def _to_fp8_grid(v, EMULATE_CAST: tl.constexpr):
        # v: fp32 in [-448, 448] (or NaN). Returns it as float8_e4m3fn, rounded to nearest even.
        # EMULATE_CAST (the CPU interpreter only, whose fp32 -> fp8 cast does not carry a rounding
        # into the exponent: 127.0 -> 64): round onto the E4M3 grid in fp32 first (adding and
        # subtracting 1.5 * 2^23 ulps rounds to a multiple of the ulp), then cast exactly.
        if EMULATE_CAST:
            exp = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # unbiased exponent of |v|
            exp = tl.maximum(exp, -6)  # subnormals: the ulp of 2^-6 .. (2^-9)
            magic = ((exp - 3 + 23 + 127) << 23).to(tl.float32, bitcast=True) * 1.5  # 1.5 * 2^23 * ulp
            v = (v + magic) - magic
        return v.to(tl.float8e4nv)

    @triton.jit
    def fused_linear_kernel(
        x_ptr, w_ptr, sx_ptr, sw_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, K_SPLIT,
        FLOOR_BITS: tl.constexpr, ACT: tl.constexpr, SX_ROWS: tl.constexpr, SW_ROWS: tl.constexpr,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, FLAT_AMAX: tl.constexpr, AMAX_BLOCK: tl.constexpr, AMAX_STAGES: tl.constexpr,
        EXACT_DIV: tl.constexpr, PROMOTE_K: tl.constexpr, EMULATE_CAST: tl.constexpr,
    ):  # fmt: skip
        # Program p: output columns of tile p // SPLIT_K, K range p % SPLIT_K (K_SPLIT columns, a
        # multiple of BLOCK_K). The GEMM is computed transposed (out.T = W @ xq.T, "swap AB"), so the
        # big N side is the MMA's M and the skinny M (padded to BLOCK_M >= 16) its N.
        pid = tl.program_id(0)
        pid_n = pid // SPLIT_K
        pid_k = pid % SPLIT_K
        rows = tl.arange(0, BLOCK_M)  # (BLOCK_M,) activation rows m
        row_mask = rows < M
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output columns n
        col_mask = cols < N
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * K  # (BLOCK_M, 1)
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * K  # (BLOCK_N, 1)

        # Activation scale: ACT 0 static (one fp32 at sx_ptr), 1 dynamic per-tensor, 2 dynamic per-token
        # (every program reduces the whole x: M x K is small and L2-resident; AMAX_BLOCK elements a step,
        # a step costs about one L2 round trip), 3 x already FP8 (scale at sx_ptr, one or one per row).
        if FLAT_AMAX:  # one scale over x's M * K contiguous elements (per-tensor, or per-token with M = 1)
            bits = tl.zeros([AMAX_BLOCK], dtype=tl.int32)
            for start in tl.range(0, M * K, AMAX_BLOCK, num_stages=AMAX_STAGES):
                offs = start + tl.arange(0, AMAX_BLOCK)
                bits = tl.maximum(bits, _abs_bits(tl.load(x_ptr + offs, mask=offs < M * K, other=0.0)))
            x_scale = _scale_from_bits(tl.max(bits, axis=0), FLOOR_BITS) + tl.zeros([BLOCK_M], dtype=tl.float32)
        elif ACT == 2:  # one scale per row: [BLOCK_M, AMAX_BLOCK] tiles (AMAX_BLOCK columns), reduced as they come
            bits = tl.zeros([BLOCK_M], dtype=tl.int32)
            for k0 in tl.range(0, K, AMAX_BLOCK, num_stages=AMAX_STAGES):
                ka = k0 + tl.arange(0, AMAX_BLOCK)
                xa = tl.load(x_rows + ka[None, :], mask=row_mask[:, None] & (ka < K)[None, :], other=0.0)
                bits = tl.maximum(bits, tl.max(_abs_bits(xa), axis=1))
            x_scale = _scale_from_bits(bits, FLOOR_BITS)  # (BLOCK_M,)
        elif SX_ROWS:
            x_scale = tl.load(sx_ptr + rows, mask=row_mask, other=1.0)
        else:
            x_scale = tl.load(sx_ptr) + tl.zeros([BLOCK_M], dtype=tl.float32)
        inv_scale = tl.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), x_scale)  # x / s as x * (1 / s) unless EXACT_DIV

        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        k_start = pid_k * K_SPLIT
        k_end = tl.minimum(k_start + K_SPLIT, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < k_end
            x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if ACT == 3:
                xq = x
            else:
                if EXACT_DIV:  # IEEE x / s: the same FP8 values as the quantize kernels
                    v = tl.div_rn(x.to(tl.float32), x_scale[:, None])
                else:
                    v = x.to(tl.float32) * inv_scale[:, None]
                v = tl.maximum(v, -448.0, propagate_nan=tl.PropagateNan.ALL)
                v = tl.minimum(v, 448.0, propagate_nan=tl.PropagateNan.ALL)
                xq = _to_fp8_grid(v, EMULATE_CAST)  # (BLOCK_M, BLOCK_K) fp8
            w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            if PROMOTE_K:  # add the FP8 MMA's partial sums into fp32 every PROMOTE_K columns of K
                acc = tl.dot(w, tl.trans(xq), acc, max_num_imprecise_acc=PROMOTE_K)  # (BLOCK_N, BLOCK_M) fp32
            else:  # Triton's default on sm_90: the MMA's own accumulator throughout (fast accumulation)
                acc = tl.dot(w, tl.trans(xq), acc)

        out_offs = rows.to(tl.int64)[None, :] * N + cols[:, None]  # (BLOCK_N, BLOCK_M): out is [M, N]
        out_mask = col_mask[:, None] & row_mask[None, :]
        if SPLIT_K > 1:
            # Each split stores its partial sums; the last to arrive at this tile's counter adds them in
            # split order (deterministic), resets the counter to 0 and writes the output.
            tile = M * N
            tl.store(ws_ptr + pid_k * tile + out_offs, acc, mask=out_mask)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1)  # acq_rel, gpu scope: publishes the partial
            if arrived == SPLIT_K - 1:
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):
                    acc += tl.load(ws_ptr + s * tile + out_offs, mask=out_mask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + pid_n, 0)
                _fused_epilogue(acc, x_scale, sw_ptr, bias_ptr, out_ptr, out_offs, out_mask, cols, col_mask,
                                SW_ROWS, HAS_BIAS)  # fmt: skip
        else:
            _fused_epilogue(acc, x_scale, sw_ptr, bias_ptr, out_ptr, out_offs, out_mask, cols, col_mask,
                            SW_ROWS, HAS_BIAS)  # fmt: skip

    @triton.jit
    def _fused_epilogue(
        acc, x_scale, sw_ptr, bias_ptr, out_ptr, out_offs, out_mask, cols, col_mask,
        SW_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        # out[m, n] = acc[n, m] * x_scale[m] * w_scale[n] (+ bias[n]) in fp32, one rounding to out's dtype.
        out = acc * x_scale[None, :]
        if SW_ROWS:
            out = out * tl.load(sw_ptr + cols, mask=col_mask, other=0.0)[:, None]
        else:
            out = out * tl.load(sw_ptr)
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=out_mask)

    return fused_linear_kernel


@dataclass(frozen=True)
class FusedTiles:
    """Launch parameters of the fused skinny-M kernel (see `fused_linear`).

    block_n: output columns per program (the MMA's M side; >= 16); block_k: K columns per step (>= 32);
    split_k: K ranges per output tile, reduced in split order by the last program to finish the tile;
    amax_block: elements per step of the dynamic-scale reduction (each step is about one L2 round trip);
    amax_stages: its software pipelining (`tl.range` num_stages; 1 = none); num_warps / num_stages: the
    kernel's; exact_div: quantize with an IEEE division (the quantize kernels' FP8 values) instead of a
    multiply by the IEEE reciprocal (what runs by default: the division costs ~10x the kernel's time on an
    H200, tools/gpu/fused_decode_check.py; a value within an fp32 ulp of a rounding boundary can round the
    other way, about 3 elements in 10^4).
    """

    block_n: int = 128
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    amax_block: int = 16384
    amax_stages: int = 1
    exact_div: bool = False


# Split-K workspace per device: (fp32 partial sums, int32 per-tile arrival counters, all zero between
# launches). Shared by every plan on the device, so launches must not overlap in time on two streams.
_fused_workspace: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Split-K workspace with at least `floats` fp32 and `tiles` counters; None when it would have to
    be (re)allocated while a CUDA graph is being captured (a zero-filled buffer made there is zero only
    in the graph's replays)."""
    ws = _fused_workspace.get(device)
    if ws is None or ws[0].numel() < floats or ws[1].numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        old_floats, old_tiles = (ws[0].numel(), ws[1].numel()) if ws is not None else (0, 0)
        ws = _fused_workspace[device] = (
            torch.empty(max(floats, old_floats, 1), dtype=torch.float32, device=device),
            torch.zeros(max(tiles, old_tiles, 1), dtype=torch.int32, device=device),
        )
    return ws


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class FusedPlan:
    """One shape's launch of the fused kernel, resolved once: call it with the tensors of that shape.

    Made by `fused_plan`; `FP8Linear` keeps one per batch size M, so a decode step's host work is one
    output allocation and one launch. After the first call the compiled kernel is launched directly
    (as `_launch` does, without even its key: the plan fixes every constexpr and integer argument) as
    long as the tensors are 16-byte aligned like the first call's and the current device is the plan's.
    """

    __slots__ = ("m", "n", "k", "activation", "out_dtype", "grid", "consts", "num_warps", "num_stages",
                 "k_split", "ws", "cnt", "device", "_direct")  # fmt: skip

    def __call__(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        x_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [M, K] contiguous (bf16 / fp16 / fp32, or fp8 for activation "fp8"); weight fp8 [N, K]
        contiguous; weight_scale fp32 [] or [N, 1]; x_scale fp32 [] (static), [] or [M, 1] ("fp8"), else
        None; bias [N] or None (as planned). Returns out [M, N] of the planned dtype."""
        if out is None:
            out = torch.empty((self.m, self.n), dtype=self.out_dtype, device=self.device)
        sx = weight_scale if x_scale is None else x_scale  # any pointer when the kernel ignores it
        b = weight_scale if bias is None else bias
        args = (x, weight, sx, weight_scale, b, out, self.ws, self.cnt, self.m, self.n, self.k, self.k_split)
        direct = self._direct
        if direct is not None and not (
            x.data_ptr() % 16 or weight.data_ptr() % 16 or sx.data_ptr() % 16 or weight_scale.data_ptr() % 16
            or b.data_ptr() % 16 or out.data_ptr() % 16
        ) and _driver.current_device() == direct[0]:  # fmt: skip
            index, compiled, run, function, packed = direct
            stream = _driver.current_stream(index)
            runtime = _driver.runtime
            consts = self.consts
            metadata = compiled.launch_metadata((self.grid, 1, 1), stream, *args, *consts)
            run(self.grid, 1, 1, stream, function, packed, metadata, runtime.launch_enter_hook,
                runtime.launch_exit_hook, *args, *consts)  # fmt: skip
            return out
        _launch(_kernels.fused_linear, self.grid, args, self.consts, self.num_warps, self.device, self.num_stages)
        if direct is None and DIRECT_LAUNCH and _driver.ok and self.device.type == "cuda":
            spec = _spec(args)
            if all(aligned for _, aligned in spec[:6]):  # the kernel compiled for aligned tensors
                key = (id(_kernels.fused_linear), _driver.current_device(), self.num_warps, self.num_stages, self.consts, spec)
                entry = _launchers.get(key)
                if entry is not None and entry[0] is not None:
                    self._direct = (key[1], *entry)
        return out


def fused_plan(
    m: int,
    n: int,
    k: int,
    activation: str,
    *,
    x_dtype: torch.dtype,
    out_dtype: torch.dtype,
    x_scale_rows: bool = False,
    weight_scale_rows: bool = False,
    has_bias: bool = False,
    fast_accum: bool = False,
    device: torch.device,
    tiles: FusedTiles | None = None,
) -> FusedPlan | None:
    """Plan the fused kernel for an [M, K] x [N, K] linear; None when the split-K workspace would have
    to be allocated during CUDA-graph capture (call once outside capture first).

    activation: "static" / "tensor" / "token" (x in bf16 / fp16 / fp32, quantized in the kernel) or
    "fp8" (x already FP8 with x_scale fp32 [] or, with `x_scale_rows`, [M, 1]). fast_accum: keep the
    FP8 MMA's own accumulator over all of K (as `_scaled_mm(use_fast_accum=True)`); else its partial sums
    go into fp32 every 128 columns of K. Raises ValueError for a shape or dtype the kernel does not take.
    """
    tiles = tiles or FusedTiles()
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"fused_plan: activation must be one of {list(FUSED_ACTIVATIONS)}, got {activation!r}")
    expected = (_FP8_DTYPE,) if activation == "fp8" else _INPUT_DTYPES
    if x_dtype not in expected:
        raise ValueError(f"fused_plan: activation {activation!r} takes x of dtype {expected}, got {x_dtype}")
    if out_dtype not in _EPILOGUE_OUT_DTYPES:
        raise ValueError(f"fused_plan: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if not 1 <= m <= _FUSED_MAX_BLOCK_M or n < 1 or k < 1:
        raise ValueError(f"fused_plan: needs 1 <= M <= {_FUSED_MAX_BLOCK_M} and N, K >= 1, got M x N x K = {m} x {n} x {k}")
    if tiles.block_n < 16 or tiles.block_k < 32 or tiles.split_k < 1:
        raise ValueError(f"fused_plan: tiles need block_n >= 16, block_k >= 32, split_k >= 1, got {tiles}")
    block_m = max(16, _next_pow2(m))
    blocks_k = _cdiv(k, tiles.block_k)
    split_k = min(tiles.split_k, blocks_k)
    k_split = _cdiv(blocks_k, split_k) * tiles.block_k  # K columns per split, a multiple of block_k
    split_k = _cdiv(k, k_split)  # no empty split
    tiles_n = _cdiv(n, tiles.block_n)
    # Without split-K the kernel never touches the workspace, but gets real (non-null) pointers.
    workspace = _workspace(device, split_k * m * n, tiles_n) if split_k > 1 else _workspace(device, 1, 1)
    if workspace is None:
        return None
    plan = FusedPlan()
    plan.m, plan.n, plan.k, plan.activation, plan.out_dtype, plan.device = m, n, k, activation, out_dtype, device
    plan.grid = tiles_n * split_k
    plan.k_split = k_split
    plan.num_warps, plan.num_stages = tiles.num_warps, tiles.num_stages
    act = FUSED_ACTIVATIONS[activation]
    flat_amax = act == 1 or (act == 2 and m == 1)
    # The reduction step: up to amax_block elements (flat), or columns of BLOCK_M rows making about as many.
    if flat_amax:
        amax_block = max(16, min(_next_pow2(m * k), _next_pow2(tiles.amax_block)))
    else:
        amax_block = max(16, min(_next_pow2(k), _next_pow2(tiles.amax_block) // block_m))
    plan.consts = (
        _FLOOR_BITS, act, x_scale_rows, weight_scale_rows, has_bias, block_m, tiles.block_n, tiles.block_k, split_k,
        flat_amax, amax_block, tiles.amax_stages, tiles.exact_div, 0 if fast_accum else min(_PROMOTE_K, tiles.block_k),
        _interpreting(),
    )  # fmt: skip
    plan.ws, plan.cnt = workspace
    plan._direct = None
    _build()
    return plan


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    activation: str,
    *,
    x_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    tiles: FusedTiles | None = None,
    fast_accum: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``quantize(x) @ weight.T * x_scale * weight_scale + bias`` for skinny x, in one launch: [M, N].

    x: [M, K] bf16 / fp16 / fp32 (or fp8 with activation "fp8"), M <= 64; weight: fp8 [N, K];
    weight_scale: fp32 [] or [N, 1]; activation: "static" (x_scale fp32 [] given), "tensor" / "token"
    (dynamic: each program reduces x's amax itself, so the scale equals `quantize_per_tensor` /
    `quantize_per_token`'s) or "fp8"; bias [N] or None; out_dtype defaults to x's (bf16 for fp8 x).
    The activation is quantized as ``cast_fp8(clamp(x / scale, -448, 448))`` (the quantize kernels' FP8
    values; `FusedTiles.exact_div=False` multiplies by the reciprocal instead), the products are
    accumulated on the tensor cores (into fp32 every 128 columns of K unless `fast_accum`, see
    `fused_plan`), and both scales are applied to the fp32 sum before one rounding to out_dtype. Not
    bit-identical to `_scaled_mm` (accumulation order).
    """
    if x.dim() != 2 or weight.dim() != 2 or weight.dtype != _FP8_DTYPE or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear: expected x [M, K] and an fp8 weight [N, K], got x {x.dtype} {tuple(x.shape)} and "
            f"weight {weight.dtype} {tuple(weight.shape)}"
        )
    m, k = x.shape
    n = weight.shape[0]
    device = x.device
    out_dtype = out_dtype or (torch.bfloat16 if x.dtype == _FP8_DTYPE else x.dtype)
    if activation in ("static", "fp8"):
        if x_scale is None or x_scale.dtype != torch.float32 or x_scale.numel() not in (1, m) or x_scale.device != device:
            raise ValueError(f"fused_linear: activation {activation!r} needs x_scale fp32 [] (or [M, 1] for 'fp8') on {device}")
        if activation == "static" and x_scale.numel() != 1:
            raise ValueError(f"fused_linear: a static x_scale is one element, got shape {tuple(x_scale.shape)}")
    if weight_scale.dtype != torch.float32 or weight_scale.numel() not in (1, n) or weight_scale.device != device:
        raise ValueError(f"fused_linear: weight_scale must be fp32 with 1 or {n} elements on {device}, got {weight_scale.dtype} {tuple(weight_scale.shape)}")
    if bias is not None and (bias.numel() != n or bias.device != device):
        raise ValueError(f"fused_linear: bias must have {n} elements on {device}, got {tuple(bias.shape)}")
    if m == 0:
        return torch.zeros(0, n, dtype=out_dtype, device=device) if out is None else out
    plan = fused_plan(
        m, n, k, activation, x_dtype=x.dtype, out_dtype=out_dtype,
        x_scale_rows=x_scale is not None and x_scale.numel() != 1 and activation == "fp8",
        weight_scale_rows=weight_scale.numel() != 1, has_bias=bias is not None, fast_accum=fast_accum, device=device,
        tiles=tiles,
    )  # fmt: skip
    if plan is None:
        raise RuntimeError("fused_linear: the split-K workspace cannot be allocated during CUDA-graph capture; call it once before capturing")
    return plan(x.contiguous(), weight.contiguous(), weight_scale.contiguous(), None if x_scale is None else x_scale.contiguous(),
                None if bias is None else bias.contiguous(), out)  # fmt: skip
