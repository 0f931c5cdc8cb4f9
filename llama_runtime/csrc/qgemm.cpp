// Quantized weight x activation products for the CPU, in the shapes decode needs (few
// activation rows, every weight row read once per call). AVX2 + FMA where the CPU has them (the
// build adds -mavx2 -mfma -mf16c), scalar C++ otherwise. Layouts: see qgemm.h.
//
// The int8 kernels follow llama.cpp's CPU scheme: activations are quantized per 32-block (QActs)
// and each block's dot product is maddubs (u8 x s8 -> s16 pairs) then madd (-> s32), scaled once
// per block. Tiles of several weight rows keep independent accumulators in registers, so the
// loop is bound by throughput rather than by the latency of one accumulator chain, and each
// activation block is loaded once per tile.
#include "qgemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LE_AVX2 1
#endif

namespace llama_engine {

void QActs::quantize(const float* x, int64_t B_, int64_t K_) {
  B = B_;
  K = K_;
  const int64_t nb = K / QK;
  if (static_cast<int64_t>(q.size()) < B * K) q.resize(B * K);
  if (static_cast<int64_t>(d.size()) < B * nb) {
    d.resize(B * nb);
    s.resize(B * nb);
  }
  for (int64_t i = 0; i < B * nb; ++i) {
    const float* xb = x + i * QK;
    float amax = 0.f;
    for (int k = 0; k < QK; ++k) amax = std::max(amax, std::fabs(xb[k]));
    const float scale = amax / 127.f;
    const float inv = scale > 0.f ? 1.f / scale : 0.f;
    int sum = 0;
    int8_t* qb = q.data() + i * QK;
    for (int k = 0; k < QK; ++k) {
      const float f = xb[k] * inv;  // clamped, so inf or NaN inputs cannot overflow the cast
      const int v = std::isnan(f) ? 0 : static_cast<int>(std::nearbyint(std::clamp(f, -127.f, 127.f)));
      qb[k] = static_cast<int8_t>(v);
      sum += v;
    }
    d[i] = scale;
    s[i] = scale * static_cast<float>(sum);
  }
}

namespace {

constexpr int64_t kPanelRows = 8;  // from this many activation rows on, widen weights once
constexpr int64_t kPanelBytes = 192 * 1024;  // widened weights per pass (stay in L2)

inline float scale_at(const QMat& w, const void* a, int64_t i) {
  if (!w.f16) return static_cast<const float*>(a)[i];
  return half_to_float(static_cast<const uint16_t*>(a)[i]);
}

// One group's scales and offsets as float32: the weight's own arrays, or float16 ones widened
// into a per-thread buffer (a few hundred values a group, against its K * 4 weights).
struct Scales {
  const float* d;
  const float* m;
};
inline Scales group_scales(const QMat& w, int64_t g) {
  const int64_t n = (w.K / QK) * GROUP, at = g * n;
  if (!w.f16)
    return {static_cast<const float*>(w.d) + at,
            w.q4 ? static_cast<const float*>(w.m) + at : nullptr};
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < 2 * n) buf.resize(2 * n);
  const uint16_t* d16 = static_cast<const uint16_t*>(w.d) + at;
  const uint16_t* m16 = w.q4 ? static_cast<const uint16_t*>(w.m) + at : nullptr;
  int64_t i = 0;
#if LE_AVX2
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(buf.data() + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d16 + i))));
    if (m16)
      _mm256_storeu_ps(buf.data() + n + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                               reinterpret_cast<const __m128i*>(m16 + i))));
  }
#endif
  for (; i < n; ++i) {
    buf[i] = half_to_float(d16[i]);
    if (m16) buf[n + i] = half_to_float(m16[i]);
  }
  return {buf.data(), m16 ? buf.data() + n : nullptr};
}

#if LE_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline __m256i expand_nibbles(const uint8_t* p) {  // 16 bytes -> 32 u8: low nibbles, then high
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(b, mask)),
                                 _mm_and_si128(_mm_srli_epi16(b, 4), mask), 1);
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

