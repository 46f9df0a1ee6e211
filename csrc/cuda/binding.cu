// CUDA kernels of the recurrence ops (schemas in csrc/ops.cpp): the only CUDA file that sees
// torch. It checks arguments, allocates outputs, and runs either
//   * the persistent kernels (persistent.h) when the shape fits on chip, or
//   * the general path: per step one cuBLAS GEMM into an fp32 workspace + one fused pointwise
//     kernel (general.h / pointwise.cuh), the time loop running here on the host, or
//   * forced only, until GPU measurements say where it wins: the cluster-resident forward
//     (cluster.h, sm_90).
// LSTM_FUSED_CUDA_PATH = auto (default) | persistent | general | cluster picks the path per
// call; `persistent` and `cluster` fail with the planner's reason where the shape does not fit.
// `cluster` has no backward kernel: the backward then chooses as under `auto`.
// Everything is issued on the current stream of the input's device, GEMMs through torch's
// cuBLAS handle. After the backward loop the weight gradients are single GEMMs over all T*B
// rows (never T small ones), for both paths.

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cublas_v2.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <tuple>

#include "checks.h"
#include "cuda/cluster.h"
#include "cuda/general.h"
#include "cuda/persistent.h"
#include "cuda/recurrence_args.h"

namespace lstm_fused {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------------
// Path choice and test hooks (environment, read per call so tests can switch them).

enum class PathChoice { kAuto, kPersistent, kGeneral, kCluster };

PathChoice path_choice() {
  const char* v = std::getenv("LSTM_FUSED_CUDA_PATH");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return PathChoice::kAuto;
  if (std::strcmp(v, "persistent") == 0) return PathChoice::kPersistent;
  if (std::strcmp(v, "general") == 0) return PathChoice::kGeneral;
  if (std::strcmp(v, "cluster") == 0) return PathChoice::kCluster;
  TORCH_CHECK(false, "lstm_fused: LSTM_FUSED_CUDA_PATH=", v,
              " is not one of auto, persistent, general, cluster");
  return PathChoice::kAuto;  // unreachable
}

// LSTM_FUSED_CUDA_POISON=1 fills outputs with NaN before the kernels run, so a test fails on
// any element a kernel forgets to write (at::empty would often hand back plausible values).
bool poison_outputs() {
  const char* v = std::getenv("LSTM_FUSED_CUDA_POISON");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

void poison(bool on, std::initializer_list<at::Tensor*> tensors) {
  if (!on) return;
  for (at::Tensor* t : tensors) {
    if (t->defined() && t->numel() > 0) t->fill_(std::numeric_limits<double>::quiet_NaN());
  }
}

ScalarKind scalar_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kHalf: return ScalarKind::kFloat16;
    default:
      TORCH_CHECK(false, "lstm_fused: the CUDA kernels implement float32, bfloat16 and float16, not ",
                  dtype, " (float64 runs on the 'reference' backend)");
  }
  return ScalarKind::kFloat32;  // unreachable
}

cudaDataType_t cuda_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return CUDA_R_32F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    default: TORCH_CHECK(false, "lstm_fused: no cuBLAS type for ", dtype);
  }
  return CUDA_R_32F;  // unreachable
}

// Calls a templated function with the storage type matching `dtype`.
template <typename F>
void dispatch_storage(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kHalf: f(__half{}); break;
    default: scalar_kind(dtype);  // throws the message
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// Whether fp32 recurrences may multiply in TF32: the switch nn.LSTM's cuDNN path obeys
// (torch.backends.cudnn.allow_tf32, or the cudnn rnn fp32 precision on newer torch).
bool rnn_allows_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  return at::globalContext().allowTF32CuDNN(at::Float32Op::RNN);
#else  // before the per-op fp32 precision API
  return at::globalContext().allowTF32CuDNN();
#endif
}

// ------------------------------------------------------------------------------------------
// cuBLAS. Row-major tensors are handed to column-major cuBLAS as their transposes.

