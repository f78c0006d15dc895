"""What is benchmarked: single linear layers (M x N x K), activation quantization kernels (M x K),
whole models (prefill) and the architectures they use, the named suites that bundle them (`SUITES`),
and the backend-id grammar the report derives columns from (`FP8_ID`, `ceiling_backend_id`).

Shapes are written M x N x K everywhere: M rows of activation, N = out_features, K = in_features.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fp8kit.core.errors import ConfigError

__all__ = [
    "LinearWorkload",
    "QuantWorkload",
    "ModelWorkload",
    "SuitePart",
    "SUITES",
    "TARGETS",
    "suite_parts",
    "SHAPE_PRESETS",
    "M_PRESETS",
    "parse_shape_entries",
    "parse_m_values",
    "linear_grid",
    "llama3_8b_stack_config",
    "smollm2_arch_config",
    "FP8_ID",
    "ceiling_backend_id",
]

# Projection shapes (name, N, K) of the dense decoder layers.
SHAPE_PRESETS: dict[str, tuple[tuple[str, int, int], ...]] = {
    # Llama-3-8B: hidden 4096, intermediate 14336, 32 heads / 8 kv heads of 128.
    "llama3-8b": (
        ("q_proj/o_proj", 4096, 4096),
        ("k_proj/v_proj", 1024, 4096),
        ("qkv_proj(fused)", 6144, 4096),
        ("gate_proj/up_proj", 14336, 4096),
        ("gate_up_proj(fused)", 28672, 4096),
        ("down_proj", 4096, 14336),
    ),
    # Llama-3-70B: hidden 8192, intermediate 28672, 64 heads / 8 kv heads of 128.
    "llama3-70b": (
        ("q_proj/o_proj", 8192, 8192),
        ("k_proj/v_proj", 1024, 8192),
        ("qkv_proj(fused)", 10240, 8192),
        ("gate_proj/up_proj", 28672, 8192),
        ("gate_up_proj(fused)", 57344, 8192),
        ("down_proj", 8192, 28672),
    ),
    # Small shapes for CPU runs and CI.
    "cpu-small": (
        ("small-square", 256, 256),
        ("smollm2-mlp-up", 1536, 576),
        ("smollm2-mlp-down", 576, 1536),
    ),
}

M_PRESETS: dict[str, tuple[int, ...]] = {
    "gpu": (1, 16, 128, 1024, 4096, 8192),
    "cpu": (1, 16, 128),
}

_SHAPE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclass(frozen=True)
class LinearWorkload:
    """One linear layer y = x @ W.T: x [M,K], W [N,K]; `name` is a label (e.g. the projection)."""

    name: str
    m: int
    n: int
    k: int
    target: str = ""  # which issue target the row serves ("prefill", "decode"); "" outside suites

    @property
    def label(self) -> str:
        return f"linear:{self.name}"


@dataclass(frozen=True)
class QuantWorkload:
    """Quantizing one activation x [M,K] (run dtype) to FP8 E4M3 with its scale(s)."""

    m: int
    k: int
    target: str = "quant"

    @property
    def label(self) -> str:
        return f"quant:{self.m}x{self.k}"


@dataclass(frozen=True)
class ModelWorkload:
    """A whole-model prefill forward: `batch` sequences of `seq_len` tokens (M = batch * seq_len).

    spec: "default" (the embedded SmolLM2-135M), a Hugging Face directory, or "smollm2-arch"
    (SmolLM2-135M's architecture with random weights, for machines the GGUF file cannot reach).
    """

    spec: str
    batch: int
    seq_len: int
    target: str = ""

    @property
    def m(self) -> int:
        return self.batch * self.seq_len

    @property
    def label(self) -> str:
        return f"model:{self.spec}"


def llama3_8b_stack_config(num_layers: int = 4, vocab_size: int = 1024) -> Any:
    """`LlamaConfig` of Llama-3-8B's decoder layers (hidden 4096, MLP 14336, 32 / 8 heads of 128,
    rope theta 500000), `num_layers` deep, with a small vocabulary; SDPA attention."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        attn_implementation="sdpa",
    )


