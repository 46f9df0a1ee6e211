// C entry points that run the persistent CUDA kernels under the SIMT emulator (simt_emulator.h),
// loaded by tests/test_cuda_emulated.py through ctypes. Pointers are host memory holding the
// same tensors the CUDA launchers take (16-bit storage as raw bits); the caller chooses the
// tile configuration (units per block, staged column chunk) so every code path can be forced.
#include "simt_emulator.h"
// The emulator must come first: it supplies what the kernels take from the CUDA headers.
#include "cuda/persistent_backward.cuh"
#include "cuda/persistent_forward.cuh"

using namespace lstm_fused::cuda::persistent;

namespace {

// Batch rows per group when the batch is split into about `groups` groups (the callers then
// recount the groups, so that none is empty).
int rows_per_group(int B, int groups) { return (B + groups - 1) / groups; }

template <typename Scalar, int UNITS, bool kExact>
void forward(int T, int B, int H, int KC, int groups, bool reverse, const void* xproj,
             const void* w_hh, const void* h0, const void* c0, const int64_t* lengths, void* y,
             void* h_n, void* c_n, void* gates, float* c_all) {
  ForwardParams<Scalar> p;
  p.steps = T;
  p.B = B;
  p.H = H;
  p.Kpad = static_cast<int>(round_up(H, 16));
  p.KC = KC;
  p.Bg = rows_per_group(B, groups);
  p.groups = (B + p.Bg - 1) / p.Bg;
  p.Bpad = static_cast<int>(round_up(p.Bg, 16));
  p.reverse = reverse;
  p.xproj = static_cast<const Scalar*>(xproj);
  p.w_hh = static_cast<const Scalar*>(w_hh);
  p.h0 = static_cast<const Scalar*>(h0);
  p.c0 = static_cast<const Scalar*>(c0);
  p.lengths = lengths;
  p.y = static_cast<Scalar*>(y);
  p.h_n = static_cast<Scalar*>(h_n);
  p.c_n = static_cast<Scalar*>(c_n);
  p.gates = static_cast<Scalar*>(gates);
  p.c_all = c_all;
  std::vector<Scalar> hbuf(2 * static_cast<size_t>(B) * H);
  std::vector<unsigned> counters(static_cast<size_t>(p.groups) * kCounterStride, 0u);
  p.hbuf = hbuf.data();
  p.counter = counters.data();
  const ForwardLayout layout(UNITS, p.Bg, p.Bpad, p.Kpad, KC, sizeof(Scalar));
  emu::launch((H + UNITS - 1) / UNITS * p.groups, kThreads, layout.total,
              [&] { lstm_forward_persistent<Scalar, UNITS, kExact>(p); });
}

template <typename Scalar, bool kExact>
void backward(int T, int B, int H, int KC, int groups, bool reverse, const void* dy,
              const void* dh_n, const void* dc_n, const void* w_hh, const void* c0,
              const int64_t* lengths, const void* gates, const float* c_all, void* dxproj,
              void* dh0, void* dc0) {
  BackwardParams<Scalar> p;
  p.steps = T;
  p.B = B;
  p.H = H;
  p.Kpad = static_cast<int>(round_up(4 * H, 16));
  p.KC = KC;
  p.Bg = rows_per_group(B, groups);
  p.groups = (B + p.Bg - 1) / p.Bg;
  p.Bpad = static_cast<int>(round_up(p.Bg, 16));
  p.reverse = reverse;
  p.dy = static_cast<const Scalar*>(dy);
  p.dh_n = static_cast<const Scalar*>(dh_n);
  p.dc_n = static_cast<const Scalar*>(dc_n);
  p.w_hh = static_cast<const Scalar*>(w_hh);
  p.c0 = static_cast<const Scalar*>(c0);
  p.lengths = lengths;
  p.gates = static_cast<const Scalar*>(gates);
  p.c_all = c_all;
  p.dxproj = static_cast<Scalar*>(dxproj);
  p.dh0 = static_cast<Scalar*>(dh0);
  p.dc0 = static_cast<Scalar*>(dc0);
  std::vector<Scalar> zbuf(2 * static_cast<size_t>(B) * 4 * H);
  std::vector<unsigned> counters(static_cast<size_t>(p.groups) * kCounterStride, 0u);
  p.zbuf = zbuf.data();
  p.counter = counters.data();
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
