#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build jax_brgemm with its CUDA extension (for
# this GPU's architecture), run the GPU tests, print the GPU benchmark table.
#
#   scripts/gpu_check.sh            # uses $PYTHON, else python3, and installs into its environment
#
# Needs: nvcc (CUDA 12.x or 13.x, the driver must support it), and JAX with its CUDA plugin,
# e.g. pip install "jax[cuda13]==0.10.2" (or cuda12, to match the driver).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
  || { echo "gpu_check: nvidia-smi failed: no NVIDIA GPU or driver here" >&2; exit 1; }
command -v nvcc >/dev/null || { echo "gpu_check: nvcc not on PATH (install the CUDA toolkit)" >&2; exit 1; }
nvcc --version | tail -n 2
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '. ')

"$PY" -m pip install -q scikit-build-core nanobind pytest numpy
"$PY" -m pip install --no-build-isolation --no-deps -e . \
  -Ccmake.define.JAX_BRGEMM_CUDA=ON -Ccmake.define.JAX_BRGEMM_CUDA_ARCHITECTURES="$ARCH"

"$PY" - <<'PY'
import sys
import jax
from jax_brgemm import _cuda
print("jax", jax.__version__, "devices:", jax.devices())
if not _cuda.built:
    sys.exit(f"gpu_check: the CUDA extension was not built: {_cuda.load_error}")
if not _cuda.gpu_available():
    sys.exit("gpu_check: JAX sees no CUDA GPU: install JAX's CUDA plugin (jax[cuda12] / jax[cuda13])")
PY

# Every step runs; the exit status says whether any failed.
status=0
# -rs lists skips: on a GPU machine no test of tests/test_cuda.py may be skipped.
"$PY" -m pytest tests/test_cuda.py -q -rs || status=1
# The CPU op suites twice: on the CPU (must be unchanged), then with the GPU as JAX's default
# device, so the same op tests go through the CUDA handlers (brgemm, dense, conv2d). A test
# there may check something CPU-specific (an ISA path); read its failure before blaming CUDA.
OP_TESTS="tests/test_brgemm.py tests/test_dense.py tests/test_conv.py"
JAX_PLATFORMS=cpu "$PY" -m pytest $OP_TESTS -q || status=1
"$PY" -m pytest $OP_TESTS -q || status=1
# brgemm, dense (vs cuBLAS) and ResNet-50 conv forward (vs cuDNN), bfloat16 and float32.
"$PY" -m jax_brgemm bench gpu || status=1
exit $status
