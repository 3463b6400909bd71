#!/usr/bin/env bash
# The single-GPU sweeps as the device machine runs them, through the project's own sweep
# command (Hydra multirun, layout sweeper, basic launcher: each trial's rank is a fresh
# local process on the one GPU).
#
#   benchmarks/run_gpu_sweep.sh sweep        # H100: the 26-layout sweep, one command (~8 min)
#   benchmarks/run_gpu_sweep.sh extras       # H100: CUDA tests, the anchors' peer, 20-step parity, profiles
#   benchmarks/run_gpu_sweep.sh h200-check   # H200: CUDA tests of the fusions, 4 profiled trials (~3 min)
#   benchmarks/run_gpu_sweep.sh h200-extras  # H200: CUDA tests of the new kernels, the peer, 20-step parity (~3 min)
#   benchmarks/run_gpu_sweep.sh h200         # H200: the h200_single sweep (~7 min), the peer, ceilings, profile
#   benchmarks/run_gpu_sweep.sh h200-parity  # H200: the 20-step loss parity alone (~2 min)
#   benchmarks/run_gpu_sweep.sh h200-defer   # H200: CUDA tests of wgrad_defer, mbs 1 with and without it (~4 min)
#
# On the device tool, source benchmarks/gpu_env.sh first (the carried wheels; flash-attn-4
# takes two calls: `fa4-1` in the h200-extras call, `fa4-2` in the h200 call right after).
# h200-extras leaves /tmp/h200_overrides (fusions whose GPU check failed) and the peer's
# JSON (/tmp/h200_peer.json) for the h200 call.
#
# Blocks run in priority order and a block starts only while time is left (BUDGET_S,
# seconds from the start), so the whole command ends inside one device call. Results:
# sweeps/<sweep>/llama_1b3-<cluster>/, and under $OUT (default benchmarks/results/):
# <tag>.json / <tag>.md (leaderboard, summary, loss parity), <tag>_trials.tgz (every
# result.json, and the logs of failed trials), <tag>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-sweep}
BUDGET_S=${BUDGET_S:-540}
OUT=${OUT:-benchmarks/results}
TAG=${TAG:-gpu_sweep_$(date +%Y-%m-%d)}
case "$MODE" in extras|h200-check|h200-extras|h200-defer|h200-parity) TAG=${TAG}_${MODE#h200-} ;; esac
case "$MODE" in h200*) TAG=${TAG/gpu_sweep/h200_sweep} ;; esac
mkdir -p "$OUT"
exec > >(tee "$OUT/$TAG.log") 2>&1
START=$(date +%s)
# The device's copy of the tree carries .git as it was when the session began: name the
# commit (GIT_COMMIT=$(git rev-parse --short HEAD) in the device command), or the records
# carry a stale one (core.paths.git_commit reads GIT_COMMIT first).
[ -n "${GIT_COMMIT:-}" ] || echo "== GIT_COMMIT is not set: the records will name the device copy's stale HEAD"

if ! python3 -c "import megatron.core, hydra, submitit" 2>/dev/null; then
  # The device machine has torch and triton but none of these: carried as wheels (.whl).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
# kernels/attention_fwd.py reads a plain global (LN2) inside @triton.jit, which Triton
# 3.6 refuses on the GPU (the CPU interpreter accepts it); this flag lets it compile.
export TRITON_ALLOW_NON_CONSTEXPR_GLOBALS=1
python3 - <<'PY'
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"device {p.name} sms={p.multi_processor_count} torch {torch.__version__} triton {triton.__version__} "
      f"cudnn {torch.backends.cudnn.version()}", flush=True)
PY

