"""The Llama-3-8B-shaped decoder stack and its FP8 copies, for the tools/gpu scripts that time or profile it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from fp8kit.bench.model_speed import build_model, quantized_copy


def stack_models(
    config: Any, device: torch.device, backends: Sequence[str], calibration_tokens: int = 512
) -> Iterator[tuple[str, nn.Module]]:
    """(backend id, model) for each of `backends`, made when asked for: the random-weight bf16 model of
    `config` (`workloads.llama3_8b_stack_config`) for "torch-bf16", else a copy quantized per the id
    (static scales from one random prompt of `calibration_tokens` tokens)."""
    base = build_model(config, False, device, torch.bfloat16)
    calibration = [torch.randint(0, config.vocab_size, (1, calibration_tokens), device=device)]
    for backend in backends:
        yield backend, base if backend == "torch-bf16" else quantized_copy(base, backend, calibration)[0]
