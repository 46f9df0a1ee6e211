// The CUDA general path: per step one cuBLAS GEMM (issued by the caller, binding.cu) and one
// fused pointwise kernel (pointwise.cuh), for every shape, dtype and projection the persistent
// kernels do not cover. Torch-free: CUDA runtime only.
//
// One forward step t (carried state: h (B, P) in storage dtype = the next GEMM's input, c (B, H)
// in fp32):
//   z  = h @ W_hh^T                      caller's GEMM, fp32 result (B, 4H)
//   launch_forward_pointwise             gates, c, o * tanh(c) -> h and y[t]   (no projection)
//                                                              -> m            (projection)
//   [proj] hp = m @ W_hr^T               caller's GEMM, fp32 result (B, P)
//   [proj] launch_projection_update      masked into h and y[t]
// One backward step t (carried: dh (B, P) and dc (B, H), fp32):
//   [proj] launch_backward_projection    dh_tot = dh + dy[t] (storage copy for the next GEMM)
//   [proj] dm = dh_tot @ W_hr            caller's GEMM, fp32 result (B, H)
//   launch_backward_pointwise            d(xproj)[t] (= dz in storage dtype) and dc
//   dh = dz @ W_hh  (+ dh)               caller's GEMM into dh with beta = recurrent_grad_beta()
//
// Every pointer is a device pointer to a contiguous row-major tensor, already offset to step t
// where it says [t]. T is the storage type: float, __nv_bfloat16 or __half (instantiated in
// general.cu). Launchers return the launch's cudaError_t and do nothing for empty tensors.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lstm_fused {
namespace cuda {

template <typename T>
struct ForwardPointwise {
  int64_t B = 0, H = 0;
  int64_t t = 0;                     // time index of this step (compared with lengths)
  const int64_t* lengths = nullptr;  // (B,) or nullptr: every step active
  const T* xproj = nullptr;          // [t] (B, 4H)
  const float* z = nullptr;          // (B, 4H) h_prev @ W_hh^T
  float* c = nullptr;                // (B, H) carried cell state, updated in place
  // Without projection: h (B, H) carried hidden state (updated in place, active rows only) and
  // y [t] (B, H); m is nullptr. With projection: m (B, H) = o * tanh(c) for the caller's
  // projection GEMM (0 on inactive rows); h and y are nullptr (projection_update writes them).
  T* h = nullptr;
  T* y = nullptr;
  T* m = nullptr;
  T* gates = nullptr;                // [t] (B, 4H) activated i, f, g, o, or nullptr (not saved)
  float* c_all = nullptr;            // [t] (B, H) cell state after the step, or nullptr
};

template <typename T>
struct ProjectionUpdate {
  int64_t B = 0, P = 0;
  int64_t t = 0;
  const int64_t* lengths = nullptr;
  const float* hp = nullptr;  // (B, P) m @ W_hr^T
  T* h = nullptr;             // (B, P) carried hidden state, active rows updated
  T* y = nullptr;             // [t] (B, P)
};

template <typename T>
struct BackwardPointwise {
  int64_t B = 0, H = 0;
  int64_t t = 0;
  const int64_t* lengths = nullptr;
  // Without projection: dh (B, H) carried, dy [t] (B, H); the kernel adds them (and clears dh
  // on active rows when lengths is set, see recurrent_grad_beta). dm is nullptr.
  // With projection: dm (B, H) = dh_tot @ W_hr from the caller's GEMM; dh and dy are nullptr.
  float* dh = nullptr;
  const T* dy = nullptr;
  const float* dm = nullptr;
  const T* gates = nullptr;     // [t] (B, 4H) saved by the forward
  const float* c = nullptr;     // [t] (B, H) c_all[t]
  const float* c_prev = nullptr;  // (B, H) the cell state step t started from (c_all of the
                                  // previously processed step, or c0 widened to fp32)
  float* dc = nullptr;          // (B, H) carried, updated in place (active rows)
  T* dxproj = nullptr;          // [t] (B, 4H) written everywhere (0 on inactive rows)
};

template <typename T>
struct BackwardProjection {
  int64_t B = 0, P = 0;
  int64_t t = 0;
  const int64_t* lengths = nullptr;
  float* dh = nullptr;          // (B, P) carried (cleared on active rows when lengths is set)
  const T* dy = nullptr;        // [t] (B, P)
  T* dh_tot = nullptr;          // (B, P) dh + dy[t] (0 on inactive rows): the dm GEMM's input
  float* dh_tot_all = nullptr;  // [t] (B, P) the same in fp32 for dW_hr, or nullptr
};

// beta of the caller's per-step GEMM  dh = dz @ W_hh (+ beta * dh). Without lengths every row
// is overwritten (0). With lengths the kernels above clear dh on active rows and inactive rows
// have dz = 0, so accumulating (1) overwrites active rows and carries inactive ones exactly,
// with no extra masking kernel.
inline float recurrent_grad_beta(bool has_lengths) { return has_lengths ? 1.0f : 0.0f; }

template <typename T>
cudaError_t launch_forward_pointwise(const ForwardPointwise<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_projection_update(const ProjectionUpdate<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_backward_pointwise(const BackwardPointwise<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_backward_projection(const BackwardProjection<T>& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace lstm_fused
