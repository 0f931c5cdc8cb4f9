// Python bindings of the CPU kernels: whole-matrix products and dequantization for the
// torch ops path, and the fused decode step. Every entry point releases the GIL while it
// computes, so other Python threads (stream consumers, servers) run meanwhile.
#include <pybind11/stl.h>
#include <memory>
#include <stdexcept>
#include <torch/extension.h>

#include "decode.h"
#include "parallel.h"
#include "qgemm.h"

namespace le = llama_engine;

namespace {

// qs: [G * 16, K / 2] (q4 and q5, uint8) or [G * 16, K] (q8, int8), d (and m): [G * 16, K / per],
// qh (q5): uint8 [G * 16, K / 8], in the kernels' row-interleaved layout (qgemm.h); N <= G * 16
// real rows. The scales' count gives per (32, or 16 for q8).
le::QMat as_qmat(const torch::Tensor& qs, const torch::Tensor& d, const torch::Tensor* m,
                 const torch::Tensor* qh, int64_t N) {
  const bool q4 = qs.scalar_type() == torch::kByte;
  const bool f16 = d.scalar_type() == torch::kHalf;
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && d.is_contiguous() &&
                  (f16 || d.scalar_type() == torch::kFloat),
              "malformed quantized weight: scales must be contiguous float32 or float16");
  TORCH_CHECK(q4 || qs.scalar_type() == torch::kChar, "q4 weights are uint8, q8 weights int8");
  const int64_t rows = qs.size(0), K = q4 ? qs.size(1) * 2 : qs.size(1);
  TORCH_CHECK(rows % le::GROUP == 0 && N <= rows && N > rows - le::GROUP,
              "a quantized weight holds its rows padded to a multiple of ", le::GROUP);
  TORCH_CHECK(K % le::QK == 0 && (d.numel() == rows * K / le::QK ||
                                   d.numel() == rows * K / (le::QK / 2)),
              "scales do not match the weight's shape");
  if (m)
    TORCH_CHECK(m->is_contiguous() && m->numel() == d.numel() &&
                    m->scalar_type() == d.scalar_type(),
                "malformed offsets");
  le::QMat w{q4, qs.data_ptr(), d.data_ptr(), m ? m->data_ptr() : nullptr, N, K, f16};
  w.per = static_cast<int>(rows * K / d.numel());
  if (qh) {
    TORCH_CHECK(qh->is_contiguous() && qh->scalar_type() == torch::kByte &&
                    qh->numel() == rows * K / 8,
                "malformed fifth bits");
    w.qh = static_cast<const uint64_t*>(qh->data_ptr());
  }
  try {
    le::qmat_check(w);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  return w;
}

torch::Tensor checked_x(const torch::Tensor& x, const le::QMat& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 [B, K] tensor");
  TORCH_CHECK(x.size(1) == w.K, "x has ", x.size(1), " columns, the weight has ", w.K);
  return x;
}

// acts: qgemm.h's Acts (0 exact, 1 int8, 2 int16).
torch::Tensor linear(const torch::Tensor& x_, const le::QMat& w, int64_t acts) {
  const torch::Tensor x = checked_x(x_, w);
  const int64_t B = x.size(0);
  auto out = torch::empty({B, w.N}, x.options());
  le::QActs buf;
  try {
    le::qmat_linear(w, x.data_ptr<float>(), B, out.data_ptr<float>(),
                    le::acts_from(static_cast<int32_t>(acts)), buf);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  return out;
}

torch::Tensor dequant(const le::QMat& w) {
  auto out = torch::empty({w.N, w.K}, torch::kFloat);
  float* o = out.data_ptr<float>();
  le::parallel_for(0, le::qmat_groups(w), 16, [&](int64_t g0, int64_t g1) {
    le::qmat_dequant_rows(w, o + g0 * le::GROUP * w.K, g0, g1);
  });
  return out;
}

// The weight of one linear: [dense] float32 [N, K], or [qs, d] (q8), [qs, d, m] (q4) or
// [qs, d, m, qh] (q5).
le::QMat weight(const std::vector<torch::Tensor>& parts, int64_t rows) {
  if (parts.size() == 1) {
    const torch::Tensor& w = parts[0];
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat && w.is_contiguous() &&
                    w.size(0) == rows,
                "a dense weight must be a contiguous float32 [N, K] tensor");
    le::QMat m{false, w.data_ptr(), nullptr, nullptr, w.size(0), w.size(1)};
    m.dense = true;
    return m;
  }
  TORCH_CHECK(parts.size() >= 2 && parts.size() <= 4,
              "a weight is [dense], [qs, d], [qs, d, m] or [qs, d, m, qh]");
  return as_qmat(parts[0], parts[1], parts.size() >= 3 ? &parts[2] : nullptr,
                 parts.size() == 4 ? &parts[3] : nullptr, rows);
}

torch::Tensor i64(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous() && t.numel() == n, what,
              ": a contiguous int64 tensor of ", n, " values");
  return t;
}

