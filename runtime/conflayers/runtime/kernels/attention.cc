// SlotAttention: causal grouped-query attention with rotary embeddings over KV caches updated in
// place, for one sequence or several packed along the rows (domain "conflayers"; the runtime
// writes it in place of GroupQueryAttention when the library is loaded: attention.py).
//
//   SlotAttention(query [1, T, (N + 2 Nkv) H] packed, or [1, T, N H] with key, value [1, T, Nkv H],
//                 key?, value?, past_key [B, Nkv, L, H], past_value [B, Nkv, L, H],
//                 seqlens_k [S] int32 (per segment: its total length - 1, as GroupQueryAttention),
//                 cos_cache [P, R/2], sin_cache [P, R/2], seg_lens? [S] int64 (rows per segment,
//                 in order; absent: one segment of all T rows), slots? [S] int64 (the KV slot of
//                 each segment; absent: 0, 1, ...))
//     -> output [1, T, N H], present_key, present_value (bind them to past_key / past_value's
//        buffers: the new rows are written in place; otherwise the past is copied first)
//   attributes: num_heads N, kv_num_heads Nkv, scale, local_window_size (as GroupQueryAttention in
//   ONNX Runtime 1.32, and a Hugging Face sliding window: > 0 attends the last local_window_size
//   positions, its own included), do_rotary (non-interleaved halves of the first R dimensions).
//
// SlotAttentionF16: the same with past_key, past_value and the presents float16 (half the bytes a
// pass reads from its caches). Each new key (after rotary) and value is rounded to half once, when
// written; every read converts a half to float exactly, and the arithmetic is the float op's.
//
// Why: GroupQueryAttention on the CPU computes a one-row pass on another path than a 2+-row pass
// (the graphs pad every attention by a row for it), and it takes one batch entry per call when
// rows are added to a past, so a packed pass of n sequences ran n nodes per layer (~35 us each at
// 150 positions on a 2-core AVX2 VM). This op takes every segment in one node.
//
// Exactness by construction: each row's result is a function of its own query row, its position
// and the KV positions it attends, computed in one fixed order (8-lane FMA dot products summed in
// a fixed tree, an 8-lane softmax sum from the window's first position, an FMA sequence over the
// positions for the values), whatever the pass's rows, segments or threads. The bits do not depend
// on which x86 CPU runs it: the AVX2 + FMA path defines them, and the AVX-512 path (two queries per
// instruction, attend_wide) does each 8-lane operation as it does.
#define ORT_API_MANUAL_INIT   // the API table comes from the ONNX Runtime that loads us
#include <onnxruntime_cxx_api.h>

// GCC's AVX-512 broadcast and zero-extend intrinsics start from an undefined register, which
// -Wall reports as maybe uninitialized: every lane is written.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

#define TARGET __attribute__((target("avx2,fma,f16c")))

