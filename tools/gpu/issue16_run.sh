#!/usr/bin/env bash
# Issue 16 (decode speed) on the H200: every section has its own time limit and writes its files as it
# goes, so a slow section loses only its own rows. SECTIONS (default: all, ~11 minutes; a device call
# takes at most 10, so run "tests decode peers noregress benchmarks" and "stacks generate" apart):
#   1. tests: the GPU test files tests/core/test_kernels_cuda.py and tests/core/test_graphs.py.
#   2. fp8kit.bench --suite h200-decode, decode part: M in {1, 8, 16} on 14336 x 4096 and 4096 x 14336,
#      eager chains and CUDA graphs, weights rotated through 512 MB.
#   2b. --suite h200-peers: torchao beside fp8kit and bf16 on the same grid and the 8192^3 prefill.
#   3. the no-regression parts of h200-decode: 8192^3 prefill and the quantization kernels.
#   3b. benchmarks: `pytest tests/benchmarks --benchmark-only` (device clock), the compiled backend left out.
#   4. stacks: the Llama-3-8B-shaped 4-layer stack, decode steps of batch 8 and 1 (eager, CUDA graph,
#      compiled + CUDA graph), torchao too.
#   5. generate: model.generate tokens/s with transformers' static cache (batch 1, eager: disable_compile).
# Usage (repository root): OUT=out/gpu bash tools/gpu/issue16_run.sh     DRY=1: tiny CPU stand-ins (tests the script)
# Writes under $OUT: gpu-tests.txt, log.txt, results.tgz (the fp8kit.bench reports: decode/, peers/,
# noregress/, pytest-benchmark.*, stack-b8/, stack-b1/, generate/).
set -o pipefail
export PYTHONPATH=packages/core/src:packages/export/src:packages/bench/src:tests${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
OUT=${OUT:-out/gpu}
W="$OUT/work"
mkdir -p "$W"
LOG="$OUT/log.txt"
TIMING="--quiet --warmup 2 --min-runs 10 --max-runs 60 --budget-ms 40"
if [ -n "$DRY" ]; then
  SUITE=cpu-speed PEERS=cpu-speed MODEL="smollm2-arch --model-layers 2" T=0.2 DEVICE="--device cpu"
else
  SUITE=h200-decode PEERS=h200-peers MODEL=llama3-8b-stack T=1 DEVICE=""
fi
lim() { python3 -c "print(max(5, int($1 * $T)) if '$DRY' == '' else 120)"; }
section() { echo "== $1 after ${SECONDS}s" | tee -a "$LOG"; }

section env
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>&1
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1; } >>"$LOG" 2>&1

SECTIONS=${SECTIONS:-tests decode peers noregress benchmarks stacks generate}
has() { case " $SECTIONS " in *" $1 "*) return 0;; esac; return 1; }

if has tests; then
  section tests
  timeout "$(lim 150)" python3 -m pytest tests/core/test_kernels_cuda.py tests/core/test_graphs.py -q -p no:cacheprovider \
    >"$OUT/gpu-tests.txt" 2>&1
  echo "tests rc=$?" | tee -a "$LOG"; tail -3 "$OUT/gpu-tests.txt" >>"$LOG"
fi

if has decode; then
  section decode
  timeout "$(lim 55)" python3 -m fp8kit.bench --suite "$SUITE" --targets decode --out "$W/decode" $DEVICE $TIMING >>"$LOG" 2>&1
  echo "decode rc=$?" | tee -a "$LOG"
fi

if has peers; then
  section peers
  timeout "$(lim 50)" python3 -m fp8kit.bench --suite "$PEERS" --out "$W/peers" $DEVICE $TIMING >>"$LOG" 2>&1
  echo "peers rc=$?" | tee -a "$LOG"
fi

if has noregress; then
  section noregress
  timeout "$(lim 30)" python3 -m fp8kit.bench --suite "$SUITE" --targets quant,prefill --out "$W/noregress" $DEVICE $TIMING >>"$LOG" 2>&1
  echo "noregress rc=$?" | tee -a "$LOG"
fi

if has benchmarks; then
  section "pytest-benchmark"
  timeout "$(lim 100)" python3 -m pytest tests/benchmarks --benchmark-only -q -p no:cacheprovider -k "not compiled" \
    --benchmark-json="$W/pytest-benchmark.json" --benchmark-columns=median,iqr,rounds >"$W/pytest-benchmark.txt" 2>&1
  echo "pytest-benchmark rc=$?" | tee -a "$LOG"; tail -3 "$W/pytest-benchmark.txt" >>"$LOG"
fi

if has stacks; then
  for BATCH in 8 1; do
    section "stack batch $BATCH"
    timeout "$(lim 130)" python3 -m fp8kit.bench --models $MODEL --model-phases decode --decode-batch $BATCH --quantize-layers 0 \
      --compile-decode --backends fp8-dynamic-token,fp8-static-tensor,fp8-dynamic-tensor,torchao-fp8-row --out "$W/stack-b$BATCH" \
      $DEVICE $TIMING >>"$LOG" 2>&1
    echo "stack b$BATCH rc=$?" | tee -a "$LOG"
  done
fi

if has generate; then
  section generate
  timeout "$(lim 60)" python3 -m fp8kit.bench --models $MODEL --model-phases generate --generate-eager-only --decode-batch 1 \
    --generate-tokens 32 --quantize-layers 0 --backends fp8-dynamic-token,fp8-static-tensor --out "$W/generate" $DEVICE \
    --quiet --warmup 1 --min-runs 3 --max-runs 3 >>"$LOG" 2>&1
  echo "generate rc=$?" | tee -a "$LOG"
fi

section pack
tar czf "$OUT/results.tgz" -C "$W" . && rm -rf "$W"
echo "done after ${SECONDS}s" | tee -a "$LOG"
