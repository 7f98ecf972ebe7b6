// What a backend (CPU, CUDA) gives the ops: its kernels and the few facts about them the op bodies need.
// entry.cpp runs the ops on a Backend; register_backend.h binds them to the schemas for one.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "attention/params.h"

namespace mha_ext {

using ForwardKernel = void (*)(const AttentionParams&, at::ScalarType);
using BackwardKernel = void (*)(const AttentionGradParams&, at::ScalarType);
using WeightsKernel = void (*)(const AttentionParams&, at::ScalarType, void* weights);
using DropoutMaskKernel = void (*)(const AttentionParams&, bool* keep);

// (name, text) pairs, in order: a path and why it is not taken, or a property and its value.
using Facts = std::vector<std::pair<std::string, std::string>>;

// The kernel one op of a call runs, its tiles, and for every other path why it is not taken.
struct KernelChoice {
  std::string kernel;
  std::string tiles;
  Facts not_taken;
};

// What explain() reports: the forward's and the backward's choices, and what they depend on (GEMM engine,
// vector ISA, device).
struct Explanation {
  KernelChoice forward;
  KernelChoice backward;
  Facts facts;
};
using ExplainKernel = Explanation (*)(const AttentionParams&, at::ScalarType);

// How the score gradient (AttentionGradParams::grad_scores) is laid out for a backend's backward kernel:
// one (L, S) slab per batch-head, or one per distinct slab of the masks needing a gradient, shared by the
// batch-heads they broadcast over (the kernel adds those up without races; no (grid, L, S) buffer).
enum class GradScoresLayout { kPerBatchHead, kSharedWhereBroadcast };

// Allocates the zero-filled score gradient; nullptr: at::zeros.
using GradScoresZeros = at::Tensor (*)(at::IntArrayRef shape, const at::TensorOptions& options);

struct Backend {
  const char* name;
  ForwardKernel forward;
  BackwardKernel backward;
  WeightsKernel weights;
  DropoutMaskKernel dropout_mask;
  ExplainKernel explain;
  GradScoresLayout grad_scores_layout;
  GradScoresZeros grad_scores_zeros;  // nullptr: at::zeros
  int64_t max_head_dim;               // the largest E and Ev the kernels take (0: any)
};

}  // namespace mha_ext