// KV storage: float, or IEEE half precision (SlotAttentionF16: the bits as uint16_t). A half is
// converted to float exactly on load, so the arithmetic below is the float path's on the
// rounded values; a new row is rounded to nearest even once, when it is written.
TARGET inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TARGET inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// A KV row of h floats (a multiple of 8) into storage.
TARGET inline void store_row(float* dst, const float* src, int h) { std::memcpy(dst, src, h * sizeof(float)); }
TARGET inline void store_row(uint16_t* dst, const float* src, int h) {
  for (int i = 0; i < h; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// exp(x) for x <= 0 (scores minus their maximum): Cephes' expf polynomial, 2^n by the exponent.
TARGET inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Lane i of the result: the sum of a[i]'s 8 lanes, ((0+1)+(2+3))+((4+5)+(6+7)) for every i.
TARGET inline __m256 sum8x8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

TARGET inline float sum8(__m256 v) {     // lane 0 of sum8x8 with a[0] = v
  const __m256 z = _mm256_setzero_ps();
  const __m256 a[8] = {v, z, z, z, z, z, z, z};
  return _mm256_cvtss_f32(sum8x8(a));
}

// Rotary embedding of one head's row at `pos` (non-interleaved: dimension i pairs with i + R/2),
// the dimensions from R on copied. One compiled copy (noinline, no FMA target) for queries and
// keys alike: an inlined copy could be contracted into FMAs differently.
__attribute__((noinline)) void rotate(const float* x, float* y, int h, int half, const float* cos, const float* sin) {
  for (int i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    y[i] = a * cos[i] - b * sin[i];
    y[i + half] = b * cos[i] + a * sin[i];
  }
  for (int i = 2 * half; i < h; ++i) y[i] = x[i];
}

struct Problem {
  // rows
  const float* q;
  const float* k;
  const float* v;
  int64_t q_stride, kv_stride;          // floats between rows of q and of k / v
  float* out;
  // segments
  std::vector<int64_t> first;           // per segment: its first row
  std::vector<int64_t> rows, past, slot;
  // caches: float or uint16_t (half) elements, as kv16 says
  void* key;
  void* value;
  bool kv16;
  int64_t slot_stride, head_stride;     // elements per slot and per KV head of the caches
  const float* cos;
  const float* sin;
  int half;                             // R / 2 (0: no rotary)
  // shape
  int heads, kv_heads, h;
  float scale;
  int window;
  bool wide;                            // attend_wide (AVX-512), else attend (AVX2): the same bits
};

// A block of query rows (consecutive rows of one segment) and query heads of one KV head: they
// share every key and value they read, a tile of positions at a time (from L1 instead of each
// query reading the whole KV from L2).
struct Task {
  int seg, row, rows, head, heads;
};

constexpr int kTile = 4096;              // floats of K (or V) per tile: 16 KB

// The task's attention, into `out`. Per query (row and head) every score, the softmax and every
// output element are the same operations in the same order as for that query alone:
//   score(q, t) = (q[0:8] * k_t[0:8], then FMA over the next 8 dimensions in order), its 8 lanes
//                 summed by sum8x8's tree, times scale;
//   softmax over the query's positions [lo, pos] in 8-lane groups from lo;
//   out(q)[d]   = FMA over t = lo..pos in order of w_t * v_t[d], from 0.
// Tiles and blocks only change which query reads a position first. H: the head size when known
// at compile time (the same operations as H = 0, the run-time size, unrolled).
//
// On AVX-512 CPUs (attend_wide) two queries share each instruction: lanes 0-7 of a 16-lane
// register are one query's 8 lanes, lanes 8-15 the other's, so every lane does what its 8-lane
// register does on the AVX2 path (the same products, sums and order), and the bits are the
// same on every x86 CPU. The pair's key and value rows come as one 8-float load broadcast to
// both halves: half the multiply-adds and loads of two queries one at a time.

// What a task works on: its queries rotated, their scores (then weights), positions.
struct Span {
  int h, nq;
  int64_t pos0, pos_max, lo_min, span, stride, tile;
  float* qr;                            // [nq][h]
  float* sc;                            // [nq][stride], index 0 = position lo_min
  const void* keys;                     // float or uint16_t (Problem::kv16)
  const void* values;
};

inline int64_t lo_of(const Problem& p, int64_t pos) {
  return p.window > 0 && pos >= p.window ? pos - p.window + 1 : int64_t{0};
}

inline float* out_of(const Problem& p, const Task& t, int qi, int h, int d0) {
  return p.out + (p.first[t.seg] + t.row + qi / t.heads) * static_cast<int64_t>(p.heads) * h +
         static_cast<int64_t>(t.head + qi % t.heads) * h + d0;
}

inline Span span_of(const Problem& p, const Task& t, int h, std::vector<float>& buf) {
  Span x;
  x.h = h;
  x.nq = t.rows * t.heads;
  x.pos0 = p.past[t.seg] + t.row, x.pos_max = x.pos0 + t.rows - 1;
  x.lo_min = lo_of(p, x.pos0);
  x.span = x.pos_max - x.lo_min + 1;
  x.stride = (x.span + 7) / 8 * 8 + 8;
  x.tile = std::max<int64_t>(8, kTile / h / 8 * 8);
  buf.resize(static_cast<size_t>(x.nq) * (h + x.stride));
  x.qr = buf.data();
  x.sc = x.qr + static_cast<size_t>(x.nq) * h;
  const int kvh = t.head / (p.heads / p.kv_heads);
  const int64_t at = p.slot[t.seg] * p.slot_stride + kvh * p.head_stride;
  const size_t esize = p.kv16 ? sizeof(uint16_t) : sizeof(float);
  x.keys = static_cast<const char*>(p.key) + at * esize;
  x.values = static_cast<const char*>(p.value) + at * esize;
  for (int r = 0; r < t.rows; ++r) {
    const int64_t row = p.first[t.seg] + t.row + r, pos = x.pos0 + r;
    for (int g = 0; g < t.heads; ++g) {
      const float* q = p.q + row * p.q_stride + static_cast<int64_t>(t.head + g) * h;
      float* dst = x.qr + static_cast<size_t>(r * t.heads + g) * h;
      if (p.half) rotate(q, dst, h, p.half, p.cos + pos * p.half, p.sin + pos * p.half);
      else std::memcpy(dst, q, h * sizeof(float));
    }
  }
  return x;
}

// One query's scores over positions [t0, t1) of the span, 8 at a time (the last group repeats pos_max).
template <int H, typename KV>
TARGET inline void scores_one(const Span& x, const float* qv, float* s, int64_t t0, int64_t t1, float scale) {
  const int h = H ? H : x.h;
  for (int64_t j = t0; j < t1; j += 8) {
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) {
      const KV* kr = static_cast<const KV*>(x.keys) + std::min(x.lo_min + j + u, x.pos_max) * h;
      __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qv), load8(kr));
      for (int d = 8; d < h; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qv + d), load8(kr + d), a);
      acc[u] = a;
    }
    _mm256_storeu_ps(s + j, _mm256_mul_ps(sum8x8(acc), _mm256_set1_ps(scale)));
  }
}

