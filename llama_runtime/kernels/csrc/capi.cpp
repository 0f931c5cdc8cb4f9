// The kernels' one C interface, for every caller (the native backend over numpy, the torch backend
// through tensors' data pointers; kernels/library.py loads it with ctypes): plain pointers in, 0
// or -1 out, and the failure's message from le_error(). The caller owns
// and checks its buffers; these functions check what they can see (dims, block ids, slots).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "decode.h"
#include "parallel.h"
#include "qgemm.h"

namespace le = llama_engine;

// the library is built with hidden symbols (setup.py): export the C API only
#define LE_API __attribute__((visibility("default")))

extern "C" {

// A weight [n, k]: kind 0 = dense float32 row-major, 1 = q4 (qs, d, m), 2 = q8 (qs, d), 3 = q5
// (qs, d, m, qh), in the kernels' layout (qgemm.h); f16: d and m are float16; per: elements a
// scale (32, or 16 for q8).
struct le_weight {
  int32_t kind;
  int32_t f16;
  const void* qs;
  const void* d;
  const void* m;
  int64_t n, k;
  int64_t per;
  const void* qh;
};

}  // extern "C"

namespace {

thread_local std::string last_error;

// Throws std::invalid_argument for a kind, offsets and granularity that do not go together.
le::QMat to_qmat(const le_weight& w) {
  if (w.kind < 0 || w.kind > 3) throw std::invalid_argument("weight kind: 0, 1, 2 or 3");
  const bool nibbles = w.kind == 1 || w.kind == 3;
  le::QMat m{nibbles, w.qs, w.d, nibbles ? w.m : nullptr, w.n, w.k, w.f16 != 0};
  m.dense = w.kind == 0;
  m.per = static_cast<int>(w.per);
  if (w.kind == 3) {
    if (!w.qh) throw std::invalid_argument("a q5 weight has fifth bits");
    m.qh = static_cast<const uint64_t*>(w.qh);
  }
  le::qmat_check(m);
  return m;
}

template <class F>
int32_t guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown error";
  }
  return -1;
}

}  // namespace

extern "C" {

LE_API const char* le_error() { return last_error.c_str(); }

LE_API void le_set_threads(int32_t n) { le::set_threads(n); }

LE_API int32_t le_threads() { return le::max_threads(); }

LE_API const char* le_isa() { return le::qgemm_isa(); }

#ifndef LE_SOURCES_HASH
#define LE_SOURCES_HASH "unknown"
#endif
// What this build was compiled from (setup.py's sources_hash): kernels/library.py refuses a
// build whose sources differ from the installed ones (a checkout edited since its install).
LE_API const char* le_sources_hash() { return LE_SOURCES_HASH; }

// out [B, n] = x [B, k] @ w.T; acts (qgemm.h's Acts: 0 exact, 1 int8, 2 int16) quantizes x per
// 32-block first (q4/q8 weights only).
LE_API int32_t le_linear(const le_weight* w, const float* x, int64_t B, float* out, int32_t acts) {
  return guarded([&] {
    const le::QMat m = to_qmat(*w);
    le::QActs buf;
    le::qmat_linear(m, x, B, out, le::acts_from(acts), buf);
  });
}

// out [n, k] float32: the weight's values (a quantized one widened exactly as the float kernel
// widens it).
LE_API int32_t le_dequant(const le_weight* w, float* out) {
  return guarded([&] {
    const le::QMat m = to_qmat(*w);
    if (m.dense) throw std::invalid_argument("a dense weight is already float32");
    le::parallel_for(0, le::qmat_groups(m), 16, [&](int64_t g0, int64_t g1) {
      le::qmat_dequant_rows(m, out + g0 * le::GROUP * m.K, g0, g1);
    });
  });
}

// x[0..n) = GELU(x) in place: x * Phi(x) with erf, or its tanh approximation when
// `approximate` (BERT-family encoders; numpy has no erf).
LE_API int32_t le_gelu(float* x, int64_t n, int32_t approximate) {
  return guarded([&] {
    le::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
      if (approximate) {
        constexpr float k = 0.7978845608028654f;  // sqrt(2 / pi)
        for (int64_t i = i0; i < i1; ++i) {
          const float v = x[i];
          x[i] = 0.5f * v * (1.0f + std::tanh(k * (v + 0.044715f * v * v * v)));
        }
      } else {
        for (int64_t i = i0; i < i1; ++i)
          x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.7071067811865476f));
      }
    });
  });
}

