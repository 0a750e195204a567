#!/usr/bin/env bash
# Maintenance: compile the shipped profiles of a model, one per task, into one bundle, and copy
# each profile's JSON to profiles/<model>/<task>.json (fp32 target) or
# profiles/<model>/<target>/<task>.json (the repository ships JSON only).
#   [TARGET=native|fp32|int8|int4] bash tools/build_profiles.sh [MODEL] [TASK ...]
# Defaults: smollm2-135m-instruct; gsm8k and the Spec-Bench category groups. Takes 3-8 minutes
# per task on 2 CPU cores. Extra compile flags: COMPILE_FLAGS="--num-prompts 24" bash tools/...
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup.sh"
MODEL="${1:-smollm2-135m-instruct}"
shift || true
TASKS=("$@")
if [ ${#TASKS[@]} -eq 0 ]; then
  TASKS=(gsm8k spec_bench:translation spec_bench:summarization spec_bench:qa spec_bench:math_reasoning
         spec_bench:rag spec_bench:mt_bench)
fi
TARGET="${TARGET:-native}"
if [ "$TARGET" = fp32 ]; then DEST="profiles/$MODEL"; else DEST="profiles/$MODEL/$TARGET"; fi
BUNDLE="${BUNDLE:-bundles/$MODEL-$TARGET}"
mkdir -p "$DEST"
for task in "${TASKS[@]}"; do
  name="$(echo "$task" | tr ':' '-')"
  echo "== $MODEL / $task at target $TARGET -> $BUNDLE (profile $name)"
  start=$(date +%s)
  conflayers-compile --model "$MODEL" --calib "$task" --task "$name" --target "$TARGET" --out "$BUNDLE" ${COMPILE_FLAGS:-}
  cp "$BUNDLE/profiles/$name.json" "$DEST/$name.json"
  echo "   done in $(( $(date +%s) - start )) s"
done
conflayers inspect "$BUNDLE"