// Per query: softmax over its own positions, the weights written in place. The maximum is taken
// 8 lanes at a time (max is exact in any order).
TARGET void softmax(const Problem& p, const Task& t, const Span& x) {
  for (int qi = 0; qi < x.nq; ++qi) {
    const int64_t pos = x.pos0 + qi / t.heads, lo = lo_of(p, pos), n = pos - lo + 1;
    float* s = x.sc + static_cast<size_t>(qi) * x.stride + (lo - x.lo_min);
    __m256 m = _mm256_set1_ps(s[0]);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    float top = lanes[0];
    for (int u = 1; u < 8; ++u) top = std::max(top, lanes[u]);
    for (; j < n; ++j) top = std::max(top, s[j]);
    __m256 total = _mm256_setzero_ps();
    const __m256 vtop = _mm256_set1_ps(top);
    for (j = 0; j < n; j += 8) {
      __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), vtop));
      if (j + 8 > n) {                    // positions past the query's weigh nothing
        alignas(32) int32_t keep[8];
        for (int u = 0; u < 8; ++u) keep[u] = j + u < n ? -1 : 0;
        e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(keep))));
      }
      _mm256_storeu_ps(s + j, e);
      total = _mm256_add_ps(total, e);
    }
    const float inv = 1.0f / sum8(total);
    for (j = 0; j < n; ++j) s[j] *= inv;
  }
}

