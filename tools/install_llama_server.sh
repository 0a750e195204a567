#!/usr/bin/env bash
# Build llama.cpp's own HTTP server (`llama-server`, continuous batching over parallel slots) into
# .venv/bin, for conflayers-loadbench's `llamacpp-server` anchor. Optional: never called by
# setup.sh, quickstart.sh or CI. Idempotent (a stamp names the version and flags).
#
# The sources are llama.cpp as vendored in the llama-cpp-python sdist from PyPI (the pin of
# tools/install_llama_cpp.sh, so both anchors are the same llama.cpp), built with the same CPU
# flags (tools/llama_cpp_flags.sh); no web UI (it would be fetched from a hub), no HTTPS.
# 5-15 minutes on 2 cores; needs cmake and a C/C++ compiler.
# Usage: bash tools/install_llama_server.sh   (LLAMA_CPP_VERSION=..., LLAMA_CPP_CMAKE_ARGS=...)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "no .venv in $REPO: run bash tools/setup.sh first" >&2
  exit 1
fi
source tools/llama_cpp_flags.sh
want="$LLAMA_CPP_VERSION $LLAMA_CPP_ARGS"
stamp=".venv/.llama-server-build"
if [ -x .venv/bin/llama-server ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "llama-server (llama.cpp of llama-cpp-python $LLAMA_CPP_VERSION) is already in .venv/bin (flags: $LLAMA_CPP_ARGS)"
  exit 0
fi
for tool in cmake cc c++; do
  command -v "$tool" >/dev/null || { echo "building llama-server needs $tool (apt-get install cmake build-essential)" >&2; exit 1; }
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "== fetching llama-cpp-python==$LLAMA_CPP_VERSION sources (its vendored llama.cpp)"
"$PY" -m pip download --disable-pip-version-check --quiet --no-deps --no-binary :all: \
  "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$work"
tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
echo "== building llama-server with: $LLAMA_CPP_ARGS"
# shellcheck disable=SC2086   # the flags are words
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  $LLAMA_CPP_ARGS > "$work/cmake.log" 2>&1 || { tail -30 "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" --target llama-server -j "$(nproc)" > "$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log" >&2; exit 1; }
install -m 755 "$work/build/bin/llama-server" .venv/bin/llama-server
echo "$want" > "$stamp"
.venv/bin/llama-server --version 2>&1 | head -3
