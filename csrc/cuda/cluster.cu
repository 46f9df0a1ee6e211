// Planner and launcher of the cluster-resident forward kernel (cluster.h). Torch-free.
//
// The plan: the fewest hidden units per block (8, 16, 32) whose cluster, ceil(H / units)
// blocks, is at most 16 and fits shared memory; batch groups of at most 256 / units rows (one
// pointwise item per thread), one cluster each. Fewer units means more blocks sharing the
// product, and the product is on the critical path of every step; the barrier and the h_t
// broadcast cost grows with the cluster, so which way is faster is for the GPU to say:
// LSTM_FUSED_CUDA_UNITS=8|16|32 forces the units. Clusters never exchange data, so the grid
// need not be co-resident: the planner only asks that one cluster fits.

#include "cuda/cluster.h"
#include "cuda/cluster_forward.cuh"

namespace lstm_fused {
namespace cuda {
namespace {

using persistent::ClusterForwardLayout;
using persistent::forced_units;
using persistent::kMaxClusterBlocks;
using persistent::kThreads;
using persistent::round_up;

constexpr int kUnitChoices[] = {8, 16, 32};

template <typename Scalar, bool kExact = false>
const void* kernel(int units) {
  using persistent::lstm_forward_cluster;
  switch (units) {
    case 8:
      return reinterpret_cast<const void*>(&lstm_forward_cluster<Scalar, 8, kExact>);
    case 16:
      return reinterpret_cast<const void*>(&lstm_forward_cluster<Scalar, 16, kExact>);
    case 32:
      return reinterpret_cast<const void*>(&lstm_forward_cluster<Scalar, 32, kExact>);
    default:
      return nullptr;
  }
}

// kExact: fp32 storage with exact fp32 FMAs (TF32 not allowed) instead of TF32 MMA.
const void* kernel_for(ScalarKind dtype, bool allow_tf32, int units) {
  switch (dtype) {
    case ScalarKind::kBFloat16:
      return kernel<__nv_bfloat16>(units);
    case ScalarKind::kFloat16:
      return kernel<__half>(units);
    default:
      return allow_tf32 ? kernel<float>(units) : kernel<float, true>(units);
  }
}

cudaLaunchConfig_t launch_config(const ClusterPlan& plan, cudaStream_t stream,
                                 cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(plan.cluster * plan.groups);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = plan.smem_bytes;
  config.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = plan.cluster;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

// Opts the kernel into all of the device's shared memory (the launch relies on it, see
// persistent.cu's fits_resident) and into clusters above 8 blocks; then asks whether at least
// one cluster of this plan fits on the device.
bool cluster_fits(const void* fn, const ClusterPlan& plan, int smem_optin) {
  if (cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin) !=
          cudaSuccess ||
      (plan.cluster > 8 && cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed,
                                                1) != cudaSuccess)) {
    cudaGetLastError();
    return false;
  }
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config = launch_config(plan, nullptr, &attr);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, fn, &config) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return clusters >= 1;
}

}  // namespace

bool plan_cluster_forward(const ForwardArgs& a, int device, ClusterPlan* plan) {
  *plan = ClusterPlan{};
  int major = 0, cluster_launch = 0, smem_optin = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess) {
    cudaGetLastError();
    plan->why_not = "could not query the device";
    return false;
  }
  if (a.w_hr != nullptr) {
    plan->why_not = "proj_size runs the general path";
    return false;
  }
  if (major < 9 || !cluster_launch) {
    plan->why_not = "thread-block clusters need compute capability 9.0 or newer";
    return false;
  }
  const int B = static_cast<int>(a.B), H = static_cast<int>(a.H);
  const int elem = a.dtype == ScalarKind::kFloat32 ? 4 : 2;
  const int Kpad = static_cast<int>(round_up(H, 16));
  const int forced = forced_units();
  for (int units : kUnitChoices) {
    if (forced && units != forced) continue;
    const int cluster = (H + units - 1) / units;
    if (cluster > kMaxClusterBlocks) continue;
    ClusterPlan p;
    p.cluster = cluster;
    p.units_per_block = units;
    p.rows_per_group = B < kThreads / units ? B : kThreads / units;
    p.groups = (B + p.rows_per_group - 1) / p.rows_per_group;
    const int Bpad = static_cast<int>(round_up(p.rows_per_group, 16));
    p.smem_bytes = ClusterForwardLayout(units, Bpad, Kpad, elem).total;
    if (p.smem_bytes > static_cast<size_t>(smem_optin)) continue;
    if (!cluster_fits(kernel_for(a.dtype, a.allow_tf32, units), p, smem_optin)) continue;
    *plan = p;
    return true;
  }
  plan->why_not = forced ? "LSTM_FUSED_CUDA_UNITS names a configuration that does not fit"
                         : "W_hh does not fit in the shared memory of one cluster of 16 blocks";
  return false;
}

namespace {

template <typename Scalar, bool kExact = false>
cudaError_t launch(const ForwardArgs& a, const ClusterPlan& plan, cudaStream_t stream) {
  const auto params =
      persistent::make_cluster_forward_params<Scalar>(a, plan.cluster, plan.rows_per_group);
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config = launch_config(plan, stream, &attr);
  void* args[] = {const_cast<void*>(static_cast<const void*>(&params))};
  return cudaLaunchKernelExC(&config, kernel<Scalar, kExact>(plan.units_per_block), args);
}

}  // namespace

cudaError_t launch_cluster_forward(const ForwardArgs& a, const ClusterPlan& plan,
                                   cudaStream_t stream) {
  if (a.T == 0) return cudaSuccess;
  switch (a.dtype) {
    case ScalarKind::kBFloat16:
      return launch<__nv_bfloat16>(a, plan, stream);
    case ScalarKind::kFloat16:
      return launch<__half>(a, plan, stream);
    default:
      return a.allow_tf32 ? launch<float>(a, plan, stream) : launch<float, true>(a, plan, stream);
  }
}

}  // namespace cuda
}  // namespace lstm_fused
