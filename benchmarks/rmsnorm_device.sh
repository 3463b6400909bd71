#!/usr/bin/env bash
# RMSNorm on the lent GPU in one short call (carry .whl; run from the tree's root):
#
#   bash benchmarks/rmsnorm_device.sh <commit> [json name] [seconds]
#
# 1. the CUDA tests of the new kernel paths (chunked, persistent, main_grad, two-pass, the
#    add+norm tile backward) and of fast_launch / megatron_norm, beside 14 workers compiling
#    the launch sweep (the add+norm one included) into Triton's cache;
# 2. bench_rmsnorm --quick --tune (hidden 2048 first: the add+norm sweep and the plain norm's
#    launch sweep; then each shape's sweep winners timed as the defaults, the tables
#    printed; the JSON, summary included, rewritten after every part);
# 3. with what is left of [seconds] (default 118), the older training-size CUDA tests.
# (The profile of what the copy bar runs, here up to 5699fec, left out: it showed the
# driver's cudaMemcpyAsync device to device; see bench_rmsnorm's copy_basis.)
# (The compile workers and the first tests got 40 s since the cache-hint, packed-row and
# TMA candidates, ~90 more compiles, joined the sweep; at 5699fec all precompiled by 27 s,
# the whole script 114 s with budget 150; at 5979bbb, with the add+norm sweep and the
# two-pass candidates, precompiled by 32 s, the bench done at 152 s, 164 s with budget
# 165 (the older tests got 11 s and were cut). A `-k tma` there matched every test, the
# device's path holding "tma" somewhere: the TMA test goes by its node id.)
# Every step has a timeout inside the budget; logs and the JSON land in $OUT.
set -u
export GIT_COMMIT=$1
name=${2:-rmsnorm_h200.json}
budget=${3:-118}
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
. benchmarks/gpu_env.sh || exit 1
export TORCHINDUCTOR_COMPILE_THREADS=1  # inductor compiles in the timed process, alone
# 0. the TMA forward's CUDA test alone, beside the rest: a fault there (a bad tensor map is
#    fatal to the CUDA context) cannot take the timed process with it; on a failure the
#    sweep leaves TMA out (RMSNORM_SWEEP_NO_TMA).
(env -u TRITON_ALLOW_NON_CONSTEXPR_GLOBALS timeout 38 python -m pytest -q -p no:cacheprovider \
  -m cuda "tests/kernels/test_rmsnorm.py::test_tma_forward_matches_float64_on_gpu" \
  > "$OUT/tests_tma.log" 2>&1; echo $? > /tmp/tma_rc) &
for i in $(seq 0 13); do  # logs in /tmp: the device tool brings back only a few files
  timeout 55 python -m benchmarks.bench_rmsnorm --quick --precompile "$i/14" > "/tmp/precompile$i.log" 2>&1 &
done
new="chunked or main_grad or direct_launches or selective or two_pass or tile"
env -u TRITON_ALLOW_NON_CONSTEXPR_GLOBALS timeout 50 python -m pytest -q -p no:cacheprovider \
  -m cuda -k "$new" tests/kernels/test_rmsnorm.py tests/kernels/test_fast_launch.py \
  tests/kernels/test_megatron_norm.py tests/kernels/test_add_rmsnorm.py > "$OUT/tests_new.log" 2>&1
echo "tests (new paths) rc=$? at $(( $(date +%s) - start )) s"; tail -3 "$OUT/tests_new.log"
wait; echo "precompiled at $(( $(date +%s) - start )) s"
echo "tests (TMA) rc=$(cat /tmp/tma_rc)"; tail -2 "$OUT/tests_tma.log"
[ "$(cat /tmp/tma_rc)" = 0 ] || export RMSNORM_SWEEP_NO_TMA=1
cat /tmp/precompile*.log | grep -v Warning | head -20
t=$(( $(left) - 5 ))
timeout "$t" python -m benchmarks.bench_rmsnorm --quick --tune --out "$OUT/$name" > "$OUT/rmsnorm.log" 2>&1
echo "rmsnorm rc=$? (limit ${t} s) at $(( $(date +%s) - start )) s"
grep -E "^summary|^host|TABLE|sweep [0-9]+s|^add\+norm" "$OUT/rmsnorm.log" | cut -c1-600
t=$(( $(left) - 2 ))
if [ "$t" -gt 5 ]; then
  env -u TRITON_ALLOW_NON_CONSTEXPR_GLOBALS timeout "$t" python -m pytest -q -p no:cacheprovider \
    -m cuda -k "not ($new or test_tma_forward)" tests/kernels/test_rmsnorm.py > "$OUT/tests_rest.log" 2>&1
  echo "tests (training sizes) rc=$? (limit ${t} s)"; tail -2 "$OUT/tests_rest.log"
fi
