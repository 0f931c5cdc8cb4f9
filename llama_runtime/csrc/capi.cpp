// C entry points of the kernels, for a caller without torch (llama_runtime/native, over ctypes):
// plain pointers in, 0 or -1 out, and the failure's message from le_error(). The caller owns
// and checks its buffers; these functions check what they can see (dims, block ids, slots).
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "decode.h"
#include "parallel.h"
#include "qgemm.h"

namespace le = llama_engine;

// the library is built with hidden symbols (native/library.py): export the C API only
#define LE_API __attribute__((visibility("default")))

extern "C" {

// A weight [n, k]: kind 0 = dense float32 row-major, 1 = q4 (qs, d, m), 2 = q8 (qs, d), in the
// kernels' layout (qgemm.h); f16: d and m are float16.
struct le_weight {
  int32_t kind;
  int32_t f16;
  const void* qs;
  const void* d;
  const void* m;
  int64_t n, k;
};

}  // extern "C"

namespace {

thread_local std::string last_error;

le::QMat to_qmat(const le_weight& w) {
  le::QMat m{w.kind == 1, w.qs, w.d, w.kind == 1 ? w.m : nullptr, w.n, w.k, w.f16 != 0};
  m.dense = w.kind == 0;
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

// out [B, n] = x [B, k] @ w.T; int8_acts quantizes x per 32-block first (q4/q8 weights only).
LE_API int32_t le_linear(const le_weight* w, const float* x, int64_t B, float* out, int32_t int8_acts) {
  return guarded([&] {
    const le::QMat m = to_qmat(*w);
    le::QActs acts;
    le::qmat_linear(m, x, B, out, int8_acts != 0, acts);
  });
}

// dims: dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab. norms: 2 * n_layers + 1
// arrays of dim floats (copied); weights: 7 * n_layers + 1 (borrowed: they must outlive the
// model). Returns the model, or null with le_error() set.
LE_API void* le_model_new(const int64_t* dims, float eps, const float* const* norms, int64_t n_norms,
                   const le_weight* weights, int64_t n_weights) {
  le::DecodeModel* model = nullptr;
  guarded([&] {
    std::vector<le::QMat> mats;
    for (int64_t i = 0; i < n_weights; ++i) mats.push_back(to_qmat(weights[i]));
    model = new le::DecodeModel(
        le::ModelDims{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6]}, eps,
        std::vector<const float*>(norms, norms + n_norms), std::move(mats));
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

}  // extern "C"
