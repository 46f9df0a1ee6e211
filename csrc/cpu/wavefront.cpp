// Inference of a stack of unidirectional float32 layers as a wavefront over chunks of time.
//
// At small batch one step of one layer is too little work to split over the cores (the step
// kernels would spend it on the per-step synchronization), but the stack has other work that
// can run at the same time: layer l + 1 on the chunk of steps that layer l has just finished.
// So the sequence is cut into chunks of C steps, and a work item is (layer l, chunk k): the
// input projection of that chunk (one C*B-row tile product) followed by its C recurrence steps,
// all on one thread. Item (l, k) needs (l - 1, k) (its input) and (l, k - 1) (its state); every
// thread claims the first ready item, lowest layer first, so up to one thread per layer runs
// with no synchronization inside an item. A thread that finds nothing ready (ramp-up, or a
// helper descheduled while it holds an item) spins briefly, then yields its core.
//
// The kernels are those of the layer-by-layer path with our input projection; a projection
// row may round differently where the chunk puts it alone into a register tile (such a tile sums
// even and odd k apart, step_kernels_impl.h). lstm_fused/functional.py decides where the
// wavefront applies (its _WAVEFRONT_CHUNK_ROWS is kChunkRows below).

#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "checks.h"
#include "cpu/isa.h"
#include "cpu/packed_weights.h"
#include "cpu/recurrence.h"
#include "cpu/spin_wait.h"
#include "cpu/step_kernels.h"

namespace lstm_fused::cpu {
namespace {

// Rows of one chunk's input projection: enough for the tile product to run at speed (as
// panel_products.cpp's row panels), few enough that a short sequence still makes several chunks.
constexpr int64_t kChunkRows = 96;

// One layer's packed weights, state and chunk buffer.
struct Layer {
  int64_t input_width = 0;
  at::Tensor w_ih_panels, w_hh_panels, bias;  // bias: (blocks, 4, V) floats, b_ih + b_hh
  at::Tensor h, c;                            // (2, B, H) double-buffered, (B, H)
  at::Tensor xproj, partial;                  // (C, B, 4H), (blocks, B, 4V)
  at::Tensor y;                               // (T, B, H): input of the next layer, or the output
  std::atomic<int64_t> claimed{0}, done{0};   // chunks claimed / finished
};

struct Stack {
  int64_t T = 0, B = 0, H = 0, C = 0, chunks = 0, blocks = 0;
  const StepKernels* kernels = nullptr;
  const float* x = nullptr;
  int64_t chunk_bytes = 0;
  std::vector<std::unique_ptr<Layer>> layers;

  // Runs chunk k of layer l: its input projection, then its steps.
  void run_item(int64_t l, int64_t k) {
    Layer& layer = *layers[l];
    const int V = kernels->vector_width;
    const int64_t t0 = k * C, steps = std::min(C, T - t0);
    const float* input = l == 0 ? x : layers[l - 1]->y.data_ptr<float>();

    PanelProductArgs p;
    p.K = layer.input_width, p.storage = Storage::kFloat;
    p.a = input + t0 * B * layer.input_width, p.lda = layer.input_width;
    p.panels = layer.w_ih_panels.data_ptr(), p.panel_stride = layer.input_width * 4 * V;
    p.bias = layer.bias.defined() ? layer.bias.data_ptr<float>() : nullptr;
    p.out = layer.xproj.data_ptr(), p.ldo = 4 * H;
    p.columns = H, p.gate_layout = true;
    for (int64_t b = 0; b < blocks; ++b) kernels->panel_product(p, b, 0, steps * B);

    ForwardStepArgs a;
    a.T = steps, a.B = B, a.H = H, a.batch = B;
    a.K = H, a.xproj_stride = 4 * H;
    a.storage = Storage::kFloat;
    a.reverse = false, a.save = false;
    a.xproj = layer.xproj.data_ptr();
    a.panels = layer.w_hh_panels.data_ptr();
    a.lengths = nullptr;
    a.h[0] = layer.h.data_ptr<float>();
    a.h[1] = a.h[0] + B * H;
    a.c = layer.c.data_ptr<float>();
    a.y = layer.y.data_ptr<float>() + t0 * B * H;
    a.y_stride = H;
    a.gates_out = nullptr;
    a.c_all = nullptr;
    a.partial = layer.partial.data_ptr<float>();
    a.chunk_bytes = chunk_bytes;
    for (int64_t s = 0; s < steps; ++s)
      for (int64_t u = 0; u < blocks; ++u) kernels->forward_block(a, s, u);
    // The next chunk starts from h[0].
    if (steps % 2 == 1) std::memcpy(a.h[0], a.h[1], B * H * sizeof(float));
  }

