// QMatMul's AMX engine (see qmatmul.h for the arithmetic every engine follows): passes of 2+ rows
// on AMX tiles (TDPBSSD on the centered codes: the exact int32 block dot products of 16 rows per
// instruction, then the per-row float epilogue), one-row passes and the activations' quantization
// from the AVX-512 VNNI engine (qmatmul_avx512.cc: the same integers, no tiles).
// Measured on SmolLM2's 121 matrices (tools/experiments/qmatmul/bench.py --lib this library,
// 2-core Xeon with AMX): 1.2x MatMulNBits' speed at one row, 1.7x at 9.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

#include "qmatmul.h"

// GCC 12 flags the undefined upper lanes inside its own _mm512_* headers (a known false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace conflayers_kernels {
namespace qmm {
namespace {

#define CONFLAYERS_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,amx-tile,amx-int8")))

constexpr int kTileCols = kCols;
constexpr int kTileRows = 16;

// The 16 columns' values of block `at` (= (group * nb + block) * 16) as fp32.
CONFLAYERS_AMX inline __m512 column_values(const ColumnValues& v, size_t at) {
  if (v.half) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v.f16.data() + at)));
  return _mm512_loadu_ps(v.f32.data() + at);
}

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
CONFLAYERS_AMX void amx_group(const Problem& p, int g, int r0, int rows) {
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
      const __m512 s = column_values(w.scales, at);
      const float* d = p.a->d.data() + static_cast<size_t>(r0) * nb + b;
      const float* sum = p.a->sum.data() + static_cast<size_t>(r0) * nb + b;
      if (w.offsets.empty()) {
        for (int r = 0; r < rows; ++r)
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cbuf[j][r])),
                                   _mm512_mul_ps(s, _mm512_set1_ps(d[static_cast<size_t>(r) * nb])), acc[r]);
      } else {
        const __m512 off = column_values(w.offsets, at);
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


CONFLAYERS_AMX void amx_groups(const Problem& p, int g0, int g1) {
  if (p.m == 1) return vnni_groups(p, g0, g1);     // one row: no tiles to configure
  int configured = -1;
  for (int r0 = 0; r0 < p.m; r0 += kTileRows) {
    const int rows = p.m - r0 < kTileRows ? p.m - r0 : kTileRows;
    if (rows != configured) amx_configure(rows), configured = rows;
    for (int g = g0; g < g1; ++g) amx_group(p, g, r0, rows);
  }
}

}  // namespace

bool amx_usable() {
  if (!avx512_usable() || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8")) return false;
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;     // Linux asks a process to opt in to AMX state
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
}

const Engine kAmxEngine = {"amx", quantize_avx512, amx_groups, gate_avx2};

}  // namespace qmm
}  // namespace conflayers_kernels
