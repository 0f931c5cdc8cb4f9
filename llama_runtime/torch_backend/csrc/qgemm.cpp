// Quantized weight x float activation products for the CPU, the shapes decode needs.
//
// Weights are repacked at load into two layouts of 32-element blocks:
//   q4: qs uint8 [N, K/2] (block j: bytes 16j..16j+15; low nibble = element i, high = i+16),
//       d, m float32 [N, K/32]: w = d * q + m            (GGUF Q4_0 and Q4_1)
//   q8: qs int8 [N, K], d float32 [N, K/32]: w = d * q   (GGUF Q8_0)
// Activations are quantized per 32-block to int8 with a float scale (as llama.cpp's Q8_1), so
// each block's dot product runs on integers: maddubs (u8 x s8 -> s16 pairs) then madd -> s32.
// Each output row's weights are read once per call and reused for every activation row.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int QK = 32;

struct QActs {
  std::vector<int8_t> q;   // [B, K]
  std::vector<float> d;    // [B, nb] scale
  std::vector<float> s;    // [B, nb] d * sum(q)
};

QActs quantize_acts(const float* x, int64_t B, int64_t K) {
  const int64_t nb = K / QK;
  QActs a;
  a.q.resize(B * K);
  a.d.resize(B * nb);
  a.s.resize(B * nb);
  at::parallel_for(0, B * nb, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* xb = x + i * QK;
      float amax = 0.f;
      for (int k = 0; k < QK; ++k) amax = std::max(amax, std::fabs(xb[k]));
      const float d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      int8_t* qb = a.q.data() + i * QK;
      for (int k = 0; k < QK; ++k) {
        const int v = static_cast<int>(std::nearbyint(xb[k] * id));
        qb[k] = static_cast<int8_t>(v);
        sum += v;
      }
      a.d[i] = d;
      a.s[i] = d * static_cast<float>(sum);
    }
  });
  return a;
}

#if defined(__AVX2__)
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
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask));
}
#endif

constexpr int BT = 4;  // activation rows per pass over one weight row

#if defined(__AVX2__)
// T activation rows (a compile-time count, so the accumulators stay in registers) against one
// q4 weight row.
template <int T>
inline void q4_tile(const uint8_t* wq, const float* wd, const float* wm, const QActs& a,
                    int64_t b0, int64_t K, int64_t nb, int64_t N, int64_t n, float* out) {
  __m256 acc[T];
  __m256 ms[T];
  for (int t = 0; t < T; ++t) {
    acc[t] = _mm256_setzero_ps();
    ms[t] = _mm256_setzero_ps();
  }
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xq = a.q.data() + b0 * K;
  const float* xd = a.d.data() + b0 * nb;
  const float* xs = a.s.data() + b0 * nb;
  for (int64_t j = 0; j < nb; ++j) {
    const __m256i w = expand_nibbles(wq + j * 16);
    const __m256 dw = _mm256_set1_ps(wd[j]);
    const __m256 mw = _mm256_set1_ps(wm[j]);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + t * K + j * QK));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                               _mm256_mul_ps(dw, _mm256_set1_ps(xd[t * nb + j])), acc[t]);
      ms[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xs[t * nb + j]), ms[t]);
    }
  }
  for (int t = 0; t < T; ++t)
    out[(b0 + t) * N + n] = hsum(acc[t]) + _mm_cvtss_f32(_mm256_castps256_ps128(ms[t]));
}

template <int T>
inline void q8_tile(const int8_t* wq, const float* wd, const QActs& a, int64_t b0, int64_t K,
                    int64_t nb, int64_t N, int64_t n, float* out) {
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xq = a.q.data() + b0 * K;
  const float* xd = a.d.data() + b0 * nb;
  for (int64_t j = 0; j < nb; ++j) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + j * QK));
    const __m256i aw = _mm256_sign_epi8(w, w);  // |w| as u8; the sign moves to x
    const __m256 dw = _mm256_set1_ps(wd[j]);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + t * K + j * QK));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones);
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                               _mm256_mul_ps(dw, _mm256_set1_ps(xd[t * nb + j])), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[(b0 + t) * N + n] = hsum(acc[t]);
}