// One group of four weight rows against T activation rows from b0: 4 * T accumulators held in
// registers, each weight block loaded once for the T rows.
template <int T>
inline void group_i8(const QMat& w, const QActs& a, int64_t g, int64_t b0, float* out,
                     int64_t ldo) {
  const int64_t K = w.K, nb = K / QK;
  const int64_t bytes = w.q4 ? 16 : 32;  // per row-block
  const uint8_t* wq = static_cast<const uint8_t*>(w.qs) + g * nb * GROUP * bytes;
  const Scales sc = group_scales(w, g);
  const float* wd = sc.d;
  __m256 acc[GROUP][T];
  for (int r = 0; r < GROUP; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xq = a.q.data() + b0 * K;
  const float* xd = a.d.data() + b0 * nb;
  for (int64_t j = 0; j < nb; ++j) {
    __m256i xv[T];
    for (int t = 0; t < T; ++t)
      xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + t * K + j * QK));
    const uint8_t* blk = wq + j * GROUP * bytes;
    for (int r = 0; r < GROUP; ++r) {
      const __m256 dw = _mm256_broadcast_ss(wd + j * GROUP + r);
      if (w.q4) {
        const __m256i wv = expand_nibbles(blk + r * 16);
        for (int t = 0; t < T; ++t) {
          const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv[t]), ones);
          acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                      _mm256_mul_ps(dw, _mm256_broadcast_ss(xd + t * nb + j)),
                                      acc[r][t]);
        }
      } else {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + r * 32));
        const __m256i aw = _mm256_sign_epi8(wv, wv);  // |w| as u8; the sign moves to x
        for (int t = 0; t < T; ++t) {
          const __m256i p = _mm256_madd_epi16(
              _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[t], wv)), ones);
          acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                      _mm256_mul_ps(dw, _mm256_broadcast_ss(xd + t * nb + j)),
                                      acc[r][t]);
        }
      }
    }
  }
  const int rows = static_cast<int>(std::min<int64_t>(GROUP, w.N - g * GROUP));
  for (int t = 0; t < T; ++t) {
    float offs[GROUP] = {0.f, 0.f, 0.f, 0.f};
    if (w.q4) {  // the offset term: sum_j m[j] * s[j], four rows at once
      const float* wm = sc.m;
      const float* xs = a.s.data() + (b0 + t) * nb;
      __m128 macc = _mm_setzero_ps();
      for (int64_t j = 0; j < nb; ++j)
        macc = _mm_fmadd_ps(_mm_loadu_ps(wm + j * GROUP), _mm_set1_ps(xs[j]), macc);
      _mm_storeu_ps(offs, macc);
    }
    for (int r = 0; r < rows; ++r) out[(b0 + t) * ldo + g * GROUP + r] = hsum(acc[r][t]) + offs[r];
  }
}

// Exact variant: each weight block widened to float once, against T float activation rows.
inline void widen_q4(const uint8_t* blk, __m256 dw, __m256 mw, __m256 w[4]) {
  const __m256i q = expand_nibbles(blk);
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; ++i)
    w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), dw, mw);
}

template <int T>
inline void group_f32(const QMat& w, const float* x, int64_t g, int64_t b0, float* out,
                      int64_t ldo) {
  const int64_t K = w.K, nb = K / QK;
  const int64_t bytes = w.q4 ? 16 : 32;
  const uint8_t* wq = static_cast<const uint8_t*>(w.qs) + g * nb * GROUP * bytes;
  const Scales sc = group_scales(w, g);
  const float* wd = sc.d;
  const float* wm = sc.m;
  __m256 acc[GROUP][T];
  for (int r = 0; r < GROUP; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    const uint8_t* blk = wq + j * GROUP * bytes;
    for (int r = 0; r < GROUP; ++r) {
      __m256 wv[4];
      const __m256 dw = _mm256_broadcast_ss(wd + j * GROUP + r);
      if (w.q4) {
        widen_q4(blk + r * 16, dw, _mm256_broadcast_ss(wm + j * GROUP + r), wv);
      } else {
        const int8_t* q = reinterpret_cast<const int8_t*>(blk + r * 32);
        for (int i = 0; i < 4; ++i) {
          const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i));
          wv[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), dw);
        }
      }
      for (int t = 0; t < T; ++t) {
        const float* xb = x + (b0 + t) * K + j * QK;
        for (int i = 0; i < 4; ++i)
          acc[r][t] = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(xb + 8 * i), acc[r][t]);
      }
    }
  }
  const int rows = static_cast<int>(std::min<int64_t>(GROUP, w.N - g * GROUP));
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < rows; ++r) out[(b0 + t) * ldo + g * GROUP + r] = hsum(acc[r][t]);
}

