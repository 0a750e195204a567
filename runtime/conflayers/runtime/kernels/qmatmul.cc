// conflayers' 4- and 8-bit matrix product (part of the kernel library, domain "conflayers"):
//
//   QMatMul(x [.., K], codes, scales)                  y = x @ W,  W[k, n] = scales[n, b] * (q[n, k] - mid)
//   QMatMulOffsets(x, codes, scales, offsets fp32)     ... + sum_b blocksum_b(x) * offsets[b, n]
//   QMatMulOffsets16(...)                              the same, offsets in fp16
//   QMatMul16(x, codes, scales)                        QMatMul on 8-bit blocks of 16 (Q6_K's)
//   QMatMulGLU, QMatMulGLUOffsets, QMatMulGLUOffsets16, QMatMulGLU16 (the same inputs, attributes
//       alpha, beta): y = x @ W = [gate | up] (N = 2F), out = gate sigmoid(gate (alpha + beta
//       gate^2)) up [.., F]: an MLP's packed gate/up projection and its activation in one node
//       (SiLU, GELU-tanh), which on SmolLM2 replaced a Split, a QuickGelu and a Mul per layer
//   QMatMulNorm* (every op above with "Norm" after "QMatMul": inputs x, delta, norm_weight, then
//       the op's own; attribute epsilon): total = x + delta, h = total / sqrt(mean(total^2) +
//       epsilon) * norm_weight, outputs (the product of h, total): a layer's residual add and
//       RMSNorm (SkipSimplifiedLayerNormalization) in the node that reads h
//   QMatMulScreened, QMatMulNormScreened (QMatMul's / QMatMulNorm's inputs on an 8-bit head, then
//       full_logits int64 [1]): the screened head (qmatmul.h; head.py writes it): every greedy
//       argmax as the plain op's, the logits exact where they may be the argmax and -inf
//       elsewhere; full_logits 1, or an engine other than AVX-512: every logit, the plain op's
//
// The inputs are MatMulNBits' (codes [N, K/32, 16 | 32] of 4 or 8 bits, blocks of 32, mid 8 or
// 128, fp32 scales [N, K/32]; or Q6_K's 8-bit blocks of 16) plus the GGUF offsets [K/32, N]. The
// compiler writes each node with an ONNX function of MatMulNBits (+ AddBlockOffsets), which a
// session runs where this op is not registered (no library, CONFLAYERS_QMATMUL=off, or a CPU
// without AVX2).
//
// Why (issues #21 and the exactness issue): MatMulNBits' int8 kernels redo the per-row integer
// work for every pair of rows (a 9-row verify pass cost 2.4x a one-token step), and on AVX2-only
// CPUs compute a one-row pass with another kernel than a pass of 2+ rows, so steps and verify
// passes differed in the last bits there. Here activations are quantized per row and block of 32
// to int8 (MatMulNBits' accuracy level 4 and llama.cpp's Q8 scheme), the block dot products are
// exact integers, and every row goes through the same float sequence (qmatmul.h): a row's result
// never depends on the pass's size, its place in it, the thread, or the engine that computes it:
//   qmatmul_amx.cc     AMX tiles for 2+ rows, AVX-512 VNNI for one (CPUs with AMX-INT8)
//   qmatmul_avx512.cc  VPDPBUSD (CPUs with AVX-512 VNNI and no AMX: AMD Zen 4/5, Ice Lake)
//   qmatmul_avx2.cc    VPMADDUBSW (every other CPU with AVX2 + FMA + F16C)
//   qmatmul_scalar.cc  one value at a time: the reference the tests hold the others to
// CONFLAYERS_QMATMUL picks one (amx, avx512, avx2, scalar; off: the ONNX functions); unset, the fastest.
//
// The weights are repacked once into B-tile order (qmatmul.h), the size of the codes plus the
// scales and offsets (custom ops get no PrePack, so ONNX Runtime keeps its own copy of the
// initializers too); sessions with the same weights share one copy.
#define ORT_API_MANUAL_INIT   // the API table comes from the ONNX Runtime that loads us
#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"
#include "qmatmul.h"

