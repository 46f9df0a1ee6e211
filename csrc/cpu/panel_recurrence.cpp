// Drivers of the SIMD step kernels (step_kernels.h): the forward and backward recurrence of a
// layer without projection in float32, bfloat16 or float16, for the instruction set isa.h picks.
//
// One team of threads per call (see run_steps). The blocks of a step are split over the threads
// (step_team.h); each thread's blocks read their own panels of W_hh (packed once and cached
// across calls, packed_weights.h), which stay in that thread's L2 for all T steps when they fit.
// The state a step reads (h forward, dz backward) was written by every thread the step before,
// so it is double-buffered and the steps are separated by the team's synchronization.

#include "checks.h"
#include "cpu/isa.h"
#include "cpu/output_pool.h"
#include "cpu/packed_weights.h"
#include "cpu/recurrence.h"
#include "cpu/step_kernels.h"
#include "cpu/step_team.h"
#include "cpu/team_outlook.h"

#include <omp.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>


namespace lstm_fused::cpu {
namespace {

// A team and a synchronization per step pay only above these sizes: at least this much work per
// step and thread, and either this much work per call or more weight than one core's L2 holds
// comfortably (split over the threads, each share stays in its own L2: a cell step of H = 256
// streams 2 MB of fp32 weights, from L3 on one thread, 1 MB from each L2 on two).
constexpr int64_t kMinStepMacsPerThread = 16384;
constexpr int64_t kMinCallMacsForThreads = int64_t(1) << 20;
constexpr int64_t kOneCoreWeightBytes = int64_t(512) << 10;

int panel_threads(int64_t T, int64_t step_macs, int64_t blocks, int64_t weight_bytes) {
  int64_t threads = std::min<int64_t>(at::get_num_threads(), blocks);
  threads = std::min<int64_t>(threads, std::max<int64_t>(1, step_macs / kMinStepMacsPerThread));
  if (T * step_macs < kMinCallMacsForThreads && weight_bytes <= kOneCoreWeightBytes) threads = 1;
  return static_cast<int>(std::max<int64_t>(1, threads));
}

// Runs body(k) on threads k = 0 .. threads - 1 of one OpenMP region, so the threads are ATen's
// own (no second set of threads competing with them for the cores), and records whether the
// helpers arrived before the caller (thread 0) was done (team_outlook.h). The runtime may give
// fewer threads than asked: body must let the threads that came do the work of those that did
// not, and the team then counts as not joined.
template <typename Body>
void run_team(int threads, const Body& body) {
  std::atomic<int> helpers_arrived{0};
  bool in_time = false;
#pragma omp parallel num_threads(threads)
  {
    const int k = omp_get_thread_num();
    if (k == 0) {
      body(0);
      in_time = helpers_arrived.load(std::memory_order_acquire) == threads - 1;
    } else if (k < threads) {
      helpers_arrived.fetch_add(1, std::memory_order_acq_rel);
      body(k);
    }
  }
  record_team(in_time);
}

// Runs fn(s, block) for s in steps (in order) and every block, on up to `threads` threads of a
// team (step_team.h), unless the last teams showed that helpers come too late to help.
template <typename Fn>
void run_steps(int threads, int64_t steps, int64_t blocks, const Fn& fn) {
  if (threads > 1 && !team_worth_trying()) threads = 1;
  if (threads == 1) {
    for (int64_t s = 0; s < steps; ++s)
      for (int64_t blk = 0; blk < blocks; ++blk) fn(s, blk);
    return;
  }
  StepTeam team(threads, blocks);
  run_team(threads, [&](int k) {
    for (int64_t s = 0; s < steps; ++s) team.run_step(k, s, [&](int64_t blk) { fn(s, blk); });
  });
}

// Runs fn(k) for k in [0, slices) on up to `slices` threads, each slice on the thread that claims
// it; a thread done with its slice claims the next unclaimed one, so a helper that comes late
// (or never) costs only the slices it took.
template <typename Fn>
void run_batch_slices(int64_t slices, const Fn& fn) {
  int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), slices));
  if (threads > 1 && !team_worth_trying()) threads = 1;
  if (threads == 1) {
    for (int64_t k = 0; k < slices; ++k) fn(k);
    return;
  }
  std::atomic<int64_t> next{0};
  run_team(threads, [&](int) {
    for (int64_t slice = next.fetch_add(1); slice < slices; slice = next.fetch_add(1)) fn(slice);
  });
}

