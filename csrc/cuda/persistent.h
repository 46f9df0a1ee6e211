// Persistent recurrent kernels: one launch runs every time step with W_hh resident in shared
// memory (kernels in persistent_forward.cuh / persistent_backward.cuh, launchers in
// persistent.cu). Torch-free: CUDA runtime only.
//
// Usage: plan_*() says whether the shape fits on chip of a device and how big the workspace is;
// the caller allocates `workspace_bytes` of device memory (contents need not be initialised)
// and calls launch_*() on its stream. Without projection only (proj_size runs the general path).
// bf16/fp16 multiply on the tensor cores; fp32 on the tensor cores in TF32 where allow_tf32 is
// set, else with exact fp32 FMAs on the CUDA cores.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/recurrence_args.h"

namespace lstm_fused {
namespace cuda {

struct PersistentPlan {
  int blocks = 0;                 // co-resident blocks: unit slices x batch groups
  int units_per_block = 0;        // hidden units owned by one block
  int batch_groups = 1;           // independent groups of batch rows, each with its own barrier
  int rows_per_group = 0;         // batch rows per group (the last group may have fewer)
  int k_chunk = 0;                // columns of the exchanged state staged in shared memory at once
  size_t smem_bytes = 0;          // dynamic shared memory per block
  size_t workspace_bytes = 0;     // device workspace the launcher needs
  const char* why_not = nullptr;  // when plan_* returns false: the reason, for error messages
};

bool plan_persistent_forward(const ForwardArgs& args, int device, PersistentPlan* plan);
cudaError_t launch_persistent_forward(const ForwardArgs& args, const PersistentPlan& plan,
                                      void* workspace, cudaStream_t stream);

bool plan_persistent_backward(const BackwardArgs& args, int device, PersistentPlan* plan);
cudaError_t launch_persistent_backward(const BackwardArgs& args, const PersistentPlan& plan,
                                       void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace lstm_fused
