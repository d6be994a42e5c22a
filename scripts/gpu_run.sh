#!/usr/bin/env bash
# The GPU run behind the README's GPU figures, in one go: all stages of train_small.py (preset
# `small` unless flags say otherwise), then `python -m tinyldm evaluate` and `python bench.py`.
#
#   bash scripts/gpu_run.sh RESULTS_DIR [train_small.py flags ...]
#
# RESULTS_DIR receives at most 9 small files: train.log, metrics.json, eval.json, eval.png,
# bench.json, bench.png, samples_final.png, loss.png, reconstructions.png. The run folder itself (with the
# weights) goes to runs/gpu. EVAL_PROMPTS (default 32) sets the prompts per kind of evaluate's sweeps,
# EVAL_FINAL (default 1100) the fresh prompts per kind of its headline figures.
# Rehearse on a CPU: EVAL_PROMPTS=2 EVAL_FINAL=3 BENCH_FLAGS=--tiny bash scripts/gpu_run.sh /tmp/rehearsal --preset tiny
set -euo pipefail
results=${1:?usage: bash scripts/gpu_run.sh RESULTS_DIR [train_small.py flags ...]}
shift
mkdir -p "$results"
export PYTHONUNBUFFERED=1
prompts=${EVAL_PROMPTS:-32}
start=$(date +%s)
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$results/train.log"
python train_small.py --preset small --runs-dir runs --name gpu --overwrite "$@" 2>&1 \
  | tr '\r' '\n' | grep -v 'it/s\]$\|s/it\]$' | tee -a "$results/train.log"
echo "train_small.py: $(( $(date +%s) - start )) s wall" | tee -a "$results/train.log"
cp runs/gpu/metrics.json runs/gpu/samples_final.png runs/gpu/loss.png runs/gpu/reconstructions.png "$results/"
python -m tinyldm evaluate --run runs/gpu --out "$results/eval.json" --prompts-per-kind "$prompts" \
  --guidance 1,2,3,5,7 --samplers ddim10,ddim20,ddim50,ddim100,ddim1000,ddpm --sweep-prompts "$prompts" \
  --classifier-scales 0,1,3,10 --final-images "${EVAL_FINAL:-1100}" 2>&1 | tr '\r' '\n' | grep -v 'it/s\]$\|s/it\]$' | tee -a "$results/train.log"
python bench.py --out "$results/bench.json" --fidelity "$results/eval.json" ${BENCH_FLAGS:-} 2>&1 | tee -a "$results/train.log"
echo "all: $(( $(date +%s) - start )) s wall" | tee -a "$results/train.log"
