#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ headers (needed to build a custom-op library) and print their folder.
# No PyPI wheel ships them; Debian trixie's libonnxruntime-dev (ORT 1.21, MIT) does: fetched
# from deb.debian.org, checked by sha256, unpacked with dpkg-deb -x (no root). A library built
# against API version 21 loads in every ONNX Runtime >= 1.21.
# Usage: tools/ort_headers.sh CACHE_DIR   (prints CACHE_DIR/include/onnxruntime)
set -euo pipefail
OUT="${1:?usage: ort_headers.sh CACHE_DIR}"
DEB=libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb
SHA=14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08
mkdir -p "$OUT"
if [ ! -f "$OUT/include/onnxruntime/onnxruntime_cxx_api.h" ]; then
  command -v dpkg-deb >/dev/null || { echo "ort_headers.sh: needs dpkg-deb (Debian/Ubuntu) to unpack $DEB" >&2; exit 1; }
  command -v curl >/dev/null || { echo "ort_headers.sh: needs curl" >&2; exit 1; }
  curl -fsSL -o "$OUT/$DEB" "http://deb.debian.org/debian/pool/main/o/onnxruntime/$DEB"
  echo "$SHA  $OUT/$DEB" | sha256sum -c --quiet
  rm -rf "$OUT/deb" && dpkg-deb -x "$OUT/$DEB" "$OUT/deb"
  mkdir -p "$OUT/include" && cp -r "$OUT/deb/usr/include/onnxruntime" "$OUT/include/"
  rm -rf "$OUT/deb" "$OUT/$DEB"
fi
echo "$OUT/include/onnxruntime"