MODEL="model=llama_1b3 cluster=local_gpu"
case "$MODE" in h200*) MODEL="model=llama_1b3 cluster=local_h200" ;; esac
S=sweep=h100_single
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# The peer on an H200 (the anchors' megatron-core local spec + SDPA, .peer/gpu_probe.py, about
# 75 s): its JSON in /tmp/h200_peer.json (the h200 report reads it) and under $OUT.
h200_peer() {
  [ -f .peer/gpu_probe.py ] || { echo "== no .peer/gpu_probe.py: no peer"; return; }
  echo "== $(( $(date +%s) - START )) s: peer (anchors' megatron-core local spec + SDPA)"
  SECTIONS=mcore OUT=/tmp python3 .peer/gpu_probe.py > /tmp/peer_probe.log 2>&1
  grep '^mcore\|FAILED' /tmp/peer_probe.log
  [ -f /tmp/probe.json ] && cp /tmp/probe.json /tmp/h200_peer.json \
    && cp /tmp/probe.json "$OUT/peer_probe_h200_$(date +%Y-%m-%d).json"
}
# 20-step loss parity of every fusion together (and with wgrad_defer=step) against the stock
# spec, with the check's planted control (conf/sweep/h200_parity.yaml, ~110 s). If it ran and
# the all-fusions trial failed, the fusions newest on a GPU go off for the h200 call
# (/tmp/h200_overrides); if it did not run (no time left), nothing is turned off on its account.
h200_parity() {
  local P=sweeps/h200_parity/llama_1b3-local_h200
  sweep 60 sweep=h200_parity  # 6 trials, 20 steps each, one with a planted wrong mask
  if [ ! -d $P ]; then
    echo "== 20-step parity did not run: no fusion turned off on its account"; return
  fi
  python3 - <<'PY' || echo "layout.add_norm=megatron layout.optimizer_step=megatron layout.qkv_grad=megatron layout.embedding_grad=megatron" >> /tmp/h200_overrides
import glob, json, sys  # the all-fusions trial must have run: else the fusions newest on a GPU go off
runs = [json.load(open(p))["status"] for p in glob.glob("sweeps/h200_parity/*/*addnorm-fused*/result.json")]
sys.exit(0 if runs and all(s == "ok" for s in runs) else 1)
PY
  python3 benchmarks/gpu_sweep_report.py --sweep $P --parity $P --out "$OUT" --tag "$TAG"
}
# sweep NEED_S PRESET [overrides...]: run one sweep command if NEED_S seconds are left.
sweep() {
  local need=$1; shift
  if [ "$(left)" -lt "$need" ]; then echo "== skipped (only $(left) s left): $*"; return; fi
  echo "== $(( $(date +%s) - START )) s: layout-sweep $MODEL $*"
  timeout -s INT -k 20 "${SWEEP_TIMEOUT_S:-100000}" python3 -m launch.main $MODEL "$@"
}

if [ "$MODE" = sweep ]; then
  # The sweep: one command, 26 layouts (conf/sweep/h100_single.yaml). Every trial trains
  # the same seed on the same tokens, so its losses are a parity check too.
  D=sweeps/h100_single/llama_1b3-local_gpu
  python3 -m pytest -q -p no:cacheprovider -m cuda tests/kernels/test_wgrad.py || echo "== CUDA tests failed"
  # What the weight-gradient fusion (kernels/wgrad.py, on by default) buys: the same
  # CUDA-graph trial with it off, at mbs 1 before the sweep and mbs 8 after it if time is left.
  wgrad_off() {
    DIAG_CUDA_GRAPH=1 python3 benchmarks/diag_step_overhead.py --out /tmp/wgrad_off --mbs "$1" \
      --variants no_wgrad_fusion --profile none && cp /tmp/wgrad_off/no_wgrad_fusion_mbs$1.json "$OUT/"
  }
  wgrad_off 1
  sweep 60 sweep=h100_single
  python3 benchmarks/gpu_sweep_report.py --sweep $D --parity $D --out "$OUT" --tag "$TAG"
  [ "$(left)" -gt 45 ] && wgrad_off 8
