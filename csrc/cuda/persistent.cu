// Planners and launchers of the persistent kernels (persistent.h). Torch-free: CUDA runtime only.
//
// Tile configurations are template instances compiled here (storage type x hidden units per
// block), chosen at run time together with the grid: unit slices x batch groups. The planner
// prefers the layout with the most co-resident blocks, then the fewest batch rows per block,
// then the fewest units per block. LSTM_FUSED_CUDA_UNITS=4|8|16 forces the forward's units.
//
// Every block reads its group's whole exchanged state (Bg x H forward, Bg x 4H backward) each
// step. When that does not fit in shared memory next to W, it is staged in column chunks, each
// costing a round of L2 loads and two block barriers; past a few chunks per step (large batch)
// the per-step cuBLAS GEMM of the general path should win. The planner therefore declines
// layouts needing more than kMaxChunks chunks: an estimate from that cost, not yet a GPU
// measurement; LSTM_FUSED_CUDA_MAX_CHUNKS=n overrides it for tuning.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/persistent.h"
#include "cuda/persistent_backward.cuh"
#include "cuda/persistent_forward.cuh"

namespace lstm_fused {
namespace cuda {
namespace {

using persistent::BackwardLayout;
using persistent::counter_bytes;
using persistent::forced_units;
using persistent::ForwardLayout;
using persistent::kBackwardUnits;
using persistent::kMaxTilesPerWarp;
using persistent::kSkew;
using persistent::kThreads;
using persistent::kWarps;
using persistent::LaunchShape;
using persistent::round_up;
using persistent::TileSplit;

constexpr int kUnitChoices[] = {4, 8, 16};

struct DeviceLimits {
  int sms = 0, smem_optin = 0, major = 0, cooperative = 0;
};

cudaError_t device_limits(int device, DeviceLimits* d) {
  cudaError_t e;
  if ((e = cudaDeviceGetAttribute(&d->sms, cudaDevAttrMultiProcessorCount, device))) return e;
  if ((e = cudaDeviceGetAttribute(&d->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)))
    return e;
  if ((e = cudaDeviceGetAttribute(&d->major, cudaDevAttrComputeCapabilityMajor, device))) return e;
  return cudaDeviceGetAttribute(&d->cooperative, cudaDevAttrCooperativeLaunch, device);
}

constexpr int kMaxChunks = 2;

int max_chunks() {
  const char* v = std::getenv("LSTM_FUSED_CUDA_MAX_CHUNKS");
  const int n = v ? std::atoi(v) : 0;
  return n > 0 ? n : kMaxChunks;
}

// kExact: fp32 storage multiplied with exact fp32 FMAs (TF32 not allowed) instead of TF32 MMA.
template <typename Scalar, bool kExact = false>
const void* forward_kernel(int units) {
  using persistent::lstm_forward_persistent;
  switch (units) {
    case 4:
      return reinterpret_cast<const void*>(&lstm_forward_persistent<Scalar, 4, kExact>);
    case 8:
      return reinterpret_cast<const void*>(&lstm_forward_persistent<Scalar, 8, kExact>);
    case 16:
      return reinterpret_cast<const void*>(&lstm_forward_persistent<Scalar, 16, kExact>);
    default:
      return nullptr;
  }
}

template <typename Scalar, bool kExact = false>
const void* backward_kernel() {
  return reinterpret_cast<const void*>(&persistent::lstm_backward_persistent<Scalar, kExact>);
}

const void* forward_kernel_for(ScalarKind dtype, bool allow_tf32, int units) {
  switch (dtype) {
    case ScalarKind::kBFloat16:
      return forward_kernel<__nv_bfloat16>(units);
    case ScalarKind::kFloat16:
      return forward_kernel<__half>(units);
    default:
      return allow_tf32 ? forward_kernel<float>(units) : forward_kernel<float, true>(units);
  }
}

const void* backward_kernel_for(ScalarKind dtype, bool allow_tf32) {
  switch (dtype) {
    case ScalarKind::kBFloat16:
      return backward_kernel<__nv_bfloat16>();
    case ScalarKind::kFloat16:
      return backward_kernel<__half>();
    default:
      return allow_tf32 ? backward_kernel<float>() : backward_kernel<float, true>();
  }
}

int element_bytes(ScalarKind dtype) { return dtype == ScalarKind::kFloat32 ? 4 : 2; }

// Largest staged column count (a multiple of 16, at most Kpad, as even as possible over the
// chunks) such that `fixed + staging` fits in at most max_chunks() chunks; 0 when none does.
template <typename Layout>
int choose_k_chunk(int Kpad, int Bpad, size_t smem_limit, Layout layout_for) {
  const int most = std::min(Kpad / 16, max_chunks());
  for (int chunks = 1; chunks <= most; ++chunks) {
    const int kc = static_cast<int>(round_up((Kpad + chunks - 1) / chunks, 16));
    if (layout_for(kc).total <= smem_limit) return kc;
  }
  return 0;
}

// Common rejections; returns the reason or nullptr.
const char* common_why_not(const void* w_hr, int64_t steps, const DeviceLimits& d) {
  if (w_hr != nullptr) return "proj_size runs the general path";
  if (d.major < 8) return "the persistent kernels need compute capability 8.0 or newer";
  if (!d.cooperative) return "the device does not support cooperative launches";
  // A barrier counter reaches steps * blocks; keep it far from unsigned overflow.
  if (steps > (1 << 22)) return "too many time steps for one persistent launch";
  return nullptr;
}

// Does the grid fit co-resident on the device with this shared memory? Also opts the kernel in
// to all of the device's shared memory, which the launch relies on: a limit set to each plan's
// own size would fail a launch whenever another thread planned the same kernel with less
// between this plan and its launch.
bool fits_resident(const void* kernel, int blocks, size_t smem, const DeviceLimits& d) {
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, d.smem_optin) !=
      cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls are not blamed
    return false;
  }
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) !=
      cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return per_sm >= 1 && blocks <= per_sm * d.sms;
}