  // Claims and runs the first ready item; false if none was ready.
  bool run_one() {
    for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l) {
      Layer& layer = *layers[l];
      int64_t k = layer.claimed.load(std::memory_order_acquire);
      if (k >= chunks || layer.done.load(std::memory_order_acquire) != k) continue;  // running
      if (l > 0 && layers[l - 1]->done.load(std::memory_order_acquire) <= k) continue;  // no input
      if (!layer.claimed.compare_exchange_strong(k, k + 1, std::memory_order_acq_rel)) continue;
      run_item(l, k);
      layer.done.store(k + 1, std::memory_order_release);
      return true;
    }
    return false;
  }

  bool finished() const { return layers.back()->done.load(std::memory_order_acquire) == chunks; }

  void run(int threads) {
    const auto work = [&] {
      uint32_t idle = 0;
      while (!finished()) {
        if (run_one()) {
          idle = 0;
        } else if (++idle < 2048) {
          cpu_relax();
        } else {
          std::this_thread::yield();  // a helper holding the next item may need this core
        }
      }
    };
    if (threads <= 1) return work();
#pragma omp parallel num_threads(threads)
    work();
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> wavefront_forward(
    const at::Tensor& x_in, const at::Tensor& h0, const at::Tensor& c0, at::TensorList weights,
    int64_t num_layers, bool has_biases) {
  const int64_t per_layer = has_biases ? 4 : 2;
  TORCH_CHECK(x_in.dim() == 3 && h0.dim() == 3 && c0.dim() == 3,
              "lstm_fused: wavefront_forward takes x (T, B, I), h0 and c0 (L, B, H)");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "lstm_fused: wavefront_forward runs on float32 CPU tensors, got ", x_in.scalar_type(),
              " on ", x_in.device());
  TORCH_CHECK(num_layers >= 1 && static_cast<int64_t>(weights.size()) == num_layers * per_layer,
              "lstm_fused: wavefront_forward: expected ", num_layers * per_layer, " weights, got ",
              weights.size());
  const int64_t T = x_in.size(0), B = x_in.size(1), H = h0.size(2);
  check_shape(h0, {num_layers, B, H}, "h0");
  check_shape(c0, {num_layers, B, H}, "c0");
  check_same_device_dtype(x_in, h0, "h0");
  check_same_device_dtype(x_in, c0, "c0");

  const at::Tensor x = x_in.contiguous();
  const auto f32 = x.options();
  Stack stack;
  stack.kernels = &step_kernels(selected_isa());
  const int V = stack.kernels->vector_width;
  stack.T = T, stack.B = B, stack.H = H;
  stack.C = std::max<int64_t>(1, kChunkRows / std::max<int64_t>(1, B));
  stack.chunks = (T + stack.C - 1) / stack.C;
  stack.blocks = (H + V - 1) / V;
  stack.x = x.data_ptr<float>();
  stack.chunk_bytes = panel_chunk_bytes();
  for (int64_t l = 0; l < num_layers; ++l) {
    const at::Tensor* w = weights.data() + l * per_layer;
    const int64_t I = l == 0 ? x.size(2) : H;
    check_shape(w[0], {4 * H, I}, "w_ih");
    check_shape(w[1], {4 * H, H}, "w_hh");
    check_same_device_dtype(x, w[0], "w_ih");
    check_same_device_dtype(x, w[1], "w_hh");
    auto layer = std::make_unique<Layer>();
    layer->input_width = I;
    layer->w_ih_panels = packed_panels(w[0], PanelLayout::kForwardGates, V);
    layer->w_hh_panels = packed_panels(w[1], PanelLayout::kForwardGates, V);
    if (has_biases) {
      check_biases(x, w[2], w[3], H);
      layer->bias = gate_bias_panel(w[2], w[3], V);
    }
    layer->h = at::empty({2, B, H}, f32);
    layer->h[0].copy_(h0[l]);
    layer->c = c0[l].clone(at::MemoryFormat::Contiguous);
    layer->xproj = at::empty({stack.C, B, 4 * H}, f32);
    layer->partial = at::empty({stack.blocks, B, 4 * V}, f32);
    layer->y = at::empty({T, B, H}, f32);
    stack.layers.push_back(std::move(layer));
  }
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), num_layers));
  stack.run(threads);

  std::vector<at::Tensor> h_n, c_n;
  for (const auto& layer : stack.layers) {
    h_n.push_back(layer->h[0]);
    c_n.push_back(layer->c);
  }
  return {stack.layers.back()->y, at::stack(h_n), at::stack(c_n)};
}

}  // namespace lstm_fused::cpu

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("wavefront_forward", &lstm_fused::cpu::wavefront_forward);
}
