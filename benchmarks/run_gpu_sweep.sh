#!/usr/bin/env bash
# The single-H100 sweep as the device machine runs it, through the project's own sweep
# command (Hydra multirun, layout sweeper, basic launcher: each trial's rank is a fresh
# local process on the one GPU).
#
#   benchmarks/run_gpu_sweep.sh sweep   # the 26-layout sweep, one command (~8 min)
#   benchmarks/run_gpu_sweep.sh extras  # CUDA tests, the anchors' peer, 20-step parity, profiles
#
# Blocks run in priority order and a block starts only while time is left (BUDGET_S,
# seconds from the start), so the whole command ends inside one device call. Results:
# sweeps/<sweep>/llama_1b3-local_gpu/, and under $OUT (default benchmarks/results/):
# <tag>.json / <tag>.md (leaderboard, summary, loss parity), <tag>_trials.tgz (every
# result.json, and the logs of failed trials), <tag>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-sweep}
BUDGET_S=${BUDGET_S:-540}
OUT=${OUT:-benchmarks/results}
TAG=${TAG:-gpu_sweep_$(date +%Y-%m-%d)}
[ "$MODE" = extras ] && TAG=${TAG}_extras
mkdir -p "$OUT"
exec > >(tee "$OUT/$TAG.log") 2>&1
START=$(date +%s)

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
S=sweep=h100_single
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# sweep NEED_S PRESET [overrides...]: run one sweep command if NEED_S seconds are left.
sweep() {
  local need=$1; shift
  if [ "$(left)" -lt "$need" ]; then echo "== skipped (only $(left) s left): $*"; return; fi
  echo "== $(( $(date +%s) - START )) s: layout-sweep $MODEL $*"
  python3 -m launch.main $MODEL "$@"
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
tar czf "$OUT/${TAG}_trials.tgz" --exclude='*.log' --exclude='trace*.json' \
  $(ls -d sweeps/h100_*/llama_1b3-local_gpu 2>/dev/null)
failed=$(grep -l '"status": "\(error\|oom\|timeout\)"' sweeps/h100_*/llama_1b3-local_gpu/*/result.json 2>/dev/null \
  | xargs -r -n1 dirname)
[ -n "$failed" ] && tar czf "$OUT/${TAG}_failed_logs.tgz" $(for d in $failed; do ls $d/*.log 2>/dev/null; done)
echo "== done in $(( $(date +%s) - START )) s"
