// QMatMul's AVX-512 VNNI engine (qmatmul.h gives the arithmetic every engine follows), for CPUs
// with AVX-512 VNNI and no AMX (AMD Zen 4 and 5, Intel Ice Lake to Sapphire Rapids without the
// tiles' OS permission): VPDPBUSD on the raw codes (0..15, or the 8-bit codes with their sign bit
// flipped) times the activations, less mid x the activations' block sum, gives the exact int32
// block dot products of 16 columns per instruction (64 multiply-adds, against VPMADDUBSW's 32
// plus a VPMADDWD on AVX2), then the common float epilogue. Rows go in chunks of at most 8 with
// every accumulator in a register, the block's unpacked weights shared by the chunk's rows.
// The AMX engine takes its one-row passes from here (vnni_groups).
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "qmatmul.h"

// GCC 12 flags the undefined upper lanes inside its own _mm512_* headers (a known false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace conflayers_kernels {
namespace qmm {
namespace {

#define CONFLAYERS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))

#ifndef VNNI_CHUNK
#define VNNI_CHUNK 8
#endif
constexpr int kChunk = VNNI_CHUNK;   // rows per chunk: 8 accumulators + 8 weight vectors in registers
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 16
#endif
constexpr int kPrefetchBlocks = PREFETCH_BLOCKS;   // codes fetched this many blocks ahead (as AVX2's)

// The 16 columns' values of block `at` (= (group * nb + block) * 16) as fp32.
CONFLAYERS_AVX512 inline __m512 column_values(const ColumnValues& v, size_t at) {
  if (v.half) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v.f16.data() + at)));
  return _mm512_loadu_ps(v.f32.data() + at);
}

constexpr int kSplit = 9;     // split 8-bit codes (qmatmul.h): u = 4 h + low 2 bits, from both planes

constexpr int block_bytes(int bits) { return kCols * kBlock * (bits == kSplit ? 6 : bits) / 8; }

// A block's 512 codes as the unsigned bytes VPDPBUSD multiplies (qmatmul.h's layouts): 4-bit raw
// nibbles; 8-bit with the sign bit flipped (code - 128 + 128); narrow codes (5, 6: planes) the low
// nibbles with the high bits moved to bits 4 (-5); split codes their top 6 bits' planes shifted
// left 2 with the low 2 bits from `lo` (the 8-bit code u itself).
template <int kBits>
CONFLAYERS_AVX512 inline void unpack_block(const int8_t* src, __m512i wv[8], const int8_t* lo = nullptr) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  if (kBits == kSplit) {        // h from its 6-bit planes, then u = (h << 2) | low bits
    unpack_block<6>(src, wv);
    const __m512i three = _mm512_set1_epi8(3);
    const __m512i l0 = _mm512_loadu_si512(lo), l1 = _mm512_loadu_si512(lo + 64);
    for (int i = 0; i < 8; ++i) {
      const __m512i low = _mm512_srli_epi16((i & 1) ? l1 : l0, 2 * (i / 2));
      wv[i] = _mm512_ternarylogic_epi32(_mm512_slli_epi16(wv[i], 2), low, three, 0xF8);   // h < 64: no carry
    }
  } else if (kBits == 8) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int i = 0; i < 8; ++i) wv[i] = _mm512_xor_si512(_mm512_loadu_si512(src + 64 * i), flip);
  } else {
    for (int i = 0; i < 4; ++i) {
      const __m512i v = _mm512_loadu_si512(src + 64 * i);
      wv[i] = _mm512_and_si512(v, mask);
      wv[4 + i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    }
    if (kBits == 4) return;
    const __m512i high = _mm512_set1_epi8(kBits == 6 ? 0x30 : 0x10);
    const __m512i h0 = _mm512_loadu_si512(src + 256);
    const __m512i h1 = kBits == 6 ? _mm512_loadu_si512(src + 320) : h0;
    for (int i = 0; i < 8; ++i) {
      const int shift = kBits == 6 ? 2 * (i / 2) : i;       // the code's bits in its plane byte
      const __m512i h = kBits == 6 && (i & 1) ? h1 : h0;
      const __m512i moved = shift <= 4 ? _mm512_slli_epi16(h, 4 - shift) : _mm512_srli_epi16(h, shift - 4);
      wv[i] = _mm512_ternarylogic_epi32(wv[i], moved, high, 0xF8);     // wv | (moved & high)
    }
  }
}

