#!/usr/bin/env bash
# Build the experimental QMatMul custom-op library (issue #21) into tools/experiments/qmatmul/build/.
# ONNX Runtime's headers: tools/ort_headers.sh (Debian libonnxruntime-dev, sha256-pinned).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/build"
INC="$(bash "$HERE/../../ort_headers.sh" "$OUT")"
command -v g++ >/dev/null || { echo "build.sh: needs g++ (apt-get install g++)" >&2; exit 1; }
g++ -O3 -std=c++17 -shared -fPIC -Wall -Wno-maybe-uninitialized -Wno-uninitialized "$@" \
  -I"$INC" "$HERE/qmatmul.cc" -o "$OUT/libconflayers_qmatmul.so"
echo "$OUT/libconflayers_qmatmul.so"
