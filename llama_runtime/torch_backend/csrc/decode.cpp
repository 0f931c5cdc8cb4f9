// The fused step. Every new token of a scheduler step is one row (a generated token, or one
// of a prompt chunk's tokens: each row attends to its own sequence up to its position); the
// whole forward (norms, quantized products, RoPE, the KV write, attention read in place from
// the paged cache, the MLP, the output projection) runs here with the work buffers reused
// between steps. Per layer there are five parallel regions over the matrix products (QKV, O,
// gate+up, down) and attention, plus row-parallel elementwise work for prompt-sized batches,
// over torch's intra-op thread pool, and no Python.
#include "decode.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

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
template <class F>
void over_rows(int64_t B, F&& f) {
  if (B < kSerialRows) {
    f(0, B);
    return;
  }
  at::parallel_for(0, B, 4, f);
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

// g = silu(g) * up = g / (1 + exp(-g)) * up, with scratch for the exponentials.
void silu_mul(float* g, const float* up, float* scratch, int64_t B, int64_t F) {
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t i0 = b0 * F, n = (b1 - b0) * F;
    for (int64_t i = i0; i < i0 + n; ++i) scratch[i] = -g[i];
    exp_inplace(scratch + i0, n);
    for (int64_t i = i0; i < i0 + n; ++i) g[i] = g[i] / (1.f + scratch[i]) * up[i];
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

}  // namespace

Linear Linear::from(const std::vector<at::Tensor>& parts, int64_t rows) {
  Linear l;
  if (parts.size() == 1) {
    l.dense = parts[0].contiguous();
    TORCH_CHECK(l.dense.dim() == 2 && l.dense.scalar_type() == at::kFloat,
                "a dense weight must be float32 [N, K]");
    l.N = l.dense.size(0);
    l.K = l.dense.size(1);
    return l;
  }
  TORCH_CHECK(parts.size() == 2 || parts.size() == 3, "a weight is [dense], [qs, d] or [qs, d, m]");
  l.quantized = true;
  l.qs = parts[0].contiguous();
  l.d = parts[1].contiguous();
  const bool q4 = l.qs.scalar_type() == at::kByte;
  const bool f16 = l.d.scalar_type() == at::kHalf;
  TORCH_CHECK(q4 == (parts.size() == 3), "q4 weights (uint8) need d and m; q8 (int8) only d");
  l.N = rows;
  l.K = q4 ? l.qs.size(1) * 2 : l.qs.size(1);
  const int64_t padded = l.qs.size(0);
  TORCH_CHECK(padded % GROUP == 0 && rows <= padded && rows > padded - GROUP,
              "quantized rows are padded to a multiple of 4");
  TORCH_CHECK(l.K % QK == 0 && (f16 || l.d.scalar_type() == at::kFloat) &&
                  l.d.numel() == padded * l.K / QK,
              "malformed quantized weight");
  if (q4) {
    l.m = parts[2].contiguous();
    TORCH_CHECK(l.m.scalar_type() == l.d.scalar_type() && l.m.numel() == l.d.numel(),
                "malformed m");
  }
  l.mat = QMat{q4, l.qs.data_ptr(), l.d.data_ptr(), q4 ? l.m.data_ptr() : nullptr, l.N, l.K, f16};
  return l;
}

DecodeModel::DecodeModel(std::vector<int64_t> dims, double eps, std::vector<at::Tensor> norms,
                         std::vector<std::vector<at::Tensor>> linears,
                         std::vector<int64_t> rows)
    : eps_(static_cast<float>(eps)) {
  TORCH_CHECK(dims.size() == 7, "dims: dim, n_layers, n_heads, n_kv_heads, head_dim, ffn, vocab");
  dim_ = dims[0];
  n_layers_ = dims[1];
  n_heads_ = dims[2];
  n_kv_heads_ = dims[3];
  head_dim_ = dims[4];
  ffn_dim_ = dims[5];
  vocab_ = dims[6];
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * n_layers_ + 1, "2 norms a layer + 1");
  TORCH_CHECK(static_cast<int64_t>(linears.size()) == 7 * n_layers_ + 1, "7 linears a layer + 1");
  TORCH_CHECK(n_kv_heads_ > 0 && n_heads_ % n_kv_heads_ == 0 && head_dim_ % 2 == 0,
              "bad head layout");
  for (auto& n : norms) {
    norms_.push_back(n.contiguous().to(at::kFloat));
    TORCH_CHECK(norms_.back().numel() == dim_, "a norm weight has ", n.numel(), " elements");
  }
  TORCH_CHECK(rows.size() == linears.size(), "one row count per linear");
  for (size_t i = 0; i < linears.size(); ++i) linears_.push_back(Linear::from(linears[i], rows[i]));
  // every product writes into buffers sized from dims: refuse any other shape
  const int64_t q = n_heads_ * head_dim_, kv = n_kv_heads_ * head_dim_;
  const int64_t want[7][2] = {{q, dim_}, {kv, dim_}, {kv, dim_}, {dim_, q},
                              {ffn_dim_, dim_}, {ffn_dim_, dim_}, {dim_, ffn_dim_}};
  for (int64_t l = 0; l < n_layers_; ++l)
    for (int i = 0; i < 7; ++i) {
      const Linear& w = linears_[7 * l + i];
      TORCH_CHECK(w.N == want[i][0] && w.K == want[i][1], "layer ", l, " weight ", i, " is [",
                  w.N, ", ", w.K, "], expected [", want[i][0], ", ", want[i][1], "]");
    }
  TORCH_CHECK(linears_.back().N == vocab_ && linears_.back().K == dim_,
              "the output projection must be [vocab, dim]");
}