namespace conflayers_kernels {
namespace qmm {

void ColumnValues::assign(std::vector<float> values) {
  half = true;
  for (float v : values) half = half && Ort::Float16_t(v).ToFloat() == v;
  if (!half) { f32 = std::move(values); return; }
  f16.resize(values.size());
  for (size_t i = 0; i < values.size(); ++i) f16[i] = Ort::Float16_t(values[i]).val;
}

float ColumnValues::at(size_t i) const {
  return half ? Ort::Float16_t::FromBits(f16[i]).ToFloat() : f32[i];
}

void Rows::resize(int m, int k, int block) {
  const size_t nb = k / block;
  q.resize(static_cast<size_t>(m) * k);
  d.resize(m * nb);
  sum.resize(m * nb);
  qsum.resize(m * nb);
}

}  // namespace qmm
}  // namespace conflayers_kernels

namespace {

using namespace conflayers_kernels::qmm;

// 5 or 6 where every 8-bit code of the matrix lies in 32 or 64 consecutive values (*base: the
// least, centered), else 0 (qmatmul.h, narrow codes).
int narrow_planes(const uint8_t* codes, size_t count, int* base) {
  int lo = 255, hi = 0;
  for (size_t i = 0; i < count; ++i) lo = codes[i] < lo ? codes[i] : lo, hi = codes[i] > hi ? codes[i] : hi;
  *base = lo - 128;
  return hi - lo < 32 ? 5 : hi - lo < 64 ? 6 : 0;
}

// Tile byte t of block b for the 16 columns of group g: row r = t / 64 holds k = 4r .. 4r+3 of
// each column c = (t % 64) / 4; then held as `layout` asks where it applies (8-bit blocks of 32).
void repack(const uint8_t* codes, const float* scales, const float* offsets_nb_n, int n, int k, int bits,
            int block, Layout layout, TileWeights* out) {
  const int nb = k / block, groups = (n + kCols - 1) / kCols, bytes = block * bits / 8;
  out->groups = groups, out->nb = nb, out->bits = bits, out->block = block;
  int base = 0;
  const bool wide8 = bits == 8 && block == kBlock;
  if (layout == Layout::kSplit && wide8) out->planes = 6, out->split = true;
  else if (layout == Layout::kNarrow && wide8) out->planes = narrow_planes(codes, static_cast<size_t>(n) * nb * bytes, &base);
  out->mid = out->planes && !out->split ? -base : bits == 4 ? 8 : 128;
  if (out->split) out->lo.assign(static_cast<size_t>(groups) * nb * 128, 0);
  const int per = out->bytes_per_block(), per8 = kCols * block, half = per8 / 2;
  out->codes.assign(static_cast<size_t>(groups) * nb * per, 0);
  std::vector<float> sc(static_cast<size_t>(groups) * nb * kCols, 0.f), off;
  if (offsets_nb_n) off.assign(sc.size(), 0.f);
  auto code = [&](int col, int b, int kk) -> int {     // the code, centered
    const uint8_t* c = codes + (static_cast<size_t>(col) * nb + b) * bytes;
    return bits == 4 ? ((c[kk / 2] >> (4 * (kk & 1))) & 15) - 8 : static_cast<int>(c[kk]) - 128;
  };
  for (int g = 0; g < groups; ++g)
    for (int b = 0; b < nb; ++b) {
      int8_t* dst = out->codes.data() + (static_cast<size_t>(g) * nb + b) * per;
      for (int t = 0; t < kCols * block; ++t) {
        const int r = t / 64, c = (t % 64) / 4, kk = 4 * r + t % 4, col = g * kCols + c;
        const int v = col < n ? code(col, b, kk) : 0;
        if (out->planes) {        // the planes of qmatmul.h (padding columns: code 0)
          const int c = col < n ? (out->split ? (v + 128) >> 2 : v - base) : 0, hi = c >> 4;
          uint8_t* u = reinterpret_cast<uint8_t*>(dst);
          if (out->split && col < n)
            reinterpret_cast<uint8_t*>(out->lo.data())[(static_cast<size_t>(g) * nb + b) * 128 + t % 128] |=
                static_cast<uint8_t>(((v + 128) & 3) << (2 * (t / 128)));
          u[t % half] |= static_cast<uint8_t>((c & 15) << (t < half ? 0 : 4));
          if (out->planes == 6) u[half + t % (per8 / 4)] |= static_cast<uint8_t>(hi << (2 * (t / (per8 / 4))));
          else u[half + t % (per8 / 8)] |= static_cast<uint8_t>(hi << (t / (per8 / 8)));
        } else if (bits == 8) dst[t] = static_cast<int8_t>(v);
        else if (t < 256) dst[t] = static_cast<int8_t>(v + 8);
        else dst[t - 256] = static_cast<int8_t>(static_cast<uint8_t>(dst[t - 256]) | ((v + 8) << 4));
      }
      for (int c = 0; c < kCols; ++c) {
        const int col = g * kCols + c;
        if (col >= n) continue;
        const size_t at = (static_cast<size_t>(g) * nb + b) * kCols + c;
        sc[at] = scales[static_cast<size_t>(col) * nb + b];
        if (offsets_nb_n) off[at] = offsets_nb_n[static_cast<size_t>(b) * n + col];
      }
    }
  out->scales.assign(std::move(sc));
  if (offsets_nb_n) out->offsets.assign(std::move(off));
}


// ---- which engine --------------------------------------------------------------------------------

// The engine CONFLAYERS_QMATMUL names, else the fastest this CPU has; nullptr: QMatMul is not
// registered (the ONNX functions run). Read when a session registers the library.
const Engine* chosen_engine() {
  static const bool amx = amx_usable(), avx512 = avx512_usable(), avx2 = avx2_usable();
  const char* env = std::getenv("CONFLAYERS_QMATMUL");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto")
    return amx ? &kAmxEngine : avx512 ? &kAvx512Engine : avx2 ? &kAvx2Engine : nullptr;
  if (want == "off" || want == "0") return nullptr;
  if (want == "scalar") return &kScalarEngine;
  if (want == "avx2" && avx2) return &kAvx2Engine;
  if (want == "avx512" && avx512) return &kAvx512Engine;
  if (want == "amx" && amx) return &kAmxEngine;
  if (want == "avx2" || want == "avx512" || want == "amx")
    throw std::runtime_error("CONFLAYERS_QMATMUL=" + want + ": this CPU (or its OS) does not give " +
                             (want == "amx" ? "AMX-INT8" : want == "avx512" ? "AVX-512 VNNI" : "AVX2 + FMA + F16C") +
                             "; unset it to use the fastest engine here");
  throw std::runtime_error("CONFLAYERS_QMATMUL=" + want + ": expected amx, avx512, avx2, scalar, off or auto");
}

// ---- the weights, repacked once per distinct matrix ---------------------------------------------

// A 128-bit fingerprint of the bytes (two independent 64-bit FNV-style mixes): sessions of the
// same graph (the runtime's solo and packed sessions) share one repacked copy.
void mix(const void* data, size_t bytes, uint64_t* h1, uint64_t* h2) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    *h1 = (*h1 ^ v) * 0x100000001b3ULL;
    *h2 = (*h2 + v) * 0x9E3779B97F4A7C15ULL ^ (*h2 >> 29);
  }
  for (; i < bytes; ++i) {
    *h1 = (*h1 ^ p[i]) * 0x100000001b3ULL;
    *h2 = (*h2 + p[i]) * 0x9E3779B97F4A7C15ULL ^ (*h2 >> 29);
  }
}

