// What each kernel file of the library contributes to its one domain ("conflayers"); library.cc
// registers them.
#pragma once

#include <onnxruntime_cxx_api.h>

namespace conflayers_kernels {

bool block_offsets_supported();                        // AVX2 + FMA + F16C
void add_block_offsets_ops(Ort::CustomOpDomain& domain);

bool qmatmul_supported();                              // AMX-INT8 (and the OS lets us use it)
void add_qmatmul_ops(Ort::CustomOpDomain& domain);

}  // namespace conflayers_kernels
