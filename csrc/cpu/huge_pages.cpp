#include "cpu/huge_pages.h"

#include <ATen/ops/empty.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mha_ext::cpu {
namespace {

// A fresh 256 MB bias gradient (B=1 H=16 L=S=2048) costs 65,536 page faults on 4 KiB pages, ~100 ms of
// kernel time on 2 cores: on 2 MiB pages its backward runs 12 % faster here. Below this size (the 12 MB
// gradients of B=8 L=512) huge pages cost more in compaction than they save (OPTIMISATIONS.md, row 29).
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
