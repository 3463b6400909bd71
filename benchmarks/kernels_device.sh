# The kernel benchmarks on the lent H200, in the two back-to-back calls flash-attn-4 needs
# (benchmarks/gpu_env.sh): run from the repository root on the device, results under $OUT.
#
#   call 1 (carry .whl .fa4a):  bash benchmarks/kernels_device.sh 1 <commit>
#   call 2 (carry .whl .fa4b):  bash benchmarks/kernels_device.sh 2 <commit>
#   later (carry .whl):         bash benchmarks/kernels_device.sh 3 <commit>
#   RMSNorm alone (carry .whl): bash benchmarks/kernels_device.sh rmsnorm <commit>
#   attention alone, two back-to-back calls (carry .whl .fa4a, then .fa4b alone: 64 MiB):
#       bash benchmarks/kernels_device.sh attention-1 <commit>   (~3.5 min)
#       bash benchmarks/kernels_device.sh attention-2 <commit>   (~1.5 min)
#
# attention-1: the attention CUDA tests (every kernel variant against float64) beside the
#    tuner's compile workers for fwd, dK/dV and dQ (plain and PIPELINE/SUBTILE/DEFER variants,
#    timed on vs off), then the tuner's timing; winners to /tmp and $OUT. KINDS (the tuner's
#    --kinds), COMPILE_S and TUNE_S (their time limits) override the defaults.
# attention-2: flash-attn-4 installed, bench_attention with those winners against it and SDPA.
# attention-tests (carry .whl .fa4a; then attention-2 with .whl .fa4b): the attention CUDA tests,
#    Gluon kernels included (tests/kernels/test_attention*.py), flash-attn-4's first part staged.
# attention-fwd (carry .whl; ~1.5 min): the forward's tuner alone (plain, PIPELINE, SUBTILE and
#    the no-softmax diagnostic, on vs off), e.g. to time a forward change before a full pair.
#
# 1: CUDA kernel tests beside the attention tuner's compile workers, then the tuner's timing
#    (winners kept in /tmp for call 2) and the RMSNorm benchmark.
# 2: flash-attn-4 installed; its CUDA tests, then bench_attention (the tuner's winners
#    installed) against flash-attn-4 and SDPA. Correctness: the CUDA tests of call 1.
# rmsnorm: its CUDA tests beside 12 workers compiling the launch sweep into Triton's cache,
#    then the RMSNorm benchmark (--quick: the three target shapes; --tune: each shape's
#    sweep winners timed as the defaults, printed as the tables for kernels/rmsnorm.py).
# 3: the hard-coded configs' CUDA tests beside the forward diagnostic's compile (the forward
#    without its softmax), then the RMSNorm benchmark.
set -u
step=$1
export GIT_COMMIT=$2
if [ "$step" = 1 ]; then
  . benchmarks/gpu_env.sh fa4-1 || exit 1
  env -u TRITON_ALLOW_NON_CONSTEXPR_GLOBALS timeout 240 python -m pytest -q -p no:cacheprovider \
    -m cuda tests/kernels/test_attention{,_bwd}.py tests/kernels/test_rmsnorm.py \
    tests/kernels/test_fast_launch.py tests/kernels/test_megatron_norm.py > "$OUT/tests1.log" 2>&1 &
  tests=$!
  timeout 240 python -m benchmarks.tune_attention --compile-only --workers 12 \
    --out /tmp/tune_compiled.json > "$OUT/tune.log" 2>&1
  wait $tests; echo "tests1 rc=$?"; tail -3 "$OUT/tests1.log"
  timeout 150 python -m benchmarks.tune_attention --compiled /tmp/tune_compiled.json \
    --out "$OUT/attention_tune_h200.json" --winners-out /tmp/attention_winners.json >> "$OUT/tune.log" 2>&1
  echo "tune rc=$?"; grep -E "^compiled|^winners" "$OUT/tune.log"
  timeout 180 python -m benchmarks.bench_rmsnorm --quick --out "$OUT/rmsnorm_h200.json" > "$OUT/rmsnorm.log" 2>&1
  echo "rmsnorm rc=$?"; grep -E "^summary" "$OUT/rmsnorm.log"
elif [ "$step" = attention-1 ]; then
  . benchmarks/gpu_env.sh fa4-1 || exit 1
  kinds=${KINDS:-fwd,fwd_nosoftmax,dkdv,dq}
  env -u TRITON_ALLOW_NON_CONSTEXPR_GLOBALS timeout 150 python -m pytest -q -p no:cacheprovider \
    -m cuda tests/kernels/test_attention{,_bwd}.py > "$OUT/tests_attention.log" 2>&1 &
  tests=$!
  timeout "${COMPILE_S:-120}" python -m benchmarks.tune_attention --compile-only --kinds $kinds \
    --workers 12 --out /tmp/tune_compiled.json > "$OUT/tune.log" 2>&1
  echo "compile rc=$?"
  wait $tests; echo "tests rc=$?"; grep -E "passed|failed|Error" "$OUT/tests_attention.log" | tail -8
  timeout "${TUNE_S:-80}" python -m benchmarks.tune_attention --compiled /tmp/tune_compiled.json --kinds $kinds \
    --out "$OUT/attention_tune_h200.json" --winners-out /tmp/attention_winners.json >> "$OUT/tune.log" 2>&1
  echo "tune rc=$?"; grep -E "^compiled|^winners" "$OUT/tune.log"
  cp /tmp/attention_winners.json "$OUT/" 2>/dev/null
