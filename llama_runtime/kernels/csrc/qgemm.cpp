// Quantized weight x activation products for the CPU, in the shapes a decode step and a prompt
// chunk need. Layouts: see qgemm.h. Three builds of the same arithmetic: AVX-512 VNNI, AVX2 +
// FMA, and plain C++ (library.py picks the flags from the CPU).
//
// Quantized-activation products: activations are quantized per 32-block (QActs) and each block's
// dot product runs on integers, then is scaled once per block. int8 is llama.cpp's CPU scheme;
// int16 holds each activation as two int8 digits (q = 255 * hi + lo) and runs the same integer
// machinery once per digit, so a block's integer sum is exact either way. The weight layout puts
// one output row in each vector lane, so a block's integer sum for 16 rows is eight
// multiply-accumulate instructions a digit against broadcast activations (vpdpbusd, or maddubs +
// madd without VNNI), and the float scaling is one FMA per 16 rows: no horizontal sums anywhere.
// VNNI multiplies unsigned by signed bytes: q4 nibbles are unsigned already, and q8 weights are
// flipped to w + 128 with the block's -128 * sum(q) as the accumulator's start. Integer sums are
// exact, so every build gives the same bits.
//
// float products keep a row per lane too: each output is one FMA chain over k in order, with
// weights widened as they are read (few rows) or once into a panel (many rows).
#include "qgemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "parallel.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LE_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LE_VNNI512 1
#endif
#endif

namespace llama_engine {

const char* qgemm_isa() {
#if defined(LE_VNNI512)
  return "avx512-vnni";
#elif defined(LE_AVX2)
  return "avx2";
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
  return "neon-dotprod";  // the portable code, vectorized by the compiler for AArch64 + dotprod
#else
  return "generic";
#endif
}

void QActs::resize(int64_t B_, int64_t K_, int digits_) {
  B = B_;
  K = K_;
  digits = digits_;
  const int64_t nb = K / QK;
  if (static_cast<int64_t>(q.size()) < B * K * digits) q.resize(B * K * digits);
  if (static_cast<int64_t>(d.size()) < B * nb) {
    d.resize(B * nb);
    s.resize(B * nb);
    sum.resize(B * nb);
    sum_lo.resize(B * nb);
  }
}

namespace {

// The reciprocal of a block's scale; 0 for an all-zero block, and for one so small (below about
// 3.7e-37) that the reciprocal overflows: such a block quantizes to zeros.
inline float inverse_scale(float scale) {
  const float inv = scale > 0.f ? 1.f / scale : 0.f;
  return std::isfinite(inv) ? inv : 0.f;
}

// The largest |q| of D digits an element (QActs).
template <int D>
constexpr float kQMax = D == 1 ? 127.f : 32512.f;
constexpr int kDigitBase = 255;  // q = 255 * hi + lo (two digits)

// The high digit of q, round(q / 255): |q| / 255 is at least 1/510 from a half-integer and
// q * fl(1/255) is within 2e-5 of q / 255, so the rounding is exact (the same integer on every
// build).
inline float high_digit(float q) { return std::nearbyint(q * (1.f / kDigitBase)); }

#if LE_AVX2
inline int32_t hsum_i32(__m256i v) {
  __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
  return _mm_cvtsi128_si32(t4);
}

// Eight int32 lanes in [-128, 127] of each of v[0..3] to 32 int8s, in order.
inline void store_bytes(const __m256i v[4], int8_t* out) {
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]),
                                       _mm256_packs_epi32(v[2], v[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}
#endif

// One 32-block at D digits an element: amax / kQMax as the scale (NaNs ignored), values rounded
// to nearest even and clamped to [-kQMax, kQMax], NaN to 0: the same bits with or without
// vector instructions.
template <int D>
inline void quantize_block(const float* xb, int8_t* qb, float* d, float* s, int32_t* sum,
                           int32_t* sum_lo) {
  constexpr float qmax = kQMax<D>;
#if LE_AVX2
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(xb + 8 * i);
    // maxps returns its second operand when either is NaN: NaNs leave amax as it is
    amax = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), amax);
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float scale = _mm_cvtss_f32(m4) / qmax;
  const __m256 inv = _mm256_set1_ps(inverse_scale(scale));
  __m256i iv[4];
  for (int i = 0; i < 4; ++i) {
    __m256 f = _mm256_mul_ps(v[i], inv);
    f = _mm256_and_ps(f, _mm256_cmp_ps(f, f, _CMP_ORD_Q));  // NaN -> 0
    f = _mm256_min_ps(_mm256_max_ps(f, _mm256_set1_ps(-qmax)), _mm256_set1_ps(qmax));
    iv[i] = _mm256_cvtps_epi32(f);  // round to nearest even (MXCSR's default)
  }
  if constexpr (D == 1) {
    store_bytes(iv, qb);
  } else {
    __m256i hi[4], lo[4];
    for (int i = 0; i < 4; ++i) {
      hi[i] = _mm256_cvtps_epi32(  // high_digit's arithmetic
          _mm256_mul_ps(_mm256_cvtepi32_ps(iv[i]), _mm256_set1_ps(1.f / kDigitBase)));
      lo[i] = _mm256_sub_epi32(iv[i], _mm256_mullo_epi32(hi[i], _mm256_set1_epi32(kDigitBase)));
    }
    store_bytes(hi, qb);
    store_bytes(lo, qb + QK);
  }
  const int32_t lo_q = hsum_i32(_mm256_add_epi32(iv[0], iv[1]));
  const int32_t total_q = lo_q + hsum_i32(_mm256_add_epi32(iv[2], iv[3]));
#else
  float amax = 0.f;
  for (int k = 0; k < QK; ++k) amax = std::max(amax, std::fabs(xb[k]));  // NaN: keeps amax
  const float scale = amax / qmax;
  const float inv = inverse_scale(scale);
  int32_t total_q = 0, lo_q = 0;
  for (int k = 0; k < QK; ++k) {
    const float f = xb[k] * inv;
    const float q = std::isnan(f) ? 0.f : std::nearbyint(std::clamp(f, -qmax, qmax));
    if constexpr (D == 1) {
      qb[k] = static_cast<int8_t>(q);
    } else {
      const float hi = high_digit(q);
      qb[k] = static_cast<int8_t>(hi);
      qb[QK + k] = static_cast<int8_t>(static_cast<int>(q) - kDigitBase * static_cast<int>(hi));
    }
    total_q += static_cast<int32_t>(q);
    if (k == QK / 2 - 1) lo_q = total_q;
  }
#endif
  *d = scale;
  *s = scale * static_cast<float>(total_q);
  *sum = total_q;
  *sum_lo = lo_q;
}

}  // namespace

