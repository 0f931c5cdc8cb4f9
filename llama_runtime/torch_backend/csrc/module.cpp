// Python bindings of the CPU kernels: whole-matrix products and dequantization for the
// torch ops path, and the fused decode step. Every entry point releases the GIL while it
// computes, so other Python threads (stream consumers, servers) run meanwhile.
#include <ATen/Parallel.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "decode.h"
#include "qgemm.h"

namespace le = llama_engine;

namespace {

// qs: [G * 4, K / 2] (q4, uint8) or [G * 4, K] (q8, int8), d (and m): [G * 4, K / 32], in the
// kernels' row-interleaved layout; N <= G * 4 real rows.
le::QMat as_qmat(const torch::Tensor& qs, const torch::Tensor& d, const torch::Tensor* m,
                 int64_t N) {
  const bool q4 = m != nullptr;
  const bool f16 = d.scalar_type() == torch::kHalf;
  TORCH_CHECK(qs.is_contiguous() && d.is_contiguous() &&
                  (f16 || d.scalar_type() == torch::kFloat),
              "malformed quantized weight: scales must be contiguous float32 or float16");
  TORCH_CHECK(q4 ? qs.scalar_type() == torch::kByte : qs.scalar_type() == torch::kChar,
              "q4 weights are uint8, q8 weights int8");
  const int64_t rows = qs.size(0), K = q4 ? qs.size(1) * 2 : qs.size(1);
  TORCH_CHECK(rows % le::GROUP == 0 && N <= rows && N > rows - le::GROUP,
              "a quantized weight holds its rows padded to a multiple of 4");
  TORCH_CHECK(d.numel() == rows * K / le::QK, "scales do not match the weight's shape");
  if (q4)
    TORCH_CHECK(m->is_contiguous() && m->numel() == d.numel() &&
                    m->scalar_type() == d.scalar_type(),
                "malformed offsets");
  return le::QMat{q4, qs.data_ptr(), d.data_ptr(), q4 ? m->data_ptr() : nullptr, N, K, f16};
}

torch::Tensor checked_x(const torch::Tensor& x, const le::QMat& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 [B, K] tensor");
  TORCH_CHECK(x.size(1) == w.K, "x has ", x.size(1), " columns, the weight has ", w.K);
  return x;
}

torch::Tensor linear(const torch::Tensor& x_, const le::QMat& w, bool int8_acts) {
  const torch::Tensor x = checked_x(x_, w);
  const int64_t B = x.size(0);
  auto out = torch::empty({B, w.N}, x.options());
  float* o = out.data_ptr<float>();
  le::QActs acts;
  if (int8_acts) acts.quantize(x.data_ptr<float>(), B, w.K);
  at::parallel_for(0, le::qmat_groups(w), 4, [&](int64_t g0, int64_t g1) {
    if (int8_acts)
      le::qmat_rows_int8(w, acts, o, w.N, g0, g1);
    else
      le::qmat_rows_f32(w, x.data_ptr<float>(), B, o, w.N, g0, g1);
  });
  return out;
}

torch::Tensor dequant(const le::QMat& w) {
  auto out = torch::empty({w.N, w.K}, torch::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, le::qmat_groups(w), 16, [&](int64_t g0, int64_t g1) {
    le::qmat_dequant_rows(w, o + g0 * le::GROUP * w.K, g0, g1);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  using torch::Tensor;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  mod.def("q4_linear", [](Tensor x, Tensor qs, Tensor d, Tensor m, int64_t n) {
    return linear(x, as_qmat(qs, d, &m, n), true);
  }, "x [B,K] @ q4 weight [N,K].T with int8 activations -> [B,N]", nogil);
  mod.def("q8_linear", [](Tensor x, Tensor qs, Tensor d, int64_t n) {
    return linear(x, as_qmat(qs, d, nullptr, n), true);
  }, "x [B,K] @ q8 weight [N,K].T with int8 activations -> [B,N]", nogil);
  mod.def("q4_linear_f32", [](Tensor x, Tensor qs, Tensor d, Tensor m, int64_t n) {
    return linear(x, as_qmat(qs, d, &m, n), false);
  }, "exact: float x [B,K] @ q4 weight [N,K].T", nogil);
  mod.def("q8_linear_f32", [](Tensor x, Tensor qs, Tensor d, int64_t n) {
    return linear(x, as_qmat(qs, d, nullptr, n), false);
  }, "exact: float x [B,K] @ q8 weight [N,K].T", nogil);
  mod.def("q4_dequant", [](Tensor qs, Tensor d, Tensor m, int64_t n) {
    return dequant(as_qmat(qs, d, &m, n));
  }, "q4 weight -> float32 [N, K]", nogil);
  mod.def("q8_dequant", [](Tensor qs, Tensor d, int64_t n) {
    return dequant(as_qmat(qs, d, nullptr, n));
  }, "q8 weight -> float32 [N, K]", nogil);
  py::class_<le::DecodeModel>(mod, "DecodeModel")
      .def(py::init<std::vector<int64_t>, double, std::vector<Tensor>,
                    std::vector<std::vector<Tensor>>, std::vector<int64_t>>())
      .def("step", &le::DecodeModel::step, "one decode step for B sequences -> logits [B, V]",
           nogil)
      .def("set_profiling", &le::DecodeModel::set_profiling, "time each phase of later steps")
      .def("profile", &le::DecodeModel::profile, "phase -> microseconds over profiled steps");
}
