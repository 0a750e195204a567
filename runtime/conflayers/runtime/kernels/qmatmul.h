// What the engines of QMatMul (qmatmul.cc) share: the repacked weights, the quantized
// activations, and the arithmetic every engine must follow to the bit, so that a row's result
// depends neither on the pass nor on the engine (AMX, AVX2, or the scalar reference):
//
//   per row and block of 32 (16) activations x:   amax = max |x|,  d = amax / 127,
//       q = clamp(round_half_even(x * (127 / amax)), -127, 127)   (0 where amax is 0),
//       sum = block_sum(x)          (the fixed addition tree below),   qsum = sum of q (integer)
//   per row, column and block in order:      dot = sum_k (code_k - mid) q_k   (an exact int32)
//       acc = fma(float(dot), scale * d, acc);   acc = fma(sum, offset, acc)   (with offsets)
//
// Integer work is exact whichever unit does it; the float work is the same IEEE operations in
// the same order in every engine (vector lanes are independent), so the engines agree bit for bit.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace conflayers_kernels {
namespace qmm {

constexpr int kBlock = 32;     // activations and codes per block; Q6_K's 8-bit blocks are 16 (kBlock16)
constexpr int kBlock16 = 16;
constexpr int kCols = 16;      // columns per group: one AMX B tile, one AVX-512 / two AVX2 vectors

// Per-column values of a block (scales, offsets) for the 16 columns of each group: [groups, nb,
// 16], in fp16 where every value of the matrix is exact in it (GGUF's d and most minimums are
// fp16: half the bytes a pass reads, the same fp32 values after conversion), else fp32.
struct ColumnValues {
  bool half = false;
  std::vector<float> f32;
  std::vector<uint16_t> f16;

  void assign(std::vector<float> values);
  bool empty() const { return f32.empty() && f16.empty(); }
  float at(size_t i) const;      // one value as fp32 (the scalar engine)
};

// The weights, repacked once into B-tile order (VNNI order): per group of 16 columns and block,
// byte t holds k = 4 (t / 64) + t % 4 of column (t % 64) / 4. 4-bit codes (blocks of 32): 256
// bytes whose low nibbles are bytes 0..255 of that order (k 0..15) and high nibbles bytes
// 256..511 (k 16..31), raw (0..15); 8-bit codes: 16 x block bytes, centered (code - 128).
//
// Narrow 8-bit codes (planes 5 or 6): an 8-bit matrix whose centered codes span at most 32 (64)
// values, as GGUF's Q5_0 / Q5_1 / Q5_K types give (blocks of 32), is stored in 5 (6) bits a code, c =
// centered - base: per block, 256 bytes of low nibbles (byte t: c of byte t of the order above in
// bits 0-3, of byte 256 + t in bits 4-7), then the high bits: 6 bits, 128 bytes, byte t bits 2j,
// 2j+1 = c[t + 128 j] >> 4; 5 bits, 64 bytes, byte t bit j = c[t + 64 j] >> 4. The block dot
// product sum_k c_k q_k - mid qsum (mid = -base) is the 8-bit one's integer: the same results, 5/8
// (6/8) of the bytes a pass reads. Only engines that read planes get them (planes_ok in qmatmul.cc).
//
// Split 8-bit codes (split, planes 6; the screened head below): each code u = centered + 128 as
// its top 6 bits h = u >> 2 in the 6-bit planes above (base 0) and its low 2 bits in `lo`, laid
// out as the 6-bit high plane is (128 bytes a block, byte t bits 2j, 2j+1 = u[t + 128 j] & 3): a
// screening pass reads h alone (6/8 of the bytes), the exact products u = 4 h + (u & 3).
struct TileWeights {
  int groups = 0, nb = 0, bits = 0, block = kBlock;
  int planes = 0;                // 0: codes of `bits` bits as above; 5, 6: narrow or split 8-bit codes
  bool split = false;
  int mid = 128;                 // what the dot subtracts per unit of qsum (8-bit: 128, 4-bit: 8)
  std::vector<int8_t> codes;     // [groups, nb, bytes_per_block()]
  std::vector<int8_t> lo;        // split: [groups, nb, 128]
  ColumnValues scales, offsets;  // offsets: empty without
  int bytes_per_block() const { return kCols * block * (planes ? planes : bits) / 8; }
};

// How an engine may hold a matrix it repacks: codes as given, narrow codes in planes where they
// fit, or (the screened head's matrix) split.
enum class Layout { kBytes, kNarrow, kSplit };


// The activations quantized per row and block, in the layout of the engine that quantized them
// (its own groups() reads them): q [m, k] in k order and d, sum, qsum [m, nb] (AMX, scalar), or
// block-major q [nb, m, block] and d, sum, qsum [nb, m] (AVX-512, AVX2).
struct Rows {
  std::vector<int8_t> q;
  std::vector<float> d, sum;
  std::vector<int32_t> qsum;
  void resize(int m, int k, int block);
};

struct Problem {
  const Rows* a;
  const TileWeights* w;
  float* y;          // [m, n]
  int n, k, m;
};

// The screened head (QMatMulScreened, QMatMulNormScreened in qmatmul.cc) on split weights: the
// greedy token of each row, exactly, for 6/8 of the bytes. Per row and column c, from h alone:
//   A_c = sum_b float(8 sum_k h_k q_k - 253 qsum_b) * (0.5 s_cb d_b)      (the product with every
//         low part at its middle 1.5: u - 128 = 4 (h - 32) + 1.5 + e, |e| <= 1.5)
//   R_c = B_c (1 + 87 (nb + 4) 2^-22) + (nb + 4) 2^-126,  B_c = sum_b 1.5 |s_cb| d_b sum_k |q_k|
// B_c bounds the exact product's distance from A_c. The rest bounds every float rounding of the
// exact sequence (qmatmul.h's) and of A, B and A +- R: each a sum of at most nb + 3 roundings,
// relative 2^-24, of terms whose magnitudes sum to at most 128 / 1.5 B_c (|u - 128| <= 128), and
// an absolute 2^-149 per operation where values underflow. The row's threshold is max_c (A_c - R_c); a group of 16 columns where some
// A_c + R_c >= threshold (or is NaN) gets its exact products, bit for bit the plain op's, every
// other column -inf. The column of the largest exact logit (the first, on ties) then has the same
// index in this output as in the plain op's, and so does every argmax the runtime takes. A row
// whose threshold is not finite gets every column exact.
struct Screen {
  Problem problem;             // y: A_c + R_c after screen_groups, then the output
  const int32_t* qabs;         // [nb, m]: sum_k |q_k| of each row's block (block-major, as the rows)
  float* low;                  // [tasks, m]: max_c (A_c - R_c) of each task's groups
  const float* threshold;      // [m], for exact_groups
};
void screen_groups(const Screen& s, int task, int g0, int g1);
void exact_groups(const Screen& s, int g0, int g1);

// The gated activation of QMatMulGLU (qmatmul.cc) on a product y [m, 2F] = [gate | up]:
//   out[r, c] = g sigmoid(z) u,  g = y[r, c], u = y[r, F + c],  z = g (alpha + beta g^2)
// (SiLU: alpha 1, beta 0; GELU-tanh: 0.5 g (1 + tanh(s (g + 0.044715 g^3))) = g sigmoid(2 s (...)),
// alpha 2s, beta 2s 0.044715), columns [c0, c1) of every row, in this fixed float sequence:
//   z = beta == 0 ? g alpha : g fma(beta, g g, alpha);   e = exp_fixed(-z);   out = (g / (1 + e)) u
struct Gate {
  const float* y;    // [m, 2F]
  float* out;        // [m, F]
  int m, f;
  float alpha, beta;
};

// exp(x) as Cephes' expf, in a sequence each engine repeats exactly: x clamped to [kExpLo, kExpHi]
// (max, then min, as MAXPS / MINPS order their operands), n = round_half_even(x log2 e),
// r = x - n ln 2 in two fma steps, a degree-5 polynomial by fma, times 2^n from exponent bits.
constexpr float kExpLo = -87.3f, kExpHi = 88.3f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float exp_fixed(float x) {
  x = x > kExpLo ? x : kExpLo;
  x = x < kExpHi ? x : kExpHi;
  const float n = std::nearbyint(x * kLog2e);      // half to even in the default rounding mode
  float r = std::fma(n, -kLn2Hi, x);
  r = std::fma(n, -kLn2Lo, r);
  float p = kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = std::fma(p, r, kExpPoly[i]);
  p = std::fma(p, r * r, r) + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int>(n) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof pow2);
  return p * pow2;
}