def smollm2_arch_config(num_layers: int | None = None) -> Any:
    """`LlamaConfig` of SmolLM2-135M (its real config.json values); SDPA attention."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=num_layers or 30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
        attn_implementation="sdpa",
    )


def parse_shape_entries(text: str) -> list[tuple[str, int | None, int, int]]:
    """Comma-separated presets and/or MxNxK shapes -> [(name, M or None for presets, N, K)].

    Raises ConfigError naming the bad entry and the accepted forms.
    """
    entries: list[tuple[str, int | None, int, int]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item in SHAPE_PRESETS:
            entries.extend((name, None, n, k) for name, n, k in SHAPE_PRESETS[item])
            continue
        match = _SHAPE_RE.match(item)
        if match is None:
            raise ConfigError(
                f"--shapes: {item!r} is neither a preset ({', '.join(SHAPE_PRESETS)}) nor MxNxK "
                "(e.g. 16x4096x4096: M rows, N = out_features, K = in_features)"
            )
        m, n, k = (int(g) for g in match.groups())
        if min(m, n, k) < 1:
            raise ConfigError(f"--shapes: {item!r} has a zero dimension; M, N and K must be >= 1")
        entries.append((f"{n}x{k}", m, n, k))
    if not entries:
        raise ConfigError("--shapes: no shape given; name a preset or MxNxK entries")
    return entries


def parse_m_values(text: str) -> tuple[int, ...]:
    """"1,16,128" or a preset name ("gpu", "cpu") -> sorted unique positive ints; ConfigError otherwise."""
    if text.strip() in M_PRESETS:
        return M_PRESETS[text.strip()]
    values: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise ConfigError(f"--m: {item!r} is not a positive integer; give e.g. --m 1,16,128")
        values.add(int(item))
    if not values:
        raise ConfigError("--m: no value given; give e.g. --m 1,16,128")
    return tuple(sorted(values))


def linear_grid(shapes: str, m_values: Sequence[int]) -> list[LinearWorkload]:
    """Workloads for every preset shape x every M, plus each MxNxK entry at its own M.

    Sorted by (N, K, M) so that backends compile once per (N, K) and sweep M.
    """
    grid: set[LinearWorkload] = set()
    for name, m, n, k in parse_shape_entries(shapes):
        for m_value in (m,) if m is not None else m_values:
            grid.add(LinearWorkload(name, m_value, n, k))
    return sorted(grid, key=lambda w: (w.n, w.k, w.name, w.m))


# ---------------------------------------------------------------------------------------------
# Suites: one CLI command (`python -m fp8kit.bench --suite NAME`) producing every row of a set of
# targets. Each part is run by its own `run_benchmarks` call (its own backends and weight rotation)
# and the frames are concatenated; every row carries its part's `target` label.

#: The targets a suite can hold, in run order: quantization kernels, prefill linears, decode linears.
TARGETS: tuple[str, ...] = ("quant", "prefill", "decode")


@dataclass(frozen=True)
class SuitePart:
    """One target of a suite: its workloads, backend ids, and weight rotation.

    rotate_bytes: distinct weight bytes each backend cycles through (None: the runner's default,
    4x the L2 on CUDA); decode parts use several hundred MB so FP8 weights come from HBM.
    """

    target: str
    workloads: tuple[LinearWorkload | QuantWorkload, ...]
    backends: tuple[str, ...]
    rotate_bytes: int | None = None


# Quantization: the Triton path (`scaling.quantize_activation`, what FP8Linear uses on GPU), the
# old torch path and torch.compile of it, each beside a plain copy of the same tensor.
_QUANT_SCHEMES = ("dynamic-token", "static-tensor", "dynamic-tensor")
QUANT_BACKENDS: tuple[str, ...] = ("copy",) + tuple(
    f"quant-{scheme}{impl}" for scheme in _QUANT_SCHEMES for impl in ("", "-torch", "-torch-compiled")
)
# Launch-free variants for the decode sizes (where an eager launch is most of the time).
QUANT_GRAPH_BACKENDS: tuple[str, ...] = ("copy-graph",) + tuple(f"quant-{s}-graph" for s in _QUANT_SCHEMES)

_FP8_SCHEMES = ("dynamic-token", "static-tensor", "dynamic-tensor")
FP8_LINEAR_BACKENDS: tuple[str, ...] = tuple(f"fp8-{s}{fa}" for s in _FP8_SCHEMES for fa in ("", "-fastacc"))
# Bare torch._scaled_mm on pre-quantized inputs: the FP8 GEMM ceiling of each FP8 row
# (row-wise scales for per-token / per-channel schemes, per-tensor otherwise).
SCALED_MM_BACKENDS: tuple[str, ...] = tuple(
    f"scaled-mm-{s}{fa}" for s in ("rowwise", "tensor") for fa in ("", "-fastacc")
)
# torchao's Float8DynamicActivationFloat8WeightConfig (PerRow / PerTensor), eager and compiled, each
# also replayed from a CUDA graph: the peer rows beside fp8kit's (`backends.TorchaoBackend`).
TORCHAO_BACKENDS: tuple[str, ...] = tuple(
    f"torchao-fp8-{g}{c}{graph}" for graph in ("", "-graph") for g in ("row", "tensor") for c in ("", "-compiled")
)
#: ``fp8-<activation>-<granularity>[-w<weight>][-fastacc][-compiled]`` backend ids (`backends.get_backend`).
FP8_ID = re.compile(
    r"^fp8-(?P<activation>dynamic|static)-(?P<granularity>tensor|token|group)"
    r"(?:-w(?P<weight>tensor|channel|block))?(?P<fastacc>-fastacc)?(?P<compiled>-compiled)?$"
)


def ceiling_backend_id(backend_id: str) -> str | None:
    """The `scaled-mm-*` id that is the FP8 GEMM ceiling of an ``fp8-*`` backend id (None for others).

    Block scales for 1 x 128 activation groups (with 128 x 128 weight blocks), row-wise scales for
    per-token activations or per-channel weights, per-tensor otherwise; the same `-fastacc` and
    `-graph` suffixes (`-compiled` is dropped: the bare GEMM is not compiled).
    """
    graph = backend_id.endswith("-graph")
    match = FP8_ID.fullmatch(backend_id.removesuffix("-graph"))
    if match is None:
        return None
    granularity = match["granularity"]
    weight = match["weight"] or {"token": "channel", "group": "block"}.get(granularity, "tensor")
    if granularity == "group" or weight == "block":
        scaling = "block"
    else:
        scaling = "rowwise" if granularity == "token" or weight == "channel" else "tensor"
    return (
        f"scaled-mm-{scaling}"
        + ("-fastacc" if match["fastacc"] else "")
        + ("-graph" if graph else "")
    )


# Eager rows (what the targets name) and CUDA-graph rows beside them (launch overhead removed, so a
# gap between the two is host time: FP8Linear's Python and launches against a short GEMM).
LINEAR_BACKENDS: tuple[str, ...] = tuple(
    b + g for g in ("", "-graph") for b in ("torch-bf16",) + FP8_LINEAR_BACKENDS + SCALED_MM_BACKENDS
)
PREFILL_BACKENDS: tuple[str, ...] = LINEAR_BACKENDS
DECODE_BACKENDS: tuple[str, ...] = LINEAR_BACKENDS

# Llama-3-8B projections (N, K) plus the 8192 x 8192 square of target 2.
_PREFILL_SHAPES = (
    ("square-8192", 8192, 8192),
    ("q_proj/o_proj", 4096, 4096),
    ("qkv_proj(fused)", 6144, 4096),
    ("gate_proj/up_proj", 14336, 4096),
    ("down_proj", 4096, 14336),
)
_DECODE_SHAPES = (("gate_proj/up_proj", 14336, 4096), ("down_proj", 4096, 14336))
_DECODE_M = (1, 8, 16)


def _linears(target: str, shapes: Sequence[tuple[str, int, int]], m_values: Sequence[int]) -> tuple[LinearWorkload, ...]:
    return tuple(LinearWorkload(name, m, n, k, target) for name, n, k in shapes for m in m_values)


def _quant(sizes: Sequence[tuple[int, int]]) -> tuple[QuantWorkload, ...]:
    return tuple(QuantWorkload(m, k) for m, k in sizes)


def _cpu_backends(ids: Sequence[str]) -> tuple[str, ...]:
    """The CPU variant of a part's backends: fp32 baseline, no CUDA graphs, no torch.compile."""
    out = []
    for backend_id in ids:
        if backend_id.endswith("-graph") or backend_id.endswith("-compiled"):
            continue
        out.append("torch-fp32" if backend_id == "torch-bf16" else backend_id)
    return tuple(dict.fromkeys(out))


