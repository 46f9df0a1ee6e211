// The weight gradients of the CPU layers, dW = G^T X over all T*B rows (dW_ih: G = dxproj, X the
// layer's input; dW_hh: X = h_{t-1}), on the step kernels' register tiles (weight_grad_rows,
// step_kernels_impl.h) instead of ATen's GEMM where our own float32 products are chosen
// (own_gemm in isa.h: x86 CPUs not made by Intel, where ATen's float32 GEMM is MKL's);
// weight_grad_into makes that choice for every caller. On a
// 2-core Zen 5 EPYC MKL ran these transposed products at 157-191 GFLOP/s (M = 200..6400 rows,
// N = 512..2048, I = 128..512), 40% of the FMA peak our loops measure there (473 GFLOP/s).
//
// Work split: the rows of dW (the 4H gate columns of G) in tile-aligned pieces, claimed by the
// threads as they come; each piece reads all of X and its own columns of G, and packs both.

#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>

#include "checks.h"
#include "cpu/isa.h"
#include "cpu/output_pool.h"
#include "cpu/recurrence.h"
#include "cpu/step_kernels.h"

namespace lstm_fused::cpu {
namespace {

int64_t core_l1d_bytes() {
  static const int64_t bytes = [] {
    const long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    return l1 > 0 ? static_cast<int64_t>(l1) : int64_t(32) << 10;  // unknown: the least measured
  }();
  return bytes;
}

// Splitting pays from about this many multiply-adds per thread.
constexpr int64_t kMinMacsPerThread = int64_t(1) << 20;

// Each chunk of the reduction loads and stores every tile of the result once, so longer chunks
// pay, as long as X's chunk stays near the core. On the Zen 5 EPYC (48 KB L1, 1 MB L2), as a
// share of the FMA peak at M = 800..6400, N = 512..2048, I = 128..512, 2 threads: AVX-512 with
// 96-row chunks (X's chunk 24 KB) 58-75%, 192 rows (48 KB) 73-79%, 288 (72 KB) 76-81%, 576
// 72-75%, 768 70-72%; AVX2 with 192 rows (24 KB) 81-85%, 576 77-84%, 768 71-77%.
constexpr int64_t kMaxChunkRows = 192;

// Pieces per thread, and the fewest rows of dW in a piece: each piece packs all of X again, which
// small pieces do not amortize. Zen 5 EPYC, 2 threads, M = 6400, N = 256, I = 64: 289 GFLOP/s
// in 2 pieces against 258 in 8 (medians of 3 runs, noisy host); N = 512, I = 128 in 4 pieces
// against 8: 287 against 282; from N = 1024 (8 pieces either way) level.
constexpr int64_t kPiecesPerThread = 4;
constexpr int64_t kMinPieceRows = 128;

void check_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.stride(1) == 1,
              "lstm_fused: weight_grad takes 2-D float32 CPU tensors with contiguous rows; ", name,
              " is ", t.scalar_type(), " ", t.sizes(), " with strides ", t.strides(), " on ", t.device());
}

