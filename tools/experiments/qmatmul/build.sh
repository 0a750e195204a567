#!/usr/bin/env bash
# Build the experimental QMatMul custom-op library (issue #21) into tools/experiments/qmatmul/build/.
# ONNX Runtime's C/C++ headers ship with none of the PyPI wheels; Debian's libonnxruntime-dev
# (trixie, ORT 1.21, MIT) carries them: fetched, checked by sha256, unpacked here without root.
# The library asks for API version 21, which every ONNX Runtime >= 1.21 serves.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/build"
DEB=libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb
SHA=14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08
mkdir -p "$OUT"
if [ ! -f "$OUT/include/onnxruntime/onnxruntime_cxx_api.h" ]; then
  command -v dpkg-deb >/dev/null || { echo "build.sh: needs dpkg-deb (Debian/Ubuntu) to unpack $DEB" >&2; exit 1; }
  curl -fsSL -o "$OUT/$DEB" "http://deb.debian.org/debian/pool/main/o/onnxruntime/$DEB"
  echo "$SHA  $OUT/$DEB" | sha256sum -c --quiet
  rm -rf "$OUT/deb" && dpkg-deb -x "$OUT/$DEB" "$OUT/deb"
  mkdir -p "$OUT/include" && cp -r "$OUT/deb/usr/include/onnxruntime" "$OUT/include/"
fi
command -v g++ >/dev/null || { echo "build.sh: needs g++ (apt-get install g++)" >&2; exit 1; }
g++ -O3 -std=c++17 -shared -fPIC -Wall -Wno-maybe-uninitialized -Wno-uninitialized "$@" \
  -I"$OUT/include/onnxruntime" "$HERE/qmatmul.cc" -o "$OUT/libconflayers_qmatmul.so"
echo "$OUT/libconflayers_qmatmul.so"
