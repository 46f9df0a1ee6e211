// The SIMD step kernels of the CPU recurrence (no projection; float32 math; float32, bfloat16 or
// float16 storage), compiled once per instruction set (step_kernels_<isa>.cpp) from one source
// (step_kernels_impl.h). Torch-free: plain pointers and sizes, so the wide-vector translation
// units include nothing but these kernels.
//
// Both directions split a step into independent blocks of hidden units; a block multiplies the
// shared state by its packed panel of W_hh and applies the gate math to the product while it
// is still in registers (see step_kernels_impl.h). step_team.h runs the blocks of a step on the
// thread team and separates the steps.
#pragma once

#include <cstdint>

#include "cpu/isa.h"

namespace lstm_fused::cpu {

enum class Storage { kFloat, kBFloat16, kHalf };

// The panels below are described as rows of 4V elements, one row per k of the reduction. In
// bfloat16 they pair rows: rows 2m and 2m + 1 are stored as one row of 4V 32-bit words, word e
// holding row 2m + 1's element e in its high 16 bits and row 2m's in its low 16 bits (a last odd
// row stays plain). bf16 is the high half of a float32, so a vector of those words widens into
// both rows exactly with one mask and one shift (PairedBf16 in step_kernels_impl.h): half the
// instructions of widening 16-bit lanes one by one. Offsets are unchanged: row k still starts at
// element k * 4V for even k.

// Forward of one direction of one layer. Unit block u covers units [u*V, u*V + V) (the last
// one may be partial); its panel is (H, 4, V): for every input column k, the i, f, g, o weight
// rows of its V units, zero past H. Panels have the storage dtype (the weights' own values).
// A fused cell step (T = 1) reduces over [h | x] with panels of [W_hh | W_ih]: K = H + I.
// B is the rows this call runs; batch is the rows of the (T, batch, ...) tensors per step (a
// call may run a slice of the batch, its pointers offset to the slice's first row).
struct ForwardStepArgs {
  int64_t T, B, H, batch;
  int64_t K;              // reduction length = row stride of h: H, or H + I for a fused cell
  int64_t xproj_stride;   // between the rows of xproj: 4H, or 0 (one bias row for all)
  Storage storage;
  bool reverse, save;
  const void* xproj;      // (T, B, 4H) storage dtype: x @ W_ih^T + biases
  const void* panels;     // ceil(H / V) panels of H * 4 * V elements, storage dtype
  const int64_t* lengths; // (B,) or null
  float* h[2];            // (B, K) each: h of even / odd steps (double-buffered across threads);
                          // a fused cell keeps x in columns [H, H + I) of h[0]
  float* c;               // (B, H)
  void* y;                // (T, B, H) storage dtype, rows y_stride apart
  int64_t y_stride;       // between the rows of y: H, or 2H for one direction of a
                          // bidirectional layer writing its half of the layer's output
  void* gates_out;        // (T, B, 4H) storage dtype, activated gates, or null (inference)
  float* c_all;           // (T, B, H) cell state after each step, or null (inference)
  float* partial;         // (blocks, B, 4V): each block's sums between chunks of the reduction
  int64_t chunk_bytes;    // panel bytes per chunk of the reduction, or 0: no chunks
};

// Backward of the same. Column block q covers units [q*4V, q*4V + 4V); its panel is (4H, 4V):
// W_hh[:, those units], zero past H, in the storage dtype. The backward runs T + 1 synchronized steps:
//   step T-1:      gate gradients from dh_n (no product),
//   steps T-2..0:  dh = dz_{s+1} @ W_hh, then the gate gradients of step s,
//   then kFinal:   dh0 = dz_0 @ W_hh.
struct BackwardStepArgs {
  int64_t T, B, H, batch;  // B and batch as in ForwardStepArgs
  Storage storage;
  bool reverse;
  const void* dy;          // (T, B, H) storage dtype, rows dy_stride apart (H or 2H, as y)
  int64_t dy_stride;
  const void* gates;       // (T, B, 4H) storage dtype, saved by the forward
  const float* c_all;      // (T, B, H)
  const float* c0;         // (B, H)
  const void* panels;      // ceil(H / 4V) panels of 4H * 4V elements, storage dtype
  const int64_t* lengths;  // (B,) or null
  float* dh;               // (B, H) gradient reaching h from later steps; starts as dh_n
  float* dc;               // (B, H) starts as dc_n
  float* dz[2];            // (B, 4H) each, 16-bit storage: pre-activation gate gradients of
                           // even / odd steps in float32 (dxproj holds them rounded); null for
                           // float32, whose product reads them back from dxproj
  void* dxproj;            // (T, B, 4H) storage dtype
  float* partial;          // (blocks, B, 4V): each block's sums between chunks of the reduction
  int64_t chunk_bytes;     // panel bytes per chunk of the reduction, or 0: no chunks
};

enum class BackwardPhase { kFirst, kStep, kFinal };

// The T*B-row products around the recurrence of a layer, out = A @ panels (+ bias), by the
// forward's tile product: R rows of A times one block's panel (K x 4V, k-major) into R x 4V
// outputs. A and the bias are float32; panels and out have the storage dtype (16-bit panels widen
// exactly on load, the float32 sums are rounded once on store). Columns of a block's 4 vectors in
// out: gate layout (vector q at q * H + block * V: the input projection, whose panels are W_ih in
// the forward layout) or contiguous (block * 4V + q * V: dx = dxproj @ W_ih with W_ih's
// backward-column panels).
struct PanelProductArgs {
  int64_t K;              // reduction length
  Storage storage;        // of panels and out
  const float* a;         // rows of A, stride lda
  int64_t lda;
  const void* panels;     // block b's panel at panels + b * panel_stride, k at + k * 4V
  int64_t panel_stride;
  const float* bias;      // (blocks, 4, V) or null
  void* out;              // row m at out + m * ldo
  int64_t ldo;
  int64_t columns;        // gate layout: H; contiguous: the width of out (columns past it unset)
  bool gate_layout;
};

// The weight gradients of a layer, out (N, I) = G^T X (or out += G^T X), a reduction over the
// M = T*B rows: G (M, N) the gate gradients (dxproj), X (M, I) what the weights multiplied (the
// layer's input for dW_ih, h_{t-1} for dW_hh), all float32. Rows [n0, n1) of out are computed as
// register tiles of tile_rows rows of out x 4V columns (fewer vectors in a narrow last chunk of
// columns), blocked for the caches as a GEMM is (step_kernels_impl.h, weight_grad_rows): per
// chunk of k_chunk rows of M, the rows of G^T that feed a block of row_block rows of out are
// packed k-major (L2), and for each 4V columns of X the chunk's k_chunk x 4V floats are packed
// once (L1) and serve every tile of the block.
struct WeightGradArgs {
  int64_t M, N, I;
  const float* g;      // row m at g + m * ldg
  int64_t ldg;
  const float* x;      // row m at x + m * ldx
  int64_t ldx;
  float* out;          // row n at out + n * ldo
  int64_t ldo;
  bool accumulate;     // out += G^T X instead of out = G^T X
  float* g_sums;       // or null: G's column sums over the M rows, written for the rows of out
                       // a call covers (the bias gradient, read off G while it is packed)
  int64_t k_chunk;     // rows of M per chunk (X's packed chunk: k_chunk * 4V floats)
  int64_t row_block;   // rows of out per block, a multiple of tile_rows
};

struct StepKernels {
  Isa isa;
  int vector_width;  // V: floats per vector register
  int tile_rows;     // rows of a register tile (batch rows; weight-gradient rows of out)
  void (*forward_block)(const ForwardStepArgs&, int64_t s, int64_t unit_block);
  void (*backward_block)(const BackwardStepArgs&, int64_t s, int64_t column_block, BackwardPhase);
  // Rows [m0, m1) of out, the columns of block b.
  void (*panel_product)(const PanelProductArgs&, int64_t b, int64_t m0, int64_t m1);
  // Rows [n0, n1) of WeightGradArgs::out. scratch: weight_grad_scratch_floats(args, V) floats,
  // the calling thread's own.
  void (*weight_grad_rows)(const WeightGradArgs&, int64_t n0, int64_t n1, float* scratch);
};

// The packing buffers of weight_grad_rows: row_block x k_chunk floats of G^T, k_chunk x 4V of X.
inline int64_t weight_grad_scratch_floats(const WeightGradArgs& a, int V) {
  return a.row_block * a.k_chunk + a.k_chunk * 4 * V;
}

// The kernels of a supported variant (see isa.h for the choice).
const StepKernels& step_kernels(Isa isa);

// Per-ISA tables, defined in step_kernels_<isa>.cpp (the x86 ones only on x86-64).
const StepKernels& step_kernels_generic();
const StepKernels& step_kernels_avx2();
const StepKernels& step_kernels_avx512();
const StepKernels& step_kernels_avx512bf16();
// avx512bf16 with the bf16 dot product in tiles of several rows too (bf16_dot_all_rows, isa.h).
const StepKernels& step_kernels_avx512bf16_rows();

}  // namespace lstm_fused::cpu
