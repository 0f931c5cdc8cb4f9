// Quantized weight x activation products for the CPU (see qgemm.cpp), shared by the matrix
// entry points and the fused decode step (decode.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace llama_engine {

constexpr int QK = 32;  // elements per quantization block, weights and activations alike

// How a product treats its activations (StepArgs::acts, the C API's and the bindings' `acts`).
enum class Acts : int32_t {
  exact = 0,  // float activations against weights widened to float
  int8 = 1,   // per 32-block int8 with a float scale: llama.cpp's Q8_1 scheme
  int16 = 2,  // per 32-block 16-bit integers with a float scale, held as two int8 digits
};

// Activations quantized per 32-block with a float scale d, so that each block's dot product with
// a weight block runs on integers. `digits` int8 digits an element:
//   1 (int8, llama.cpp's Q8_1): q = round(x / d) in [-127, 127], d = amax / 127;
//   2 (int16): q = round(x / d) in [-32512, 32512], d = amax / 32512, held as q = 255 * hi + lo
//      with hi = round(q / 255) and lo in [-127, 127]: a block's bytes are its 32 hi digits,
//      then its 32 lo digits. The kernels take sum(w * hi) and sum(w * lo) with the int8
//      machinery and combine them as 255 * sum(w * hi) + sum(w * lo) = sum(w * q), exactly.
//      Base 255 keeps both digits in [-127, 127] (AVX2's sign trick for q8 weights cannot negate
//      -128), and 127 * 255 + 127 = 32512 is the largest q they reach.
// Either way rounding is to nearest even, NaN becomes 0, and the bits are the same on every build.
struct QActs {
  std::vector<int8_t> q;     // [B, K * digits]
  std::vector<float> d;      // [B, K/32] scale
  std::vector<float> s;      // [B, K/32] d * sum(q), for the offset term of q4 weights
  std::vector<int32_t> sum;  // [B, K/32] sum(q), for q8 weights taken as unsigned (VNNI)
  std::vector<int32_t> sum_lo;  // [B, K/32] the sum of the block's first 16 q (per-16 scales)
  int64_t B = 0, K = 0;
  int digits = 1;
  // Size for x [B, K] at `digits` an element; the buffers grow but are never shrunk, so a
  // reused QActs stops allocating after its first use at a given size.
  void resize(int64_t B, int64_t K, int digits);
  // Quantize rows [b0, b1) of x [B, K] (after resize); rows are independent.
  void quantize_rows(const float* x, int64_t b0, int64_t b1);
  // resize, then every row, split over the threads.
  void quantize(const float* x, int64_t B, int64_t K, int digits);
  // The digits of row b's 32-block j (QK * digits bytes).
  const int8_t* block(int64_t b, int64_t j) const {
    return q.data() + (b * (K / QK) + j) * QK * digits;
  }
};

// The Acts a caller's integer names; throws std::invalid_argument on any other value.
inline Acts acts_from(int32_t v) {
  if (v < 0 || v > 2) throw std::invalid_argument("acts: 0 (exact), 1 (int8) or 2 (int16)");
  return static_cast<Acts>(v);
}

// The int8 digits an element the activations of `acts` take (0: float, not quantized).
inline int acts_digits(Acts acts) { return acts == Acts::int16 ? 2 : acts == Acts::int8 ? 1 : 0; }

// A weight matrix [N, K] in the kernels' layout (borrowed pointers). Rows are interleaved in
// groups of 16 (G = ceil(N / 16) groups; the last one zero-padded) and, within a 32-block, in
// runs of four consecutive elements, so one 64-byte load holds four elements of each of 16
// rows: a vector lane per output row, and no horizontal sums.
//   q8: qs int8 [G, K/32, 8, 16, 4]: element 4c + i of row r at [.., c, r, i]; w = d * q
//   q4: qs uint8 [G, K/32, 4, 16, 4]: byte [.., c, r, i] holds element 4c + i of row r in its
//       low nibble and element 16 + 4c + i in its high one (GGUF's byte 4c + i); w = d * q + m
//   q5: q4's nibbles, and each value's fifth bit in qh uint64 [G, K/32, 8]: mask v of a block
//       holds, at bit 4r + i, the fifth bit of row r's element kFifthStart[v] + i (the elements
//       the VNNI kernel's register v holds); w = d * (nibble + 16 * bit) + m
//   d, m: [G, K/per, 16], one scale (and offset) a `per` elements of a row
// (GGUF Q8_0 -> q8; Q6_K -> q8 with a scale per 16 elements; Q4_0, Q4_1 and Q4_K -> q4; Q5_0,
// Q5_1 and Q5_K -> q5.) Scales and offsets are float16 where that holds them exactly (the GGUF's
// own f16 values) and float32 otherwise (the K-quants' products of two scales): per 32 weights,
// Q4_1 20 bytes (as in the file), Q4_0 20 (the file's 18 plus the offset -8d), Q5_0 24 (22 plus
// the offset -16d), Q5_1 24, Q8_0 34, Q4_K 24, Q5_K 28, Q6_K 40.
// A weight kept in float32 instead (a type not kept quantized) is `dense`: qs is then the row-major
// [N, K] float32 matrix itself, d and m are unused, and every product takes the exact panel path.
struct QMat {
  bool q4;
  const void* qs;
  const void* d;  // float32, or float16 when f16
  const void* m;  // offsets (q4 and q5), like d; null for q8
  int64_t N, K;
  bool f16 = false;
  bool dense = false;
  int per = QK;  // elements a scale: 32, or 16 (q8 only)
  const uint64_t* qh = nullptr;  // q5's fifth bits (q4 is then true); null otherwise
};
// The first element of a block that each of q5's eight fifth-bit masks covers.
constexpr int kFifthStart[8] = {0, 16, 4, 20, 8, 24, 12, 28};
// Throws std::invalid_argument unless `w`'s kind, offsets and scale granularity go together.
void qmat_check(const QMat& w);
constexpr int GROUP = 16;