class Blas {
 public:
  explicit Blas(at::ScalarType storage) : handle_(at::cuda::getCurrentCUDABlasHandle()) {
    // fp32 storage may use TF32 exactly when nn.LSTM's cuDNN path would; else exact fp32.
    // 16-bit storage: fp32 accumulation, tensor cores as usual.
    const bool tf32 = storage == at::kFloat && rnn_allows_tf32();
    compute_ = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    // The handle's math mode follows torch.backends.cuda.matmul (it can also turn TF32 on for
    // CUBLAS_COMPUTE_32F); set the default mode for our calls so only compute_ decides.
    TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle_, &saved_mode_));
    TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH));
  }
  ~Blas() { cublasSetMathMode(handle_, saved_mode_); }
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;

  // C (rows, n) = A (rows, k) @ W^T, W (n, k).  fp32 C.
  void a_wt(const void* A, const void* W, float* C, int64_t rows, int64_t n, int64_t k,
            cudaDataType_t ab) const {
    gemm(CUBLAS_OP_T, CUBLAS_OP_N, n, rows, k, W, ab, k, A, ab, k, 0.0f, C, CUDA_R_32F, n);
  }
  // C (rows, n) = A (rows, k) @ W + beta * C, W (k, n).  fp32 C.
  void a_w(const void* A, const void* W, float* C, int64_t rows, int64_t n, int64_t k,
           cudaDataType_t ab, float beta) const {
    gemm(CUBLAS_OP_N, CUBLAS_OP_N, n, rows, k, W, ab, n, A, ab, k, beta, C, CUDA_R_32F, n);
  }
  // C (M, N) = X^T @ Y (+ C when accumulate), X (K, M), Y (K, N): a weight gradient summed
  // over K = T*B rows. K is split so each cuBLAS call's int arguments stay in range.
  void xt_y(const at::Tensor& X, const at::Tensor& Y, at::Tensor& C, bool accumulate) const {
    const int64_t K = X.size(0), M = X.size(1), N = Y.size(1);
    const cudaDataType_t ab = cuda_type(X.scalar_type());
    constexpr int64_t kMaxK = int64_t(1) << 30;
    for (int64_t k0 = 0; k0 < K; k0 += kMaxK) {
      const int64_t k = std::min(kMaxK, K - k0);
      gemm(CUBLAS_OP_N, CUBLAS_OP_T, N, M, k, Y.narrow(0, k0, k).data_ptr(), ab, N,
           X.narrow(0, k0, k).data_ptr(), ab, M, (accumulate || k0 > 0) ? 1.0f : 0.0f,
           C.data_ptr(), CUDA_R_32F, N);
    }
  }

 private:
  void gemm(cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k,
            const void* A, cudaDataType_t at_, int64_t lda, const void* B, cudaDataType_t bt,
            int64_t ldb, float beta, void* C, cudaDataType_t ct, int64_t ldc) const {
    constexpr int64_t kMax = std::numeric_limits<int>::max();
    TORCH_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
                "lstm_fused: a GEMM dimension exceeds cuBLAS's int range");
    const float alpha = 1.0f;
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle_, ta, tb, int(m), int(n), int(k), &alpha, A, at_,
                                      int(lda), B, bt, int(ldb), &beta, C, ct, int(ldc), compute_,
                                      CUBLAS_GEMM_DEFAULT));
  }

  cublasHandle_t handle_;
  cublasComputeType_t compute_;
  cublasMath_t saved_mode_ = CUBLAS_DEFAULT_MATH;
};

// ------------------------------------------------------------------------------------------
// General path: the time loops. Step s (0-based, in processing order) visits time t.

