// A standalone driver of the emulated persistent kernels for ThreadSanitizer
// (tests/test_cuda_emulated.py::test_kernels_race_free_under_tsan builds it with
// -fsanitize=thread). The emulator maps the kernels' grid barrier onto C++ atomics with the
// same orderings (release add, acquire spin, block barriers), so a missing happens-before edge
// between one block writing the exchange buffer and another reading it is reported as a data
// race; the same holds for the cluster kernel's barrier and its writes into peers' shared
// memory. Covers forward and backward, one and several pointwise items per thread, one and two
// batch groups, lengths and reverse, and the cluster forward with one and several clusters.
// Values are not checked here; the parity tests do that.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "emulated_kernels.cpp"

namespace {

constexpr int kExactFp32 = 3;  // emulated_forward/backward dtype code: fp32, exact FMAs

// Random inputs of one forward call, with ragged lengths (0 and T included).
struct Inputs {
  std::vector<float> xproj, w, h0, c0;
  std::vector<int64_t> lengths;
  std::vector<float> y, h_n, c_n, gates, c_all;  // the forward's outputs
  Inputs(int T, int B, int H, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.f, 0.3f);
    auto draw = [&](size_t n) {
      std::vector<float> v(n);
      for (float& x : v) x = normal(rng);
      return v;
    };
    const size_t TB = static_cast<size_t>(T) * B;
    xproj = draw(TB * 4 * H), w = draw(4 * H * H), h0 = draw(B * H), c0 = draw(B * H);
    lengths.resize(B);
    for (int b = 0; b < B; ++b) lengths[b] = (3 * b) % (T + 1);
    y.resize(TB * H), h_n.resize(B * H), c_n.resize(B * H), gates.resize(TB * 4 * H);
    c_all.resize(TB * H);
  }
};

int run(int T, int B, int H, int units, int groups, bool reverse) {
  Inputs in(T, B, H, T * 1000 + B * 10 + groups);
  const int rc =
      emulated_forward(kExactFp32, units, T, B, H, 32, groups, reverse, in.xproj.data(),
                       in.w.data(), in.h0.data(), in.c0.data(), in.lengths.data(), in.y.data(),
                       in.h_n.data(), in.c_n.data(), in.gates.data(), in.c_all.data());
  if (rc != 0) return rc;
  // dy, dh_n, dc_n: a second draw's xproj (T*B*4H values, of which dy takes T*B*H), h0, c0.
  const Inputs grad(T, B, H, 7 + T);
  std::vector<float> dxproj(in.gates.size()), dh0(B * H), dc0(B * H);
  return emulated_backward(kExactFp32, T, B, H, 32, groups, reverse, grad.xproj.data(),
                           grad.h0.data(), grad.c0.data(), in.w.data(), in.c0.data(),
                           in.lengths.data(), in.gates.data(), in.c_all.data(), dxproj.data(),
                           dh0.data(), dc0.data());
}

int run_cluster(int T, int B, int H, int units, int Bg, bool reverse) {
  Inputs in(T, B, H, T * 1000 + B * 10 + Bg);
  return emulated_cluster_forward(kExactFp32, units, T, B, H, Bg, reverse, in.xproj.data(),
                                  in.w.data(), in.h0.data(), in.c0.data(), in.lengths.data(),
                                  in.y.data(), in.h_n.data(), in.c_n.data(), in.gates.data(),
                                  in.c_all.data());
}

}  // namespace

int main() {
  struct Case {
    int T, B, H, units, groups;
    bool reverse;
  } cases[] = {
      {3, 5, 20, 4, 1, false},   // one item per thread, forward and backward
      {3, 6, 20, 4, 2, true},    // two batch groups
      {3, 70, 20, 4, 1, true},   // forward: several items per thread (70 x 4 > 256)
      {3, 20, 20, 4, 1, false},  // backward: several items per thread (20 x 16 > 256)
  };
  for (const Case& c : cases) {
    const int rc = run(c.T, c.B, c.H, c.units, c.groups, c.reverse);
    std::printf("T=%d B=%d H=%d units=%d groups=%d reverse=%d: rc %d\n", c.T, c.B, c.H, c.units,
                c.groups, c.reverse, rc);
    if (rc != 0) return 1;
  }
  struct ClusterCase {
    int T, B, H, units, Bg;
    bool reverse;
  } cluster_cases[] = {
      {4, 3, 40, 8, 3, false},  // one cluster of 5 blocks
      {3, 6, 24, 8, 2, true},   // three clusters of 3 blocks
  };
  for (const ClusterCase& c : cluster_cases) {
    const int rc = run_cluster(c.T, c.B, c.H, c.units, c.Bg, c.reverse);
    std::printf("cluster T=%d B=%d H=%d units=%d Bg=%d reverse=%d: rc %d\n", c.T, c.B, c.H, c.units,
                c.Bg, c.reverse, rc);
    if (rc != 0) return 1;
  }
  return 0;
}