// Exact variants: float activations, weights widened to float in registers. Same arithmetic as
// dequantize-then-GEMM up to summation order, so greedy tokens match the float reference.
inline void widen_q4(const uint8_t* blk, __m256 dw, __m256 mw, __m256 w[4]) {
  const __m256i q = expand_nibbles(blk);
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; ++i)
    w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), dw, mw);
}

template <int T>
inline void q4f_tile(const uint8_t* wq, const float* wd, const float* wm, const float* x,
                     int64_t b0, int64_t K, int64_t nb, int64_t N, int64_t n, float* out) {
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    __m256 w[4];
    widen_q4(wq + j * 16, _mm256_set1_ps(wd[j]), _mm256_set1_ps(wm[j]), w);
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const float* xb = x + (b0 + t) * K + j * QK;
      for (int i = 0; i < 4; ++i) acc[t] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xb + 8 * i), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[(b0 + t) * N + n] = hsum(acc[t]);
}

template <int T>
inline void q8f_tile(const int8_t* wq, const float* wd, const float* x, int64_t b0, int64_t K,
                     int64_t nb, int64_t N, int64_t n, float* out) {
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    const __m256 dw = _mm256_set1_ps(wd[j]);
    __m256 w[4];
    for (int i = 0; i < 4; ++i) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wq + j * QK + 8 * i));
      w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), dw);
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const float* xb = x + (b0 + t) * K + j * QK;
      for (int i = 0; i < 4; ++i) acc[t] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xb + 8 * i), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[(b0 + t) * N + n] = hsum(acc[t]);
}
#endif

// Scalar fallbacks of the exact variants (no AVX2).
void qf_rows_scalar(bool q4, const void* qs, const float* d, const float* m, const float* x,
                    int64_t B, int64_t K, int64_t N, float* out, int64_t n0, int64_t n1) {
  const int64_t nb = K / QK;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t b = 0; b < B; ++b) {
      float acc = 0.f;
      for (int64_t j = 0; j < nb; ++j)
        for (int i = 0; i < QK; ++i) {
          float w;
          if (q4) {
            const uint8_t byte = static_cast<const uint8_t*>(qs)[n * (K / 2) + j * 16 + (i % 16)];
            const int q = i < 16 ? (byte & 0x0F) : (byte >> 4);
            w = d[n * nb + j] * static_cast<float>(q) + m[n * nb + j];
          } else {
            w = d[n * nb + j] * static_cast<float>(static_cast<const int8_t*>(qs)[n * K + j * QK + i]);
          }
          acc += w * x[b * K + j * QK + i];
        }
      out[b * N + n] = acc;
    }
}

void q4_rows(const uint8_t* qs, const float* d, const float* m, const QActs& a, int64_t B,
             int64_t K, int64_t N, float* out, int64_t n0, int64_t n1) {
  const int64_t nb = K / QK;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wq = qs + n * (K / 2);
    const float* wd = d + n * nb;
    const float* wm = m + n * nb;
    for (int64_t b0 = 0; b0 < B; b0 += BT) {
      const int bt = static_cast<int>(std::min<int64_t>(BT, B - b0));
      float msum[BT] = {0.f, 0.f, 0.f, 0.f};
#if defined(__AVX2__)
      (void)msum;
      switch (bt) {
        case 4: q4_tile<4>(wq, wd, wm, a, b0, K, nb, N, n, out); break;
        case 3: q4_tile<3>(wq, wd, wm, a, b0, K, nb, N, n, out); break;
        case 2: q4_tile<2>(wq, wd, wm, a, b0, K, nb, N, n, out); break;
        default: q4_tile<1>(wq, wd, wm, a, b0, K, nb, N, n, out); break;
      }
#else
      float acc[BT] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t j = 0; j < nb; ++j) {
        const uint8_t* blk = wq + j * 16;
        for (int t = 0; t < bt; ++t) {
          const int64_t b = b0 + t;
          const int8_t* xq = a.q.data() + b * K + j * QK;
          int isum = 0;
          for (int i = 0; i < 16; ++i) isum += (blk[i] & 0x0F) * xq[i] + (blk[i] >> 4) * xq[i + 16];
          acc[t] += wd[j] * a.d[b * nb + j] * static_cast<float>(isum);
          msum[t] += wm[j] * a.s[b * nb + j];
        }
      }
      for (int t = 0; t < bt; ++t) out[(b0 + t) * N + n] = acc[t] + msum[t];
#endif
    }
  }
}

