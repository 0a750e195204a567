// QMatMul's AVX2 engine (qmatmul.h gives the arithmetic every engine follows), for CPUs without
// AMX: among them AVX2-only ones, where MatMulNBits computes a one-row pass with another kernel
// than a pass of 2+ rows, so that its one-token steps and verify passes differ in the last bits.
// Here every row takes the same code whatever the pass: the exact int32 block dot products from
// VPMADDUBSW + VPMADDWD (llama.cpp's AVX2 way), then the common float epilogue, 8 columns a vector.
// 4-bit passes of 2+ rows take tiles of 8 columns x up to 4 rows with every accumulator in a
// register (the 16-column tiles spilled half of theirs: on the AVX2 EPYC the 8-column tiles take
// 0.75-0.9x the time at 2-4 rows and 0.92-0.95x at 8-16, SmolLM2's shapes,
// tools/experiments/qmatmul/rows.cc); one-row passes and 8-bit ones keep 16-column tiles.
#include <immintrin.h>

#include <cstdint>

#include "qmatmul.h"

namespace conflayers_kernels {
namespace qmm {
namespace {

#define CONFLAYERS_AVX2 __attribute__((target("avx2,fma,f16c")))

// 8 columns' values from `at` (= (group * nb + block) * 16, + 8 for the upper half) as fp32.
CONFLAYERS_AVX2 inline __m256 column_values8(const ColumnValues& v, size_t at) {
  if (v.half) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v.f16.data() + at)));
  return _mm256_loadu_ps(v.f32.data() + at);
}

CONFLAYERS_AVX2 inline float max8(__m256 v) {      // exact in any order
  __m128 m = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

CONFLAYERS_AVX2 inline int32_t sum8i(__m256i v) {  // exact in any order
  __m128i s = _mm_add_epi32(_mm256_extracti128_si256(v, 1), _mm256_castsi256_si128(v));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}

// Rows in this engine's layout: block-major, q [nb, m, block] and d, sum, qsum [nb, m], so that a
// tile's rows of a block are at fixed offsets from one pointer.
CONFLAYERS_AVX2 void quantize_avx2(const float* x, int m, int k, int block, Rows* out) {
  const int nb = k / block, vectors = block / 8;
  out->resize(m, k, block);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);     // undoes the packs' lane interleave
  for (int r = 0; r < m; ++r)
    for (int b = 0; b < nb; ++b) {
      const size_t at = static_cast<size_t>(b) * m + r;     // block-major: a block's rows side by side
      const float* xb = x + static_cast<size_t>(r) * k + b * block;
      __m256 v[4], a[4];
      for (int i = 0; i < vectors; ++i) v[i] = _mm256_loadu_ps(xb + 8 * i), a[i] = _mm256_andnot_ps(sign, v[i]);
      const __m256 a01 = _mm256_max_ps(a[0], a[1]);
      const float amax = max8(vectors == 4 ? _mm256_max_ps(a01, _mm256_max_ps(a[2], a[3])) : a01);
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      const __m256 scale = _mm256_set1_ps(id);
      __m256i q[4];     // x * (127 / amax), rounded to nearest even (the MXCSR default), within -127..127
      for (int i = 0; i < vectors; ++i)
        q[i] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], scale)), lo), hi);
      int8_t* qb = out->q.data() + at * block;
      const __m256i p01 = _mm256_packs_epi32(q[0], q[1]);
      if (vectors == 4) {
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, _mm256_packs_epi32(q[2], q[3])), order);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), bytes);
      } else {
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p01), order);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm256_castsi256_si128(bytes));
      }
      out->d[at] = amax / 127.f;
      // block_sum's tree: (i, i+16) for blocks of 32, (i+8, i), (i+4, i), then (0 + 2) + (1 + 3)
      const __m256 t3 = vectors == 4 ? _mm256_add_ps(_mm256_add_ps(v[1], v[3]), _mm256_add_ps(v[0], v[2]))
                                     : _mm256_add_ps(v[1], v[0]);
      const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
      const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
      out->sum[at] = _mm_cvtss_f32(_mm_add_ss(t8, _mm_shuffle_ps(t8, t8, 1)));
      const __m256i q01 = _mm256_add_epi32(q[0], q[1]);
      out->qsum[at] = sum8i(vectors == 4 ? _mm256_add_epi32(q01, _mm256_add_epi32(q[2], q[3])) : q01);
    }
}

