#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv/ with everything the compiler,
# the runtime, the benchmark and the tests need. Idempotent; sourced by quickstart.sh and test.sh.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv ($($PY --version))"
  "$PY" -m venv .venv
fi
stamp=".venv/.conflayers-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing dependencies into .venv (a few minutes the first time)"
  # torch first, pinned: an unpinned torch would pull a multi-GB CUDA build. On machines without
  # the CPU wheel on disk, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[compiler,bench,dev,ray]"
  echo "$want" > "$stamp"
fi
export PATH="$REPO/.venv/bin:$PATH"
# The CPU kernel library (optional: without it the graphs run their ONNX fallbacks, slower).
bash tools/build_kernels.sh >/dev/null || echo "== note: kernel library not built (see tools/build_kernels.sh); graphs run their ONNX fallbacks" >&2
