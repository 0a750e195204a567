// The GGUF offsets' term, one op of conflayers' CPU kernel library (domain "conflayers"; built by
// tools/build_kernels.sh, which setup.sh runs, registered by the runtime in CPU sessions:
// library.cc; qmatmul.cc holds the AMX matrix product):
//
//   AddBlockOffsets(y [.., N], x [.., K], offsets [K/32, N] fp32) -> y + blocksums(x) @ offsets
//   AddBlockOffsets16(...)  the same with fp16 offsets (stored so where every value is exact)
//
// The GGUF formats with a per-block minimum (Q4_1, Q5_1, the K-quants) give w = d*q + m. The
// graph computes the d*q part with MatMulNBits' fast zero-point-free kernel and adds
// sum_b (sum of x over block b) * offsets[b, n] after. As plain ONNX that term is four nodes
// (Reshape, ReduceSum, MatMul, Add) per matrix; the graph carries this op together with an ONNX
// function of exactly those nodes, so a session without the library runs the same graph.
// Constant fp16 offsets are copied at load into tiles of 64 columns ([n/64][nb][64]), so a tile
// reads one sequential run instead of nb strided ones (measured: 0.90x vs 0.925x of the plain
// graph's step; fp32 offsets gain nothing from it and are read in place: no second copy);
// -DNO_TILE: read fp16 offsets in place too;
// -DPARALLEL_WORK=N: multiply-adds from which columns go to the threads.
//
// Exactness by construction: every output element is y + a fixed sequence of FMAs over the
// blocks in order, whatever the number of rows, their grouping or the thread: a one-token step
// and a k-token verify give bit-identical rows on every CPU this library registers on (AVX2+FMA).
// It is not bit-identical to the ONNX fallback (another summation order); a session runs one or
// the other for all its passes.
#define ORT_API_MANUAL_INIT   // the API table comes from the ONNX Runtime that loads us
#include <onnxruntime_cxx_api.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

constexpr int kBlock = 32;       // GGUF's block (and K-quant sub-block) size
constexpr int kRowTile = 4;      // rows updated together: each loaded offset vector serves them all
constexpr int kColChunk = 128;   // columns per parallel task (a multiple of every tile's width)
// Multiply-adds from which the columns are split over the intra-op threads. Below it (every
// decode and verify pass) one thread is faster: waking the pool costs more than it saves
// (tools/experiments/block_offsets: 1-9 rows at 2^13 vs never, 2-core AVX2 VM).
#ifndef PARALLEL_WORK
#define PARALLEL_WORK (1 << 20)
#endif
constexpr int64_t kParallelWork = PARALLEL_WORK;

#define TARGET __attribute__((target("avx2,fma,f16c")))

// Offsets as stored: fp32, or fp16 where every offset of the matrix is exact in it (the compiler
// checks; most Q4_1 matrices' m + 8d, every Q5_1 minimum): half the bytes to read.
TARGET inline __m256 load8(const float* o) { return _mm256_loadu_ps(o); }
TARGET inline __m256 load8(const uint16_t* o) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(o))); }
TARGET inline float load1(const float* o) { return *o; }
TARGET inline float load1(const uint16_t* o) { return _cvtsh_ss(*o); }

// Sum of each block of 32 of x, in a fixed order (8 lanes, then the lanes pairwise).
TARGET void block_sums(const float* x, int nb, float* s) {
  for (int b = 0; b < nb; ++b) {
    const float* p = x + static_cast<int64_t>(b) * kBlock;
    __m256 a = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                             _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24)));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s[b] = _mm_cvtss_f32(h);
  }
}

template <typename T>
struct Problem {
  const float* y;
  const float* sums;      // [rows, nb]
  const T* offsets;       // [nb, n]
  const T* tiled;         // the columns below full_cols, as [n / 64][nb][64] (sequential reads), or null
  int full_cols;
  float* out;
  int64_t rows;
  int nb, n, chunks;      // chunks: column chunks per row tile
};

