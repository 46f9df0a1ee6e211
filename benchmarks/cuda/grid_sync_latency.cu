// Per-step cost of the grid-wide synchronisation options for a persistent recurrent kernel.
// CUDA runtime only:
//
//   nvcc -std=c++17 -O3 -arch=sm_90 benchmarks/cuda/grid_sync_latency.cu -o /tmp/sync && /tmp/sync
//
// Every block does what a persistent LSTM step does around its barrier (publish a slice of the
// state, wait for all slices, read the whole state back from L2) with no math, for `steps`
// steps, over several grid sizes. Options:
//   counter  one global arrival counter: __threadfence + atomicAdd, then spin on an acquire load
//   release  the same counter with one release add (red.release.gpu) and no fences; what
//            csrc/cuda/persistent_common.cuh uses
//   grid     cooperative_groups::this_grid().sync()
//   flags    every block writes its own step flag; consumers poll all flags (a warp each)
//   cluster  (sm_90 only) one thread-block cluster: slices in each block's shared memory, read
//            by the others through distributed shared memory, one cluster barrier per step;
//            the floor of a persistent kernel whose W_hh fits in one cluster (up to 16 blocks)
// Prints one markdown row per (option, blocks) with microseconds per step (CUDA events, median
// of 5 launches after a warm-up).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

namespace cg = cooperative_groups;

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

constexpr int kThreads = 256;
constexpr int kSlice = 16;  // state elements each block publishes per step (floats)

__device__ inline unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Publish this block's slice of step s.
__device__ inline float publish(float* state, int s, float carry) {
  const int nb = gridDim.x;
  float* out = state + (s & 1) * nb * kSlice;
  if (threadIdx.x < kSlice) out[blockIdx.x * kSlice + threadIdx.x] = carry + s;
  return carry;
}
// After the barrier: read the whole state back, as the next step's GEMM would, so the cost of
// pulling freshly written lines from L2 is part of the measured step.
__device__ inline float read_state(const float* state, int s) {
  const int nb = gridDim.x;
  const float* in = state + (s & 1) * nb * kSlice;
  float acc = 0.f;
  for (int i = threadIdx.x; i < nb * kSlice; i += kThreads) acc += __ldcg(in + i);
  return acc;
}

// One global arrival counter; kRelease: a single release add (red.release.gpu), else
// __threadfence then a relaxed atomicAdd.
template <bool kRelease>
__global__ void sync_counter(float* state, unsigned* counter, int steps, float* sink) {
  float carry = 0.f;
  for (int s = 0; s < steps; ++s) {
    carry = publish(state, s, carry);
    __syncthreads();
    if (threadIdx.x == 0) {
      if (kRelease) {
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
      } else {
        __threadfence();
        atomicAdd(counter, 1u);
      }
      const unsigned target = (s + 1) * gridDim.x;
      while (load_acquire(counter) < target) {
      }
    }
    __syncthreads();
    carry += read_state(state, s) * 1e-9f;
  }
  if (carry == 12345.f) *sink = carry;
}

__global__ void sync_grid(float* state, unsigned*, int steps, float* sink) {
  cg::grid_group grid = cg::this_grid();
  float carry = 0.f;
  for (int s = 0; s < steps; ++s) {
    carry = publish(state, s, carry);
    grid.sync();
    carry += read_state(state, s) * 1e-9f;
  }
  if (carry == 12345.f) *sink = carry;
}

// flags[b] = last step block b finished. Warp 0 of each block polls all flags.
__global__ void sync_flags(float* state, unsigned* flags, int steps, float* sink) {
  float carry = 0.f;
  const int nb = gridDim.x;
  for (int s = 0; s < steps; ++s) {
    carry = publish(state, s, carry);
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      atomicExch(flags + blockIdx.x, static_cast<unsigned>(s + 1));
    }
    if (threadIdx.x < 32) {
      for (int b = threadIdx.x; b < nb; b += 32) {
        while (load_acquire(flags + b) < static_cast<unsigned>(s + 1)) {
        }
      }
      __threadfence();
    }
    __syncthreads();
    carry += read_state(state, s) * 1e-9f;
  }
  if (carry == 12345.f) *sink = carry;
}