int64_t time_at(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

struct ForwardTensors {
  at::Tensor xproj, w_hh, w_hr, lengths;  // inputs, contiguous; w_hr / lengths may be undefined
  bool reverse = false;
  at::Tensor h, c;             // carried state; in: h0 (storage dtype), c0 (fp32); out: h_n, c_n
  at::Tensor y, gates, c_all;  // outputs; gates / c_all undefined without save
};

template <typename T>
void forward_general(const ForwardTensors& f, cudaStream_t stream) {
  const int64_t steps = f.xproj.size(0), B = f.xproj.size(1), H = f.xproj.size(2) / 4;
  const int64_t P = f.h.size(1);
  const bool proj = f.w_hr.defined();
  const cudaDataType_t ab = cuda_type(f.xproj.scalar_type());
  const auto f32 = f.xproj.options().dtype(at::kFloat);
  const at::Tensor z = at::empty({B, 4 * H}, f32);                                  // h @ W_hh^T
  const at::Tensor m = proj ? at::empty({B, H}, f.xproj.options()) : at::Tensor();  // o*tanh(c)
  const at::Tensor hp = proj ? at::empty({B, P}, f32) : at::Tensor();               // m @ W_hr^T
  const Blas blas(f.xproj.scalar_type());
  const int64_t* lengths = ptr<const int64_t>(f.lengths);

  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = time_at(s, steps, f.reverse);
    blas.a_wt(f.h.data_ptr(), f.w_hh.data_ptr(), ptr<float>(z), B, 4 * H, P, ab);

    ForwardPointwise<T> p;
    p.B = B, p.H = H, p.t = t, p.lengths = lengths;
    p.xproj = ptr<const T>(f.xproj) + t * B * 4 * H;
    p.z = ptr<const float>(z);
    p.c = ptr<float>(f.c);
    if (proj) {
      p.m = ptr<T>(m);
    } else {
      p.h = ptr<T>(f.h);
      p.y = ptr<T>(f.y) + t * B * H;
    }
    if (f.gates.defined()) p.gates = ptr<T>(f.gates) + t * B * 4 * H;
    if (f.c_all.defined()) p.c_all = ptr<float>(f.c_all) + t * B * H;
    C10_CUDA_CHECK(launch_forward_pointwise(p, stream));

    if (proj) {
      blas.a_wt(m.data_ptr(), f.w_hr.data_ptr(), ptr<float>(hp), B, P, H, ab);
      ProjectionUpdate<T> u;
      u.B = B, u.P = P, u.t = t, u.lengths = lengths;
      u.hp = ptr<const float>(hp);
      u.h = ptr<T>(f.h);
      u.y = ptr<T>(f.y) + t * B * P;
      C10_CUDA_CHECK(launch_projection_update(u, stream));
    }
  }
}

struct BackwardTensors {
  at::Tensor dy, w_hh, w_hr, c0, lengths, gates, c_all;  // inputs, contiguous
  bool reverse = false;
  at::Tensor dh, dc;        // carried gradients (fp32); in: dh_n, dc_n; out: dh0, dc0
  at::Tensor dxproj;        // output (T, B, 4H)
  at::Tensor dh_tot_all;    // [proj, weight grads] (T, B, P) fp32 for dW_hr, else undefined
};