// Group g (16 columns; its codes from src) against rows r0 .. r0+R-1: per block, the codes
// unpacked once, then per row 8 VPDPBUSD (two chains) and the float sequence of qmatmul.h. The
// rows are block-major (quantize_vnni): a block's rows lie side by side, so every row's
// activations, scale and sums are immediate offsets from one pointer per block (row-major, GCC
// spilled the rows' addresses).
template <int R, int kBits, bool kOffsets>
CONFLAYERS_AVX512 void vnni_chunk(const Problem& p, const int8_t* src, int g, int r0) {
  const TileWeights& w = *p.w;
  const int nb = w.nb, m = p.m, per = block_bytes(kBits), mid = w.mid;
  const int8_t* lo = kBits == kSplit ? w.lo.data() + static_cast<size_t>(g) * nb * 128 : nullptr;
  const int8_t* qb = p.a->q.data() + static_cast<size_t>(r0) * kBlock;
  const float* db = p.a->d.data() + r0;
  const float* sb = p.a->sum.data() + r0;
  const int32_t* qsb = p.a->qsum.data() + r0;
  const size_t qstep = static_cast<size_t>(m) * kBlock;
  size_t at = static_cast<size_t>(g) * nb * kCols;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int b = 0; b < nb; ++b, src += per, qb += qstep, db += m, sb += m, qsb += m, at += kCols) {
    if (PREFETCH_BLOCKS > 0)
      for (int line = 0; line < per; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBlocks * per + line), _MM_HINT_T0);
    __m512i wv[8];
    unpack_block<kBits>(src, wv, lo);
    if (kBits == kSplit) lo += 128;
    const __m512 s = column_values(w.scales, at);
    const __m512 off = kOffsets ? column_values(w.offsets, at) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const int32_t* a = reinterpret_cast<const int32_t*>(qb + r * kBlock);
      __m512i d0 = _mm512_set1_epi32(-mid * qsb[r]), d1 = _mm512_setzero_si512();
      for (int i = 0; i < 8; i += 2) {
        d0 = _mm512_dpbusd_epi32(d0, wv[i], _mm512_set1_epi32(a[i]));   // (VPDPBUSD's embedded
        d1 = _mm512_dpbusd_epi32(d1, wv[i + 1], _mm512_set1_epi32(a[i + 1]));   // broadcast: no faster)
      }
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)),
                               _mm512_mul_ps(s, _mm512_set1_ps(db[r])), acc[r]);
      if (kOffsets) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(sb[r]), off, acc[r]);
    }
  }
  const int n0 = g * kCols;
  const __mmask16 keep = p.n - n0 >= kCols ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (p.n - n0)) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(p.y + static_cast<size_t>(r0 + r) * p.n + n0, keep, acc[r]);
}

template <int kBits, bool kOffsets, int R = kChunk>
CONFLAYERS_AVX512 void vnni_rows(const Problem& p, const int8_t* src, int g, int r0, int rows) {   // 1 <= rows <= kChunk
  if constexpr (R > 1) {
    if (rows < R) return vnni_rows<kBits, kOffsets, R - 1>(p, src, g, r0, rows);
  }
  vnni_chunk<R, kBits, kOffsets>(p, src, g, r0);
}

// Groups [g0, g1) for every row: chunks of at most kChunk rows, as even as they go (9 rows: 4 + 5).
// (Narrow codes unpacked once per group into bytes the chunks share measured 0.4-0.6x the inline
// unpacking at 9-16 rows; each chunk unpacks its own.)
template <int kBits, bool kOffsets>
CONFLAYERS_AVX512 void vnni_groups_of(const Problem& p, int g0, int g1) {
  const int chunks = (p.m + kChunk - 1) / kChunk;
  const size_t per = block_bytes(kBits);
  for (int g = g0; g < g1; ++g)
    for (int c = 0, r0 = 0; c < chunks; ++c) {
      const int rows = (p.m - r0) / (chunks - c);
      vnni_rows<kBits, kOffsets>(p, p.w->codes.data() + g * p.w->nb * per, g, r0, rows);
      r0 += rows;
    }
}

