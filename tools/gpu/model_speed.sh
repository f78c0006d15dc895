#!/usr/bin/env bash
# Whole-model speed on the GPU machine (issue 5 targets 4 and 5).
#   MODE=full (default): the bench (`python -m fp8kit.bench --models ...`, the numbers), the GPU tests
#     of the CUDA-graph path, a profile of eager decode steps (GEMM / attention / quant / other), and
#     (time permitting) the compiled + captured decode step.
#   MODE=decode: a quick check of the decode step only: GPU tests, llama3-8b-stack decode rows (bf16
#     vs FP8 dynamic per-token / static per-tensor, fast accum on and off), the same with
#     transformers' stock "sdpa" attention (before/after), the profile, compiled if time is left.
# Every model, bf16 and FP8 alike, runs fp8kit_sdpa_gqa attention unless --stock-attention is given.
# Usage (repository root): OUT=out/models [MODE=decode] bash tools/gpu/model_speed.sh
set -o pipefail
export PYTHONPATH=packages/core/src:packages/export/src:packages/bench/src PYTHONUNBUFFERED=1
OUT=${OUT:-out/models}
MODE=${MODE:-full}
BUDGET=${BUDGET:-285}  # seconds for the whole script
TIMING="--quiet --warmup 3 --min-runs 10 --max-runs 100 --budget-ms 100"
DECODE_BACKENDS=fp8-dynamic-token,fp8-dynamic-token-fastacc,fp8-static-tensor,fp8-static-tensor-fastacc
mkdir -p "$OUT/models" "$OUT/compiled"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
if [ "$MODE" = decode ]; then
  timeout 90 python3 -m pytest tests/core/test_graphs.py -q -p no:cacheprovider 2>&1 | tail -3
  echo "tests after ${SECONDS}s"
  timeout 100 python3 -m fp8kit.bench --models llama3-8b-stack --model-phases decode --quantize-layers 0 \
      --backends "$DECODE_BACKENDS" --out "$OUT/models" $TIMING >"$OUT/models/log.txt" 2>&1
  echo "decode rc=$? after ${SECONDS}s"
  mkdir -p "$OUT/stock"
  timeout 60 python3 -m fp8kit.bench --models llama3-8b-stack --model-phases decode --quantize-layers 0 \
      --stock-attention --backends fp8-static-tensor-fastacc --out "$OUT/stock" $TIMING >"$OUT/stock/log.txt" 2>&1
  echo "stock-attention rc=$? after ${SECONDS}s"
  rm -f "$OUT/stock/"*.png "$OUT/stock/env.json" "$OUT/stock/report.md"
  timeout 60 python3 tools/gpu/decode_profile.py fp8-dynamic-token-fastacc fp8-static-tensor-fastacc >"$OUT/profile.txt" 2>&1
  echo "profile rc=$? after ${SECONDS}s"
  COMPILED_BACKENDS=fp8-static-tensor-fastacc
  rm -f "$OUT/models/env.json"  # (at most 8 files come back from the device machine)
else
  python3 -m fp8kit.bench --models llama3-8b-stack,smollm2-arch --out "$OUT/models" $TIMING >"$OUT/models/log.txt" 2>&1
  echo "bench rc=$? after ${SECONDS}s"
  timeout 60 python3 -m pytest tests/core/test_graphs.py -q -p no:cacheprovider 2>&1 | tail -3
  timeout 60 python3 tools/gpu/decode_profile.py fp8-static-tensor-fastacc >"$OUT/profile.txt" 2>&1
  echo "profile rc=$? after ${SECONDS}s"
  COMPILED_BACKENDS=fp8-static-tensor-fastacc,fp8-dynamic-token-fastacc
fi
rm -f "$OUT/models/"*.png
left=$(( BUDGET - SECONDS - 15 ))
if [ "$left" -gt 40 ]; then
  timeout "$left" python3 -m fp8kit.bench --models llama3-8b-stack --compile-decode --quantize-layers 0 \
      --model-phases decode --backends "$COMPILED_BACKENDS" --out "$OUT/compiled" $TIMING >"$OUT/compiled/log.txt" 2>&1
  echo "compiled rc=$? after ${SECONDS}s"
  rm -f "$OUT/compiled/"*.png "$OUT/compiled/env.json" "$OUT/compiled/report.md"
fi
python3 - "$OUT" <<'PY'
import os, sys
from fp8kit.bench.report import read_csv
from fp8kit.bench.model_speed import summary_table
for sub in ("models", "stock", "compiled"):
    path = os.path.join(sys.argv[1], sub, "report.csv")
    if os.path.exists(path):
        frame = read_csv(path)
        if sub == "compiled":
            frame = frame[frame["backend"].str.endswith("compiled-graph")]
        print(f"-- {sub} (attention: {', '.join(sorted(set(frame['attention'].astype(str))))})")
        print(summary_table(frame))
PY
tail -8 "$OUT/profile.txt"