elif [ "$MODE" = h200-check ]; then
  # Do the fusions compile and run on this device, and what do they buy: CUDA tests of the
  # kernels, then 4 profiled trials (fusions on at mbs 1/8/16, off at mbs 8).
  python3 -m pytest -q -p no:cacheprovider -m cuda tests/kernels/test_swiglu.py \
    tests/kernels/test_fused_ce.py || echo "== CUDA tests failed"
  D=sweeps/h200_check/llama_1b3-local_h200
  sweep 60 sweep=h200_check trial.profile=true
  python3 benchmarks/gpu_sweep_report.py --sweep $D --out "$OUT" --tag "$TAG"
elif [ "$MODE" = h200-extras ]; then
  # The first call of the final pair: the CUDA tests of the kernels not yet run on this
  # device kind (H200_CUDA_TESTS), the peer (the anchors' megatron-core local spec + SDPA,
  # .peer/gpu_probe.py, its JSON kept in /tmp/h200_peer.json for the h200 call's report),
  # then 20-step loss parity of every fusion together against the stock spec, with the
  # parity check's negative control. A fusion whose check fails is turned off for the
  # h200 call (/tmp/h200_overrides, read there), so one broken kernel cannot sink the sweep.
  rm -f /tmp/h200_overrides
  cuda_test() {
    local file=$1; shift
    python3 -m pytest -q -p no:cacheprovider -m cuda $file \
      || { echo "== CUDA test failed: $file; the h200 call runs with $*"; echo "$*" >> /tmp/h200_overrides; }
  }
  # One pytest process for all of them first (each process pays ~10 s of start-up and
  # imports); only if it fails, each file again on its own to find which fusion goes off.
  H200_CUDA_TESTS=${H200_CUDA_TESTS:-adamw add_rmsnorm swiglu fused_ce qkv_grad wgrad embedding rmsnorm wgrad_defer}
  # wgrad_defer (issue 17): the arenas, per-slot graphs and a graphed trial, the producers'
  # wiring and RoPE's fused QKV gradient into a slot (the other producers' target tests sit
  # in the swiglu, add_rmsnorm and rmsnorm files above).
  DEFER_TESTS="tests/kernels/test_wgrad_defer.py tests/kernels/test_defer_wiring.py
    tests/launch/test_step_graph.py::test_deferred_wgrad_trial_with_per_slot_graphs_trains_like_the_accumulating_one
    tests/kernels/test_rope.py::test_gpu_fused_qkv_gradient_into_a_target_at_training_size"
  files=$(for t in $H200_CUDA_TESTS; do case $t in qkv_grad) echo tests/kernels/test_megatron_attention.py ;;
    rmsnorm) echo tests/kernels/test_rmsnorm.py tests/kernels/test_megatron_norm.py ;;
    wgrad_defer) echo $DEFER_TESTS ;;
    *) echo tests/kernels/test_$t.py ;; esac; done)
  python3 -m pytest -q -p no:cacheprovider -m cuda $files && H200_CUDA_TESTS=""
  for t in $H200_CUDA_TESTS; do
    case $t in
      adamw) cuda_test tests/kernels/test_adamw.py layout.optimizer_step=megatron ;;
      add_rmsnorm) cuda_test tests/kernels/test_add_rmsnorm.py layout.add_norm=megatron ;;
      swiglu) cuda_test tests/kernels/test_swiglu.py layout.swiglu=megatron ;;
      fused_ce) cuda_test tests/kernels/test_fused_ce.py layout.loss=megatron ;;
      wgrad) cuda_test tests/kernels/test_wgrad.py layout.grad_buffer=megatron ;;
      qkv_grad) cuda_test tests/kernels/test_megatron_attention.py::test_gpu_fused_qkv_grad_matches_at_llama_shape \
        layout.qkv_grad=megatron ;;
      embedding) cuda_test tests/kernels/test_embedding.py layout.embedding_grad=megatron ;;
      wgrad_defer) cuda_test "$DEFER_TESTS" layout.wgrad_defer=off ;;
      rmsnorm) cuda_test tests/kernels/test_rmsnorm.py layout.norm=torch
        cuda_test tests/kernels/test_megatron_norm.py layout.norm=torch ;;
    esac
  done
  h200_peer
  h200_parity
  [ -f /tmp/h200_overrides ] && echo "== overrides for the h200 call: $(cat /tmp/h200_overrides)"