#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 16
#endif
// Codes fetched this many blocks ahead (past a group's end: the next group's, or harmless).
// Measured, SmolLM2 Q4_1 one-row pass on the AVX2 EPYC: 5.56 ms at 16, 5.61-5.70 at 8, 5.71-6.16
// without (tools/experiments/qmatmul/bundle_passes.py, CONFLAYERS_KERNELS=a -DPREFETCH_BLOCKS build).
constexpr int kPrefetchBlocks = PREFETCH_BLOCKS;

// Half h (8 columns: one vector) of group g against rows r0 .. r0+R-1: per row a vector of int16
// sums and one of fp32 accumulators stay in registers; the half's codes are unpacked once for the
// R rows. The rows of a block lie side by side (quantize_avx2), so every row is an immediate
// offset from one pointer. The rows are written out one by one (ROWS below): with arrays GCC
// keeps the accumulators on the stack.
#define ROWS(X) X(0) if constexpr (R > 1) { X(1) } if constexpr (R > 2) { X(2) } if constexpr (R > 3) { X(3) }
template <int R, int kBits, bool kOffsets>
CONFLAYERS_AVX2 void avx2_half(const Problem& p, int g, int h, int r0) {
  static_assert(R >= 1 && R <= 4, "1 to 4 rows");
  const TileWeights& w = *p.w;
  const int nb = w.nb, per = w.bytes_per_block(), block = w.block, m = p.m;
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int8_t* src = w.codes.data() + static_cast<size_t>(g) * nb * per + 32 * h;
  const int8_t* qb = p.a->q.data() + static_cast<size_t>(r0) * block;
  const float* db = p.a->d.data() + r0;
  const float* sb = p.a->sum.data() + r0;
  const int32_t* qsb = p.a->qsum.data() + r0;
  const size_t qstep = static_cast<size_t>(m) * block;
  size_t at = static_cast<size_t>(g) * nb * kCols + 8 * h;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (int b = 0; b < nb; ++b, src += per, qb += qstep, db += m, sb += m, qsb += m, at += kCols) {
    if (h == 0)
      for (int line = 0; line < per; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBlocks * per + line), _MM_HINT_T0);
    const int32_t* a = reinterpret_cast<const int32_t*>(qb);   // row i's 4 bytes t: a[i * block / 4 + t]
    __m256i dot0, dot1, dot2, dot3;
    if (kBits == 4) {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      __m256i l = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
#define FIRST4(i) dot##i = _mm256_add_epi16(_mm256_maddubs_epi16(l, _mm256_set1_epi32(a[i * 8])), \
                                            _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a[i * 8 + 4])));
      ROWS(FIRST4)
      for (int j = 1; j < 4; ++j) {
        v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64 * j));
        l = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
#define NEXT4(i) dot##i = _mm256_add_epi16(dot##i, _mm256_add_epi16(_mm256_maddubs_epi16(l, _mm256_set1_epi32(a[i * 8 + j])), \
                                                                    _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a[i * 8 + 4 + j]))));
        ROWS(NEXT4)
      }
#define DOT4(i) dot##i = _mm256_add_epi32(_mm256_madd_epi16(dot##i, ones), _mm256_set1_epi32(-8 * qsb[i]));
      ROWS(DOT4)
    } else {
      const int words = block / 4;
      __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), u = _mm256_abs_epi8(c);
#define FIRST8(i) dot##i = _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(_mm256_set1_epi32(a[i * words]), c)), ones);
      ROWS(FIRST8)
      for (int t = 1; t < words; ++t) {
        c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64 * t)), u = _mm256_abs_epi8(c);
#define NEXT8(i) dot##i = _mm256_add_epi32(dot##i, _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(_mm256_set1_epi32(a[i * words + t]), c)), ones));
        ROWS(NEXT8)
      }
    }
    const __m256 s = column_values8(w.scales, at);
#define SCALE(i) acc##i = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot##i), _mm256_mul_ps(s, _mm256_set1_ps(db[i])), acc##i);
    ROWS(SCALE)
    if (kOffsets) {
      const __m256 o = column_values8(w.offsets, at);
#define OFFSET(i) acc##i = _mm256_fmadd_ps(_mm256_set1_ps(sb[i]), o, acc##i);
      ROWS(OFFSET)
    }
  }
  const int n0 = g * kCols + 8 * h, left = p.n - n0;
  if (left <= 0) return;
  float* y = p.y + static_cast<size_t>(r0) * p.n + n0;
  if (left >= 8) {
#define STORE(i) _mm256_storeu_ps(y + i * p.n, acc##i);
    ROWS(STORE)
  } else {                                   // the matrix's last, partial vector
    alignas(32) float tail[8];
#define STORE_TAIL(i) _mm256_store_ps(tail, acc##i); for (int c = 0; c < left; ++c) y[i * p.n + c] = tail[c];
    ROWS(STORE_TAIL)
  }
}
#undef ROWS
#undef FIRST4
#undef NEXT4
#undef DOT4
#undef FIRST8
#undef NEXT8
#undef SCALE
#undef OFFSET
#undef STORE
#undef STORE_TAIL

