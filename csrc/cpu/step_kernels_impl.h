// Body of the CPU step kernels, compiled once per instruction set. Included by
// step_kernels_<isa>.cpp inside a namespace of its own, after that file has defined
//   struct Vec  { using reg; kWidth; zero, load, load_even, load_odd, store, broadcast, add, fma;
//                 kBf16Dot; kVectorGates }  (one SIMD register; load_even/odd: paired bf16 rows;
//                                           kBf16Dot: it has the bf16 pair dot product, and with it
//                                           pairs, load_pairs, broadcast_pair, dot_pairs,
//                                           round_to_bf16: see dot_row_product; kVectorGates: it
//                                           has sub, mul, div, exp_clamp, exp_round, exp_scale:
//                                           see vector_gates and vector_exp)
//   constexpr int kMaxRows;                 rows of a register tile
// and switched the compiler's target to the instruction set. Include no header here: anything
// defined under the wider target must stay in this file's namespace, so the linker can never
// hand another translation unit a copy compiled for a CPU it may not have.
//
// The register tile. A tile is kRows batch rows x 4 vectors of accumulators:
//   forward:  the i, f, g, o pre-activations of V units (one unit block);
//   backward: dh of 4V consecutive units (one column block).
// Its panel holds, for every k of the reduction, those 4 vectors of weights contiguously, so the
// inner loop is: broadcast A[r][k] for each row, load 4 weight vectors, kRows x 4 FMAs. One pass
// over the panel per tile; the panel (H*4V weights forward, 4H*4V backward, in the storage dtype)
// is re-read for each row tile of the batch, from the L2 of the thread that owns the block.
// After the reduction the gate math runs on the accumulators: on the registers themselves
// (vector_gates) where Vec has the primitives, else spilled once to a 4V-float stack tile in L1
// so plain loops can vectorize it. No gate pre-activation goes through a shared scratch buffer.

using reg = typename Vec::reg;
constexpr int V = Vec::kWidth;