elif [ "$MODE" = h200-parity ]; then
  # The 20-step loss parity alone (a call of its own when h200-extras ran out of time).
  h200_parity
elif [ "$MODE" = h200-defer ]; then
  # issue 17: the CUDA tests of layout.wgrad_defer=step and its producers (DEFER_CUDA_TESTS),
  # then h200_single's mbs-1 cuDNN layout without and with the deferral (its flush
  # overwriting the fp32 gradients), the deferred one profiled (an extra, untimed step).
  # The trials first (same seed and tokens: their losses are a parity check too), then the
  # tests in the time left (BUDGET_S).
  D=sweeps/h200_defer/llama_1b3-local_h200
  ONE="sweep=h200_profile sweep.name=h200_defer layout.mbs=1 layout.attention=sdpa_cudnn trial.measure_steps=4"
  sweep 60 $ONE trial.profile=false
  sweep 60 $ONE layout.wgrad_defer=step layout.grad_buffer=overwrite trial.timeout_s=150 \
    trial.profile=${DEFER_PROFILE:-true}
  [ -d $D ] && python3 benchmarks/gpu_sweep_report.py --sweep $D --out "$OUT" --tag "$TAG"
  [ "$(left)" -gt 20 ] && timeout "$(left)" python3 -m pytest -q -p no:cacheprovider -m cuda \
    ${DEFER_CUDA_TESTS:-tests/kernels/test_wgrad_defer.py tests/kernels/test_defer_wiring.py} || echo "== CUDA tests failed or cut"
elif [ "$MODE" = h200 ]; then
  # The sweep: one command (conf/sweep/h200_single.yaml, at most SWEEP_TIMEOUT_S), its
  # report with the peer from h200-extras; then the matmul/copy ceilings at the best
  # layout's shapes and a profile of that layout, in the same call.
  D=sweeps/h200_single/llama_1b3-local_h200
  OVR=$(cat /tmp/h200_overrides 2>/dev/null | tr '\n' ' ')
  [ -n "$OVR" ] && echo "== fusions off after a failed check in h200-extras: $OVR"
  sweep 60 sweep=h200_single $OVR
  # The peer in the same call, unless the h200-extras call just before left it.
  [ -f /tmp/h200_peer.json ] || { [ "$(left)" -gt 90 ] && h200_peer; }
  PEER=(); [ -f /tmp/h200_peer.json ] && PEER=(--peer /tmp/h200_peer.json)
  python3 benchmarks/gpu_sweep_report.py --sweep $D --parity $D "${PEER[@]}" --out "$OUT" --tag "$TAG"
  # The best ok trial's layout, profiled (one extra, untimed step).
  BEST=$(python3 - "$D" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1] + "/leaderboard.json"))["rows"] if r.get("status") == "ok"]
best = max(rows, key=lambda r: r["mfu_palm"])
axes = ("mbs", "recompute", "distributed_optimizer", "attention", "norm", "cuda_graph",
        "swiglu", "loss", "optimizer_step", "add_norm", "qkv_grad", "grad_buffer", "embedding_grad",
        "wgrad_defer")
print(" ".join(f"layout.{k}={str(best[k]).lower() if isinstance(best[k], bool) else best[k]}"
               for k in axes if best.get(k) is not None))
