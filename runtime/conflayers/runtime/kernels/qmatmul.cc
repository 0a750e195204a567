// conflayers' 4- and 8-bit matrix product on Intel AMX (part of the kernel library, domain "conflayers"):
//
//   QMatMul(x [.., K], codes, scales)                  y = x @ W,  W[k, n] = scales[n, b] * (q[n, k] - mid)
//   QMatMulOffsets(x, codes, scales, offsets fp32)     ... + sum_b blocksum_b(x) * offsets[b, n]
//   QMatMulOffsets16(...)                              the same, offsets in fp16
//
// The inputs are MatMulNBits' (codes [N, K/32, 16 | 32] of 4 or 8 bits, blocks of 32, mid 8 or
// 128, fp32 scales [N, K/32]) plus the GGUF offsets [K/32, N]. The compiler writes each node with
// an ONNX function of MatMulNBits (+ AddBlockOffsets), which a session runs where this op is not
// registered: CPUs without AMX-INT8 (then MatMulNBits' own kernels run, as before).
//
// Why (issue #21): MatMulNBits' int8 kernel redoes the per-row integer work with AVX-512 VNNI
// for every pair of rows, so a 9-row verify pass cost 2.4x a one-token step. AMX's tile product
// gives the exact int32 block dot products of 16 rows per instruction; what is left per row is
// the float epilogue. Measured on SmolLM2's 121 matrices (tools/experiments/qmatmul/bench.py
// --lib this library, 2-core Xeon with AMX): 1.2x MatMulNBits' speed at one row, 1.7x at 9.
//
// Exactness by construction: activations are quantized per row and block of 32 to int8 (scale
// max|x|/127, round to nearest even: MatMulNBits' accuracy level 4 and llama.cpp's Q8 scheme).
// The block dot products are integers, exact whichever unit computes them: TDPBSSD on the
// centered codes for passes of 2+ rows, VPDPBUSD on the raw codes less mid x the activations'
// sum for one row (faster there, no tiles). Every row then goes through the same float
// sequence: per block in order, acc = fma(float(dot), scale x activation scale, acc), then
// acc = fma(blocksum, offset, acc). So a row's result never depends on the pass's size, its
// place in the pass, the tile or the thread: one-token steps and verify passes agree bit for bit.
//
// The weights are repacked once into B-tile order (per 16 columns and block: 256 bytes whose low
// nibbles are tile bytes 0..255, k 0..15, and high nibbles tile bytes 256..511, k 16..31; 8-bit
// codes as 512 centered bytes; scales and offsets [16-column group, block, 16] fp32). That copy
// is the size of the codes plus 2x the scales (custom ops get no PrePack, so ONNX Runtime keeps
// its own copy of the initializers too); sessions with the same weights share one copy.
#define ORT_API_MANUAL_INIT   // the API table comes from the ONNX Runtime that loads us
#include <onnxruntime_cxx_api.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
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

// GCC 12 flags the undefined upper lanes inside its own _mm512_* headers (a known false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

constexpr int kBlock = 32;

#define CONFLAYERS_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,amx-tile,amx-int8")))

constexpr int kTileCols = 16;
constexpr int kTileRows = 16;

struct TileWeights {
  int groups = 0, nb = 0, bits = 0;   // 16-column groups, blocks of K
  std::vector<int8_t> codes;    // [groups, nb, 256 | 512]
  std::vector<float> scales;    // [groups, nb, 16]
  std::vector<float> offsets;   // [groups, nb, 16] or empty
};