// The fused step over torch tensors: checks the containers (dtypes, shapes, contiguity), keeps
// the weights alive, and hands plain pointers to llama_engine::DecodeModel.
class TorchDecodeModel {
 public:
  // dims: dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab_size. norms: attn_norm
  // and ffn_norm of each layer, then the output norm. linears: q, k, v, o, gate, up, down of
  // each layer, then the output projection, each in weight()'s form with its real row count.
  // extras: le::kExtras a layer (an empty tensor where the layer has none), or none at all;
  // attn_scale, activation, windows (one a layer, or none): le::ModelOptions.
  TorchDecodeModel(std::vector<int64_t> dims, double eps, std::vector<torch::Tensor> norms,
                   std::vector<std::vector<torch::Tensor>> linears, std::vector<int64_t> rows,
                   std::vector<torch::Tensor> extras, double attn_scale, int64_t activation,
                   std::vector<int64_t> windows) {
    TORCH_CHECK(dims.size() == 7, "dims: dim, n_layers, n_heads, n_kv_heads, head_dim, ffn, vocab");
    TORCH_CHECK(rows.size() == linears.size(), "one row count per linear");
    std::vector<const float*> norm_ptrs;
    for (auto& n : norms) {
      keep_.push_back(n.contiguous().to(torch::kFloat));
      TORCH_CHECK(keep_.back().numel() == dims[0], "a norm weight has ", n.numel(), " elements");
      norm_ptrs.push_back(keep_.back().data_ptr<float>());
    }
    std::vector<le::QMat> mats;
    for (size_t i = 0; i < linears.size(); ++i) {
      for (auto& t : linears[i]) keep_.push_back(t);
      mats.push_back(weight(linears[i], rows[i]));
    }
    std::vector<const float*> extra_ptrs;
    const int64_t q = dims[2] * dims[4], kv = dims[3] * dims[4];
    const int64_t extra_size[le::kExtras] = {q, kv, kv, dims[4], dims[4], dims[0], dims[0]};
    for (size_t i = 0; i < extras.size(); ++i) {
      const torch::Tensor& t = extras[i];
      if (t.numel() == 0) {
        extra_ptrs.push_back(nullptr);
        continue;
      }
      TORCH_CHECK(t.numel() == extra_size[i % le::kExtras], "extra ", i, " has ", t.numel(),
                  " elements, expected ", extra_size[i % le::kExtras]);
      keep_.push_back(t.contiguous().to(torch::kFloat));
      extra_ptrs.push_back(keep_.back().data_ptr<float>());
    }
    try {
      model_ = std::make_unique<le::DecodeModel>(
          le::ModelDims{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6]},
          le::ModelOptions{static_cast<float>(eps), static_cast<float>(attn_scale),
                           static_cast<le::Activation>(activation), windows},
          norm_ptrs, std::move(mats), extra_ptrs);
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK(false, e.what());
    }
  }

  // x [B, dim] float32; cos, sin [B, head_dim / 2]; write_slots, ctx_lens [B] int64;
  // block_tables [B, max_blocks] int64; k_cache, v_cache float32 or float16 [layers, blocks,
  // kv_heads, block_size, head_dim]; logit_rows [R] int64; acts, prompt_acts: qgemm.h's Acts
  // (0 exact, 1 int8, 2 int16) of the first generated_rows rows and of the others (StepArgs);
  // cos_local, sin_local: windowed layers' tables like cos, sin, or empty. Returns logits
  // [R, vocab].
  torch::Tensor step(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                     const torch::Tensor& write_slots, const torch::Tensor& block_tables,
                     const torch::Tensor& ctx_lens, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, int64_t block_size,
                     const torch::Tensor& logit_rows, int64_t acts, int64_t prompt_acts,
                     int64_t generated_rows, const torch::Tensor& cos_local,
                     const torch::Tensor& sin_local) {
    const le::ModelDims& d = model_->dims();
    const int64_t B = x.size(0);
    TORCH_CHECK(x.dim() == 2 && x.size(1) == d.dim && x.scalar_type() == torch::kFloat &&
                    x.is_contiguous(), "x: contiguous float32 [B, dim]");
    const bool local = cos_local.numel() > 0;
    std::vector<const torch::Tensor*> tables{&cos, &sin};
    if (local) tables.insert(tables.end(), {&cos_local, &sin_local});
    for (const torch::Tensor* t : tables)
      TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == d.head_dim / 2 &&
                      t->scalar_type() == torch::kFloat && t->is_contiguous(),
                  "cos, sin: contiguous float32 [B, head_dim / 2]");
    TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B, "block_tables: [B, max]");
    i64(block_tables, block_tables.numel(), "block_tables");
    i64(write_slots, B, "write_slots");
    i64(ctx_lens, B, "ctx_lens");
    TORCH_CHECK(logit_rows.dim() == 1, "logit_rows: [R]");
    i64(logit_rows, logit_rows.numel(), "logit_rows");
    const bool half_kv = k_cache.scalar_type() == torch::kHalf;
    TORCH_CHECK((half_kv || k_cache.scalar_type() == torch::kFloat) &&
                    v_cache.scalar_type() == k_cache.scalar_type() && k_cache.is_contiguous() &&
                    v_cache.is_contiguous() && k_cache.dim() == 5 &&
                    k_cache.size(0) == d.n_layers && k_cache.size(2) == d.n_kv_heads &&
                    k_cache.size(3) == block_size && k_cache.size(4) == d.head_dim &&
                    v_cache.sizes() == k_cache.sizes(),
                "the KV cache must be float32 or float16 [layers, blocks, kv_heads, block_size, "
                "head_dim]");
    const int64_t R = logit_rows.numel();
    torch::Tensor logits = torch::empty({R, d.vocab}, torch::kFloat);
    le::StepArgs a{x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                   write_slots.data_ptr<int64_t>(), block_tables.data_ptr<int64_t>(),
                   block_tables.size(1), ctx_lens.data_ptr<int64_t>(), B, k_cache.data_ptr(),
                   v_cache.data_ptr(), half_kv, k_cache.size(1) * block_size, block_size,
                   logit_rows.data_ptr<int64_t>(), R, static_cast<int32_t>(acts),
                   static_cast<int32_t>(prompt_acts), generated_rows, logits.data_ptr<float>(),
                   nullptr, local ? cos_local.data_ptr<float>() : nullptr,
                   local ? sin_local.data_ptr<float>() : nullptr};
    try {
      model_->step(a);
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK(false, e.what());
    }
    return logits;
  }

  void set_profiling(bool on) { model_->set_profiling(on); }
  std::map<std::string, double> profile() const { return model_->profile(); }

 private:
  std::vector<torch::Tensor> keep_;  // the memory the model's pointers borrow
  std::unique_ptr<le::DecodeModel> model_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  using torch::Tensor;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  mod.def("linear", [](Tensor x, std::vector<Tensor> parts, int64_t n, int64_t acts) {
    return linear(x, weight(parts, n), acts);
  }, "x [B,K] @ weight [N,K].T -> [B,N] (parts: weight()'s); acts 0 exact, "
     "1 int8, 2 int16", nogil);
  mod.def("dequant", [](std::vector<Tensor> parts, int64_t n) {
    return dequant(weight(parts, n));
  }, "a quantized weight (parts: weight()'s) -> float32 [N, K]", nogil);
  py::class_<TorchDecodeModel>(mod, "DecodeModel")
      .def(py::init<std::vector<int64_t>, double, std::vector<Tensor>,
                    std::vector<std::vector<Tensor>>, std::vector<int64_t>, std::vector<Tensor>,
                    double, int64_t, std::vector<int64_t>>())
      .def("step", &TorchDecodeModel::step, "one fused step over B token rows -> logits [R, V]",
           nogil)
      .def("set_profiling", &TorchDecodeModel::set_profiling, "time each phase of later steps")
      .def("profile", &TorchDecodeModel::profile, "phase -> microseconds over profiled steps");
}