# Block-wise FP8 (issue 15): 1 x 128 activation groups with 128 x 128 weight blocks beside bf16 and
# per-token / per-channel, each with its bare GEMM ceiling; the group-quantization kernel beside a copy.
BLOCK_QUANT_BACKENDS: tuple[str, ...] = tuple(
    b + g
    for g in ("", "-graph")
    for b in ("copy", "quant-dynamic-group", "quant-dynamic-token")
) + ("quant-dynamic-group-torch", "quant-dynamic-group-torch-compiled")
# Block GEMMs have no -fastacc rows: torch refuses fast accumulation with 128 x 128 blocks (fp8kit never asks).
_BLOCK_LINEARS = ("torch-bf16", "fp8-dynamic-group", "scaled-mm-block") + tuple(
    f"{b}{fa}" for b in ("fp8-dynamic-token", "scaled-mm-rowwise") for fa in ("", "-fastacc")
)
BLOCK_PREFILL_BACKENDS: tuple[str, ...] = _BLOCK_LINEARS
BLOCK_DECODE_BACKENDS: tuple[str, ...] = tuple(b + "-graph" for b in _BLOCK_LINEARS)
_BLOCK_SHAPES = (("square-8192", 8192, 8192), ("gate_proj/up_proj", 14336, 4096), ("down_proj", 4096, 14336))

