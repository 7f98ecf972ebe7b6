// What the CUDA backend runs for a call (mha_ext.explain): tensor cores or CUDA cores for the forward and the
// backward, their tiles, and the device. The choice itself is dispatch.cpp's tensor_cores_unavailable.
#include <algorithm>
#include <string>

#include "attention/settings.h"
#include "cuda/kernel_traits.cuh"
#include "cuda/launch.h"
#include "cuda/launch_kernel.cuh"
#include "cuda/static_switch.h"

namespace mha_ext::cuda {
namespace {

std::string tile_text(int block_q, int block_k) {
  return std::to_string(block_q) + " query rows x " + std::to_string(block_k) + " keys";
}

// The tiles of each kernel of the op, for head dims up to max(E, Ev).
std::string tiles(bool backward, bool tensor_cores, const AttentionParams& p, at::ScalarType dtype) {
  return MHA_DTYPE_SWITCH(dtype, scalar_t, [&] {
    return MHA_HEADDIM_SWITCH(std::max(p.E, p.Ev), kHeadDim, [&] {
      if (tensor_cores) {
        return MHA_BOOL_SWITCH(scores_need_masking(p), kMasked, [&] {
          if (!backward) {
            return tile_text(ForwardMmaTraits<kHeadDim, kMasked>::kBlockQ,
                             ForwardMmaTraits<kHeadDim, kMasked>::kBlockK);
          }
          using Key = KeyGradMmaTraits<kHeadDim, kMasked>;
          using Query = QueryGradMmaTraits<kHeadDim, kMasked>;
          return "dK/dV: " + tile_text(Key::kStreamedRows, Key::kOwnedRows) +
                 (Key::kJointKeyGrads ? "" : ", dV and dK in two passes") +
                 "; dQ: " + tile_text(Query::kOwnedRows, Query::kStreamedRows);
        });
      }
      if (!backward) {
        using Forward = TileTraits<scalar_t, kHeadDim, ForwardSmem>;
        return tile_text(Forward::kBlockQ, Forward::kBlockK);
      }
      using Key = TileTraits<scalar_t, kHeadDim, KeyGradSmem>;
      using Query = TileTraits<scalar_t, kHeadDim, QueryGradSmem>;
      return "dK/dV: " + tile_text(Key::kBlockQ, Key::kBlockK) + "; dQ: " + tile_text(Query::kBlockQ, Query::kBlockK);
    });
  });
}

KernelChoice choice(bool backward, const AttentionParams& p, at::ScalarType dtype) {
  const std::string unavailable = tensor_cores_unavailable(backward, p, dtype);
  const bool tensor_cores = unavailable.empty();
  KernelChoice choice;
  if (tensor_cores) {
    if (!backward) {
      choice.kernel = "tensor cores (forward_mma_kernel): mma.sync m16n8k16 products, scores, probabilities and "
                      "output in registers, ldmatrix operands, K/V streamed by cp.async, float32 accumulation";
    } else {
      choice.kernel = "tensor cores (backward_mma_kernel): mma.sync m16n8k16 products, S^T/dP^T (dK/dV) and S/dP "
                      "(dQ) and the gradients in registers, ldmatrix operands, tiles streamed by cp.async, float32 "
                      "accumulation";
    }
    choice.not_taken.emplace_back("CUDA cores", "float16 and bfloat16 run on tensor cores where the build and device allow");
  } else {
    choice.kernel = std::string("CUDA cores, in ") + (dtype == at::kDouble ? "float64" : "float32");
    choice.not_taken.emplace_back("tensor cores", unavailable);
  }
  choice.tiles = tiles(backward, tensor_cores, p, dtype) +
                 "; key tiles that causality or the bool mask leave empty are skipped";
  return choice;
}

}  // namespace

Explanation explain_cuda(const AttentionParams& p, at::ScalarType dtype) {
  return {choice(false, p, dtype), choice(true, p, dtype),
          {{"device", device_description()},
           {"cuda_tensor_cores", kernel_settings().cuda_tensor_cores ? "on" : "off"}}};
}

}  // namespace mha_ext::cuda