template <typename T>
void backward_general(const BackwardTensors& g, cudaStream_t stream) {
  const int64_t steps = g.gates.size(0), B = g.gates.size(1), H = g.gates.size(2) / 4;
  const int64_t P = g.dh.size(1);
  const bool proj = g.w_hr.defined();
  const cudaDataType_t ab = cuda_type(g.gates.scalar_type());
  const at::Tensor c0 = g.c0.to(at::kFloat).contiguous();  // c_{t-1} of the first step
  const at::Tensor dh_tot = proj ? at::empty({B, P}, g.gates.options()) : at::Tensor();
  const at::Tensor dm = proj ? at::empty({B, H}, g.gates.options().dtype(at::kFloat)) : at::Tensor();
  const Blas blas(g.gates.scalar_type());
  const int64_t* lengths = ptr<const int64_t>(g.lengths);
  const float beta = recurrent_grad_beta(lengths != nullptr);
  const float* c_all = ptr<const float>(g.c_all);

  for (int64_t s = steps - 1; s >= 0; --s) {
    const int64_t t = time_at(s, steps, g.reverse);
    if (proj) {
      BackwardProjection<T> q;
      q.B = B, q.P = P, q.t = t, q.lengths = lengths;
      q.dh = ptr<float>(g.dh);
      q.dy = ptr<const T>(g.dy) + t * B * P;
      q.dh_tot = ptr<T>(dh_tot);
      if (g.dh_tot_all.defined()) q.dh_tot_all = ptr<float>(g.dh_tot_all) + t * B * P;
      C10_CUDA_CHECK(launch_backward_projection(q, stream));
      blas.a_w(dh_tot.data_ptr(), g.w_hr.data_ptr(), ptr<float>(dm), B, H, P, ab, 0.0f);
    }

    BackwardPointwise<T> p;
    p.B = B, p.H = H, p.t = t, p.lengths = lengths;
    if (proj) {
      p.dm = ptr<const float>(dm);
    } else {
      p.dh = ptr<float>(g.dh);
      p.dy = ptr<const T>(g.dy) + t * B * H;
    }
    p.gates = ptr<const T>(g.gates) + t * B * 4 * H;
    p.c = c_all + t * B * H;
    p.c_prev = s > 0 ? c_all + time_at(s - 1, steps, g.reverse) * B * H : ptr<const float>(c0);
    p.dc = ptr<float>(g.dc);
    p.dxproj = ptr<T>(g.dxproj) + t * B * 4 * H;
    C10_CUDA_CHECK(launch_backward_pointwise(p, stream));

    // dh = dz @ W_hh, dz being d(xproj)[t] just written (storage dtype, the GEMM's input).
    blas.a_w(p.dxproj, g.w_hh.data_ptr(), ptr<float>(g.dh), B, P, 4 * H, ab, beta);
  }
}

// ------------------------------------------------------------------------------------------
// Weight gradients after the loop (both paths): one GEMM over all T*B rows each, fp32
// accumulation, rounded once to the storage dtype.

// dW_hh = sum_t dz_t^T h_{t-1}, h_{t-1} being y of the previously processed step or h0 at a
// sequence's first processed step (reference.previous_hidden). As two GEMMs, with no copy of y:
//   forward:  dxproj[0]^T h0 + dxproj[1:]^T y[:-1]
//   reverse:  G^T h0 + dxproj[:-1]^T y[1:],   G[b] = dxproj[min(len_b, T) - 1, b]
// Reverse with lengths: sequence b starts at t = len_b - 1; in the shifted product that row
// meets y[len_b, b], which is 0 (y is zero at inactive steps), so it enters through the h0
// term only. Rows of inactive steps have dz = 0 (also len_b = 0: G[b] = dxproj[0, b] = 0).
// Without lengths G = dxproj[T-1].
at::Tensor recurrent_weight_grad(const Blas& blas, const at::Tensor& dxproj, const at::Tensor& y,
                                 const at::Tensor& h0, const at::Tensor& lengths, bool reverse) {
  const int64_t steps = dxproj.size(0), B = dxproj.size(1), H4 = dxproj.size(2);
  const int64_t P = y.size(2);
  at::Tensor first;
  if (!reverse) {
    first = dxproj.select(0, 0);
  } else if (!lengths.defined()) {
    first = dxproj.select(0, steps - 1);
  } else {
    const at::Tensor rows =
        lengths.clamp_min(1).clamp_max(steps).sub(1).mul(B).add(at::arange(B, lengths.options()));
    first = dxproj.view({steps * B, H4}).index_select(0, rows);
  }
  at::Tensor dw = at::empty({H4, P}, dxproj.options().dtype(at::kFloat));
  blas.xt_y(first, h0, dw, /*accumulate=*/false);
  if (steps > 1) {
    const at::Tensor dz = dxproj.narrow(0, reverse ? 0 : 1, steps - 1).view({(steps - 1) * B, H4});
    const at::Tensor h = y.narrow(0, reverse ? 1 : 0, steps - 1).view({(steps - 1) * B, P});
    blas.xt_y(dz, h, dw, /*accumulate=*/true);
  }
  return dw.to(dxproj.scalar_type());
}

