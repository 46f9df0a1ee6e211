// CPU recurrence kernels (declarations). See lstm_fused/reference.py for the op contract.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "cpu/step_kernels.h"

namespace lstm_fused::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrence_forward(
    const at::Tensor& xproj, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& h0, const at::Tensor& c0, const std::optional<at::Tensor>& lengths,
    bool reverse, bool save);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrence_backward(
    const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths, bool reverse, const at::Tensor& y,
    const at::Tensor& gates, const at::Tensor& c_all, bool weight_grads);

// The SIMD step-kernel path (panel_recurrence.cpp): layers without projection in float32,
// bfloat16 and float16. The other cases (projection, float64) take the per-thread GEMM path.
bool panel_kernels_apply(at::ScalarType dtype, bool has_proj);
// The step kernels' storage of a float32, bfloat16 or float16 tensor.
Storage storage_of(at::ScalarType dtype);
// How a recurrence call of the step kernels is spread over the threads (panel_recurrence.cpp):
// batch_slices > 1, the batch cut into that many slices, each run through every step by one
// thread; otherwise `threads` split each step's blocks of units (1: the caller alone).
struct RecurrencePlan {
  int64_t batch_slices;
  int threads;
};
// V: the step kernels' vector width; dtype: W_hh's.
RecurrencePlan plan_recurrence(bool backward, int64_t T, int64_t B, int64_t H, int V, at::ScalarType dtype);
// One core's L2 in bytes (sysconf; 512 KB where it does not say), read once.
int64_t core_l2_bytes();

// dW = G^T X for a layer's weight gradients (weight_grads.cpp): g (M, N), x (M, I), out (N, I)
// with contiguous rows; accumulate: out += G^T X. Our step kernels' tiles where the operands are
// float32 and our own float32 product is chosen (own_gemm, isa.h), ATen's GEMM otherwise.
// g_sums (or null): set to g's column sums (N), the bias gradient of the layer whose dW_ih this
// is; on our tiles summed while g is packed, so g is read once for both.
void weight_grad_into(const at::Tensor& g, const at::Tensor& x, at::Tensor& out, bool accumulate,
                      at::Tensor* g_sums = nullptr);
at::Tensor weight_grad(const at::Tensor& g, const at::Tensor& x, at::Tensor* g_sums = nullptr);

// Panel bytes per chunk of the steps' reduction (ForwardStepArgs::chunk_bytes), for this CPU.
int64_t panel_chunk_bytes();
// b_ih + b_hh (4H) in float32, in forward panels' (block, gate, lane) order for vector width V,
// zero past H: the bias of PanelProductArgs with the gate layout (panel_products.cpp).
at::Tensor gate_bias_panel(const at::Tensor& b_ih, const at::Tensor& b_hh, int V);
// A stack of unidirectional float32 layers for inference as a wavefront over chunks of time
// (wavefront.cpp): x (T, B, I), h0/c0 (L, B, H), weights w_ih, w_hh[, b_ih, b_hh] per layer.
std::tuple<at::Tensor, at::Tensor, at::Tensor> wavefront_forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, at::TensorList weights,
    int64_t num_layers, bool has_biases);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> panel_forward(
    const at::Tensor& xproj, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths, bool reverse, bool save);
// One LSTMCell step without autograd: (h, c) from x (B, I), h0/c0 (B, H) and the cell's weights,
// both products in one reduction over [h0 | x] (panel_recurrence.cpp).
std::tuple<at::Tensor, at::Tensor> panel_cell_forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh);
// Returns d(xproj), dh0, dc0; the weight gradients are the caller's T*B-row GEMMs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> panel_backward(
    const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& w_hh,
    const at::Tensor& c0, const std::optional<at::Tensor>& lengths, bool reverse,
    const at::Tensor& gates, const at::Tensor& c_all);

// Batch slices per direction when the two directions of a bidirectional layer run side by side
// (each on its own threads, no synchronization between steps), or 0: one after the other, each
// by its own plan. LSTM_FUSED_CPU_DIRECTIONS=paired|in-turn|auto forces it (read on every call).
int64_t paired_direction_slices(int64_t T, int64_t B, int64_t H, at::ScalarType dtype);
// Both directions of a bidirectional layer (no projection), direction 1 the reverse one: their
// recurrences side by side or one after the other (panel_recurrence.cpp). h0/c0 (2, B, H);
// returns y (T, B, 2H) (direction d in columns [d*H, d*H + H)), h_n and c_n (2, B, H), and when
// saving, gates (2, T, B, 4H) and c_all (2, T, B, H), else empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> panel_forward_pair(
    const at::Tensor& xproj_f, const at::Tensor& xproj_r, const at::Tensor& w_hh_f,
    const at::Tensor& w_hh_r, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths, bool save);
// Its backward: dy (T, B, 2H), dh_n/dc_n/c0 (2, B, H), gates/c_all as saved; returns d(xproj) of
// each direction and dh0, dc0 (2, B, H). The weight gradients are the caller's.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> panel_backward_pair(
    const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& w_hh_f,
    const at::Tensor& w_hh_r, const at::Tensor& c0, const std::optional<at::Tensor>& lengths,
    const at::Tensor& gates, const at::Tensor& c_all);
// dW_hh of one direction from its d(xproj), outputs y (rows may be strided) and h0 (backward.cpp).
at::Tensor recurrent_weight_grad(const at::Tensor& dxproj, const at::Tensor& y,
                                 const at::Tensor& h0, const std::optional<at::Tensor>& lengths,
                                 bool reverse);

// How the hidden units (or projected units) are divided among the threads of a recurrence.
// Blocks are multiples of 8 units so each thread's pointwise loop runs whole vectors.
struct WorkSplit {
  int threads = 1;
  int64_t total = 0;
  int64_t block = 0;

  int64_t begin(int k) const { return std::min<int64_t>(total, k * block); }
  int64_t size(int k) const { return std::min<int64_t>(total, (k + 1) * block) - begin(k); }

  static WorkSplit make(int64_t total, int threads) {
    WorkSplit w;
    w.threads = std::max(1, threads);
    w.total = total;
    const int64_t even = (total + w.threads - 1) / w.threads;
    w.block = w.threads == 1 ? total : (even + 7) / 8 * 8;
    return w;
  }
  // Same thread count, another extent (the projected units).
  static WorkSplit make_like(const WorkSplit& other, int64_t total) {
    WorkSplit w;
    w.threads = other.threads;
    w.total = total;
    w.block = (total + w.threads - 1) / w.threads;
    return w;
  }
  // W_hh (4H, P) with its rows reordered so each thread's gate rows (i, f, g, o of its units)
  // are one contiguous block, thread after thread.
  at::Tensor gather_gate_rows(const at::Tensor& w_hh) const;
};

// Threads for one recurrence: the intra-op thread count, unless the step is too small to pay
// for a barrier or the units too few to share.
int recurrence_threads(int64_t B, int64_t H, int64_t P);

// Time index of processing step s.
inline int64_t time_at(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

}  // namespace lstm_fused::cpu
