#!/usr/bin/env bash
# The GPU check: from a fresh checkout on a machine with an NVIDIA GPU, in a few minutes, set up
# .venv, install onnxruntime-gpu for this machine's CUDA, export the shipped gsm8k profile of
# SmolLM2-135M (fp32 target) with --device cuda, and run python -m conflayers.tools.gpu_check on
# it: plain vs profile tokens/s, identical yes/no per prompt, per-step and verify-of-n costs on the
# GPU, where each graph's nodes ran, and GenAI's CUDA model where it installs. Writes a JSON
# ($GPU_CHECK_JSON, default out/gpu_check.json) and exits non-zero on any mismatch.
# Without a CUDA device it prints "skipped: no CUDA device" and exits 0 (CI, development machines).
#
# Every step has a time limit, all within $GPU_CHECK_BUDGET seconds (default 300). Other knobs:
#   GPU_CHECK_ORT      the onnxruntime-gpu requirement to install (default: chosen from nvidia-smi)
#   GPU_CHECK_GENAI=0  leave GenAI's CUDA model out
#   GPU_CHECK_BUNDLE   where to export the bundle (default: a temporary directory, removed after)
#   GPU_CHECK_DRY_RUN=1  print the device and the onnxruntime-gpu choice, install nothing, exit 0
# torch is only needed for the export; tools/setup.sh says how to take its small CPU wheel (a CUDA
# torch, the default on PyPI for Linux, is a multi-GB download that may not fit in the budget).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# -- a CUDA device? (nvidia-smi present and listing a GPU)
gpus=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus="$(timeout 20 nvidia-smi -L 2>/dev/null | grep '^GPU ' || true)"
fi
if [ -z "$gpus" ]; then
  echo "skipped: no CUDA device"
  exit 0
fi

START=$SECONDS
BUDGET="${GPU_CHECK_BUDGET:-300}"
left() { echo $(( BUDGET - (SECONDS - START) )); }

# step NAME CEILING CMD...: CMD under the smaller of CEILING and the budget left; out of time = exit 1
step() {
  local name="$1" cap="$2" t
  shift 2
  t="$(left)"
  [ "$cap" -lt "$t" ] && t="$cap"
  if [ "$t" -le 5 ]; then
    echo "gpu_check: no time left for: $name (GPU_CHECK_BUDGET=${BUDGET}s)"
    exit 1
  fi
  echo "== $name (at most ${t}s)"
  timeout "$t" "$@"
  local rc=$?
  if [ "$rc" -eq 124 ]; then
    echo "gpu_check: $name ran past ${t}s"
    exit 1
  fi
  return "$rc"
}

# -- which onnxruntime-gpu: nvidia-smi's "CUDA Version" is the newest CUDA the driver runs (CUDA
# is backward compatible: a CUDA 13 driver runs CUDA 12 builds too). On PyPI, onnxruntime-gpu up
# to 1.26 is built for CUDA 12, from 1.28 for CUDA 13 (1.27's CUDA extras do not resolve); the
# [cuda,cudnn] extras bring the CUDA and cuDNN libraries as wheels, so no toolkit is needed.
cuda="$(timeout 20 nvidia-smi 2>/dev/null | grep -o 'CUDA Version: *[0-9][0-9.]*' | grep -o '[0-9][0-9.]*$' | head -1)"
major="${cuda%%.*}"
if [ -n "${GPU_CHECK_ORT:-}" ]; then
  ort_spec="$GPU_CHECK_ORT"; why="GPU_CHECK_ORT"
elif [ -n "$major" ] && [ "$major" -ge 13 ] 2>/dev/null; then
  ort_spec="onnxruntime-gpu[cuda,cudnn]>=1.28"; why="its CUDA 13 build, for a driver that runs CUDA $cuda"
elif [ "$major" = 12 ]; then
  ort_spec="onnxruntime-gpu[cuda,cudnn]>=1.22,<1.27"; why="its last CUDA 12 builds, for a driver that runs CUDA $cuda"
