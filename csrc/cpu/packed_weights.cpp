// Panel packing and the cache of packed weights (see packed_weights.h).
#include "cpu/packed_weights.h"

#include "cpu/output_pool.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/cat.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

namespace lstm_fused::cpu {
namespace {

// Packing a weight splits over threads from this many bytes per thread.
constexpr int64_t kMinPackBytesPerThread = int64_t(256) << 10;

// One block's panel. Forward gates: the block's V rows of each gate, transposed so that input
// column k holds the 4 x V weights (gate, unit) in order; a tile of kTile columns of the V rows
// goes through a buffer, so that both the reads (kTile consecutive elements of each row) and the
// writes (V consecutive elements of each column) are runs. On a Zen 5 EPYC that packed a 4 MB
// float32 W in 0.41-0.43 ms on one thread, against 1.1-1.3 ms element by element down the
// columns and 0.72-0.75 ms along the rows. Backward columns: rows of 4V consecutive elements of
// W, copied.
template <typename scalar_t>
void pack_block(const scalar_t* src, int64_t H, int64_t K, PanelLayout layout, int V, int64_t b,
                scalar_t* panel) {
  if (layout == PanelLayout::kForwardGates) {
    constexpr int64_t kTile = 16;
    constexpr int kMaxV = 16;  // AVX-512's 16 floats, the widest vector of the step kernels
    TORCH_CHECK(V <= kMaxV, "lstm_fused: panels of vector width ", V, " are not supported");
    scalar_t tile[kTile][kMaxV];
    for (int64_t k0 = 0; k0 < K; k0 += kTile) {
      const int64_t n = std::min(kTile, K - k0);
      for (int64_t g = 0; g < 4; ++g) {
        for (int v = 0; v < V; ++v) {
          const int64_t j = b * V + v;
          if (j < H) {
            const scalar_t* row = src + (g * H + j) * K + k0;
            for (int64_t k = 0; k < n; ++k) tile[k][v] = row[k];
          } else {  // the last block's units past H
            for (int64_t k = 0; k < n; ++k) tile[k][v] = scalar_t(0);
          }
        }
        for (int64_t k = 0; k < n; ++k)
          std::memcpy(panel + ((k0 + k) * 4 + g) * V, tile[k], V * sizeof(scalar_t));
      }
    }
  } else {
    const int64_t width = 4 * V, j0 = b * width, n = std::min<int64_t>(width, K - j0);
    for (int64_t k = 0; k < 4 * H; ++k) {
      scalar_t* dst = panel + k * width;
      std::memcpy(dst, src + k * K + j0, n * sizeof(scalar_t));
      for (int64_t v = n; v < width; ++v) dst[v] = scalar_t(0);
    }
  }
}

// The panels of W (4H, K) in `layout`: `count` of them, `rows` rows of 4V elements each.
struct PanelShape {
  int64_t count, rows;
  PanelShape(PanelLayout layout, int64_t H, int64_t K, int V)
      : count(layout == PanelLayout::kForwardGates ? (H + V - 1) / V : (K + 4 * V - 1) / (4 * V)),
        rows(layout == PanelLayout::kForwardGates ? K : 4 * H) {}
};

// Every block, on ATen's threads where there is enough to copy (the repack after each optimizer
// step is on a training loop's path).
template <typename scalar_t>
void pack_typed(const at::Tensor& w, PanelLayout layout, int V, const PanelShape& shape, scalar_t* out) {
  const int64_t H = w.size(0) / 4, K = w.size(1);
  const scalar_t* src = w.data_ptr<scalar_t>();  // contiguous (4H, K)
  const int64_t panel_elements = shape.rows * 4 * V;
  const int64_t grain = std::max<int64_t>(1, kMinPackBytesPerThread / (panel_elements * int64_t(sizeof(scalar_t))));
  at::parallel_for(0, shape.count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) pack_block(src, H, K, layout, V, b, out + b * panel_elements);
  });
}

// bfloat16 panels pair consecutive rows of the reduction (see step_kernels.h): rows 2m and 2m + 1
// (4V elements each) become one row of 4V 32-bit words, word e = row 2m + 1's element e in the
// high half and row 2m's in the low half, so one shift and one mask widen a loaded vector into
// both rows. Rows come in pairs from each panel's start; a last odd row stays as it was.
void pair_rows(c10::BFloat16* panels, int64_t panel_count, int64_t rows, int V) {
  const int64_t width = 4 * V;
  std::vector<c10::BFloat16> pair(2 * width);
  for (int64_t p = 0; p < panel_count; ++p) {
    c10::BFloat16* panel = panels + p * rows * width;
    for (int64_t k = 0; k + 1 < rows; k += 2) {
      c10::BFloat16* even = panel + k * width;
      for (int64_t e = 0; e < width; ++e) {
        pair[2 * e] = even[e];              // low half of word e (little-endian)
        pair[2 * e + 1] = even[width + e];  // high half
      }
      std::memcpy(even, pair.data(), pair.size() * sizeof(c10::BFloat16));
    }
  }
}

at::Tensor pack(const at::Tensor& w_in, PanelLayout layout, int V) {
  const at::Tensor w = w_in.contiguous();
  const PanelShape shape(layout, w.size(0) / 4, w.size(1), V);
  // From the output pool: a training loop repacks every weight after each optimizer step, and the
  // panels the previous step's entry held are freed just before (see `cached`).
  at::Tensor out = pooled_empty({shape.count * shape.rows * 4 * V}, w.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "lstm_fused_pack", [&] {
    pack_typed<scalar_t>(w, layout, V, shape, out.data_ptr<scalar_t>());
  });
  if (w.scalar_type() == at::kBFloat16) pair_rows(out.data_ptr<c10::BFloat16>(), shape.count, shape.rows, V);
  return out;
}