inline float load_f(const float* p) { return *p; }
inline float load_f(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline float load_f(const c10::Half* p) { return static_cast<float>(*p); }
template <typename scalar_t>
inline scalar_t store_as(float v) { return static_cast<scalar_t>(v); }

inline bool row_active(const int64_t* lengths, int64_t b, int64_t t) {
  return lengths == nullptr || t < lengths[b];
}
inline int64_t time_of(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

// Asks for the panel bytes [p + kPrefetchBytes, + n) in L1, for tiles of several rows. Timed
// alone on the Intel Xeon (AVX-512, K = 512, float32), the hardware prefetchers left the 6-row
// tile at 80% of its rate from L1 with the panel in L2, and at 62% with 1.8 MB of panels in the
// 2 MB L2; prefetching 4 KB ahead gave 91% and 78%. In the recurrence op less shows (T = 100,
// B = 64, H = 512: 396-421 against 416-434 us a step). One-row tiles have none: their loads are
// the bottleneck, and the prefetches cost 5-8% there (B = 1, H = 128). Beyond a panel's end they
// touch the next panel, or nothing: prefetches never fault.
constexpr int64_t kPrefetchBytes = 4096;
template <int64_t n>
inline void prefetch_ahead(const void* p) {
  const char* ahead = static_cast<const char*>(p) + kPrefetchBytes;
  for (int64_t line = 0; line < n; line += 64) __builtin_prefetch(ahead + line, 0, 3);
}

// tile_product (below) for one row of A over paired bf16 rows, with the ISA's pair dot product:
// lane e of a dot adds A[k] * W[k][e] + A[k + 1] * W[k + 1][e], both operands bf16, the sums
// float32. The row of A is rounded to bf16 first (to nearest even), a piece at a time into a
// stack buffer, whose 32-bit words are then the same (k, k + 1) pairs as the panel's. That rounds
// h (forward) and dz (backward) for the product, as nn.LSTM's bf16 products do (its h is bf16);
// the panel products' A (x, dxproj) hold bf16 values already and round exactly. Returns the k it
// covered: every pair (a last odd row is the caller's). D is Vec, a template parameter so that
// ISAs without the dot product never compile this.
// One row: a row streams the panel with few instructions per byte, where the dot's half count
// of instructions pays (Intel Xeon with AVX512-BF16, bf16 recurrence at H = 512, against the
// widening path: T = 200, B = 1 2.6-2.7 against 2.9-3.2 ms). Tiles of several rows are bound by
// the arithmetic. On that Xeon the dots ran there at well under half the rate of float32 FMAs
// (T = 200: B = 2 4.8 against 4.1 ms, B = 6 12.7 against 8.7 ms; T = 100, B = 64: 68 against
// 46 ms), so several rows widen the panel as other ISAs do; on a Zen 5 EPYC the dots were
// 1.4-1.7x faster there (T = 100, B = 64, H = 512: forward 20-22 against 33-36 ms), so on such
// CPUs they use dot_rows_product (Vec::kBf16DotRows; bf16_dot_all_rows in isa.h).
template <typename D>
inline int64_t dot_row_product(const float* __restrict__ A, int64_t K,
                               const c10::BFloat16* __restrict__ panel, reg (&acc)[4]) {
  constexpr int64_t kPiece = 256;  // k rounded at a time: 512 bytes on the stack
  alignas(64) c10::BFloat16 a16[kPiece];
  // 4 chains of dots are too few to cover their latency: a second set of sums takes every
  // other pair.
  reg odd[4] = {D::zero(), D::zero(), D::zero(), D::zero()};
  const auto pair = [&](int64_t m, const c10::BFloat16* p, reg (&sums)[4]) {
    const typename D::pairs a = D::broadcast_pair(a16 + m);
    for (int q = 0; q < 4; ++q) sums[q] = D::dot_pairs(a, D::load_pairs(p + 2 * q * V), sums[q]);
  };
  const int64_t paired = K - K % 2;
  for (int64_t k0 = 0; k0 < paired; k0 += kPiece) {
    const int64_t n = paired - k0 < kPiece ? paired - k0 : kPiece;
    D::round_to_bf16(A + k0, n, a16);
    const c10::BFloat16* p = panel + k0 * 4 * V;
    int64_t m = 0;
    for (; m + 4 <= n; m += 4) {
      pair(m, p + m * 4 * V, acc);
      pair(m + 2, p + (m + 2) * 4 * V, odd);
    }
    if (m < n) pair(m, p + m * 4 * V, acc);
  }
  for (int q = 0; q < 4; ++q) acc[q] = D::add(acc[q], odd[q]);
  return paired;
}

// dot_row_product for R rows of A (lda apart): each row rounded to bf16 a piece at a time, then
// per pair of k, R broadcast pairs, 4 loads of paired weights and R x 4 dots (R x 4 chains
// cover the dots' latency without a second set of sums).
template <typename D, int R>
inline int64_t dot_rows_product(const float* __restrict__ A, int64_t lda, int64_t K,
                                const c10::BFloat16* __restrict__ panel, reg (&acc)[R][4]) {
  constexpr int64_t kPiece = 128;  // k rounded at a time: R x 256 bytes on the stack
  alignas(64) c10::BFloat16 a16[R][kPiece];
  const int64_t paired = K - K % 2;
  for (int64_t k0 = 0; k0 < paired; k0 += kPiece) {
    const int64_t n = paired - k0 < kPiece ? paired - k0 : kPiece;
    for (int r = 0; r < R; ++r) D::round_to_bf16(A + r * lda + k0, n, a16[r]);
    const c10::BFloat16* p = panel + k0 * 4 * V;
    for (int64_t m = 0; m < n; m += 2) {
      typename D::pairs a[R];
      for (int r = 0; r < R; ++r) a[r] = D::broadcast_pair(a16[r] + m);
      for (int q = 0; q < 4; ++q) {
        const typename D::pairs w = D::load_pairs(p + m * 4 * V + 2 * q * V);
        for (int r = 0; r < R; ++r) acc[r][q] = D::dot_pairs(a[r], w, acc[r][q]);
      }
    }
  }
  return paired;
}

// acc[r][q] += sum_k A[r * lda + k] * W[k][q * V + lane], r < R, k < K, where row k of the
// panel is W[k] (panel + k * 4V; bf16 rows paired, see step_kernels.h). Panels of 16-bit
// weights stay 16-bit (half the bytes streamed per step) and widen exactly on load, or, for a
// single row of bf16 where the ISA has its dot product (of every tile where Vec::kBf16DotRows),
// meet A rounded to bf16 (dot_row_product, dot_rows_product).
// Q < 4: only the panel's first Q vectors are multiplied (a narrow last block of a contiguous
// product); float32 panels only.
template <int R, typename panel_t, int Q = 4>
inline void tile_product(const float* __restrict__ A, int64_t lda, int64_t K,
                         const panel_t* __restrict__ panel, reg (&acc)[R][4]) {
  static_assert(Q == 4 || std::is_same_v<panel_t, float>, "narrow tiles are float32 only");
  int64_t k = 0;
  if constexpr (std::is_same_v<panel_t, c10::BFloat16> && Vec::kBf16Dot && R == 1) {
    k = dot_row_product<Vec>(A, K, panel, acc[0]);
  } else if constexpr (std::is_same_v<panel_t, c10::BFloat16> && Vec::kBf16DotRows) {
    k = dot_rows_product<Vec, R>(A, lda, K, panel, acc);
  } else if constexpr (std::is_same_v<panel_t, c10::BFloat16> && R == 1) {
    // Paired rows (step_kernels.h): each load of 2V bf16 widens into rows k and k + 1; a last
    // odd row is plain and left to the loop at the end. The odd rows get a second set of sums
    // (one row's 4 chains are too few to hide the FMA latency).
    reg odd[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
    for (; k + 1 < K; k += 2) {
      const panel_t* p = panel + k * 4 * V;
      const reg a0 = Vec::broadcast(A[k]), a1 = Vec::broadcast(A[k + 1]);
      for (int q = 0; q < 4; ++q) {
        acc[0][q] = Vec::fma(a0, Vec::load_even(p + 2 * q * V), acc[0][q]);
        odd[q] = Vec::fma(a1, Vec::load_odd(p + 2 * q * V), odd[q]);
      }
    }
    for (int q = 0; q < 4; ++q) acc[0][q] = Vec::add(acc[0][q], odd[q]);
  } else if constexpr (std::is_same_v<panel_t, c10::BFloat16>) {
    // Several rows: row k for every vector, then row k + 1 (the pair's words are reloaded from
    // L1), so only one set of R broadcasts is live beside the accumulators: on AVX2, 3 rows
    // x 4 vectors of sums + 3 broadcasts + 1 weight vector fill the 16 registers.
    for (; k + 1 < K; k += 2) {
      const panel_t* p = panel + k * 4 * V;
      reg a[R];
      for (int r = 0; r < R; ++r) a[r] = Vec::broadcast(A[r * lda + k]);
      for (int q = 0; q < 4; ++q) {
        const reg w = Vec::load_even(p + 2 * q * V);
        for (int r = 0; r < R; ++r) acc[r][q] = Vec::fma(a[r], w, acc[r][q]);
      }
      for (int r = 0; r < R; ++r) a[r] = Vec::broadcast(A[r * lda + k + 1]);
      for (int q = 0; q < 4; ++q) {
        const reg w = Vec::load_odd(p + 2 * q * V);
        for (int r = 0; r < R; ++r) acc[r][q] = Vec::fma(a[r], w, acc[r][q]);
      }
    }
  } else if constexpr (R == 1) {
    // One row gives only 4 independent FMA chains, too few to hide the FMA latency: keep a
    // second set of sums for odd k.
    reg odd[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
    for (; k + 1 < K; k += 2) {
      const panel_t* p = panel + k * 4 * V;
      const reg a0 = Vec::broadcast(A[k]), a1 = Vec::broadcast(A[k + 1]);
      for (int q = 0; q < Q; ++q) acc[0][q] = Vec::fma(a0, Vec::load(p + q * V), acc[0][q]);
      for (int q = 0; q < Q; ++q) odd[q] = Vec::fma(a1, Vec::load(p + 4 * V + q * V), odd[q]);
    }
    for (int q = 0; q < Q; ++q) acc[0][q] = Vec::add(acc[0][q], odd[q]);
  }
  for (; k < K; ++k) {
    const panel_t* p = panel + k * 4 * V;
    prefetch_ahead<4 * V * sizeof(panel_t)>(p);
    reg a[R];
    for (int r = 0; r < R; ++r) a[r] = Vec::broadcast(A[r * lda + k]);
    for (int q = 0; q < Q; ++q) {
      const reg w = Vec::load(p + q * V);
      for (int r = 0; r < R; ++r) acc[r][q] = Vec::fma(a[r], w, acc[r][q]);
    }
  }
}

// The reduction in chunks of k when the batch takes several row tiles and the driver asks for
// chunks (chunk_bytes > 0, about half the L1; off by default, see panel_recurrence.cpp): each
// chunk of the panel then serves every row tile from L1 instead of being streamed from L2 once
// per row tile. Sums between chunks wait in the block's `partial` rows (B x 4V floats).
template <typename panel_t>
inline int64_t chunk_length(int64_t B, int64_t K, int64_t chunk_bytes) {
  if (B <= kMaxRows || chunk_bytes <= 0) return K;
  int64_t k = chunk_bytes / (4 * V * static_cast<int64_t>(sizeof(panel_t)));
  // Paired bf16 rows (step_kernels.h) must not be split between chunks.
  if constexpr (std::is_same_v<panel_t, c10::BFloat16>) k = k < 2 ? 2 : k - k % 2;
  return k < 1 ? 1 : k < K ? k : K;
}

// Rows [b0, b0 + R) over k in [k0, k1): starts from zero or from the previous chunk's sums.
template <int R, typename panel_t>
inline void chunk_product(const float* __restrict__ A, int64_t lda, const panel_t* __restrict__ panel,
                          int64_t k0, int64_t k1, const float* __restrict__ partial, reg (&acc)[R][4]) {
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = k0 == 0 ? Vec::zero() : Vec::load(partial + r * 4 * V + q * V);
  tile_product<R>(A + k0, lda, k1 - k0, panel + k0 * 4 * V, acc);
}

template <int R>
inline void save_partial(float* __restrict__ partial, const reg (&acc)[R][4]) {
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) Vec::store(partial + r * 4 * V + q * V, acc[r][q]);
}

// Calls body.template run<R>(b0) for row tiles covering [0, B): full tiles of kMaxRows,
// then one tile of the remainder (the layout weight_grad_rows packs G^T in).
template <int R, typename Body>
inline void tile_rows_remainder(int64_t rows, int64_t b0, Body& body) {
  if constexpr (R > 0) {
    if (rows == R) body.template run<R>(b0);
    else tile_rows_remainder<R - 1>(rows, b0, body);
  }
}
template <typename Body>
inline void for_each_full_row_tile(int64_t B, Body& body) {
  int64_t b0 = 0;
  for (; b0 + kMaxRows <= B; b0 += kMaxRows) body.template run<kMaxRows>(b0);
  if (b0 < B) tile_rows_remainder<kMaxRows - 1>(B - b0, b0, body);
}

// Row tiles covering [0, B) for the products that stream their panel once per tile (the
// recurrence steps, the panel products): the fewest tiles, the rows spread evenly over them
// (B = 32 on 6-row tiles: 6, 6, 5, 5, 5, 5, not 6, 6, 6, 6, 6, 2). A narrow tile costs nearly
// as much as a full one, being bound by its panel loads rather than its multiply-adds. One
// thread of a Zen 5 EPYC, float32, recurrence forward / backward (ms): T = 50, H = 128, B = 32
// 1.25 / 1.06-1.10 against 1.28-1.32 / 1.12-1.13; B = 13 0.52 / 0.46 against 0.53-0.56 / 0.50;
// T = 100, B = 20 forward 1.66-1.76 against 1.82-1.93. Where an even split would leave tiles
// of fewer than kMinEvenTileRows rows (AVX2's 3-row tiles), full tiles and a remainder stay:
// the AVX2 kernels on the same machine, T = 200, B = 4, H = 256, forward 5.3-5.5 ms as 3 + 1
// against 6.5-7.8 as 2 + 2; T = 100, B = 7, H = 128, 1.19-1.23 as 3 + 3 + 1 against 1.24-1.29.
// One call site of the tile bodies, whichever split: with a second (a fallback calling
// for_each_full_row_tile) GCC inlined them differently and the forward recurrence ran 4.5x
// slower (B = 32, H = 128: 5.7 against 1.3 ms; forcing the tile product inline won most back).
constexpr int64_t kMinEvenTileRows = 3;
template <typename Body>
inline void for_each_row_tile(int64_t B, Body& body) {
  const int64_t tiles = (B + kMaxRows - 1) / kMaxRows;
  if (tiles == 0) return;
  const int64_t rows = B / tiles, longer = B % tiles;  // the first `longer` tiles take rows + 1
  const bool even = rows >= kMinEvenTileRows;
  for (int64_t i = 0, b0 = 0; i < tiles; ++i) {
    const int64_t n = even ? rows + (i < longer ? 1 : 0) : (B - b0 < kMaxRows ? B - b0 : kMaxRows);
    tile_rows_remainder<kMaxRows>(n, b0, body);
    b0 += n;
  }
}

// ------------------------------------------------------------------------------------------
// Forward

// Gates, c and h of n units of one row. z: the 4 x V product tile; xp, gates_out: gate q of
// unit j at q * H + j.
template <typename scalar_t, bool kSave>
inline void forward_gates(int64_t n, int64_t H, const float (&z)[4][V], const scalar_t* __restrict__ xp,
                          float* __restrict__ c, float* __restrict__ h_next, scalar_t* __restrict__ y,
                          scalar_t* __restrict__ gates_out, float* __restrict__ c_all) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float i = sigmoid(load_f(xp + j) + z[0][j]);
    const float f = sigmoid(load_f(xp + H + j) + z[1][j]);
    const float g = tanh_act(load_f(xp + 2 * H + j) + z[2][j]);
    const float o = sigmoid(load_f(xp + 3 * H + j) + z[3][j]);
    const float c_new = f * c[j] + i * g;
    const float h_new = o * tanh_act(c_new);
    c[j] = c_new;
    h_next[j] = h_new;
    y[j] = store_as<scalar_t>(h_new);
    if constexpr (kSave) {
      gates_out[j] = store_as<scalar_t>(i);
      gates_out[H + j] = store_as<scalar_t>(f);
      gates_out[2 * H + j] = store_as<scalar_t>(g);
      gates_out[3 * H + j] = store_as<scalar_t>(o);
      c_all[j] = c_new;
    }
  }
}

// forward_gates for a whole block of float32 (n == V), on the tile's accumulators in registers,
// where the ISA has the vector primitives (Vec::kVectorGates: see vector_exp). The functions
// of activations.h, sigmoid(x) = 1 / (1 + e^-x) and tanh(x) = 2 / (1 + e^-2x) - 1, with the same
// results inside e^x's finite range (AVX2: everywhere). GCC's vectorization of forward_gates
// compiles its clamps to compares and masked moves and reloads its constants on every call:
// about 175 instructions a row of an AVX-512 block, where its own exp (vscalefps) needs about
// 100; and the product tile is no longer spilled to the stack and read back. The forward
// recurrence op on a Zen 5 EPYC, T = 50, calls of the two ways alternated (median ratio of 60
// pairs): AVX-512, one thread, B = 32, H = 128 0.956x the time with saved activations, 0.965x
// without; two threads B = 64, H = 128 0.960x, B = 128, H = 256 0.986x. AVX2 (forced there), one
// thread, B = 16, H = 256, four rounds of processes alternated: 4.37-4.44 against 4.54-4.59 ms
// with saved activations, 4.24-4.39 against 4.32-4.39 without (one outlier round left out).
// e^x on a register: the ISA clamps x, rounds n = round(x log2 e) and applies 2^n (Vec::exp_clamp,
// exp_round, exp_scale); the reduction r = x - n ln 2 and the polynomial are activations.h's.
template <typename D>
inline reg vector_exp(reg x) {
  using namespace exp_consts;
  x = D::exp_clamp(x);
  const reg n = D::exp_round(x);
  reg r = D::fma(n, D::broadcast(-kLn2Hi), x);
  r = D::fma(n, D::broadcast(kLn2Lo), r);
  const reg r2 = D::mul(r, r);
  reg p = D::broadcast(kPoly[0]);
  for (int i = 1; i < 6; ++i) p = D::fma(p, r, D::broadcast(kPoly[i]));
  p = D::add(D::fma(p, r2, r), D::broadcast(1.0f));
  return D::exp_scale(p, n);
}
template <typename D>
inline reg vector_sigmoid(reg x) {
  const reg one = D::broadcast(1.0f);
  return D::div(one, D::add(one, vector_exp<D>(D::sub(D::zero(), x))));
}
template <typename D>
inline reg vector_tanh(reg x) {
  const reg one = D::broadcast(1.0f);
  const reg e = vector_exp<D>(D::mul(D::broadcast(-2.0f), x));
  return D::sub(D::div(D::broadcast(2.0f), D::add(one, e)), one);
}
template <typename D, bool kSave>
inline void vector_gates(const reg (&z)[4], int64_t H, const float* __restrict__ xp,
                         float* __restrict__ c, float* __restrict__ h_next, float* __restrict__ y,
                         float* __restrict__ gates_out, float* __restrict__ c_all) {
  const reg i = vector_sigmoid<D>(D::add(D::load(xp), z[0]));
  const reg f = vector_sigmoid<D>(D::add(D::load(xp + H), z[1]));
  const reg g = vector_tanh<D>(D::add(D::load(xp + 2 * H), z[2]));
  const reg o = vector_sigmoid<D>(D::add(D::load(xp + 3 * H), z[3]));
  const reg c_new = D::fma(f, D::load(c), D::mul(i, g));
  const reg h_new = D::mul(o, vector_tanh<D>(c_new));
  D::store(c, c_new);
  D::store(h_next, h_new);
  D::store(y, h_new);
  if constexpr (kSave) {
    D::store(gates_out, i);
    D::store(gates_out + H, f);
    D::store(gates_out + 2 * H, g);
    D::store(gates_out + 3 * H, o);
    D::store(c_all, c_new);
  }
}

template <typename scalar_t, bool kSave>
struct ForwardTile {
  const ForwardStepArgs& a;
  int64_t t, j0, n;
  const float* h_cur;
  float* h_next;
  const scalar_t* panel;
  float* partial;  // (B, 4V)
  int64_t k0 = 0, k1 = 0;

  template <int R>
  void run(int64_t b0) {
    const int64_t H = a.H, K = a.K;
    if (k1 == K) {
      // The epilogue's x-projection rows (4 cache lines a row, 4 KB and more apart, read once)
      // are requested now and arrive while the product runs.
      const scalar_t* xproj = static_cast<const scalar_t*>(a.xproj);
      for (int r = 0; r < R; ++r)
        for (int q = 0; q < 4; ++q)
          __builtin_prefetch(xproj + (t * a.batch + b0 + r) * a.xproj_stride + q * H + j0, 0, 3);
    }
    reg acc[R][4];
    chunk_product<R>(h_cur + b0 * K, K, panel, k0, k1, partial + b0 * 4 * V, acc);
    if (k1 < K) return save_partial<R>(partial + b0 * 4 * V, acc);
    for (int r = 0; r < R; ++r) {
      const int64_t b = b0 + r, row = t * a.batch + b;
      float* c = a.c + b * H + j0;
      float* hn = h_next + b * K + j0;
      scalar_t* y = static_cast<scalar_t*>(a.y) + row * a.y_stride + j0;
      scalar_t* gates_out = kSave ? static_cast<scalar_t*>(a.gates_out) + row * 4 * H + j0 : nullptr;
      float* c_all = kSave ? a.c_all + row * H + j0 : nullptr;
      if (!row_active(a.lengths, b, t)) {  // padding: state carried, output zero
        const float* hc = h_cur + b * K + j0;
        for (int64_t j = 0; j < n; ++j) {
          hn[j] = hc[j];
          y[j] = store_as<scalar_t>(0.0f);
        }
        if constexpr (kSave) {
          for (int64_t j = 0; j < n; ++j) {
            for (int q = 0; q < 4; ++q) gates_out[q * H + j] = store_as<scalar_t>(0.0f);
            c_all[j] = c[j];
          }
        }
        continue;
      }
      const scalar_t* xp = static_cast<const scalar_t*>(a.xproj) + row * a.xproj_stride + j0;
      if constexpr (Vec::kVectorGates && std::is_same_v<scalar_t, float>) {
        if (n == V) {
          vector_gates<Vec, kSave>(acc[r], H, xp, c, hn, y, gates_out, c_all);
          continue;
        }
      }
      alignas(64) float z[4][V];
      for (int q = 0; q < 4; ++q) Vec::store(z[q], acc[r][q]);
      // A constant trip count for whole blocks lets the loop compile to straight vector code.
      if (n == V) forward_gates<scalar_t, kSave>(V, H, z, xp, c, hn, y, gates_out, c_all);
      else forward_gates<scalar_t, kSave>(n, H, z, xp, c, hn, y, gates_out, c_all);
    }
  }
};

template <typename scalar_t>
void forward_block_typed(const ForwardStepArgs& a, int64_t s, int64_t u) {
  const int64_t t = time_of(s, a.T, a.reverse);
  const int64_t j0 = u * V, n = a.H - j0 < V ? a.H - j0 : V;
  const scalar_t* panel = static_cast<const scalar_t*>(a.panels) + u * a.K * 4 * V;
  const float* h_cur = a.h[s % 2];
  float* h_next = a.h[(s + 1) % 2];
  float* partial = a.partial + u * a.B * 4 * V;
  const int64_t kc = chunk_length<scalar_t>(a.B, a.K, a.chunk_bytes);
  const auto chunks = [&](auto& tile) {
    for (int64_t k0 = 0; k0 < a.K; k0 += kc) {
      tile.k0 = k0;
      tile.k1 = a.K - k0 < kc ? a.K : k0 + kc;
      for_each_row_tile(a.B, tile);
    }
  };
  if (a.save) {
    ForwardTile<scalar_t, true> tile{a, t, j0, n, h_cur, h_next, panel, partial};
    chunks(tile);
  } else {
    ForwardTile<scalar_t, false> tile{a, t, j0, n, h_cur, h_next, panel, partial};
    chunks(tile);
  }
}

void forward_block(const ForwardStepArgs& a, int64_t s, int64_t u) {
  switch (a.storage) {
    case Storage::kFloat: return forward_block_typed<float>(a, s, u);
    case Storage::kBFloat16: return forward_block_typed<c10::BFloat16>(a, s, u);
    case Storage::kHalf: return forward_block_typed<c10::Half>(a, s, u);
  }
}

// ------------------------------------------------------------------------------------------
// Backward

// Whether the backward keeps a float32 copy of its gate gradients beside dxproj
// (BackwardStepArgs::dz): for 16-bit storage, where dxproj holds them rounded. Float32 reads them
// back from dxproj (BackwardTile::dz_of_step).
template <typename scalar_t>
constexpr bool kKeepsDz = !std::is_same_v<scalar_t, float>;

// Gate gradients of n units of one row at an active step. dh: gradient reaching h_t from later
// steps; dz, dx: gate q of unit j at q * H + j. dz only where kKeepsDz.
template <typename scalar_t>
inline void backward_gates(int64_t n, int64_t H, const float* __restrict__ dh,
                           const scalar_t* __restrict__ dy, const scalar_t* __restrict__ gt,
                           const float* __restrict__ c, const float* __restrict__ c_prev,
                           float* __restrict__ dc, float* __restrict__ dz, scalar_t* __restrict__ dx) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float dm = dh[j] + load_f(dy + j);
    const float i = load_f(gt + j), f = load_f(gt + H + j);
    const float g = load_f(gt + 2 * H + j), o = load_f(gt + 3 * H + j);
    const float tc = tanh_act(c[j]);
    const float dc_tot = dc[j] + dm * o * (1.0f - tc * tc);
    const float dzi = dc_tot * g * i * (1.0f - i);
    const float dzf = dc_tot * c_prev[j] * f * (1.0f - f);
    const float dzg = dc_tot * i * (1.0f - g * g);
    const float dzo = dm * tc * o * (1.0f - o);
    dc[j] = dc_tot * f;
    if constexpr (kKeepsDz<scalar_t>) {
      dz[j] = dzi;
      dz[H + j] = dzf;
      dz[2 * H + j] = dzg;
      dz[3 * H + j] = dzo;
    }
    dx[j] = store_as<scalar_t>(dzi);
    dx[H + j] = store_as<scalar_t>(dzf);
    dx[2 * H + j] = store_as<scalar_t>(dzg);
    dx[3 * H + j] = store_as<scalar_t>(dzo);
  }
}

