"""Running fp8kit's CLIs in subprocesses, as a user does, and checking how they fail."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "export", "bench")
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO / "packages" / p / "src") for p in PACKAGES] + [os.environ.get("PYTHONPATH", "")]),
}
EXPORT_FAST = ["--num-samples", "2", "--seq-len", "16", "--validate-samples", "2", "--validate-seq-len", "8"]


def run_cli(which: str, *args, timeout: int = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m <which CLI> args...` (export with small calibration / validation sizes appended)."""
    module = {"core": "fp8kit.core", "export": "export", "bench": "fp8kit.bench"}[which]
    extra = EXPORT_FAST if which == "export" else []
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args), *extra],
        capture_output=True, text=True, env=ENV, cwd=cwd or REPO, timeout=timeout,
    )


def assert_clean_failure(result: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit 2, no traceback, and the last stderr line is 'error: ...' matching `pattern`."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(r"(.*: )?error: ", last) and re.search(pattern, last), last