// Tile byte t of block b for the 16 columns of group g: row r = t / 64 holds k = 4r .. 4r+3 of
// each column c = (t % 64) / 4.
void repack(const uint8_t* codes, const float* scales, const float* offsets_nb_n, int n, int k, int bits,
            TileWeights* out) {
  const int nb = k / kBlock, groups = (n + kTileCols - 1) / kTileCols, bytes = kBlock * bits / 8;
  const int per = bits == 4 ? 256 : 512;
  out->groups = groups, out->nb = nb, out->bits = bits;
  out->codes.assign(static_cast<size_t>(groups) * nb * per, 0);
  out->scales.assign(static_cast<size_t>(groups) * nb * kTileCols, 0.f);
  if (offsets_nb_n) out->offsets.assign(static_cast<size_t>(groups) * nb * kTileCols, 0.f);
  auto code = [&](int col, int b, int kk) -> int {     // the code, centered
    const uint8_t* c = codes + (static_cast<size_t>(col) * nb + b) * bytes;
    return bits == 4 ? ((c[kk / 2] >> (4 * (kk & 1))) & 15) - 8 : static_cast<int>(c[kk]) - 128;
  };
  for (int g = 0; g < groups; ++g)
    for (int b = 0; b < nb; ++b) {
      int8_t* dst = out->codes.data() + (static_cast<size_t>(g) * nb + b) * per;
      for (int t = 0; t < 512; ++t) {
        const int r = t / 64, c = (t % 64) / 4, kk = 4 * r + t % 4, col = g * kTileCols + c;
        const int v = col < n ? code(col, b, kk) : 0;
        if (bits == 8) dst[t] = static_cast<int8_t>(v);
        else if (t < 256) dst[t] = static_cast<int8_t>(v + 8);
        else dst[t - 256] = static_cast<int8_t>(static_cast<uint8_t>(dst[t - 256]) | ((v + 8) << 4));
      }
      for (int c = 0; c < kTileCols; ++c) {
        const int col = g * kTileCols + c;
        if (col >= n) continue;
        const size_t at = (static_cast<size_t>(g) * nb + b) * kTileCols + c;
        out->scales[at] = scales[static_cast<size_t>(col) * nb + b];
        if (offsets_nb_n) out->offsets[at] = offsets_nb_n[static_cast<size_t>(b) * n + col];
      }
    }
}

// int8 activations in k order, [m, k]; d and the fp32 block sums [m, nb].
struct PlainRows {
  std::vector<int8_t> q;
  std::vector<float> d, sum;
};

void quantize_plain(const float* x, int m, int k, PlainRows* out) {
  const int nb = k / kBlock;
  out->q.resize(static_cast<size_t>(m) * k);
  out->d.resize(static_cast<size_t>(m) * nb);
  out->sum.resize(static_cast<size_t>(m) * nb);
  for (int r = 0; r < m; ++r)
    for (int b = 0; b < nb; ++b) {
      const float* xb = x + static_cast<size_t>(r) * k + b * kBlock;
      float amax = 0.f, s = 0.f;
      for (int j = 0; j < kBlock; ++j) {
        amax = std::fmax(amax, std::fabs(xb[j]));
        s += xb[j];
      }
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      int8_t* q = out->q.data() + static_cast<size_t>(r) * k + b * kBlock;
      for (int j = 0; j < kBlock; ++j) {
        int v = static_cast<int>(std::nearbyint(xb[j] * id));
        q[j] = static_cast<int8_t>(v < -127 ? -127 : (v > 127 ? 127 : v));
      }
      out->d[static_cast<size_t>(r) * nb + b] = amax / 127.f;
      out->sum[static_cast<size_t>(r) * nb + b] = s;
    }
}

struct AmxProblem {
  const PlainRows* a;
  const TileWeights* w;
  float* y;
  int n, k, m;
};

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

CONFLAYERS_AMX void amx_configure(int m) {
  TileConfig c;
  for (int t = 0; t < 4; ++t) c.rows[t] = m, c.colsb[t] = 64;     // C: m rows x 16 int32
  for (int t = 4; t < 6; ++t) c.rows[t] = m, c.colsb[t] = 32;     // A: m rows x 32 int8
  for (int t = 6; t < 8; ++t) c.rows[t] = 8, c.colsb[t] = 64;     // B: 8 rows x (16 columns x 4)
  _tile_loadconfig(&c);
}

CONFLAYERS_AMX inline void unpack_tile4(const int8_t* src, int8_t* dst) {
  const __m512i mask = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  for (int i = 0; i < 4; ++i) {
    const __m512i v = _mm512_loadu_si512(src + 64 * i);
    _mm512_store_si512(dst + 64 * i, _mm512_sub_epi8(_mm512_and_si512(v, mask), eight));
    _mm512_store_si512(dst + 256 + 64 * i, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), mask), eight));
  }
}

