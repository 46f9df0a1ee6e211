// Plain descriptions of one recurrence call, shared by the torch-free kernels/launchers and the
// torch binding (binding.cu). Pointers are device pointers to contiguous row-major tensors with
// the shapes and semantics of the op contract in lstm_fused/reference.py.
#pragma once

#include <cstdint>

namespace lstm_fused {
namespace cuda {

// Storage dtype of xproj, weights, h and y. Arithmetic and the cell state are always fp32.
enum class ScalarKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct ForwardArgs {
  int64_t T = 0, B = 0, H = 0, P = 0;  // P == H without projection
  ScalarKind dtype = ScalarKind::kFloat32;
  bool allow_tf32 = false;           // fp32 storage: may the recurrent product round to TF32?
  const void* xproj = nullptr;       // (T, B, 4H): x @ W_ih^T + biases, gate order i, f, g, o
  const void* w_hh = nullptr;        // (4H, P)
  const void* w_hr = nullptr;        // (P, H), or nullptr without projection
  const void* h0 = nullptr;          // (B, P)
  const void* c0 = nullptr;          // (B, H)
  const int64_t* lengths = nullptr;  // (B,), or nullptr: every sequence runs all T steps
  bool reverse = false;
  void* y = nullptr;       // (T, B, P); zero at inactive steps
  void* h_n = nullptr;     // (B, P)
  void* c_n = nullptr;     // (B, H)
  void* gates = nullptr;   // (T, B, 4H) activated gates (zero when inactive), or nullptr
  float* c_all = nullptr;  // (T, B, H) cell state after each step, or nullptr
};

struct BackwardArgs {
  int64_t T = 0, B = 0, H = 0, P = 0;
  ScalarKind dtype = ScalarKind::kFloat32;
  bool allow_tf32 = false;
  const void* dy = nullptr;    // (T, B, P)
  const void* dh_n = nullptr;  // (B, P)
  const void* dc_n = nullptr;  // (B, H)
  const void* w_hh = nullptr;  // (4H, P)
  const void* w_hr = nullptr;  // (P, H), or nullptr
  const void* c0 = nullptr;    // (B, H)
  const int64_t* lengths = nullptr;
  bool reverse = false;
  const void* gates = nullptr;   // (T, B, 4H) saved by the forward
  const float* c_all = nullptr;  // (T, B, H) saved by the forward
  void* dxproj = nullptr;        // (T, B, 4H): gradient of the pre-activation gates
  void* dh0 = nullptr;           // (B, P)
  void* dc0 = nullptr;           // (B, H)
};

}  // namespace cuda
}  // namespace lstm_fused
