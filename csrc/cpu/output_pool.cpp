// The pool of large CPU outputs (see output_pool.h).
#include "cpu/output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace lstm_fused::cpu {
namespace {

// Blocks of a huge page or more are whole huge pages; smaller ones (weight gradients, the
// outputs of short sequences) are rounded to 64 KB, so that a block still serves outputs a
// little smaller or larger than the one it was made for.
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kSmallBlockAlign = size_t(64) << 10;
constexpr int64_t kDefaultIdleMb = 256;

// The cap on idle bytes from LSTM_FUSED_CPU_POOL_MB; false if the value is not a size.
bool parse_idle_cap(size_t* cap) {
  const char* set = std::getenv("LSTM_FUSED_CPU_POOL_MB");
  if (set == nullptr || *set == '\0') {
    *cap = size_t(kDefaultIdleMb) << 20;
    return true;
  }
  char* end = nullptr;
  const long long mb = std::strtoll(set, &end, 10);
  if (*end != '\0' || mb < 0) return false;
  *cap = size_t(mb) << 20;
  return true;
}

struct Block {
  void* ptr;
  size_t bytes;
};

void return_to_os(const Block& b) { std::free(b.ptr); }  // aligned_alloc'd

class OutputPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    // Small requests go to the default allocator (glibc's heap keeps those itself).
    if (static_cast<int64_t>(n) < kMinPooledBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    size_t cap = 0;
    TORCH_CHECK(parse_idle_cap(&cap), "lstm_fused: LSTM_FUSED_CPU_POOL_MB=", std::getenv("LSTM_FUSED_CPU_POOL_MB"),
                " is not a size in MB (0: no pool)");
    const size_t align = n >= kHugePage ? kHugePage : kSmallBlockAlign;
    const size_t bytes = (n + align - 1) / align * align;
    Block* block = new Block{take(bytes), bytes};
    if (block->ptr == nullptr) {
      block->ptr = std::aligned_alloc(align, bytes);
      if (block->ptr == nullptr) {
        delete block;
        TORCH_CHECK(false, "lstm_fused: out of memory allocating ", bytes, " bytes");
      }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (align == kHugePage) madvise(block->ptr, bytes, MADV_HUGEPAGE);  // advice: ignore errors
#endif
      std::lock_guard<std::mutex> lock(mutex_);
      ++mapped_;
    }
    return {block->ptr, block, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  OutputPoolStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(idle_bytes_), static_cast<int64_t>(idle_.size()), reused_, mapped_};
  }

  void clear() {
    std::list<Block> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      freed.swap(idle_);
      idle_bytes_ = 0;
    }
    for (const Block& b : freed) return_to_os(b);
  }

 private:
  // The smallest idle block of at least `bytes` and at most a quarter more, or null.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it)
      if (it->bytes >= bytes && it->bytes <= bytes + bytes / 4 && (best == idle_.end() || it->bytes < best->bytes))
        best = it;
    if (best == idle_.end()) return nullptr;
    void* ptr = best->ptr;
    // The block keeps its own size: a tensor's storage knows only the bytes it asked for, and
    // the deleter gives the whole block back.
    idle_bytes_ -= best->bytes;
    idle_.erase(best);
    ++reused_;
    return ptr;
  }

  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    instance().give_back(*block);
    delete block;
  }

  // Runs in a tensor's deleter, so it must not throw: a cap that does not parse (allocate has
  // refused it already) keeps nothing.
  void give_back(const Block& block) {
    size_t cap = 0;
    if (!parse_idle_cap(&cap)) cap = 0;
    std::vector<Block> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle_.push_back(block);
      idle_bytes_ += block.bytes;
      while (!idle_.empty() && idle_bytes_ > cap) {  // oldest first
        idle_bytes_ -= idle_.front().bytes;
        freed.push_back(idle_.front());
        idle_.pop_front();
      }
    }
    for (const Block& b : freed) return_to_os(b);
  }

 public:
  // Never destroyed: tensors may free their blocks during interpreter shutdown, after static
  // destructors have run.
  static OutputPool& instance() {
    static OutputPool* pool = [] {
      auto* made = new OutputPool();
#ifdef __linux__
      // A fork (a DataLoader worker) while another thread holds the lock would leave the child's
      // copy locked forever: hold it across the fork, so both sides start consistent and unlocked.
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
#endif
      return made;
    }();
    return *pool;
  }

 private:
  std::mutex mutex_;
  std::list<Block> idle_;  // oldest first
  size_t idle_bytes_ = 0;
  int64_t reused_ = 0, mapped_ = 0;
};

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &OutputPool::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

OutputPoolStats output_pool_stats() { return OutputPool::instance().stats(); }

void output_pool_clear() { OutputPool::instance().clear(); }

}  // namespace lstm_fused::cpu
