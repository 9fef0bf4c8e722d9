#!/usr/bin/env bash
# The learning loop's tests (tests/cloud/ml, pipeline, worker) across CPU kernels and fixture seeds:
# one pytest run per cell, then a table. A cell is KERNEL:SEED, KERNEL being a value of
# ATEN_CPU_CAPABILITY (avx2, avx512, default, ...) or "default" for the CPU's own choice, SEED the
# tests' DIREDI_TEST_FIXTURE_SEED. Logs go to $RESULTS/loop-matrix/.
#   scripts/loop_matrix.sh                       # default:3 avx2:3 default:5 default:11 default:17
#   scripts/loop_matrix.sh avx2:5 avx512:3       # chosen cells
set -euo pipefail
cd "$(dirname "$0")/.."
out="${RESULTS:-results}/loop-matrix"
mkdir -p "$out"
cells=("$@")
[[ ${#cells[@]} -gt 0 ]] || cells=(default:3 avx2:3 default:5 default:11 default:17)
for cell in "${cells[@]}"; do
    [[ $cell =~ ^[a-z0-9_]+:[0-9]+$ ]] || { echo "error: cell '$cell' is not KERNEL:SEED" >&2; exit 2; }
done
status=0
declare -A summary
for cell in "${cells[@]}"; do
    kernel=${cell%%:*} seed=${cell##*:}
    log="$out/${kernel}-seed${seed}.log"
    echo "== $cell → $log"
    env_args=(DIREDI_TEST_FIXTURE_SEED="$seed")
    [[ $kernel == default ]] || env_args+=(ATEN_CPU_CAPABILITY="$kernel")
    env "${env_args[@]}" .venv/bin/python -m pytest -q -p no:cacheprovider \
        tests/cloud/ml tests/cloud/pipeline tests/cloud/worker >"$log" 2>&1 || status=1
    summary[$cell]=$(tail -n 1 "$log")
done
printf '\n%-16s %s\n' "kernel:seed" "pytest"
for cell in "${cells[@]}"; do
    printf '%-16s %s\n' "$cell" "${summary[$cell]}"
done
exit $status
