#!/usr/bin/env bash
# Issue 5 numbers on the GPU machine, in two parts that each fit one device call (< 10 min).
#   PART=linears: environment, GPU tests (kernels, _scaled_mm rules, CUDA graphs, offload), then the
#     h100-speed suite (targets 1-3: quantization kernels, prefill and decode linears).
#   PART=final: the GPU tests, then the decode target of the suite (after the skinny-M path) and PART=models.
#   PART=models: whole-model rows (target 4: Llama-3-8B-shaped 4-layer stack and SmolLM2 architecture,
#     prefill and decode, eager / CUDA graph, plus compiled + graph decode) and target 5 (quantizing).
# Usage (repository root): OUT=out/gpu PART=linears bash tools/gpu/issue5_run.sh
set -o pipefail
export PYTHONPATH=packages/core/src:packages/export/src:packages/bench/src PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
PART=${PART:-linears}
TIMING="--quiet --warmup 3 --min-runs 10 --max-runs 100 --budget-ms 100"
mkdir -p "$OUT/work"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
if [ "$PART" = final ]; then
  timeout 150 python3 -m pytest tests/core/test_cuda.py tests/core/test_kernels_cuda.py tests/core/test_graphs.py \
      tests/core/test_offload.py tests/core/test_kernels.py -q -p no:cacheprovider >"$OUT/gpu-tests.txt" 2>&1
  echo "gpu tests rc=$? after ${SECONDS}s"; tail -3 "$OUT/gpu-tests.txt"
  timeout 60 python3 -m pytest tests/core/test_streaming.py -q -p no:cacheprovider -m gpu >>"$OUT/gpu-tests.txt" 2>&1
  echo "streaming gpu tests rc=$? after ${SECONDS}s"; tail -1 "$OUT/gpu-tests.txt"
  timeout 120 python3 -m fp8kit.bench --suite h100-speed --targets decode --out "$OUT/work/h100-decode" $TIMING \
      >"$OUT/suite-log.txt" 2>&1
  echo "decode suite rc=$? after ${SECONDS}s"; tail -2 "$OUT/suite-log.txt"
  PART=models
fi
if [ "$PART" = linears ]; then
  timeout 170 python3 -m pytest tests/core/test_cuda.py tests/core/test_kernels_cuda.py tests/core/test_graphs.py \
      tests/core/test_offload.py -q -p no:cacheprovider -x >"$OUT/gpu-tests.txt" 2>&1
  echo "gpu tests rc=$? after ${SECONDS}s"; tail -3 "$OUT/gpu-tests.txt"
  timeout $(( 560 - SECONDS )) python3 -m fp8kit.bench --suite h100-speed --out "$OUT/work/h100" $TIMING \
      >"$OUT/suite-log.txt" 2>&1
  echo "suite rc=$? after ${SECONDS}s"; tail -5 "$OUT/suite-log.txt"
  tar czf "$OUT/suite.tgz" -C "$OUT/work" h100
else
  timeout 300 python3 -m fp8kit.bench --models llama3-8b-stack,smollm2-arch --out "$OUT/work/models" $TIMING \
      >"$OUT/models-log.txt" 2>&1
  echo "models rc=$? after ${SECONDS}s"; tail -5 "$OUT/models-log.txt"
  timeout $(( 560 - SECONDS )) python3 -m fp8kit.bench --models llama3-8b-stack --compile-decode --compile-prefill \
      --backends fp8-static-tensor-fastacc,fp8-dynamic-token-fastacc,fp8-dynamic-tensor-fastacc --quantize-layers 0 --out "$OUT/work/compiled" $TIMING >"$OUT/compiled-log.txt" 2>&1
  echo "compiled rc=$? after ${SECONDS}s"; tail -5 "$OUT/compiled-log.txt"
  tar czf "$OUT/models.tgz" -C "$OUT/work" .
fi
rm -rf "$OUT/work"
