#!/usr/bin/env bash
# Install llama-cpp-python into the project's .venv, for conflayers-bench's llama.cpp anchors
# (systems `llamacpp` and `llamacpp-prompt-lookup`). Optional: never called by setup.sh,
# quickstart.sh or CI. Idempotent: does nothing when the pinned version already imports.
#
# Built from source (a C/C++ compiler and cmake are needed; 10-30 minutes on 2 cores) with
# GGML_NATIVE=OFF: a native (-march=native) build crashed at run time on this project's machines.
# Usage: bash tools/install_llama_cpp.sh     (LLAMA_CPP_VERSION=... to override the pin)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "no .venv in $REPO: run bash tools/setup.sh first" >&2
  exit 1
fi
have="$("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)"
if [ "$have" = "$VERSION" ]; then
  echo "llama-cpp-python $have is already installed in .venv"
  exit 0
fi
for tool in cmake cc c++; do
  command -v "$tool" >/dev/null || { echo "building llama-cpp-python needs $tool (apt-get install cmake build-essential)" >&2; exit 1; }
done
echo "== building llama-cpp-python==$VERSION from source (GGML_NATIVE=OFF; 10-30 minutes on 2 cores)"
export CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_NATIVE=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
"$PY" -m pip install --disable-pip-version-check --no-cache-dir --no-binary llama-cpp-python \
  "llama-cpp-python==$VERSION"
"$PY" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "installed in .venv")'
