// A best-fit arena for PyTorch's large CPU tensors, installed as c10's CPU allocator.
//
// Why: a training step frees and re-allocates the same few hundred activation and gradient
// buffers every step. glibc serves them from one heap shared with every small allocation
// of the process; torch asks for 64-byte-aligned blocks, and the alignment slack and small
// blocks wedged between large free ones stop those from merging (glibc bug 14581). Peak RSS
// ended up 1.4x the peak of live tensor memory (125M model, full fp32: 3.3 GB against 2.4).
// Here blocks >= min_bytes come from one reserved address range that holds nothing else:
// best fit (smallest free block that fits, split, the rest kept), neighbours merged on free,
// the range grown only when nothing fits. Pages stay mapped between steps, so a step
// page-faults nothing once the first has run.
//
// Smaller blocks, and everything once the reserved range is full, go to c10's own allocator.
// The range is reserved with MAP_NORESERVE: it costs address space, not memory, until touched.

#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <set>
#include <utility>

namespace {

constexpr size_t kPage = 4096;

struct Arena final : c10::Allocator {
  c10::Allocator* base = nullptr;  // c10's allocator, for small blocks and overflow
  size_t min_bytes = 0;
  char *lo = nullptr, *top = nullptr, *hi = nullptr;  // reserved [lo, hi), used up to top
  std::mutex mu;
  std::map<char*, std::pair<size_t, bool>> blocks;  // start -> (size, free); tiles [lo, top)
  std::set<std::pair<size_t, char*>> free_by_size;  // best fit: lower_bound of (size, nullptr)
  size_t live = 0, peak_top = 0, overflows = 0;

  static void release(void* p);

  char* take(size_t n) {  // caller holds mu
    auto it = free_by_size.lower_bound({n, nullptr});
    if (it != free_by_size.end()) {
      auto [size, p] = *it;
      free_by_size.erase(it);
      auto& b = blocks[p];
      b.second = false;
      if (size > n) {  // split: the tail stays free
        b.first = n;
        blocks[p + n] = {size - n, true};
        free_by_size.insert({size - n, p + n});
      }
      return p;
    }
    char* p = top;  // grow; a free block that ends at top becomes the new block's start
    if (!blocks.empty()) {
      auto last = std::prev(blocks.end());
      if (last->second.second) {
        p = last->first;
        free_by_size.erase({last->second.first, p});
        blocks.erase(last);
      }
    }
    if (n > size_t(hi - p)) {  // full: put the free tail back
      if (p != top) {
        blocks[p] = {size_t(top - p), true};
        free_by_size.insert({size_t(top - p), p});
      }
      return nullptr;
    }
    blocks[p] = {n, false};
    top = p + n;
    peak_top = std::max(peak_top, size_t(top - lo));
    return p;
  }

  void give(char* p) {  // caller holds mu
    auto it = blocks.find(p);
    TORCH_INTERNAL_ASSERT(it != blocks.end() && !it->second.second, "yunque arena: free of an unknown block");
    live -= it->second.first;
    it->second.second = true;
    auto next = std::next(it);
    if (next != blocks.end() && next->second.second) {
      free_by_size.erase({next->second.first, next->first});
      it->second.first += next->second.first;
      blocks.erase(next);
    }
    if (it != blocks.begin()) {
      auto prev = std::prev(it);
      if (prev->second.second) {
        free_by_size.erase({prev->second.first, prev->first});
        prev->second.first += it->second.first;
        blocks.erase(it);
        it = prev;
      }
    }
    free_by_size.insert({it->second.first, it->first});
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes) return base->allocate(n);
    size_t want = (n + kPage - 1) & ~(kPage - 1);
    char* p;
    {
      std::lock_guard<std::mutex> lock(mu);
      p = take(want);
      if (p) live += want;
      else overflows++;
    }
    if (!p) return base->allocate(n);
    return {p, p, &Arena::release, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate() keeps only the pointer and frees it with raw_deleter(), whichever
  // allocator (this one or base, for small blocks) made it: release() tells them apart.
  c10::DeleterFnPtr raw_deleter() const override { return &Arena::release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

// Never destroyed: tensors are still freed during interpreter teardown, after static destructors.
Arena* arena = new Arena();

void Arena::release(void* ptr) {
  char* p = static_cast<char*>(ptr);
  if (p < arena->lo || p >= arena->hi) {
    arena->base->raw_deleter()(ptr);
    return;
  }
  std::lock_guard<std::mutex> lock(arena->mu);
  arena->give(p);
}

}  // namespace

extern "C" {

// Reserve `reserve` bytes and serve blocks >= min_bytes from them. 1 on success (or if already
// installed), 0 if the range cannot be reserved (then nothing changes).
int yq_arena_install(long min_bytes, long reserve) {
  if (arena->lo) return 1;
  void* r = mmap(nullptr, size_t(reserve), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (r == MAP_FAILED) return 0;
  // A fork()ed child must not inherit the lock held by another thread mid-allocation.
  pthread_atfork([] { arena->mu.lock(); }, [] { arena->mu.unlock(); }, [] { arena->mu.unlock(); });
  arena->base = c10::GetDefaultCPUAllocator();
  arena->min_bytes = size_t(min_bytes);
  arena->lo = arena->top = static_cast<char*>(r);
  arena->hi = arena->lo + reserve;
  c10::SetCPUAllocator(arena, /*priority=*/1);
  return 1;
}

// {used range, free bytes within it, live bytes, peak used range, overflows to c10's allocator}
void yq_arena_stats(long* out) {
  std::lock_guard<std::mutex> lock(arena->mu);
  size_t free_bytes = 0;
  for (auto& f : arena->free_by_size) free_bytes += f.first;
  out[0] = long(arena->top - arena->lo);
  out[1] = long(free_bytes);
  out[2] = long(arena->live);
  out[3] = long(arena->peak_top);
  out[4] = long(arena->overflows);
}

// Give the pages of free blocks back to the OS (they read as zeros when reused); for the end
// of training in a process that goes on. Returns the bytes released.
long yq_arena_release_free() {
  std::lock_guard<std::mutex> lock(arena->mu);
  long n = 0;
  for (auto& [size, p] : arena->free_by_size) {
    if (madvise(p, size, MADV_DONTNEED) == 0) n += long(size);
  }
  return n;
}
}