void DecodeModel::linears(const std::vector<Job>& jobs, const float* x, int64_t B,
                          bool int8_acts) {
  const int64_t K = jobs.front().w->K;
  bool any_quantized = false;
  for (const Job& j : jobs) any_quantized |= j.w->quantized;
  if (any_quantized && int8_acts) acts_.quantize(x, B, K);
  // The quantized jobs share one parallel region over their row groups, matrix after matrix.
  std::vector<int64_t> first_group;
  int64_t groups = 0;
  for (const Job& j : jobs) {
    first_group.push_back(groups);
    if (j.w->quantized) groups += qmat_groups(j.w->mat);
  }
  if (groups > 0) {
    at::parallel_for(0, groups, 2, [&](int64_t u0, int64_t u1) {
      for (size_t i = 0; i < jobs.size(); ++i) {
        const Linear& w = *jobs[i].w;
        if (!w.quantized) continue;
        const int64_t g0 = std::max(u0, first_group[i]) - first_group[i];
        const int64_t g1 = std::min(u1, first_group[i] + qmat_groups(w.mat)) - first_group[i];
        if (g0 >= g1) continue;
        if (int8_acts)
          qmat_rows_int8(w.mat, acts_, jobs[i].out, w.N, g0, g1);
        else
          qmat_rows_f32(w.mat, x, B, jobs[i].out, w.N, g0, g1);
      }
    });
  }
  for (const Job& j : jobs) {
    if (j.w->quantized) continue;
    at::Tensor xt = at::from_blob(const_cast<float*>(x), {B, K}, at::kFloat);
    at::Tensor out = at::from_blob(j.out, {B, j.w->N}, at::kFloat);
    at::mm_out(out, xt, j.w->dense.t());
  }
}

