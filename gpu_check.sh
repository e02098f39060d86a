#!/usr/bin/env bash
# One device call: environment, extension build + SASS check, GPU tests, benchmarks. Logs go to
# $OUT (or ./results). Usage: bash gpu_check.sh [env] [build] [test] [test1] [kernel] [model] [tune] [decode] [serve] ...
#   test: every GPU test (multi-GPU ones need 2+ GPUs); test1: the tests one GPU can run.
#   model/tune take MODEL, LAYERS, TOKENS, SEQS (and model MODES) from the environment; decode and
#   serve take MODEL (default llama-3.1-8b there), and serve WORKLOADS, BUDGETS, ITERS.
set -uo pipefail
OUT=${OUT:-results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NPROC=$(python3 -c "import torch; print(torch.cuda.device_count())")
LAYERS=${LAYERS:-8}; TOKENS=${TOKENS:-1024,2048,4096,8192,16384}; SEQS=${SEQS:-1}
run() { echo "== $*"; "$@"; }
launch() { if [ "$NPROC" -gt 1 ]; then torchrun --standalone --nproc-per-node "$NPROC" "$@"; else python3 "$@"; fi; }
for step in "$@"; do
  case $step in
    env)    run nvidia-smi topo -m; run python3 -c "import torch, os; print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version(), torch.cuda.device_count(), {k: v for k, v in os.environ.items() if 'NVLS' in k or 'MULTICAST' in k})" ;;
    build)  run python3 build_ext.py --sass 2>&1 | tee "$OUT/build.log" ;;
    test)   run python3 -m pytest -q -rs -p no:cacheprovider -n 4 test_weave.py test_engine.py -k cuda 2>&1 | tee "$OUT/test.log"
            run python3 -m pytest -q -rs -p no:cacheprovider test_kernel.py 2>&1 | tee -a "$OUT/test.log" ;;
    test1)  run python3 -m pytest -q -rs -p no:cacheprovider test_engine.py test_kernel.py test_cli.py -k "cuda or fused_add_rmsnorm or rope" 2>&1 | tee "$OUT/test1.log" ;;
    alltest) run python3 -m pytest -q -rs 2>&1 | tee "$OUT/test.log" ;;
    kernel) run launch bench.py kernel --out "$OUT/kernel.json" 2>&1 | grep --line-buffered -v "^W1" | tee "$OUT/kernel.log" ;;
    model)  run launch bench.py model --model "${MODEL:-llama-3.3-70b}" --layers "$LAYERS" --tokens "$TOKENS" \
              --seqs "$SEQS" --modes "${MODES:-nccl,weave-nccl,fuse-only,weave,none}" --plot "$OUT/model-tp$NPROC.png" \
              --trace "$OUT/trace.json" --out "$OUT/model-tp$NPROC.json" 2>&1 | grep --line-buffered -v "^W1" | tee "$OUT/model.log" ;;
    tune)   run launch bench.py tune --model "${MODEL:-llama-3.3-70b}" --layers "$LAYERS" --tokens "$TOKENS" \
              --out "$OUT/tune.json" 2>&1 | grep --line-buffered -v "^W1" | tee "$OUT/tune.log"; cp configs/*.json "$OUT/" 2>/dev/null ;;
    decode) run launch bench.py decode --model "${MODEL:-llama-3.1-8b}" --iters "${ITERS:-20}" --out "$OUT/decode-tp$NPROC.json" 2>&1 | grep --line-buffered -v "^W1" | tee "$OUT/decode.log" ;;
    serve)  run launch bench.py serve --model "${MODEL:-llama-3.1-8b}" --workloads "${WORKLOADS:-1000x1024/128,1000xmixed/128}" \
              --budgets "${BUDGETS:-2048,8192}" --iters "${ITERS:-3}" --out "$OUT/serve-tp$NPROC.json" 2>&1 | grep --line-buffered -v "^W1" | tee "$OUT/serve.log" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