# Issue 16 (h200-decode): the kernels beside a copy; prefill with fast accumulation (torchao's default)
# and without; decode eager and replayed (compiled rows: H200_DECODE_COMPILED).
_KERNEL_QUANT_BACKENDS: tuple[str, ...] = ("copy", "copy-graph") + tuple(
    f"quant-{s}{g}" for s in _QUANT_SCHEMES for g in ("", "-graph")
)
H200_PREFILL_BACKENDS: tuple[str, ...] = ("torch-bf16",) + FP8_LINEAR_BACKENDS + SCALED_MM_BACKENDS
_H200_DECODE_EAGER = ("torch-bf16",) + tuple(f"fp8-{s}" for s in _FP8_SCHEMES)
H200_DECODE_BACKENDS: tuple[str, ...] = (
    _H200_DECODE_EAGER
    + tuple(b + "-graph" for b in _H200_DECODE_EAGER)
    + ("scaled-mm-rowwise-fastacc-graph", "scaled-mm-tensor-fastacc-graph")
)  # fmt: skip
# h200-peers: torchao beside fp8kit's dynamic schemes and bf16, eager and replayed, in one process.
_PEER_EAGER = ("torch-bf16", "fp8-dynamic-token", "fp8-dynamic-tensor", "torchao-fp8-row", "torchao-fp8-tensor")
H200_PEER_DECODE_BACKENDS: tuple[str, ...] = _PEER_EAGER + tuple(b + "-graph" for b in _PEER_EAGER)
H200_PEER_PREFILL_BACKENDS: tuple[str, ...] = (
    "torch-bf16", "fp8-dynamic-token-fastacc", "fp8-dynamic-tensor-fastacc", "torchao-fp8-row", "torchao-fp8-tensor",
)  # fmt: skip
# The compiled rows beside them (each compiles per shape: minutes; `--backends` adds them to a run).
H200_DECODE_COMPILED: tuple[str, ...] = (
    "torch-bf16-compiled-graph", "fp8-dynamic-token-fastacc-compiled-graph", "fp8-static-tensor-fastacc-compiled-graph",
) + tuple(b for b in TORCHAO_BACKENDS if "-compiled" in b)  # fmt: skip

