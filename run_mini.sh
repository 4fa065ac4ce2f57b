#!/usr/bin/env bash
# The whole paper in miniature, on a 2-core CPU, with one command:
#   build the world, curate -> teach the tiny VLM to see -> train the edit + gen critics | pre-train the tiny policies ->
#   DiffusionNFT RL (gen with QMA; edit with CME and the 0.5/0.5 sum; gen with the exact pixel reward) |
#   bench the critics -> evaluate the policies with the independent pixel judge -> runs/mini/REPORT.md
# The curation ablation (critics trained on directly judged labels) is not part of it: see README.
# Every stage skips work already done, so a rerun (or a run after a kill) continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
R=runs/mini
# SEED=1 bash run_mini.sh: another draw of the world's data and of every initialisation (run it in a fresh clone)
SEED=${SEED:-0}
S="--seed $SEED"
mkdir -p $R/logs
t0=$(date +%s)

stage() { echo; echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

# Run commands side by side (one per core); each one's output is prefixed with its name and kept in a log.
side_by_side() {
  local pids=() names=() rc=0
  while [ $# -gt 0 ]; do
    local name=$1 cmd=$2; shift 2
    ( eval "$cmd" 2>&1 | tee $R/logs/$name.log | sed -u "s/^/[$name] /" ) &
    pids+=($!); names+=("$name")
  done
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then echo "!! ${names[$i]} failed: see $R/logs/${names[$i]}.log"; rc=1; fi
  done
  return $rc
}
# Run a command unless its output marker exists (finished earlier); killed runs resume from checkpoints.
unless_done() { local marker=$1; shift; if [ -e "$marker" ]; then echo "skip: $marker exists"; else eval "$@"; fi; }
# Wait (at most 30 min) for a file that the other lane writes.
wait_for() { local t=0; until [ -e "$1" ]; do sleep 5; t=$((t + 5)); [ $t -lt 1800 ] || { echo "!! gave up waiting for $1"; return 1; }; done; }

stage "1/4 build the miniature world (candidates, bench, RL prompts), curate it (difference-first edits, plan-then-score generations), build the tiny critic base"
unless_done $R/data/world.json "python -m toy world --out $R/data $S 2>&1 | tee $R/logs/world.log"
unless_done $R/data/summary.json "python curate.py --preset mini $S 2>&1 | tee $R/logs/curate.log"
unless_done $R/models/critic-base/config.json "python -m toy critic-base --data $R/data --out $R/models/critic-base $S 2>&1 | tee $R/logs/critic-base.log"

# Each lane runs its steps in order on one core; two lanes run side by side (2-core budget).
critic() { echo "unless_done $R/models/$1/train_reward.json python train_reward.py --preset $2 --resume $S"; }
stage "2/4 teach the tiny Qwen3-VL to see, then train the edit and gen critics | pre-train the tiny policies"
side_by_side \
  critics "$(critic vlm-base mini-vlm) && $(critic edit-critic mini-edit)" \
  policies "unless_done $R/models/gen-base/model_index.json python -m toy pretrain-gen $S && wait_for $R/models/vlm-base/train_reward.json && $(critic gen-critic mini-gen) && unless_done $R/models/edit-base/model_index.json python -m toy pretrain-edit $S"

stage "3/4 DiffusionNFT: gen with QMA, edit with CME + ablations (edit with the 0.5/0.5 sum, Table 5; gen with the exact pixel reward) | bench the critics"
side_by_side \
  rl-a "unless_done $R/rl_gen/pytorch_lora_weights.safetensors python rl_gen.py --preset mini --resume $S && unless_done $R/rl_edit_sum55/pytorch_lora_weights.safetensors python rl_edit.py --preset mini --reward sum55 --out $R/rl_edit_sum55 --resume $S" \
  rl-b "unless_done $R/rl_edit_cme/pytorch_lora_weights.safetensors python rl_edit.py --preset mini --resume $S && unless_done $R/rl_gen_pixel/pytorch_lora_weights.safetensors python rl_gen.py --preset mini --reward-model toy.judges:pixel --reward-image-size 0 --out $R/rl_gen_pixel --resume $S && python bench.py critics --preset mini"

stage "4/4 evaluate the policies with the independent pixel judge, write the report"
side_by_side eval-gen "python bench.py policy --preset mini --kind gen" eval-edit "python bench.py policy --preset mini --kind edit"
python -m toy report 2>&1 | tee $R/logs/report.log

stage "done: open $R/REPORT.md"
