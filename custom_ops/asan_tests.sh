#!/usr/bin/env bash
# Builds the custom-op library with AddressSanitizer (CMake option ONNX_CODEBOOK_ASAN)
# into build/asan and runs the kernel tests against it.  Run from the repository root
# inside the project's virtual environment.  Python is not built with ASan, so the
# runtime (and libstdc++, for its exception interceptors) is preloaded; leak checks
# are off because the interpreter itself never frees everything.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S custom_ops -B build/asan -DCMAKE_BUILD_TYPE=Release -DONNX_CODEBOOK_ASAN=ON > build-asan.log 2>&1 ||
  { cat build-asan.log; exit 1; }
cmake --build build/asan -j 2 >> build-asan.log 2>&1 || { cat build-asan.log; exit 1; }
rm -f build-asan.log
test -f build/asan/libonnx_codebook_ops.so || { echo "asan_tests: the ASan library was not built" >&2; exit 1; }
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  ONNX_CODEBOOK_OPS_LIBRARY="$PWD/build/asan/libonnx_codebook_ops.so" ONNX_CODEBOOK_REQUIRE_OPS=1 \
  python -m pytest -q -p no:cacheprovider tests/test_custom_ops.py tests/test_fused_rewrite.py