// Group g (16 columns) against rows r0 .. r0+rows-1 (rows <= 16), blocks 4 at a time.
CONFLAYERS_AMX void amx_group(const AmxProblem& p, int g, int r0, int rows) {
  const TileWeights& w = *p.w;
  const int nb = w.nb, k = p.k, per = w.bits == 4 ? 256 : 512;
  alignas(64) int8_t wbuf[4][512];
  alignas(64) int32_t cbuf[4][kTileRows][kTileCols];
  __m512 acc[kTileRows];
  for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
  const int8_t* a = p.a->q.data() + static_cast<size_t>(r0) * k;
  const int8_t* codes = w.codes.data() + static_cast<size_t>(g) * nb * per;
  for (int b0 = 0; b0 < nb; b0 += 4) {
    const int blocks = nb - b0 < 4 ? nb - b0 : 4;
    const int8_t* wt[4];
    for (int j = 0; j < blocks; ++j) {
      const int8_t* src = codes + static_cast<size_t>(b0 + j) * per;
      if (w.bits == 4) { unpack_tile4(src, wbuf[j]); wt[j] = wbuf[j]; }
      else wt[j] = src;
    }
#define CONFLAYERS_TILE_STEP(J, A, B)                                          \
    if (blocks > J) {                                                          \
      _tile_zero(J);                                                           \
      _tile_loadd(A, a + (b0 + J) * kBlock, k);                                \
      _tile_loadd(B, wt[J], 64);                                               \
      _tile_dpbssd(J, A, B);                                                   \
    }
    CONFLAYERS_TILE_STEP(0, 4, 6)
    CONFLAYERS_TILE_STEP(1, 5, 7)
    CONFLAYERS_TILE_STEP(2, 4, 6)
    CONFLAYERS_TILE_STEP(3, 5, 7)
#undef CONFLAYERS_TILE_STEP
    _tile_stored(0, cbuf[0], 64);
    if (blocks > 1) _tile_stored(1, cbuf[1], 64);
    if (blocks > 2) _tile_stored(2, cbuf[2], 64);
    if (blocks > 3) _tile_stored(3, cbuf[3], 64);
    for (int j = 0; j < blocks; ++j) {
      const int b = b0 + j;
      const size_t at = (static_cast<size_t>(g) * nb + b) * kTileCols;
      const __m512 s = _mm512_loadu_ps(w.scales.data() + at);
      const float* d = p.a->d.data() + static_cast<size_t>(r0) * nb + b;
      const float* sum = p.a->sum.data() + static_cast<size_t>(r0) * nb + b;
      if (w.offsets.empty()) {
        for (int r = 0; r < rows; ++r)
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cbuf[j][r])),
                                   _mm512_mul_ps(s, _mm512_set1_ps(d[static_cast<size_t>(r) * nb])), acc[r]);
      } else {
        const __m512 off = _mm512_loadu_ps(w.offsets.data() + at);
        for (int r = 0; r < rows; ++r) {
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cbuf[j][r])),
                                   _mm512_mul_ps(s, _mm512_set1_ps(d[static_cast<size_t>(r) * nb])), acc[r]);
          acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(sum[static_cast<size_t>(r) * nb]), off, acc[r]);
        }
      }
    }
  }
  const int n0 = g * kTileCols;
  const __mmask16 keep = p.n - n0 >= kTileCols ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (p.n - n0)) - 1);
  for (int r = 0; r < rows; ++r) _mm512_mask_storeu_ps(p.y + static_cast<size_t>(r0 + r) * p.n + n0, keep, acc[r]);
}


