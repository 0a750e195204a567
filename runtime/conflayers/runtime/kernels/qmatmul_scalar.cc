// QMatMul's scalar engine: qmatmul.h's arithmetic written out one value at a time, the reference
// the vector engines are tested against bit for bit (CONFLAYERS_QMATMUL=scalar). Slow; never
// chosen by default.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "qmatmul.h"

namespace conflayers_kernels {
namespace qmm {
namespace {

void quantize_scalar(const float* x, int m, int k, int block, Rows* out) {
  const int nb = k / block;
  out->resize(m, k, block);
  for (int r = 0; r < m; ++r)
    for (int b = 0; b < nb; ++b) {
      const size_t at = static_cast<size_t>(r) * nb + b;
      const float* xb = x + static_cast<size_t>(r) * k + b * block;
      int8_t* q = out->q.data() + static_cast<size_t>(r) * k + b * block;
      float amax = 0.f;
      for (int i = 0; i < block; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      int32_t qsum = 0;
      for (int i = 0; i < block; ++i) {
        const float v = std::nearbyint(xb[i] * id);      // half to even in the default rounding mode
        q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
        qsum += q[i];
      }
      out->d[at] = amax / 127.f;
      out->sum[at] = block_sum(xb, block);
      out->qsum[at] = qsum;
    }
}

// Code k of column c in block `src` of the repacked layout, centered.
int code(const int8_t* src, int bits, int c, int k) {
  const int t = (k / 4) * 64 + c * 4 + k % 4;
  if (bits == 8) return src[t];
  const uint8_t byte = static_cast<uint8_t>(src[t % 256]);
  return (t < 256 ? byte & 15 : byte >> 4) - 8;
}

void scalar_groups(const Problem& p, int g0, int g1) {
  const TileWeights& w = *p.w;
  const int nb = w.nb, per = w.bytes_per_block();
  for (int g = g0; g < g1; ++g)
    for (int c = 0; c < kCols && g * kCols + c < p.n; ++c)
      for (int r = 0; r < p.m; ++r) {
        float acc = 0.f;
        for (int b = 0; b < nb; ++b) {
          const int8_t* src = w.codes.data() + (static_cast<size_t>(g) * nb + b) * per;
          const int8_t* q = p.a->q.data() + static_cast<size_t>(r) * p.k + b * w.block;
          int32_t dot = 0;
          for (int k = 0; k < w.block; ++k) dot += code(src, w.bits, c, k) * q[k];
          const size_t at = (static_cast<size_t>(g) * nb + b) * kCols + c, rb = static_cast<size_t>(r) * nb + b;
          acc = std::fma(static_cast<float>(dot), w.scales.at(at) * p.a->d[rb], acc);
          if (!w.offsets.empty()) acc = std::fma(p.a->sum[rb], w.offsets.at(at), acc);
        }
        p.y[static_cast<size_t>(r) * p.n + g * kCols + c] = acc;
      }
}

}  // namespace

void gate_scalar(const Gate& a, int c0, int c1) {
  for (int r = 0; r < a.m; ++r) {
    const float* y = a.y + static_cast<size_t>(r) * 2 * a.f;
    float* out = a.out + static_cast<size_t>(r) * a.f;
    for (int c = c0; c < c1; ++c) out[c] = gated(y[c], y[a.f + c], a.alpha, a.beta);
  }
}

const Engine kScalarEngine = {"scalar", quantize_scalar, scalar_groups, gate_scalar};

}  // namespace qmm
}  // namespace conflayers_kernels
