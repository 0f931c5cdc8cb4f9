// The fused step: a whole Llama-family forward for a batch of token rows in one native call
// (see decode.cpp). Plain pointers only: the torch bindings (module.cpp) and any other caller
// own the memory and check their own containers.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "qgemm.h"

namespace llama_engine {

struct ModelDims {
  int64_t dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab;
};

// The parts a layer may have beyond the Llama layer, kExtras pointers a layer in this order
// (nullptr: the layer has none): biases of the Q, K and V products (Qwen2); RMSNorm weights over
// each head of Q and of K, applied before RoPE (head_dim floats; Qwen3, Gemma 3); RMSNorm weights
// on the attention and MLP outputs before each joins the residual (dim floats; Gemma 3).
enum Extra { kQBias, kKBias, kVBias, kQNorm, kKNorm, kPostAttnNorm, kPostFfnNorm, kExtras };

// The MLP's gate activation: silu(g) * up (Llama), or gelu(g) * up with the tanh approximation
// (Gemma).
enum class Activation : int32_t { silu = 0, gelu_tanh = 1 };

// What the layers share beyond their shapes: eps of every RMSNorm, the scale of attention scores
// (head_dim ** -0.5 for Llama), the activation; and each layer's sliding window (a query attends
// to the last `window` positions, its own included; 0 or no entries: every position). Windowed
// layers rotate by StepArgs' local RoPE table when a step gives one (Gemma 3's second base).
struct ModelOptions {
  float eps;
  float attn_scale;
  Activation activation = Activation::silu;
  std::vector<int64_t> windows = {};
};

// One step's inputs. B rows: x [B, dim] embeddings of the new tokens; cos, sin [B, head_dim / 2]
// at their positions (cos_local, sin_local the same for windowed layers, or null: cos, sin); write_slots [B] cache slot of each new token; block_tables [B, max_blocks]
// block ids of each row's sequence (position p lives at slot table[p / block_size] * block_size
// + p % block_size); ctx_lens [B] context length of each row, its own token included (rows of
// one prompt chunk share a table and attend causally, as every row's K/V is written before any
// row attends); k_cache, v_cache [n_layers, n_slots / block_size, n_kv_heads, block_size,
// head_dim] (a block keeps each KV head's rows together, so attention reads them as one stretch),
// float32 or (half_kv) float16, K/V rounded to it as they are written; logit_rows [R] the rows
// whose logits are wanted, ascending, written to logits [R, vocab] (or, when `hidden` is given,
// their final-normed hidden states to hidden [R, dim] instead: embeddings); the last layer
// computes past its K/V write for these rows only. acts and prompt_acts (Acts values, qgemm.h)
// pick how every product with a quantized weight treats its activations: float (exact), int8
// (llama.cpp's scheme) or int16; acts for the first generated_rows rows (tokens the model
// generated, which callers put first), prompt_acts for the others (prompt tokens).
struct StepArgs {
  const float* x;
  const float* cos;
  const float* sin;
  const int64_t* write_slots;
  const int64_t* block_tables;
  int64_t max_blocks;
  const int64_t* ctx_lens;
  int64_t B;
  void* k_cache;
  void* v_cache;
  bool half_kv;
  int64_t n_slots;
  int64_t block_size;
  const int64_t* logit_rows;
  int64_t R;
  int32_t acts;
  int32_t prompt_acts;
  int64_t generated_rows;
  float* logits;
  float* hidden = nullptr;
  const float* cos_local = nullptr;
  const float* sin_local = nullptr;
};

class DecodeModel {
 public:
  // norms: attn_norm and ffn_norm of each layer, then the output norm (dim floats each; copied).
  // linears: q, k, v, o, gate, up, down of each layer, then the output projection, in the
  // kernels' layout (qgemm.h); borrowed: their memory must outlive the model. extras: kExtras
  // per layer (Extra; copied), or none at all for Llama layers. Throws std::invalid_argument on
  // a shape that does not match dims.
  DecodeModel(const ModelDims& dims, const ModelOptions& options,
              const std::vector<const float*>& norms, std::vector<QMat> linears,
              const std::vector<const float*>& extras = {});

  // Throws std::invalid_argument, before computing anything, on an input that would read or
  // write out of bounds (block ids, slots, lengths, logit rows).
  void step(const StepArgs& a);

  // Per-phase wall time of the steps run while profiling is on (for docs/performance.md):
  // phase name -> microseconds, summed over steps, plus "steps".
  void set_profiling(bool on);
  std::map<std::string, double> profile() const { return profile_; }
  const ModelDims& dims() const { return d_; }

 private:
  struct Job {
    const QMat* w;
    float* out;
  };
  // How a product's rows take their activations: rows [0, split) by `first`, the rest by `rest`.
  struct RowActs {
    int64_t split;
    Acts first, rest;
  };
  void check(const StepArgs& a) const;
  void linears(const std::vector<Job>& jobs, const float* x, int64_t B, const RowActs& acts);
  void linears_rows(const std::vector<Job>& jobs, const float* x, int64_t r0, int64_t r1,
                    Acts acts);
  template <class T>  // T: float, or half_t for a float16 cache
  void attention(const StepArgs& a, int64_t layer, T* k_cache, T* v_cache);
  // attention's reads for few tiles (see attention): positions, then dimensions, split
  template <class T>
  void attend_split(const StepArgs& a, int64_t window, const T* kl, const T* vl);

  void add_bias(float* out, const std::vector<float>& bias, int64_t B) const;
  void head_norm(float* v, int64_t heads, const std::vector<float>& w) const;
  void activate(int64_t B);  // gate_ = act(gate_) * up_

  ModelDims d_;
  float eps_;
  float attn_scale_;
  Activation activation_;
  std::vector<int64_t> windows_;  // per layer, 0: global
  std::vector<std::vector<float>> norms_;
  std::vector<std::vector<float>> extras_;  // [layer * kExtras + Extra], empty when absent
  std::vector<QMat> linears_;
  // work buffers, grown to the largest batch seen and reused (a step allocates only a few
  // small job lists). Not thread-safe: one step at a time per DecodeModel (the engine
  // serialises every forward).
  std::vector<float> x_, h_, q_, k_, v_, att_, tmp_, gate_, up_;
  std::vector<std::pair<int64_t, int64_t>> tiles_;  // attention's row tiles [first, end)
  // attend_split's scores of each (tile, KV head) at split_at_[j], [queries][span], and the
  // first of its position chunks in split_chunk_[j]
  std::vector<float> split_scores_;
  std::vector<int64_t> split_at_, split_chunk_, tile_of_row_;
  QActs acts_;
  bool profiling_ = false;
  std::map<std::string, double> profile_;
  std::chrono::steady_clock::time_point mark_;
  void lap(const char* phase);  // charge the time since the last lap to phase
};

}  // namespace llama_engine
