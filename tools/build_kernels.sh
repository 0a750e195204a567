#!/usr/bin/env bash
# Build conflayers' CPU kernels (runtime/conflayers/runtime/kernels/*.cc) into the custom-op
# library the runtime registers in CPU sessions: runtime/conflayers/runtime/kernels/build/.
# Called by setup.sh. Optional: without the library every graph runs its ONNX fallback (same
# graph file, slower). Needs g++, and curl + dpkg-deb for ONNX Runtime's headers.
# Usage: tools/build_kernels.sh [-o OUT.so G++FLAGS...]   (a variant build, e.g. -DNO_TILE)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$REPO/runtime/conflayers/runtime/kernels"
OUT="$SRC/build"
LIB="$OUT/libconflayers_kernels.so"
variant=0
if [ "${1:-}" = "-o" ]; then LIB="$2"; variant=1; shift 2; fi
command -v g++ >/dev/null || { echo "build_kernels.sh: needs g++ (apt-get install g++)" >&2; exit 1; }
INC="$(bash "$REPO/tools/ort_headers.sh" "$OUT/ort")"
if [ "$variant" = 0 ] && [ -f "$LIB" ] && [ -z "$(find "$SRC" -maxdepth 1 \( -name '*.cc' -o -name '*.h' \) -newer "$LIB")" ]; then
  echo "$LIB (up to date)"; exit 0
fi
# No -march: the library must load on any x86-64; its kernels carry their own target attributes
# and register only where the CPU has them. -ffp-contract=off: no multiply-add fused behind the
# code's back, so every engine's float sequence stays the one written (qmatmul.h).
g++ -O3 -std=c++17 -ffp-contract=off -shared -fPIC -Wall "$@" -I"$INC" "$SRC"/*.cc -o "$LIB.tmp"
mv "$LIB.tmp" "$LIB"
echo "$LIB"
