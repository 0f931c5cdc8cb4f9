// The fused step. Every new token of a scheduler step is one row (a generated token, or one
// of a prompt chunk's tokens: each row attends to its own sequence up to its position); the
// whole forward (norms, quantized products, RoPE, the KV write, attention read in place from
// the paged cache, the MLP, the output projection) runs here with the work buffers reused
// between steps. Per layer there are five parallel regions over the matrix products (QKV, O,
// gate+up, down) and attention, plus row-parallel elementwise work for prompt-sized batches,
// over OpenMP (parallel.h), and no Python.
#include "decode.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "parallel.h"

namespace llama_engine {

namespace {

void grow(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

// Elementwise work is split over the threads only for prompt-sized batches (a decode step's
// few rows are cheaper than waking the team).
constexpr int64_t kSerialRows = 16;
constexpr int64_t kTileRows = 16;  // prompt rows that attend together (see attention)
constexpr int64_t kVChunk = 64;    // V rows summed per pass over a tile's queries
constexpr int64_t kScoreChunk = 128;  // positions scored per work unit (attend_split)
constexpr int64_t kSliceDims = 64;    // V dimensions summed per work unit (attend_split)
template <class F>
void over_rows(int64_t B, F&& f) {
  if (B < kSerialRows) {
    f(0, B);
    return;
  }
  parallel_for(0, B, 4, f);
}

void rms_norm(const float* x, const float* w, float eps, int64_t B, int64_t D, float* out) {
  over_rows(B, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = x + b * D;
      const float inv = 1.f / std::sqrt(dot_f32(xb, xb, D) / static_cast<float>(D) + eps);
      for (int64_t i = 0; i < D; ++i) out[b * D + i] = xb[i] * inv * w[i];
    }
  });
}

void add_into(float* x, const float* y, int64_t B, int64_t D) {
  over_rows(B, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0 * D; i < b1 * D; ++i) x[i] += y[i];
  });
}

// HF-order RoPE on heads of one row: pairs (i, i + half) rotate by the position's angle i.
void rope(float* v, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* x = v + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float x0 = x[i], x1 = x[i + half];
      x[i] = x0 * cos[i] - x1 * sin[i];
      x[i + half] = x1 * cos[i] + x0 * sin[i];
    }
  }
}

// The first position a row of context length n attends to under `window` (0: none).
int64_t first_visible(int64_t n, int64_t window) {
  return window > 0 && n > window ? n - window : 0;
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

}  // namespace

DecodeModel::DecodeModel(const ModelDims& dims, const ModelOptions& options,
                         const std::vector<const float*>& norms, std::vector<QMat> linears,
                         const std::vector<const float*>& extras)
    : d_(dims), eps_(options.eps), attn_scale_(options.attn_scale),
      activation_(options.activation), windows_(options.windows), linears_(std::move(linears)) {
  const int64_t L = d_.n_layers;
  require(L >= 1, "a model has at least one layer");
  if (windows_.empty()) windows_.assign(L, 0);
  require(static_cast<int64_t>(windows_.size()) == L, "windows: none, or one a layer");
  for (int64_t w : windows_) require(w >= 0, "a window is positive, or 0 for none");
  require(static_cast<int64_t>(norms.size()) == 2 * L + 1, "2 norms a layer + 1");
  require(static_cast<int64_t>(linears_.size()) == 7 * L + 1, "7 linears a layer + 1");
  require(extras.empty() || static_cast<int64_t>(extras.size()) == kExtras * L,
          "extras: none, or kExtras a layer");
  require(activation_ == Activation::silu || activation_ == Activation::gelu_tanh,
          "activation: 0 (silu) or 1 (gelu_tanh)");
  require(d_.n_kv_heads > 0 && d_.n_heads % d_.n_kv_heads == 0 && d_.head_dim % 2 == 0 &&
              d_.dim % QK == 0 && d_.ffn_dim % QK == 0 && d_.n_heads * d_.head_dim % QK == 0,
          "bad head layout or dims not a multiple of 32");
  for (const float* n : norms) norms_.emplace_back(n, n + d_.dim);
  // every product writes into buffers sized from dims: refuse any other shape
  const int64_t q = d_.n_heads * d_.head_dim, kv = d_.n_kv_heads * d_.head_dim, D = d_.dim;
  const int64_t extra_size[kExtras] = {q, kv, kv, d_.head_dim, d_.head_dim, D, D};
  extras_.resize(kExtras * L);
  for (size_t i = 0; i < extras.size(); ++i)
    if (extras[i]) extras_[i].assign(extras[i], extras[i] + extra_size[i % kExtras]);
  const int64_t want[7][2] = {{q, D}, {kv, D}, {kv, D}, {D, q},
                              {d_.ffn_dim, D}, {d_.ffn_dim, D}, {D, d_.ffn_dim}};
  for (int64_t l = 0; l < L; ++l)
    for (int i = 0; i < 7; ++i) {
      const QMat& w = linears_[7 * l + i];
      require(w.N == want[i][0] && w.K == want[i][1],
              "layer " + std::to_string(l) + " weight " + std::to_string(i) + " is [" +
                  std::to_string(w.N) + ", " + std::to_string(w.K) + "], expected [" +
                  std::to_string(want[i][0]) + ", " + std::to_string(want[i][1]) + "]");
    }
  require(linears_.back().N == d_.vocab && linears_.back().K == D,
          "the output projection must be [vocab, dim]");
}