// One query's output dimensions [d0, d0 + dn) carried on over positions [a, b) of the span.
template <typename KV>
TARGET inline void values_one(const Span& x, const float* w, float* out, int64_t a, int64_t b, int d0, int dn) {
  __m256 acc[8];
  for (int c = 0; c < dn / 8; ++c) acc[c] = _mm256_loadu_ps(out + 8 * c);
  for (int64_t j = a; j < b; ++j) {
    const __m256 wj = _mm256_set1_ps(w[j]);
    const KV* vr = static_cast<const KV*>(x.values) + (x.lo_min + j) * x.h + d0;
    for (int c = 0; c < dn / 8; ++c) acc[c] = _mm256_fmadd_ps(wj, load8(vr + 8 * c), acc[c]);
  }
  for (int c = 0; c < dn / 8; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

// Every query's output dimensions [d0, d0 + dn) set to 0: where the values' chains start.
TARGET inline void zero_outputs(const Problem& p, const Task& t, const Span& x, int d0, int dn) {
  for (int qi = 0; qi < x.nq; ++qi)
    for (int c = 0; c < dn / 8; ++c) _mm256_storeu_ps(out_of(p, t, qi, x.h, d0) + 8 * c, _mm256_setzero_ps());
}

// [a, b) of query qi's positions within tile [t0, t1) (empty: a >= b).
inline void range_of(const Problem& p, const Task& t, const Span& x, int qi, int64_t t0, int64_t t1,
                     int64_t& a, int64_t& b) {
  const int64_t pos = x.pos0 + qi / t.heads;
  a = std::max(t0, lo_of(p, pos) - x.lo_min), b = std::min(t1, pos - x.lo_min + 1);
}

template <int H, typename KV>
TARGET void attend(const Problem& p, const Task& t, std::vector<float>& buf) {
  const int h = H ? H : p.h;
  const Span x = span_of(p, t, h, buf);
  for (int64_t t0 = 0; t0 < x.span; t0 += x.tile) {
    const int64_t t1 = std::min(x.span, t0 + x.tile);
    for (int qi = 0; qi < x.nq; ++qi)
      scores_one<H, KV>(x, x.qr + static_cast<size_t>(qi) * h, x.sc + static_cast<size_t>(qi) * x.stride, t0, t1, p.scale);
  }
  softmax(p, t, x);
  // values: per 64 dimensions, each query's 8 accumulators carried across the tiles
  for (int d0 = 0; d0 < h; d0 += 64) {
    const int dn = std::min(64, h - d0);
    zero_outputs(p, t, x, d0, dn);
    for (int64_t t0 = 0; t0 < x.span; t0 += x.tile) {
      const int64_t t1 = std::min(x.span, t0 + x.tile);
      for (int qi = 0; qi < x.nq; ++qi) {
        int64_t a, b;
        range_of(p, t, x, qi, t0, t1, a, b);
        if (a < b) values_one<KV>(x, x.sc + static_cast<size_t>(qi) * x.stride, out_of(p, t, qi, h, d0), a, b, d0, dn);
      }
    }
  }
}

#define TARGET512 __attribute__((target("avx2,fma,f16c,avx512f,avx512dq,avx512vl")))

TARGET512 inline __m512 pair_of(const float* a, const float* b) {      // a's 8 floats, then b's
  return _mm512_insertf32x8(_mm512_zextps256_ps512(_mm256_loadu_ps(a)), _mm256_loadu_ps(b), 1);
}

template <typename KV>
TARGET512 inline __m512 both(const KV* a) {                             // a's 8 floats, twice
  return _mm512_broadcast_f32x8(load8(a));
}

// scores_one for queries qa and qb at once.
template <int H, typename KV>
TARGET512 inline void scores_pair(const Span& x, const float* qa, const float* qb, float* sa, float* sb,
                                  int64_t t0, int64_t t1, float scale) {
  const int h = H ? H : x.h;
  for (int64_t j = t0; j < t1; j += 8) {
    __m512 acc[8];
    for (int u = 0; u < 8; ++u) {
      const KV* kr = static_cast<const KV*>(x.keys) + std::min(x.lo_min + j + u, x.pos_max) * h;
      __m512 a = _mm512_mul_ps(pair_of(qa, qb), both(kr));
      for (int d = 8; d < h; d += 8) a = _mm512_fmadd_ps(pair_of(qa + d, qb + d), both(kr + d), a);
      acc[u] = a;
    }
    __m256 lo[8], hi[8];
    for (int u = 0; u < 8; ++u) lo[u] = _mm512_castps512_ps256(acc[u]), hi[u] = _mm512_extractf32x8_ps(acc[u], 1);
    _mm256_storeu_ps(sa + j, _mm256_mul_ps(sum8x8(lo), _mm256_set1_ps(scale)));
    _mm256_storeu_ps(sb + j, _mm256_mul_ps(sum8x8(hi), _mm256_set1_ps(scale)));
  }
}

// values_one for queries with weights wa, wb over the same positions [a, b).
template <typename KV>
TARGET512 inline void values_pair(const Span& x, const float* wa, const float* wb, float* oa, float* ob,
                                  int64_t a, int64_t b, int d0, int dn) {
  __m512 acc[8];
  for (int c = 0; c < dn / 8; ++c) acc[c] = pair_of(oa + 8 * c, ob + 8 * c);
  for (int64_t j = a; j < b; ++j) {
    const __m512 wj = _mm512_insertf32x8(_mm512_set1_ps(wa[j]), _mm256_set1_ps(wb[j]), 1);
    const KV* vr = static_cast<const KV*>(x.values) + (x.lo_min + j) * x.h + d0;
    for (int c = 0; c < dn / 8; ++c) acc[c] = _mm512_fmadd_ps(wj, both(vr + 8 * c), acc[c]);
  }
  for (int c = 0; c < dn / 8; ++c) {
    _mm256_storeu_ps(oa + 8 * c, _mm512_castps512_ps256(acc[c]));
    _mm256_storeu_ps(ob + 8 * c, _mm512_extractf32x8_ps(acc[c], 1));
  }
}

template <int H, typename KV>
TARGET512 void attend_wide(const Problem& p, const Task& t, std::vector<float>& buf) {
  const int h = H ? H : p.h;
  const Span x = span_of(p, t, h, buf);
  const auto q_of = [&](int qi) { return x.qr + static_cast<size_t>(qi) * h; };
  const auto s_of = [&](int qi) { return x.sc + static_cast<size_t>(qi) * x.stride; };
  for (int64_t t0 = 0; t0 < x.span; t0 += x.tile) {
    const int64_t t1 = std::min(x.span, t0 + x.tile);
    int qi = 0;
    for (; qi + 1 < x.nq; qi += 2) scores_pair<H, KV>(x, q_of(qi), q_of(qi + 1), s_of(qi), s_of(qi + 1), t0, t1, p.scale);
    if (qi < x.nq) scores_one<H, KV>(x, q_of(qi), s_of(qi), t0, t1, p.scale);
  }
  softmax(p, t, x);
  for (int d0 = 0; d0 < h; d0 += 64) {
    const int dn = std::min(64, h - d0);
    zero_outputs(p, t, x, d0, dn);
    for (int64_t t0 = 0; t0 < x.span; t0 += x.tile) {
      const int64_t t1 = std::min(x.span, t0 + x.tile);
      int qi = 0;
      for (; qi + 1 < x.nq; qi += 2) {
        // each query's chain in order: what only the earlier-starting one attends, then both, then
        // what only the later-ending one attends
        int64_t a0, b0, a1, b1;
        range_of(p, t, x, qi, t0, t1, a0, b0);
        range_of(p, t, x, qi + 1, t0, t1, a1, b1);
        float* o0 = out_of(p, t, qi, h, d0);
        float* o1 = out_of(p, t, qi + 1, h, d0);
        const int64_t a = std::max(a0, a1), b = std::min(b0, b1);
        if (a >= b) {
          if (a0 < b0) values_one<KV>(x, s_of(qi), o0, a0, b0, d0, dn);
          if (a1 < b1) values_one<KV>(x, s_of(qi + 1), o1, a1, b1, d0, dn);
          continue;
        }
        if (a0 < a) values_one<KV>(x, s_of(qi), o0, a0, a, d0, dn);
        if (a1 < a) values_one<KV>(x, s_of(qi + 1), o1, a1, a, d0, dn);
        values_pair<KV>(x, s_of(qi), s_of(qi + 1), o0, o1, a, b, d0, dn);
        if (b0 > b) values_one<KV>(x, s_of(qi), o0, b, b0, d0, dn);
        if (b1 > b) values_one<KV>(x, s_of(qi + 1), o1, b, b1, d0, dn);
      }
      if (qi < x.nq) {
        int64_t a, b;
        range_of(p, t, x, qi, t0, t1, a, b);
        if (a < b) values_one<KV>(x, s_of(qi), out_of(p, t, qi, h, d0), a, b, d0, dn);
      }
    }
  }
}

// Whether sessions made now take attend_wide: CONFLAYERS_ATTENTION_ISA=avx2 keeps the AVX2 path
// (the bits are the same; tests compare them), avx512 insists, unset or auto takes what the CPU has.
bool wide_chosen() {
  __builtin_cpu_init();
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  const char* env = std::getenv("CONFLAYERS_ATTENTION_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") return cpu;
  if (want == "avx2") return false;
  if (want == "avx512" && cpu) return true;
  if (want == "avx512")
    throw std::runtime_error("CONFLAYERS_ATTENTION_ISA=avx512: this CPU (or its OS) does not give AVX-512 F/DQ/VL; "
                             "unset it to use the fastest path here");
  throw std::runtime_error("CONFLAYERS_ATTENTION_ISA=" + want + ": expected avx512, avx2 or auto");
}

struct Job {
  const Problem* p;
  const std::vector<Task>* tasks;
  size_t per;                            // tasks per parallel batch
};

template <typename KV>
void attend_range_of(const Problem& p, const Task* t, const Task* end) {
  thread_local std::vector<float> buf;
  if (p.wide) {
    switch (p.h) {
      case 64: for (; t != end; ++t) attend_wide<64, KV>(p, *t, buf); break;
      case 128: for (; t != end; ++t) attend_wide<128, KV>(p, *t, buf); break;
      case 256: for (; t != end; ++t) attend_wide<256, KV>(p, *t, buf); break;
      default: for (; t != end; ++t) attend_wide<0, KV>(p, *t, buf);
    }
    return;
  }
  switch (p.h) {
    case 64: for (; t != end; ++t) attend<64, KV>(p, *t, buf); break;
    case 128: for (; t != end; ++t) attend<128, KV>(p, *t, buf); break;
    case 256: for (; t != end; ++t) attend<256, KV>(p, *t, buf); break;
    default: for (; t != end; ++t) attend<0, KV>(p, *t, buf);
  }
}

void attend_range(const Problem& p, const Task* t, const Task* end) {
  if (p.kv16) attend_range_of<uint16_t>(p, t, end);
  else attend_range_of<float>(p, t, end);
}

// The new rows' keys (rotated) and values into the caches (as KV elements), before any row attends.
template <typename KV>
void write_rows(const Problem& p, int64_t n_seg) {
  const int h = p.h;
  std::vector<float> rotated(h);
  KV* key = static_cast<KV*>(p.key);
  KV* value = static_cast<KV*>(p.value);
  for (int64_t s = 0; s < n_seg; ++s) {
    for (int64_t r = 0; r < p.rows[s]; ++r) {
      const int64_t row = p.first[s] + r, pos = p.past[s] + r;
      for (int j = 0; j < p.kv_heads; ++j) {
        const int64_t at = p.slot[s] * p.slot_stride + j * p.head_stride + pos * h;
        const float* ks = p.k + row * p.kv_stride + j * h;
        if (p.half) rotate(ks, rotated.data(), h, p.half, p.cos + pos * p.half, p.sin + pos * p.half);
        else std::memcpy(rotated.data(), ks, h * sizeof(float));
        store_row(key + at, rotated.data(), h);
        store_row(value + at, p.v + row * p.kv_stride + j * h, h);
      }
    }
  }
}

void run_tasks(void* data, size_t index) {
  const Job& job = *static_cast<const Job*>(data);
  const size_t a = index * job.per, b = std::min(job.tasks->size(), a + job.per);
  attend_range(*job.p, job.tasks->data() + a, job.tasks->data() + b);
}

// Work below which one thread does it all: waking the pool costs more (the QMatMul and offsets
// kernels measured the same on this VM class).
constexpr int64_t kParallelWork = 1 << 16;
constexpr int kBlockQueries = 12;        // queries sharing each position's loads: 12 x 8 floats stay in L1
constexpr int kMinTasks = 4;

struct SlotAttentionKernel {
  SlotAttentionKernel(const OrtApi& api, const OrtKernelInfo* info, bool kv16) : api_(api), kv16_(kv16) {
    Ort::ConstKernelInfo ki(info);
    heads_ = static_cast<int>(ki.GetAttribute<int64_t>("num_heads"));
    kv_heads_ = static_cast<int>(ki.GetAttribute<int64_t>("kv_num_heads"));
    scale_ = ki.GetAttribute<float>("scale");
    window_ = static_cast<int>(attr_or(ki, "local_window_size", -1));
    rotary_ = attr_or(ki, "do_rotary", 0) == 1;
    if (heads_ <= 0 || kv_heads_ <= 0 || heads_ % kv_heads_ != 0)
      throw std::runtime_error("conflayers SlotAttention: num_heads must be a positive multiple of kv_num_heads");
    if (attr_or(ki, "rotary_interleaved", 0) != 0)
      throw std::runtime_error("conflayers SlotAttention: interleaved rotary is not supported");
    wide_ = wide_chosen();
  }

  static int64_t attr_or(Ort::ConstKernelInfo& ki, const char* name, int64_t dflt) {
    try {
      return ki.GetAttribute<int64_t>(name);
    } catch (const Ort::Exception&) {
      return dflt;
    }
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    Ort::ConstValue query = ctx.GetInput(0), key = ctx.GetInput(1), value = ctx.GetInput(2);
    Ort::ConstValue past_k = ctx.GetInput(3), past_v = ctx.GetInput(4), seqlens = ctx.GetInput(5);
    Ort::ConstValue cos = ctx.GetInput(6), sin = ctx.GetInput(7);
    Ort::ConstValue seg_lens = ctx.GetInputCount() > 8 ? ctx.GetInput(8) : Ort::ConstValue{nullptr};
    Ort::ConstValue slots = ctx.GetInputCount() > 9 ? ctx.GetInput(9) : Ort::ConstValue{nullptr};
    const std::vector<int64_t> kv_shape = past_k.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> q_shape = query.GetTensorTypeAndShapeInfo().GetShape();
    if (kv_shape.size() != 4 || kv_shape[1] != kv_heads_ || past_v.GetTensorTypeAndShapeInfo().GetShape() != kv_shape)
      throw std::runtime_error("conflayers SlotAttention: past_key and past_value must be [slots, kv_num_heads, L, H]");
    if (q_shape.size() != 3 || q_shape[0] != 1)
      throw std::runtime_error("conflayers SlotAttention: query must be [1, rows, width]");
    Problem p;
    p.heads = heads_, p.kv_heads = kv_heads_, p.h = static_cast<int>(kv_shape[3]), p.scale = scale_, p.window = window_;
    p.wide = wide_, p.kv16 = kv16_;
    const int64_t t_rows = q_shape[1], h = p.h, length = kv_shape[2];
    if (h % 8 != 0) throw std::runtime_error("conflayers SlotAttention: head size must be a multiple of 8");
    const bool packed = key == nullptr;
    if (q_shape[2] != (packed ? (heads_ + 2 * kv_heads_) * h : heads_ * h))
      throw std::runtime_error("conflayers SlotAttention: query width does not match the heads and head size");
    p.q = query.GetTensorData<float>();
    p.q_stride = q_shape[2];
    if (packed) {
      p.k = p.q + heads_ * h, p.v = p.k + kv_heads_ * h, p.kv_stride = p.q_stride;
    } else {
      p.k = key.GetTensorData<float>(), p.v = value.GetTensorData<float>(), p.kv_stride = kv_heads_ * h;
    }
    // segments
    const int64_t n_seg = seqlens.GetTensorTypeAndShapeInfo().GetElementCount();
    const int32_t* total = seqlens.GetTensorData<int32_t>();
    p.first.resize(n_seg), p.rows.resize(n_seg), p.past.resize(n_seg), p.slot.resize(n_seg);
    int64_t at = 0;
    for (int64_t s = 0; s < n_seg; ++s) {
      p.rows[s] = seg_lens ? seg_lens.GetTensorData<int64_t>()[s] : t_rows;
      p.slot[s] = slots ? slots.GetTensorData<int64_t>()[s] : s;
      p.first[s] = at;
      p.past[s] = static_cast<int64_t>(total[s]) + 1 - p.rows[s];
      at += p.rows[s];
      if (p.rows[s] < 0 || p.past[s] < 0 || total[s] >= length || p.slot[s] < 0 || p.slot[s] >= kv_shape[0])
        throw std::runtime_error("conflayers SlotAttention: segment " + std::to_string(s) + " (rows " +
                                 std::to_string(p.rows[s]) + ", length " + std::to_string(total[s] + 1) + ", slot " +
                                 std::to_string(p.slot[s]) + ") does not fit the KV cache [" +
                                 std::to_string(kv_shape[0]) + ", " + std::to_string(length) + "]");
    }
    if (at != t_rows) throw std::runtime_error("conflayers SlotAttention: seg_lens must add up to the query's rows");
    // caches: written in place when present is bound to past's buffer
    Ort::UnownedValue present_k = ctx.GetOutput(1, kv_shape), present_v = ctx.GetOutput(2, kv_shape);
    p.key = present_k.GetTensorMutableRawData(), p.value = present_v.GetTensorMutableRawData();
    const size_t cache_bytes = static_cast<size_t>(kv_shape[0] * kv_shape[1] * length * h) *
                               (kv16_ ? sizeof(uint16_t) : sizeof(float));
    if (p.key != past_k.GetTensorRawData()) std::memcpy(p.key, past_k.GetTensorRawData(), cache_bytes);
    if (p.value != past_v.GetTensorRawData()) std::memcpy(p.value, past_v.GetTensorRawData(), cache_bytes);
    p.head_stride = length * h, p.slot_stride = kv_heads_ * length * h;
    p.half = 0;
    if (rotary_) {
      const std::vector<int64_t> c_shape = cos.GetTensorTypeAndShapeInfo().GetShape();
      if (c_shape.size() != 2 || 2 * c_shape[1] > h || sin.GetTensorTypeAndShapeInfo().GetShape() != c_shape)
        throw std::runtime_error("conflayers SlotAttention: cos_cache and sin_cache must be [positions, <= H/2]");
      for (int64_t s = 0; s < n_seg; ++s)
        if (p.past[s] + p.rows[s] > c_shape[0])
          throw std::runtime_error("conflayers SlotAttention: a position is past the rotary tables' " +
                                   std::to_string(c_shape[0]));
      p.half = static_cast<int>(c_shape[1]);
      p.cos = cos.GetTensorData<float>(), p.sin = sin.GetTensorData<float>();
    }
    p.out = ctx.GetOutput(0, {1, t_rows, static_cast<int64_t>(heads_) * h}).GetTensorMutableData<float>();
    if (kv16_) write_rows<uint16_t>(p, n_seg);
    else write_rows<float>(p, n_seg);
    int64_t work = 0;
    for (int64_t s = 0; s < n_seg; ++s)
      for (int64_t r = 0; r < p.rows[s]; ++r) {
        const int64_t pos = p.past[s] + r;
        work += (window_ > 0 ? std::min<int64_t>(pos + 1, window_) : pos + 1) * heads_ * h;
      }
    std::vector<Task> tasks;
    // tasks: blocks of rows x the query heads of a KV head (at most kBlockQueries queries), the
    // heads split where that leaves fewer than kMinTasks tasks (so that the threads have work)
    const int group = heads_ / kv_heads_;
    const int block_rows = std::max(1, kBlockQueries / group);
    int64_t grouped = 0;
    for (int64_t s = 0; s < n_seg; ++s) grouped += (p.rows[s] + block_rows - 1) / block_rows * kv_heads_;
    const int parts = grouped >= kMinTasks ? 1 : std::min<int>(group, static_cast<int>((kMinTasks + grouped - 1) / std::max<int64_t>(grouped, 1)));
    const int part = (group + parts - 1) / parts;
    for (int64_t s = 0; s < n_seg; ++s)
      for (int64_t r = 0; r < p.rows[s]; r += block_rows)
        for (int j = 0; j < kv_heads_; ++j)
          for (int g = 0; g < group; g += part)
            tasks.push_back(Task{static_cast<int>(s), static_cast<int>(r),
                                 static_cast<int>(std::min<int64_t>(block_rows, p.rows[s] - r)), j * group + g,
                                 std::min(part, group - g)});
    if (tasks.empty()) return;
    if (work < kParallelWork) {
      attend_range(p, tasks.data(), tasks.data() + tasks.size());
      return;
    }
    Job job{&p, &tasks, std::max<size_t>(1, tasks.size() / 64)};
    const size_t batches = (tasks.size() + job.per - 1) / job.per;
    Ort::ThrowOnError(api_.KernelContext_ParallelFor(context, run_tasks, batches, 0, &job));
  }

 private:
  const OrtApi& api_;
  int heads_ = 0, kv_heads_ = 0, window_ = -1;
  float scale_ = 1.0f;
  bool rotary_ = false;
  bool wide_ = false;
  bool kv16_ = false;
};

// SlotAttention (float caches) and SlotAttentionF16 (half caches: past_key, past_value and the
// presents float16; everything else as SlotAttention).
template <bool KV16>
struct SlotAttentionOp : Ort::CustomOpBase<SlotAttentionOp<KV16>, SlotAttentionKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const {
    return new SlotAttentionKernel(api, info, KV16);
  }
  const char* GetName() const { return KV16 ? "SlotAttentionF16" : "SlotAttention"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 10; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 5) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    if (i >= 8) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    if (KV16 && (i == 3 || i == 4)) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 1 || i == 2 || i >= 8 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                                      : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return KV16 && i > 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

SlotAttentionOp<false> g_slot_attention;
SlotAttentionOp<true> g_slot_attention_f16;

}  // namespace

namespace conflayers_kernels {

void add_attention_ops(Ort::CustomOpDomain& domain) {
  domain.Add(&g_slot_attention);
  __builtin_cpu_init();
  if (__builtin_cpu_supports("f16c")) domain.Add(&g_slot_attention_f16);   // every AVX2 CPU made has it
}

const char* attention_path() { return wide_chosen() ? "avx512" : "avx2"; }

}  // namespace conflayers_kernels
