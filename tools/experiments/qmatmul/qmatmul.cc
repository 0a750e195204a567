// EXPERIMENT (issue #21), not used by the runtime: measured no faster than MatMulNBits on the
// development VM (see README.md here). Kept with its bench so the lever can be re-measured.
//
// conflayers' block-quantized matmul: an ONNX Runtime custom-op library (domain "conflayers").
//
//   QMatMul(x, codes, scales)                    y = x @ W,  W[k, n] = scales[n, b] * (q[n, k] - mid)
//   QMatMulOffsets(x, codes, scales, offsets)    ... + offsets[b, n]                       (b = k / 32)
//
// The inputs are MatMulNBits' (4- or 8-bit codes, blocks of 32, fp32 scales) plus the per-block
// offsets of Q4_1 and the K-quants. The graph carries each node together with an ONNX function
// that computes the same product from MatMulNBits, so a session without this library still runs.
//
// Why a kernel of our own (issue #21): MatMulNBits has no fast path for offsets, and it unpacks
// the 4-bit codes again for every pair of rows, so a 9-token verify costs 2.3x a one-token step.
// Here each block of codes is unpacked once per column and multiplied into up to 4 rows.
//
// Exactness by construction: every output element y[m, n] is computed by the same sequence of
// operations whatever the number of rows M, the row's place in its chunk, the column tiling or
// the thread that runs it: rows never share a rounding. So a one-token step and a k-token verify
// give bit-identical rows on every CPU (bench.py checks it on the CPU it runs on).
//
// Activations are quantized per block of 32 to int8 (scale max|x| / 127, round to nearest even),
// as llama.cpp's Q8 activations and MatMulNBits' accuracy level 4. The dot product runs on the
// unsigned codes; the midpoint comes off with the quantized block sum (centered, as MatMulNBits'
// error) and the offsets come in with the fp32 block sum.
#define ORT_API_MANUAL_INIT   // the API table comes from the ONNX Runtime that loads us
#include <onnxruntime_cxx_api.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr int kBlock = 32;
#ifndef KR                      // tile shape: -DKR=.. -DKC=.. to sweep it (bench.py --tiles)
#define KR 4
#endif
#ifndef KC
#define KC 2
#endif
constexpr int kRows = KR;        // rows of a tile: each unpacked block of codes serves them all
constexpr int kCols = KC;        // columns of a tile: each loaded block of activations serves them all
constexpr int kColsPerTask = 32;

enum class Path { kAvx512Vnni, kAvx2 };

Path g_path = Path::kAvx2;

// ---- activation quantization (per row, identical for every row) --------------------------------

// Two layouts of the int8 activations, one per kernel family:
//  - per block (AVX2): a block's 32 codes, for 4 bits even k first, then odd k (the nibbles'
//    order); d and corr: 8 lanes per block;
//  - per group of 4 blocks (AVX-512): 128 bytes, the half of each block that meets the first
//    512-bit code vector (4 bits: even k; 8 bits: k < 16), then the other halves; d and corr:
//    4 lanes per block. Groups are padded with zeros to whole groups.
struct QuantizedRows {
  int stride = 0;               // int8 codes per row (K, or whole groups)
  int lanes = 8;                // d / corr lanes per block
  std::vector<int8_t> q;        // [m, stride]
  std::vector<float> d;         // [m, blocks, lanes] the block's activation scale in each lane
  std::vector<int32_t> corr;    // [m, blocks, lanes] -mid * (sum of the block's int8 codes) in lane 0
  std::vector<float> sum;       // [m, nb] fp32 sum of the block (what the offsets multiply)
};

constexpr int kGroup = 4;       // blocks per AVX-512 step

// Where element j of block b goes in a row of int8 codes.
inline int code_slot(int b, int j, int bits, bool grouped) {
  const int half = bits == 4 ? j % 2 : j / 16, pos = bits == 4 ? j / 2 : j % 16;
  if (!grouped) return b * kBlock + half * 16 + pos;
  return (b / kGroup) * kGroup * kBlock + half * 64 + (b % kGroup) * 16 + pos;
}