// One way to lay the grid out: hidden units per block x batch rows per block.
struct Candidate {
  int units, Bg, groups, blocks, kc;
  size_t smem;
};

// Batch rows per block to consider: all of B up to 16 rows, else multiples of 16 (whole MMA
// tiles), from 16 up to all of B.
std::vector<int> batch_group_sizes(int B) {
  std::vector<int> sizes;
  if (B <= 16) return {B};
  for (int bg = 16; bg < B; bg += 16) sizes.push_back(bg);
  sizes.push_back(B);
  return sizes;
}

// The candidates that fit the SMs and shared memory, best first: most blocks (all SMs busy),
// then fewest batch rows per block (least state restaged per step, fewest blocks per barrier),
// then fewest units per block.
template <typename LayoutFor>
std::vector<Candidate> candidates(const std::vector<int>& unit_choices, int H, int B, int Kpad,
                                  int rows_per_unit, const DeviceLimits& d, LayoutFor layout_for) {
  std::vector<Candidate> out;
  for (int units : unit_choices) {
    const int unit_blocks = (H + units - 1) / units;
    for (int bg : batch_group_sizes(B)) {
      const int groups = (B + bg - 1) / bg;
      const int blocks = unit_blocks * groups;
      const int bpad = static_cast<int>(round_up(bg, 16));
      if (blocks > d.sms) continue;
      if (TileSplit(rows_per_unit * units, bpad).tiles_per_warp() > kMaxTilesPerWarp) continue;
      auto layout = [&](int kc) { return layout_for(units, bg, bpad, kc); };
      const int kc = choose_k_chunk(Kpad, bpad, static_cast<size_t>(d.smem_optin), layout);
      if (kc == 0) continue;
      out.push_back({units, bg, groups, blocks, kc, layout(kc).total});
    }
  }
  std::stable_sort(out.begin(), out.end(), [](const Candidate& x, const Candidate& y) {
    if (x.blocks != y.blocks) return x.blocks > y.blocks;
    if (x.Bg != y.Bg) return x.Bg < y.Bg;
    return x.units < y.units;
  });
  return out;
}

void fill_plan(const Candidate& c, size_t workspace_bytes, PersistentPlan* plan) {
  plan->blocks = c.blocks;
  plan->units_per_block = c.units;
  plan->batch_groups = c.groups;
  plan->rows_per_group = c.Bg;
  plan->k_chunk = c.kc;
  plan->smem_bytes = c.smem;
  plan->workspace_bytes = workspace_bytes;
  plan->why_not = nullptr;
}

// Resets *plan, reads the device's limits and applies the rejections common to both directions;
// false (with plan->why_not set) when the persistent kernels cannot run this call at all.
bool start_plan(int device, const void* w_hr, int64_t steps, PersistentPlan* plan,
                DeviceLimits* d) {
  *plan = PersistentPlan{};
  if (device_limits(device, d) != cudaSuccess) {
    cudaGetLastError();
    plan->why_not = "could not query the device";
    return false;
  }
  plan->why_not = common_why_not(w_hr, steps, *d);
  return plan->why_not == nullptr;
}

const char* const kNoFit =
    "W_hh and the per-step state do not fit in the shared memory of co-resident blocks";

}  // namespace