void QActs::quantize_rows(const float* x, int64_t b0, int64_t b1) {
  const int64_t nb = K / QK;
  for (int64_t i = b0 * nb; i < b1 * nb; ++i) {
    int8_t* qb = q.data() + i * QK * digits;
    if (digits == 2)
      quantize_block<2>(x + i * QK, qb, d.data() + i, s.data() + i, sum.data() + i,
                        sum_lo.data() + i);
    else
      quantize_block<1>(x + i * QK, qb, d.data() + i, s.data() + i, sum.data() + i,
                        sum_lo.data() + i);
  }
}

void QActs::quantize(const float* x, int64_t B_, int64_t K_, int digits_) {
  resize(B_, K_, digits_);
  parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) { quantize_rows(x, b0, b1); });
}

namespace {

constexpr int64_t kPanelRows = 4;  // from this many activation rows on, widen weights once

inline float scale_at(const QMat& w, const void* a, int64_t i) {
  if (!w.f16) return static_cast<const float*>(a)[i];
  return half_to_float(static_cast<const uint16_t*>(a)[i]);
}

// Bytes of one group's 32-block (16 rows).
inline int64_t block_bytes(const QMat& w) { return w.q4 ? GROUP * QK / 2 : GROUP * QK; }

// The quantized kernels' weight kinds (qgemm.h): q8, q4, q5 (q4 and fifth bits), q8 with a scale
// a 16 elements.
enum class WKind { q8 = 0, q4 = 1, q5 = 2, q8_half = 3 };
inline WKind kind_of(const QMat& w) {
  return w.q4 ? (w.qh ? WKind::q5 : WKind::q4) : w.per == 16 ? WKind::q8_half : WKind::q8;
}

// q5's eight fifth-bit masks of group g's block j.
inline const uint64_t* fifth_masks(const QMat& w, int64_t g, int64_t j) {
  return w.qh + (g * (w.K / QK) + j) * 8;
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if LE_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline __m256 exp256(__m256 x) {  // Cephes' expf: range reduction to [-ln2/2, ln2/2], degree 6
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)),
                    _mm256_set1_ps(88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                              _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Eight scales (or offsets) from i on, as float32.
inline __m256 load_scales8(const QMat& w, const void* a, int64_t i) {
  if (w.f16)
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(a) + i)));
  return _mm256_loadu_ps(static_cast<const float*>(a) + i);
}

// Weight blocks fetched ahead of use in the quantized kernels: block j + kPrefetchBlocks of the
// group (or of the next group: groups are contiguous; past the end a prefetch is only a hint
// and never faults). The hardware prefetcher alone leaves products with quantized activations
// short of the memory's bandwidth: prefetching is ~10% off a one-row product and ~20% off one
// of sixteen rows (measured with both builds' calls interleaved in one process).
constexpr int64_t kPrefetchBlocks = 8;
template <bool Q5>
inline void prefetch_ahead(const QMat& w, const uint8_t* blk, int64_t g, int64_t j) {
  for (int64_t o = 0; o < block_bytes(w); o += 64)
    _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBlocks * block_bytes(w) + o),
                 _MM_HINT_T0);
  if (Q5)
    _mm_prefetch(reinterpret_cast<const char*>(fifth_masks(w, g, j + kPrefetchBlocks)),
                 _MM_HINT_T0);
}

// 32 bits -> 32 bytes: byte i is 16 where bit i is set, else 0 (q5's fifth bits of eight rows).
inline __m256i fifth_bytes(uint32_t bits) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(bits)), spread);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit),
                          _mm256_set1_epi8(16));
}
#endif  // LE_AVX2

#if LE_VNNI512
inline __m512 load_scales16(const QMat& w, const void* a, int64_t i) {
  if (w.f16)
    return _mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(a) + i)));
  return _mm512_loadu_ps(static_cast<const float*>(a) + i);
}

// 255 * v, the high digit's weight (QActs), in two cheap instructions.
inline __m512i times_base(__m512i v) { return _mm512_sub_epi32(_mm512_slli_epi32(v, 8), v); }

// One group (16 weight rows, a lane each) against T activation rows from b0, at D digits an
// activation. Each weight block is loaded once into eight registers, vpdpbusd's unsigned
// operand: q4 nibbles as they are, q8 weights flipped to w + 128 (the accumulator then starts at
// -128 * sum(q)). Register r holds four elements of each row, from element kRunStart[Q4][r].
constexpr int kRunStart[2][8] = {{0, 4, 8, 12, 16, 20, 24, 28},   // q8: run c
                                 {0, 16, 4, 20, 8, 24, 12, 28}};  // q4: run c's low, high nibbles
