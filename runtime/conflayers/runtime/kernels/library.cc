// The library's entry points: which kernels run on this CPU, and the registration ONNX Runtime
// calls (SessionOptions.register_custom_ops_library). Ops a CPU lacks are not registered: their
// nodes then run the ONNX functions the graph carries.
#define ORT_API_MANUAL_INIT   // the API table comes from the ONNX Runtime that loads us
#include <onnxruntime_cxx_api.h>

#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"

namespace {
std::mutex g_lock;
std::vector<Ort::CustomOpDomain> g_domains;    // kept alive for every session that registered them
}  // namespace

extern "C" {

// What registers here: "offsets:avx2 qmatmul:<engine> attention:<path>" (engine amx, avx512, avx2,
// scalar, or off: QMatMul's ONNX functions run; path avx512 or avx2, the same bits), "none"
// (nothing: a CPU without AVX2), or why CONFLAYERS_QMATMUL or CONFLAYERS_ATTENTION_ISA is refused.
const char* conflayers_kernels_path() {
  static thread_local std::string said;
  if (!conflayers_kernels::block_offsets_supported()) return "none";
  try {
    said = std::string("offsets:avx2 qmatmul:") + conflayers_kernels::qmatmul_engine() + " attention:" +
           conflayers_kernels::attention_path();
  } catch (const std::exception& e) {
    said = std::string("error: ") + e.what();
  }
  return said.c_str();
}

// The weights QMatMul holds repacked now, by stored code width: "4-bit:30/5898240 5-bit:..." (matrices /
// code bytes; 5- and 6-bit: narrow 8-bit codes in planes, qmatmul.h); "" when none.
const char* conflayers_qmatmul_layouts() {
  static thread_local std::string said;
  said = conflayers_kernels::qmatmul_layouts();
  return said.c_str();
}

OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;        // an older ONNX Runtime: the ONNX functions run
  Ort::InitApi(api);
  if (!conflayers_kernels::block_offsets_supported()) return nullptr;
  try {
    std::lock_guard<std::mutex> hold(g_lock);
    Ort::CustomOpDomain domain("conflayers");
    conflayers_kernels::add_block_offsets_ops(domain);
    conflayers_kernels::add_qmatmul_ops(domain);     // none where no engine is chosen
    conflayers_kernels::add_attention_ops(domain);
    Ort::UnownedSessionOptions(options).Add(domain);
    g_domains.push_back(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