void DecodeModel::add_bias(float* out, const std::vector<float>& bias, int64_t B) const {
  if (bias.empty()) return;
  const int64_t N = static_cast<int64_t>(bias.size());
  over_rows(B, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t i = 0; i < N; ++i) out[b * N + i] += bias[i];
  });
}

// RMSNorm over each head_dim run of v (one row's heads) with weight w, in place.
void DecodeModel::head_norm(float* v, int64_t heads, const std::vector<float>& w) const {
  if (w.empty()) return;
  const int64_t hd = d_.head_dim;
  for (int64_t h = 0; h < heads; ++h) {  // serial: it runs inside a row-parallel region
    float* x = v + h * hd;
    const float inv = 1.f / std::sqrt(dot_f32(x, x, hd) / static_cast<float>(hd) + eps_);
    for (int64_t i = 0; i < hd; ++i) x[i] = x[i] * inv * w[i];
  }
}

void DecodeModel::activate(int64_t B) {
  const int64_t F = d_.ffn_dim;
  float* g = gate_.data();
  const float* up = up_.data();
  float* scratch = h_.data();
  // silu(g) = g * sigmoid(g); gelu's tanh form, 0.5 g (1 + tanh(u)), is g * sigmoid(2u) with
  // u = sqrt(2 / pi) (g + 0.044715 g^3): either way g / (1 + exp(-z))
  const bool gelu = activation_ == Activation::gelu_tanh;
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t i0 = b0 * F, n = (b1 - b0) * F;
    if (gelu) {
      const float c = 2.f * 0.7978845608028654f;
      for (int64_t i = i0; i < i0 + n; ++i)
        scratch[i] = -c * (g[i] + 0.044715f * g[i] * g[i] * g[i]);
    } else {
      for (int64_t i = i0; i < i0 + n; ++i) scratch[i] = -g[i];
    }
    exp_inplace(scratch + i0, n);
    for (int64_t i = i0; i < i0 + n; ++i) g[i] = g[i] / (1.f + scratch[i]) * up[i];
  });
}

void DecodeModel::linears(const std::vector<Job>& jobs, const float* x, int64_t B,
                          const RowActs& acts) {
  if (acts.first == acts.rest || acts.split >= B) {
    linears_rows(jobs, x, 0, B, acts.first);
  } else if (acts.split <= 0) {
    linears_rows(jobs, x, 0, B, acts.rest);
  } else {
    linears_rows(jobs, x, 0, acts.split, acts.first);
    linears_rows(jobs, x, acts.split, B, acts.rest);
  }
}