template <int T, int D, WKind W>
inline void group_q(const QMat& w, const QActs& a, int64_t g, int64_t b0, float* out,
                    int64_t ldo) {
  constexpr bool Q5 = W == WKind::q5, Q4 = W == WKind::q4 || Q5;  // Q4: nibbles
  constexpr bool HALVES = W == WKind::q8_half;
  const int64_t nb = w.K / QK;
  const uint8_t* wq = static_cast<const uint8_t*>(w.qs) + g * nb * block_bytes(w);
  const __m512i low = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i sixteen = _mm512_set1_epi8(16);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    const uint8_t* blk = wq + j * block_bytes(w);
    prefetch_ahead<Q5>(w, blk, g, j);
    __m512i wv[8];
    for (int c = 0; c < (Q4 ? 4 : 8); ++c) {
      const __m512i v = _mm512_loadu_si512(blk + 64 * c);
      if (Q4) {
        wv[2 * c] = _mm512_and_si512(v, low);
        wv[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      } else {
        wv[c] = _mm512_xor_si512(v, flip);
      }
    }
    if constexpr (Q5) {  // each value's fifth bit, from its register's mask (qgemm.h)
      const uint64_t* masks = fifth_masks(w, g, j);
      for (int r = 0; r < 8; ++r)
        wv[r] = _mm512_mask_add_epi8(wv[r], _cvtu64_mask64(masks[r]), wv[r], sixteen);
    }
    // the block's sum(w * digit) of 16 rows against one digit's 32 bytes, in two independent
    // chains of vpdpbusd from starts s0 and s1 (their latency bounds a tile more than their
    // number does): registers 0-3 and 4-7, which for q8 are the block's two 16-element halves
    auto dot = [&](__m512i s0, __m512i s1, const int8_t* x, __m512i& h0, __m512i& h1) {
      for (int r = 0; r < 4; ++r) {
        s0 = _mm512_dpbusd_epi32(s0, wv[r], _mm512_set1_epi32(load_i32(x + kRunStart[Q4][r])));
        s1 = _mm512_dpbusd_epi32(s1, wv[r + 4],
                                 _mm512_set1_epi32(load_i32(x + kRunStart[Q4][r + 4])));
      }
      h0 = s0;
      h1 = s1;
    };
    const __m512i zero = _mm512_setzero_si512();
    const int64_t at = (g * nb + j) * GROUP;
    // one scale a block, or (HALVES) one a 16-element half: [G, K/16, 16]
    const __m512 dw = load_scales16(w, w.d, HALVES ? 2 * at : at);
    const __m512 dw_hi = HALVES ? load_scales16(w, w.d, 2 * at + GROUP) : dw;
    const __m512 mw = Q4 ? load_scales16(w, w.m, at) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {  // unrolled: the accumulators stay in registers
      const int64_t xb = (b0 + t) * nb + j;  // the activation row's block
      const int8_t* x = a.q.data() + xb * QK * D;  // its digits
      // the q8 flip's -128 * sum(q) starts the last digit's sums (per half with HALVES); the
      // high digit's count 255 times
      const int32_t lo_q = HALVES ? a.sum_lo[xb] : 0;
      __m512i h0, h1, g0 = zero, g1 = zero;
      dot(Q4 ? zero : _mm512_set1_epi32(-128 * (HALVES ? lo_q : a.sum[xb])),
          HALVES ? _mm512_set1_epi32(-128 * (a.sum[xb] - lo_q)) : zero, x + (D - 1) * QK, h0,
          h1);
      if constexpr (D == 2) dot(zero, zero, x, g0, g1);
      const __m512 ad = _mm512_set1_ps(a.d[xb]);
      if constexpr (HALVES) {  // a sum and a scale a half
        if constexpr (D == 2) {
          h0 = _mm512_add_epi32(h0, times_base(g0));
          h1 = _mm512_add_epi32(h1, times_base(g1));
        }
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h0), _mm512_mul_ps(dw, ad), acc[t]);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h1), _mm512_mul_ps(dw_hi, ad), acc[t]);
      } else {  // the halves' chains join first: one base multiply for the high digit
        __m512i isum = _mm512_add_epi32(h0, h1);
        if constexpr (D == 2) isum = _mm512_add_epi32(isum, times_base(_mm512_add_epi32(g0, g1)));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, ad), acc[t]);
      }
      if (Q4) acc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.s[xb]), acc[t]);
    }
  }
  const int64_t rows = std::min<int64_t>(GROUP, w.N - g * GROUP);
  const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
  for (int t = 0; t < T; ++t) _mm512_mask_storeu_ps(out + (b0 + t) * ldo + g * GROUP, keep, acc[t]);
}
#elif LE_AVX2
// 255 * v, the high digit's weight (QActs).
inline __m256i times_base(__m256i v) { return _mm256_sub_epi32(_mm256_slli_epi32(v, 8), v); }

// One group against T activation rows from b0 at D digits an activation, as two halves of eight
// rows (a lane each): maddubs + madd take each digit's block sums (no VNNI), then the digits
// combine as in the VNNI kernel.
template <int T, int D, WKind W>
inline void group_q(const QMat& w, const QActs& a, int64_t g, int64_t b0, float* out,
                    int64_t ldo) {
  constexpr bool Q5 = W == WKind::q5, Q4 = W == WKind::q4 || Q5;  // Q4: nibbles
  constexpr int HALVES = W == WKind::q8_half ? 2 : 1;  // integer sums kept a block
  const int64_t nb = w.K / QK;
  const uint8_t* wq = static_cast<const uint8_t*>(w.qs) + g * nb * block_bytes(w);
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    __m256 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; ++j) {
      const uint8_t* blk = wq + j * block_bytes(w) + 32 * h;
      if (h == 0) prefetch_ahead<Q5>(w, blk, g, j);  // the whole block, both halves' lanes
      const int8_t* x[T];
      for (int t = 0; t < T; ++t) x[t] = a.q.data() + ((b0 + t) * nb + j) * QK * D;
      __m256i isum[T][D][HALVES];  // per digit (and half)
      if (Q4) {
        // a nibble x a digit pair is at most 2 * 15 * 127 = 3810, so the block's eight pair
        // sums fit 16 bits (30480): one madd a block instead of one per maddubs. A q5 value's
        // pairs reach 2 * 31 * 127 = 7874: they are widened every run instead.
        __m256i pairs[T][D];
        for (int t = 0; t < T; ++t)
          for (int e = 0; e < D; ++e) {
            pairs[t][e] = _mm256_setzero_si256();
            isum[t][e][0] = _mm256_setzero_si256();
          }
        const uint64_t* masks = Q5 ? fifth_masks(w, g, j) : nullptr;
        for (int c = 0; c < 4; ++c) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * c));
          __m256i lo = _mm256_and_si256(v, low);
          __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          if constexpr (Q5) {
            lo = _mm256_or_si256(lo, fifth_bytes(static_cast<uint32_t>(masks[2 * c] >> 32 * h)));
            hi = _mm256_or_si256(hi,
                                 fifth_bytes(static_cast<uint32_t>(masks[2 * c + 1] >> 32 * h)));
          }
          for (int t = 0; t < T; ++t)
            for (int e = 0; e < D; ++e) {
              const int8_t* xd = x[t] + e * QK;
              const __m256i xl = _mm256_set1_epi32(load_i32(xd + 4 * c));
              const __m256i xh = _mm256_set1_epi32(load_i32(xd + 16 + 4 * c));
              pairs[t][e] = _mm256_add_epi16(
                  pairs[t][e], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl),
                                                _mm256_maddubs_epi16(hi, xh)));
              if constexpr (Q5) {
                isum[t][e][0] =
                    _mm256_add_epi32(isum[t][e][0], _mm256_madd_epi16(pairs[t][e], ones));
                pairs[t][e] = _mm256_setzero_si256();
              }
            }
        }
        if constexpr (!Q5)
          for (int t = 0; t < T; ++t)
            for (int e = 0; e < D; ++e) isum[t][e][0] = _mm256_madd_epi16(pairs[t][e], ones);
      } else {
        for (int t = 0; t < T; ++t)
          for (int e = 0; e < D; ++e)
            for (int hv = 0; hv < HALVES; ++hv) isum[t][e][hv] = _mm256_setzero_si256();
        for (int c = 0; c < 8; ++c) {
          const int hv = HALVES == 2 ? c / 4 : 0;  // runs 0-3 are elements 0-15
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * c));
          const __m256i av = _mm256_sign_epi8(v, v);  // |w| as u8; the sign moves to x
          for (int t = 0; t < T; ++t)
            for (int e = 0; e < D; ++e) {
              const __m256i x4 =
                  _mm256_sign_epi8(_mm256_set1_epi32(load_i32(x[t] + e * QK + 4 * c)), v);
              isum[t][e][hv] = _mm256_add_epi32(
                  isum[t][e][hv], _mm256_madd_epi16(_mm256_maddubs_epi16(av, x4), ones));
            }
        }
      }
      const int64_t at = (g * nb + j) * GROUP + 8 * h;
      for (int hv = 0; hv < HALVES; ++hv) {
        // one scale a block, or one a 16-element half ([G, K/16, 16])
        const int64_t d_at = HALVES == 2 ? (2 * (g * nb + j) + hv) * GROUP + 8 * h : at;
        const __m256 dw = load_scales8(w, w.d, d_at);
        for (int t = 0; t < T; ++t) {
          __m256i total = isum[t][0][hv];
          if constexpr (D == 2) total = _mm256_add_epi32(times_base(total), isum[t][1][hv]);
          acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total),
                                   _mm256_mul_ps(dw, _mm256_set1_ps(a.d[(b0 + t) * nb + j])),
                                   acc[t]);
        }
      }
      if (Q4) {
        const __m256 mw = load_scales8(w, w.m, at);
        for (int t = 0; t < T; ++t)
          acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s[(b0 + t) * nb + j]), acc[t]);
      }
    }
    const int64_t rows = std::min<int64_t>(8, w.N - g * GROUP - 8 * h);
    for (int t = 0; t < T; ++t) {
      float* o = out + (b0 + t) * ldo + g * GROUP + 8 * h;
      if (rows == 8) {
        _mm256_storeu_ps(o, acc[t]);
      } else if (rows > 0) {
        float buf[8];
        _mm256_storeu_ps(buf, acc[t]);
        std::copy_n(buf, rows, o);
      }
    }
  }
}
#endif

