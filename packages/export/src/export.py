"""`python -m export MODEL OUT.onnx`: a thin alias of `python -m fp8kit.export` (all code lives there)."""

from __future__ import annotations

from fp8kit.export.__main__ import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