// Group g (16 columns: two vectors) against rows r0 .. r0+R-1 (R <= 4), both halves from each
// load of the codes: a pass of one row (a one-token step, bound by reading the codes, where the
// half tiles above measured up to 1.2x slower), a 4-bit tile's last single row, and every 8-bit
// pass (the head; at 2-9 rows 1.05-1.25x faster than half tiles here).
template <int R, int kBits, bool kOffsets>
CONFLAYERS_AVX2 void avx2_rows(const Problem& p, int g, int r0) {
  const TileWeights& w = *p.w;
  const int nb = w.nb, per = w.bytes_per_block(), block = w.block, m = p.m;
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int8_t* src = w.codes.data() + static_cast<size_t>(g) * nb * per;
  const int8_t* qb = p.a->q.data() + static_cast<size_t>(r0) * block;
  const size_t qstep = static_cast<size_t>(m) * block;
  size_t at = static_cast<size_t>(g) * nb * kCols;
  __m256 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int b = 0; b < nb; ++b, src += per, qb += qstep, at += kCols) {
    for (int line = 0; line < per; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBlocks * per + line), _MM_HINT_T0);
    const size_t rb = static_cast<size_t>(b) * m + r0;
    __m256i dot[R][2];
    if (kBits == 4) {
      // raw codes 0..15 x int8: each int16 lane sums 16 products of at most 15 x 127 (no overflow)
      __m256i s16[R][2];
      for (int i = 0; i < R; ++i) s16[i][0] = s16[i][1] = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {         // tile rows j (low nibbles, k 4j..) and 4 + j (high, k 16 + 4j..)
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64 * j));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64 * j + 32));
        const __m256i l0 = _mm256_and_si256(v0, mask), l1 = _mm256_and_si256(v1, mask);
        const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask), h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask);
        for (int i = 0; i < R; ++i) {
          const int32_t* a = reinterpret_cast<const int32_t*>(qb + i * block);
          const __m256i al = _mm256_set1_epi32(a[j]), ah = _mm256_set1_epi32(a[4 + j]);
          s16[i][0] = _mm256_add_epi16(s16[i][0], _mm256_add_epi16(_mm256_maddubs_epi16(l0, al), _mm256_maddubs_epi16(h0, ah)));
          s16[i][1] = _mm256_add_epi16(s16[i][1], _mm256_add_epi16(_mm256_maddubs_epi16(l1, al), _mm256_maddubs_epi16(h1, ah)));
        }
      }
      for (int i = 0; i < R; ++i) {
        const __m256i mid = _mm256_set1_epi32(-8 * p.a->qsum[rb + i]);
        dot[i][0] = _mm256_add_epi32(_mm256_madd_epi16(s16[i][0], ones), mid);
        dot[i][1] = _mm256_add_epi32(_mm256_madd_epi16(s16[i][1], ones), mid);
      }
    } else {
      // centered codes -128..127: |code| x (int8 with the code's sign), pairs within int16;
      // block / 4 tile rows (8, or 4 for Q6_K's blocks of 16)
      for (int i = 0; i < R; ++i) dot[i][0] = dot[i][1] = _mm256_setzero_si256();
      for (int t = 0; t < block / 4; ++t) {
        const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64 * t));
        const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64 * t + 32));
        const __m256i u0 = _mm256_abs_epi8(c0), u1 = _mm256_abs_epi8(c1);
        for (int i = 0; i < R; ++i) {
          const __m256i a = _mm256_set1_epi32(reinterpret_cast<const int32_t*>(qb + i * block)[t]);
          dot[i][0] = _mm256_add_epi32(dot[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(a, c0)), ones));
          dot[i][1] = _mm256_add_epi32(dot[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(a, c1)), ones));
        }
      }
    }
    const __m256 s0 = column_values8(w.scales, at), s1 = column_values8(w.scales, at + 8);
    for (int i = 0; i < R; ++i) {
      const __m256 d = _mm256_set1_ps(p.a->d[rb + i]);
      acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i][0]), _mm256_mul_ps(s0, d), acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i][1]), _mm256_mul_ps(s1, d), acc[i][1]);
    }
    if (kOffsets) {
      const __m256 o0 = column_values8(w.offsets, at), o1 = column_values8(w.offsets, at + 8);
      for (int i = 0; i < R; ++i) {
        const __m256 sum = _mm256_set1_ps(p.a->sum[rb + i]);
        acc[i][0] = _mm256_fmadd_ps(sum, o0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(sum, o1, acc[i][1]);
      }
    }
  }
  const int n0 = g * kCols, left = p.n - n0;
  for (int i = 0; i < R; ++i) {
    float* y = p.y + static_cast<size_t>(r0 + i) * p.n + n0;
    if (left >= kCols) {
      _mm256_storeu_ps(y, acc[i][0]);
      _mm256_storeu_ps(y + 8, acc[i][1]);
    } else {                                   // the matrix's last, partial group
      alignas(32) float tail[kCols];
      _mm256_store_ps(tail, acc[i][0]);
      _mm256_store_ps(tail + 8, acc[i][1]);
      for (int c = 0; c < left; ++c) y[c] = tail[c];
    }
  }
}