// Rows [r0, r1) of x against every job's weight, into the same rows of its output.
void DecodeModel::linears_rows(const std::vector<Job>& jobs, const float* x, int64_t r0,
                               int64_t r1, Acts acts) {
  const int64_t K = jobs.front().w->K, B = r1 - r0;
  x += r0 * K;
  const int digits = acts_digits(acts);
  bool any_quant = false;
  for (const Job& j : jobs) any_quant |= digits > 0 && !j.w->dense;
  if (any_quant) acts_.quantize(x, B, K, digits);
  // The jobs share one parallel region over their row groups, matrix after matrix. Dense
  // weights (types not kept quantized) take the exact float kernel.
  std::vector<int64_t> first_group;
  int64_t groups = 0;
  for (const Job& j : jobs) {
    first_group.push_back(groups);
    groups += qmat_groups(*j.w);
  }
  parallel_for(0, groups, 1, [&](int64_t u0, int64_t u1) {
    for (size_t i = 0; i < jobs.size(); ++i) {
      const QMat& w = *jobs[i].w;
      const int64_t g0 = std::max(u0, first_group[i]) - first_group[i];
      const int64_t g1 = std::min(u1, first_group[i] + qmat_groups(w)) - first_group[i];
      if (g0 >= g1) continue;
      float* out = jobs[i].out + r0 * w.N;
      if (digits > 0 && !w.dense)
        qmat_rows_quant(w, acts_, out, w.N, g0, g1);
      else
        qmat_rows_f32(w, x, B, out, w.N, g0, g1);
    }
  });
}