// backward_gates for V units of float32 storage on registers, with vector_tanh (see
// vector_gates). The backward recurrence op on a Zen 5 EPYC, calls alternated (median ratio of 60
// pairs), T = 50..200, B = 1..64, H = 128..256: by itself 0.97-1.00x the time of the plain loop,
// within the noise; together with dz no longer written (dz_of_step), 0.90-0.96x (B = 1: 0.99x).
// AVX2 (forced there), one thread, B = 16, H = 256, four rounds of processes alternated, by
// itself: 4.38-4.50 against 4.48-4.68 ms.
template <typename D>
inline void vector_backward_gates(int64_t H, const float* __restrict__ dh,
                                  const float* __restrict__ dy, const float* __restrict__ gt,
                                  const float* __restrict__ c, const float* __restrict__ c_prev,
                                  float* __restrict__ dc, float* __restrict__ dx) {
  const reg one = D::broadcast(1.0f);
  const reg dm = D::add(D::load(dh), D::load(dy));
  const reg i = D::load(gt), f = D::load(gt + H), g = D::load(gt + 2 * H), o = D::load(gt + 3 * H);
  const reg tc = vector_tanh<D>(D::load(c));
  const reg dc_tot = D::fma(D::mul(dm, o), D::sub(one, D::mul(tc, tc)), D::load(dc));
  const reg dzi = D::mul(D::mul(dc_tot, g), D::mul(i, D::sub(one, i)));
  const reg dzf = D::mul(D::mul(dc_tot, D::load(c_prev)), D::mul(f, D::sub(one, f)));
  const reg dzg = D::mul(D::mul(dc_tot, i), D::sub(one, D::mul(g, g)));
  const reg dzo = D::mul(D::mul(dm, tc), D::mul(o, D::sub(one, o)));
  D::store(dc, D::mul(dc_tot, f));
  D::store(dx, dzi);
  D::store(dx + H, dzf);
  D::store(dx + 2 * H, dzg);
  D::store(dx + 3 * H, dzo);
}