// Rows [b0, b0 + n) of a call's arguments, as a call of its own over that slice of the batch:
// its pointers at the slice's first row, its own part of the scratch sums (blocks x n x 4V).
// elem: bytes per element of the storage dtype.
ForwardStepArgs batch_rows(const ForwardStepArgs& a, int64_t b0, int64_t n, int64_t blocks, int V,
                           int64_t elem) {
  ForwardStepArgs r = a;
  r.B = n;
  r.xproj = static_cast<const char*>(a.xproj) + b0 * a.xproj_stride * elem;
  r.lengths = a.lengths != nullptr ? a.lengths + b0 : nullptr;
  r.h[0] = a.h[0] + b0 * a.K, r.h[1] = a.h[1] + b0 * a.K;
  r.c = a.c + b0 * a.H;
  r.y = static_cast<char*>(a.y) + b0 * a.y_stride * elem;
  r.gates_out = a.gates_out != nullptr ? static_cast<char*>(a.gates_out) + b0 * 4 * a.H * elem : nullptr;
  r.c_all = a.c_all != nullptr ? a.c_all + b0 * a.H : nullptr;
  r.partial = a.partial + blocks * b0 * 4 * V;
  return r;
}

BackwardStepArgs batch_rows(const BackwardStepArgs& a, int64_t b0, int64_t n, int64_t blocks, int V,
                            int64_t elem) {
  BackwardStepArgs r = a;
  r.B = n;
  r.dy = static_cast<const char*>(a.dy) + b0 * a.dy_stride * elem;
  r.gates = static_cast<const char*>(a.gates) + b0 * 4 * a.H * elem;
  r.c_all = a.c_all + b0 * a.H;
  r.c0 = a.c0 + b0 * a.H;
  r.lengths = a.lengths != nullptr ? a.lengths + b0 : nullptr;
  r.dh = a.dh + b0 * a.H;
  r.dc = a.dc + b0 * a.H;
  if (a.dz[0] != nullptr) r.dz[0] = a.dz[0] + b0 * 4 * a.H, r.dz[1] = a.dz[1] + b0 * 4 * a.H;
  r.dxproj = static_cast<char*>(a.dxproj) + b0 * 4 * a.H * elem;
  r.partial = a.partial + blocks * b0 * 4 * V;
  return r;
}

// src (B, n), any floating dtype and strides, into the first n floats of B rows of stride ld.
void copy_rows_to_float(const at::Tensor& src, float* dst, int64_t ld) {
  const int64_t B = src.size(0), n = src.size(1);
  if (src.scalar_type() != at::kFloat || !src.is_contiguous()) {
    at::from_blob(dst, {B, n}, {ld, 1}, src.options().dtype(at::kFloat)).copy_(src);
    return;
  }
  const float* s = src.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) std::memcpy(dst + b * ld, s + b * n, n * sizeof(float));
}

}  // namespace

// The batch rows of a recurrence are independent of each other: split by rows, each thread runs
// its rows through every step with no synchronization at all, but reads the whole of W_hh every
// step. Split by blocks of units (run_steps), each thread reads only its share of W_hh, but the
// step's state (h forward, dz backward) passes between the cores every step. The backward's dz
// is B x 4H floats, four times the forward's h per multiply-add.
// Measured on the Intel Xeon (2 MB of L2 per core), float32, forward with saved activations:
// - 256 KB of weights (H = 128), T = 50: B = 16 forward 0.48-0.53 ms in batch slices against
//   0.57-0.58 by blocks, backward 0.43 against 0.67 on one thread (0.91 by blocks); B = 64
//   backward 1.43 against 2.65-2.70; B = 4 level; T = 200, B = 2: forward 0.38 against 0.43.
// - 1 MB (H = 256), T = 100: backward in slices 18-30% faster at B = 2..64 (B = 16: 3.1 against
//   3.8 ms); forward 20% slower at B = 4, level at B = 2 and 16, faster from 32 (5.0-5.6 against
//   6.2-6.6 ms; B = 64 11.5-11.8 against 12.4-14.4).
// So slices where the weights take at most an eighth of one core's L2, and up to half of it for
// the backward and for forwards of 32 rows or more (in the suite, T = 100, B = 16, H = 256
// forward: 5.39-5.54 ms in slices against 5.36-5.45 by blocks). Where a slice would stream W_hh
// from L3, blocks win.
int64_t core_l2_bytes() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? static_cast<int64_t>(l2) : int64_t(512) << 10;  // unknown: the least measured
  }();
  return bytes;
}