template <class T>
void DecodeModel::attention(const StepArgs& a, int64_t layer, T* k_cache, T* v_cache) {
  const int64_t B = a.B, block_size = a.block_size, n_slots = a.n_slots;
  const int64_t window = windows_[layer];
  const bool local = window > 0 && a.cos_local;
  const float *cos = local ? a.cos_local : a.cos, *sin = local ? a.sin_local : a.sin;
  const int64_t *write_slots = a.write_slots, *ctx_lens = a.ctx_lens;
  const int64_t hd = d_.head_dim, half = hd / 2, hq = d_.n_heads, hkv = d_.n_kv_heads;
  const int64_t kv_row = hkv * hd;
  T* kl = k_cache + layer * n_slots * kv_row;
  T* vl = v_cache + layer * n_slots * kv_row;
  // every row's K/V is written before any row attends: a prompt row reads the rows before it
  const std::vector<float>* extra = extras_.data() + layer * kExtras;
  over_rows(B, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      head_norm(q_.data() + b * hq * hd, hq, extra[kQNorm]);
      head_norm(k_.data() + b * kv_row, hkv, extra[kKNorm]);
      rope(q_.data() + b * hq * hd, hq, hd, cos + b * half, sin + b * half);
      rope(k_.data() + b * kv_row, hkv, hd, cos + b * half, sin + b * half);
      // a block holds each KV head's rows together: [block][kv head][offset][head_dim]
      const int64_t blk = write_slots[b] / block_size, o = write_slots[b] % block_size;
      for (int64_t h = 0; h < hkv; ++h) {
        const int64_t at = ((blk * hkv + h) * block_size + o) * hd;
        to_half(k_.data() + b * kv_row + h * hd, hd, kl + at);  // or copy
        to_half(v_.data() + b * kv_row + h * hd, hd, vl + at);
      }
    }
  });
  const int64_t* tables = a.block_tables;
  const int64_t max_blocks = a.max_blocks;
  const float scale = attn_scale_;
  const int64_t group = hq / hkv;
  // Tiles: runs of up to kTileRows consecutive rows of one prompt chunk (same block table,
  // positions one apart), which then read each K/V row once for all their queries. A decode
  // row is a tile of its own.
  tiles_.clear();
  for (int64_t b = 0; b < B; ++b) {
    const bool joins = b > 0 && tiles_.back().second - tiles_.back().first < kTileRows &&
                       ctx_lens[b] == ctx_lens[b - 1] + 1 &&
                       std::equal(tables + b * max_blocks, tables + (b + 1) * max_blocks,
                                  tables + (b - 1) * max_blocks);
    if (joins)
      tiles_.back().second = b + 1;
    else
      tiles_.emplace_back(b, b + 1);
  }
  const int64_t n_tiles = static_cast<int64_t>(tiles_.size());
  // Work units: every query head of one KV head of a tile, which then reads its rows once. Too
  // few of those to busy the cores (a decode step of one or two sequences): split the reads
  // instead, by positions, then by dimensions (attend_split: the same bits).
  if (n_tiles * hkv < 2 * max_threads() && max_threads() > 1 && hd % 32 == 0) {
    attend_split(a, window, kl, vl);
    return;
  }
  parallel_for(0, n_tiles * hkv, 1, [&](int64_t u0, int64_t u1) {
    thread_local std::vector<float> scores, qs;
    thread_local std::vector<const T*> krows, vrows;
    for (int64_t u = u0; u < u1; ++u) {
      // Later tiles of a prompt attend to more positions: units alternate between the two
      // ends of the tile list, so each thread's contiguous range gets an even share of work.
      const int64_t i = u / hkv;
      const auto [r0, r1] = tiles_[i % 2 == 0 ? i / 2 : n_tiles - 1 - i / 2];
      const int64_t kvh = u % hkv, h0 = kvh * group, R = r1 - r0;
      // the tile reads positions [lo, len): its first row's window start (later rows' start
      // at or after it) up to its last row's own position
      const int64_t len = ctx_lens[r1 - 1], lo = first_visible(ctx_lens[r0], window);
      const int64_t span = len - lo, nq = R * group;
      const int64_t* table = tables + r0 * max_blocks;
      grow(scores, nq * span);
      grow(qs, nq * hd);
      if (static_cast<int64_t>(krows.size()) < span) {
        krows.resize(span);
        vrows.resize(span);
      }
      // this KV head's row of each position, read in place through the block table
      for (int64_t p = lo; p < len; ++p) {
        const int64_t at = ((table[p / block_size] * hkv + kvh) * block_size + p % block_size) * hd;
        krows[p - lo] = kl + at;
        vrows[p - lo] = vl + at;
      }
      for (int64_t r = 0; r < R; ++r)  // the tile's queries, contiguous: [R][group][hd]
        std::copy_n(q_.data() + ((r0 + r) * hq + h0) * hd, group * hd,
                    qs.data() + r * group * hd);
      dot_rows(qs.data(), nq, krows.data(), span, hd, scale, scores.data(), span);
      for (int64_t r = 0; r < R; ++r) {
        // causal: this row sees positions [start, n); its V sum below starts at start, so the
        // tile changes no bit (the zeros only keep the scores row whole)
        const int64_t n = ctx_lens[r0 + r], start = first_visible(n, window) - lo;
        for (int64_t g = 0; g < group; ++g) {
          float* row = scores.data() + (r * group + g) * span;
          std::fill_n(row, start, 0.f);
          softmax_inplace(row + start, n - lo - start);
          std::fill_n(att_.data() + ((r0 + r) * hq + h0 + g) * hd, hd, 0.f);
        }
      }
      // weighted sums of V, a chunk of positions at a time so each chunk stays in L1 for
      // every query of the tile; a row's sum starts at its own window start (the same bits)
      for (int64_t p0 = 0; p0 < span; p0 += kVChunk) {
        for (int64_t r = 0; r < R; ++r) {
          const int64_t n_r = ctx_lens[r0 + r];
          const int64_t from = std::max(p0, first_visible(n_r, window) - lo);
          const int64_t n = std::min(n_r - lo, p0 + kVChunk) - from;
          if (n <= 0) continue;
          weighted_sum_rows(scores.data() + r * group * span + from, group, span,
                            vrows.data() + from, n, hd, att_.data() + ((r0 + r) * hq + h0) * hd,
                            hd, true);
        }
      }
    }
  });
}