// dW_hr = sum_t dh_tot_t^T m_t, m = o * tanh(c) rebuilt from the saved gates and cell states.
at::Tensor projection_weight_grad(const Blas& blas, const at::Tensor& dh_tot_all,
                                  const at::Tensor& gates, const at::Tensor& c_all) {
  const int64_t steps = gates.size(0), B = gates.size(1), H = gates.size(2) / 4;
  const int64_t P = dh_tot_all.size(2);
  const at::Tensor m_all =
      gates.narrow(2, 3 * H, H).to(at::kFloat).mul(c_all.tanh()).contiguous().view({steps * B, H});
  at::Tensor dw = at::empty({P, H}, c_all.options());
  blas.xt_y(dh_tot_all.view({steps * B, P}), m_all, dw, /*accumulate=*/false);
  return dw.to(gates.scalar_type());
}

// ------------------------------------------------------------------------------------------
// The ops.

// The path choice for a backward call: `cluster` has no backward kernel, so it chooses as `auto`.
PathChoice backward_path_choice() {
  const PathChoice choice = path_choice();
  return choice == PathChoice::kCluster ? PathChoice::kAuto : choice;
}

// Whether this call runs the persistent kernel: asks the planner unless `choice` is `general`;
// with `persistent` a shape that does not fit is an error naming the reason.
template <typename Args, typename Plan>
bool use_persistent(PathChoice choice, const Args& args, int device, PersistentPlan* plan,
                    Plan planner, const char* what) {
  if (choice == PathChoice::kGeneral) return false;
  const bool fits = planner(args, device, plan);
  TORCH_CHECK(fits || choice == PathChoice::kAuto, "lstm_fused: LSTM_FUSED_CUDA_PATH=persistent, but the persistent ",
              what, " kernel cannot run this call: ",
              plan->why_not != nullptr ? plan->why_not : "(no reason given)");
  return fits;
}

// Whether a persistent launch ran. The planner checked co-residency on an idle device, but
// other work on the GPU (another process, MPS limits) can still make the cooperative launch too
// large; `auto` then runs the general path instead, an explicit `persistent` reports the error.
bool persistent_launched(PathChoice choice, cudaError_t err) {
  if (err == cudaSuccess) return true;
  if (err == cudaErrorCooperativeLaunchTooLarge && choice == PathChoice::kAuto) {
    (void)cudaGetLastError();  // not sticky; clear it so later checks do not see it
    return false;
  }
  C10_CUDA_CHECK(err);
  return false;
}