// The group's four rows widened to float, [4][K] (the panel of many-row products).
inline void widen_group(const QMat& w, int64_t g, float* panel) {
  const int64_t K = w.K, nb = K / QK;
  if (w.dense) {  // the four rows as they are, zeros past the last
    for (int64_t r = 0; r < GROUP; ++r) {
      const int64_t n = g * GROUP + r;
      if (n < w.N)
        std::copy_n(static_cast<const float*>(w.qs) + n * K, K, panel + r * K);
      else
        std::fill_n(panel + r * K, K, 0.f);
    }
    return;
  }
  const int64_t bytes = w.q4 ? 16 : 32;
  const uint8_t* wq = static_cast<const uint8_t*>(w.qs) + g * nb * GROUP * bytes;
  const Scales sc = group_scales(w, g);
  const float* wd = sc.d;
  for (int64_t j = 0; j < nb; ++j)
    for (int r = 0; r < GROUP; ++r) {
      __m256 wv[4];
      const __m256 dw = _mm256_broadcast_ss(wd + j * GROUP + r);
      const uint8_t* blk = wq + (j * GROUP + r) * bytes;
      if (w.q4) {
        widen_q4(blk, dw, _mm256_broadcast_ss(sc.m + j * GROUP + r), wv);
      } else {
        for (int i = 0; i < 4; ++i) {
          const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 8 * i));
          wv[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), dw);
        }
      }
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(panel + r * K + j * QK + 8 * i, wv[i]);
    }
}

// T activation rows against a widened panel: the same values in the same order as group_f32,
// so a row's result does not depend on how many rows came with it.
template <int T>
inline void panel_f32(const float* panel, int64_t K, const float* x, int64_t g, int64_t b0,
                      int64_t rows, float* out, int64_t ldo) {
  __m256 acc[GROUP][T];
  for (int r = 0; r < GROUP; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + (b0 + t) * K + k);
    for (int r = 0; r < GROUP; ++r) {
      const __m256 wv = _mm256_loadu_ps(panel + r * K + k);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < rows; ++r) out[(b0 + t) * ldo + g * GROUP + r] = hsum(acc[r][t]);
}
#endif  // LE_AVX2

[[maybe_unused]] inline float weight_at(const QMat& w, int64_t n, int64_t k) {
  if (w.dense) return static_cast<const float*>(w.qs)[n * w.K + k];
  const int64_t nb = w.K / QK, j = k / QK, i = k % QK, g = n / GROUP, r = n % GROUP;
  const int64_t at = (g * nb + j) * GROUP + r;  // the row-block's index
  if (w.q4) {
    const uint8_t byte = static_cast<const uint8_t*>(w.qs)[at * 16 + (i % 16)];
    const int q = i < 16 ? (byte & 0x0F) : (byte >> 4);
    return scale_at(w, w.d, at) * static_cast<float>(q) + scale_at(w, w.m, at);
  }
  return scale_at(w, w.d, at) * static_cast<float>(static_cast<const int8_t*>(w.qs)[at * 32 + i]);
}