template <typename scalar_t>
struct BackwardTile {
  const BackwardStepArgs& a;
  int64_t s, j0, n;  // step, first unit, units (<= 4V)
  BackwardPhase phase;
  const scalar_t* panel;
  float* partial;  // (B, 4V)
  int64_t k0 = 0, k1 = 0;

  // Row 0 of step s's gate gradients (B x 4H floats, rows 4H apart), which the next step's
  // product reads. Float32 storage has them in dxproj at that step, so no second copy is written
  // (a unit's gradients store 5 vectors, not 9; see vector_backward_gates for the time); 16-bit
  // storage keeps them in float32 in the double buffer dz (dxproj holds them rounded).
  const float* dz_of_step(int64_t s_of) const {
    if constexpr (kKeepsDz<scalar_t>)
      return a.dz[s_of % 2];
    else
      return static_cast<const float*>(a.dxproj) +
             time_of(s_of, a.T, a.reverse) * a.batch * 4 * a.H;
  }

  template <int R>
  void run(int64_t b0) {
    const int64_t H = a.H, T = a.T;
    if (phase != BackwardPhase::kFirst) {
      // dh of these units = dz of the step processed before (s + 1; step 0 for the final one)
      // times W_hh. Rows that were padding there produced dz = 0 and keep the dh they carry.
      const int64_t s_prev = phase == BackwardPhase::kFinal ? 0 : s + 1;
      const int64_t t_prev = time_of(s_prev, T, a.reverse);
      reg acc[R][4];
      chunk_product<R>(dz_of_step(s_prev) + b0 * 4 * H, 4 * H, panel, k0, k1,
                       partial + b0 * 4 * V, acc);
      if (k1 < 4 * H) return save_partial<R>(partial + b0 * 4 * V, acc);
      for (int r = 0; r < R; ++r) {
        if (!row_active(a.lengths, b0 + r, t_prev)) continue;
        float* dh = a.dh + (b0 + r) * H + j0;
        if (n == 4 * V) {
          for (int q = 0; q < 4; ++q) Vec::store(dh + q * V, acc[r][q]);
        } else {
          alignas(64) float tmp[4 * V];
          for (int q = 0; q < 4; ++q) Vec::store(tmp + q * V, acc[r][q]);
          for (int64_t j = 0; j < n; ++j) dh[j] = tmp[j];
        }
      }
    }
    if (phase == BackwardPhase::kFinal) return;
    const int64_t t = time_of(s, T, a.reverse);
    const int64_t t_before = s > 0 ? time_of(s - 1, T, a.reverse) : -1;  // forward's previous step
    for (int r = 0; r < R; ++r) {
      const int64_t b = b0 + r, row = t * a.batch + b;
      float* dz = kKeepsDz<scalar_t> ? a.dz[s % 2] + b * 4 * H + j0 : nullptr;
      scalar_t* dx = static_cast<scalar_t*>(a.dxproj) + row * 4 * H + j0;
      if (!row_active(a.lengths, b, t)) {
        for (int q = 0; q < 4; ++q)
          for (int64_t j = 0; j < n; ++j) {
            if constexpr (kKeepsDz<scalar_t>) dz[q * H + j] = 0.0f;
            dx[q * H + j] = store_as<scalar_t>(0.0f);
          }
        continue;
      }
      const float* c = a.c_all + row * H + j0;
      const float* c_prev = (t_before >= 0 ? a.c_all + (t_before * a.batch + b) * H : a.c0 + b * H) + j0;
      const scalar_t* dy = static_cast<const scalar_t*>(a.dy) + row * a.dy_stride + j0;
      const scalar_t* gt = static_cast<const scalar_t*>(a.gates) + row * 4 * H + j0;
      float* dh = a.dh + b * H + j0;
      float* dc = a.dc + b * H + j0;
      if constexpr (Vec::kVectorGates && std::is_same_v<scalar_t, float>) {
        if (n == 4 * V) {
          for (int q = 0; q < 4; ++q)
            vector_backward_gates<Vec>(H, dh + q * V, dy + q * V, gt + q * V, c + q * V,
                                       c_prev + q * V, dc + q * V, dx + q * V);
          continue;
        }
      }
      if (n == 4 * V) backward_gates<scalar_t>(4 * V, H, dh, dy, gt, c, c_prev, dc, dz, dx);
      else backward_gates<scalar_t>(n, H, dh, dy, gt, c, c_prev, dc, dz, dx);
    }
  }
};