RecurrencePlan plan_recurrence(bool backward, int64_t T, int64_t B, int64_t H, int V, at::ScalarType dtype) {
  // W_hh's panels (step_kernels.h): unit blocks of V forward, column blocks of 4V backward.
  const int64_t width = backward ? 4 * V : V;
  const int64_t blocks = (H + width - 1) / width;
  const int64_t weight_bytes = blocks * (backward ? 4 * H : H) * 4 * V * at::elementSize(dtype);
  const int64_t step_macs = B * 4 * H * H;
  const int64_t slices = std::min<int64_t>(at::get_num_threads(), B);
  const int64_t l2 = core_l2_bytes();
  const bool slices_pay = weight_bytes <= l2 / 8 || (weight_bytes <= l2 / 2 && (backward || B >= 32));
  if (slices > 1 && slices_pay && T * step_macs >= kMinCallMacsForThreads) return {slices, 1};
  if (backward && weight_bytes <= kOneCoreWeightBytes) return {1, 1};
  return {1, panel_threads(T, step_macs, blocks, weight_bytes)};
}

// How much of a block's panel one chunk of the reduction covers (step_kernels_impl.h): by
// default none, the panel streamed from L2 for each row tile. Chunks of half the L1 (each chunk
// serving every row tile from L1, with partial sums between chunks) measured slower on both
// machine types measured since: 10-25% on Zen 4 (32 KB L1) at B = 16..64, and on an Intel Xeon
// with a 48 KB L1 and 2 MB L2 (AVX512-BF16) 4-5% at T = 100, B = 64, H = 512 (forward 87-88
// against 91-92 ms, forward + backward 263-267 against 277-285 ms), level at B = 16.
// LSTM_FUSED_CPU_CHUNK_BYTES=<n> (0: no chunks) sets a chunk size, read on every call: tests
// run both paths on every machine.
int64_t panel_chunk_bytes() {
  constexpr int64_t kDefault = 0;
  const char* forced = std::getenv("LSTM_FUSED_CPU_CHUNK_BYTES");
  if (forced == nullptr || *forced == '\0') return kDefault;
  char* end = nullptr;
  const long long bytes = std::strtoll(forced, &end, 10);
  TORCH_CHECK(*end == '\0' && bytes >= 0, "lstm_fused: LSTM_FUSED_CPU_CHUNK_BYTES=", forced,
              " is not a byte count (0: no chunks)");
  return bytes;
}

Storage storage_of(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return Storage::kBFloat16;
  if (dtype == at::kHalf) return Storage::kHalf;
  return Storage::kFloat;
}

bool panel_kernels_apply(at::ScalarType dtype, bool has_proj) {
  return !has_proj && (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf);
}

