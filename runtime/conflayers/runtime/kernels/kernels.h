// What each kernel file of the library contributes to its one domain ("conflayers"); library.cc
// registers them.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <string>

namespace conflayers_kernels {

bool block_offsets_supported();                        // AVX2 + FMA + F16C
void add_block_offsets_ops(Ort::CustomOpDomain& domain);

const char* qmatmul_engine();                          // "amx", "avx512", "avx2", "scalar" or "off" (throws on a bad
void add_qmatmul_ops(Ort::CustomOpDomain& domain);     // CONFLAYERS_QMATMUL)
std::string qmatmul_layouts();                         // the live repacked weights: "B-bit:matrices/code bytes ..."

void add_attention_ops(Ort::CustomOpDomain& domain);   // SlotAttention (AVX2 + FMA, or AVX-512: the same bits)
const char* attention_path();                          // "avx512" or "avx2": what sessions made now take

}  // namespace conflayers_kernels
