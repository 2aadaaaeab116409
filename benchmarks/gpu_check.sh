#!/usr/bin/env bash
# The one-call GPU check, for a session that has a CUDA device:
#   bash benchmarks/gpu_check.sh
# 1. builds the CPU and CUDA kernels (JIT, cached; needs a CUDA build of torch, nvcc and ninja),
# 2. runs every CUDA parity / opcheck test: small_fc_lopt (tests/test_kernels_cuda.py), Celo2 and
#    VeLO kernels, and the non-finite policy on the cuda backend (test names containing "cuda"),
# 3. benchmarks a ViT-B/16-sized small_fc_lopt step: naive torch vs fused CUDA vs AdamW(fused=True),
# 4. benchmarks the Celo2 step on the 4M and 25M sets on the GPU against AdamW and torch.optim.Muon
#    (conv kernels per slice, then as matrices with a profile of one step).
# A failing stage does not stop the later ones; the script exits non-zero if any failed.
# Everything runs offline; results go to stdout (and $OUT/gpu_check.txt when $OUT is set).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
log="${OUT:-/tmp}/gpu_check.txt"
failed=()
stage() {  # stage NAME COMMAND...: run it, remember a failure, go on
    local name=$1
    shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" || failed+=("$name")
    echo "=== $name took $((SECONDS - t0)) s"
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.is_available() and torch.cuda.get_device_name())"
    # Build for the visible GPU only (fast); the cache key includes the arch list.
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python -c \
'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
    stage build python -m lopt.kernels build
    stage tests python -m pytest tests/test_kernels_cuda.py tests/test_celo2_optimizer.py \
        tests/test_velo_kernels.py tests/test_nonfinite.py -k cuda -q -p no:cacheprovider -rs
    stage bench_small_fc python benchmarks/bench_kernels_gpu.py --hidden 32 4
    stage bench_celo2 python benchmarks/bench_celo2.py --device cuda --sets 4M 25M --reps 20
    stage bench_celo2_matrix python benchmarks/bench_celo2.py --device cuda --sets 4M 25M --reps 20 \
        --conv-mode matrix --profile
    if [ ${#failed[@]} -gt 0 ]; then echo "FAILED stages: ${failed[*]}"; else echo "all stages passed"; fi
    [ ${#failed[@]} -eq 0 ]
} 2>&1 | tee "$log"