std::mutex g_cache_lock;
std::map<std::string, std::weak_ptr<const TileWeights>> g_cache;

std::shared_ptr<const TileWeights> tile_weights(const uint8_t* codes, const float* scales, const float* offsets,
                                                int n, int k, int bits, int block, Layout layout) {
  const size_t nb = k / block, code_bytes = static_cast<size_t>(n) * nb * block * bits / 8;
  uint64_t h1 = 0xcbf29ce484222325ULL, h2 = 0x84222325cbf29ce4ULL;
  mix(codes, code_bytes, &h1, &h2);
  mix(scales, static_cast<size_t>(n) * nb * sizeof(float), &h1, &h2);
  if (offsets) mix(offsets, static_cast<size_t>(n) * nb * sizeof(float), &h1, &h2);
  const bool wide8 = bits == 8 && block == kBlock;     // the layouts that apply (repack)
  const char* held = !wide8 ? "" : layout == Layout::kSplit ? "s" : layout == Layout::kNarrow ? "p" : "";
  const std::string key = std::to_string(n) + "x" + std::to_string(k) + "x" + std::to_string(bits) + "b" +
                          std::to_string(block) + (offsets ? "o" : "") + held +
                          ":" + std::to_string(h1) + ":" + std::to_string(h2);
  std::lock_guard<std::mutex> hold(g_cache_lock);
  if (auto kept = g_cache[key].lock()) return kept;
  auto made = std::make_shared<TileWeights>();
  repack(codes, scales, offsets, n, k, bits, block, layout, made.get());
  g_cache[key] = made;
  return made;
}

