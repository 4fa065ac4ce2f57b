#!/usr/bin/env bash
# GPU check, one command on a machine with CUDA GPUs:  bash benchmarks/gpu_check.sh
#   1. the real-checkpoint-layout tests on CUDA (pytest -q tests/test_real_layout.py), pass/fail recorded;
#   2. benchmarks/gpu_check.py on every visible GPU (torchrun): real sizes, random weights, nothing downloaded;
#   3. prints the table and where it is (runs/gpu_check/gpu_check.md and .json).
# Arguments go to gpu_check.py (e.g. --parts a c). Environment: OUT (default runs/gpu_check), TEST_TIMEOUT and
# CHECK_TIMEOUT in seconds (default 1800 each: a rank that fails inside a collective can hang the others),
# NPROC (ranks; default: the number of visible GPUs). Without a GPU, `bash benchmarks/gpu_check.sh --tiny`
# runs the same steps at toy sizes on 2 CPU ranks (gloo).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"

NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [[ "$NGPU" -eq 0 && " $* " != *" --tiny "* ]]; then
    echo "no CUDA GPU visible; on a CPU run: bash benchmarks/gpu_check.sh --tiny" >&2
    exit 2
fi
NPROC=${NPROC:-$(( NGPU > 0 ? NGPU : 2 ))}
echo "== $NGPU GPU(s) visible; gpu_check.py will run on $NPROC rank(s); logs and table in $OUT"

# 1. the real-layout test tier (its tests pick CUDA + NCCL when available, 2-process torchrun tests included)
echo "== 1/2: python -m pytest -q tests/test_real_layout.py"
timeout "${TEST_TIMEOUT:-1800}" python -m pytest -q tests/test_real_layout.py 2>&1 | tee "$OUT/test_real_layout.log"
RC=${PIPESTATUS[0]}
SUMMARY=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT/test_real_layout.log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
case $RC in
    0) TESTS="passed: $SUMMARY" ;;
    124) TESTS="failed: timed out after ${TEST_TIMEOUT:-1800} s" ;;
    4) TESTS="failed (pytest exit 4: tests/test_real_layout.py missing, or a usage error)" ;;
    *) TESTS="failed (pytest exit $RC): ${SUMMARY:-see $OUT/test_real_layout.log}" ;;
esac
echo "== tests: $TESTS"

# 2. real sizes on every GPU; the table is rewritten after each part, so a killed run keeps what it measured
echo "== 2/2: torchrun --standalone --nproc_per_node=$NPROC benchmarks/gpu_check.py --out $OUT $*"
timeout "${CHECK_TIMEOUT:-1800}" torchrun --standalone --nproc_per_node="$NPROC" benchmarks/gpu_check.py \
    --out "$OUT" --tests "$TESTS" "$@" 2>&1 | tee "$OUT/gpu_check.log"
RC2=${PIPESTATUS[0]}

# 3. where the table is
echo
if [[ -f "$OUT/gpu_check.md" ]]; then
    [[ $RC2 -ne 0 ]] && echo "gpu_check.py exited with $RC2 (124 = timed out); the table holds the parts that finished"
    echo "table: $OUT/gpu_check.md (and $OUT/gpu_check.json); logs: $OUT/test_real_layout.log, $OUT/gpu_check.log"
else
    echo "gpu_check.py wrote no table (exit $RC2); see $OUT/gpu_check.log"
fi
exit $(( RC != 0 || RC2 != 0 ))
