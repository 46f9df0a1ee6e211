// Fused per-step pointwise kernels of the CUDA general path (launchers in general.cu, the loop
// and the GEMMs between them in binding.cu). Torch-free: CUDA runtime and fp16/bf16 headers only.
//
// One step of the general path is a cuBLAS GEMM (fp32 result in a workspace) followed by one of
// these kernels, so the GEMM owns the only all-to-all dependency of the step and each kernel here
// is purely elementwise:
//
//   forward_pointwise     thread per (b, j) of (B, H): z = xproj[t] + (h @ W_hh^T), activations,
//                         c, o * tanh(c), masking; saves gates / c_all when asked
//   projection_update     [proj] thread per (b, p) of (B, P): h = m @ W_hr^T from the GEMM,
//                         masked into the carried h and y[t]
//   backward_pointwise    thread per (b, j) of (B, H): gate derivatives from the saved gates and
//                         cell states, d(xproj)[t] (= dz, also the next GEMM's input), dc
//   backward_projection   [proj] thread per (b, p) of (B, P): dh_tot = dh + dy[t], masked
//
// Each thread keeps its few values in registers; there is no shared memory and no
// synchronisation inside a kernel (stream order between launches is the only ordering). Threads
// stride over a flat index; every offset is int64 so tensors past 2^31 elements are safe.
// Arithmetic and the cell state are fp32 whatever the storage type, with accurate expf / tanhf
// (built without --use_fast_math): fp32 parity with the float64 reference needs ~1e-6 per op.
//
// lengths (nullable): step t of sequence b is active when t < lengths[b]. An inactive step
// freezes (h, c), writes y = 0, gates = 0, d(xproj) = 0 and c_all = the carried state, and its
// dh / dc pass through unchanged, exactly as lstm_fused/reference.py.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/general.h"

namespace lstm_fused {
namespace cuda {
namespace pointwise {

// Storage <-> fp32 through the explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__
// and __CUDA_NO_BFLOAT16_CONVERSIONS__, so implicit conversions must not be relied on.
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }

// Saturates correctly: expf(-x) = inf for very negative x gives 0, expf -> 0 gives 1.
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ bool active(const int64_t* lengths, int64_t b, int64_t t) {
  return lengths == nullptr || t < lengths[b];
}

__device__ __forceinline__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

template <typename T>
__global__ void forward_pointwise_kernel(const ForwardPointwise<T> p) {
  const int64_t H = p.H, n = p.B * H;
  for (int64_t idx = first_index(); idx < n; idx += grid_stride()) {
    const int64_t b = idx / H, j = idx - b * H;
    const int64_t g0 = b * 4 * H + j;  // gate i of unit j in row b; f, g, o follow at +H
    if (!active(p.lengths, b, p.t)) {
      // Frozen: c and h stay; the outputs of this step are zeros, c_all holds the carried c.
      if (p.y) store(p.y + idx, 0.0f);
      if (p.m) store(p.m + idx, 0.0f);  // keeps the projection GEMM's input defined
      if (p.gates) {
        for (int k = 0; k < 4; ++k) store(p.gates + g0 + k * H, 0.0f);
      }
      if (p.c_all) p.c_all[idx] = p.c[idx];
      continue;
    }
    const float i = sigmoid(load(p.xproj + g0) + p.z[g0]);
    const float f = sigmoid(load(p.xproj + g0 + H) + p.z[g0 + H]);
    const float g = tanhf(load(p.xproj + g0 + 2 * H) + p.z[g0 + 2 * H]);
    const float o = sigmoid(load(p.xproj + g0 + 3 * H) + p.z[g0 + 3 * H]);
    const float c = f * p.c[idx] + i * g;
    const float h = o * tanhf(c);
    p.c[idx] = c;
    if (p.m) {
      store(p.m + idx, h);  // projected by the caller's GEMM; projection_update finishes
    } else {
      store(p.h + idx, h);
      store(p.y + idx, h);
    }
    if (p.gates) {
      store(p.gates + g0, i);
      store(p.gates + g0 + H, f);
      store(p.gates + g0 + 2 * H, g);
      store(p.gates + g0 + 3 * H, o);
    }
    if (p.c_all) p.c_all[idx] = c;
  }
}

template <typename T>
__global__ void projection_update_kernel(const ProjectionUpdate<T> p) {
  const int64_t P = p.P, n = p.B * P;
  for (int64_t idx = first_index(); idx < n; idx += grid_stride()) {
    const int64_t b = idx / P;
    if (active(p.lengths, b, p.t)) {
      const float h = p.hp[idx];
      store(p.h + idx, h);
      store(p.y + idx, h);
    } else {
      store(p.y + idx, 0.0f);  // h stays
    }
  }
}

template <typename T>
__global__ void backward_pointwise_kernel(const BackwardPointwise<T> p) {
  const int64_t H = p.H, n = p.B * H;
  for (int64_t idx = first_index(); idx < n; idx += grid_stride()) {
    const int64_t b = idx / H, j = idx - b * H;
    const int64_t g0 = b * 4 * H + j;
    if (!active(p.lengths, b, p.t)) {
      // dz = 0 (so the dh GEMM adds nothing to this row); dh and dc pass through.
      for (int k = 0; k < 4; ++k) store(p.dxproj + g0 + k * H, 0.0f);
      continue;
    }
    float dm;  // gradient reaching o * tanh(c)
    if (p.dm) {
      dm = p.dm[idx];
    } else {
      dm = p.dh[idx] + load(p.dy + idx);
      // The caller's dz @ W_hh GEMM accumulates into dh when lengths is set (so inactive rows
      // keep their dh): clear the active rows it must overwrite. See recurrent_grad_beta().
      if (p.lengths) p.dh[idx] = 0.0f;
    }
    const float i = load(p.gates + g0);
    const float f = load(p.gates + g0 + H);
    const float g = load(p.gates + g0 + 2 * H);
    const float o = load(p.gates + g0 + 3 * H);
    const float tc = tanhf(p.c[idx]);
    const float dc_tot = p.dc[idx] + dm * o * (1.0f - tc * tc);
    store(p.dxproj + g0, dc_tot * g * i * (1.0f - i));
    store(p.dxproj + g0 + H, dc_tot * p.c_prev[idx] * f * (1.0f - f));
    store(p.dxproj + g0 + 2 * H, dc_tot * i * (1.0f - g * g));
    store(p.dxproj + g0 + 3 * H, dm * tc * o * (1.0f - o));
    p.dc[idx] = dc_tot * f;
  }
}

template <typename T>
__global__ void backward_projection_kernel(const BackwardProjection<T> p) {
  const int64_t n = p.B * p.P;
  for (int64_t idx = first_index(); idx < n; idx += grid_stride()) {
    const int64_t b = idx / p.P;
    float dh_tot = 0.0f;  // inactive: no gradient enters this step's gates
    if (active(p.lengths, b, p.t)) {
      dh_tot = p.dh[idx] + load(p.dy + idx);
      if (p.lengths) p.dh[idx] = 0.0f;  // see backward_pointwise_kernel
    }
    store(p.dh_tot + idx, dh_tot);
    if (p.dh_tot_all) p.dh_tot_all[idx] = dh_tot;
  }
}

}  // namespace pointwise
}  // namespace cuda
}  // namespace lstm_fused