// attention() for few tiles, in three parallel regions, each unit's arithmetic the one a
// whole-head unit does: (1) scores of every query of a (tile, KV head) against a chunk of its
// positions (dot_rows scores a position the same way however positions are split between
// calls), (2) each query's softmax, (3) the V sums of a slice of dimensions (each output
// element is one FMA chain over the positions in order, whatever the slice). K and V rows are
// then read once for all the queries of their KV head, by every core.
template <class T>
void DecodeModel::attend_split(const StepArgs& a, int64_t window, const T* kl, const T* vl) {
  const int64_t *ctx_lens = a.ctx_lens, *tables = a.block_tables;
  const int64_t block_size = a.block_size, max_blocks = a.max_blocks;
  const int64_t hd = d_.head_dim, hq = d_.n_heads, hkv = d_.n_kv_heads, group = hq / hkv;
  const int64_t n_tiles = static_cast<int64_t>(tiles_.size()), jobs = n_tiles * hkv;
  const float scale = attn_scale_;
  auto span_of = [&](int64_t i) {  // tile i reads positions [lo, len)
    const auto [r0, r1] = tiles_[i];
    const int64_t len = ctx_lens[r1 - 1], lo = first_visible(ctx_lens[r0], window);
    return std::pair<int64_t, int64_t>(lo, len);
  };
  split_at_.assign(jobs + 1, 0);
  split_chunk_.assign(jobs + 1, 0);
  tile_of_row_.resize(a.B);
  for (int64_t j = 0; j < jobs; ++j) {
    const int64_t i = j / hkv;
    const auto [r0, r1] = tiles_[i];
    const auto [lo, len] = span_of(i);
    split_at_[j + 1] = split_at_[j] + (r1 - r0) * group * (len - lo);
    split_chunk_[j + 1] = split_chunk_[j] + (len - lo + kScoreChunk - 1) / kScoreChunk;
    for (int64_t b = r0; b < r1; ++b) tile_of_row_[b] = i;
  }
  grow(split_scores_, split_at_[jobs]);
  float* scores = split_scores_.data();
  auto position = [&](const T* base, const int64_t* table, int64_t kvh, int64_t p) {
    return base + ((table[p / block_size] * hkv + kvh) * block_size + p % block_size) * hd;
  };
  // (1) scores, a chunk of positions of one (tile, KV head) a unit
  parallel_for(0, split_chunk_[jobs], 1, [&](int64_t u0, int64_t u1) {
    thread_local std::vector<float> qs;
    thread_local std::vector<const T*> rows;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t j =
          std::upper_bound(split_chunk_.begin(), split_chunk_.end(), u) - split_chunk_.begin() - 1;
      const int64_t i = j / hkv, kvh = j % hkv;
      const auto [r0, r1] = tiles_[i];
      const auto [lo, len] = span_of(i);
      const int64_t p0 = lo + (u - split_chunk_[j]) * kScoreChunk;
      const int64_t p1 = std::min(len, p0 + kScoreChunk), nq = (r1 - r0) * group;
      grow(qs, nq * hd);
      for (int64_t r = r0; r < r1; ++r)  // the tile's queries of this KV head: [R][group][hd]
        std::copy_n(q_.data() + (r * hq + kvh * group) * hd, group * hd,
                    qs.data() + (r - r0) * group * hd);
      rows.resize(p1 - p0);
      const int64_t* table = tables + r0 * max_blocks;
      for (int64_t p = p0; p < p1; ++p) rows[p - p0] = position(kl, table, kvh, p);
      dot_rows(qs.data(), nq, rows.data(), p1 - p0, hd, scale, scores + split_at_[j] + p0 - lo,
               len - lo);
    }
  });
  // (2) softmax, a query (row, head) a unit
  parallel_for(0, a.B * hq, 4, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / hq, h = u % hq, i = tile_of_row_[b];
      const int64_t r0 = tiles_[i].first;
      const auto [lo, len] = span_of(i);
      const int64_t span = len - lo, n = ctx_lens[b], start = first_visible(n, window) - lo;
      float* row = scores + split_at_[i * hkv + h / group] + ((b - r0) * group + h % group) * span;
      std::fill_n(row, start, 0.f);
      softmax_inplace(row + start, n - lo - start);
      std::fill_n(att_.data() + (b * hq + h) * hd, hd, 0.f);
    }
  });
  // (3) weighted sums of V, a slice of dimensions of one (tile, KV head) a unit
  const int64_t slices = (hd + kSliceDims - 1) / kSliceDims;
  parallel_for(0, jobs * slices, 1, [&](int64_t u0, int64_t u1) {
    thread_local std::vector<const T*> rows;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t j = u / slices, d0 = u % slices * kSliceDims;
      const int64_t width = std::min(kSliceDims, hd - d0);
      const int64_t i = j / hkv, kvh = j % hkv;
      const auto [r0, r1] = tiles_[i];
      const auto [lo, len] = span_of(i);
      const int64_t span = len - lo;
      rows.resize(span);
      const int64_t* table = tables + r0 * max_blocks;
      for (int64_t p = lo; p < len; ++p) rows[p - lo] = position(vl, table, kvh, p) + d0;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t from = first_visible(ctx_lens[r], window) - lo;
        const int64_t n = ctx_lens[r] - lo - from;
        weighted_sum_rows(scores + split_at_[j] + (r - r0) * group * span + from, group, span,
                          rows.data() + from, n, width, att_.data() + (r * hq + kvh * group) * hd + d0,
                          hd, true);
      }
    }
  });
}

