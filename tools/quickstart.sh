#!/usr/bin/env bash
# Set up .venv (if needed), compile a GSM8K skip profile for the default model
# (smollm2-135m-instruct), then decode GSM8K test prompts with it and with plain decoding, side
# by side, and print the measured speed-up and whether the outputs were identical.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup.sh"
BUNDLE="${BUNDLE:-bundles/smollm2-135m-instruct}"
echo "== conflayers-compile --model smollm2-135m-instruct --calib gsm8k --out $BUNDLE"
conflayers-compile --model smollm2-135m-instruct --calib gsm8k --out "$BUNDLE"
echo
echo "== conflayers-bench $BUNDLE --task gsm8k --num-prompts 5 --max-new-tokens 256 --systems plain,profile:gsm8k"
conflayers-bench "$BUNDLE" --task gsm8k --num-prompts 5 --max-new-tokens 256 --systems plain,profile:gsm8k