PY
)
  # The matmul and copy ceilings at the best layout's GEMM shapes (benchmarks/matmul_ceiling.py).
  MBS=$(echo "$BEST" | sed -n 's/.*layout.mbs=\([0-9]*\).*/\1/p')
  [ "$(left)" -gt 50 ] && python3 benchmarks/matmul_ceiling.py --out /tmp/ceiling --tokens $(( ${MBS:-16} * 2048 )) \
    > /tmp/ceiling.log 2>&1 && cp /tmp/ceiling/matmul_ceiling.json "$OUT/matmul_ceiling_h200_$(date +%Y-%m-%d).json" \
    && grep -m3 'square_8192\|copy_tb_s' /tmp/ceiling.log
  R=sweeps/h200_profile/llama_1b3-local_h200
  [ -n "$BEST" ] && sweep 40 sweep=h200_profile $BEST
  [ -d $R ] && python3 benchmarks/gpu_sweep_report.py --sweep $R --out "$OUT" --tag "${TAG}_profile"
  # trial.manual_gc (on in h200_single) is not part of a trial's name, so its "off" is a sweep
  # of its own, last (it changed nothing measurable, step_phases_h200_2026-12-01.log): the
  # main grid's mbs-16 layout with automatic garbage collection. Its records travel in the
  # trials archive (sweeps/h200_gc_off): the device tool brings back 8 files, all taken above.
  sweep 45 sweep=h200_profile sweep.name=h200_gc_off trial.profile=false trial.measure_steps=4 \
    trial.manual_gc=false $OVR
else
  # extras: the CUDA tests of the GPU paths, megatron-core's local spec as the anchors
  # measured it (the peer, in this run: .peer/gpu_probe.py, a copy of
  # ../shared/anchors/gpu_probe.py, when carried), 20-step loss parity on llama_1b3, and
  # profiled steps (time by category and the top kernels).
  python3 -m pytest -q -p no:cacheprovider -m cuda tests/launch/test_step_graph.py \
    tests/launch/test_gpu_trial.py tests/kernels/test_rope.py || echo "== CUDA tests failed"
  if [ -f .peer/gpu_probe.py ]; then
    echo "== $(( $(date +%s) - START )) s: peer (anchors' megatron-core local spec + SDPA, mbs 1/2/4)"
    SECTIONS=mcore OUT="$OUT" python3 .peer/gpu_probe.py > "$OUT/peer_probe.log" 2>&1 \
      && cp "$OUT/probe.json" "$OUT/peer_probe_$(date +%Y-%m-%d).json" && rm -f "$OUT/probe.json"
    grep '^mcore' "$OUT/peer_probe.log"
  fi
  P=sweeps/h100_parity/llama_1b3-local_gpu
  PAR="sweep=h100_smoke sweep.name=h100_parity layout.gbs=4 layout.mbs=2 trial.warmup_steps=2 \
    trial.measure_steps=18"
  sweep 30 $PAR layout.attention=megatron,sdpa_cudnn,triton layout.norm=megatron,triton \
    layout.cuda_graph=false
  sweep 30 $PAR layout.attention=sdpa_cudnn layout.recompute=full,selective
  sweep 30 $PAR layout.attention=sdpa_cudnn layout.cuda_graph=true
  R=sweeps/h100_profile/llama_1b3-local_gpu
  sweep 60 sweep=h100_smoke sweep.name=h100_profile layout.attention=sdpa_cudnn layout.mbs=1,8 \
    layout.cuda_graph=true trial.profile=true trial.measure_steps=3
  sweep 30 sweep=h100_smoke sweep.name=h100_profile layout.attention=megatron layout.norm=megatron \
    layout.mbs=2 trial.profile=true trial.measure_steps=3
  python3 benchmarks/gpu_sweep_report.py --sweep $R --parity $P --out "$OUT" --tag "$TAG"
fi
# Every trial's record, and the rank logs of trials that did not end ok.
DIRS=$(ls -d sweeps/h100_*/llama_1b3-local_gpu 2>/dev/null)
case "$MODE" in h200*) DIRS=$(ls -d sweeps/h200_*/llama_1b3-local_h200 2>/dev/null) ;; esac
tar czf "$OUT/${TAG}_trials.tgz" --exclude='*.log' --exclude='trace*.json' $DIRS
failed=$(for d in $DIRS; do grep -l '"status": "\(error\|oom\|timeout\|diverged\)"' $d/*/result.json; done 2>/dev/null \
  | xargs -r -n1 dirname)
[ -n "$failed" ] && tar czf "$OUT/${TAG}_failed_logs.tgz" $(for d in $failed; do ls $d/*.log 2>/dev/null; done)
echo "== done in $(( $(date +%s) - START )) s"
