# Sourced by install_llama_cpp.sh and install_llama_server.sh: the CMake flags that give llama.cpp
# the best kernels this CPU has, named explicitly from /proc/cpuinfo (AVX2/FMA/F16C, AVX-VNNI,
# AVX-512 F/VNNI/VBMI/BF16), so the anchor is as fast as llama.cpp gets here: comparing an AVX2
# llama.cpp with an AVX-512 ONNX Runtime flatters every ratio. AMX stays off: a native build
# with AMX crashed in its first decode on this project's Xeon machines (segmentation fault in
# llama_decode), and GGML_NATIVE=ON turns it on. Sets $LLAMA_CPP_ARGS (LLAMA_CPP_CMAKE_ARGS=...
# chooses the flags yourself).
flags=" $(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { case "$flags" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
LLAMA_CPP_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if [ "$(uname -m)" = x86_64 ]; then
  onoff() { if has "$1"; then echo ON; else echo OFF; fi; }
  LLAMA_CPP_ARGS="$LLAMA_CPP_ARGS -DGGML_AVX=$(onoff avx) -DGGML_AVX2=$(onoff avx2) -DGGML_FMA=$(onoff fma) -DGGML_F16C=$(onoff f16c)"
  LLAMA_CPP_ARGS="$LLAMA_CPP_ARGS -DGGML_BMI2=$(onoff bmi2) -DGGML_AVX_VNNI=$(onoff avx_vnni) -DGGML_AVX512=$(onoff avx512f)"
  LLAMA_CPP_ARGS="$LLAMA_CPP_ARGS -DGGML_AVX512_VNNI=$(onoff avx512_vnni) -DGGML_AVX512_VBMI=$(onoff avx512vbmi)"
  LLAMA_CPP_ARGS="$LLAMA_CPP_ARGS -DGGML_AVX512_BF16=$(onoff avx512_bf16)"
fi
LLAMA_CPP_ARGS="${LLAMA_CPP_CMAKE_ARGS:-$LLAMA_CPP_ARGS}"
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
