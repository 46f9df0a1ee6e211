// W_hh laid out as the step kernels' panels (see step_kernels.h), cached across calls.
//
// A streaming caller (LSTMCell, or an LSTM fed one step at a time) would otherwise repack the
// whole W_hh for every step it runs. An entry is reused while the weight tensor is the same
// object with the same storage, the same version counter (every in-place update through autograd-
// visible ops bumps it: optimizer steps, load_state_dict, copy_ under no_grad) and the same
// sampled fingerprint, a cheap guard against writes through `.data`, which bypass the version
// counter. The cache holds only a weak reference to the weight: a freed weight's entry can never
// match a new tensor that happens to reuse its address. An entry of a weight updated since is
// dropped when that weight is packed again (it can never match again), and panels are allocated
// from the output pool (output_pool.h), so the repack after an optimizer step reuses the memory
// of the panels it replaces instead of faulting in fresh pages.
#pragma once

#include <ATen/core/Tensor.h>

namespace lstm_fused::cpu {

enum class PanelLayout {
  kForwardGates,     // per block of V units: (H_in, 4 gates, V)
  kBackwardColumns,  // per block of 4V units: (4H, 4V)
};

// Panels of w_hh (4H, H) in `layout` for vector width V, in w_hh's dtype. The returned tensor
// stays valid however the cache changes afterwards.
at::Tensor packed_panels(const at::Tensor& w_hh, PanelLayout layout, int V);
// Forward panels of [W_hh | W_ih] (4H, H + I) for a fused cell step, cached on both weights.
at::Tensor packed_cell_panels(const at::Tensor& w_hh, const at::Tensor& w_ih, int V);

// Entries currently held, and a way to drop them (tests).
int64_t packed_cache_size();
void packed_cache_clear();

}  // namespace lstm_fused::cpu