// Element k of weight row n, as its quantized integer (q4: 0..15, q5: 0..31, q8: -128..127).
inline int quant_at(const QMat& w, int64_t n, int64_t k) {
  const int64_t nb = w.K / QK, j = k / QK, i = k % QK, r = n % GROUP;
  const uint8_t* blk = static_cast<const uint8_t*>(w.qs) + ((n / GROUP) * nb + j) * block_bytes(w);
  if (w.q4) {
    const int64_t e = i % 16;  // nibble pair: elements e and e + 16
    const uint8_t byte = blk[(e / 4) * 64 + r * 4 + e % 4];
    const int nibble = i < 16 ? (byte & 0x0F) : (byte >> 4);
    if (!w.qh) return nibble;
    const uint64_t mask = fifth_masks(w, n / GROUP, j)[2 * (e / 4) + (i < 16 ? 0 : 1)];
    return nibble | static_cast<int>((mask >> (4 * r + e % 4)) & 1) << 4;
  }
  return reinterpret_cast<const int8_t*>(blk)[(i / 4) * 64 + r * 4 + i % 4];
}

// Index of the scale of row n's scale block j (w.per elements a block); with per = 32 also its
// offset's.
inline int64_t scale_index(const QMat& w, int64_t n, int64_t j) {
  return ((n / GROUP) * (w.K / w.per) + j) * GROUP + n % GROUP;
}

[[maybe_unused]] inline float weight_at(const QMat& w, int64_t n, int64_t k) {
  if (w.dense) return static_cast<const float*>(w.qs)[n * w.K + k];
  const int64_t at = scale_index(w, n, k / w.per);
  const float q = static_cast<float>(quant_at(w, n, k));
  if (w.m) return std::fma(q, scale_at(w, w.d, at), scale_at(w, w.m, at));
  return q * scale_at(w, w.d, at);
}

// The quantized product without vector instructions: the same integer sums and float steps.
[[maybe_unused]] void rows_q_scalar(const QMat& w, const QActs& a, float* out, int64_t ldo,
                                    int64_t g0, int64_t g1) {
  const int64_t nb = w.K / QK;
  const int64_t n1 = std::min(w.N, g1 * GROUP);
  for (int64_t n = g0 * GROUP; n < n1; ++n)
    for (int64_t b = 0; b < a.B; ++b) {
      float acc = 0.f;
      for (int64_t j = 0; j < nb; ++j) {
        const int8_t* xq = a.block(b, j);
        const int halves = QK / w.per;  // integer sums a block: one per scale
        int32_t isum[2] = {0, 0};
        for (int i = 0; i < QK; ++i) {
          const int32_t q = a.digits == 2 ? kDigitBase * xq[i] + xq[QK + i] : xq[i];
          isum[i / w.per] += quant_at(w, n, j * QK + i) * q;
        }
        for (int hv = 0; hv < halves; ++hv)
          acc = std::fma(static_cast<float>(isum[hv]),
                         scale_at(w, w.d, scale_index(w, n, j * halves + hv)) * a.d[b * nb + j],
                         acc);
        if (w.m) acc = std::fma(scale_at(w, w.m, scale_index(w, n, j)), a.s[b * nb + j], acc);
      }
      out[b * ldo + n] = acc;
    }
}