namespace {

// Where a forward writes its sequence outputs: y (T, B, H) with rows y_stride apart (a tensor of
// its own, or one direction's half of a bidirectional layer's (T, B, 2H) output), and when it
// saves for backward, the activated gates (T, B, 4H) and cell states (T, B, H), contiguous.
struct ForwardDestination {
  at::Tensor y;
  int64_t y_stride = 0;
  bool save = false;
  at::Tensor gates, c_all;
};

// One direction's forward, set up for the step kernels: the arguments of its steps and the
// tensors they point into.
struct ForwardCall {
  ForwardStepArgs args;
  int64_t blocks = 0;
  at::Tensor xproj, panels, lengths, h_n, c, scratch;
  ForwardDestination out;
};

ForwardCall prepare_forward(int V, const at::Tensor& xproj_in, const at::Tensor& w_hh,
                            const at::Tensor& h0, const at::Tensor& c0,
                            const std::optional<at::Tensor>& lengths_in, bool reverse,
                            ForwardDestination out) {
  const int64_t T = xproj_in.size(0), B = xproj_in.size(1), H = xproj_in.size(2) / 4;
  const auto f32 = xproj_in.options().dtype(at::kFloat);
  ForwardCall call;
  call.xproj = xproj_in.contiguous();
  call.panels = packed_panels(w_hh, PanelLayout::kForwardGates, V);
  call.lengths = lengths_in.has_value() ? lengths_in->contiguous() : at::Tensor();
  call.blocks = (H + V - 1) / V;
  // A short call (a few steps of a small layer: streaming, decoding) costs microseconds, so each
  // ATen call here shows: float32 state is copied with plain loops, and the scratch (the blocks'
  // partial sums, then the other h buffer) is one allocation. h is double-buffered, and the
  // buffer the last step writes is h_n itself.
  call.h_n = at::empty({B, H}, f32);
  call.c = at::empty({B, H}, f32);
  call.scratch = at::empty({call.blocks * B * 4 * V + B * H}, f32);
  copy_rows_to_float(c0, call.c.data_ptr<float>(), H);
  call.out = std::move(out);

  ForwardStepArgs& a = call.args;
  a.T = T, a.B = B, a.H = H, a.batch = B;
  a.K = H, a.xproj_stride = 4 * H;
  a.storage = storage_of(call.xproj.scalar_type());
  a.reverse = reverse, a.save = call.out.save;
  a.xproj = call.xproj.data_ptr();
  a.panels = call.panels.data_ptr();
  a.lengths = call.lengths.defined() ? call.lengths.data_ptr<int64_t>() : nullptr;
  a.h[T % 2] = call.h_n.data_ptr<float>();
  a.h[(T + 1) % 2] = call.scratch.data_ptr<float>() + call.blocks * B * 4 * V;
  copy_rows_to_float(h0, a.h[0], H);
  a.c = call.c.data_ptr<float>();
  a.y = call.out.y.data_ptr();
  a.y_stride = call.out.y_stride;
  a.gates_out = call.out.save ? call.out.gates.data_ptr() : nullptr;
  a.c_all = call.out.save ? call.out.c_all.data_ptr<float>() : nullptr;
  a.partial = call.scratch.data_ptr<float>();  // (blocks, B, 4V)
  a.chunk_bytes = panel_chunk_bytes();
  return call;
}

// Batch slice k of `slices` through every step, on the calling thread.
void run_forward_slice(const StepKernels& kernels, const ForwardCall& call, int64_t k,
                       int64_t slices) {
  const ForwardStepArgs& a = call.args;
  const int64_t b0 = a.B * k / slices, b1 = a.B * (k + 1) / slices;
  const ForwardStepArgs part =
      batch_rows(a, b0, b1 - b0, call.blocks, kernels.vector_width, call.xproj.element_size());
  for (int64_t s = 0; s < a.T; ++s)
    for (int64_t u = 0; u < call.blocks; ++u) kernels.forward_block(part, s, u);
}

// The whole call, spread over the threads as plan_recurrence says.
void run_forward(const StepKernels& kernels, const ForwardCall& call) {
  const ForwardStepArgs& a = call.args;
  const RecurrencePlan plan =
      plan_recurrence(false, a.T, a.B, a.H, kernels.vector_width, call.xproj.scalar_type());
  if (plan.batch_slices > 1) {
    run_batch_slices(plan.batch_slices,
                     [&](int64_t k) { run_forward_slice(kernels, call, k, plan.batch_slices); });
  } else {
    run_steps(plan.threads, a.T, call.blocks,
              [&](int64_t s, int64_t u) { kernels.forward_block(a, s, u); });
  }
}

// h_n and c_n in the input's dtype.
std::pair<at::Tensor, at::Tensor> final_state(const ForwardCall& call) {
  const auto dtype = call.xproj.scalar_type();
  if (dtype == at::kFloat) return {call.h_n, call.c};
  return {call.h_n.to(dtype), call.c.to(dtype)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> panel_forward(
    const at::Tensor& xproj, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths, bool reverse, bool save) {
  const int64_t T = xproj.size(0), B = xproj.size(1), H = xproj.size(2) / 4;
  const auto dtype = xproj.scalar_type();
  const StepKernels& kernels = step_kernels(selected_isa());
  ForwardDestination out;
  out.y = pooled_empty({T, B, H}, dtype);
  out.y_stride = H;
  out.save = save;
  out.gates = save ? pooled_empty({T, B, 4 * H}, dtype) : at::empty({0}, xproj.options());
  out.c_all = save ? pooled_empty({T, B, H}, at::kFloat)
                   : at::empty({0}, xproj.options().dtype(at::kFloat));
  const ForwardCall call =
      prepare_forward(kernels.vector_width, xproj, w_hh, h0, c0, lengths, reverse, std::move(out));
  run_forward(kernels, call);
  auto [h_n, c_n] = final_state(call);
  return {call.out.y, h_n, c_n, call.out.gates, call.out.c_all};
}

std::tuple<at::Tensor, at::Tensor> panel_cell_forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  // One step costs a few microseconds, so each ATen call here (a microsecond or so) shows: the
  // scratch is one allocation and float32 inputs are copied with plain loops.
  const int64_t B = x.size(0), I = x.size(1), H = w_hh.size(1), K = H + I;
  const auto opts = x.options();
  const auto f32 = opts.dtype(at::kFloat);
  const bool is_f32 = x.scalar_type() == at::kFloat;
  const StepKernels& kernels = step_kernels(selected_isa());
  const int V = kernels.vector_width;
  const int64_t blocks = (H + V - 1) / V;

  const at::Tensor panels = packed_cell_panels(w_hh, w_ih, V);
  // Scratch: the two state rows [h | x] of each batch row (one reduction covers both products),
  // the blocks' partial sums, and the float32 bias sum.
  at::Tensor scratch = at::empty({2 * B * K + blocks * B * 4 * V + 4 * H}, f32);
  float* state = scratch.data_ptr<float>();
  float* partial = state + 2 * B * K;
  copy_rows_to_float(h0, state, K);
  copy_rows_to_float(x, state + H, K);
  at::Tensor bias;  // in the input dtype, unless float32 (then in scratch)
  const void* bias_data = nullptr;
  if (!b_ih.has_value()) {
    bias = at::zeros({4 * H}, opts);
    bias_data = bias.data_ptr();
  } else if (is_f32 && b_ih->is_contiguous() && b_hh->is_contiguous()) {
    float* sum = partial + blocks * B * 4 * V;
    const float* bi = b_ih->data_ptr<float>();
    const float* bh = b_hh->data_ptr<float>();
    for (int64_t j = 0; j < 4 * H; ++j) sum[j] = bi[j] + bh[j];
    bias_data = sum;
  } else {
    bias = at::add(*b_ih, *b_hh).contiguous();
    bias_data = bias.data_ptr();
  }
  at::Tensor c = at::empty({B, H}, f32);
  copy_rows_to_float(c0, c.data_ptr<float>(), H);
  at::Tensor h = at::empty({B, H}, opts);  // the step's y is its new h, in the input dtype

  ForwardStepArgs a;
  a.T = 1, a.B = B, a.H = H, a.batch = B;
  a.K = K, a.xproj_stride = 0;
  a.storage = storage_of(x.scalar_type());
  a.reverse = false, a.save = false;
  a.xproj = bias_data;
  a.panels = panels.data_ptr();
  a.lengths = nullptr;
  a.h[0] = state;
  a.h[1] = state + B * K;
  a.c = c.data_ptr<float>();
  a.y = h.data_ptr();
  a.y_stride = H;
  a.gates_out = nullptr;
  a.c_all = nullptr;
  a.partial = partial;
  a.chunk_bytes = panel_chunk_bytes();
  const int threads = panel_threads(1, B * 4 * H * K, blocks, panels.nbytes());
  run_steps(threads, 1, blocks,
            [&](int64_t s, int64_t u) { kernels.forward_block(a, s, u); });
  return {h, is_f32 ? c : c.to(x.scalar_type())};
}

namespace {

// One direction's backward, set up for the step kernels, as ForwardCall.
struct BackwardCall {
  BackwardStepArgs args;
  int64_t blocks = 0;
  at::Tensor dy, gates, c_all, c0, panels, lengths, dh, dc, dz, dxproj, partial;
};

// dy (T, B, H) with rows dy_stride apart: a contiguous tensor, or one direction's half of a
// bidirectional layer's (T, B, 2H) output gradient.
BackwardCall prepare_backward(int V, const at::Tensor& dy, int64_t dy_stride,
                              const at::Tensor& dh_n, const at::Tensor& dc_n,
                              const at::Tensor& w_hh, const at::Tensor& c0,
                              const std::optional<at::Tensor>& lengths_in, bool reverse,
                              const at::Tensor& gates_in, const at::Tensor& c_all_in) {
  const int64_t T = gates_in.size(0), B = gates_in.size(1), H = gates_in.size(2) / 4;
  const auto f32 = gates_in.options().dtype(at::kFloat);
  BackwardCall call;
  call.dy = dy;
  call.gates = gates_in.contiguous();
  call.c_all = c_all_in.contiguous();
  call.c0 = c0.to(at::kFloat).contiguous();
  call.panels = packed_panels(w_hh, PanelLayout::kBackwardColumns, V);
  call.lengths = lengths_in.has_value() ? lengths_in->contiguous() : at::Tensor();
  call.dh = dh_n.to(at::kFloat, false, /*copy=*/true).contiguous();
  call.dc = dc_n.to(at::kFloat, false, /*copy=*/true).contiguous();
  // Float32 gate gradients are read back from dxproj; 16-bit ones need a float32 copy.
  const bool float_storage = call.gates.scalar_type() == at::kFloat;
  if (!float_storage) call.dz = at::empty({2, B, 4 * H}, f32);
  call.dxproj = pooled_empty({T, B, 4 * H}, call.gates.scalar_type());
  call.blocks = (H + 4 * V - 1) / (4 * V);
  call.partial = at::empty({call.blocks, B, 4 * V}, f32);

  BackwardStepArgs& a = call.args;
  a.T = T, a.B = B, a.H = H, a.batch = B;
  a.storage = storage_of(call.gates.scalar_type());
  a.reverse = reverse;
  a.dy = call.dy.data_ptr();
  a.dy_stride = dy_stride;
  a.gates = call.gates.data_ptr();
  a.c_all = call.c_all.data_ptr<float>();
  a.c0 = call.c0.data_ptr<float>();
  a.panels = call.panels.data_ptr();
  a.lengths = call.lengths.defined() ? call.lengths.data_ptr<int64_t>() : nullptr;
  a.dh = call.dh.data_ptr<float>();
  a.dc = call.dc.data_ptr<float>();
  a.dz[0] = float_storage ? nullptr : call.dz.data_ptr<float>();
  a.dz[1] = float_storage ? nullptr : a.dz[0] + B * 4 * H;
  a.dxproj = call.dxproj.data_ptr();
  a.partial = call.partial.data_ptr<float>();
  a.chunk_bytes = panel_chunk_bytes();
  return call;
}

// Synchronized step i of a backward processes recurrence step T-1-i; the last one (i = T) is
// the final product (dh0).
void backward_step(const StepKernels& kernels, const BackwardStepArgs& a, int64_t i, int64_t q) {
  const int64_t s = a.T - 1 - i;
  const BackwardPhase phase = i == 0     ? BackwardPhase::kFirst
                              : i == a.T ? BackwardPhase::kFinal
                                         : BackwardPhase::kStep;
  kernels.backward_block(a, s < 0 ? 0 : s, q, phase);
}

void run_backward_slice(const StepKernels& kernels, const BackwardCall& call, int64_t k,
                        int64_t slices) {
  const BackwardStepArgs& a = call.args;
  const int64_t b0 = a.B * k / slices, b1 = a.B * (k + 1) / slices;
  const BackwardStepArgs part =
      batch_rows(a, b0, b1 - b0, call.blocks, kernels.vector_width, call.gates.element_size());
  for (int64_t i = 0; i <= a.T; ++i)
    for (int64_t q = 0; q < call.blocks; ++q) backward_step(kernels, part, i, q);
}

void run_backward(const StepKernels& kernels, const BackwardCall& call) {
  const BackwardStepArgs& a = call.args;
  const RecurrencePlan plan =
      plan_recurrence(true, a.T, a.B, a.H, kernels.vector_width, call.gates.scalar_type());
  if (plan.batch_slices > 1) {
    run_batch_slices(plan.batch_slices,
                     [&](int64_t k) { run_backward_slice(kernels, call, k, plan.batch_slices); });
  } else {
    run_steps(plan.threads, a.T + 1, call.blocks,
              [&](int64_t i, int64_t q) { backward_step(kernels, a, i, q); });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> panel_backward(
    const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& w_hh,
    const at::Tensor& c0, const std::optional<at::Tensor>& lengths, bool reverse,
    const at::Tensor& gates, const at::Tensor& c_all) {
  const StepKernels& kernels = step_kernels(selected_isa());
  const int64_t H = gates.size(2) / 4;
  const BackwardCall call = prepare_backward(kernels.vector_width, dy.contiguous(), H, dh_n, dc_n,
                                             w_hh, c0, lengths, reverse, gates, c_all);
  run_backward(kernels, call);
  const auto dtype = gates.scalar_type();
  return {call.dxproj, call.dh.to(dtype), call.dc.to(dtype)};
}

// ------------------------------------------------------------------------------------------
// Both directions of a bidirectional layer.
//
// The two directions are independent recurrences over the same input. One after the other,
// each spreads its steps over every thread by its own plan (plan_recurrence): a synchronization
// per step, or batch slices. Side by side, each direction takes half the threads and runs batch
// slices of its own, with no synchronization between steps at all; each thread then streams the
// whole of its direction's W_hh every step, instead of its share of it.

namespace {

// Measured on a 2-core Zen 5 EPYC (1 MB of L2 per core), float32, forward / backward time one
// after the other over side by side:
// - W_hh within half an L2 (H <= 128 in float32, H <= 256 in bfloat16): side by side 1.2-1.8x
//   faster at every batch size measured, tiny calls included (T = 5, B = 1, H = 128: 1.21 /
//   1.17x; T = 200, B = 1: 1.59 / 1.80x; T = 50, B = 16: 1.31 / 1.24x).
// - Larger, with 4 rows or more per slice: 1.02-1.38x (T = 100, B = 16, H = 256: 1.30 / 1.38x;
//   T = 200, B = 4, H = 256: 1.06 / 1.27x; T = 100, B = 3, H = 512: 1.02 / 1.03x); with 1 or 2
//   rows, where each core would stream its whole W_hh from L3 every step, 0.91-1.09x
//   (B = 1, H = 256: 0.91 / 0.96x; B = 2, H = 384: 0.92 / 0.93x).
constexpr int64_t kPairedMinRowsPerSlice = 4;
// Below this much work a call is not worth a team even side by side.
constexpr int64_t kPairedMinCallMacs = int64_t(1) << 16;

// Both directions' calls: side by side, `slices` batch slices each (run_slice(call, k, slices)
// for slice k), or one after the other by their own plans (run_whole(call)) where slices is 0.
template <typename Call, typename Slice, typename Whole>
void run_directions(const std::vector<Call>& calls, int64_t slices, const Slice& run_slice,
                    const Whole& run_whole) {
  if (slices == 0) {
    for (const Call& call : calls) run_whole(call);
    return;
  }
  run_batch_slices(2 * slices,
                   [&](int64_t item) { run_slice(calls[item / slices], item % slices, slices); });
}

}  // namespace

int64_t paired_direction_slices(int64_t T, int64_t B, int64_t H, at::ScalarType dtype) {
  const int threads = at::get_num_threads();
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(threads / 2, B));
  if (const auto forced = forced_switch("LSTM_FUSED_CPU_DIRECTIONS", "paired", "in-turn"))
    return *forced ? slices : 0;
  // Fewer rows than threads would leave threads idle that the directions' own plans would use
  // (measured on 2 cores only, where every row count fills them).
  if (threads < 2 || 2 * slices < threads || T * B * 4 * H * H < kPairedMinCallMacs) return 0;
  const int64_t weight_bytes = 4 * H * H * at::elementSize(dtype);
  const bool pays = weight_bytes <= core_l2_bytes() / 2 || B / slices >= kPairedMinRowsPerSlice;
  return pays ? slices : 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> panel_forward_pair(
    const at::Tensor& xproj_f, const at::Tensor& xproj_r, const at::Tensor& w_hh_f,
    const at::Tensor& w_hh_r, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths, bool save) {
  const int64_t T = xproj_f.size(0), B = xproj_f.size(1), H = xproj_f.size(2) / 4;
  const auto dtype = xproj_f.scalar_type();
  const StepKernels& kernels = step_kernels(selected_isa());
  const at::Tensor y = pooled_empty({T, B, 2 * H}, dtype);
  const at::Tensor gates =
      save ? pooled_empty({2, T, B, 4 * H}, dtype) : at::empty({0}, xproj_f.options());
  const at::Tensor c_all = save ? pooled_empty({2, T, B, H}, at::kFloat)
                                : at::empty({0}, xproj_f.options().dtype(at::kFloat));
  const at::Tensor* xproj[2] = {&xproj_f, &xproj_r};
  const at::Tensor* w_hh[2] = {&w_hh_f, &w_hh_r};
  std::vector<ForwardCall> calls;
  calls.reserve(2);
  for (int d = 0; d < 2; ++d) {
    ForwardDestination out;
    out.y = y.narrow(2, d * H, H);
    out.y_stride = 2 * H;
    out.save = save;
    out.gates = save ? gates[d] : gates;
    out.c_all = save ? c_all[d] : c_all;
    calls.push_back(prepare_forward(kernels.vector_width, *xproj[d], *w_hh[d], h0[d], c0[d],
                                    lengths, /*reverse=*/d == 1, std::move(out)));
  }
  run_directions(
      calls, paired_direction_slices(T, B, H, dtype),
      [&](const ForwardCall& call, int64_t k, int64_t n) { run_forward_slice(kernels, call, k, n); },
      [&](const ForwardCall& call) { run_forward(kernels, call); });
  const auto [h_f, c_f] = final_state(calls[0]);
  const auto [h_r, c_r] = final_state(calls[1]);
  return {y, at::stack({h_f, h_r}), at::stack({c_f, c_r}), gates, c_all};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> panel_backward_pair(
    const at::Tensor& dy_in, const at::Tensor& dh_n, const at::Tensor& dc_n,
    const at::Tensor& w_hh_f, const at::Tensor& w_hh_r, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths, const at::Tensor& gates, const at::Tensor& c_all) {
  const int64_t T = gates.size(1), B = gates.size(2), H = gates.size(3) / 4;
  const auto dtype = gates.scalar_type();
  const StepKernels& kernels = step_kernels(selected_isa());
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor* w_hh[2] = {&w_hh_f, &w_hh_r};
  std::vector<BackwardCall> calls;
  calls.reserve(2);
  for (int d = 0; d < 2; ++d) {
    calls.push_back(prepare_backward(kernels.vector_width, dy.narrow(2, d * H, H), 2 * H, dh_n[d],
                                     dc_n[d], *w_hh[d], c0[d], lengths, /*reverse=*/d == 1,
                                     gates[d], c_all[d]));
  }
  run_directions(
      calls, paired_direction_slices(T, B, H, dtype),
      [&](const BackwardCall& call, int64_t k, int64_t n) { run_backward_slice(kernels, call, k, n); },
      [&](const BackwardCall& call) { run_backward(kernels, call); });
  return {calls[0].dxproj, calls[1].dxproj, at::stack({calls[0].dh, calls[1].dh}).to(dtype),
          at::stack({calls[0].dc, calls[1].dc}).to(dtype)};
}

}  // namespace lstm_fused::cpu