void q8_rows(const int8_t* qs, const float* d, const QActs& a, int64_t B, int64_t K, int64_t N,
             float* out, int64_t n0, int64_t n1) {
  const int64_t nb = K / QK;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wq = qs + n * K;
    const float* wd = d + n * nb;
    for (int64_t b0 = 0; b0 < B; b0 += BT) {
      const int bt = static_cast<int>(std::min<int64_t>(BT, B - b0));
#if defined(__AVX2__)
      switch (bt) {
        case 4: q8_tile<4>(wq, wd, a, b0, K, nb, N, n, out); break;
        case 3: q8_tile<3>(wq, wd, a, b0, K, nb, N, n, out); break;
        case 2: q8_tile<2>(wq, wd, a, b0, K, nb, N, n, out); break;
        default: q8_tile<1>(wq, wd, a, b0, K, nb, N, n, out); break;
      }
#else
      float acc[BT] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t j = 0; j < nb; ++j) {
        for (int t = 0; t < bt; ++t) {
          const int64_t b = b0 + t;
          const int8_t* xq = a.q.data() + b * K + j * QK;
          int isum = 0;
          for (int i = 0; i < QK; ++i) isum += wq[j * QK + i] * xq[i];
          acc[t] += wd[j] * a.d[b * nb + j] * static_cast<float>(isum);
        }
      }
      for (int t = 0; t < bt; ++t) out[(b0 + t) * N + n] = acc[t];
#endif
    }
  }
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 [B, K] tensor");
  TORCH_CHECK(x.size(1) == K && K % QK == 0, "x has ", x.size(1), " columns, weight has ", K);
}

}  // namespace

torch::Tensor q4_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m) {
  const int64_t N = qs.size(0), K = qs.size(1) * 2, B = x.size(0);
  check_x(x, K);
  const QActs a = quantize_acts(x.data_ptr<float>(), B, K);
  auto out = torch::empty({B, N}, x.options());
  const uint8_t* q = qs.data_ptr<uint8_t>();
  const float *dp = d.data_ptr<float>(), *mp = m.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    q4_rows(q, dp, mp, a, B, K, N, o, n0, n1);
  });
  return out;
}

torch::Tensor q8_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d) {
  const int64_t N = qs.size(0), K = qs.size(1), B = x.size(0);
  check_x(x, K);
  const QActs a = quantize_acts(x.data_ptr<float>(), B, K);
  auto out = torch::empty({B, N}, x.options());
  const int8_t* q = qs.data_ptr<int8_t>();
  const float* dp = d.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    q8_rows(q, dp, a, B, K, N, o, n0, n1);
  });
  return out;
}