[[maybe_unused]] void rows_i8_scalar(const QMat& w, const QActs& a, float* out, int64_t ldo,
                                     int64_t g0, int64_t g1) {
  const int64_t K = w.K, nb = K / QK;
  const int64_t n1 = std::min(w.N, g1 * GROUP);
  for (int64_t n = g0 * GROUP; n < n1; ++n)
    for (int64_t b = 0; b < a.B; ++b) {
      float acc = 0.f;
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t at = ((n / GROUP) * nb + j) * GROUP + n % GROUP;
        const int8_t* xq = a.q.data() + b * K + j * QK;
        int isum = 0;
        if (w.q4) {
          const uint8_t* blk = static_cast<const uint8_t*>(w.qs) + at * 16;
          for (int i = 0; i < 16; ++i) isum += (blk[i] & 0x0F) * xq[i] + (blk[i] >> 4) * xq[i + 16];
          acc += scale_at(w, w.m, at) * a.s[b * nb + j];
        } else {
          const int8_t* q = static_cast<const int8_t*>(w.qs) + at * 32;
          for (int i = 0; i < QK; ++i) isum += q[i] * xq[i];
        }
        acc += scale_at(w, w.d, at) * a.d[b * nb + j] * static_cast<float>(isum);
      }
      out[b * ldo + n] = acc;
    }
}

}  // namespace

void qmat_rows_int8(const QMat& w, const QActs& a, float* out, int64_t ldo, int64_t g0,
                    int64_t g1) {
#if LE_AVX2
  for (int64_t g = g0; g < g1; ++g) {
    int64_t b0 = 0;
    for (; b0 + 2 <= a.B; b0 += 2) group_i8<2>(w, a, g, b0, out, ldo);
    if (b0 < a.B) group_i8<1>(w, a, g, b0, out, ldo);
  }
#else
  rows_i8_scalar(w, a, out, ldo, g0, g1);
#endif
}

void qmat_rows_f32(const QMat& w, const float* x, int64_t B, float* out, int64_t ldo,
                   int64_t g0, int64_t g1) {
#if LE_AVX2
  if (B >= kPanelRows || w.dense) {  // widen each group once, then stream every row past it
    // Groups are widened a chunk at a time into a buffer that stays in L2; then each tile of
    // three activation rows (in L1) runs past every panel of the chunk, writing its outputs
    // contiguously.
    const int64_t per = GROUP * w.K;
    const int64_t chunk = std::max<int64_t>(1, kPanelBytes / (4 * per));
    thread_local std::vector<float> panels;
    if (static_cast<int64_t>(panels.size()) < chunk * per) panels.resize(chunk * per);
    for (int64_t c0 = g0; c0 < g1; c0 += chunk) {
      const int64_t c1 = std::min(g1, c0 + chunk);
      for (int64_t g = c0; g < c1; ++g) widen_group(w, g, panels.data() + (g - c0) * per);
      auto run = [&](auto tile, int64_t b0) {
        constexpr int T = decltype(tile)::value;
        for (int64_t g = c0; g < c1; ++g)
          panel_f32<T>(panels.data() + (g - c0) * per, w.K, x, g, b0,
                       std::min<int64_t>(GROUP, w.N - g * GROUP), out, ldo);
      };
      int64_t b0 = 0;
      for (; b0 + 3 <= B; b0 += 3) run(std::integral_constant<int, 3>{}, b0);
      if (B - b0 == 2) run(std::integral_constant<int, 2>{}, b0);
      if (B - b0 == 1) run(std::integral_constant<int, 1>{}, b0);
    }
    return;
  }
  for (int64_t g = g0; g < g1; ++g) {
    int64_t b0 = 0;
    for (; b0 + 2 <= B; b0 += 2) group_f32<2>(w, x, g, b0, out, ldo);
    if (b0 < B) group_f32<1>(w, x, g, b0, out, ldo);
  }
#else
  const int64_t n1 = std::min(w.N, g1 * GROUP);
  for (int64_t n = g0 * GROUP; n < n1; ++n)
    for (int64_t b = 0; b < B; ++b) {
      float acc = 0.f;
      for (int64_t k = 0; k < w.K; ++k) acc += weight_at(w, n, k) * x[b * w.K + k];
      out[b * ldo + n] = acc;
    }
#endif
}