void DecodeModel::set_profiling(bool on) {
  profiling_ = on;
  profile_.clear();
}

void DecodeModel::lap(const char* phase) {
  if (!profiling_) return;
  const auto now = std::chrono::steady_clock::now();
  profile_[phase] += std::chrono::duration<double, std::micro>(now - mark_).count();
  mark_ = now;
}

void DecodeModel::check(const StepArgs& a) const {
  const int64_t B = a.B, bs = a.block_size;
  require(B >= 1 && a.x && a.cos && a.sin && a.write_slots && a.block_tables && a.ctx_lens &&
              a.k_cache && a.v_cache && (a.R == 0 || (a.logit_rows && (a.logits || a.hidden))),
          "a step needs at least one row and every buffer");
  require(bs > 0 && a.n_slots > 0 && a.n_slots % bs == 0 && a.max_blocks > 0,
          "block_size and the cache's slots must be positive, slots a multiple of block_size");
  require(a.R >= 0 && a.R <= B, "logit_rows: at most one per row");
  acts_from(a.acts);
  acts_from(a.prompt_acts);
  require(a.generated_rows >= 0 && a.generated_rows <= B, "generated_rows: 0 to B");
  for (int64_t r = 0; r < a.R; ++r) {
    require(a.logit_rows[r] >= 0 && a.logit_rows[r] < B, "logit row out of range");
    require(r == 0 || a.logit_rows[r] > a.logit_rows[r - 1], "logit rows must ascend");
  }
  const int64_t n_blocks = a.n_slots / bs;
  // the positions every layer may read: all, or with a window on every layer only the last
  // `reach` of each row (blocks wholly before them may have been given back: -1)
  const int64_t reach = *std::min_element(windows_.begin(), windows_.end()) > 0
                            ? *std::max_element(windows_.begin(), windows_.end())
                            : 0;
  for (int64_t b = 0; b < B; ++b) {  // attention reads through these: check them all
    const int64_t len = a.ctx_lens[b], used = (len + bs - 1) / bs;
    require(len >= 1 && used <= a.max_blocks, "context length beyond the block table");
    const int64_t* table = a.block_tables + b * a.max_blocks;
    for (int64_t i = first_visible(len, reach) / bs; i < used; ++i)
      require(table[i] >= 0 && table[i] < n_blocks, "block id out of range");
    require(a.write_slots[b] == table[(len - 1) / bs] * bs + (len - 1) % bs,
            "the new token's slot must be its position's slot in the block table");
  }
}

