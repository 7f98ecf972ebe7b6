// The order in which a packed (varlen) call runs its sequences: a sequence holding at least one thread's share
// of the work runs alone with the kernels' own parallelism over its heads and rows; the smaller ones run side
// by side, one thread each, grouped so that the threads get about equal work (a batch of one long and many
// short sequences keeps every core busy). Each sequence is computed by the same code whichever thread runs it,
// so the results do not depend on the schedule.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace mha_ext {

// Calls run(n) once for every n in [0, work.size()); work[n] is sequence n's cost in any unit. parallel = false
// (a device backend, whose launches are asynchronous anyway) runs them one after another.
void for_each_sequence(const std::vector<int64_t>& work, bool parallel, const std::function<void(int64_t)>& run);

}  // namespace mha_ext