torch::Tensor q4_linear_f32(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m) {
  const int64_t N = qs.size(0), K = qs.size(1) * 2, B = x.size(0), nb = K / QK;
  check_x(x, K);
  auto out = torch::empty({B, N}, x.options());
  const uint8_t* q = qs.data_ptr<uint8_t>();
  const float *dp = d.data_ptr<float>(), *mp = m.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
#if defined(__AVX2__)
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wq = q + n * (K / 2);
      for (int64_t b0 = 0; b0 < B; b0 += BT) {
        switch (std::min<int64_t>(BT, B - b0)) {
          case 4: q4f_tile<4>(wq, dp + n * nb, mp + n * nb, xp, b0, K, nb, N, n, o); break;
          case 3: q4f_tile<3>(wq, dp + n * nb, mp + n * nb, xp, b0, K, nb, N, n, o); break;
          case 2: q4f_tile<2>(wq, dp + n * nb, mp + n * nb, xp, b0, K, nb, N, n, o); break;
          default: q4f_tile<1>(wq, dp + n * nb, mp + n * nb, xp, b0, K, nb, N, n, o); break;
        }
      }
    }
#else
    qf_rows_scalar(true, q, dp, mp, xp, B, K, N, o, n0, n1);
#endif
  });
  return out;
}

torch::Tensor q8_linear_f32(torch::Tensor x, torch::Tensor qs, torch::Tensor d) {
  const int64_t N = qs.size(0), K = qs.size(1), B = x.size(0), nb = K / QK;
  check_x(x, K);
  auto out = torch::empty({B, N}, x.options());
  const int8_t* q = qs.data_ptr<int8_t>();
  const float *dp = d.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
#if defined(__AVX2__)
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wq = q + n * K;
      for (int64_t b0 = 0; b0 < B; b0 += BT) {
        switch (std::min<int64_t>(BT, B - b0)) {
          case 4: q8f_tile<4>(wq, dp + n * nb, xp, b0, K, nb, N, n, o); break;
          case 3: q8f_tile<3>(wq, dp + n * nb, xp, b0, K, nb, N, n, o); break;
          case 2: q8f_tile<2>(wq, dp + n * nb, xp, b0, K, nb, N, n, o); break;
          default: q8f_tile<1>(wq, dp + n * nb, xp, b0, K, nb, N, n, o); break;
        }
      }
    }
#else
    qf_rows_scalar(false, q, dp, nullptr, xp, B, K, N, o, n0, n1);
#endif
  });
  return out;
}

// Whole-matrix dequantization for the many-row (prefill) path: float32 [N, K].
torch::Tensor q4_dequant(torch::Tensor qs, torch::Tensor d, torch::Tensor m) {
  const int64_t N = qs.size(0), K = qs.size(1) * 2, nb = K / QK;
  auto out = torch::empty({N, K}, d.options());
  const uint8_t* q = qs.data_ptr<uint8_t>();
  const float *dp = d.data_ptr<float>(), *mp = m.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N * nb, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* blk = q + i * 16;
      float* ob = o + i * QK;
      for (int k = 0; k < 16; ++k) {
        ob[k] = dp[i] * static_cast<float>(blk[k] & 0x0F) + mp[i];
        ob[k + 16] = dp[i] * static_cast<float>(blk[k] >> 4) + mp[i];
      }
    }
  });
  return out;
}

torch::Tensor q8_dequant(torch::Tensor qs, torch::Tensor d) {
  const int64_t N = qs.size(0), K = qs.size(1), nb = K / QK;
  auto out = torch::empty({N, K}, d.options());
  const int8_t* q = qs.data_ptr<int8_t>();
  const float* dp = d.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N * nb, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int k = 0; k < QK; ++k) o[i * QK + k] = dp[i] * static_cast<float>(q[i * QK + k]);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("q4_dequant", &q4_dequant, "q4 weight -> float32 [N, K]");
  mod.def("q8_dequant", &q8_dequant, "q8 weight -> float32 [N, K]");
  mod.def("q4_linear_f32", &q4_linear_f32, "exact: float x [B,K] @ q4 weight [N,K].T");
  mod.def("q8_linear_f32", &q8_linear_f32, "exact: float x [B,K] @ q8 weight [N,K].T");
  mod.def("q4_linear", &q4_linear, "x [B,K] @ q4 weight [N,K].T -> [B,N]");
  mod.def("q8_linear", &q8_linear, "x [B,K] @ q8 weight [N,K].T -> [B,N]");
}