void qmat_dequant_rows(const QMat& w, float* out, int64_t g0, int64_t g1) {
  const int64_t K = w.K, nb = K / QK;
  const int64_t n1 = std::min(w.N, g1 * GROUP);
  if (w.dense) {
    std::copy(static_cast<const float*>(w.qs) + g0 * GROUP * K,
              static_cast<const float*>(w.qs) + n1 * K, out);
    return;
  }
  for (int64_t n = g0 * GROUP; n < n1; ++n)
    for (int64_t j = 0; j < nb; ++j) {
      float* ob = out + (n - g0 * GROUP) * K + j * QK;
      const int64_t at = ((n / GROUP) * nb + j) * GROUP + n % GROUP;
      const float dj = scale_at(w, w.d, at);
      if (w.q4) {
        const uint8_t* blk = static_cast<const uint8_t*>(w.qs) + at * 16;
        const float mj = scale_at(w, w.m, at);
        for (int k = 0; k < 16; ++k) {
          ob[k] = dj * static_cast<float>(blk[k] & 0x0F) + mj;
          ob[k + 16] = dj * static_cast<float>(blk[k] >> 4) + mj;
        }
      } else {
        const int8_t* q = static_cast<const int8_t*>(w.qs) + at * 32;
        for (int k = 0; k < QK; ++k) ob[k] = dj * static_cast<float>(q[k]);
      }
    }
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

constexpr int64_t kAhead = 8;  // rows fetched ahead of use in the attention loops
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

template <class T>
void dot_rows_t(const float* q, int64_t nq, const T* const* rows, int64_t n, int64_t d,
                float scale, float* out) {
#if LE_AVX2
  if (d % 8 == 0) {
    int64_t p = 0;
    for (; p + 4 <= n; p += 4) {
      // rows are scattered over the paged cache (a block's rows are a stride apart): fetch
      // ahead what the hardware prefetcher cannot guess
      for (int64_t r = p + kAhead; r < std::min(n, p + kAhead + 4); ++r) prefetch_row(rows[r], d);
      dot_r4(q, nq, rows + p, d, scale, out + p, n);
    }
    if (p < n) {
      // The last rows take the same path (padded with a repeat of the first), so a row's score
      // does not depend on how many rows came with it.
      const T* tail[4];
      for (int r = 0; r < 4; ++r) tail[r] = rows[p + std::min<int64_t>(r, n - 1 - p)];
      thread_local std::vector<float> buf;
      if (static_cast<int64_t>(buf.size()) < nq * 4) buf.resize(nq * 4);
      dot_r4(q, nq, tail, d, scale, buf.data(), 4);
      for (int64_t g = 0; g < nq; ++g) std::copy_n(buf.data() + g * 4, n - p, out + g * n + p);
    }
    return;
  }
#endif
  for (int64_t p = 0; p < n; ++p)
    for (int64_t g = 0; g < nq; ++g) {
      float acc = 0.f;
      for (int64_t i = 0; i < d; ++i) acc += q[g * d + i] * to_f32(rows[p][i]);
      out[g * n + p] = acc * scale;
    }
}

template <class T>
void weighted_sum_rows_t(const float* w, int64_t nq, int64_t ldw, const T* const* rows,
                         int64_t n, int64_t d, float* out, int64_t ldo, bool accumulate) {
#if LE_AVX2
  if (d % 32 == 0) {
    for (int64_t d0 = 0; d0 < d; d0 += 32) {
      int64_t g = 0;
      int64_t ahead = d0 == 0 ? d : 0;  // the first pass fetches whole rows
      for (; g + 3 <= nq; g += 3, ahead = 0)
        wsum_q_d32<3>(w + g * ldw, ldw, rows, n, d0, out + g * ldo, ldo, accumulate, ahead);
      if (nq - g == 2)
        wsum_q_d32<2>(w + g * ldw, ldw, rows, n, d0, out + g * ldo, ldo, accumulate, ahead);
      if (nq - g == 1)
        wsum_q_d32<1>(w + g * ldw, ldw, rows, n, d0, out + g * ldo, ldo, accumulate, ahead);
    }
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
              float scale, float* out) {
  dot_rows_t(q, nq, rows, n, d, scale, out);
}
void dot_rows(const float* q, int64_t nq, const half_t* const* rows, int64_t n, int64_t d,
              float scale, float* out) {
  dot_rows_t(q, nq, rows, n, d, scale, out);
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
