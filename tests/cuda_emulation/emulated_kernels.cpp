// C entry points that run the persistent CUDA kernels under the SIMT emulator (simt_emulator.h),
// loaded by tests/test_cuda_emulated.py through ctypes. Pointers are host memory holding the
// same tensors the CUDA launchers take (16-bit storage as raw bits); the caller chooses the
// tile configuration (units per block, batch groups, staged column chunk) so every code path can
// be forced. The kernel parameters come from the launchers' own make_*_params.
#include "simt_emulator.h"
// The emulator must come first: it supplies what the kernels take from the CUDA headers.
#include "cuda/cluster_forward.cuh"
#include "cuda/persistent_backward.cuh"
#include "cuda/persistent_forward.cuh"

using namespace lstm_fused::cuda::persistent;

namespace {

// The tiling a test asks for: about `groups` batch groups (recounted so that none is empty) and
// KC state columns staged at once.
LaunchShape shape_for(int B, int groups, int KC) {
  const int rows = (B + groups - 1) / groups;
  return {(B + rows - 1) / rows, rows, KC};
}

// Zeroed device-style workspace (barrier counters first), 8-byte aligned.
std::vector<uint64_t> workspace(size_t bytes) { return std::vector<uint64_t>((bytes + 7) / 8, 0); }

template <typename Scalar, int UNITS, bool kExact>
void forward(int T, int B, int H, int KC, int groups, bool reverse, const void* xproj,
             const void* w_hh, const void* h0, const void* c0, const int64_t* lengths, void* y,
             void* h_n, void* c_n, void* gates, float* c_all) {
  lstm_fused::cuda::ForwardArgs a;
  a.T = T, a.B = B, a.H = H, a.P = H;
  a.xproj = xproj, a.w_hh = w_hh, a.h0 = h0, a.c0 = c0, a.lengths = lengths, a.reverse = reverse;
  a.y = y, a.h_n = h_n, a.c_n = c_n, a.gates = gates, a.c_all = c_all;
  const LaunchShape shape = shape_for(B, groups, KC);
  auto ws = workspace(forward_workspace_bytes(B, H, sizeof(Scalar), shape.groups));
  const ForwardParams<Scalar> p = make_forward_params<Scalar>(a, shape, ws.data());
  const ForwardLayout layout(UNITS, p.Bg, p.Bpad, p.Kpad, KC, sizeof(Scalar));
  emu::launch((H + UNITS - 1) / UNITS * p.groups, kThreads, layout.total,
              [&] { lstm_forward_persistent<Scalar, UNITS, kExact>(p); });
}

template <typename Scalar, bool kExact>
void backward(int T, int B, int H, int KC, int groups, bool reverse, const void* dy,
              const void* dh_n, const void* dc_n, const void* w_hh, const void* c0,
              const int64_t* lengths, const void* gates, const float* c_all, void* dxproj,
              void* dh0, void* dc0) {
  lstm_fused::cuda::BackwardArgs a;
  a.T = T, a.B = B, a.H = H, a.P = H;
  a.dy = dy, a.dh_n = dh_n, a.dc_n = dc_n, a.w_hh = w_hh, a.c0 = c0, a.lengths = lengths;
  a.reverse = reverse, a.gates = gates, a.c_all = c_all;
  a.dxproj = dxproj, a.dh0 = dh0, a.dc0 = dc0;
  const LaunchShape shape = shape_for(B, groups, KC);
  auto ws = workspace(backward_workspace_bytes(B, H, sizeof(Scalar), shape.groups));
  const BackwardParams<Scalar> p = make_backward_params<Scalar>(a, shape, ws.data());
  const BackwardLayout layout(p.Bg, p.Bpad, p.Kpad, KC, sizeof(Scalar));
  emu::launch((H + kBackwardUnits - 1) / kBackwardUnits * p.groups, kThreads, layout.total,
              [&] { lstm_backward_persistent<Scalar, kExact>(p); });
}

template <typename Scalar, bool kExact = false>
int forward_units(int units, int T, int B, int H, int KC, int groups, bool reverse,
                  const void* xproj, const void* w_hh, const void* h0, const void* c0,
                  const int64_t* lengths, void* y, void* h_n, void* c_n, void* gates,
                  float* c_all) {
  switch (units) {
    case 4:
      forward<Scalar, 4, kExact>(T, B, H, KC, groups, reverse, xproj, w_hh, h0, c0, lengths, y, h_n,
                                 c_n, gates, c_all);
      return 0;
    case 8:
      forward<Scalar, 8, kExact>(T, B, H, KC, groups, reverse, xproj, w_hh, h0, c0, lengths, y, h_n,
                                 c_n, gates, c_all);
      return 0;
    case 16:
      forward<Scalar, 16, kExact>(T, B, H, KC, groups, reverse, xproj, w_hh, h0, c0, lengths, y,
                                  h_n, c_n, gates, c_all);
      return 0;
    default:
      return 1;
  }
}

template <typename Scalar, int UNITS, bool kExact>
void cluster_forward(int T, int B, int H, int Bg, bool reverse, const void* xproj, const void* w_hh,
                     const void* h0, const void* c0, const int64_t* lengths, void* y, void* h_n,
                     void* c_n, void* gates, float* c_all) {
  lstm_fused::cuda::ForwardArgs a;
  a.T = T, a.B = B, a.H = H, a.P = H;
  a.xproj = xproj, a.w_hh = w_hh, a.h0 = h0, a.c0 = c0, a.lengths = lengths, a.reverse = reverse;
  a.y = y, a.h_n = h_n, a.c_n = c_n, a.gates = gates, a.c_all = c_all;
  const int cluster = (H + UNITS - 1) / UNITS, groups = (B + Bg - 1) / Bg;
  const ClusterForwardParams<Scalar> p = make_cluster_forward_params<Scalar>(a, cluster, Bg);
  const ClusterForwardLayout layout(UNITS, p.Bpad, p.Kpad, sizeof(Scalar));
  emu::launch_clusters(cluster * groups, cluster, kThreads, layout.total,
                       [&] { lstm_forward_cluster<Scalar, UNITS, kExact>(p); });
}

template <typename Scalar, bool kExact = false>
int cluster_forward_units(int units, int T, int B, int H, int Bg, bool reverse, const void* xproj,
                          const void* w_hh, const void* h0, const void* c0, const int64_t* lengths,
                          void* y, void* h_n, void* c_n, void* gates, float* c_all) {
  switch (units) {
    case 8:
      cluster_forward<Scalar, 8, kExact>(T, B, H, Bg, reverse, xproj, w_hh, h0, c0, lengths, y, h_n,
                                         c_n, gates, c_all);
      return 0;
    case 16:
      cluster_forward<Scalar, 16, kExact>(T, B, H, Bg, reverse, xproj, w_hh, h0, c0, lengths, y,
                                          h_n, c_n, gates, c_all);
      return 0;
    case 32:
      cluster_forward<Scalar, 32, kExact>(T, B, H, Bg, reverse, xproj, w_hh, h0, c0, lengths, y,
                                          h_n, c_n, gates, c_all);
      return 0;
    default:
      return 1;
  }
}

}  // namespace