// ---- the ONNX Runtime kernel ----------------------------------------------------------------------

constexpr int kGroupsPerTask = 2;     // 32 columns a task

struct Task {
  const Engine* engine;
  Problem problem;
};

void run_task(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const int g0 = static_cast<int>(index) * kGroupsPerTask;
  const int g1 = g0 + kGroupsPerTask < t.problem.w->groups ? g0 + kGroupsPerTask : t.problem.w->groups;
  t.engine->groups(t.problem, g0, g1);
}

// QMatMulGLU: a task computes the gate's groups [g0, g1) and the up projection's groups that
// pair with them (F / 16 groups on), then the activation of those columns: a row's result still
// comes from the same float sequence whatever the pass.
struct GateTask {
  const Engine* engine;
  Problem problem;     // y: the [m, 2F] product, scratch
  Gate gate;
};

void run_gate_task(void* data, size_t index) {
  const GateTask& t = *static_cast<const GateTask*>(data);
  const int half = t.gate.f / kCols;
  const int g0 = static_cast<int>(index) * kGroupsPerTask;
  const int g1 = g0 + kGroupsPerTask < half ? g0 + kGroupsPerTask : half;
  t.engine->groups(t.problem, g0, g1);
  t.engine->groups(t.problem, half + g0, half + g1);
  t.engine->gate(t.gate, g0 * kCols, g1 * kCols);
}

struct ScreenTask {
  Screen screen;
};

void run_screen_task(void* data, size_t index) {
  const Screen& s = static_cast<const ScreenTask*>(data)->screen;
  const int g0 = static_cast<int>(index) * kGroupsPerTask;
  screen_groups(s, static_cast<int>(index), g0, g0 + kGroupsPerTask < s.problem.w->groups ? g0 + kGroupsPerTask : s.problem.w->groups);
}

void run_exact_task(void* data, size_t index) {
  const Screen& s = static_cast<const ScreenTask*>(data)->screen;
  const int g0 = static_cast<int>(index) * kGroupsPerTask;
  exact_groups(s, g0, g0 + kGroupsPerTask < s.problem.w->groups ? g0 + kGroupsPerTask : s.problem.w->groups);
}

enum class Offsets { kNone, kFp32, kFp16 };

// The Norm ops' prologue, row by row in one fixed sequence (8 partial sums of squares in k order,
// added pairwise), so a row's h never depends on the pass: total = x + delta, h as above.
void add_rms_norm(const float* x, const float* delta, const float* w, int64_t m, int k, float eps,
                  float* total, float* h) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    const float* dr = delta + r * k;
    float* t = total + r * k;
    float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < k; ++i) {
      t[i] = xr[i] + dr[i];
      part[i % 8] += t[i] * t[i];
    }
    const float ss = ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(k) + eps);
    float* hr = h + r * k;
    for (int i = 0; i < k; ++i) hr[i] = t[i] * inv * w[i];
  }
}

std::vector<float> offsets_fp32(Ort::ConstValue off, Offsets kind, size_t count) {
  if (off.GetTensorTypeAndShapeInfo().GetElementCount() != count)
    throw std::runtime_error("conflayers QMatMulOffsets: offsets must hold K/32 x N values");
  std::vector<float> out(count);
  if (kind == Offsets::kFp32) {
    std::memcpy(out.data(), off.GetTensorData<float>(), count * sizeof(float));
  } else {
    const Ort::Float16_t* h = off.GetTensorData<Ort::Float16_t>();
    for (size_t i = 0; i < count; ++i) out[i] = h[i].ToFloat();     // exact
  }
  return out;
}