else
  echo "gpu_check: the NVIDIA driver runs CUDA '${cuda:-unknown}'; onnxruntime-gpu on PyPI needs CUDA 12 or newer"
  echo "           (update the driver, or set GPU_CHECK_ORT to a requirement that fits it)"
  exit 1
fi
echo "device: $(echo "$gpus" | head -1) ($(echo "$gpus" | wc -l) GPU(s)); driver CUDA ${cuda:-unknown}"
echo "onnxruntime-gpu: installing '$ort_spec' ($why)"
export GPU_CHECK_INSTALL="$ort_spec ($why); driver CUDA ${cuda:-unknown}"
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  exit 0
fi

# -- the project's environment, then onnxruntime-gpu in place of onnxruntime (both are the
# `onnxruntime` module: with both installed, whichever was written last wins, file by file)
step "set up .venv (tools/setup.sh)" 170 bash tools/setup.sh || { echo "gpu_check: tools/setup.sh failed"; exit 1; }
PY=.venv/bin/python
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
if "${PIP[@]}" show onnxruntime >/dev/null 2>&1; then
  step "remove the CPU onnxruntime" 60 "${PIP[@]}" uninstall -y -q onnxruntime onnxruntime-gpu
fi
if ! "${PIP[@]}" show onnxruntime-gpu >/dev/null 2>&1; then
  step "install $ort_spec" 150 "${PIP[@]}" install -q "$ort_spec" || { echo "gpu_check: installing $ort_spec failed"; exit 1; }
fi
ort_version="$("${PIP[@]}" show onnxruntime-gpu 2>/dev/null | sed -n 's/^Version: //p')"
built_for="$($PY -c 'import onnxruntime.capi.build_and_package_info as b; print(getattr(b, "cuda_version", "?"))' 2>/dev/null)"
echo "onnxruntime-gpu $ort_version, built for CUDA ${built_for:-?}"
export GPU_CHECK_INSTALL="onnxruntime-gpu $ort_version (CUDA ${built_for:-?}): $GPU_CHECK_INSTALL"

# -- GenAI's CUDA package, optional: its row is left out where it does not install
if [ "${GPU_CHECK_GENAI:-1}" != 0 ] && ! "${PIP[@]}" show onnxruntime-genai-cuda >/dev/null 2>&1; then
  "${PIP[@]}" uninstall -y -q onnxruntime-genai >/dev/null 2>&1   # the same module, CPU only
  step "install onnxruntime-genai-cuda (optional)" 90 "${PIP[@]}" install -q onnxruntime-genai-cuda \
      "onnxruntime-gpu==$ort_version" || echo "   onnxruntime-genai-cuda did not install: GenAI's row is left out"
fi

# -- the bundle: the shipped gsm8k profile (fp32 target; tuned on a CPU, so re-planned on the GPU)
made_tmp=""
if [ -n "${GPU_CHECK_BUNDLE:-}" ]; then
  BUNDLE="$GPU_CHECK_BUNDLE"
else
  made_tmp="$(mktemp -d)"; BUNDLE="$made_tmp/bundle"
  trap 'rm -rf "$made_tmp"' EXIT
fi
step "export profiles/smollm2-135m-instruct/gsm8k.json with --device cuda" 120 \
  .venv/bin/conflayers-compile --model smollm2-135m-instruct --profile profiles/smollm2-135m-instruct/gsm8k.json \
  --device cuda --out "$BUNDLE" --quiet || { echo "gpu_check: the export failed"; exit 1; }

# -- the check itself: its exit status is the script's
JSON="${GPU_CHECK_JSON:-out/gpu_check.json}"
mkdir -p "$(dirname "$JSON")"
genai=()
[ "${GPU_CHECK_GENAI:-1}" = 0 ] && genai=(--no-genai)
deadline=$(( $(left) - 10 ))
step "python -m conflayers.tools.gpu_check" "$(( deadline + 5 ))" \
  "$PY" -m conflayers.tools.gpu_check "$BUNDLE" --json "$JSON" --deadline "$deadline" "${genai[@]}"
rc=$?
echo "results: $JSON ($(( SECONDS - START )) s in all)"
exit "$rc"