// The activations per row and block, each block's values from the same operations in every row;
// stored row-major (q [m, k], d / sum / qsum [m, nb]: the AMX tiles' layout) or block-major
// (q [nb, m, 32], d / sum / qsum [nb, m]: this engine's). One row is the same in both.
template <bool kBlockMajor>
CONFLAYERS_AVX512 void quantize_rows(const float* x, int m, int k, Rows* out) {
  const int nb = k / kBlock;
  out->resize(m, k, kBlock);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int r = 0; r < m; ++r)
    for (int b = 0; b < nb; ++b) {
      const size_t at = kBlockMajor ? static_cast<size_t>(b) * m + r : static_cast<size_t>(r) * nb + b;
      const float* xb = x + static_cast<size_t>(r) * k + b * kBlock;
      const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      const __m512 scale = _mm512_set1_ps(id);
      // x * (127 / amax), rounded to nearest even (the MXCSR default), within -127..127
      const __m512i q0 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, scale)), lo), hi);
      const __m512i q1 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, scale)), lo), hi);
      int8_t* q = out->q.data() + (kBlockMajor ? at * kBlock : static_cast<size_t>(r) * k + b * kBlock);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(q1));
      out->d[at] = amax / 127.f;
      out->sum[at] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));   // qmatmul.h's block_sum tree under GCC
      out->qsum[at] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

CONFLAYERS_AVX512 void quantize_vnni(const float* x, int m, int k, int /*block: 32*/, Rows* out) {
  quantize_rows<true>(x, m, k, out);
}

}  // namespace

CONFLAYERS_AVX512 void quantize_avx512(const float* x, int m, int k, int /*block: 32*/, Rows* out) {
  quantize_rows<false>(x, m, k, out);
}

CONFLAYERS_AVX512 void vnni_groups(const Problem& p, int g0, int g1) {
  const bool offsets = !p.w->offsets.empty();
  if (p.w->split) return vnni_groups_of<kSplit, false>(p, g0, g1);
  switch (p.w->planes ? p.w->planes : p.w->bits) {
    case 4: return offsets ? vnni_groups_of<4, true>(p, g0, g1) : vnni_groups_of<4, false>(p, g0, g1);
    case 5: return offsets ? vnni_groups_of<5, true>(p, g0, g1) : vnni_groups_of<5, false>(p, g0, g1);
    case 6: return offsets ? vnni_groups_of<6, true>(p, g0, g1) : vnni_groups_of<6, false>(p, g0, g1);
    default: return offsets ? vnni_groups_of<8, true>(p, g0, g1) : vnni_groups_of<8, false>(p, g0, g1);
  }
}

// ---- the screened head (qmatmul.h) ------------------------------------------------------------

constexpr int kScreenChunk = 8;     // rows per chunk: A and B accumulators of 8 rows + 8 weight vectors