struct QMatMulKernel {
  QMatMulKernel(const OrtApi& api, const OrtKernelInfo* info, Offsets offsets, bool block16, bool glu, bool norm,
                bool screened, const Engine* engine)
      : api_(api), offsets_(offsets), glu_(glu), norm_(norm), screened_(screened), w0_(norm ? 3 : 1), engine_(engine) {
    Ort::ConstKernelInfo ki(info);
    if (norm_) eps_ = ki.GetAttribute<float>("epsilon");
    k_ = static_cast<int>(ki.GetAttribute<int64_t>("K"));
    n_ = static_cast<int>(ki.GetAttribute<int64_t>("N"));
    bits_ = static_cast<int>(ki.GetAttribute<int64_t>("bits"));
    block_ = static_cast<int>(ki.GetAttribute<int64_t>("block_size"));
    if (glu_) {
      alpha_ = ki.GetAttribute<float>("alpha");
      beta_ = ki.GetAttribute<float>("beta");
      if (n_ % (2 * kCols) != 0)
        throw std::runtime_error("conflayers QMatMulGLU: N (gate and up, packed) must be a multiple of 32 (got N=" +
                                 std::to_string(n_) + "); write the gate's Split and activation as nodes instead");
    }
    const bool shape_ok = block16 ? block_ == kBlock16 && bits_ == 8 : block_ == kBlock && (bits_ == 4 || bits_ == 8);
    if (!shape_ok || k_ <= 0 || n_ <= 0 || k_ % block_ != 0)
      throw std::runtime_error(std::string("conflayers ") + (block16 ? "QMatMul16: needs 8-bit blocks of 16" :
                               "QMatMul: needs blocks of 32 with 4 or 8 bits") + " and K a multiple of the block (got K=" +
                               std::to_string(k_) + " bits=" + std::to_string(bits_) + " block=" + std::to_string(block_) + ")");
    if (block_ == kBlock16 && (engine_ == &kAmxEngine || engine_ == &kAvx512Engine))
      engine_ = &kAvx2Engine;   // the same arithmetic, 16-wide blocks
    if (screened_ && bits_ != 8)
      throw std::runtime_error("conflayers QMatMulScreened: needs an 8-bit head (got bits=" + std::to_string(bits_) + ")");
    int c1 = 0, c2 = 0, c3 = 1;      // constant weights (the compiler's graphs): repacked here, once
    Ort::ConstValue codes = ki.GetTensorConstantInput(w0_, &c1);
    Ort::ConstValue scales = ki.GetTensorConstantInput(w0_ + 1, &c2);
    Ort::ConstValue off{nullptr};
    if (offsets_ != Offsets::kNone) off = ki.GetTensorConstantInput(w0_ + 2, &c3);
    if (c1 && c2 && c3) weights_ = prepare(codes, scales, off);
  }

  // The screened op's last input: nonzero when the pass's logits must all be exact (a sampled row).
  bool full_logits(Ort::KernelContext& ctx) const {
    Ort::ConstValue f = ctx.GetInput(w0_ + 2);
    if (f.GetTensorTypeAndShapeInfo().GetElementCount() != 1)
      throw std::runtime_error("conflayers QMatMulScreened: full_logits must hold one value");
    return f.GetTensorData<int64_t>()[0] != 0;
  }

  // qmatmul.h's screened head: A + R of every column, the rows' thresholds, then exact products
  // for the groups that may hold a row's greedy token and -inf elsewhere.
  void screen(OrtKernelContext* context, const Problem& p) const {
    const int nb = k_ / kBlock;
    thread_local std::vector<int32_t> qabs;
    thread_local std::vector<float> low, threshold;
    qabs.resize(static_cast<size_t>(nb) * p.m);
    for (size_t i = 0; i < qabs.size(); ++i) {        // block-major, as the AVX-512 engine's rows
      const int8_t* q = p.a->q.data() + i * kBlock;
      int32_t sum = 0;
      for (int j = 0; j < kBlock; ++j) sum += q[j] < 0 ? -q[j] : q[j];
      qabs[i] = sum;
    }
    const size_t tasks = (static_cast<size_t>(p.w->groups) + kGroupsPerTask - 1) / kGroupsPerTask;
    low.resize(tasks * p.m);                           // (each task starts its own at -inf)
    threshold.assign(p.m, -__builtin_inff());
    ScreenTask task{Screen{p, qabs.data(), low.data(), threshold.data()}};
    Ort::ThrowOnError(api_.KernelContext_ParallelFor(context, run_screen_task, tasks, 4, &task));
    for (size_t t = 0; t < tasks; ++t)
      for (int r = 0; r < p.m; ++r) threshold[r] = low[t * p.m + r] > threshold[r] ? low[t * p.m + r] : threshold[r];
    Ort::ThrowOnError(api_.KernelContext_ParallelFor(context, run_exact_task, tasks, 4, &task));
  }

