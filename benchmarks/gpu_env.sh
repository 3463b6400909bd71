# Source on the device machine: puts the carried wheels on PYTHONPATH.
#
#   . benchmarks/gpu_env.sh          # megatron-core, hydra, submitit (.whl, carried)
#   . benchmarks/gpu_env.sh fa4-1    # first half of flash-attn-4's 92 MB wheel (.fa4a) to /tmp
#   . benchmarks/gpu_env.sh fa4-2    # second half + the rest (.fa4b): join, md5, install
#
# The machine keeps /tmp only while it stays warm (30 s after a call), so fa4-2 must be the
# very next call after fa4-1. Later calls on the same warm machine find /tmp/fa4site and reuse it.
if ! python3 -c "import megatron.core, hydra, submitit" 2>/dev/null; then
  if [ ! -d /tmp/site/megatron ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || return 1
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
case "${1:-}" in
  fa4-1)
    mkdir -p /tmp/fa4 && cp .fa4a/cu13part.* /tmp/fa4/ && echo "fa4: first part staged in /tmp/fa4" ;;
  fa4-2)
    if [ ! -d /tmp/fa4site/flash_attn ]; then
      mkdir -p /tmp/fa4 && cp .fa4b/* /tmp/fa4/
      whl=/tmp/fa4/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
      cat /tmp/fa4/cu13part.aa /tmp/fa4/cu13part.ab > "$whl" || { echo "fa4: first part missing (run fa4-1 just before)"; return 1; }
      (cd /tmp/fa4 && md5sum -c cu13.md5) || return 1
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4site /tmp/fa4/*.whl || return 1
    fi ;;
esac
if [ -d /tmp/fa4site/flash_attn ]; then
  # Installed with --target, the DSL's .pth file is not read: its packages go on the path by hand.
  export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
# flash-attn-4 compiles its kernels per process (each trial is one); with its disk cache on, the
# trials after the first of a shape load them instead (the cache is keyed on the kernel's config).
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=${FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED:-1}
export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=${FLASH_ATTENTION_CUTE_DSL_CACHE_DIR:-/tmp/fa4_cache}
export TRITON_ALLOW_NON_CONSTEXPR_GLOBALS=1