template <typename scalar_t>
void backward_block_typed(const BackwardStepArgs& a, int64_t s, int64_t q, BackwardPhase phase) {
  const int64_t j0 = q * 4 * V, n = a.H - j0 < 4 * V ? a.H - j0 : 4 * V;
  const scalar_t* panel = static_cast<const scalar_t*>(a.panels) + q * 4 * a.H * 4 * V;
  BackwardTile<scalar_t> tile{a, s, j0, n, phase, panel, a.partial + q * a.B * 4 * V};
  const int64_t K = 4 * a.H;
  const int64_t kc = phase == BackwardPhase::kFirst ? K : chunk_length<scalar_t>(a.B, K, a.chunk_bytes);
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    tile.k0 = k0;
    tile.k1 = K - k0 < kc ? K : k0 + kc;
    for_each_row_tile(a.B, tile);
  }
}

void backward_block(const BackwardStepArgs& a, int64_t s, int64_t q, BackwardPhase phase) {
  switch (a.storage) {
    case Storage::kFloat: return backward_block_typed<float>(a, s, q, phase);
    case Storage::kBFloat16: return backward_block_typed<c10::BFloat16>(a, s, q, phase);
    case Storage::kHalf: return backward_block_typed<c10::Half>(a, s, q, phase);
  }
}