// The same group for a pass of few rows, without tiles: the same int32 dot products from VPDPBUSD
// on the raw codes (0..15, or the 8-bit codes) less 8 (128) x the activations' block sum, exact,
// then the same float sequence as amx_group: so a row's result does not depend on the engine.
CONFLAYERS_AMX void vnni_group(const AmxProblem& p, int g, int r0, int rows) {
  const TileWeights& w = *p.w;
  const int nb = w.nb, k = p.k, per = w.bits == 4 ? 256 : 512;
  const int mid = w.bits == 4 ? 8 : 128;
  const __m512i mask = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* codes = w.codes.data() + static_cast<size_t>(g) * nb * per;
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int b = 0; b < nb; ++b) {
    const int8_t* src = codes + static_cast<size_t>(b) * per;
    __m512i wv[8];
    if (w.bits == 4) {
      for (int i = 0; i < 4; ++i) {
        const __m512i v = _mm512_loadu_si512(src + 64 * i);
        wv[i] = _mm512_and_si512(v, mask);
        wv[4 + i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
      }
    } else {
      for (int i = 0; i < 8; ++i) wv[i] = _mm512_xor_si512(_mm512_loadu_si512(src + 64 * i), flip);
    }
    const size_t at = (static_cast<size_t>(g) * nb + b) * kTileCols;
    const __m512 s = _mm512_loadu_ps(w.scales.data() + at);
    for (int r = 0; r < rows; ++r) {
      const int32_t* a = reinterpret_cast<const int32_t*>(p.a->q.data() + static_cast<size_t>(r0 + r) * k + b * kBlock);
      int asum = 0;
      const int8_t* ab = reinterpret_cast<const int8_t*>(a);
      for (int j = 0; j < kBlock; ++j) asum += ab[j];
      __m512i d0 = _mm512_set1_epi32(-mid * asum), d1 = _mm512_setzero_si512();
      for (int i = 0; i < 8; i += 2) {
        d0 = _mm512_dpbusd_epi32(d0, wv[i], _mm512_set1_epi32(a[i]));
        d1 = _mm512_dpbusd_epi32(d1, wv[i + 1], _mm512_set1_epi32(a[i + 1]));
      }
      const size_t rb = static_cast<size_t>(r0 + r) * nb + b;
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)),
                               _mm512_mul_ps(s, _mm512_set1_ps(p.a->d[rb])), acc[r]);
      if (!w.offsets.empty())
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(p.a->sum[rb]), _mm512_loadu_ps(w.offsets.data() + at), acc[r]);
    }
  }
  const int n0 = g * kTileCols;
  const __mmask16 keep = p.n - n0 >= kTileCols ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (p.n - n0)) - 1);
  for (int r = 0; r < rows; ++r) _mm512_mask_storeu_ps(p.y + static_cast<size_t>(r0 + r) * p.n + n0, keep, acc[r]);
}

#ifndef VNNI_ROWS
#define VNNI_ROWS 1
#endif
constexpr int kVnniRows = VNNI_ROWS;   // passes of at most this many rows skip the tiles

constexpr int kGroupsPerTask = 2;

CONFLAYERS_AMX void run_task_amx(void* data, size_t task) {
  const AmxProblem& p = *static_cast<const AmxProblem*>(data);
  const int g0 = static_cast<int>(task) * kGroupsPerTask;
  const int g1 = g0 + kGroupsPerTask < p.w->groups ? g0 + kGroupsPerTask : p.w->groups;
  if (p.m <= kVnniRows) {
    for (int g = g0; g < g1; ++g) vnni_group(p, g, 0, p.m);
    return;
  }
  int configured = -1;
  for (int r0 = 0; r0 < p.m; r0 += kTileRows) {
    const int rows = p.m - r0 < kTileRows ? p.m - r0 : kTileRows;
    if (rows != configured) amx_configure(rows), configured = rows;
    for (int g = g0; g < g1; ++g) amx_group(p, g, r0, rows);
  }
}

bool amx_usable() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512dq") ||
      !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8"))
    return false;
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;     // Linux asks a process to opt in to AMX state
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
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
                                                int n, int k, int bits) {
  const size_t nb = k / kBlock, code_bytes = static_cast<size_t>(n) * nb * kBlock * bits / 8;
  uint64_t h1 = 0xcbf29ce484222325ULL, h2 = 0x84222325cbf29ce4ULL;
  mix(codes, code_bytes, &h1, &h2);
  mix(scales, static_cast<size_t>(n) * nb * sizeof(float), &h1, &h2);
  if (offsets) mix(offsets, static_cast<size_t>(n) * nb * sizeof(float), &h1, &h2);
  const std::string key = std::to_string(n) + "x" + std::to_string(k) + "x" + std::to_string(bits) + (offsets ? "o" : "") +
                          ":" + std::to_string(h1) + ":" + std::to_string(h2);
  std::lock_guard<std::mutex> hold(g_cache_lock);
  if (auto kept = g_cache[key].lock()) return kept;
  auto made = std::make_shared<TileWeights>();
  repack(codes, scales, offsets, n, k, bits, made.get());
  g_cache[key] = made;
  return made;
}

// ---- the ONNX Runtime kernel ----------------------------------------------------------------------