// `mid`: the codes' midpoint the integer dot product must take off (0 where it is centered).
void quantize_rows(const float* x, int m, int k, int bits, int mid, bool grouped, QuantizedRows* out) {
  const int nb = k / kBlock;
  const int blocks = grouped ? (nb + kGroup - 1) / kGroup * kGroup : nb;
  out->stride = blocks * kBlock;
  out->lanes = grouped ? 4 : 8;
  out->q.assign(static_cast<size_t>(m) * out->stride, 0);
  out->d.assign(static_cast<size_t>(m) * blocks * out->lanes, 0.f);
  out->corr.assign(static_cast<size_t>(m) * blocks * out->lanes, 0);
  out->sum.resize(static_cast<size_t>(m) * nb);
  for (int r = 0; r < m; ++r) {
    int8_t* qr = out->q.data() + static_cast<size_t>(r) * out->stride;
    for (int b = 0; b < nb; ++b) {
      const float* xb = x + static_cast<size_t>(r) * k + b * kBlock;
      float amax = 0.f, s = 0.f;
      for (int j = 0; j < kBlock; ++j) {
        amax = std::fmax(amax, std::fabs(xb[j]));
        s += xb[j];
      }
      const float d = amax / 127.f;
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      int qs = 0;
      for (int j = 0; j < kBlock; ++j) {
        int v = static_cast<int>(std::nearbyint(xb[j] * id));
        v = v < -127 ? -127 : (v > 127 ? 127 : v);
        qr[code_slot(b, j, bits, grouped)] = static_cast<int8_t>(v);
        qs += v;
      }
      const size_t lane0 = (static_cast<size_t>(r) * blocks + b) * out->lanes;
      for (int l = 0; l < out->lanes; ++l) out->d[lane0 + l] = d;
      out->corr[lane0] = -mid * qs;
      out->sum[static_cast<size_t>(r) * nb + b] = s;
    }
  }
}

// ---- the column kernels -------------------------------------------------------------------------
// One column n of W against rows r0 .. r0+R-1: per block, the integer dot product of the codes
// and the int8 activations (less mid * their sum, exact), times scale * activation scale, summed
// in 8 lanes per block. The offsets' term is added after, per tile (`add_offsets`).

struct Problem {
  const QuantizedRows* a;
  const uint8_t* codes;         // [N, nb, 32 * bits / 8]
  const float* scales;          // [N, nb]
  const float* offsets;         // [N, nb] (the kernel's transposed copy) or null
  float* y;                     // [M, N]
  int n, k, bits, m;
};

__attribute__((target("avx2,fma")))
inline __m256i expand_block_avx2(const uint8_t* c, int bits) {
  if (bits == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}

#define CONFLAYERS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma")))

// A group of 4 blocks of one column's codes as two vectors of 64 unsigned codes: the halves of
// each block that meet the first and the second half of the grouped activations. `blocks` < 4
// in a last, partial group (nothing past the column is read).
struct CodePair {
  __m512i w0, w1;
};

CONFLAYERS_AVX512 inline CodePair expand_group(const uint8_t* c, int bits, int blocks) {
  if (bits == 4) {            // 16 bytes a block: low nibbles = even k, high nibbles = odd k
    const __m512i raw = _mm512_maskz_loadu_epi8(blocks == 4 ? ~0ULL : (1ULL << (blocks * 16)) - 1, c);
    const __m512i mask = _mm512_set1_epi8(0x0F);
    return {_mm512_and_si512(raw, mask), _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask)};
  }
  // 8 bits, 32 bytes a block: the first 16 codes of the 4 blocks, then the last 16
  const __m512i a = _mm512_maskz_loadu_epi8(blocks >= 2 ? ~0ULL : (1ULL << (blocks * 32)) - 1, c);
  const __m512i b = blocks <= 2 ? _mm512_setzero_si512()
                                : _mm512_maskz_loadu_epi8(blocks == 4 ? ~0ULL : (1ULL << ((blocks - 2) * 32)) - 1, c + 64);
  return {_mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(3, 1, 3, 1))};
}

