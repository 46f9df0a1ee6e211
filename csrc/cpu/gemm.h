// Row-major GEMM for the per-step products of the CPU recurrence:  C[M,N] = A[M,K] @ op(B).
//
// Why not at::mm_out: at batch 1 a step's product is ~100k multiply-adds (well under a
// microsecond of arithmetic), while a trip through the dispatcher costs about as much again.
// PyTorch's x86 wheels link MKL into libtorch_cpu and export its Fortran sgemm_/dgemm_, so we
// call those directly when the loader finds them (weak symbols), after a one-time self-check of
// the calling convention. Anywhere else (aarch64 builds, other BLAS) we fall back to
// at::mm_out, which is correct everywhere, just with more overhead per call.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <limits>
#include <memory>

extern "C" {
// Declared weak: resolved to MKL's symbols exported by libtorch_cpu when present, null if not.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count; returns the previous setting (0: none was set).
int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));  // the by-value C entry
// MKL's packed GEMM: a weight matrix reused for every step is laid out once in MKL's internal
// format, so each step's product skips the repacking (which dominates at small batch).
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
}

namespace lstm_fused::cpu {

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const float* alpha, const float* a, const int* lda, const float* b,
                      const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const double* alpha, const double* a, const int* lda, const double* b,
                      const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <typename T>
bool blas_symbol_present() {
  if constexpr (std::is_same_v<T, float>) return sgemm_ != nullptr;
  else return dgemm_ != nullptr;
}

// Column-major BLAS computing a row-major product: row-major C = A @ op(B) is column-major
// C^T = op(B)^T @ A^T, and a row-major matrix read column-major is its transpose.
template <typename T>
void blas_row_major(bool transpose_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                    const T* B, int64_t ldb, T* C, int64_t ldc) {
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int ldb_i = static_cast<int>(ldb), lda_i = static_cast<int>(lda), ldc_i = static_cast<int>(ldc);
  const T one = 1, zero = 0;
  blas_gemm(transpose_b ? "T" : "N", "N", &m, &n, &k, &one, B, &ldb_i, A, &lda_i, &zero, C, &ldc_i);
}

// One tiny product checked against a hand loop: guards against a BLAS whose integer width or
// convention differs from what we declared (an ILP64 build would read garbage sizes).
template <typename T>
bool blas_self_check() {
  if (!blas_symbol_present<T>()) return false;
  const T A[6] = {1, 2, 3, 4, 5, 6};            // 2x3
  const T B[12] = {1, 0, 2, 1, 3, 1, 0, 2, 1, 1, 1, 3};  // 4x3, used transposed
  T C[8] = {0};
  blas_row_major<T>(true, 2, 4, 3, A, 3, B, 3, C, 4);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      T expect = 0;
      for (int p = 0; p < 3; ++p) expect += A[i * 3 + p] * B[j * 3 + p];
      if (C[i * 4 + j] != expect) return false;
    }
  return true;
}

// Inside our own parallel region every thread runs its own products: keep MKL from forking
// threads of its own for the lifetime of this object (a per-thread MKL setting).
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

// LSTM_FUSED_CPU_GEMM=aten forces the at::mm_out path (tests use it to cover the fallback).
inline bool blas_disabled_by_env() {
  const char* v = std::getenv("LSTM_FUSED_CPU_GEMM");
  return v != nullptr && std::string(v) == "aten";
}

template <typename T>
bool use_blas() {
  static const bool ok = !blas_disabled_by_env() && blas_self_check<T>();
  return ok;
}

// C[M,N] = A[M,K] @ (transpose_b ? B[N,K]^T : B[K,N]); leading dims in elements.
template <typename T>
void gemm(bool transpose_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
          const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int64_t int_max = std::numeric_limits<int>::max();
  const bool fits_int = M <= int_max && N <= int_max && K <= int_max && lda <= int_max &&
                        ldb <= int_max && ldc <= int_max;
  if (fits_int && use_blas<T>()) {
    blas_row_major<T>(transpose_b, M, N, K, A, lda, B, ldb, C, ldc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = transpose_b
                     ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                     : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  at::mm_out(c, a, b);
}

// MKL sizes a packed buffer at 8-10 MB whatever the matrix (its internal panels); allocating
// and faulting that in on every call would cost more than the products it speeds up. Each
// thread keeps one buffer per slot and reuses it across calls.
inline float* reusable_pack_buffer(int slot, size_t floats) {
  struct Buffer {
    std::unique_ptr<float[]> data;
    size_t size = 0;
  };
  thread_local Buffer buffers[2];
  Buffer& b = buffers[slot];
  if (b.size < floats) {
    b.data.reset(new float[floats]);  // uninitialized: the pack writes what it uses
    b.size = floats;
  }
  return b.data.get();
}

// The B operand of  C[M,N] = A[M,K] @ op(B)  packed once and reused for many products with
// the same M. Packing pays only for weights larger than the caches it was going to be read
// from anyway; smaller ones, double, and builds without MKL's packed API use plain gemm().
template <typename T>
class PackedRhs {
 public:
  // Weights smaller than this many elements (128 KB of fp32) are multiplied unpacked.
  static constexpr int64_t kMinPackedElements = 32768;

  PackedRhs(int slot, bool transpose_b, int64_t M, int64_t N, int64_t K, const T* B, int64_t ldb,
            bool allow_packing = true)
      : transpose_b_(transpose_b), M_(M), N_(N), K_(K), B_(B), ldb_(ldb) {
    if constexpr (std::is_same_v<T, float>) {
      constexpr int64_t int_max = std::numeric_limits<int>::max();
      const bool fits = M <= int_max && N <= int_max && K <= int_max && ldb <= int_max;
      const bool worth_it = allow_packing && M > 0 && N * K >= kMinPackedElements;
      if (fits && worth_it && use_blas<float>() && cblas_sgemm_pack && cblas_sgemm_compute &&
          cblas_sgemm_pack_get_size) {
        const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, int(M), int(N), int(K));
        packed_ = reusable_pack_buffer(slot, (bytes + sizeof(float) - 1) / sizeof(float));
        cblas_sgemm_pack(kRowMajor, kBMatrix, transpose_b ? kTrans : kNoTrans, int(M), int(N),
                         int(K), 1.0f, B, int(ldb), packed_);
      }
    }
  }

  // C[M,N] = A[M,K] @ op(B)
  void multiply(const T* A, int64_t lda, T* C, int64_t ldc) const {
    if constexpr (std::is_same_v<T, float>) {
      if (packed_ != nullptr) {
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(M_), int(N_), int(K_), A, int(lda),
                            packed_, int(N_), 0.0f, C, int(ldc));
        return;
      }
    }
    gemm(transpose_b_, M_, N_, K_, A, lda, B_, ldb_, C, ldc);
  }

 private:
  // CBLAS enum values (mkl_cblas.h).
  static constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151,
                       kBMatrix = 162;
  bool transpose_b_;
  int64_t M_, N_, K_;
  const T* B_;
  int64_t ldb_;
  float* packed_ = nullptr;
};

}  // namespace lstm_fused::cpu
