#!/usr/bin/env bash
# The whole paper in miniature, on a 2-core CPU, with one command:
#   build the world, curate -> teach the tiny VLM to see -> train the edit + gen critics | pre-train the tiny policies ->
#   DiffusionNFT RL (gen with QMA, with the direct-judged gen critic, with the exact pixel reward; edit with CME and
#   the 0.5/0.5 sum) -> bench the critics -> evaluate the policies with the independent pixel judge -> runs/mini/REPORT.md
# The gen half of the curation ablation (a critic trained on directly judged labels) is part of it; the edit half
# (python train_reward.py --preset mini-edit-direct) is not: its ~1500 s of one core would lengthen the job by as much.
# Every stage skips work already done, so a rerun (or a run after a kill) continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
R=runs/mini
# SEED=1 bash run_mini.sh: another draw of the world's data and of every initialisation (run it in a fresh clone)
SEED=${SEED:-0}
S="--seed $SEED"
mkdir -p $R/logs
rm -f $R/logs/lane.failed $R/logs/times.tsv  # a rerun times only what it runs
t0=$(date +%s)

stage() { echo; echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

# Run commands side by side (one per core); each one's output is prefixed with its name and kept in a log.
side_by_side() {
  local pids=() names=() rc=0
  while [ $# -gt 0 ]; do
    local name=$1 cmd=$2; shift 2
    ( eval "$cmd" 2>&1 | tee $R/logs/$name.log | sed -u "s/^/[$name] /" || { touch $R/logs/lane.failed; exit 1; } ) &
    pids+=($!); names+=("$name")
  done
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then echo "!! ${names[$i]} failed: see $R/logs/${names[$i]}.log"; rc=1; fi
  done
  return $rc
}
# step NAME MARKER CMD...: run CMD unless MARKER exists (finished earlier; killed runs resume from checkpoints; "-":
# always run, the command resumes itself), and append "NAME <tab> start s <tab> end s" (since the job started) to
# $R/logs/times.tsv.
step() {
  local name=$1 marker=$2; shift 2
  if [ "$marker" != - ] && [ -e "$marker" ]; then echo "skip: $marker exists"; return 0; fi
  local t1=$(( $(date +%s) - t0 ))
  eval "$@" || return 1
  echo -e "$name\t$t1\t$(( $(date +%s) - t0 ))" >> $R/logs/times.tsv
}
# Wait for a file that the other lane writes; give up when that lane has failed, or after an hour.
wait_for() {
  local t=0
  until [ -e "$1" ]; do
    [ ! -e $R/logs/lane.failed ] || { echo "!! the other lane failed"; return 1; }
    [ $t -lt 3600 ] || { echo "!! gave up waiting for $1"; return 1; }
    sleep 5; t=$((t + 5))
  done
}

# Two lanes, one per core, each running its steps in order; a step waits only for the files it reads (wait_for),
# so neither core idles at a stage boundary; the pixel-reward gen RL (no critic to wait for) sits in lane A to even the
# lanes' lengths. Every step's start and end go to $R/logs/times.tsv (the report's table).
critic() { echo "step $1 $R/models/$1/train_reward.json python train_reward.py --preset $2 --resume $S"; }
rl() { echo "step $1 $R/$1/pytorch_lora_weights.safetensors python $2.py --preset mini --out $R/$1 --resume $S ${*:3}"; }
stage "1/2 lane A: world -> curate -> critic base -> the seeing stage -> edit critic -> RL edit (CME, 0.5/0.5 sum) -> RL gen (exact pixel reward) | " \
      "lane B: pre-train the tiny generator and editor -> gen critic (+ direct-judged) -> RL gen (QMA, direct-judged critic) -> bench critics"
side_by_side \
  lane-a "step world $R/data/world.json python -m toy world --out $R/data $S \
       && step curate $R/data/summary.json python curate.py --preset mini $S \
       && step critic-base $R/models/critic-base/config.json python -m toy critic-base --data $R/data --out $R/models/critic-base $S \
       && $(critic vlm-base mini-vlm) && $(critic edit-critic mini-edit) && $(rl rl_edit_cme rl_edit) \
       && $(rl rl_edit_sum55 rl_edit --reward sum55) \
       && wait_for $R/models/gen-base/model_index.json && $(rl rl_gen_pixel rl_gen --reward-model toy.judges:pixel --reward-image-size 0)" \
  lane-b "step pretrain-gen $R/models/gen-base/model_index.json python -m toy pretrain-gen $S \
       && step pretrain-edit $R/models/edit-base/model_index.json python -m toy pretrain-edit $S \
       && wait_for $R/models/vlm-base/train_reward.json && $(critic gen-critic mini-gen) \
       && $(critic gen-critic-direct mini-gen-direct) && $(rl rl_gen rl_gen) \
       && $(rl rl_gen_direct rl_gen --reward-model $R/models/gen-critic-direct) \
       && wait_for $R/models/edit-critic/train_reward.json && step bench-critics - python bench.py critics --preset mini"

stage "2/2 evaluate the policies with the independent pixel judge, write the report"
side_by_side eval-gen "step eval-gen - python bench.py policy --preset mini --kind gen" \
  eval-edit "step eval-edit - python bench.py policy --preset mini --kind edit"
echo -e "all\t0\t$(( $(date +%s) - t0 ))" >> $R/logs/times.tsv
python -m toy report 2>&1 | tee $R/logs/report.log

stage "done: open $R/REPORT.md"