#if LE_AVX2
// The float kernel keeps one output row per vector lane too: every output is one FMA chain over
// k = 0, 1, ..., K - 1 of (widened weight) x (activation), whatever the build, the number of rows
// or the tiling, so a row's result depends on that row alone. Lanes<N> is a vector of N rows
// (16 with AVX-512, 8 with AVX2, where a group is two halves).
template <int N>
struct Lanes;
#if LE_VNNI512
template <>
struct Lanes<16> {
  using F = __m512;
  using I = __m512i;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static I load_runs(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I byte_signed(I v, int i) {  // byte i of each lane, sign-extended
    return _mm512_srai_epi32(_mm512_sllv_epi32(v, _mm512_set1_epi32(24 - 8 * i)), 24);
  }
  static I nibbles(I v, int shift) {  // each byte's low (0) or high (4) nibble
    return _mm512_and_si512(_mm512_srli_epi16(v, shift), _mm512_set1_epi8(0x0F));
  }
  static I byte_unsigned(I v, int i) {  // byte i of each lane
    return _mm512_and_si512(_mm512_srli_epi32(v, 8 * i), _mm512_set1_epi32(0xFF));
  }
  static I with_fifth(I v, uint64_t mask, int) {  // 16 added to the bytes of mask's set bits
    return _mm512_mask_add_epi8(v, _cvtu64_mask64(mask), v, _mm512_set1_epi8(16));
  }
  static F scales(const QMat& w, const void* a, int64_t i) { return load_scales16(w, a, i); }
};
#endif
template <>
struct Lanes<8> {
  using F = __m256;
  using I = __m256i;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static I load_runs(const uint8_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static I byte_signed(I v, int i) {
    return _mm256_srai_epi32(_mm256_sllv_epi32(v, _mm256_set1_epi32(24 - 8 * i)), 24);
  }
  static I nibbles(I v, int shift) {
    return _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8(0x0F));
  }
  static I byte_unsigned(I v, int i) {
    return _mm256_and_si256(_mm256_srli_epi32(v, 8 * i), _mm256_set1_epi32(0xFF));
  }
  static I with_fifth(I v, uint64_t mask, int h) {  // lanes h: the mask's bits [32h, 32h + 32)
    return _mm256_or_si256(v, fifth_bytes(static_cast<uint32_t>(mask >> 32 * h)));
  }
  static F scales(const QMat& w, const void* a, int64_t i) { return load_scales8(w, a, i); }
};
#if LE_VNNI512
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
using L = Lanes<kLanes>;

// Calls f(k, widened weights of element k for the lanes' rows) for k = 0..K-1 in order: lanes
// [h * kLanes, (h + 1) * kLanes) of group g, from the quantized layout (w = q * d, or
// fma(q, d, m) for q4).
template <class F>
inline void for_each_k(const QMat& w, int64_t g, int h, const F& f) {
  const int64_t nb = w.K / QK;
  const uint8_t* wq = static_cast<const uint8_t*>(w.qs) + g * nb * block_bytes(w) +
                      h * kLanes * 4;
  for (int64_t j = 0; j < nb; ++j) {
    const uint8_t* blk = wq + j * block_bytes(w);
    const int64_t at = (g * nb + j) * GROUP + h * kLanes;
    const L::F d = w.per == QK ? L::scales(w, w.d, at) : L::zero();
    if (w.q4) {
      const L::F m = L::scales(w, w.m, at);
      const uint64_t* masks = w.qh ? fifth_masks(w, g, j) : nullptr;
      L::I runs[4];
      for (int c = 0; c < 4; ++c) runs[c] = L::load_runs(blk + 64 * c);
      for (int half = 0; half < 2; ++half)  // low nibbles: elements 0-15, high: 16-31
        for (int c = 0; c < 4; ++c) {
          L::I v = L::nibbles(runs[c], 4 * half);  // a value a byte
          if (masks) v = L::with_fifth(v, masks[2 * c + half], h);
          for (int i = 0; i < 4; ++i)
            f(j * QK + 16 * half + 4 * c + i, L::fma(L::cvt(L::byte_unsigned(v, i)), d, m));
        }
    } else {
      L::F dc = d;
      for (int c = 0; c < 8; ++c) {
        if (w.per == 16 && c % 4 == 0)  // a scale a 16-element half: [G, K/16, 16]
          dc = L::scales(w, w.d, (2 * (g * nb + j) + c / 4) * GROUP + h * kLanes);
        const L::I run = L::load_runs(blk + 64 * c);
        for (int i = 0; i < 4; ++i) f(j * QK + 4 * c + i, L::mul(L::cvt(L::byte_signed(run, i)), dc));
      }
    }
  }
}

// T activation rows from b0 against lanes h of group g, weights widened as they are read.
template <int T>
inline void lanes_f32(const QMat& w, const float* x, int64_t g, int h, int64_t b0, L::F acc[T]) {
  for (int t = 0; t < T; ++t) acc[t] = L::zero();
  const int64_t K = w.K;
  for_each_k(w, g, h, [&](int64_t k, L::F wk) {
    for (int t = 0; t < T; ++t) acc[t] = L::fma(wk, L::set1(x[(b0 + t) * K + k]), acc[t]);
  });
}

// The same for U units of kLanes weight rows against a panel of already widened weights,
// [K][U][kLanes] (many activation rows). Two units a panel give each broadcast activation two
// FMAs: one unit's loads (a weight vector and T broadcasts for T FMAs) left the FMA units ~25%
// idle; with two the kernel runs near the FMA peak. Each output is still one FMA chain over k.
template <int U, int T>
inline void panel_f32(const float* panel, int64_t K, const float* x, int64_t b0,
                      L::F acc[U][T]) {
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < T; ++t) acc[u][t] = L::zero();
  for (int64_t k = 0; k < K; ++k) {
    L::F wk[U];
    for (int u = 0; u < U; ++u) wk[u] = L::load(panel + (k * U + u) * kLanes);
    for (int t = 0; t < T; ++t) {
      const L::F xk = L::set1(x[(b0 + t) * K + k]);
      for (int u = 0; u < U; ++u) acc[u][t] = L::fma(wk[u], xk, acc[u][t]);
    }
  }
}

// Units [u0, u0 + U) widened into panel [K][U][kLanes]: dense weights transposed, quantized
// ones through for_each_k (the same values the on-the-fly path computes). A unit is kLanes
// weight rows: lanes h of group g is unit g * kUnits + h.
constexpr int kUnits = GROUP / kLanes;
template <int U>
inline void widen_units(const QMat& w, int64_t u0, float* panel) {
  const int64_t K = w.K;
  for (int u = 0; u < U; ++u) {
    const int64_t g = (u0 + u) / kUnits;
    const int h = static_cast<int>((u0 + u) % kUnits);
    if (w.dense) {
      for (int r = 0; r < kLanes; ++r) {
        const int64_t n = (u0 + u) * kLanes + r;
        float* col = panel + u * kLanes + r;
        if (n >= w.N) {  // padding lanes
          for (int64_t k = 0; k < K; ++k) col[k * U * kLanes] = 0.f;
          continue;
        }
        const float* row = static_cast<const float*>(w.qs) + n * K;
        for (int64_t k = 0; k < K; ++k) col[k * U * kLanes] = row[k];
      }
    } else {
      for_each_k(w, g, h, [&](int64_t k, L::F wk) { L::store(panel + (k * U + u) * kLanes, wk); });
    }
  }
}