// One cluster of gridDim.x blocks; the state slices live in shared memory, double-buffered by
// step parity like the global exchange buffer, so one cluster barrier per step is enough.
__global__ void sync_cluster(float* state, unsigned*, int steps, float* sink) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ float slice[2][kSlice];
  const int nb = static_cast<int>(cluster.num_blocks());
  float carry = 0.f;
  for (int s = 0; s < steps; ++s) {
    if (threadIdx.x < kSlice) slice[s & 1][threadIdx.x] = carry + s;
    cluster.sync();
    float acc = 0.f;
    for (int i = threadIdx.x; i < nb * kSlice; i += kThreads) {
      const float* remote = cluster.map_shared_rank(&slice[s & 1][0], i / kSlice);
      acc += remote[i % kSlice];
    }
    carry += acc * 1e-9f;
  }
  cluster.sync();  // no block may exit while another still reads its shared memory
  if (carry == 12345.f) *sink = carry;
  (void)state;
#endif
}

using Kernel = void (*)(float*, unsigned*, int, float*);

// Microseconds per step of sync_cluster with one cluster of `blocks` blocks, or a negative
// value when the device cannot launch that cluster (cluster sizes above 8 are non-portable).
float time_cluster(int blocks, int steps, float* state, unsigned* sync, float* sink) {
  if (blocks > 8 &&
      cudaFuncSetAttribute(sync_cluster, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
          cudaSuccess) {
    cudaGetLastError();
    return -1.f;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kThreads);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = blocks;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, sync_cluster, &config) != cudaSuccess ||
      clusters < 1) {
    cudaGetLastError();
    return -1.f;
  }
  std::vector<float> ms;
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int rep = 0; rep < 6; ++rep) {
    CHECK(cudaEventRecord(a));
    CHECK(cudaLaunchKernelEx(&config, sync_cluster, state, sync, steps, sink));
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float t;
    CHECK(cudaEventElapsedTime(&t, a, b));
    if (rep > 0) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return ms[ms.size() / 2] * 1000.f / steps;
}

float time_option(Kernel k, int blocks, int steps, float* state, unsigned* sync, float* sink) {
  std::vector<float> ms;
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int rep = 0; rep < 6; ++rep) {
    CHECK(cudaMemset(sync, 0, 1024 * sizeof(unsigned)));
    void* args[] = {&state, &sync, &steps, &sink};
    CHECK(cudaEventRecord(a));
    CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(k), dim3(blocks), dim3(kThreads),
                                      args, 0, nullptr));
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float t;
    CHECK(cudaEventElapsedTime(&t, a, b));
    if (rep > 0) ms.push_back(t);  // the first launch is the warm-up
  }
  std::sort(ms.begin(), ms.end());
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return ms[ms.size() / 2] * 1000.f / steps;  // us per step
}

int main() {
  int dev = 0, sms = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  const int steps = 2000;
  float *state, *sink;
  unsigned* sync;
  CHECK(cudaMalloc(&state, 2 * 1024 * kSlice * sizeof(float)));
  CHECK(cudaMemset(state, 0, 2 * 1024 * kSlice * sizeof(float)));
  CHECK(cudaMalloc(&sync, 1024 * sizeof(unsigned)));
  CHECK(cudaMalloc(&sink, sizeof(float)));
  std::printf("# grid sync latency on %s (%d SMs), %d steps, %d threads/block\n\n", prop.name, sms,
              steps, kThreads);
  std::printf("| option | blocks | us/step |\n|---|---|---|\n");
  const struct {
    const char* name;
    Kernel k;
  } options[] = {{"counter", sync_counter<false>},
                 {"release", sync_counter<true>},
                 {"grid", sync_grid},
                 {"flags", sync_flags}};
  for (int blocks : {8, 16, 32, 48, 64, 96, 128, sms}) {
    if (blocks > sms) continue;
    for (const auto& o : options) {
      std::printf("| %s | %d | %.3f |\n", o.name, blocks,
                  time_option(o.k, blocks, steps, state, sync, sink));
    }
  }
  if (prop.major >= 9) {
    for (int blocks : {2, 4, 8, 16}) {
      const float us = time_cluster(blocks, steps, state, sync, sink);
      if (us < 0)
        std::printf("| cluster | %d | cannot launch |\n", blocks);
      else
        std::printf("| cluster | %d | %.3f |\n", blocks, us);
    }
  }
  return 0;
}