template <class T>
void DecodeModel::attention(int64_t layer, int64_t B, const float* cos, const float* sin,
                            const int64_t* write_slots, const at::Tensor& block_tables,
                            const int64_t* ctx_lens, T* k_cache, T* v_cache, int64_t n_slots,
                            int64_t block_size) {
  const int64_t hd = head_dim_, half = hd / 2, hq = n_heads_, hkv = n_kv_heads_;
  const int64_t kv_row = hkv * hd;
  T* kl = k_cache + layer * n_slots * kv_row;
  T* vl = v_cache + layer * n_slots * kv_row;
  // every row's K/V is written before any row attends: a prompt row reads the rows before it
  over_rows(B, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      rope(q_.data() + b * hq * hd, hq, hd, cos + b * half, sin + b * half);
      rope(k_.data() + b * kv_row, hkv, hd, cos + b * half, sin + b * half);
      to_half(k_.data() + b * kv_row, kv_row, kl + write_slots[b] * kv_row);  // or copy
      to_half(v_.data() + b * kv_row, kv_row, vl + write_slots[b] * kv_row);
    }
  });
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t max_blocks = block_tables.size(1);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
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
  // Work units: one query head of a tile while there are few tiles (spreads a single sequence
  // over the cores), else every query head of one KV head, which then reads its rows once.
  const int64_t per_unit = n_tiles * hkv >= 2 * at::get_num_threads() ? group : 1;
  at::parallel_for(0, n_tiles * hq / per_unit, 1, [&](int64_t u0, int64_t u1) {
    thread_local std::vector<float> scores, qs;
    thread_local std::vector<const T*> krows, vrows;
    for (int64_t u = u0; u < u1; ++u) {
      // Later tiles of a prompt attend to more positions: units alternate between the two
      // ends of the tile list, so each thread's contiguous range gets an even share of work.
      const int64_t i = u * per_unit / hq;
      const auto [r0, r1] = tiles_[i % 2 == 0 ? i / 2 : n_tiles - 1 - i / 2];
      const int64_t h0 = u * per_unit % hq, kvh = h0 / group, R = r1 - r0;
      const int64_t len = ctx_lens[r1 - 1], nq = R * per_unit;
      const int64_t* table = tables + r0 * max_blocks;
      grow(scores, nq * len);
      grow(qs, nq * hd);
      if (static_cast<int64_t>(krows.size()) < len) {
        krows.resize(len);
        vrows.resize(len);
      }
      // this KV head's row of each position, read in place through the block table
      for (int64_t p = 0, blk = 0; p < len; ++blk) {
        const int64_t base = table[blk] * block_size;
        for (int64_t o = 0; o < block_size && p < len; ++o, ++p) {
          const int64_t at = (base + o) * kv_row + kvh * hd;
          krows[p] = kl + at;
          vrows[p] = vl + at;
        }
      }
      for (int64_t r = 0; r < R; ++r)  // the tile's queries, contiguous: [R][per_unit][hd]
        std::copy_n(q_.data() + ((r0 + r) * hq + h0) * hd, per_unit * hd,
                    qs.data() + r * per_unit * hd);
      dot_rows(qs.data(), nq, krows.data(), len, hd, scale, scores.data());
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = ctx_lens[r0 + r];  // causal: this row sees positions < n
        for (int64_t g = 0; g < per_unit; ++g) {
          float* sc = scores.data() + (r * per_unit + g) * len;
          float mx = -INFINITY;
          for (int64_t p = 0; p < n; ++p) mx = std::max(mx, sc[p]);
          for (int64_t p = 0; p < n; ++p) sc[p] -= mx;
          exp_inplace(sc, n);
          float total = 0.f;
          for (int64_t p = 0; p < n; ++p) total += sc[p];
          const float inv = 1.f / total;
          for (int64_t p = 0; p < n; ++p) sc[p] *= inv;
          std::fill_n(att_.data() + ((r0 + r) * hq + h0 + g) * hd, hd, 0.f);
        }
      }
      // weighted sums of V, a chunk of positions at a time so each chunk stays in L1 for
      // every query of the tile
      for (int64_t p0 = 0; p0 < len; p0 += kVChunk) {
        for (int64_t r = 0; r < R; ++r) {
          const int64_t n = std::min(ctx_lens[r0 + r], p0 + kVChunk) - p0;
          if (n <= 0) continue;
          weighted_sum_rows(scores.data() + r * per_unit * len + p0, per_unit, len,
                            vrows.data() + p0, n, hd, att_.data() + ((r0 + r) * hq + h0) * hd,
                            hd, true);
        }
      }
    }
  });
}

void DecodeModel::set_profiling(bool on) {
  profiling_ = on;
  profile_.clear();
}

std::map<std::string, double> DecodeModel::profile() const { return profile_; }

void DecodeModel::lap(const char* phase) {
  if (!profiling_) return;
  const auto now = std::chrono::steady_clock::now();
  profile_[phase] += std::chrono::duration<double, std::micro>(now - mark_).count();
  mark_ = now;
}