bool plan_persistent_forward(const ForwardArgs& a, int device, PersistentPlan* plan) {
  DeviceLimits d;
  if (!start_plan(device, a.w_hr, a.T, plan, &d)) return false;
  const int B = static_cast<int>(a.B), H = static_cast<int>(a.H), elem = element_bytes(a.dtype);
  const int Kpad = static_cast<int>(round_up(H, 16));
  const int forced = forced_units();
  std::vector<int> units;
  for (int u : kUnitChoices) {
    if (!forced || u == forced) units.push_back(u);
  }
  auto layout_for = [&](int u, int bg, int bpad, int kc) {
    return ForwardLayout(u, bg, bpad, Kpad, kc, elem);
  };
  for (const Candidate& c : candidates(units, H, B, Kpad, 4, d, layout_for)) {
    if (!fits_resident(forward_kernel_for(a.dtype, a.allow_tf32, c.units), c.blocks, c.smem, d))
      continue;
    fill_plan(c, persistent::forward_workspace_bytes(B, H, elem, c.groups), plan);
    return true;
  }
  plan->why_not = forced ? "LSTM_FUSED_CUDA_UNITS names a configuration that does not fit" : kNoFit;
  return false;
}

bool plan_persistent_backward(const BackwardArgs& a, int device, PersistentPlan* plan) {
  DeviceLimits d;
  if (!start_plan(device, a.w_hr, a.T, plan, &d)) return false;
  const int B = static_cast<int>(a.B), H = static_cast<int>(a.H), elem = element_bytes(a.dtype);
  const int Kpad = static_cast<int>(round_up(4 * H, 16));
  auto layout_for = [&](int, int bg, int bpad, int kc) {
    return BackwardLayout(bg, bpad, Kpad, kc, elem);
  };
  // One 16-unit tile of rows per block: units_per_row 1 with units = kBackwardUnits.
  for (const Candidate& c : candidates({kBackwardUnits}, H, B, Kpad, 1, d, layout_for)) {
    if (!fits_resident(backward_kernel_for(a.dtype, a.allow_tf32), c.blocks, c.smem, d)) continue;
    fill_plan(c, persistent::backward_workspace_bytes(B, H, elem, c.groups), plan);
    return true;
  }
  plan->why_not = kNoFit;
  return false;
}

namespace {

// Zeroes the groups' barrier counters, then launches `kernel(params)` with every block
// co-resident (or fails with cudaErrorCooperativeLaunchTooLarge).
template <typename Params>
cudaError_t launch_cooperative(const void* kernel, Params params, const PersistentPlan& plan,
                               cudaStream_t stream) {
  cudaError_t e = cudaMemsetAsync(params.counter, 0, counter_bytes(params.groups), stream);
  if (e != cudaSuccess) return e;
  void* kernel_args[] = {&params};
  return cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(kThreads), kernel_args,
                                     plan.smem_bytes, stream);
}

LaunchShape launch_shape(const PersistentPlan& plan) {
  return {plan.batch_groups, plan.rows_per_group, plan.k_chunk};
}

template <typename Scalar, bool kExact = false>
cudaError_t launch_forward(const ForwardArgs& a, const PersistentPlan& plan, void* workspace,
                           cudaStream_t stream) {
  return launch_cooperative(
      forward_kernel<Scalar, kExact>(plan.units_per_block),
      persistent::make_forward_params<Scalar>(a, launch_shape(plan), workspace), plan, stream);
}

template <typename Scalar, bool kExact = false>
cudaError_t launch_backward(const BackwardArgs& a, const PersistentPlan& plan, void* workspace,
                            cudaStream_t stream) {
  return launch_cooperative(
      backward_kernel<Scalar, kExact>(),
      persistent::make_backward_params<Scalar>(a, launch_shape(plan), workspace), plan, stream);
}

}  // namespace

cudaError_t launch_persistent_forward(const ForwardArgs& a, const PersistentPlan& plan,
                                      void* workspace, cudaStream_t stream) {
  if (a.T == 0) return cudaSuccess;
  switch (a.dtype) {
    case ScalarKind::kBFloat16:
      return launch_forward<__nv_bfloat16>(a, plan, workspace, stream);
    case ScalarKind::kFloat16:
      return launch_forward<__half>(a, plan, workspace, stream);
    default:
      return a.allow_tf32 ? launch_forward<float>(a, plan, workspace, stream)
                          : launch_forward<float, true>(a, plan, workspace, stream);
  }
}

cudaError_t launch_persistent_backward(const BackwardArgs& a, const PersistentPlan& plan,
                                       void* workspace, cudaStream_t stream) {
  if (a.T == 0) return cudaSuccess;
  switch (a.dtype) {
    case ScalarKind::kBFloat16:
      return launch_backward<__nv_bfloat16>(a, plan, workspace, stream);
    case ScalarKind::kFloat16:
      return launch_backward<__half>(a, plan, workspace, stream);
    default:
      return a.allow_tf32 ? launch_backward<float>(a, plan, workspace, stream)
                          : launch_backward<float, true>(a, plan, workspace, stream);
  }
}

}  // namespace cuda
}  // namespace lstm_fused