template <int R, int C>
CONFLAYERS_AVX512 void tile_avx512(const Problem& p, int n0, int r0) {
  const int nb = p.k / kBlock, bytes = kBlock * p.bits / 8;
  const QuantizedRows& a = *p.a;
  const int groups = (nb + kGroup - 1) / kGroup;
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  for (int g = 0; g < groups; ++g) {      // lanes 4t .. 4t+3: block 4g + t
    const int b = g * kGroup, blocks = nb - b < kGroup ? nb - b : kGroup;
    CodePair w[C];
    __m512 s[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const size_t nbk = static_cast<size_t>(n0 + c) * nb + b;
      w[c] = expand_group(p.codes + nbk * bytes, p.bits, blocks);
      s[c] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_maskz_loadu_ps((1 << blocks) - 1, p.scales + nbk)));
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const size_t row = static_cast<size_t>(r0 + r);
      const int8_t* q = a.q.data() + row * a.stride + static_cast<size_t>(g) * kGroup * kBlock;
      const size_t lane0 = (row * groups + g) * kGroup * 4;
      const __m512i q0 = _mm512_loadu_si512(q), q1 = _mm512_loadu_si512(q + 64);
      const __m512i corr = _mm512_loadu_si512(a.corr.data() + lane0);
      const __m512 d = _mm512_loadu_ps(a.d.data() + lane0);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(corr, w[c].w0, q0), w[c].w1, q1);
        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s[c], d), acc[r][c]);
      }
    }
  }
  if (p.offsets) {                        // + offsets[n, b] * fp32 block sum, 16 blocks a step
    for (int j = 0; j < nb; j += 16) {
      const __mmask16 m = nb - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (nb - j)) - 1);
      for (int r = 0; r < R; ++r) {
        const __m512 sums = _mm512_maskz_loadu_ps(m, a.sum.data() + static_cast<size_t>(r0 + r) * nb + j);
        for (int c = 0; c < C; ++c)
          acc[r][c] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, p.offsets + static_cast<size_t>(n0 + c) * nb + j), sums, acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) p.y[static_cast<size_t>(r0 + r) * p.n + n0 + c] = _mm512_reduce_add_ps(acc[r][c]);
}

__attribute__((target("avx2,fma")))
inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

template <int R, int C>
__attribute__((target("avx2,fma")))
void tile_avx2(const Problem& p, int n0, int r0) {
  const int nb = p.k / kBlock, bytes = kBlock * p.bits / 8;
  const QuantizedRows& a = *p.a;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i sign_flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int b = 0; b < nb; ++b) {
    __m256i w[C];
    __m256 s[C];
    for (int c = 0; c < C; ++c) {
      const size_t nbk = static_cast<size_t>(n0 + c) * nb + b;
      w[c] = expand_block_avx2(p.codes + nbk * bytes, p.bits);
      if (p.bits == 8) w[c] = _mm256_xor_si256(w[c], sign_flip);   // codes - 128 as int8: a centered dot
      s[c] = _mm256_set1_ps(p.scales[nbk]);
    }
    for (int r = 0; r < R; ++r) {
      const size_t rb = static_cast<size_t>(r0 + r) * nb + b;
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + rb * kBlock));
      const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.corr.data() + rb * 8));
      const __m256 d = _mm256_loadu_ps(a.d.data() + rb * 8);
      for (int c = 0; c < C; ++c) {
        // 8 bits: |w| * (q * sign(w)), as maddubs needs an unsigned first operand (no saturation:
        // pairs stay within 2 * 128 * 127); 4 bits: the codes 0..15 are that operand already
        const __m256i pairs = p.bits == 8 ? _mm256_maddubs_epi16(_mm256_sign_epi8(w[c], w[c]), _mm256_sign_epi8(q, w[c]))
                                          : _mm256_maddubs_epi16(w[c], q);
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(pairs, ones), corr);
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s[c], d), acc[r][c]);
      }
    }
  }
  float tail[R][C] = {};
  if (p.offsets) {                        // + offsets[n, b] * fp32 block sum, 8 blocks a step
    int j = 0;
    for (; j + 8 <= nb; j += 8)
      for (int r = 0; r < R; ++r) {
        const __m256 sums = _mm256_loadu_ps(a.sum.data() + static_cast<size_t>(r0 + r) * nb + j);
        for (int c = 0; c < C; ++c)
          acc[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(p.offsets + static_cast<size_t>(n0 + c) * nb + j), sums, acc[r][c]);
      }
    for (; j < nb; ++j)
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c)
          tail[r][c] = std::fma(p.offsets[static_cast<size_t>(n0 + c) * nb + j], a.sum[static_cast<size_t>(r0 + r) * nb + j], tail[r][c]);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) p.y[static_cast<size_t>(r0 + r) * p.n + n0 + c] = hsum256(acc[r][c]) + tail[r][c];
}

