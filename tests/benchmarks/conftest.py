"""pytest-benchmark suite for fp8kit: `pytest tests/benchmarks --benchmark-only` on a GPU (Llama-3-8B
shapes) or a CPU (small shapes). The normal test command runs it with `--benchmark-disable`
(each benchmark body once, untimed) so it cannot rot.

Convert the JSON output to the fp8kit report with
`fp8kit.bench.from_pytest_benchmark_json("bench.json")`.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