  std::shared_ptr<const TileWeights> prepare(Ort::ConstValue codes, Ort::ConstValue scales, Ort::ConstValue off) const {
    const size_t nb = k_ / block_;
    if (codes.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(n_) * k_ * bits_ / 8 ||
        scales.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(n_) * nb)
      throw std::runtime_error("conflayers QMatMul: codes or scales do not match K=" + std::to_string(k_) +
                               " and N=" + std::to_string(n_));
    std::vector<float> o;
    if (offsets_ != Offsets::kNone) o = offsets_fp32(off, offsets_, static_cast<size_t>(n_) * nb);
    return tile_weights(codes.GetTensorData<uint8_t>(), scales.GetTensorData<float>(), o.empty() ? nullptr : o.data(),
                        n_, k_, bits_, block_, layout());
  }

  // Planes (qmatmul.h) are read by the AVX-512 engine, which this matrix then runs on (the AMX
  // engine's tiles take bytes): the screened head's weights split, others narrow where they fit;
  // CONFLAYERS_QMATMUL_PLANES=off keeps bytes (A/B runs; a screened head then computes every column).
  Layout layout() const {
    const char* env = std::getenv("CONFLAYERS_QMATMUL_PLANES");
    const bool off = env && (std::string(env) == "off" || std::string(env) == "0");
    if (off || engine_ != &kAvx512Engine) return Layout::kBytes;
    return screened_ ? Layout::kSplit : Layout::kNarrow;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    Ort::ConstValue x = ctx.GetInput(0);
    std::vector<int64_t> shape = x.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty() || shape.back() != k_)
      throw std::runtime_error("conflayers QMatMul: x's last dimension must be K=" + std::to_string(k_));
    int64_t m = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) m *= shape[i];
    shape.back() = glu_ ? n_ / 2 : n_;
    Ort::UnownedValue y = ctx.GetOutput(0, shape);
    const float* a = x.GetTensorData<float>();
    thread_local std::vector<float> normed;
    if (norm_) {
      shape.back() = k_;
      Ort::ConstValue delta = ctx.GetInput(1), nw = ctx.GetInput(2);
      if (delta.GetTensorTypeAndShapeInfo().GetShape() != shape || nw.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(k_))
        throw std::runtime_error("conflayers QMatMulNorm: delta must have x's shape and norm_weight K=" + std::to_string(k_) + " values");
      Ort::UnownedValue total = ctx.GetOutput(1, shape);
      normed.resize(static_cast<size_t>(m) * k_);
      add_rms_norm(a, delta.GetTensorData<float>(), nw.GetTensorData<float>(), m, k_, eps_,
                   total.GetTensorMutableData<float>(), normed.data());
      a = normed.data();
    }
    if (m == 0) return;
    std::shared_ptr<const TileWeights> w = weights_;
    if (!w) w = prepare(ctx.GetInput(w0_), ctx.GetInput(w0_ + 1), offsets_ == Offsets::kNone ? Ort::ConstValue{nullptr} : ctx.GetInput(w0_ + 2));
    thread_local Rows rows;
    engine_->quantize(a, static_cast<int>(m), k_, block_, &rows);
    float* out = y.GetTensorMutableData<float>();
    if (screened_ && w->split && !full_logits(ctx)) {
      screen(context, Problem{&rows, w.get(), out, n_, k_, static_cast<int>(m)});
      return;
    }
    if (!glu_) {
      Task task{engine_, Problem{&rows, w.get(), out, n_, k_, static_cast<int>(m)}};
      const size_t tasks = (static_cast<size_t>(w->groups) + kGroupsPerTask - 1) / kGroupsPerTask;
      Ort::ThrowOnError(api_.KernelContext_ParallelFor(context, run_task, tasks, 4, &task));
      return;
    }
    thread_local std::vector<float> packed;      // [m, 2F]: gate and up, read back by the activation
    packed.resize(static_cast<size_t>(m) * n_);
    GateTask task{engine_, Problem{&rows, w.get(), packed.data(), n_, k_, static_cast<int>(m)},
                  Gate{packed.data(), out, static_cast<int>(m), n_ / 2, alpha_, beta_}};
    const size_t tasks = (static_cast<size_t>(n_ / 2 / kCols) + kGroupsPerTask - 1) / kGroupsPerTask;
    Ort::ThrowOnError(api_.KernelContext_ParallelFor(context, run_gate_task, tasks, 4, &task));
  }

 private:
  const OrtApi& api_;
  Offsets offsets_;
  bool glu_, norm_, screened_;
  int w0_;                 // the index of the codes input (after x, or x, delta, norm_weight)
  const Engine* engine_;
  int k_ = 0, n_ = 0, bits_ = 0, block_ = kBlock;
  float alpha_ = 1.f, beta_ = 0.f, eps_ = 0.f;
  std::shared_ptr<const TileWeights> weights_;
};