elif [ "$step" = attention-tests ]; then
  . benchmarks/gpu_env.sh fa4-1 || exit 1
  env -u TRITON_ALLOW_NON_CONSTEXPR_GLOBALS timeout "${TESTS_S:-240}" python -m pytest -q \
    -p no:cacheprovider -m cuda tests/kernels/test_attention*.py tests/kernels/test_megatron_attention.py \
    > "$OUT/tests_attention.log" 2>&1
  echo "tests rc=$?"; grep -E "passed|failed|error" "$OUT/tests_attention.log" | tail -5
elif [ "$step" = attention-fwd ]; then
  . benchmarks/gpu_env.sh || exit 1
  timeout 90 python -m benchmarks.tune_attention --compile-only --kinds fwd,fwd_nosoftmax \
    --workers 12 --out /tmp/fwd_compiled.json > "$OUT/tune_fwd.log" 2>&1
  echo "compile rc=$?"
  timeout 60 python -m benchmarks.tune_attention --compiled /tmp/fwd_compiled.json \
    --kinds fwd,fwd_nosoftmax --out "$OUT/attention_tune_fwd_h200.json" >> "$OUT/tune_fwd.log" 2>&1
  echo "tune rc=$?"; grep -E "^compiled|^winners" "$OUT/tune_fwd.log"
elif [ "$step" = attention-2 ]; then
  . benchmarks/gpu_env.sh fa4-2 || exit 1
  winners=(); [ -f /tmp/attention_winners.json ] && winners=(--configs /tmp/attention_winners.json)
  echo "winners: ${winners[*]:-none (hard-coded configs)}"
  timeout 110 python -m benchmarks.bench_attention --bench "${winners[@]}" \
    --out "$OUT/attention_h200.json" > "$OUT/bench_attention.log" 2>&1
  echo "bench rc=$?"; tail -6 "$OUT/bench_attention.log"
elif [ "$step" = rmsnorm ]; then
  . benchmarks/gpu_env.sh || exit 1
  # inductor compiles in this process: no worker pool competing with the host timings
  export TORCHINDUCTOR_COMPILE_THREADS=1
  for i in $(seq 0 11); do  # logs in /tmp: the device tool brings back only a few files
    timeout 100 python -m benchmarks.bench_rmsnorm --quick --precompile "$i/12" > "/tmp/precompile$i.log" 2>&1 &
  done
  env -u TRITON_ALLOW_NON_CONSTEXPR_GLOBALS timeout 100 python -m pytest -q -p no:cacheprovider \
    -m cuda tests/kernels/test_rmsnorm.py tests/kernels/test_fast_launch.py \
    tests/kernels/test_megatron_norm.py > "$OUT/tests_rmsnorm.log" 2>&1
  echo "tests rc=$?"; tail -3 "$OUT/tests_rmsnorm.log"
  wait; echo "precompiled"; cat /tmp/precompile*.log | head -20
  timeout 200 python -m benchmarks.bench_rmsnorm --quick --tune --out "$OUT/rmsnorm_h200.json" > "$OUT/rmsnorm.log" 2>&1
  echo "rmsnorm rc=$?"; grep -E "^summary|^host|TABLE" "$OUT/rmsnorm.log"
elif [ "$step" = 3 ]; then
  . benchmarks/gpu_env.sh || exit 1
  env -u TRITON_ALLOW_NON_CONSTEXPR_GLOBALS timeout 200 python -m pytest -q -p no:cacheprovider \
    -m cuda tests/kernels/test_attention{,_bwd}.py tests/kernels/test_rmsnorm.py \
    tests/kernels/test_fast_launch.py > "$OUT/tests3.log" 2>&1 &
  tests=$!
  timeout 120 python -m benchmarks.tune_attention --compile-only --kinds fwd,fwd_nosoftmax \
    --workers 10 --out /tmp/diag_compiled.json > "$OUT/diag.log" 2>&1
  wait $tests; echo "tests3 rc=$?"; tail -3 "$OUT/tests3.log"
  timeout 90 python -m benchmarks.tune_attention --compiled /tmp/diag_compiled.json \
    --kinds fwd,fwd_nosoftmax --out "$OUT/attention_diag_h200.json" >> "$OUT/diag.log" 2>&1
  echo "diag rc=$?"
  timeout 180 python -m benchmarks.bench_rmsnorm --quick --out "$OUT/rmsnorm_h200.json" > "$OUT/rmsnorm.log" 2>&1
  echo "rmsnorm rc=$?"; grep -E "^summary" "$OUT/rmsnorm.log"
else
  . benchmarks/gpu_env.sh fa4-2 || exit 1
  python -c "import flash_attn.cute" && echo "fa4 ok"
  timeout 150 python -m pytest -q -p no:cacheprovider -m cuda tests/kernels/test_flash_attn.py \
    > "$OUT/tests2.log" 2>&1; echo "tests2 rc=$?"; tail -3 "$OUT/tests2.log"
  winners=(); [ -f /tmp/attention_winners.json ] && winners=(--configs /tmp/attention_winners.json)
  timeout 300 python -m benchmarks.bench_attention --bench "${winners[@]}" \
    --out "$OUT/attention_h200.json" > "$OUT/bench_attention.log" 2>&1
  echo "bench rc=$?"; tail -8 "$OUT/bench_attention.log"
fi