extern "C" {

// dtype: 0 = float32 with TF32 products, 1 = bfloat16, 2 = float16 (as ScalarKind), 3 = float32
// with exact fp32 FMAs. Returns 0 on success.
int emulated_forward(int dtype, int units, int T, int B, int H, int KC, int groups, int reverse,
                     const void* xproj, const void* w_hh, const void* h0, const void* c0,
                     const int64_t* lengths, void* y, void* h_n, void* c_n, void* gates,
                     float* c_all) {
  if (KC % 16 != 0 || KC <= 0 || groups < 1) return 2;
  if (dtype == 1)
    return forward_units<__nv_bfloat16>(units, T, B, H, KC, groups, reverse, xproj, w_hh, h0, c0,
                                        lengths, y, h_n, c_n, gates, c_all);
  if (dtype == 2)
    return forward_units<__half>(units, T, B, H, KC, groups, reverse, xproj, w_hh, h0, c0, lengths,
                                 y, h_n, c_n, gates, c_all);
  if (dtype == 0)
    return forward_units<float>(units, T, B, H, KC, groups, reverse, xproj, w_hh, h0, c0, lengths,
                                y, h_n, c_n, gates, c_all);
  if (dtype == 3)
    return forward_units<float, true>(units, T, B, H, KC, groups, reverse, xproj, w_hh, h0, c0,
                                      lengths, y, h_n, c_n, gates, c_all);
  return 3;
}

// The cluster forward: `units` per block (8, 16 or 32), so ceil(H / units) blocks per cluster,
// and Bg batch rows per cluster (Bg * units <= 256). dtype codes as for emulated_forward.
int emulated_cluster_forward(int dtype, int units, int T, int B, int H, int Bg, int reverse,
                             const void* xproj, const void* w_hh, const void* h0, const void* c0,
                             const int64_t* lengths, void* y, void* h_n, void* c_n, void* gates,
                             float* c_all) {
  if (Bg < 1 || Bg * units > kThreads || (H + units - 1) / units > kMaxClusterBlocks) return 2;
  if (dtype == 1)
    return cluster_forward_units<__nv_bfloat16>(units, T, B, H, Bg, reverse, xproj, w_hh, h0, c0,
                                                lengths, y, h_n, c_n, gates, c_all);
  if (dtype == 2)
    return cluster_forward_units<__half>(units, T, B, H, Bg, reverse, xproj, w_hh, h0, c0, lengths,
                                         y, h_n, c_n, gates, c_all);
  if (dtype == 0)
    return cluster_forward_units<float>(units, T, B, H, Bg, reverse, xproj, w_hh, h0, c0, lengths,
                                        y, h_n, c_n, gates, c_all);
  if (dtype == 3)
    return cluster_forward_units<float, true>(units, T, B, H, Bg, reverse, xproj, w_hh, h0, c0,
                                              lengths, y, h_n, c_n, gates, c_all);
  return 3;
}

int emulated_backward(int dtype, int T, int B, int H, int KC, int groups, int reverse,
                      const void* dy, const void* dh_n, const void* dc_n, const void* w_hh,
                      const void* c0, const int64_t* lengths, const void* gates, const float* c_all,
                      void* dxproj, void* dh0, void* dc0) {
  if (KC % 16 != 0 || KC <= 0 || groups < 1) return 2;
  if (dtype == 1)
    backward<__nv_bfloat16, false>(T, B, H, KC, groups, reverse, dy, dh_n, dc_n, w_hh, c0, lengths,
                                   gates, c_all, dxproj, dh0, dc0);
  else if (dtype == 2)
    backward<__half, false>(T, B, H, KC, groups, reverse, dy, dh_n, dc_n, w_hh, c0, lengths, gates,
                            c_all, dxproj, dh0, dc0);
  else if (dtype == 3)
    backward<float, true>(T, B, H, KC, groups, reverse, dy, dh_n, dc_n, w_hh, c0, lengths, gates,
                          c_all, dxproj, dh0, dc0);
  else if (dtype == 0)
    backward<float, false>(T, B, H, KC, groups, reverse, dy, dh_n, dc_n, w_hh, c0, lengths, gates,
                           c_all, dxproj, dh0, dc0);
  else
    return 3;
  return 0;
}

}  // extern "C"
