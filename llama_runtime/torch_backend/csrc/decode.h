// The fused decode step: a whole Llama-family forward for rows that each add one token to their
// sequence, in one native call (see decode.cpp).
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "qgemm.h"

namespace llama_engine {

// One weight matrix [N, K]: dense float32, or quantized (q4 with an offset, q8 without).
struct Linear {
  at::Tensor dense, qs, d, m;  // the owner of the memory QMat points into
  QMat mat{};
  bool quantized = false;
  int64_t N = 0, K = 0;
  static Linear from(const std::vector<at::Tensor>& parts, int64_t rows);
};

class DecodeModel {
 public:
  // dims: dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab_size.
  // norms: attn_norm and ffn_norm of each layer, then the output norm.
  // linears: q, k, v, o, gate, up, down of each layer, then the output projection; each one
  // [dense] or [qs, d] (q8) or [qs, d, m] (q4) in the kernels' layout (module.cpp), with its
  // real row count in rows.
  DecodeModel(std::vector<int64_t> dims, double eps, std::vector<at::Tensor> norms,
              std::vector<std::vector<at::Tensor>> linears, std::vector<int64_t> rows);

  // x: [B, dim] embeddings of the new tokens; cos, sin: [B, head_dim / 2] at their positions;
  // write_slots: [B] cache slot of each new token; block_tables: [B, max_blocks] block ids of
  // each row's sequence (positions p live at slot block_tables[b][p / block_size] * block_size
  // + p % block_size); ctx_lens: [B] context length of each row, its own token included (rows
  // of one prompt chunk share a table and attend causally, as every row's K/V is written
  // before any row attends); k_cache, v_cache: [n_layers, slots, n_kv_heads, head_dim], float32
  // or float16 (K/V rounded to it as they are written, widened as they are read);
  // logit_rows: [R] the rows whose logits are wanted. Returns logits [R, vocab_size]. int8_acts
  // picks the int8-activation kernels (llama.cpp's scheme) over the exact float ones.
  at::Tensor step(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& write_slots, const at::Tensor& block_tables,
                  const at::Tensor& ctx_lens, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, int64_t block_size, const at::Tensor& logit_rows,
                  bool int8_acts);

  // Per-phase wall time of the steps run while profiling is on (for docs/performance.md):
  // phase name -> microseconds, summed over steps, plus "steps".
  void set_profiling(bool on);
  std::map<std::string, double> profile() const;

 private:
  struct Job {
    const Linear* w;
    float* out;
  };
  void linears(const std::vector<Job>& jobs, const float* x, int64_t B, bool int8_acts);
  template <class T>  // T: float, or half_t for a float16 cache
  void attention(int64_t layer, int64_t B, const float* cos, const float* sin,
                 const int64_t* write_slots, const at::Tensor& block_tables,
                 const int64_t* ctx_lens, T* k_cache, T* v_cache, int64_t n_slots,
                 int64_t block_size);

  int64_t dim_, n_layers_, n_heads_, n_kv_heads_, head_dim_, ffn_dim_, vocab_;
  float eps_;
  std::vector<at::Tensor> norms_;
  std::vector<Linear> linears_;
  // work buffers, grown to the largest batch seen and reused (a step allocates only its logits
  // and a few small job lists). Not thread-safe: one step at a time per DecodeModel (the engine
  // serialises every forward).
  std::vector<float> x_, h_, q_, k_, v_, att_, tmp_, gate_, up_;
  std::vector<std::pair<int64_t, int64_t>> tiles_;  // attention's row tiles [first, end)
  QActs acts_;
  bool profiling_ = false;
  std::map<std::string, double> profile_;
  std::chrono::steady_clock::time_point mark_;
  void lap(const char* phase);  // charge the time since the last lap to phase
};

}  // namespace llama_engine