struct QMatMulOp : Ort::CustomOpBase<QMatMulOp, QMatMulKernel> {
  QMatMulOp(Offsets offsets, bool block16, bool glu, bool norm, bool screened = false)
      : offsets_(offsets), block16_(block16), glu_(glu), norm_(norm), screened_(screened) {
    name_ = std::string("QMatMul") + (norm ? "Norm" : "") + (glu ? "GLU" : "") +
            (block16 ? "16" : offsets == Offsets::kNone ? "" : offsets == Offsets::kFp32 ? "Offsets" : "Offsets16") +
            (screened ? "Screened" : "");
  }
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const {
    return new QMatMulKernel(api, info, offsets_, block16_, glu_, norm_, screened_, engine);
  }
  const char* GetName() const { return name_.c_str(); }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return (offsets_ == Offsets::kNone ? 3 : 4) + (norm_ ? 2 : 0) + (screened_ ? 1 : 0); }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (screened_ && i + 1 == GetInputTypeCount()) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;   // full_logits
    if (norm_ && i > 0) {
      if (i < 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;      // delta, norm_weight
      i -= 2;
    }
    if (i == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    if (i == 3 && offsets_ == Offsets::kFp16) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return norm_ ? 2 : 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  const Engine* engine = nullptr;    // set at registration

 private:
  Offsets offsets_;
  bool block16_, glu_, norm_, screened_;
  std::string name_;
};

// every combination: {plain, Norm} x {plain, GLU} x {no offsets, fp32, fp16 offsets, blocks of 16}
std::vector<QMatMulOp>& qmatmul_ops() {
  static std::vector<QMatMulOp> ops = [] {
    std::vector<QMatMulOp> v;
    for (bool norm : {false, true})
      for (bool glu : {false, true}) {
        for (Offsets o : {Offsets::kNone, Offsets::kFp32, Offsets::kFp16}) v.emplace_back(o, false, glu, norm);
        v.emplace_back(Offsets::kNone, true, glu, norm);
      }
    for (bool norm : {false, true}) v.emplace_back(Offsets::kNone, false, false, norm, true);   // the screened head
    return v;
  }();
  return ops;
}

}  // namespace

namespace conflayers_kernels {

const char* qmatmul_engine() {
  const Engine* e = chosen_engine();
  return e ? e->name : "off";
}

std::string qmatmul_layouts() {
  std::map<int, std::pair<int, size_t>> by_bits;     // stored bits -> (matrices, code bytes)
  {
    std::lock_guard<std::mutex> hold(g_cache_lock);
    for (const auto& entry : g_cache)
      if (auto w = entry.second.lock()) {
        auto& c = by_bits[w->planes ? w->planes : w->bits];
        c.first += 1, c.second += w->codes.size();
      }
  }
  std::string out;
  for (const auto& b : by_bits)
    out += (out.empty() ? "" : " ") + std::to_string(b.first) + "-bit:" + std::to_string(b.second.first) + "/" +
           std::to_string(b.second.second);
  return out;
}

void add_qmatmul_ops(Ort::CustomOpDomain& domain) {
  const Engine* e = chosen_engine();
  if (!e) return;
  for (QMatMulOp& op : qmatmul_ops()) {
    op.engine = e;
    domain.Add(&op);
  }
}

}  // namespace conflayers_kernels
