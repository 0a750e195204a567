// The library's entry points: which kernels run on this CPU, and the registration ONNX Runtime
// calls (SessionOptions.register_custom_ops_library). Ops a CPU lacks are not registered: their
// nodes then run the ONNX functions the graph carries.
#define ORT_API_MANUAL_INIT   // the API table comes from the ONNX Runtime that loads us
#include <onnxruntime_cxx_api.h>

#include <mutex>
#include <vector>

#include "kernels.h"

namespace {
std::mutex g_lock;
std::vector<Ort::CustomOpDomain> g_domains;    // kept alive for every session that registered them
}  // namespace

extern "C" {

// "avx2+amx" (every op), "avx2" (AddBlockOffsets only) or "none" (nothing registered).
const char* conflayers_kernels_path() {
  if (!conflayers_kernels::block_offsets_supported()) return "none";
  return conflayers_kernels::qmatmul_supported() ? "avx2+amx" : "avx2";
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
    if (conflayers_kernels::qmatmul_supported()) conflayers_kernels::add_qmatmul_ops(domain);
    Ort::UnownedSessionOptions(options).Add(domain);
    g_domains.push_back(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
