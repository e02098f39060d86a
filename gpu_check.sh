#!/usr/bin/env bash
# One device call: environment, extension build + SASS check, GPU tests, benchmarks. Logs go to
# $OUT (or ./results). Usage: bash gpu_check.sh [env] [build] [test] [test1] [kernel] [virtual] [model]
#        [model1] [split] [ceiling] [tune] [decode] [attention] [gemm] [serve] [e2e] ...
#   test: every GPU test (multi-GPU ones need 2+ GPUs); test1: the tests one GPU can run (the
#   kernel's virtual ranks among them, alone on the GPU: -n 0). model/tune take MODEL, LAYERS,
#   TOKENS, SEQS (and model MODES) from the environment; model1 is the prefill on one GPU (the
#   attention paths); split the split step against the whole one on one GPU, every shape (or
#   MODELS, a comma list), with its profile and replayed from CUDA graphs (TOKENS, ITERS); ceiling
#   what one SM can copy (the comm kernel's bound on one GPU; with 2+ GPUs also over NVLink to a
#   peer's memory);
#   decode (with a per-kernel profile), attention (the decode attention kernel alone), gemm (a
#   decode step's GEMMs alone) and serve take MODEL (default llama-3.1-8b there), and serve
#   WORKLOADS, BUDGETS, ITERS (it profiles each run by kind of step); e2e writes an 8B-shaped
#   checkpoint and times run.py on it at the default settings.
set -uo pipefail
OUT=${OUT:-results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NPROC=$(python3 -c "import torch; print(torch.cuda.device_count())")
LAYERS=${LAYERS:-8}; TOKENS=${TOKENS:-1024,2048,4096,8192,16384}; SEQS=${SEQS:-1}
CKPT=${CKPT:-/tmp/tokenweave-ckpt}
run() { echo "== $*"; "$@"; }
launch() { if [ "$NPROC" -gt 1 ]; then torchrun --standalone --nproc-per-node "$NPROC" "$@"; else python3 "$@"; fi; }
quiet() { grep --line-buffered -v "^W1"; }
for step in "$@"; do
  case $step in
    env)    run nvidia-smi topo -m; run python3 -c "import torch, os; print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version(), torch.cuda.device_count(), {k: v for k, v in os.environ.items() if 'NVLS' in k or 'MULTICAST' in k})" ;;
    build)  run python3 build_ext.py --sass 2>&1 | tee "$OUT/build.log" ;;
    test)   run python3 -m pytest -q -rs -p no:cacheprovider -n 4 test_weave.py test_engine.py -k cuda 2>&1 | tee "$OUT/test.log"
            run python3 -m pytest -q -rs -p no:cacheprovider -n 0 test_comm.py test_fastpath.py 2>&1 | tee -a "$OUT/test.log" ;;
    test1)  run python3 -m pytest -q -rs -p no:cacheprovider -n 0 test_comm.py test_fastpath.py 2>&1 | tee "$OUT/test1.log"
            run python3 -m pytest -q -rs -p no:cacheprovider -n 0 test_engine.py test_cli.py -k cuda 2>&1 | tee -a "$OUT/test1.log" ;;
    alltest) run python3 -m pytest -q -rs 2>&1 | tee "$OUT/test.log" ;;
    kernel) run launch bench.py kernel --out "$OUT/kernel.json" 2>&1 | quiet | tee "$OUT/kernel.log" ;;
    virtual) run python3 bench.py kernel --virtual "${VIRTUAL:-4}" --hidden "${HIDDEN:-8192}" --out "$OUT/virtual.json" 2>&1 | tee "$OUT/virtual.log" ;;
    model)  run launch bench.py model --model "${MODEL:-llama-3.3-70b}" --layers "$LAYERS" --tokens "$TOKENS" \
              --seqs "$SEQS" --modes "${MODES:-nccl,weave-nccl,fuse-only,weave,none}" --plot "$OUT/model-tp$NPROC.png" \
              --trace "$OUT/trace.json" --out "$OUT/model-tp$NPROC.json" 2>&1 | quiet | tee "$OUT/model.log" ;;
    model1) run python3 bench.py model --model "${MODEL:-llama-3.1-8b}" --tokens "${TOKENS1:-2048,4096,16384}" \
              --iters "${ITERS:-5}" --out "$OUT/model-tp1.json" 2>&1 | tee "$OUT/model1.log" ;;
    split)  # the split's own cost on one GPU (issue 40): every shape, one and four sequences, with its profile
            for m in $(echo "${MODELS:-llama-3.1-8b,llama-3.3-70b,qwen2.5-72b,mixtral-8x22b}" | tr , " "); do
              layers=$([ $m = llama-3.1-8b ] && echo 32 || echo 8)
              run python3 bench.py model --model $m --layers $layers --tokens "$TOKENS" --seqs 1,4 --iters "${ITERS:-10}" \
                --modes tp1,tp1-split,tp1-split-inline --profile --graph --out "$OUT/split-$m.json" 2>&1 | quiet | tee -a "$OUT/split.log"
            done ;;
    ceiling) run python3 docs/sm_ceiling.py 2>&1 | grep -v "^W" | tee "$OUT/ceiling.log"
            [ "$NPROC" -gt 1 ] && run python3 docs/sm_ceiling.py --peer 1 2>&1 | grep -v "^W" | tee -a "$OUT/ceiling.log" ;;
    tune)   run launch bench.py tune --model "${MODEL:-llama-3.3-70b}" --layers "$LAYERS" --tokens "$TOKENS" \
              --out "$OUT/tune.json" 2>&1 | quiet | tee "$OUT/tune.log"; cp configs/*.json "$OUT/" 2>/dev/null ;;
    decode) run launch bench.py decode --model "${MODEL:-llama-3.1-8b}" --iters "${ITERS:-20}" --profile --out "$OUT/decode-tp$NPROC.json" 2>&1 | quiet | tee "$OUT/decode.log" ;;
    gemm)   run python3 bench.py gemm --model "${MODEL:-llama-3.1-8b}" --iters 10 --out "$OUT/gemm.json" 2>&1 | tee "$OUT/gemm.log" ;;
    attention) run python3 bench.py attention --model "${MODEL:-llama-3.1-8b}" --iters 20 --out "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" ;;
    serve)  run launch bench.py serve --model "${MODEL:-llama-3.1-8b}" --workloads "${WORKLOADS:-1000x1024/128,1000xmixed/128}" \
              --budgets "${BUDGETS:-2048,8192}" --iters "${ITERS:-3}" --profile --out "$OUT/serve-tp$NPROC.json" 2>&1 | quiet | tee "$OUT/serve.log" ;;
    e2e)    # what a user runs: a whole run.py process on a checkpoint on disk, first run
            [ -d "$CKPT" ] || run python3 bench.py checkpoint "$CKPT" --model "${MODEL:-llama-3.1-8b}" 2>&1 | tee "$OUT/ckpt.log"
            TIMEFORMAT="process wall %R s"
            { time python3 run.py --model "$CKPT" --prompt "Tell me about tensor parallelism." --max-new-tokens 32; } \
              2>&1 | tee "$OUT/e2e-one.log"
            { time python3 run.py --model "$CKPT" --prompts-file "$CKPT/prompts.txt" --max-new-tokens 128 --json \
              > "$OUT/e2e-many.jsonl"; } 2> "$OUT/e2e-many.err"; grep -v "prompts done" "$OUT/e2e-many.err" | tail -30 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