// 64 elements spread over the tensor, hashed bytewise: changes when a write through `.data`
// touches any of them (a reinitialization or a loaded checkpoint does).
uint64_t fingerprint(const at::Tensor& w) {
  const at::Tensor c = w.contiguous();
  const auto* bytes = static_cast<const unsigned char*>(c.data_ptr());
  const int64_t n = c.numel(), size = c.element_size();
  uint64_t hash = 1469598103934665603ull;  // FNV-1a
  for (int64_t i = 0; i < 64 && n > 0; ++i) {
    const int64_t at = (n - 1) * i / 63;
    for (int64_t b = 0; b < size; ++b) hash = (hash ^ bytes[at * size + b]) * 1099511628211ull;
  }
  return hash;
}

// One weight an entry was packed from, as it was then.
struct Source {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> weight;
  const c10::TensorImpl* impl;
  const void* data;
  uint32_t version;
  at::ScalarType dtype;
  std::vector<int64_t> sizes, strides;
  uint64_t fingerprint;

  explicit Source(const at::Tensor& w)
      : weight(w.getIntrusivePtr()), impl(w.unsafeGetTensorImpl()), data(w.data_ptr()),
        version(w.unsafeGetTensorImpl()->version_counter().current_version()),
        dtype(w.scalar_type()), sizes(w.sizes().vec()), strides(w.strides().vec()),
        fingerprint(cpu::fingerprint(w)) {}

  bool same_as(const Source& now) const {
    return impl == now.impl && !weight.expired() && data == now.data && version == now.version &&
           dtype == now.dtype && sizes == now.sizes && strides == now.strides &&
           fingerprint == now.fingerprint;
  }
};

struct Entry {
  std::vector<Source> sources;
  PanelLayout layout;
  int V;
  at::Tensor panels;

  bool expired() const {
    for (const Source& s : sources)
      if (s.weight.expired()) return true;
    return false;
  }
  // Panels of the same tensors in the same layout: a match, or stale ones (the weights were
  // updated since), which never match again.
  bool same_weights(const std::vector<Source>& now, PanelLayout l, int v) const {
    if (layout != l || V != v || sources.size() != now.size()) return false;
    for (size_t i = 0; i < now.size(); ++i)
      if (sources[i].impl != now[i].impl) return false;
    return true;
  }
  bool matches(const std::vector<Source>& now, PanelLayout l, int v) const {
    if (!same_weights(now, l, v)) return false;
    for (size_t i = 0; i < now.size(); ++i)
      if (!sources[i].same_as(now[i])) return false;
    return true;
  }
};

// Least recently used first; bounded in entries and bytes (big weights pack fast enough, small
// ones are what streaming callers repeat).
constexpr size_t kMaxEntries = 16;
constexpr int64_t kMaxBytes = int64_t(64) << 20;

std::mutex cache_mutex;
std::list<Entry> cache;

// The panels of `weights` concatenated along dim 1, from the cache or packed now.
at::Tensor cached(const std::vector<at::Tensor>& weights, PanelLayout layout, int V) {
  const auto pack_now = [&] {
    return pack(weights.size() == 1 ? weights[0] : at::cat(weights, 1), layout, V);
  };
  int64_t bytes = 0;
  for (const at::Tensor& w : weights) {
    // Inference tensors have no version counter; weights of the autograd kind always do.
    if (w.is_inference()) return pack_now();
    bytes += static_cast<int64_t>(w.nbytes());
  }
  if (bytes > kMaxBytes) return pack_now();
  std::vector<Source> now;
  for (const at::Tensor& w : weights) now.emplace_back(w);
  std::lock_guard<std::mutex> lock(cache_mutex);
  for (auto it = cache.begin(); it != cache.end();) {
    if (it->expired()) {
      it = cache.erase(it);
    } else if (it->matches(now, layout, V)) {
      cache.splice(cache.end(), cache, it);  // most recently used last
      return cache.back().panels;
    } else if (it->same_weights(now, layout, V)) {
      it = cache.erase(it);  // stale: its block goes back to the pool before the repack below
    } else {
      ++it;
    }
  }
  at::Tensor panels = pack_now();
  cache.push_back(Entry{std::move(now), layout, V, panels});
  int64_t held = 0;
  for (const Entry& e : cache) held += static_cast<int64_t>(e.panels.nbytes());
  while (cache.size() > 1 && (cache.size() > kMaxEntries || held > kMaxBytes)) {
    held -= static_cast<int64_t>(cache.front().panels.nbytes());
    cache.pop_front();
  }
  return panels;
}

}  // namespace

at::Tensor packed_panels(const at::Tensor& w_hh, PanelLayout layout, int V) {
  return cached({w_hh}, layout, V);
}

at::Tensor packed_cell_panels(const at::Tensor& w_hh, const at::Tensor& w_ih, int V) {
  return cached({w_hh, w_ih}, PanelLayout::kForwardGates, V);
}

int64_t packed_cache_size() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return static_cast<int64_t>(cache.size());
}

void packed_cache_clear() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.clear();
}

}  // namespace lstm_fused::cpu
