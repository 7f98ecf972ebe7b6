#include "cpu/huge_pages.h"

#include <ATen/ops/empty.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mha_ext::cpu {
namespace {

// A fresh gradient of hundreds of MB faults in a page per 4 KiB, a large share of its backward's time; 2 MiB
// pages take 512 times fewer faults. Below this size huge pages cost more in compaction than they save.
constexpr int64_t kHugePageMinBytes = int64_t(64) << 20;
constexpr uintptr_t kHugePageBytes = uintptr_t(2) << 20;

void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~(kHugePageBytes - 1);
  // Advice only: where it is refused (THP off, or pages already mapped), the pages stay 4 KiB.
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace

at::Tensor zeros_on_huge_pages(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (bytes >= kHugePageMinBytes) advise_huge_pages(t.data_ptr(), bytes);
  return t.zero_();
}

}  // namespace mha_ext::cpu