// Tiles of R rows x C columns: each block of codes is unpacked once per R rows, each block of
// activations loaded once per C columns. Every element sees the same operations in any tile.
template <int R, int C>
void tile(const Problem& p, int n0, int r0) {
  if (g_path == Path::kAvx512Vnni) tile_avx512<R, C>(p, n0, r0);
  else tile_avx2<R, C>(p, n0, r0);
}

template <int C>
void tile_rows(const Problem& p, int n0, int r0, int rows) {
  switch (rows) {
    case 1: tile<1, C>(p, n0, r0); break;
    case 2: tile<2, C>(p, n0, r0); break;
    case 3: if constexpr (kRows >= 3) tile<3, C>(p, n0, r0); break;
    default: if constexpr (kRows >= 4) tile<4, C>(p, n0, r0); break;
  }
}

// One task: a tile of columns against every row, rows in chunks of kRows (the tile's codes stay
// in cache from one chunk to the next).
void run_task(void* data, size_t task) {
  const Problem& p = *static_cast<const Problem*>(data);
  const int n0 = static_cast<int>(task) * kColsPerTask;
  const int n1 = n0 + kColsPerTask < p.n ? n0 + kColsPerTask : p.n;
  for (int r0 = 0; r0 < p.m; r0 += kRows) {
    const int rows = p.m - r0 < kRows ? p.m - r0 : kRows;
    int n = n0;
    if (p.bits == 4)          // 8-bit codes measured slower in tiles of several columns
      for (; n + kCols <= n1; n += kCols) tile_rows<kCols>(p, n, r0, rows);
    for (; n < n1; ++n) tile_rows<1>(p, n, r0, rows);
  }
}

// ---- the ONNX Runtime kernel ----------------------------------------------------------------------

struct QMatMulKernel {
  QMatMulKernel(const OrtApi& api, const OrtKernelInfo* info, bool with_offsets)
      : api_(api), with_offsets_(with_offsets) {
    Ort::ConstKernelInfo ki(info);
    k_ = static_cast<int>(ki.GetAttribute<int64_t>("K"));
    n_ = static_cast<int>(ki.GetAttribute<int64_t>("N"));
    bits_ = static_cast<int>(ki.GetAttribute<int64_t>("bits"));
    const int64_t block = ki.GetAttribute<int64_t>("block_size");
    if (block != kBlock || (bits_ != 4 && bits_ != 8) || k_ % kBlock != 0 || k_ <= 0 || n_ <= 0)
      throw std::runtime_error("conflayers QMatMul: needs blocks of 32, 4 or 8 bits and K a multiple of 32 (got K=" +
                               std::to_string(k_) + " bits=" + std::to_string(bits_) + " block=" + std::to_string(block) + ")");
    // The graph stores offsets [nb, N] for its fallback MatMul; the tiles read them per column.
    // A transposed copy, made once: read in the graph's layout they cost a cache miss a block.
    if (with_offsets_) {
      int is_const = 0;
      Ort::ConstValue off = ki.GetTensorConstantInput(3, &is_const);
      if (is_const) transpose(off, &offsets_t_);
    }
  }

