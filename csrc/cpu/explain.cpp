// What the CPU backend runs for a call (mha_ext.explain): each op's choice, and what the choices depend on.
#include <ATen/Parallel.h>

#include <string>

#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "cpu/row_ops.h"

namespace mha_ext::cpu {

Explanation explain_cpu(const AttentionParams& p, at::ScalarType dtype) {
  Explanation explanation{explain_forward_cpu(p, dtype), explain_backward_cpu(p, dtype), {}};
  explanation.facts = {{"cpu_gemm", gemm_engine()},
                       {"row passes", row_ops().isa},
                       {"bfloat16 products", bf16_vnni_available() ? "vnni" : "float"},
                       {"threads", std::to_string(at::get_num_threads())}};
  return explanation;
}

}  // namespace mha_ext::cpu