// acc[t] into the output rows of unit u (rows past N are padding, not stored).
template <int T>
inline void store_unit(const QMat& w, int64_t u, int64_t b0, const L::F acc[T], float* out,
                       int64_t ldo) {
  const int64_t n0 = u * kLanes;
  const int64_t rows = std::min<int64_t>(kLanes, w.N - n0);
  for (int t = 0; t < T; ++t) {
    float* o = out + (b0 + t) * ldo + n0;
    if (rows == kLanes) {
      L::store(o, acc[t]);
    } else if (rows > 0) {
      float buf[kLanes];
      L::store(buf, acc[t]);
      std::copy_n(buf, rows, o);
    }
  }
}
#endif  // LE_AVX2

}  // namespace

namespace {

#if LE_AVX2
// Every activation row against groups [g0, g1) at D digits: tiles of rows share each weight
// block's loads; any tiling gives the same bits.
template <int D, WKind W>
void rows_q(const QMat& w, const QActs& a, float* out, int64_t ldo, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    int64_t b0 = 0;
#if LE_VNNI512
    for (; b0 + 8 <= a.B; b0 += 8) group_q<8, D, W>(w, a, g, b0, out, ldo);
#endif
    for (; b0 + 4 <= a.B; b0 += 4) group_q<4, D, W>(w, a, g, b0, out, ldo);
    for (; b0 + 2 <= a.B; b0 += 2) group_q<2, D, W>(w, a, g, b0, out, ldo);
    if (b0 < a.B) group_q<1, D, W>(w, a, g, b0, out, ldo);
  }
}
#endif

}  // namespace

void qmat_check(const QMat& w) {
  if (w.dense) return;
  if (w.per != QK && w.per != QK / 2)
    throw std::invalid_argument("a quantized weight has a scale a 32 or a 16 elements");
  if (w.per == QK / 2 && w.q4)
    throw std::invalid_argument("scales a 16 elements are for q8 weights");
  if (w.q4 != (w.m != nullptr))
    throw std::invalid_argument("q4 and q5 weights have offsets, q8 weights none");
  if (w.qh && !w.q4) throw std::invalid_argument("fifth bits are for q5 (nibble) weights");
  if (w.K % QK != 0) throw std::invalid_argument("a quantized weight's K is a multiple of 32");
}

void qmat_rows_quant(const QMat& w, const QActs& a, float* out, int64_t ldo, int64_t g0,
                     int64_t g1) {
#if LE_AVX2
  using F = void (*)(const QMat&, const QActs&, float*, int64_t, int64_t, int64_t);
  using K = WKind;
  static constexpr F kernels[2][4] = {
      {rows_q<1, K::q8>, rows_q<1, K::q4>, rows_q<1, K::q5>, rows_q<1, K::q8_half>},
      {rows_q<2, K::q8>, rows_q<2, K::q4>, rows_q<2, K::q5>, rows_q<2, K::q8_half>}};
  kernels[a.digits - 1][static_cast<int>(kind_of(w))](w, a, out, ldo, g0, g1);
#else
  rows_q_scalar(w, a, out, ldo, g0, g1);
#endif
}

void qmat_rows_f32(const QMat& w, const float* x, int64_t B, float* out, int64_t ldo,
                   int64_t g0, int64_t g1) {
#if LE_AVX2
  // Few rows widen each weight as it is read; many rows (or dense weights) widen two units at a
  // time once into a panel that stays in L2 and stream every row past it.
  const bool panel = B >= kPanelRows || w.dense;
  thread_local std::vector<float> buf;
  if (panel && static_cast<int64_t>(buf.size()) < w.K * 2 * kLanes) buf.resize(w.K * 2 * kLanes);
  const int64_t u1 = std::min(g1 * kUnits, (w.N + kLanes - 1) / kLanes);
  for (int64_t u = g0 * kUnits; u < u1;) {
    // Activation rows in tiles of T: as many as the registers hold (U * T accumulators).
    auto rows = [&](auto units, auto tile, auto tail) {
      constexpr int U = decltype(units)::value;
      auto run = [&](auto t, int64_t b0) {
        constexpr int T = decltype(t)::value;
        L::F acc[U][T];
        if constexpr (U == 1) {
          if (!panel) {
            lanes_f32<T>(w, x, u / kUnits, static_cast<int>(u % kUnits), b0, acc[0]);
            store_unit<T>(w, u, b0, acc[0], out, ldo);
            return;
          }
        }
        panel_f32<U, T>(buf.data(), w.K, x, b0, acc);
        for (int i = 0; i < U; ++i) store_unit<T>(w, u + i, b0, acc[i], out, ldo);
      };
      if (panel) widen_units<U>(w, u, buf.data());
      int64_t b0 = 0;
      for (; b0 + decltype(tile)::value <= B; b0 += decltype(tile)::value) run(tile, b0);
      for (; b0 + decltype(tail)::value <= B; b0 += decltype(tail)::value) run(tail, b0);
      for (; b0 < B; ++b0) run(std::integral_constant<int, 1>{}, b0);
      u += U;
    };
    if (panel && u + 2 <= u1)
      rows(std::integral_constant<int, 2>{}, std::integral_constant<int, kLanes == 16 ? 8 : 6>{},
           std::integral_constant<int, 4>{});
    else
      rows(std::integral_constant<int, 1>{}, std::integral_constant<int, 8>{},
           std::integral_constant<int, 4>{});
  }
#else
  const int64_t n1 = std::min(w.N, g1 * GROUP);
  for (int64_t n = g0 * GROUP; n < n1; ++n)
    for (int64_t b = 0; b < B; ++b) {
      float acc = 0.f;
      for (int64_t k = 0; k < w.K; ++k) acc = std::fma(weight_at(w, n, k), x[b * w.K + k], acc);
      out[b * ldo + n] = acc;
    }
#endif
}