// A tile of R rows x C vectors of 8 columns from column c: acc = y, then acc = fma(s[b], off[b], acc)
// for b = 0..nb-1. R*C independent FMA chains hide the FMA latency (one chain is latency-bound).
template <int R, int C, typename T>
TARGET inline void tile(const Problem<T>& p, int64_t r, int c) {
  const int nb = p.nb, n = p.n;
  const float* sums = p.sums + r * nb;
  __m256 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) acc[i][j] = _mm256_loadu_ps(p.y + (r + i) * n + c + 8 * j);
  const bool tiled = p.tiled && c < p.full_cols;
  const T* base = tiled ? p.tiled + static_cast<int64_t>(c / 64) * nb * 64 + c % 64 : p.offsets + c;
  const int64_t stride = tiled ? 64 : n;
  for (int b = 0; b < nb; ++b) {
    const T* o = base + b * stride;
    for (int i = 0; i < R; ++i) {
      const __m256 s = _mm256_set1_ps(sums[i * nb + b]);
      for (int j = 0; j < C; ++j) acc[i][j] = _mm256_fmadd_ps(s, load8(o + 8 * j), acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) _mm256_storeu_ps(p.out + (r + i) * n + c + 8 * j, acc[i][j]);
}

// R rows from r, columns [c0, c1): wide tiles, single vectors, then a scalar tail (std::fma: the
// same single rounding as the vector FMA).
template <int R, typename T>
TARGET void rows_of(const Problem<T>& p, int64_t r, int c0, int c1) {
  constexpr int C = R == 1 ? 8 : R == 2 ? 4 : 2;       // R * C <= 8 accumulators + loads in 16 ymm
  const int n = p.n, nb = p.nb;
  const float* sums = p.sums + r * nb;
  int c = c0;
  for (; c + 8 * C <= c1; c += 8 * C) tile<R, C, T>(p, r, c);
  for (; c + 8 <= c1; c += 8) tile<R, 1, T>(p, r, c);
  for (; c < c1; ++c)
    for (int i = 0; i < R; ++i) {
      float acc = p.y[(r + i) * n + c];
      for (int b = 0; b < nb; ++b) acc = std::fma(sums[i * nb + b], load1(p.offsets + static_cast<int64_t>(b) * n + c), acc);
      p.out[(r + i) * n + c] = acc;
    }
}

// Task t: row tile t / chunks, column chunk t % chunks. Every element gets the same operations in
// the same order whatever tile, chunk or thread it falls in: rows never share a rounding.
template <typename T>
void run_task(void* data, size_t task) {
  const Problem<T>& p = *static_cast<const Problem<T>*>(data);
  const int64_t r = static_cast<int64_t>(task / p.chunks) * kRowTile;
  const int c0 = static_cast<int>(task % p.chunks) * kColChunk, c1 = std::min(p.n, c0 + kColChunk);
  switch (std::min<int64_t>(kRowTile, p.rows - r)) {
    case 1: rows_of<1, T>(p, r, c0, c1); break;
    case 2: rows_of<2, T>(p, r, c0, c1); break;
    case 3: rows_of<3, T>(p, r, c0, c1); break;
    default: rows_of<4, T>(p, r, c0, c1); break;
  }
}

int64_t elements(const Ort::ConstValue& v) {
  return static_cast<int64_t>(v.GetTensorTypeAndShapeInfo().GetElementCount());
}

struct AddBlockOffsetsKernel {
  AddBlockOffsetsKernel(const OrtApi& api, const OrtKernelInfo* info, bool half) : api_(api), half_(half) {
#ifndef NO_TILE
    int is_const = 0;
    Ort::ConstValue off = Ort::ConstKernelInfo(info).GetTensorConstantInput(2, &is_const);
    if (is_const && half) {      // fp32 offsets gain nothing from a copy (measured): read in place
      const std::vector<int64_t> shape = off.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.size() == 2) {
        const int64_t nb = shape[0], n = shape[1];
        full_cols_ = static_cast<int>(n / 64 * 64);
        tiled_.resize(static_cast<size_t>(nb) * full_cols_);
        const uint16_t* src = off.GetTensorData<uint16_t>();
        for (int64_t t = 0; t < full_cols_ / 64; ++t)
          for (int64_t b = 0; b < nb; ++b)
            std::memcpy(&tiled_[(t * nb + b) * 64], src + b * n + t * 64, 64 * sizeof(uint16_t));
      }
    }
#else
    (void)info;
#endif
  }
  std::vector<uint16_t> tiled_;   // fp16 offsets of the first full_cols_ columns, [n/64][nb][64]
  int full_cols_ = 0;

  void run(OrtKernelContext* context, void (*fn)(void*, size_t), void* p, size_t tasks, bool parallel) {
    if (!parallel) {
      for (size_t t = 0; t < tasks; ++t) fn(p, t);
    } else {
      Ort::ThrowOnError(api_.KernelContext_ParallelFor(context, fn, tasks, 0, p));
    }
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    Ort::ConstValue y = ctx.GetInput(0), x = ctx.GetInput(1), off = ctx.GetInput(2);
    const std::vector<int64_t> yshape = y.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> xshape = x.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> oshape = off.GetTensorTypeAndShapeInfo().GetShape();
    if (xshape.empty() || yshape.empty() || oshape.size() != 2)
      throw std::runtime_error("conflayers AddBlockOffsets: needs y [.., N], x [.., K], offsets [K/32, N]");
    const int64_t k = xshape.back(), n = yshape.back(), nb = oshape[0];
    if (k % kBlock != 0 || nb != k / kBlock || oshape[1] != n)
      throw std::runtime_error("conflayers AddBlockOffsets: offsets must be [K/32, N] = [" + std::to_string(k / kBlock) +
                               ", " + std::to_string(n) + "], got [" + std::to_string(oshape[0]) + ", " +
                               std::to_string(oshape[1]) + "]");
    const int64_t rows = k ? elements(x) / k : 0;
    if (rows * n != elements(y))
      throw std::runtime_error("conflayers AddBlockOffsets: x and y hold different numbers of rows");
    Ort::UnownedValue out = ctx.GetOutput(0, yshape);
    if (rows == 0) return;
    const float* xd = x.GetTensorData<float>();
    thread_local std::vector<float> sums_;   // per calling thread: Run may be called concurrently
    sums_.resize(static_cast<size_t>(rows * nb));
    for (int64_t r = 0; r < rows; ++r) block_sums(xd + r * k, static_cast<int>(nb), &sums_[r * nb]);
    const int chunks = static_cast<int>((n + kColChunk - 1) / kColChunk);
    const size_t tasks = static_cast<size_t>((rows + kRowTile - 1) / kRowTile) * chunks;
    const bool parallel = tasks > 1 && rows * nb * n >= kParallelWork;
    if (half_) {
      Problem<uint16_t> p{y.GetTensorData<float>(), sums_.data(), off.GetTensorData<uint16_t>(), tiled_.empty() ? nullptr : tiled_.data(), full_cols_,
                          out.GetTensorMutableData<float>(), rows, static_cast<int>(nb), static_cast<int>(n), chunks};
      run(context, run_task<uint16_t>, &p, tasks, parallel);
    } else {
      Problem<float> p{y.GetTensorData<float>(), sums_.data(), off.GetTensorData<float>(), nullptr, 0,
                       out.GetTensorMutableData<float>(), rows, static_cast<int>(nb), static_cast<int>(n), chunks};
      run(context, run_task<float>, &p, tasks, parallel);
    }
  }

 private:
  const OrtApi& api_;
  bool half_;     // fp16 offsets
};

// AddBlockOffsets (fp32 offsets) and AddBlockOffsets16 (fp16 offsets): the same kernel.
struct AddBlockOffsetsOp : Ort::CustomOpBase<AddBlockOffsetsOp, AddBlockOffsetsKernel> {
  explicit AddBlockOffsetsOp(bool half) : half_(half) {}
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new AddBlockOffsetsKernel(api, info, half_); }
  const char* GetName() const { return half_ ? "AddBlockOffsets16" : "AddBlockOffsets"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 2 && half_ ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

 private:
  bool half_;
};

AddBlockOffsetsOp g_add_block_offsets(false), g_add_block_offsets16(true);

}  // namespace

namespace conflayers_kernels {

bool block_offsets_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

void add_block_offsets_ops(Ort::CustomOpDomain& domain) {
  domain.Add(&g_add_block_offsets);
  domain.Add(&g_add_block_offsets16);
}

}  // namespace conflayers_kernels