// ------------------------------------------------------------------------------------------
// Products around the recurrence (see PanelProductArgs): the forward's tile product without a
// recurrence, over the whole reduction. The panel is streamed from L2 for each row tile: on Zen 4
// that beat L1-sized chunks with partial sums by 5-10%.

// The columns of out each of a tile's 4 vectors covers, when `left` columns of out remain at
// vector 0 and each vector starts `step` columns after the one before (V: contiguous; 0: the gate
// layout's 4 gates of the same units). Returns how many vectors cover any (0..4).
inline int valid_columns(int64_t left, int64_t step, int64_t (&valid)[4]) {
  int vectors = 0;
  for (int q = 0; q < 4; ++q) {
    const int64_t n = left - q * step;
    valid[q] = n < 0 ? 0 : n < V ? n : V;
    if (valid[q] > 0) vectors = q + 1;
  }
  return vectors;
}

// tile.template run_vectors<R, Q>(b0) with Q = vectors as a constant: a narrow last chunk of
// columns multiplies only its vectors (4 for 0, which covers none).
template <int R, typename Tile>
inline void run_with_vectors(Tile& tile, int vectors, int64_t b0) {
  switch (vectors) {
    case 1: return tile.template run_vectors<R, 1>(b0);
    case 2: return tile.template run_vectors<R, 2>(b0);
    case 3: return tile.template run_vectors<R, 3>(b0);
    default: return tile.template run_vectors<R, 4>(b0);
  }
}