void qmat_linear(const QMat& w, const float* x, int64_t B, float* out, Acts acts,
                 QActs& acts_buf) {
  const int digits = w.dense ? 0 : acts_digits(acts);
  if (digits > 0) acts_buf.quantize(x, B, w.K, digits);
  parallel_for(0, qmat_groups(w), 1, [&](int64_t g0, int64_t g1) {
    if (digits > 0)
      qmat_rows_quant(w, acts_buf, out, w.N, g0, g1);
    else
      qmat_rows_f32(w, x, B, out, w.N, g0, g1);
  });
}

void qmat_dequant_rows(const QMat& w, float* out, int64_t g0, int64_t g1) {
  const int64_t K = w.K;
  const int64_t n1 = std::min(w.N, g1 * GROUP);
  for (int64_t n = g0 * GROUP; n < n1; ++n)
    for (int64_t k = 0; k < K; ++k) out[(n - g0 * GROUP) * K + k] = weight_at(w, n, k);
}

#if LE_AVX2
float half_to_float(half_t h) { return _cvtsh_ss(h); }
half_t float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#else
float half_to_float(half_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf, nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
half_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return static_cast<half_t>(sign | 0x7C00 | (ax > 0x7F800000u ? 0x200 : 0));
  if (ax >= 0x477FF000u) return static_cast<half_t>(sign | 0x7C00);  // rounds past 65504: inf
  if (ax < 0x38800000u) {  // a float16 subnormal (or zero): scale, round to nearest even
    const float r = std::nearbyint(std::fabs(f) * 16777216.f);  // 2^24 = 1 / smallest subnormal
    return static_cast<half_t>(sign | static_cast<uint32_t>(r));
  }
  const uint32_t m = ax + 0xFFF + ((ax >> 13) & 1) - (112u << 23);  // rebias, round to even
  return static_cast<half_t>(sign | (m >> 13));
}
#endif

void exp_inplace(float* x, int64_t n) {
  int64_t i = 0;
#if LE_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp256(_mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

void softmax_inplace(float* x, int64_t n) {
  int64_t i = 0;
  float mx = -INFINITY, total = 0.f;
#if LE_AVX2
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  for (float v : lanes) mx = std::max(mx, v);
#endif
  for (; i < n; ++i) mx = std::max(mx, x[i]);  // the maximum: the same whatever the order
  i = 0;
#if LE_AVX2
  __m256 vsum = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(mx)));
    _mm256_storeu_ps(x + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  total = hsum(vsum);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    total += x[i];
  }
  const float inv = 1.f / total;
  i = 0;
#if LE_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(inv)));
#endif
  for (; i < n; ++i) x[i] *= inv;
}

float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float r = 0.f;
#if LE_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  r = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(half_t x) { return half_to_float(x); }

#if LE_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const half_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#if LE_VNNI512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const half_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// Rows fetched ahead of use in the attention loops: 16 (4 KiB of float32 K/V at head dimension
// 64) in flight a thread; 8 left a 16-sequence decode step's attention ~10% slower
// (bench/decode_profile.py).
constexpr int64_t kAhead = 16;
template <class T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < d * static_cast<int64_t>(sizeof(T)); b += 64)
    _mm_prefetch(p + b, _MM_HINT_T0);
}

// Scores of NQ queries against 4 rows: NQ * 4 accumulators of eight lanes, each reduced in the
// same fixed order ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)), so a score is the same bits whatever
// query and row groups it was computed in. out[g * ldo + r].
template <int NQ, class T>
inline void dot_q_r4(const float* q, const T* const* rows, int64_t d, float scale, float* out,
                     int64_t ldo) {
  __m256 acc[NQ][4];
  for (int g = 0; g < NQ; ++g)
    for (int r = 0; r < 4; ++r) acc[g][r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; i += 8) {
    __m256 qv[NQ];
    for (int g = 0; g < NQ; ++g) qv[g] = _mm256_loadu_ps(q + g * d + i);
    for (int r = 0; r < 4; ++r) {
      const __m256 rv = load8(rows[r] + i);
      for (int g = 0; g < NQ; ++g) acc[g][r] = _mm256_fmadd_ps(qv[g], rv, acc[g][r]);
    }
  }
  const __m128 sc = _mm_set1_ps(scale);
  for (int g = 0; g < NQ; ++g) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[g][0], acc[g][1]),
                                    _mm256_hadd_ps(acc[g][2], acc[g][3]));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(out + g * ldo, _mm_mul_ps(sums, sc));
  }
}

// All nq queries against 4 rows, three queries at a time.
template <class T>
inline void dot_r4(const float* q, int64_t nq, const T* const* rows, int64_t d, float scale,
                   float* out, int64_t ldo) {
  int64_t g = 0;
  for (; g + 3 <= nq; g += 3) dot_q_r4<3>(q + g * d, rows, d, scale, out + g * ldo, ldo);
  if (nq - g == 2) dot_q_r4<2>(q + g * d, rows, d, scale, out + g * ldo, ldo);
  if (nq - g == 1) dot_q_r4<1>(q + g * d, rows, d, scale, out + g * ldo, ldo);
}

// out[g] (+)= sum_p w[g * ldw + p] * rows[p][d0, d0 + 32) for NQ queries: each row chunk is
// loaded once for all of them; `ahead` elements of the row kAhead on are prefetched. Every
// output element is one FMA chain over p in order, so the
// result does not depend on the grouping.
template <int NQ, class T>
inline void wsum_q_d32(const float* w, int64_t ldw, const T* const* rows, int64_t n, int64_t d0,
                       float* out, int64_t ldo, bool accumulate, int64_t ahead) {
  __m256 acc[NQ][4];
  for (int g = 0; g < NQ; ++g)
    for (int i = 0; i < 4; ++i)
      acc[g][i] = accumulate ? _mm256_loadu_ps(out + g * ldo + d0 + 8 * i) : _mm256_setzero_ps();
  for (int64_t p = 0; p < n; ++p) {
    if (ahead > 0 && p + kAhead < n) prefetch_row(rows[p + kAhead], ahead);
    __m256 wp[NQ];
    for (int g = 0; g < NQ; ++g) wp[g] = _mm256_broadcast_ss(w + g * ldw + p);
    const T* v = rows[p] + d0;
    for (int i = 0; i < 4; ++i) {
      const __m256 vv = load8(v + 8 * i);
      for (int g = 0; g < NQ; ++g) acc[g][i] = _mm256_fmadd_ps(wp[g], vv, acc[g][i]);
    }
  }
  for (int g = 0; g < NQ; ++g)
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + g * ldo + d0 + 8 * i, acc[g][i]);
}
#endif