// dims: dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab; eps, attn_scale,
// activation, windows (n_windows: n_layers, or 0): le::ModelOptions. norms: 2 * n_layers + 1 arrays of dim floats (copied); weights:
// 7 * n_layers + 1 (borrowed: they must outlive the model); extras: le::kExtras a layer (null
// where absent; copied), or n_extras 0. Returns the model, or null with le_error() set.
LE_API void* le_model_new(const int64_t* dims, float eps, float attn_scale, int32_t activation,
                          const int64_t* windows, int64_t n_windows, const float* const* norms,
                          int64_t n_norms, const le_weight* weights, int64_t n_weights,
                          const float* const* extras, int64_t n_extras) {
  le::DecodeModel* model = nullptr;
  guarded([&] {
    std::vector<le::QMat> mats;
    for (int64_t i = 0; i < n_weights; ++i) mats.push_back(to_qmat(weights[i]));
    model = new le::DecodeModel(
        le::ModelDims{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6]},
        le::ModelOptions{eps, attn_scale, static_cast<le::Activation>(activation),
                         std::vector<int64_t>(windows, windows + n_windows)},
        std::vector<const float*>(norms, norms + n_norms), std::move(mats),
        std::vector<const float*>(extras, extras + n_extras));
  });
  return model;
}

LE_API void le_model_free(void* model) { delete static_cast<le::DecodeModel*>(model); }

LE_API int32_t le_model_step(void* model, const le::StepArgs* args) {
  return guarded([&] { static_cast<le::DecodeModel*>(model)->step(*args); });
}

LE_API void le_model_set_profiling(void* model, int32_t on) {
  static_cast<le::DecodeModel*>(model)->set_profiling(on != 0);
}

// The profile of the steps run since profiling was turned on, as "phase microseconds" lines;
// returns the text's length, writing at most `cap` bytes (ask with cap 0 for the length).
LE_API int64_t le_model_profile(void* model, char* buf, int64_t cap) {
  std::string text;
  for (const auto& [phase, us] : static_cast<le::DecodeModel*>(model)->profile())
    text += phase + " " + std::to_string(us) + "\n";
  if (cap > 0) std::memcpy(buf, text.data(), std::min<int64_t>(cap, text.size()));
  return static_cast<int64_t>(text.size());
}

// A check of parallel_for for tests (tests/llama_runtime/test_parallel_pool.py): adds
// value(i) to out[i - begin] for every i in [begin, end), split with `grain`; value(i) is
// (i * 7919) % 1000003, plus, when nested > 0, a count made by a parallel_for over [0, nested)
// run inside the chunk (which runs serially). The chunk holding throw_at (when in the range)
// throws instead: -1 and le_error(). *threads_used: how many distinct threads ran chunks.
LE_API int32_t le_parallel_test(int64_t begin, int64_t end, int64_t grain, int64_t nested,
                                int64_t throw_at, int64_t* out, int32_t* threads_used) {
  return guarded([&] {
    std::mutex mu;
    std::vector<std::thread::id> seen;
    le::parallel_for(begin, end, grain, [&](int64_t b0, int64_t b1) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (std::find(seen.begin(), seen.end(), std::this_thread::get_id()) == seen.end())
          seen.push_back(std::this_thread::get_id());
      }
      if (b0 <= throw_at && throw_at < b1)
        throw std::runtime_error("parallel_test: failure at " + std::to_string(throw_at));
      for (int64_t i = b0; i < b1; ++i) {
        int64_t inner = 0;
        if (nested > 0) {
          const std::thread::id me = std::this_thread::get_id();
          std::atomic<int64_t> count{0};
          le::parallel_for(0, nested, 1, [&](int64_t c0, int64_t c1) {
            if (std::this_thread::get_id() == me) count += c1 - c0;  // serial: all on this one
          });
          inner = count.load();
        }
        out[i - begin] += (i * 7919) % 1000003 + inner;
      }
    });
    *threads_used = static_cast<int32_t>(seen.size());
  });
}

// A stress check of parallel_for for tests: `callers` threads each run `regions` regions back to
// back over ranges of 1..range_max items with grains of 1..63 (from a fixed-seed generator per
// caller), each region adding 1 to every item of its own buffer. *bad: how many regions left an
// item at other than 1 (a chunk run twice, or not at all). Regions this short and this many are
// where a lost wake-up hangs or a late worker claims from a finished region.
LE_API int32_t le_parallel_stress(int64_t regions, int32_t callers, int64_t range_max,
                                  int64_t* bad) {
  return guarded([&] {
    std::atomic<int64_t> wrong{0};
    std::vector<std::thread> threads;
    for (int32_t c = 0; c < callers; ++c)
      threads.emplace_back([&, c] {
        uint64_t state = 0x9E3779B97F4A7C15ull * (c + 1);
        auto next = [&state] {  // xorshift64
          state ^= state << 13, state ^= state >> 7, state ^= state << 17;
          return state;
        };
        std::vector<int32_t> items;
        for (int64_t r = 0; r < regions; ++r) {
          const int64_t n = 1 + static_cast<int64_t>(next() % range_max);
          const int64_t grain = 1 + static_cast<int64_t>(next() % 63);
          items.assign(n, 0);
          le::parallel_for(0, n, grain, [&](int64_t b0, int64_t b1) {
            for (int64_t i = b0; i < b1; ++i) ++items[i];
          });
          if (std::any_of(items.begin(), items.end(), [](int32_t v) { return v != 1; })) ++wrong;
        }
      });
    for (auto& t : threads) t.join();
    *bad = wrong.load();
  });
}

}  // extern "C"
