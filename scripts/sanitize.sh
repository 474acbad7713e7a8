#!/usr/bin/env bash
# The C++-heavy tests under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   bash scripts/sanitize.sh [pytest args...]     (default: the op and layer test files)
#
# Builds the extension with -fsanitize=address,undefined in its own virtual environment
# and build directory (build/sanitize, nothing else is touched), then runs the tests from
# outside the source tree, with the sanitizer runtimes preloaded into Python. Any report
# fails the run (halt_on_error). Leak checking is off: CPython and XLA keep allocations
# until exit by design. Takes ~10 minutes on 2 cores; run it before release-like changes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$root/build/sanitize"
mkdir -p "$work"
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"

if [ ! -x "$work/venv/bin/python" ]; then
  python3 -m venv "$work/venv"
  "$work/venv/bin/python" -m pip install -q --upgrade pip
fi
py="$work/venv/bin/python"
"$py" -m pip install -q "$root[test]" \
  -C build-dir="$work/cmake" -C cmake.build-type=RelWithDebInfo \
  -C cmake.define.CMAKE_CXX_FLAGS="$flags" -C cmake.define.CMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -C cmake.define.JAX_BRGEMM_CUDA=OFF

tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  tests=("$root/tests/test_brgemm.py" "$root/tests/test_dense.py" "$root/tests/test_conv.py"
         "$root/tests/test_lstm.py" "$root/tests/test_attention.py" "$root/tests/test_threads.py"
         "$root/tests/test_optimize.py" -x -q)
fi
runtime="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
cd "$work"  # not the source tree: the installed, sanitized package must be the one imported
LD_PRELOAD="$runtime" \
ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
  "$py" -m pytest -p no:cacheprovider "${tests[@]}"