// Rows per register tile: 4 (measured on the AVX2 EPYC with tools/experiments/qmatmul/rows.cc:
// 5 and 6 rows were no faster, and GCC spills their registers).
constexpr int kRows = 4;

template <int kBits, bool kOffsets>
CONFLAYERS_AVX2 void avx2_groups_bits(const Problem& p, int g0, int g1) {
  // 4-bit: half tiles of up to 4 rows, a last single row whole-group; 8-bit: whole-group tiles
  const int tiled = kBits == 8 ? 0 : p.m % kRows == 1 ? p.m - 1 : p.m;
  for (int g = g0; g < g1; ++g) {              // a group's codes stay in L1 across halves and row tiles
    for (int h = 0; h < 2 && tiled; ++h)
      for (int r0 = 0; r0 < tiled; r0 += kRows) {
        switch (tiled - r0 < kRows ? tiled - r0 : kRows) {
          case 2: avx2_half<2, kBits, kOffsets>(p, g, h, r0); break;
          case 3: avx2_half<3, kBits, kOffsets>(p, g, h, r0); break;
          default: avx2_half<4, kBits, kOffsets>(p, g, h, r0); break;
        }
      }
    for (int r0 = tiled; r0 < p.m; r0 += kRows) {
      switch (p.m - r0 < kRows ? p.m - r0 : kRows) {
        case 1: avx2_rows<1, kBits, kOffsets>(p, g, r0); break;
        case 2: avx2_rows<2, kBits, kOffsets>(p, g, r0); break;
        case 3: avx2_rows<3, kBits, kOffsets>(p, g, r0); break;
        default: avx2_rows<4, kBits, kOffsets>(p, g, r0); break;
      }
    }
  }
}

CONFLAYERS_AVX2 void avx2_groups(const Problem& p, int g0, int g1) {
  const bool offsets = !p.w->offsets.empty();
  if (p.w->bits == 4) offsets ? avx2_groups_bits<4, true>(p, g0, g1) : avx2_groups_bits<4, false>(p, g0, g1);
  else offsets ? avx2_groups_bits<8, true>(p, g0, g1) : avx2_groups_bits<8, false>(p, g0, g1);
}

// exp_fixed (qmatmul.h) on 8 lanes, the same operations in the same order.
CONFLAYERS_AVX2 inline __m256 exp_fixed8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLo)), _mm256_set1_ps(kExpHi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Hi), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

}  // namespace

// The gated activation (qmatmul.h's Gate), 8 columns a vector; a last partial vector by the
// scalar sequence (the same bits).
CONFLAYERS_AVX2 void gate_avx2(const Gate& a, int c0, int c1) {
  const __m256 alpha = _mm256_set1_ps(a.alpha), beta = _mm256_set1_ps(a.beta), one = _mm256_set1_ps(1.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int r = 0; r < a.m; ++r) {
    const float* y = a.y + static_cast<size_t>(r) * 2 * a.f;
    float* out = a.out + static_cast<size_t>(r) * a.f;
    int c = c0;
    for (; c + 8 <= c1; c += 8) {
      const __m256 g = _mm256_loadu_ps(y + c), u = _mm256_loadu_ps(y + a.f + c);
      const __m256 z = a.beta == 0.f ? _mm256_mul_ps(g, alpha) : _mm256_mul_ps(g, _mm256_fmadd_ps(beta, _mm256_mul_ps(g, g), alpha));
      const __m256 e = exp_fixed8(_mm256_xor_ps(z, sign));
      _mm256_storeu_ps(out + c, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u));
    }
    for (; c < c1; ++c) out[c] = gated(y[c], y[a.f + c], a.alpha, a.beta);
  }
}

bool avx2_usable() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

const Engine kAvx2Engine = {"avx2", quantize_avx2, avx2_groups, gate_avx2};

}  // namespace qmm
}  // namespace conflayers_kernels
