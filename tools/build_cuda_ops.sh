#!/usr/bin/env bash
# Compile qsegformers._C with its CUDA kernels (compile only; no GPU needed) into a scratch folder.
# Usage: bash tools/build_cuda_ops.sh [OUT_DIR]        (default: a new temporary folder)
# TORCH_CUDA_ARCH_LIST picks the architectures (default here: 9.0, one arch keeps it about a minute);
# CUDA_HOME the toolkit (default: /usr/local/cuda when present, else torch's guess from nvcc).
# The test tests/ops/test_cuda_build.py runs the same build in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d -t qseg_cuda_build.XXXXXX)}
PY=${PYTHON:-.venv/bin/python}
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda/lib64 ]; then export CUDA_HOME=/usr/local/cuda; fi
start=$(date +%s)
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  "$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp"
so=$(ls "$OUT"/lib/qsegformers/_C*.so)
nm -C "$so" | grep -q ms_deform_attn_forward_cuda
echo "[build_cuda_ops] built $so with CUDA kernels in $(( $(date +%s) - start )) s"