inline float gated(float g, float u, float alpha, float beta) {
  const float z = beta == 0.f ? g * alpha : g * std::fma(beta, g * g, alpha);
  return (g / (1.f + exp_fixed(-z))) * u;
}

void gate_scalar(const Gate& a, int c0, int c1);
void gate_avx2(const Gate& a, int c0, int c1);     // the AVX2 and AMX engines'

// An engine quantizes the rows, then computes groups [g0, g1) of 16 columns for every row (called
// from ONNX Runtime's thread pool, one range per task), and (QMatMulGLU) the gated activation of
// its columns. The AMX and AVX-512 engines take blocks of 32 only (the op gives blocks of 16 to
// the AVX2 engine there: the same arithmetic).
struct Engine {
  const char* name;
  void (*quantize)(const float* x, int m, int k, int block, Rows* out);
  void (*groups)(const Problem& p, int g0, int g1);
  void (*gate)(const Gate& a, int c0, int c1);
};

bool amx_usable();      // AMX-INT8 + AVX-512 VNNI, and the OS lets this process use the tiles
bool avx512_usable();   // AVX-512 F/BW/DQ/VL + VNNI, FMA, F16C
bool avx2_usable();     // AVX2 + FMA + F16C
extern const Engine kAmxEngine, kAvx512Engine, kAvx2Engine, kScalarEngine;

// The AVX-512 VNNI engine's parts (qmatmul_avx512.cc) the AMX engine shares: activations in the
// row-major layout (the tiles'), and groups [g0, g1) of block-major rows, which one row's are in
// either layout (the AMX engine's one-row passes).
void quantize_avx512(const float* x, int m, int k, int block, Rows* out);
void vnni_groups(const Problem& p, int g0, int g1);

// The sum of a block of 32 (16) floats in the fixed tree every engine uses (GCC's
// _mm512_reduce_add_ps of x[0..15] + x[16..31]): pairs i, i+16 (blocks of 32), then i, i+8, then
// i, i+4, then (0 + 2) + (1 + 3).
inline float block_sum(const float* x, int block) {
  float w[16], t3[8], t6[4];
  for (int i = 0; i < 16; ++i) w[i] = block == kBlock ? x[i] + x[16 + i] : x[i];
  for (int j = 0; j < 8; ++j) t3[j] = w[j + 8] + w[j];
  for (int j = 0; j < 4; ++j) t6[j] = t3[j + 4] + t3[j];
  return (t6[0] + t6[2]) + (t6[1] + t6[3]);
}

}  // namespace qmm
}  // namespace conflayers_kernels
