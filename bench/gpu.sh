#!/usr/bin/env bash
# A CUDA machine's check, in under 8 minutes, ending in one table:
#   1. the demo corpus preprocessed into shards (CPU, seconds; the training stream cycles over it);
#   2. configs/small.yaml resolved by name, as a user runs it (CPU);
#   3. the CUDA tests (every test whose name contains "cuda"; the web app's need gradio and are skipped without);
#   4. bench/attention.py's CUDA rows: forward+backward, bf16, packed rows of 8,192 and 16,384 tokens, with
#      the tiles flex computes (full share, fill, against causal) and their build time on one CPU thread,
#      for the summary and the window masks;
#   5. bench/train.py on CUDA: training tokens/s of MeloFormer (mask from the loader) against a plain causal
#      transformer of the same shape, small at 8,192 x 4 (summary and window) and 32,768 x 1, xlarge at
#      8,192 x 2, with the step's time split (mask, forward, backward, optimizer);
#   6. `meloformer fit --config small.yaml`, 60 optimizer steps on the shards: phase switches, recompiles
#      (TORCH_LOGS=recompiles), tokens/s and peak GPU memory.
# Without CUDA it runs steps 1-2, then stops with exit status 3 and says why.
#
#   bash bench/gpu.sh [WORK_DIR]        (default runs/gpu; logs and gpu.json land there)
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
WORK=$(mkdir -p "${1:-runs/gpu}" && cd "${1:-runs/gpu}" && pwd)
PY=${PYTHON:-python}
say() { echo "[gpu.sh $(date +%H:%M:%S)] $*" >&2; }
fail() { echo "bench/gpu.sh: $1 failed (log: $2)" >&2; tail -n 20 "$2" >&2; exit 1; }

say "1/6 demo corpus -> $WORK/shards"
$PY -m meloformer.cli preprocess demo/midi "$WORK/shards" --workers 4 --no_progress >"$WORK/preprocess.log" 2>&1 ||
    fail "preprocess" "$WORK/preprocess.log"

say "2/6 --config small.yaml"
(cd "$WORK" && $PY -m meloformer.cli fit --config small.yaml --data.data_dir "$WORK/shards" --print_config) \
    >"$WORK/resolved-config.yaml" 2>"$WORK/config.log" || fail "config" "$WORK/config.log"

if ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "bench/gpu.sh: no CUDA device (torch.cuda.is_available() is False): the corpus and the config are ready" \
        "in $WORK; the CUDA tests, the attention rows and the 150-step fit need a GPU" >&2
    exit 3
fi

say "3/6 CUDA tests"
start=$SECONDS
timeout 60 $PY -m pytest -q -p no:cacheprovider -k cuda tests >"$WORK/cuda-tests.log" 2>&1
echo "{\"rc\": $?, \"seconds\": $((SECONDS - start))}" >"$WORK/cuda-tests.json"

say "4/6 attention, forward+backward, bf16"
timeout 100 $PY bench/attention.py --device cuda --lengths 8192 16384 --repeats 3 --out "$WORK/attention.json" \
    >"$WORK/attention.log" 2>&1 || say "attention failed: see $WORK/attention.log"

say "5/6 training throughput against plain causal"
for run in "small 8192 4 summary" "small 8192 4 window" "small 32768 1 summary" "xlarge 8192 2 summary"; do
    set -- $run
    timeout 60 $PY bench/train.py --device cuda --size "$1" --seq-len "$2" --batch-size "$3" --steps 4 \
        --attention "$4" --loader-rows 0 --out "$WORK/train-$1-$2-$4.json" >"$WORK/train-$1-$2-$4.log" 2>&1 ||
        say "train $1 $2 $4 failed: see $WORK/train-$1-$2-$4.log"
done

say "6/6 fit --config small.yaml, 60 steps"
rm -rf "$WORK/runs"
start=$SECONDS
(cd "$WORK" && TORCH_LOGS=recompiles timeout 110 $PY - "$WORK" >"$WORK/fit.log" 2>&1 <<'EOF'
import json, sys
import torch
from meloformer.cli import main

work = sys.argv[1]
rc = main(["fit", "--config", "small.yaml", "--data.data_dir", f"{work}/shards", "--trainer.max_steps", "60",
           "--trainer.enable_progress_bar", "false"])
peak = torch.cuda.max_memory_allocated() / 2**30
json.dump({"rc": rc, "peak_gib": peak}, open(f"{work}/fit.json", "w"))
EOF
)
echo "fit wall seconds: $((SECONDS - start))" >>"$WORK/fit.log"

$PY bench/gpu_table.py "$WORK"
