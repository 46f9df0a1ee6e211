// CPU recurrence kernels (declarations). See lstm_fused/reference.py for the op contract.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

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

// Pointwise passes run in parallel over batch rows once a step has this many elements;
// below it the fork/join costs more than it saves.
constexpr int64_t kParallelElements = 16384;

inline int64_t batch_grain(int64_t row_elements) {
  return std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, row_elements));
}

// Time index of processing step s.
inline int64_t time_at(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

}  // namespace lstm_fused::cpu