#if LE_VNNI512
// wsum_q_d32's arithmetic over 64 elements a pass with 512-bit vectors: each output element is
// still one FMA chain over p in order (the same bits), in half the instructions.
template <int NQ, class T>
inline void wsum_q_d64(const float* w, int64_t ldw, const T* const* rows, int64_t n, int64_t d0,
                       float* out, int64_t ldo, bool accumulate, int64_t ahead) {
  __m512 acc[NQ][4];
  for (int g = 0; g < NQ; ++g)
    for (int i = 0; i < 4; ++i)
      acc[g][i] = accumulate ? _mm512_loadu_ps(out + g * ldo + d0 + 16 * i) : _mm512_setzero_ps();
  for (int64_t p = 0; p < n; ++p) {
    if (ahead > 0 && p + kAhead < n) prefetch_row(rows[p + kAhead], ahead);
    const T* v = rows[p] + d0;
    __m512 vv[4];
    for (int i = 0; i < 4; ++i) vv[i] = load16(v + 16 * i);
    for (int g = 0; g < NQ; ++g) {
      const __m512 wp = _mm512_set1_ps(w[g * ldw + p]);
      for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_fmadd_ps(wp, vv[i], acc[g][i]);
    }
  }
  for (int g = 0; g < NQ; ++g)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + g * ldo + d0 + 16 * i, acc[g][i]);
}
#endif

template <class T>
void dot_rows_t(const float* q, int64_t nq, const T* const* rows, int64_t n, int64_t d,
                float scale, float* out, int64_t ldo) {
#if LE_AVX2
  if (d % 8 == 0) {
    int64_t p = 0;
    for (; p + 4 <= n; p += 4) {
      // rows are scattered over the paged cache (a block's rows are a stride apart): fetch
      // ahead what the hardware prefetcher cannot guess
      for (int64_t r = p + kAhead; r < std::min(n, p + kAhead + 4); ++r) prefetch_row(rows[r], d);
      dot_r4(q, nq, rows + p, d, scale, out + p, ldo);
    }
    if (p < n) {
      // The last rows take the same path (padded with a repeat of the first), so a row's score
      // does not depend on how many rows came with it.
      const T* tail[4];
      for (int r = 0; r < 4; ++r) tail[r] = rows[p + std::min<int64_t>(r, n - 1 - p)];
      thread_local std::vector<float> buf;
      if (static_cast<int64_t>(buf.size()) < nq * 4) buf.resize(nq * 4);
      dot_r4(q, nq, tail, d, scale, buf.data(), 4);
      for (int64_t g = 0; g < nq; ++g) std::copy_n(buf.data() + g * 4, n - p, out + g * ldo + p);
    }
    return;
  }
#endif
  for (int64_t p = 0; p < n; ++p)
    for (int64_t g = 0; g < nq; ++g) {
      float acc = 0.f;
      for (int64_t i = 0; i < d; ++i) acc += q[g * d + i] * to_f32(rows[p][i]);
      out[g * ldo + p] = acc * scale;
    }
}

#if LE_AVX2
// kernel(NQ, g, d0, ahead) for every query, three at a time, over passes of `width` elements;
// the first pass prefetches whole rows.
template <class F>
void by_query_triples(int64_t nq, int64_t d, int64_t width, const F& kernel) {
  for (int64_t d0 = 0; d0 < d; d0 += width) {
    int64_t g = 0;
    int64_t ahead = d0 == 0 ? d : 0;
    for (; g + 3 <= nq; g += 3, ahead = 0) kernel(std::integral_constant<int, 3>{}, g, d0, ahead);
    if (nq - g == 2) kernel(std::integral_constant<int, 2>{}, g, d0, ahead);
    if (nq - g == 1) kernel(std::integral_constant<int, 1>{}, g, d0, ahead);
  }
}
#endif

template <class T>
void weighted_sum_rows_t(const float* w, int64_t nq, int64_t ldw, const T* const* rows,
                         int64_t n, int64_t d, float* out, int64_t ldo, bool accumulate) {
#if LE_VNNI512
  if (d % 64 == 0) {
    by_query_triples(nq, d, 64, [&](auto nq_, int64_t g, int64_t d0, int64_t ahead) {
      wsum_q_d64<decltype(nq_)::value>(w + g * ldw, ldw, rows, n, d0, out + g * ldo, ldo,
                                       accumulate, ahead);
    });
    return;
  }
#endif
#if LE_AVX2
  if (d % 32 == 0) {
    by_query_triples(nq, d, 32, [&](auto nq_, int64_t g, int64_t d0, int64_t ahead) {
      wsum_q_d32<decltype(nq_)::value>(w + g * ldw, ldw, rows, n, d0, out + g * ldo, ldo,
                                       accumulate, ahead);
    });
    return;
  }
#endif
  for (int64_t g = 0; g < nq; ++g) {
    float* o = out + g * ldo;
    if (!accumulate) std::fill_n(o, d, 0.f);
    for (int64_t p = 0; p < n; ++p)
      for (int64_t i = 0; i < d; ++i) o[i] += w[g * ldw + p] * to_f32(rows[p][i]);
  }
}

}  // namespace

void dot_rows(const float* q, int64_t nq, const float* const* rows, int64_t n, int64_t d,
              float scale, float* out, int64_t ldo) {
  dot_rows_t(q, nq, rows, n, d, scale, out, ldo);
}
void dot_rows(const float* q, int64_t nq, const half_t* const* rows, int64_t n, int64_t d,
              float scale, float* out, int64_t ldo) {
  dot_rows_t(q, nq, rows, n, d, scale, out, ldo);
}
void weighted_sum_rows(const float* w, int64_t nq, int64_t ldw, const float* const* rows,
                       int64_t n, int64_t d, float* out, int64_t ldo, bool accumulate) {
  weighted_sum_rows_t(w, nq, ldw, rows, n, d, out, ldo, accumulate);
}
void weighted_sum_rows(const float* w, int64_t nq, int64_t ldw, const half_t* const* rows,
                       int64_t n, int64_t d, float* out, int64_t ldo, bool accumulate) {
  weighted_sum_rows_t(w, nq, ldw, rows, n, d, out, ldo, accumulate);
}

void to_half(const float* x, int64_t n, half_t* out) {
  int64_t i = 0;
#if LE_AVX2
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) out[i] = float_to_half(x[i]);
}

}  // namespace llama_engine
