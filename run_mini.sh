#!/usr/bin/env bash
# The whole paper in miniature, on a 2-core CPU, with one command:
#   curate -> train the edit + gen critics (and the curation ablation) -> bench the critics ->
#   pre-train the tiny policies -> DiffusionNFT RL (gen with QMA; edit with CME and the 0.5/0.5 sum) ->
#   evaluate the policies with the independent pixel judge -> runs/mini/REPORT.md
# Every stage skips work already done, so a rerun (or a run after a kill) continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
R=runs/mini
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

stage "1/7 curate the miniature datasets (difference-first edits, plan-then-score generations)"
unless_done $R/data/summary.json "python curate.py 2>&1 | tee $R/logs/curate.log"

stage "2/7 train the critics (SFT of the tiny Qwen3-VL), two at a time"
critic() { echo "unless_done $R/models/$1/train_reward.json python train_reward.py --preset mini --resume $2"; }
side_by_side edit-critic "$(critic edit-critic '--task edit')" gen-critic "$(critic gen-critic '--task gen')"
side_by_side edit-critic-direct "$(critic edit-critic-direct '--task edit --ablation direct')" \
             gen-critic-direct "$(critic gen-critic-direct '--task gen --ablation direct')"

stage "3/7 FIRM-Bench in miniature: critics vs baselines"
python bench.py critics --preset mini 2>&1 | tee $R/logs/bench-critics.log

stage "4/7 pre-train the tiny policies (flow matching on the world's images)"
side_by_side pretrain-gen "unless_done $R/models/gen-base/model_index.json python toy.py pretrain-gen" \
             pretrain-edit "unless_done $R/models/edit-base/model_index.json python toy.py pretrain-edit"

stage "5/7 DiffusionNFT: generator with QMA, editor with CME"
side_by_side rl-gen "unless_done $R/rl_gen/pytorch_lora_weights.safetensors python rl_gen.py --preset mini" \
             rl-edit-cme "unless_done $R/rl_edit_cme/pytorch_lora_weights.safetensors python rl_edit.py --preset mini --reward cme --resume"

stage "6/7 DiffusionNFT ablations: editor with the naive 0.5/0.5 sum (Table 5); generator with the exact pixel reward"
side_by_side rl-edit-sum55 "unless_done $R/rl_edit_sum55/pytorch_lora_weights.safetensors python rl_edit.py --preset mini --reward sum55 --resume" \
             rl-gen-pixel "unless_done $R/rl_gen_pixel/pytorch_lora_weights.safetensors python rl_gen.py --preset mini --reward pixel --out $R/rl_gen_pixel"

stage "7/7 evaluate the policies with the independent pixel judge, write the report"
side_by_side eval-gen "python bench.py policy --preset mini --kind gen" eval-edit "python bench.py policy --preset mini --kind edit"
python bench.py report --preset mini 2>&1 | tee $R/logs/report.log

stage "done: open $R/REPORT.md"