// out[b * ldo + n] for every activation row b and the weight rows n < N of groups [g0, g1).
// Each row's result depends on that row alone, whatever B and the tiling, and the quantized
// kernel's are the same bits on every instruction set (integer block sums, then the same float
// steps).
// Quantized activations (a.digits: int8, llama.cpp's scheme, ~0.5% relative error per product;
// int16, ~0.002%):
void qmat_rows_quant(const QMat& w, const QActs& a, float* out, int64_t ldo, int64_t g0,
                     int64_t g1);
// float activations against weights widened to float (d * q + m in one FMA):
// dequantize-then-matmul's arithmetic up to summation order and that one rounding.
void qmat_rows_f32(const QMat& w, const float* x, int64_t B, float* out, int64_t ldo,
                   int64_t g0, int64_t g1);
// out [B, N] = x [B, K] @ w.T, quantizing x first as `acts` says (acts_buf is the work buffer;
// dense weights always take the float kernel), split over the threads.
void qmat_linear(const QMat& w, const float* x, int64_t B, float* out, Acts acts,
                 QActs& acts_buf);
// The weight rows n < N of groups [g0, g1) as float32 into out [rows, K] (row-major, in order).
void qmat_dequant_rows(const QMat& w, float* out, int64_t g0, int64_t g1);
inline int64_t qmat_groups(const QMat& w) { return (w.N + GROUP - 1) / GROUP; }
// The instruction set the kernels were built for: "avx512-vnni", "avx2" or "generic".
const char* qgemm_isa();

// float16 <-> float32, one value (round to nearest even).
using half_t = uint16_t;  // IEEE float16 bits
float half_to_float(half_t h);
half_t float_to_half(float f);

// Vectorised helpers of the decode step.
void exp_inplace(float* x, int64_t n);  // x = exp(x), ~1 ulp in [-87, 88]; 0 below, inf above
float dot_f32(const float* a, const float* b, int64_t n);
// out[g * ldo + p] = scale * (q[g] . rows[p]) for g < nq, p < n; vectors of d floats, the nq
// query vectors contiguous in q. Each row is read once for all nq queries, and each score is
// computed the same way whatever n is (a prompt row's attention does not depend on its tile,
// nor on how its positions are split between calls).
void dot_rows(const float* q, int64_t nq, const float* const* rows, int64_t n, int64_t d,
              float scale, float* out, int64_t ldo);
// x = softmax(x) over n values, in an order fixed by n alone.
void softmax_inplace(float* x, int64_t n);
// out[g * ldo + i] (+)= sum_p w[g * ldw + p] * rows[p][i] for g < nq, i < d: overwriting out or
// (accumulate) adding to it. Each row is read once for all nq weight vectors.
void weighted_sum_rows(const float* w, int64_t nq, int64_t ldw, const float* const* rows,
                       int64_t n, int64_t d, float* out, int64_t ldo, bool accumulate);

// The same over float16 rows (a float16 KV cache), widened to float32 as they are read.
void dot_rows(const float* q, int64_t nq, const half_t* const* rows, int64_t n, int64_t d,
              float scale, float* out, int64_t ldo);
void weighted_sum_rows(const float* w, int64_t nq, int64_t ldw, const half_t* const* rows,
                       int64_t n, int64_t d, float* out, int64_t ldo, bool accumulate);
// out[i] = x[i] rounded to float16 (nearest even), for writing the KV cache.
void to_half(const float* x, int64_t n, half_t* out);
inline void to_half(const float* x, int64_t n, float* out) { std::copy_n(x, n, out); }

}  // namespace llama_engine
