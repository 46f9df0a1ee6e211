// Launchers of the general path's pointwise kernels (kernels in pointwise.cuh, the loop that
// calls them in binding.cu), instantiated for float, __nv_bfloat16 and __half storage.
// Torch-free: builds standalone with `nvcc -Icsrc -c csrc/cuda/general.cu`.

#include <algorithm>

#include "cuda/general.h"
#include "cuda/pointwise.cuh"

namespace lstm_fused {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU many times over; larger problems grid-stride.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// One thread per element of an n-element elementwise kernel (grid-striding past kMaxBlocks).
template <typename Params>
cudaError_t launch_elementwise(void (*kernel)(Params), int64_t n, const Params& p,
                               cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int blocks = static_cast<int>(std::min((n + kThreads - 1) / kThreads, kMaxBlocks));
  kernel<<<blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_forward_pointwise(const ForwardPointwise<T>& p, cudaStream_t stream) {
  return launch_elementwise(pointwise::forward_pointwise_kernel<T>, p.B * p.H, p, stream);
}

template <typename T>
cudaError_t launch_projection_update(const ProjectionUpdate<T>& p, cudaStream_t stream) {
  return launch_elementwise(pointwise::projection_update_kernel<T>, p.B * p.P, p, stream);
}

template <typename T>
cudaError_t launch_backward_pointwise(const BackwardPointwise<T>& p, cudaStream_t stream) {
  return launch_elementwise(pointwise::backward_pointwise_kernel<T>, p.B * p.H, p, stream);
}

template <typename T>
cudaError_t launch_backward_projection(const BackwardProjection<T>& p, cudaStream_t stream) {
  return launch_elementwise(pointwise::backward_projection_kernel<T>, p.B * p.P, p, stream);
}

#define LSTM_FUSED_INSTANTIATE(T)                                                               \
  template cudaError_t launch_forward_pointwise<T>(const ForwardPointwise<T>&, cudaStream_t);   \
  template cudaError_t launch_projection_update<T>(const ProjectionUpdate<T>&, cudaStream_t);   \
  template cudaError_t launch_backward_pointwise<T>(const BackwardPointwise<T>&, cudaStream_t); \
  template cudaError_t launch_backward_projection<T>(const BackwardProjection<T>&, cudaStream_t);

LSTM_FUSED_INSTANTIATE(float)
LSTM_FUSED_INSTANTIATE(__nv_bfloat16)
LSTM_FUSED_INSTANTIATE(__half)
#undef LSTM_FUSED_INSTANTIATE

}  // namespace cuda
}  // namespace lstm_fused
