#!/usr/bin/env bash
# One device call: environment, extension build + SASS check, GPU tests, benchmarks. Logs go to
# $OUT (or ./results). Usage: bash gpu_check.sh [build] [test] [kernel] [model] [tune] ...
#   model/tune take MODEL, LAYERS, TOKENS, SEQS (and model MODES) from the environment.
set -uo pipefail
OUT=${OUT:-results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NPROC=$(python3 -c "import torch; print(torch.cuda.device_count())")
MODEL=${MODEL:-llama-3.3-70b}; LAYERS=${LAYERS:-8}; TOKENS=${TOKENS:-1024,2048,4096,8192,16384}; SEQS=${SEQS:-1}
run() { echo "== $*"; "$@"; }
for step in "$@"; do
  case $step in
    env)    run nvidia-smi topo -m; run python3 -c "import torch, os; print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version(), torch.cuda.device_count(), {k: v for k, v in os.environ.items() if 'NVLS' in k or 'MULTICAST' in k})" ;;
    build)  run python3 build_ext.py --sass 2>&1 | tee "$OUT/build.log" ;;
    test)   run python3 -m pytest -q -rs -n 4 test_weave.py -k cuda 2>&1 | tee "$OUT/test.log"
            run python3 -m pytest -q -rs test_kernel.py 2>&1 | tee -a "$OUT/test.log" ;;
    alltest) run python3 -m pytest -q -rs 2>&1 | tee "$OUT/test.log" ;;
    kernel) run torchrun --standalone --nproc-per-node "$NPROC" bench.py kernel --out "$OUT/kernel.json" 2>&1 | grep -v "^W1" | tee "$OUT/kernel.log" ;;
    model)  run torchrun --standalone --nproc-per-node "$NPROC" bench.py model --model "$MODEL" --layers "$LAYERS" --tokens "$TOKENS" \
              --seqs "$SEQS" --modes "${MODES:-nccl,weave-nccl,fuse-only,weave,none}" --plot "$OUT/$MODEL-tp$NPROC.png" \
              --trace "$OUT/trace-$MODEL.json" --out "$OUT/model-$MODEL-tp$NPROC.json" 2>&1 | grep -v "^W1" | tee "$OUT/model-$MODEL.log" ;;
    tune)   run torchrun --standalone --nproc-per-node "$NPROC" bench.py tune --model "$MODEL" --layers "$LAYERS" --tokens "$TOKENS" \
              --out "$OUT/tune-$MODEL.json" 2>&1 | grep -v "^W1" | tee "$OUT/tune-$MODEL.log"; cp configs/*.json "$OUT/" 2>/dev/null ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