void DecodeModel::step(const StepArgs& a) {
  check(a);
  const int64_t B = a.B, D = d_.dim, hd = d_.head_dim, F = d_.ffn_dim;
  const RowActs acts{a.generated_rows, acts_from(a.acts), acts_from(a.prompt_acts)};
  grow(x_, B * D);
  grow(h_, B * std::max(D, F));
  grow(q_, B * d_.n_heads * hd);
  grow(att_, B * d_.n_heads * hd);
  grow(k_, B * d_.n_kv_heads * hd);
  grow(v_, B * d_.n_kv_heads * hd);
  grow(tmp_, B * D);
  grow(gate_, B * F);
  grow(up_, B * F);
  if (profiling_) {
    mark_ = std::chrono::steady_clock::now();
    profile_["steps"] += 1;
  }
  std::copy_n(a.x, B * D, x_.data());
  const int64_t R = a.R, L = d_.n_layers, att_row = d_.n_heads * hd;
  const int64_t generated_logits = std::count_if(
      a.logit_rows, a.logit_rows + R, [&](int64_t row) { return row < a.generated_rows; });
  int64_t n = B;  // rows still computed
  RowActs row_acts = acts;
  for (int64_t l = 0; l < L; ++l) {
    const QMat* w = linears_.data() + 7 * l;
    rms_norm(x_.data(), norms_[2 * l].data(), eps_, B, D, h_.data());
    lap("norms, residuals, silu");
    linears({{&w[0], q_.data()}, {&w[1], k_.data()}, {&w[2], v_.data()}}, h_.data(), B,
            acts);
    const std::vector<float>* extra = extras_.data() + l * kExtras;
    add_bias(q_.data(), extra[kQBias], B);
    add_bias(k_.data(), extra[kKBias], B);
    add_bias(v_.data(), extra[kVBias], B);
    lap("qkv projections");
    if (a.half_kv)
      attention(a, l, static_cast<half_t*>(a.k_cache), static_cast<half_t*>(a.v_cache));
    else
      attention(a, l, static_cast<float*>(a.k_cache), static_cast<float*>(a.v_cache));
    lap("rope, kv write, attention");
    if (l == L - 1 && R < B) {
      // The last layer's K/V are written; only the rows whose output is wanted go on, moved
      // to the front (logit rows ascend, so no row is overwritten before it is moved).
      for (int64_t r = 0; r < R; ++r) {
        const int64_t from = a.logit_rows[r];
        if (from == r) continue;
        std::copy_n(att_.data() + from * att_row, att_row, att_.data() + r * att_row);
        std::copy_n(x_.data() + from * D, D, x_.data() + r * D);
      }
      n = R;
      row_acts = {generated_logits, acts.first, acts.rest};
      if (n == 0) break;
    }
    linears({{&w[3], tmp_.data()}}, att_.data(), n, row_acts);
    lap("output projection (attn)");
    if (!extra[kPostAttnNorm].empty())
      rms_norm(tmp_.data(), extra[kPostAttnNorm].data(), eps_, n, D, tmp_.data());
    add_into(x_.data(), tmp_.data(), n, D);
    rms_norm(x_.data(), norms_[2 * l + 1].data(), eps_, n, D, h_.data());
    lap("norms, residuals, silu");
    linears({{&w[4], gate_.data()}, {&w[5], up_.data()}}, h_.data(), n, row_acts);
    lap("gate, up projections");
    activate(n);
    lap("norms, residuals, silu");
    linears({{&w[6], tmp_.data()}}, gate_.data(), n, row_acts);
    lap("down projection");
    if (!extra[kPostFfnNorm].empty())
      rms_norm(tmp_.data(), extra[kPostFfnNorm].data(), eps_, n, D, tmp_.data());
    add_into(x_.data(), tmp_.data(), n, D);
  }
  // x_'s first R rows are now the logit rows (all rows when every one is wanted): only they
  // go through the output norm and projection
  rms_norm(x_.data(), norms_.back().data(), eps_, R, D, h_.data());
  lap("norms, residuals, silu");
  if (a.hidden) {
    std::copy_n(h_.data(), R * D, a.hidden);
    return;
  }
  if (R > 0)
    linears({{&linears_.back(), a.logits}}, h_.data(), R,
            {generated_logits, acts.first, acts.rest});
  lap("lm head (vocab projection)");
}

}  // namespace llama_engine