SUITES: dict[str, tuple[SuitePart, ...]] = {
    # Issue 5, targets 1-3 (about 5 minutes on one H100).
    "h100-speed": (
        SuitePart(
            "quant",
            _quant([(8192, 8192)] + [(m, 4096) for m in _DECODE_M]),
            QUANT_BACKENDS + QUANT_GRAPH_BACKENDS,
        ),
        SuitePart("prefill", _linears("prefill", _PREFILL_SHAPES, (1024, 4096, 8192)), PREFILL_BACKENDS),
        SuitePart("decode", _linears("decode", _DECODE_SHAPES, _DECODE_M), DECODE_BACKENDS, rotate_bytes=512 * 2**20),
    ),
    # A reduced h100-speed (one shape per target) to check a GPU machine in about a minute.
    "h100-speed-quick": (
        SuitePart("quant", _quant([(8192, 8192), (16, 4096)]), QUANT_BACKENDS + QUANT_GRAPH_BACKENDS),
        SuitePart("prefill", _linears("prefill", _PREFILL_SHAPES[:1], (8192,)), PREFILL_BACKENDS),
        SuitePart("decode", _linears("decode", _DECODE_SHAPES[:1], (16,)), DECODE_BACKENDS, rotate_bytes=512 * 2**20),
    ),
    # Issue 15 on an H200 (about 3 minutes): block-wise FP8 at M = 8192 (eager) and decode M = 1, 8, 16
    # (CUDA graphs, weights rotated from HBM) on three Llama shapes, and the 1 x 128 group kernel.
    "h200-block": (
        SuitePart(
            "quant",
            _quant([(8192, 8192), (8192, 4096), (8192, 14336)] + [(m, 4096) for m in _DECODE_M]),
            BLOCK_QUANT_BACKENDS,
        ),
        SuitePart("prefill", _linears("prefill", _BLOCK_SHAPES, (8192,)), BLOCK_PREFILL_BACKENDS),
        SuitePart("decode", _linears("decode", _BLOCK_SHAPES, _DECODE_M), BLOCK_DECODE_BACKENDS, rotate_bytes=512 * 2**20),
    ),
    # Issue 16 on an H200: decode M = 1, 8, 16 on gate/up and down (eager chains and CUDA graphs, weights
    # rotated from HBM; FP8Linear takes the fused skinny-M kernel where `skinny.TABLE` says so), and the
    # no-regression rows: 8192^3 prefill and the quantization kernels. torchao: "h200-peers".
    "h200-decode": (
        SuitePart("quant", _quant([(8192, 8192)] + [(m, 4096) for m in _DECODE_M]), _KERNEL_QUANT_BACKENDS),
        SuitePart("prefill", _linears("prefill", _PREFILL_SHAPES[:1], (8192,)), H200_PREFILL_BACKENDS),
        SuitePart("decode", _linears("decode", _DECODE_SHAPES, _DECODE_M), H200_DECODE_BACKENDS, rotate_bytes=512 * 2**20),
    ),
    # Issue 16's peer rows: torchao's FP8 inference beside fp8kit on the same decode grid and 8192^3 prefill.
    "h200-peers": (
        SuitePart("prefill", _linears("prefill", _PREFILL_SHAPES[:1], (8192,)), H200_PEER_PREFILL_BACKENDS),
        SuitePart("decode", _linears("decode", _DECODE_SHAPES, _DECODE_M), H200_PEER_DECODE_BACKENDS, rotate_bytes=512 * 2**20),
    ),
    # The same structure on tiny shapes for CPU runs and tests (seconds).
    "cpu-speed": (
        SuitePart("quant", _quant([(64, 256), (1, 256)]), _cpu_backends(QUANT_BACKENDS)),
        SuitePart("prefill", _linears("prefill", (("square-256", 256, 256),), (32, 64)), _cpu_backends(PREFILL_BACKENDS)),
        SuitePart("decode", _linears("decode", (("up", 512, 128),), (1, 8)), _cpu_backends(DECODE_BACKENDS), rotate_bytes=2**20),
    ),
}


def suite_parts(name: str, targets: Sequence[str] | None = None) -> tuple[SuitePart, ...]:
    """The parts of suite `name`, optionally only those whose target is in `targets`.

    Raises ConfigError naming the unknown suite or target and the accepted values.
    """
    if name not in SUITES:
        raise ConfigError(f"--suite: unknown suite {name!r}; use one of {', '.join(SUITES)}")
    parts = SUITES[name]
    if targets is None:
        return parts
    wanted = [t.strip() for t in targets if t.strip()]
    unknown = [t for t in wanted if t not in TARGETS]
    if unknown or not wanted:
        raise ConfigError(f"--targets: {', '.join(unknown) or 'nothing'} given; choose from {', '.join(TARGETS)}")
    return tuple(p for p in parts if p.target in wanted)