at::Tensor workspace_for(const PersistentPlan& plan, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(plan.workspace_bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrence_forward(
    const at::Tensor& xproj_in, const at::Tensor& w_hh_in, const std::optional<at::Tensor>& w_hr_in,
    const at::Tensor& h0_in, const at::Tensor& c0_in, const std::optional<at::Tensor>& lengths_in,
    bool reverse, bool save) {
  const RecurrenceSizes s = check_forward_args(xproj_in, w_hh_in, w_hr_in, h0_in, c0_in, lengths_in);
  const at::ScalarType dtype = xproj_in.scalar_type();
  const ScalarKind kind = scalar_kind(dtype);
  const c10::cuda::CUDAGuard guard(xproj_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P;

  ForwardTensors f;
  f.xproj = xproj_in.contiguous();
  f.w_hh = w_hh_in.contiguous();
  if (s.has_proj) f.w_hr = w_hr_in->contiguous();
  if (lengths_in.has_value()) f.lengths = lengths_in->contiguous();
  f.reverse = reverse;
  const at::Tensor h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const auto opts = f.xproj.options(), f32 = opts.dtype(at::kFloat);
  f.y = at::empty({T, B, P}, opts);
  at::Tensor gates = save ? at::empty({T, B, 4 * H}, opts) : at::empty({0}, opts);
  at::Tensor c_all = save ? at::empty({T, B, H}, f32) : at::empty({0}, f32);
  if (save) f.gates = gates, f.c_all = c_all;
  const bool poisoned = poison_outputs();
  poison(poisoned, {&f.y, &gates, &c_all});
  if (B == 0) return {f.y, at::empty({0, P}, opts), at::empty({0, H}, opts), gates, c_all};

  ForwardArgs a;
  a.T = T, a.B = B, a.H = H, a.P = P, a.dtype = kind;
  a.allow_tf32 = dtype == at::kFloat && rnn_allows_tf32();
  a.xproj = f.xproj.data_ptr();
  a.w_hh = f.w_hh.data_ptr();
  a.w_hr = s.has_proj ? f.w_hr.data_ptr() : nullptr;
  a.h0 = h0.data_ptr();
  a.c0 = c0.data_ptr();
  a.lengths = ptr<const int64_t>(f.lengths);
  a.reverse = reverse;
  a.y = f.y.data_ptr();
  a.gates = save ? gates.data_ptr() : nullptr;
  a.c_all = save ? ptr<float>(c_all) : nullptr;

  const PathChoice choice = path_choice();
  if (choice == PathChoice::kCluster) {
    ClusterPlan plan;
    TORCH_CHECK(plan_cluster_forward(a, xproj_in.device().index(), &plan),
                "lstm_fused: LSTM_FUSED_CUDA_PATH=cluster, but the cluster forward kernel cannot "
                "run this call: ", plan.why_not != nullptr ? plan.why_not : "(no reason given)");
    at::Tensor h_n = at::empty({B, P}, opts), c_n = at::empty({B, H}, opts);
    poison(poisoned, {&h_n, &c_n});
    a.h_n = h_n.data_ptr();
    a.c_n = c_n.data_ptr();
    C10_CUDA_CHECK(launch_cluster_forward(a, plan, stream));
    return {f.y, h_n, c_n, gates, c_all};
  }
  PersistentPlan plan;
  if (use_persistent(choice, a, xproj_in.device().index(), &plan, plan_persistent_forward,
                     "forward")) {
    at::Tensor h_n = at::empty({B, P}, opts), c_n = at::empty({B, H}, opts);
    poison(poisoned, {&h_n, &c_n});
    a.h_n = h_n.data_ptr();
    a.c_n = c_n.data_ptr();
    const at::Tensor workspace = workspace_for(plan, f.xproj);
    if (persistent_launched(choice,
                            launch_persistent_forward(a, plan, workspace.data_ptr(), stream))) {
      return {f.y, h_n, c_n, gates, c_all};
    }
  }

  f.h = h0.clone();                                      // becomes h_n
  f.c = c0.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);  // becomes c_n (fp32)
  dispatch_storage(dtype, [&](auto tag) { forward_general<decltype(tag)>(f, stream); });
  return {f.y, f.h, f.c.to(dtype), gates, c_all};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrence_backward(
    const at::Tensor& dy_in, const at::Tensor& dh_n, const at::Tensor& dc_n,
    const at::Tensor& w_hh_in, const std::optional<at::Tensor>& w_hr_in, const at::Tensor& h0_in,
    const at::Tensor& c0_in, const std::optional<at::Tensor>& lengths_in, bool reverse,
    const at::Tensor& y_in, const at::Tensor& gates_in, const at::Tensor& c_all_in,
    bool weight_grads) {
  const RecurrenceSizes s = check_backward_args(dy_in, dh_n, dc_n, w_hh_in, w_hr_in, h0_in, c0_in,
                                                lengths_in, y_in, gates_in, c_all_in);
  const at::ScalarType dtype = gates_in.scalar_type();
  const ScalarKind kind = scalar_kind(dtype);
  const c10::cuda::CUDAGuard guard(gates_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P;

  BackwardTensors g;
  g.dy = dy_in.contiguous();
  g.w_hh = w_hh_in.contiguous();
  if (s.has_proj) g.w_hr = w_hr_in->contiguous();
  g.c0 = c0_in.contiguous();
  if (lengths_in.has_value()) g.lengths = lengths_in->contiguous();
  g.gates = gates_in.contiguous();
  g.c_all = c_all_in.contiguous();
  g.reverse = reverse;
  const at::Tensor y = y_in.contiguous(), h0 = h0_in.contiguous();
  const auto opts = g.gates.options(), f32 = opts.dtype(at::kFloat);
  g.dxproj = at::empty({T, B, 4 * H}, opts);
  const bool poisoned = poison_outputs();
  poison(poisoned, {&g.dxproj});
  const auto no_weight_grad = [&] { return at::empty({0}, opts); };
  if (B == 0) {
    return {g.dxproj,
            weight_grads ? at::zeros({4 * H, P}, opts) : no_weight_grad(),
            weight_grads && s.has_proj ? at::zeros({P, H}, opts) : no_weight_grad(),
            at::empty({0, P}, opts), at::empty({0, H}, opts)};
  }

  BackwardArgs a;
  a.T = T, a.B = B, a.H = H, a.P = P, a.dtype = kind;
  a.allow_tf32 = dtype == at::kFloat && rnn_allows_tf32();
  a.dy = g.dy.data_ptr();
  const at::Tensor dh_n_c = dh_n.contiguous(), dc_n_c = dc_n.contiguous();
  a.dh_n = dh_n_c.data_ptr();
  a.dc_n = dc_n_c.data_ptr();
  a.w_hh = g.w_hh.data_ptr();
  a.w_hr = s.has_proj ? g.w_hr.data_ptr() : nullptr;
  a.c0 = g.c0.data_ptr();
  a.lengths = ptr<const int64_t>(g.lengths);
  a.reverse = reverse;
  a.gates = g.gates.data_ptr();
  a.c_all = ptr<const float>(g.c_all);
  a.dxproj = g.dxproj.data_ptr();

  at::Tensor dh0, dc0;
  PersistentPlan plan;
  bool done = false;
  const PathChoice choice = backward_path_choice();
  if (use_persistent(choice, a, gates_in.device().index(), &plan, plan_persistent_backward,
                     "backward")) {
    TORCH_INTERNAL_ASSERT(!s.has_proj, "lstm_fused: the persistent backward has no projection");
    dh0 = at::empty({B, P}, opts);
    dc0 = at::empty({B, H}, opts);
    poison(poisoned, {&dh0, &dc0});
    a.dh0 = dh0.data_ptr();
    a.dc0 = dc0.data_ptr();
    const at::Tensor workspace = workspace_for(plan, g.gates);
    done = persistent_launched(choice,
                               launch_persistent_backward(a, plan, workspace.data_ptr(), stream));
  }
  if (!done) {
    g.dh = dh_n.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
    g.dc = dc_n.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
    if (s.has_proj && weight_grads) g.dh_tot_all = at::empty({T, B, P}, f32);
    dispatch_storage(dtype, [&](auto tag) { backward_general<decltype(tag)>(g, stream); });
    dh0 = g.dh.to(dtype);
    dc0 = g.dc.to(dtype);
  }

  at::Tensor dw_hh = no_weight_grad(), dw_hr = no_weight_grad();
  if (weight_grads) {
    const Blas blas(dtype);
    dw_hh = recurrent_weight_grad(blas, g.dxproj, y, h0, g.lengths, reverse);
    if (s.has_proj) dw_hr = projection_weight_grad(blas, g.dh_tot_all, g.gates, g.c_all);
  }
  return {g.dxproj, dw_hh, dw_hr, dh0, dc0};
}

}  // namespace
}  // namespace cuda
}  // namespace lstm_fused

TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) {
  m.impl("recurrence_forward", &lstm_fused::cuda::recurrence_forward);
  m.impl("recurrence_backward", &lstm_fused::cuda::recurrence_backward);
}
