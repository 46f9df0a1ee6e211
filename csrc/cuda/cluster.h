// The cluster-resident forward kernel (cluster_forward.cuh): plan and launch. Torch-free: CUDA
// runtime only.
//
// Usage as for persistent.h: plan_cluster_forward() says whether the shape runs on this device
// (sm_90 or newer, no projection, W_hh's slice and two copies of h in each block's shared
// memory, a cluster of at most 16 blocks) and launch_cluster_forward() runs it on a stream. No
// workspace: h travels through distributed shared memory.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/recurrence_args.h"

namespace lstm_fused {
namespace cuda {

struct ClusterPlan {
  int cluster = 0;                // blocks per cluster: ceil(H / units_per_block)
  int units_per_block = 0;        // hidden units owned by one block (8, 16 or 32)
  int groups = 0;                 // clusters, one per batch group
  int rows_per_group = 0;         // batch rows per cluster (the last may have fewer)
  size_t smem_bytes = 0;          // dynamic shared memory per block
  const char* why_not = nullptr;  // when plan_cluster_forward returns false: the reason
};

bool plan_cluster_forward(const ForwardArgs& args, int device, ClusterPlan* plan);
cudaError_t launch_cluster_forward(const ForwardArgs& args, const ClusterPlan& plan,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace lstm_fused
