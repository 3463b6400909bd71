#!/usr/bin/env bash
# A session's GPU pair on one H200, as two back-to-back device calls (flash-attn-4's wheel is
# larger than one call carries; benchmarks/gpu_env.sh joins it across the two):
#
#   call 1, carry [".whl", ".fa4a", ".peer"]:
#     export GIT_COMMIT=<sha> TAG=h200_sweep_<date>_vN && bash benchmarks/h200_session.sh one
#     (its default budgets: EXTRAS_S=380 for the CUDA tests ~150 s, the peer ~80 s and the
#     parity ~110 s; MEGATRON_LM_S=200 for Megatron-LM and our trial ~130 s: ~560 s in all)
#   call 2, the very next (the machine stays warm 30 s), carry [".fa4b"]:
#     export GIT_COMMIT=<sha> TAG=h200_sweep_<date>_vN && bash benchmarks/h200_session.sh two
#
# one: `run_gpu_sweep.sh h200-extras` (the kernels' CUDA tests, the peer, the 20-step loss
#      parity with its planted control), then Megatron-LM's own pretrain_gpt.py on the line
#      `layout-recommend --format megatron-lm` prints for the best cuDNN layout, beside our trial
#      of that layout (bench_megatron_lm.py, parts megatron_lm and trial; ~150 s);
# two: `run_gpu_sweep.sh h200` (the H200 sweep, its report against the peer, the best
#      layout's profile, the matmul ceilings), after flash-attn-4 is installed.
# Everything a call keeps lies in $OUT/r: logs, JSON and Markdown, one tgz of the trials
# (the device returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${TAG:?set TAG, e.g. h200_sweep_2026-12-01_v4}" "${OUT:?run on the device machine (OUT is its return folder)}"
R=$OUT/r
mkdir -p "$R"
DATE=${TAG#h200_sweep_}
# The best cuDNN layout of the last sweep (Megatron-LM has no flash-attn-4 spec in its image).
BEST_CUDNN=(--set mbs=16 --set distributed_optimizer=false --set swiglu=triton --set loss=fused
            --set optimizer_step=flat --set add_norm=fused --set qkv_grad=fused
            --set grad_buffer=overwrite --set embedding_grad=fused)
case "${1:-}" in
  one)
    . benchmarks/gpu_env.sh fa4-1 || exit 1
    OUT=$R BUDGET_S=${EXTRAS_S:-380} bash benchmarks/run_gpu_sweep.sh h200-extras
    timeout -k 10 "${MEGATRON_LM_S:-200}" python3 benchmarks/bench_megatron_lm.py --out "$R" \
      --tag "megatron_lm_$DATE" "${BEST_CUDNN[@]}" --parts megatron_lm,trial \
      --budget-s $(( ${MEGATRON_LM_S:-200} - 20 ))
    tar czf "$R/${TAG}_extras_trials.tgz" sweeps/h200_parity "$R"/megatron_lm_*_work 2>/dev/null
    rm -rf "$R"/megatron_lm_*_work ;;
  two)
    . benchmarks/gpu_env.sh fa4-2 || exit 1
    OUT=$R SWEEP_TIMEOUT_S=${SWEEP_S:-470} BUDGET_S=${BUDGET_S:-550} bash benchmarks/run_gpu_sweep.sh h200
    tar czf "$R/${TAG}_trials.tgz" sweeps/h200_single sweeps/h200_profile sweeps/h200_gc_off 2>/dev/null ;;
  *)
    echo "usage: TAG=... bash benchmarks/h200_session.sh one|two (on the device machine)" >&2
    exit 2 ;;
esac
ls -la "$R"
