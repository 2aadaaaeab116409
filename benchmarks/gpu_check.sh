#!/usr/bin/env bash
# The one-call GPU check of issue 7, for a session that has a CUDA device:
#   bash benchmarks/gpu_check.sh
# 1. builds the CPU and CUDA kernels (JIT, cached; needs a CUDA build of torch, nvcc and ninja),
# 2. runs the CUDA parity / opcheck tests (tests/test_kernels_cuda.py, marker `cuda`),
# 3. benchmarks a ViT-B/16-sized step: naive torch vs fused CUDA vs AdamW(fused=True).
# Everything runs offline; results go to stdout (and $OUT/gpu_check.txt when $OUT is set).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
log="${OUT:-/tmp}/gpu_check.txt"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.is_available() and torch.cuda.get_device_name())"
    # Build for the visible GPU only (fast); the cache key includes the arch list.
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python -c \
'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
    python -m lopt.kernels build
    python -m pytest tests/test_kernels_cuda.py -m cuda -q -p no:cacheprovider
    python benchmarks/bench_kernels_gpu.py --hidden 32 4
} 2>&1 | tee "$log"
