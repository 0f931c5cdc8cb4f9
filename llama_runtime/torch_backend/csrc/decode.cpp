// The fused decode step. Every decoding sequence of a scheduler step contributes one row; the
// whole forward (norms, quantized products, RoPE, the KV write, attention read in place from
// the paged cache, the MLP, the output projection) runs here with the work buffers reused
// between steps. Per layer there are five parallel regions (QKV, attention, O, gate+up, down)
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

void rms_norm(const float* x, const float* w, float eps, int64_t B, int64_t D, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * D;
    const float inv = 1.f / std::sqrt(dot_f32(xb, xb, D) / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) out[b * D + i] = xb[i] * inv * w[i];
  }
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

void DecodeModel::attention(int64_t layer, int64_t B, const float* cos, const float* sin,
                            const int64_t* write_slots, const at::Tensor& block_tables,
                            const int64_t* ctx_lens, float* k_cache, float* v_cache,
                            int64_t n_slots, int64_t block_size) {
  const int64_t hd = head_dim_, half = hd / 2, hq = n_heads_, hkv = n_kv_heads_;
  const int64_t kv_row = hkv * hd;
  float* kl = k_cache + layer * n_slots * kv_row;
  float* vl = v_cache + layer * n_slots * kv_row;
  for (int64_t b = 0; b < B; ++b) {
    rope(q_.data() + b * hq * hd, hq, hd, cos + b * half, sin + b * half);
    rope(k_.data() + b * kv_row, hkv, hd, cos + b * half, sin + b * half);
    std::copy_n(k_.data() + b * kv_row, kv_row, kl + write_slots[b] * kv_row);
    std::copy_n(v_.data() + b * kv_row, kv_row, vl + write_slots[b] * kv_row);
  }
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t max_blocks = block_tables.size(1);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t group = hq / hkv;
  // Work units: one query head each while there are few sequences (spreads a single sequence
  // over the cores), else every query head of one KV head, which then reads its rows once.
  const int64_t per_unit = B * hkv >= 2 * at::get_num_threads() ? group : 1;
  at::parallel_for(0, B * hq / per_unit, 1, [&](int64_t u0, int64_t u1) {
    thread_local std::vector<float> scores;
    thread_local std::vector<const float*> krows, vrows;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u * per_unit / hq, h0 = u * per_unit % hq, kvh = h0 / group;
      const int64_t len = ctx_lens[b];
      const int64_t* table = tables + b * max_blocks;
      grow(scores, per_unit * len);
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
      dot_rows(q_.data() + (b * hq + h0) * hd, per_unit, krows.data(), len, hd, scale,
               scores.data());
      for (int64_t g = 0; g < per_unit; ++g) {
        float* s = scores.data() + g * len;
        float mx = -INFINITY;
        for (int64_t p = 0; p < len; ++p) mx = std::max(mx, s[p]);
        for (int64_t p = 0; p < len; ++p) s[p] -= mx;
        exp_inplace(s, len);
        float total = 0.f;
        for (int64_t p = 0; p < len; ++p) total += s[p];
        const float inv = 1.f / total;
        for (int64_t p = 0; p < len; ++p) s[p] *= inv;
        weighted_sum_rows(s, vrows.data(), len, hd, att_.data() + (b * hq + h0 + g) * hd);
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
                             const at::Tensor& v_cache, int64_t block_size, bool int8_acts) {
  const int64_t B = x.size(0), D = dim_, hd = head_dim_;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == D && x.scalar_type() == at::kFloat, "x: [B, dim] f32");
  TORCH_CHECK(x.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(), "contiguous");
  TORCH_CHECK(cos.size(0) == B && cos.size(1) == hd / 2 && sin.sizes() == cos.sizes(), "cos/sin");
  TORCH_CHECK(write_slots.scalar_type() == at::kLong && ctx_lens.scalar_type() == at::kLong &&
                  block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  block_tables.size(0) == B && ctx_lens.numel() == B &&
                  write_slots.numel() == B,
              "slots, tables and lengths: int64, one row per sequence");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  k_cache.size(0) == n_layers_ && k_cache.size(2) == n_kv_heads_ &&
                  k_cache.size(3) == hd && v_cache.sizes() == k_cache.sizes(),
              "the KV cache must be float32 [layers, slots, kv_heads, head_dim]");
  TORCH_CHECK(block_size > 0 && write_slots.is_contiguous() && ctx_lens.is_contiguous(),
              "block_size > 0; contiguous slots and lengths");
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
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t l = 0; l < n_layers_; ++l) {
    const Linear* w = linears_.data() + 7 * l;
    rms_norm(x_.data(), norms_[2 * l].data_ptr<float>(), eps_, B, D, h_.data());
    lap("norms, residuals, silu");
    linears({{&w[0], q_.data()}, {&w[1], k_.data()}, {&w[2], v_.data()}}, h_.data(), B,
            int8_acts);
    lap("qkv projections");
    attention(l, B, cos.data_ptr<float>(), sin.data_ptr<float>(), ws, block_tables, lens, kc,
              vc, n_slots, block_size);
    lap("rope, kv write, attention");
    linears({{&w[3], tmp_.data()}}, att_.data(), B, int8_acts);
    lap("output projection (attn)");
    for (int64_t i = 0; i < B * D; ++i) x_[i] += tmp_[i];
    rms_norm(x_.data(), norms_[2 * l + 1].data_ptr<float>(), eps_, B, D, h_.data());
    lap("norms, residuals, silu");
    linears({{&w[4], gate_.data()}, {&w[5], up_.data()}}, h_.data(), B, int8_acts);
    lap("gate, up projections");
    float* g = gate_.data();
    const int64_t n = B * ffn_dim_;
    for (int64_t i = 0; i < n; ++i) h_[i] = -g[i];
    exp_inplace(h_.data(), n);  // silu(g) = g / (1 + exp(-g))
    for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.f + h_[i]) * up_[i];
    lap("norms, residuals, silu");
    linears({{&w[6], tmp_.data()}}, g, B, int8_acts);
    lap("down projection");
    for (int64_t i = 0; i < B * D; ++i) x_[i] += tmp_[i];
  }
  rms_norm(x_.data(), norms_.back().data_ptr<float>(), eps_, B, D, h_.data());
  at::Tensor logits = at::empty({B, vocab_}, at::kFloat);
  lap("norms, residuals, silu");
  linears({{&linears_.back(), logits.data_ptr<float>()}}, h_.data(), B, int8_acts);
  lap("lm head (vocab projection)");
  return logits;
}

}  // namespace llama_engine