template <typename scalar_t>
struct PanelProductTile {
  const PanelProductArgs& a;
  int64_t m0;
  const scalar_t* panel;
  const float* bias;   // this block's 4V biases, or null
  scalar_t* out;       // row 0's first column of the block's vector 0
  int64_t vec_stride;  // columns between the block's vectors in out
  int64_t valid[4];    // columns of each vector inside out
  int vectors;         // of them, those with a column (always 4 in the gate layout)

  template <int R>
  void run(int64_t b0) {
    if constexpr (std::is_same_v<scalar_t, float>)
      run_with_vectors<R>(*this, vectors, b0);
    else  // 16-bit panels: every vector (tile_product's narrow tiles are float32 only)
      run_vectors<R, 4>(b0);
  }

  template <int R, int Q>
  void run_vectors(int64_t b0) {  // rows m0 + b0 ...
    reg acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < Q; ++q) acc[r][q] = Vec::zero();
    tile_product<R, scalar_t, Q>(a.a + (m0 + b0) * a.lda, a.lda, a.K, panel, acc);
    for (int r = 0; r < R; ++r) {
      scalar_t* row = out + (m0 + b0 + r) * a.ldo;
      for (int q = 0; q < Q; ++q) {
        scalar_t* dst = row + q * vec_stride;
        const reg v = bias != nullptr ? Vec::add(acc[r][q], Vec::load(bias + q * V)) : acc[r][q];
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (valid[q] == V) {
            Vec::store(dst, v);
            continue;
          }
        }
        if (valid[q] > 0) {
          alignas(64) float tmp[V];
          Vec::store(tmp, v);
          for (int64_t j = 0; j < valid[q]; ++j) dst[j] = store_as<scalar_t>(tmp[j]);
        }
      }
    }
  }
};

template <typename scalar_t>
void panel_product_typed(const PanelProductArgs& a, int64_t b, int64_t m0, int64_t m1) {
  const int64_t first = a.gate_layout ? b * V : b * 4 * V;
  PanelProductTile<scalar_t> tile{a, m0, static_cast<const scalar_t*>(a.panels) + b * a.panel_stride,
                                  a.bias != nullptr ? a.bias + b * 4 * V : nullptr,
                                  static_cast<scalar_t*>(a.out) + first, a.gate_layout ? a.columns : V, {}, 0};
  tile.vectors = valid_columns(a.columns - first, a.gate_layout ? 0 : V, tile.valid);
  for_each_row_tile(m1 - m0, tile);
}

void panel_product(const PanelProductArgs& a, int64_t b, int64_t m0, int64_t m1) {
  switch (a.storage) {
    case Storage::kFloat: return panel_product_typed<float>(a, b, m0, m1);
    case Storage::kBFloat16: return panel_product_typed<c10::BFloat16>(a, b, m0, m1);
    case Storage::kHalf: return panel_product_typed<c10::Half>(a, b, m0, m1);
  }
}

