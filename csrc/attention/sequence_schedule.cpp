#include "attention/sequence_schedule.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <numeric>

namespace mha_ext {

void for_each_sequence(const std::vector<int64_t>& work, bool parallel, const std::function<void(int64_t)>& run) {
  const int64_t count = static_cast<int64_t>(work.size());
  const int64_t threads = parallel && !at::in_parallel_region() ? at::get_num_threads() : 1;
  if (threads <= 1 || count <= 1) {
    for (int64_t n = 0; n < count; ++n) run(n);
    return;
  }
  const int64_t total = std::accumulate(work.begin(), work.end(), int64_t{0});
  std::vector<int64_t> small;
  for (int64_t n = 0; n < count; ++n) {
    if (work[n] * threads >= total) {
      run(n);  // the kernels spread it over the threads
    } else {
      small.push_back(n);
    }
  }
  // Largest first, each to the least loaded thread: within 4/3 of the best split.
  std::stable_sort(small.begin(), small.end(), [&](int64_t a, int64_t b) { return work[a] > work[b]; });
  std::vector<std::vector<int64_t>> groups(threads);
  std::vector<int64_t> load(threads, 0);
  for (const int64_t n : small) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    groups[t].push_back(n);
    load[t] += work[n];
  }
  // One group per thread; the kernels' own parallel loops run inline inside this one. The workers take the
  // caller's thread-local state (inference mode, grad mode, dispatch keys): they allocate and copy tensors.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller_state);
    for (int64_t t = begin; t < end; ++t) {
      for (const int64_t n : groups[t]) run(n);
    }
  });
}

}  // namespace mha_ext