  void transpose(Ort::ConstValue off, std::vector<float>* out) const {
    const int nb = k_ / kBlock;
    if (off.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(n_) * nb)
      throw std::runtime_error("conflayers QMatMulOffsets: offsets must hold K/32 x N values");
    const float* o = off.GetTensorData<float>();
    out->resize(static_cast<size_t>(n_) * nb);
    for (int b = 0; b < nb; ++b)
      for (int n = 0; n < n_; ++n) (*out)[static_cast<size_t>(n) * nb + b] = o[static_cast<size_t>(b) * n_ + n];
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    Ort::ConstValue x = ctx.GetInput(0);
    Ort::ConstValue codes = ctx.GetInput(1);
    Ort::ConstValue scales = ctx.GetInput(2);
    std::vector<int64_t> shape = x.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty() || shape.back() != k_)
      throw std::runtime_error("conflayers QMatMul: x's last dimension must be K=" + std::to_string(k_));
    const size_t expect_codes = static_cast<size_t>(n_) * k_ * bits_ / 8;
    if (codes.GetTensorTypeAndShapeInfo().GetElementCount() != expect_codes ||
        scales.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(n_) * (k_ / kBlock))
      throw std::runtime_error("conflayers QMatMul: codes or scales do not match K and N");
    int64_t m = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) m *= shape[i];
    shape.back() = n_;
    Ort::UnownedValue y = ctx.GetOutput(0, shape);
    if (m == 0) return;

    // the AVX2 kernel's 8-bit dot product is centered already (codes - 128 as int8)
    const int mid = bits_ == 8 && g_path == Path::kAvx2 ? 0 : 1 << (bits_ - 1);
    const float* offsets = nullptr;
    std::vector<float> computed;     // offsets that are not an initializer: transposed per call
    if (with_offsets_) {
      if (offsets_t_.empty()) transpose(ctx.GetInput(3), &computed);
      offsets = offsets_t_.empty() ? computed.data() : offsets_t_.data();
    }
    thread_local QuantizedRows rows;
    quantize_rows(x.GetTensorData<float>(), static_cast<int>(m), k_, bits_, mid, g_path == Path::kAvx512Vnni, &rows);
    Problem p{&rows, codes.GetTensorData<uint8_t>(), scales.GetTensorData<float>(), offsets,
              y.GetTensorMutableData<float>(), n_, k_, bits_, static_cast<int>(m)};
    const size_t tasks = (static_cast<size_t>(n_) + kColsPerTask - 1) / kColsPerTask;
    Ort::ThrowOnError(api_.KernelContext_ParallelFor(context, run_task, tasks, 4, &p));
  }

 private:
  const OrtApi& api_;
  bool with_offsets_;
  int k_ = 0, n_ = 0, bits_ = 0;
  std::vector<float> offsets_t_;  // [N, nb]
};

struct QMatMulOp : Ort::CustomOpBase<QMatMulOp, QMatMulKernel> {
  explicit QMatMulOp(bool with_offsets) : with_offsets_(with_offsets) {}
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const {
    return new QMatMulKernel(api, info, with_offsets_);
  }
  const char* GetName() const { return with_offsets_ ? "QMatMulOffsets" : "QMatMul"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return with_offsets_ ? 4 : 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

 private:
  bool with_offsets_;
};

QMatMulOp g_plain(false), g_offsets(true);
std::mutex g_lock;
std::vector<Ort::CustomOpDomain> g_domains;    // kept alive for every session that registered them

bool choose_path() {
  const char* force = std::getenv("CONFLAYERS_QMATMUL_PATH");     // "avx2": test the AVX2 kernels here
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                      __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && !(force && std::string(force) == "avx2")) g_path = Path::kAvx512Vnni;
  else if (avx2) g_path = Path::kAvx2;
  else return false;
  return true;
}

}  // namespace

extern "C" {

// Which kernels this library runs on this CPU: "avx512vnni", "avx2" or "none" (then it registers
// nothing and the graph's ONNX functions run instead).
const char* conflayers_qmatmul_path() {
  if (!choose_path()) return "none";
  return g_path == Path::kAvx512Vnni ? "avx512vnni" : "avx2";
}

OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;        // an older ONNX Runtime: the ONNX functions run
  Ort::InitApi(api);
  if (!choose_path()) return nullptr;
  try {
    std::lock_guard<std::mutex> hold(g_lock);
    Ort::CustomOpDomain domain("conflayers");
    domain.Add(&g_plain);
    domain.Add(&g_offsets);
    Ort::UnownedSessionOptions(options).Add(domain);
    g_domains.push_back(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