// out (+)= g^T x on our tiles, whatever own_gemm says (the op below tests them on every variant);
// g_sums (or null): N floats, g's column sums.
void own_weight_grad_into(const at::Tensor& g, const at::Tensor& x, at::Tensor& out, bool accumulate,
                          float* g_sums = nullptr) {
  check_operand(g, "g");
  check_operand(x, "x");
  check_operand(out, "out");
  const int64_t M = g.size(0), N = g.size(1), I = x.size(1);
  TORCH_CHECK(x.size(0) == M && out.size(0) == N && out.size(1) == I,
              "lstm_fused: weight_grad: g ", g.sizes(), " and x ", x.sizes(), " do not give out ", out.sizes());
  if (N == 0 || I == 0) {
    if (g_sums != nullptr) {
      at::Tensor sums = at::from_blob(g_sums, {N}, g.options());
      at::sum_out(sums, g, 0);
    }
    return;
  }
  const StepKernels& kernels = step_kernels(selected_isa());
  const int V = kernels.vector_width, tile_rows = kernels.tile_rows;
  WeightGradArgs a;
  a.M = M, a.N = N, a.I = I;
  a.g = g.data_ptr<float>(), a.ldg = g.stride(0);
  a.x = x.data_ptr<float>(), a.ldx = x.stride(0);
  a.out = out.data_ptr<float>(), a.ldo = out.stride(0);
  a.accumulate = accumulate;
  a.g_sums = g_sums;

  const int64_t tiles = (N + tile_rows - 1) / tile_rows;
  const int64_t macs = M * N * I;
  const int64_t threads = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), tiles, macs / kMinMacsPerThread}));
  // The rows go out in pieces, claimed by whichever thread is free: a thread descheduled for a
  // while (its core taken by another process) costs the call the piece it holds, not its whole
  // share. Up to kPiecesPerThread pieces per thread, but each packs X again (M x I floats against
  // M x I x piece rows multiply-adds), so pieces keep at least kMinPieceRows rows (N = 256 on two
  // threads: one piece each).
  const int64_t wanted_pieces =
      std::clamp<int64_t>(N / kMinPieceRows, threads, threads * kPiecesPerThread);
  const int64_t piece_tiles = (tiles + wanted_pieces - 1) / wanted_pieces;
  const int64_t pieces = (tiles + piece_tiles - 1) / piece_tiles;
  // X's chunk (k_chunk x 4V floats) fills at most the L1, and is at most kMaxChunkRows long; the
  // block's packed G^T (row_block x k_chunk) takes half of L2, and no more than a piece's rows.
  const int64_t l1_rows = core_l1d_bytes() / int64_t(sizeof(float)) / (4 * V) / 8 * 8;
  a.k_chunk = std::clamp<int64_t>(std::min(l1_rows, kMaxChunkRows), 8, std::max<int64_t>(8, M));
  const int64_t block_tiles = core_l2_bytes() / 2 / int64_t(sizeof(float)) / (a.k_chunk * tile_rows);
  a.row_block = std::clamp<int64_t>(block_tiles, 1, piece_tiles) * tile_rows;

  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::Tensor scratch = pooled_empty({weight_grad_scratch_floats(a, V)}, at::kFloat);
    for (int64_t p = next.fetch_add(1); p < pieces; p = next.fetch_add(1)) {
      const int64_t n0 = p * piece_tiles * tile_rows;
      kernels.weight_grad_rows(a, n0, std::min(N, n0 + piece_tiles * tile_rows), scratch.data_ptr<float>());
    }
  });
}

at::Tensor own_weight_grad(const at::Tensor& g, const at::Tensor& x) {
  check_operand(g, "g");
  check_operand(x, "x");
  at::Tensor out = at::empty({g.size(1), x.size(1)}, g.options());
  own_weight_grad_into(g, x, out, /*accumulate=*/false);
  return out;
}

}  // namespace

void weight_grad_into(const at::Tensor& g, const at::Tensor& x, at::Tensor& out, bool accumulate,
                      at::Tensor* g_sums) {
  if (g.scalar_type() == at::kFloat && own_gemm(GemmDtype::kFloat32)) {
    own_weight_grad_into(g, x, out, accumulate, g_sums != nullptr ? g_sums->data_ptr<float>() : nullptr);
    return;
  }
  if (accumulate) {
    out.addmm_(g.t(), x);
  } else {
    at::mm_out(out, g.t(), x);
  }
  if (g_sums != nullptr) at::sum_out(*g_sums, g, 0);
}

at::Tensor weight_grad(const at::Tensor& g, const at::Tensor& x, at::Tensor* g_sums) {
  at::Tensor out = pooled_empty({g.size(1), x.size(1)}, g.scalar_type());
  if (g_sums != nullptr) *g_sums = at::empty({g.size(1)}, g.options());
  weight_grad_into(g, x, out, /*accumulate=*/false, g_sums);
  return out;
}

}  // namespace lstm_fused::cpu

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("weight_grad", [](const at::Tensor& g, const at::Tensor& x) {
    return lstm_fused::cpu::own_weight_grad(g, x);
  });
}
