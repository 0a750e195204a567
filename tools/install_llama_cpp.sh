#!/usr/bin/env bash
# Install llama-cpp-python into the project's .venv, for conflayers-bench's llama.cpp anchors
# (systems `llamacpp` and `llamacpp-prompt-lookup`). Optional: never called by setup.sh,
# quickstart.sh or CI. Idempotent: does nothing when the pinned version already imports and was
# built for this CPU's instruction sets.
#
# Built from source (a C/C++ compiler and cmake are needed; 10-30 minutes on 2 cores) with the
# best kernels this CPU has (tools/llama_cpp_flags.sh). The build's flags are printed by
# conflayers-bench ("llama.cpp build: ..."). The loadbench's llama.cpp server anchor is
# tools/install_llama_server.sh (the same sources and flags).
# Usage: bash tools/install_llama_cpp.sh     (LLAMA_CPP_VERSION=... to override the pin,
#        LLAMA_CPP_CMAKE_ARGS=... to choose the flags yourself)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "no .venv in $REPO: run bash tools/setup.sh first" >&2
  exit 1
fi
source tools/llama_cpp_flags.sh
VERSION="$LLAMA_CPP_VERSION"
args="$LLAMA_CPP_ARGS"
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