enum class Offsets { kNone, kFp32, kFp16 };

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
  QMatMulKernel(const OrtApi& api, const OrtKernelInfo* info, Offsets offsets) : api_(api), offsets_(offsets) {
    Ort::ConstKernelInfo ki(info);
    k_ = static_cast<int>(ki.GetAttribute<int64_t>("K"));
    n_ = static_cast<int>(ki.GetAttribute<int64_t>("N"));
    bits_ = static_cast<int>(ki.GetAttribute<int64_t>("bits"));
    const int64_t block = ki.GetAttribute<int64_t>("block_size");
    if (block != kBlock || (bits_ != 4 && bits_ != 8) || k_ % kBlock != 0 || k_ <= 0 || n_ <= 0)
      throw std::runtime_error("conflayers QMatMul: needs blocks of 32, 4 or 8 bits and K a multiple of 32 (got K=" +
                               std::to_string(k_) + " bits=" + std::to_string(bits_) + " block=" + std::to_string(block) + ")");
    int c1 = 0, c2 = 0, c3 = 1;      // constant weights (the compiler's graphs): repacked here, once
    Ort::ConstValue codes = ki.GetTensorConstantInput(1, &c1);
    Ort::ConstValue scales = ki.GetTensorConstantInput(2, &c2);
    Ort::ConstValue off{nullptr};
    if (offsets_ != Offsets::kNone) off = ki.GetTensorConstantInput(3, &c3);
    if (c1 && c2 && c3) weights_ = prepare(codes, scales, off);
  }

  std::shared_ptr<const TileWeights> prepare(Ort::ConstValue codes, Ort::ConstValue scales, Ort::ConstValue off) const {
    const size_t nb = k_ / kBlock;
    if (codes.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(n_) * k_ * bits_ / 8 ||
        scales.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(n_) * nb)
      throw std::runtime_error("conflayers QMatMul: codes or scales do not match K=" + std::to_string(k_) +
                               " and N=" + std::to_string(n_));
    std::vector<float> o;
    if (offsets_ != Offsets::kNone) o = offsets_fp32(off, offsets_, static_cast<size_t>(n_) * nb);
    return tile_weights(codes.GetTensorData<uint8_t>(), scales.GetTensorData<float>(), o.empty() ? nullptr : o.data(),
                        n_, k_, bits_);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    Ort::ConstValue x = ctx.GetInput(0);
    std::vector<int64_t> shape = x.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty() || shape.back() != k_)
      throw std::runtime_error("conflayers QMatMul: x's last dimension must be K=" + std::to_string(k_));
    int64_t m = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) m *= shape[i];
    shape.back() = n_;
    Ort::UnownedValue y = ctx.GetOutput(0, shape);
    if (m == 0) return;
    std::shared_ptr<const TileWeights> w = weights_;
    if (!w) w = prepare(ctx.GetInput(1), ctx.GetInput(2), offsets_ == Offsets::kNone ? Ort::ConstValue{nullptr} : ctx.GetInput(3));
    thread_local PlainRows rows;
    quantize_plain(x.GetTensorData<float>(), static_cast<int>(m), k_, &rows);
    AmxProblem p{&rows, w.get(), y.GetTensorMutableData<float>(), n_, k_, static_cast<int>(m)};
    const size_t tasks = (static_cast<size_t>(w->groups) + kGroupsPerTask - 1) / kGroupsPerTask;
    Ort::ThrowOnError(api_.KernelContext_ParallelFor(context, run_task_amx, tasks, 4, &p));
  }

 private:
  const OrtApi& api_;
  Offsets offsets_;
  int k_ = 0, n_ = 0, bits_ = 0;
  std::shared_ptr<const TileWeights> weights_;
};

struct QMatMulOp : Ort::CustomOpBase<QMatMulOp, QMatMulKernel> {
  explicit QMatMulOp(Offsets offsets) : offsets_(offsets) {}
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new QMatMulKernel(api, info, offsets_); }
  const char* GetName() const {
    return offsets_ == Offsets::kNone ? "QMatMul" : offsets_ == Offsets::kFp32 ? "QMatMulOffsets" : "QMatMulOffsets16";
  }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return offsets_ == Offsets::kNone ? 3 : 4; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    if (i == 3 && offsets_ == Offsets::kFp16) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

 private:
  Offsets offsets_;
};

QMatMulOp g_qmatmul(Offsets::kNone), g_qmatmul_offsets(Offsets::kFp32), g_qmatmul_offsets16(Offsets::kFp16);

}  // namespace

namespace conflayers_kernels {

bool qmatmul_supported() {
  static const bool usable = amx_usable();
  const char* off = std::getenv("CONFLAYERS_AMX");     // "off": the ONNX functions (for A/B measurement)
  return usable && !(off && (std::string(off) == "off" || std::string(off) == "0"));
}

void add_qmatmul_ops(Ort::CustomOpDomain& domain) {
  domain.Add(&g_qmatmul);
  domain.Add(&g_qmatmul_offsets);
  domain.Add(&g_qmatmul_offsets16);
}

}  // namespace conflayers_kernels