at::Tensor DecodeModel::step(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& write_slots, const at::Tensor& block_tables,
                             const at::Tensor& ctx_lens, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, int64_t block_size,
                             const at::Tensor& logit_rows, bool int8_acts) {
  const int64_t B = x.size(0), D = dim_, hd = head_dim_;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == D && x.scalar_type() == at::kFloat, "x: [B, dim] f32");
  TORCH_CHECK(x.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(), "contiguous");
  TORCH_CHECK(cos.size(0) == B && cos.size(1) == hd / 2 && sin.sizes() == cos.sizes(), "cos/sin");
  TORCH_CHECK(write_slots.scalar_type() == at::kLong && ctx_lens.scalar_type() == at::kLong &&
                  block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  block_tables.size(0) == B && ctx_lens.numel() == B &&
                  write_slots.numel() == B,
              "slots, tables and lengths: int64, one row per sequence");
  const bool half_kv = k_cache.scalar_type() == at::kHalf;
  TORCH_CHECK((half_kv || k_cache.scalar_type() == at::kFloat) &&
                  v_cache.scalar_type() == k_cache.scalar_type() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  k_cache.size(0) == n_layers_ && k_cache.size(2) == n_kv_heads_ &&
                  k_cache.size(3) == hd && v_cache.sizes() == k_cache.sizes(),
              "the KV cache must be float32 or float16 [layers, slots, kv_heads, head_dim]");
  TORCH_CHECK(block_size > 0 && write_slots.is_contiguous() && ctx_lens.is_contiguous(),
              "block_size > 0; contiguous slots and lengths");
  TORCH_CHECK(logit_rows.scalar_type() == at::kLong && logit_rows.is_contiguous() &&
                  logit_rows.dim() == 1 && logit_rows.numel() <= B,
              "logit_rows: int64 [R <= B]");
  const int64_t* rows = logit_rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < logit_rows.numel(); ++r)
    TORCH_CHECK(rows[r] >= 0 && rows[r] < B, "logit row out of range");
  const int64_t n_slots = k_cache.size(1), n_blocks = n_slots / block_size;
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  const int64_t* ws = write_slots.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {  // attention reads through these: check them all
    const int64_t used = (lens[b] + block_size - 1) / block_size;
    TORCH_CHECK(lens[b] >= 1 && used <= block_tables.size(1),
                "context length beyond the block table");
    const int64_t* table = tables + b * block_tables.size(1);
    for (int64_t i = 0; i < used; ++i)
      TORCH_CHECK(table[i] >= 0 && table[i] < n_blocks, "block id out of range");
    TORCH_CHECK(ws[b] == table[(lens[b] - 1) / block_size] * block_size +
                             (lens[b] - 1) % block_size,
                "the new token's slot must be its position's slot in the block table");
  }
  grow(x_, B * D);
  grow(h_, B * std::max(D, ffn_dim_));
  grow(q_, B * n_heads_ * hd);
  grow(att_, B * n_heads_ * hd);
  grow(k_, B * n_kv_heads_ * hd);
  grow(v_, B * n_kv_heads_ * hd);
  grow(tmp_, B * D);
  grow(gate_, B * ffn_dim_);
  grow(up_, B * ffn_dim_);
  if (profiling_) {
    mark_ = std::chrono::steady_clock::now();
    profile_["steps"] += 1;
  }
  std::copy_n(x.data_ptr<float>(), B * D, x_.data());
  for (int64_t l = 0; l < n_layers_; ++l) {
    const Linear* w = linears_.data() + 7 * l;
    rms_norm(x_.data(), norms_[2 * l].data_ptr<float>(), eps_, B, D, h_.data());
    lap("norms, residuals, silu");
    linears({{&w[0], q_.data()}, {&w[1], k_.data()}, {&w[2], v_.data()}}, h_.data(), B,
            int8_acts);
    lap("qkv projections");
    if (half_kv)
      attention(l, B, cos.data_ptr<float>(), sin.data_ptr<float>(), ws, block_tables, lens,
                static_cast<half_t*>(k_cache.data_ptr()), static_cast<half_t*>(v_cache.data_ptr()),
                n_slots, block_size);
    else
      attention(l, B, cos.data_ptr<float>(), sin.data_ptr<float>(), ws, block_tables, lens,
                k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), n_slots, block_size);
    lap("rope, kv write, attention");
    linears({{&w[3], tmp_.data()}}, att_.data(), B, int8_acts);
    lap("output projection (attn)");
    add_into(x_.data(), tmp_.data(), B, D);
    rms_norm(x_.data(), norms_[2 * l + 1].data_ptr<float>(), eps_, B, D, h_.data());
    lap("norms, residuals, silu");
    linears({{&w[4], gate_.data()}, {&w[5], up_.data()}}, h_.data(), B, int8_acts);
    lap("gate, up projections");
    silu_mul(gate_.data(), up_.data(), h_.data(), B, ffn_dim_);
    lap("norms, residuals, silu");
    linears({{&w[6], tmp_.data()}}, gate_.data(), B, int8_acts);
    lap("down projection");
    add_into(x_.data(), tmp_.data(), B, D);
  }
  // only the rows whose next token is wanted go through the output norm and projection
  const int64_t R = logit_rows.numel();
  for (int64_t r = 0; r < R; ++r) std::copy_n(x_.data() + rows[r] * D, D, tmp_.data() + r * D);
  rms_norm(tmp_.data(), norms_.back().data_ptr<float>(), eps_, R, D, h_.data());
  at::Tensor logits = at::empty({R, vocab_}, at::kFloat);
  lap("norms, residuals, silu");
  if (R > 0) linears({{&linears_.back(), logits.data_ptr<float>()}}, h_.data(), R, int8_acts);
  lap("lm head (vocab projection)");
  return logits;
}

}  // namespace llama_engine