// Group g against rows r0 .. r0+R-1: A_c + R_c into y, and max_c (A_c - R_c) into low[r].
template <int R>
CONFLAYERS_AVX512 void screen_chunk(const Screen& sc, int g, int r0, float* low) {
  const Problem& p = sc.problem;
  const TileWeights& w = *p.w;
  const int nb = w.nb, m = p.m, per = block_bytes(6);
  const int8_t* src = w.codes.data() + static_cast<size_t>(g) * nb * per;
  const int8_t* qb = p.a->q.data() + static_cast<size_t>(r0) * kBlock;
  const float* db = p.a->d.data() + r0;
  const int32_t* qsb = p.a->qsum.data() + r0;
  const int32_t* qab = sc.qabs + r0;
  const size_t qstep = static_cast<size_t>(m) * kBlock;
  const __m512 half = _mm512_set1_ps(0.5f);
  size_t at = static_cast<size_t>(g) * nb * kCols;
  __m512 a[R], bnd[R];
  for (int r = 0; r < R; ++r) a[r] = bnd[r] = _mm512_setzero_ps();
  for (int b = 0; b < nb; ++b, src += per, qb += qstep, db += m, qsb += m, qab += m, at += kCols) {
    if (PREFETCH_BLOCKS > 0)
      for (int line = 0; line < per; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBlocks * per + line), _MM_HINT_T0);
    __m512i wv[8];
    unpack_block<6>(src, wv);
    const __m512 s = column_values(w.scales, at);
    const __m512 hs = _mm512_mul_ps(s, half), as = _mm512_abs_ps(s);
    for (int r = 0; r < R; ++r) {
      const int32_t* x = reinterpret_cast<const int32_t*>(qb + r * kBlock);
      __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
      for (int i = 0; i < 8; i += 2) {
        d0 = _mm512_dpbusd_epi32(d0, wv[i], _mm512_set1_epi32(x[i]));
        d1 = _mm512_dpbusd_epi32(d1, wv[i + 1], _mm512_set1_epi32(x[i + 1]));
      }
      const __m512i t2 = _mm512_sub_epi32(_mm512_slli_epi32(_mm512_add_epi32(d0, d1), 3), _mm512_set1_epi32(253 * qsb[r]));
      a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t2), _mm512_mul_ps(hs, _mm512_set1_ps(db[r])), a[r]);
      bnd[r] = _mm512_fmadd_ps(as, _mm512_set1_ps(1.5f * static_cast<float>(qab[r]) * db[r]), bnd[r]);
    }
  }
  const int n0 = g * kCols;
  const __mmask16 keep = p.n - n0 >= kCols ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (p.n - n0)) - 1);
  const __m512 slack = _mm512_set1_ps(1.f + static_cast<float>(nb + 4) * 87.f * 0x1p-22f);
  const __m512 floor = _mm512_set1_ps(static_cast<float>(nb + 4) * 0x1p-126f);      // underflow
  const __m512 none = _mm512_set1_ps(-__builtin_inff());
  for (int r = 0; r < R; ++r) {
    const __m512 radius = _mm512_fmadd_ps(slack, bnd[r], floor);
    _mm512_mask_storeu_ps(p.y + static_cast<size_t>(r0 + r) * p.n + n0, keep, _mm512_add_ps(a[r], radius));
    // NaN lanes (and padding columns) leave the maximum as it was (MAXPS returns its second operand)
    const __m512 l = _mm512_mask_mov_ps(none, keep, _mm512_sub_ps(a[r], radius));
    const float best = _mm512_reduce_max_ps(_mm512_max_ps(l, none));
    low[r] = best > low[r] ? best : low[r];
  }
}

template <int R = kScreenChunk>
CONFLAYERS_AVX512 void screen_rows(const Screen& sc, int g, int r0, int rows, float* low) {
  if constexpr (R > 1) {
    if (rows < R) return screen_rows<R - 1>(sc, g, r0, rows, low);
  }
  screen_chunk<R>(sc, g, r0, low);
}

CONFLAYERS_AVX512 void screen_groups(const Screen& sc, int task, int g0, int g1) {
  const int m = sc.problem.m, chunks = (m + kScreenChunk - 1) / kScreenChunk;
  float* low = sc.low + static_cast<size_t>(task) * m;
  for (int r = 0; r < m; ++r) low[r] = -__builtin_inff();
  for (int g = g0; g < g1; ++g)
    for (int c = 0, r0 = 0; c < chunks; ++c) {      // as even as they go, as vnni_groups_of's
      const int rows = (m - r0) / (chunks - c);
      screen_rows(sc, g, r0, rows, low + r0);
      r0 += rows;
    }
}

CONFLAYERS_AVX512 void exact_groups(const Screen& sc, int g0, int g1) {
  const Problem& p = sc.problem;
  const int per = block_bytes(kSplit);
  const __m512 none = _mm512_set1_ps(-__builtin_inff());
  for (int r = 0; r < p.m; ++r) {
    const float th = sc.threshold[r];
    const bool all = !(std::isfinite(th));
    const __m512 thv = _mm512_set1_ps(th);
    for (int g = g0; g < g1; ++g) {
      const int n0 = g * kCols;
      const __mmask16 keep = p.n - n0 >= kCols ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (p.n - n0)) - 1);
      float* y = p.y + static_cast<size_t>(r) * p.n + n0;
      const __m512 upper = _mm512_maskz_loadu_ps(keep, y);
      if (all || (_mm512_cmp_ps_mask(upper, thv, _CMP_NLT_UQ) & keep))     // A + R >= threshold, or NaN
        vnni_chunk<1, kSplit, false>(p, p.w->codes.data() + static_cast<size_t>(g) * p.w->nb * per, g, r);
      else
        _mm512_mask_storeu_ps(y, keep, none);
    }
  }
}

bool avx512_usable() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

const Engine kAvx512Engine = {"avx512", quantize_vnni, vnni_groups, gate_avx2};

}  // namespace qmm
}  // namespace conflayers_kernels
