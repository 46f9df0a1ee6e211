// Op schemas of the recurrence ops and the Python module init of lstm_fused._C.
//
// Kernels register per device in csrc/cpu/register.cpp and csrc/cuda/binding.cu. The fake
// (meta) kernels and autograd are attached in Python (lstm_fused/ops.py), so there is no
// autograd.Function and torch.compile(fullgraph=True) traces straight through.

#include <Python.h>
#include <torch/library.h>

namespace {

bool has_cuda_kernels() {
#ifdef LSTM_FUSED_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(lstm_fused, m) {
  m.def(
      "recurrence_forward(Tensor xproj, Tensor w_hh, Tensor? w_hr, Tensor h0, Tensor c0, "
      "Tensor? lengths, bool reverse, bool save) "
      "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor c_all)");
  m.def(
      "recurrence_backward(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor w_hh, Tensor? w_hr, "
      "Tensor h0, Tensor c0, Tensor? lengths, bool reverse, Tensor y, Tensor gates, "
      "Tensor c_all, bool weight_grads) "
      "-> (Tensor dxproj, Tensor dw_hh, Tensor dw_hr, Tensor dh0, Tensor dc0)");
  // Both directions of a bidirectional layer without projection (CPU): h0/c0 (2, B, H), direction
  // 1 the reverse one; y (T, B, 2H) as the layer outputs it, h_n/c_n (2, B, H), and when saving
  // gates (2, T, B, 4H) and c_all (2, T, B, H) (csrc/cpu/bidirectional.cpp).
  m.def(
      "bidirectional_forward(Tensor xproj_f, Tensor xproj_r, Tensor w_hh_f, Tensor w_hh_r, "
      "Tensor h0, Tensor c0, Tensor? lengths, bool save) "
      "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor c_all)");
  m.def(
      "bidirectional_backward(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor w_hh_f, Tensor w_hh_r, "
      "Tensor h0, Tensor c0, Tensor? lengths, Tensor y, Tensor gates, Tensor c_all, "
      "bool weight_grads) -> (Tensor dxproj_f, Tensor dxproj_r, Tensor dw_hh_f, Tensor dw_hh_r, "
      "Tensor dh0, Tensor dc0)");
  // One LSTM cell step for inference (CPU): no autograd, callers route differentiable calls to
  // recurrence_forward.
  m.def(
      "cell_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh) -> (Tensor h, Tensor c)");
  // The same for every layer and direction of a stack at one time step: x (B, I), h0/c0
  // (L*D, B, H), weights in nn.LSTM's _flat_weights order (no projection).
  m.def(
      "stacked_cell_forward(Tensor x, Tensor h0, Tensor c0, Tensor[] weights, int num_layers, "
      "bool bidirectional, bool has_biases) -> (Tensor y, Tensor h_n, Tensor c_n)");
  // A stack of unidirectional layers without projection for inference (CPU, float32): x (T, B, I),
  // h0/c0 (L, B, H), weights w_ih, w_hh[, b_ih, b_hh] per layer; run as a wavefront over chunks
  // of time (csrc/cpu/wavefront.cpp).
  m.def(
      "wavefront_forward(Tensor x, Tensor h0, Tensor c0, Tensor[] weights, int num_layers, "
      "bool has_biases) -> (Tensor y, Tensor h_n, Tensor c_n)");
  // x @ w_ih^T + b_ih + b_hh over every row of x (..., I) -> (..., 4H): the input projection of a
  // CPU layer (float32, bfloat16, float16), with the CPU step kernels' tile product, or with
  // ATen's GEMM (own_product=False) into an output from our pool. Autograd in lstm_fused/ops.py.
  m.def(
      "input_projection(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor? b_hh, bool own_product=True) "
      "-> Tensor");
  // Its first-order gradients: dx = grad @ w_ih the same way, dw_ih = grad^T x, and the bias
  // gradient db = grad summed over rows (the gradient of b_ih and of b_hh), each an empty tensor
  // when not wanted.
  m.def(
      "input_projection_backward(Tensor grad, Tensor x, Tensor w_ih, bool input_grad, "
      "bool weight_grad, bool bias_grad=False) -> (Tensor dx, Tensor dw_ih, Tensor db)");
  // g^T @ x for g (M, N), x (M, I), float32 with contiguous rows: the weight gradients of a CPU
  // layer on our own kernels (csrc/cpu/weight_grads.cpp); for tests and benchmarks.
  m.def("weight_grad(Tensor g, Tensor x) -> Tensor");
  m.def("has_cuda_kernels() -> bool", &has_cuda_kernels);
}

// A plain C extension module: importing it runs the static registrations above. Nothing is
// bound through pybind11, which keeps torch/extension.h (and its compile time) out of the build.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
