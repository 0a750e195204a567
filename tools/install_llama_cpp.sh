#!/usr/bin/env bash
# Install llama-cpp-python into the project's .venv, for conflayers-bench's llama.cpp anchors
# (systems `llamacpp` and `llamacpp-prompt-lookup`). Optional: never called by setup.sh,
# quickstart.sh or CI. Idempotent: does nothing when the pinned version already imports and was
# built for this CPU's instruction sets.
#
# Built from source (a C/C++ compiler and cmake are needed; 10-30 minutes on 2 cores) with the
# best kernels this CPU has, named explicitly from /proc/cpuinfo (AVX2/FMA/F16C, AVX-VNNI,
# AVX-512 F/VNNI/VBMI/BF16), so the anchor is as fast as llama.cpp gets here: comparing an AVX2
# llama.cpp with an AVX-512 ONNX Runtime flatters every ratio. AMX stays off: a native build
# with AMX crashed in its first decode on this project's Xeon machines (segmentation fault in
# llama_decode), and GGML_NATIVE=ON turns it on. The build's flags are printed by
# conflayers-bench ("llama.cpp build: ...").
# Usage: bash tools/install_llama_cpp.sh     (LLAMA_CPP_VERSION=... to override the pin,
#        LLAMA_CPP_CMAKE_ARGS=... to choose the flags yourself)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "no .venv in $REPO: run bash tools/setup.sh first" >&2
  exit 1
fi
flags=" $(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { case "$flags" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if [ "$(uname -m)" = x86_64 ]; then
  onoff() { if has "$1"; then echo ON; else echo OFF; fi; }
  args="$args -DGGML_AVX=$(onoff avx) -DGGML_AVX2=$(onoff avx2) -DGGML_FMA=$(onoff fma) -DGGML_F16C=$(onoff f16c)"
  args="$args -DGGML_BMI2=$(onoff bmi2) -DGGML_AVX_VNNI=$(onoff avx_vnni) -DGGML_AVX512=$(onoff avx512f)"
  args="$args -DGGML_AVX512_VNNI=$(onoff avx512_vnni) -DGGML_AVX512_VBMI=$(onoff avx512vbmi)"
  args="$args -DGGML_AVX512_BF16=$(onoff avx512_bf16)"
fi
args="${LLAMA_CPP_CMAKE_ARGS:-$args}"
stamp=".venv/.llama-cpp-build"
have="$("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)"
if [ "$have" = "$VERSION" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$args" ]; then
  echo "llama-cpp-python $have is already installed in .venv (built with: $args)"
  exit 0
fi
for tool in cmake cc c++; do
  command -v "$tool" >/dev/null || { echo "building llama-cpp-python needs $tool (apt-get install cmake build-essential)" >&2; exit 1; }
done
echo "== building llama-cpp-python==$VERSION from source (10-30 minutes on 2 cores) with: $args"
export CMAKE_ARGS="${CMAKE_ARGS:-} $args"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
"$PY" -m pip install --disable-pip-version-check --no-cache-dir --force-reinstall --no-deps \
  --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
"$PY" -m pip install --disable-pip-version-check --quiet "llama-cpp-python==$VERSION"   # its dependencies
echo "$args" > "$stamp"
"$PY" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "installed in .venv:", llama_cpp.llama_print_system_info().decode().strip())'