// ------------------------------------------------------------------------------------------
// Weight gradients (see WeightGradArgs): out (+)= G^T X, a reduction over the M rows of G and X.
// The register tile is R rows n of out x 4 vectors of its columns; per k (a row of G and X), R
// broadcasts of G[k][n .. n + R) and 4 vectors of X[k], R x 4 FMAs. Both operands are packed per
// chunk of k: G^T's rows k-major, kMaxRows floats per k for each tile (one short run per k, from
// L2), X's 4V columns as k_chunk x 4V floats (L1), which every tile of the block then reads. The
// sums start from out (zero on the first chunk) and go back to out after each chunk.

constexpr int64_t kGradPrefetchRows = 4;

// Q: the vectors of X's chunk that hold columns of out (a narrow last chunk, I < 4V, multiplies
// no zero columns: at I = 32 on AVX-512 that was half the multiply-adds).
template <int R, int Q>
inline void weight_grad_tile(const float* __restrict__ gp, const float* __restrict__ xp, int64_t kc,
                             reg (&acc)[R][4]) {
  for (int64_t k = 0; k < kc; ++k) {
    const float* w = xp + k * 4 * V;
    reg a[R];
    for (int r = 0; r < R; ++r) a[r] = Vec::broadcast(gp[k * kMaxRows + r]);
    for (int q = 0; q < Q; ++q) {
      const reg wq = Vec::load(w + q * V);
      for (int r = 0; r < R; ++r) acc[r][q] = Vec::fma(a[r], wq, acc[r][q]);
    }
  }
}

// The first n (<= V) floats at p as a vector, zero past them.
inline reg load_columns(const float* p, int64_t n) {
  if (n == V) return Vec::load(p);
  alignas(64) float tmp[V] = {};
  for (int64_t j = 0; j < n; ++j) tmp[j] = p[j];
  return Vec::load(tmp);
}
inline void store_columns(float* p, reg v, int64_t n) {
  if (n == V) return Vec::store(p, v);
  alignas(64) float tmp[V];
  Vec::store(tmp, v);
  for (int64_t j = 0; j < n; ++j) p[j] = tmp[j];
}

struct WeightGradTile {
  const WeightGradArgs& a;
  const float* gp;       // the block's packed G^T: the tile of rows b0.. at gp + b0 * kc
  const float* xp;       // the chunk of X's columns [col0, col0 + 4V), kc x 4V
  int64_t n0, kc, col0;  // the block's first row of out, the chunk's length, the first column
  bool from_zero;        // the first chunk of an out = G^T X
  int64_t valid[4];      // columns of each vector inside out
  int vectors;           // of them, those with a column (1..4)

  template <int R>
  void run(int64_t b0) {
    run_with_vectors<R>(*this, vectors, b0);
  }

  template <int R, int Q>
  void run_vectors(int64_t b0) {
    reg acc[R][4];
    float* row = a.out + (n0 + b0) * a.ldo + col0;
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < Q; ++q)
        acc[r][q] = from_zero ? Vec::zero() : load_columns(row + r * a.ldo + q * V, valid[q]);
    weight_grad_tile<R, Q>(gp + b0 * kc, xp, kc, acc);
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < Q; ++q) store_columns(row + r * a.ldo + q * V, acc[r][q], valid[q]);
  }
};

void weight_grad_rows(const WeightGradArgs& a, int64_t n0, int64_t n1, float* scratch) {
  float* gp = scratch;                         // row_block x k_chunk
  float* xp = scratch + a.row_block * a.k_chunk;  // k_chunk x 4V
  for (int64_t nb = n0; nb < n1; nb += a.row_block) {
    const int64_t rows = n1 - nb < a.row_block ? n1 - nb : a.row_block;
    if (a.M == 0 && !a.accumulate) {
      for (int64_t n = nb; n < nb + rows; ++n)
        for (int64_t i = 0; i < a.I; ++i) a.out[n * a.ldo + i] = 0.0f;
    }
    float* sums = a.g_sums != nullptr ? a.g_sums + nb : nullptr;
    if (sums != nullptr)
      for (int64_t r = 0; r < rows; ++r) sums[r] = 0.0f;
    for (int64_t k0 = 0; k0 < a.M; k0 += a.k_chunk) {
      const int64_t kc = a.M - k0 < a.k_chunk ? a.M - k0 : a.k_chunk;
      // G^T's rows [nb, nb + rows) of this chunk; a last partial tile leaves rows past it unset
      // (its narrower register tile never reads them). G comes from memory (it is the largest
      // operand, read once): the rows a few k ahead are requested while this one is copied.
      const int64_t full = rows - rows % kMaxRows;
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = a.g + (k0 + k) * a.ldg + nb;
        if (k + kGradPrefetchRows < kc)
          for (int64_t j = 0; j < rows; j += 64 / sizeof(float))
            __builtin_prefetch(src + kGradPrefetchRows * a.ldg + j, 0, 0);
        float* dst = gp + k * kMaxRows;
        for (int64_t t0 = 0; t0 < full; t0 += kMaxRows)  // one short run: a few wide moves
          __builtin_memcpy(dst + t0 * kc, src + t0, kMaxRows * sizeof(float));
        for (int64_t r = full; r < rows; ++r) dst[full * kc + r - full] = src[r];
        if (sums != nullptr)  // the row of G is in L1 now: the bias gradient costs adds only
          for (int64_t r = 0; r < rows; ++r) sums[r] += src[r];
      }
      for (int64_t col0 = 0; col0 < a.I; col0 += 4 * V) {
        const int64_t cols = a.I - col0 < 4 * V ? a.I - col0 : 4 * V;
        WeightGradTile tile{a, gp, xp, nb, kc, col0, k0 == 0 && !a.accumulate, {}, 0};
        tile.vectors = valid_columns(cols, V, tile.valid);
        for (int64_t k = 0; k < kc; ++k) {
          const float* src = a.x + (k0 + k) * a.ldx + col0;
          float* dst = xp + k * 4 * V;
          for (int64_t j = 0; j < cols; ++j) dst[j] = src[j];
          for (int64_t j = cols; j < tile.vectors * V; ++j) dst[j] = 0.0f;
        }
        for_each_full_row_tile(rows, tile);
      }
    }
  }
}
