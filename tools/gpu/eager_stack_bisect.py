"""Why FP8 eager decode steps of the 8B-shaped stack ran at 0.48-0.70x bf16 inside `fp8kit.bench --models`
but at 0.83-1.34x in tools/gpu/decode_probe.py (issue 16): the same step timed in one process, in stages.

    PYTHONPATH=packages/core/src:packages/bench/src python3 tools/gpu/eager_stack_bisect.py --out $OUT

Stages (each: bf16, FP8 static, FP8 per-token; batch 1 and 8; ms per eager step, median of 5 x 20 steps):
1. "fresh": nothing else in the process.
2. "torchao": after `import torchao` (the bench imports it for its peer backends), if importable.
3. "compiled": after torch.compile + one call of the bf16 step (dynamo / inductor state in the process).
4. "gc-frozen": after gc.collect() + gc.freeze() (the garbage collector no longer walks what exists).
Also the gen-2 garbage collections counted during each stage's FP8 steps. Writes bisect.csv.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from fp8kit.bench.model_speed import _Decode
from fp8kit.bench.workloads import llama3_8b_stack_config
from stack_models import stack_models


def step_ms(decode) -> float:
    runs = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            decode()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0) / 20 * 1e3)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bisect")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    config = llama3_8b_stack_config(4)
    models = dict(stack_models(config, device, ("torch-bf16", "fp8-static-tensor", "fp8-dynamic-token")))
    decodes = {}
    for batch in (1, 8):
        prompt = torch.randint(0, config.vocab_size, (batch, 64), device=device)
        ids = torch.randint(0, config.vocab_size, (batch, 1), device=device)
        for name, model in models.items():
            decodes[(name, batch)] = _Decode(model, prompt, ids, 1024)
            for _ in range(3):
                decodes[(name, batch)]()
    rows = []
    gen2 = [0]
    gc.callbacks.append(lambda phase, info: gen2.__setitem__(0, gen2[0] + (phase == "start" and info["generation"] == 2)))

    def stage(label: str) -> None:
        for batch in (1, 8):
            times = {}
            for name in models:
                gen2[0] = 0
                times[name] = step_ms(decodes[(name, batch)])
                row = {"stage": label, "batch": batch, "backend": name, "step_ms": round(times[name], 3),
                       "vs_bf16": round(times["torch-bf16"] / times[name], 3), "gen2_collections": gen2[0],
                       "gc_objects": len(gc.get_objects())}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)

    stage("fresh")
    try:
        import torchao  # noqa: F401

        stage("torchao")
    except ImportError:
        print("torchao not importable: stage skipped", flush=True)
    compiled = torch.compile(decodes[("torch-bf16", 8)].step, dynamic=False)
    with torch.no_grad():
        compiled(decodes[("torch-bf16", 8)].ids, decodes[("torch-bf16", 8)].position)
    stage("compiled")
    gc.collect()
    gc.freeze()
    stage("gc-frozen")
    with (out / "bisect.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
