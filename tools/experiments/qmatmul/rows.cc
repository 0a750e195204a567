// QMatMul's AVX2 engine on one matrix, one thread, without ONNX Runtime: microseconds per pass of
// 1-16 rows (best of 200), the marginal cost of a row, GMAC/s, and whether the result equals the
// scalar reference bit for bit. For tuning the engine's tiles (a VM's noise is large: run it a
// few times, interleaved with the build it is compared to).
//
//   K=runtime/conflayers/runtime/kernels
//   g++ -O3 -mf16c -std=c++17 -I$K tools/experiments/qmatmul/rows.cc $K/qmatmul_avx2.cc $K/qmatmul_scalar.cc -o /tmp/rows
//   /tmp/rows [N K bits offsets]        # default 3072 576 4 1 (SmolLM2's gate/up); 49152 576 8 0: its head
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include "qmatmul.h"
using namespace conflayers_kernels::qmm;
namespace conflayers_kernels { namespace qmm {
void Rows::resize(int m, int k, int block) { const size_t nb = k / block; q.resize((size_t)m * k); d.resize(m * nb); sum.resize(m * nb); qsum.resize(m * nb); }
float ColumnValues::at(size_t i) const { return half ? _cvtsh_ss(f16[i]) : f32[i]; }
}}
int main(int argc, char** argv) {
  int n = argc > 1 ? atoi(argv[1]) : 3072, k = argc > 2 ? atoi(argv[2]) : 576, bits = argc > 3 ? atoi(argv[3]) : 4;
  int offs = argc > 4 ? atoi(argv[4]) : 1;
  std::mt19937 rng(1);
  TileWeights w; w.bits = bits; w.block = 32; w.nb = k / 32; w.groups = (n + 15) / 16;
  w.codes.resize((size_t)w.groups * w.nb * w.bytes_per_block());
  for (auto& c : w.codes) c = (int8_t)(rng() & 255);
  size_t nv = (size_t)w.groups * w.nb * 16;
  w.scales.half = true; w.scales.f16.resize(nv);
  for (auto& s : w.scales.f16) s = _cvtss_sh(0.001f * (1 + rng() % 100), 0);
  if (offs) { w.offsets.half = true; w.offsets.f16.resize(nv); for (auto& s : w.offsets.f16) s = _cvtss_sh(-0.01f * (1 + rng() % 100), 0); }
  const int M = 16;
  std::vector<float> x((size_t)M * k);
  std::normal_distribution<float> nd;
  for (auto& v : x) v = nd(rng);
  double base = 0;
  for (int m : {1, 2, 3, 4, 8, 9, 16}) {
    Rows ra, rs; kAvx2Engine.quantize(x.data(), m, k, 32, &ra); kScalarEngine.quantize(x.data(), m, k, 32, &rs);
    std::vector<float> ya((size_t)m * n), ys((size_t)m * n);
    Problem pa{&ra, &w, ya.data(), n, k, m}, ps{&rs, &w, ys.data(), n, k, m};
    kScalarEngine.groups(ps, 0, w.groups);
    double best = 1e9;
    for (int rep = 0; rep < 200; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      kAvx2Engine.groups(pa, 0, w.groups);
      double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      if (us < best) best = us;
    }
    bool same = memcmp(ya.data(), ys.data(), ya.size() * 4) == 0;
    if (m == 1) base = best;
    double macs = (double)m * n * k;
    printf("m=%2d  %8.1f us  marginal/row %7.1f us  %.1f GMAC/s  identical=%d\n", m, best, m > 1 ? (best - base) / (m - 1) : 0.0, macs / best / 1e3, same);
  }
}
