// Binds the ops of ops.cpp's schemas to one Backend's kernels: the one registration that the CPU and CUDA
// backends (register.cpp each) and the tests' CUDA emulator share, so that an op's arguments are spelled
// once in C++, in entry.h.
#pragma once

#include <ATen/DeviceGuard.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "attention/entry.h"
#include "attention/varlen.h"

namespace mha_ext {

template <auto body, const Backend& backend, typename Signature = decltype(body)>
struct BackendOp;

// body(backend, first, rest...) on the device of the op's first tensor, so that a backend's launches go to
// the device of the tensors they read.
template <auto body, const Backend& backend, typename Result, typename... Rest>
struct BackendOp<body, backend, Result (*)(const Backend&, const at::Tensor&, Rest...)> {
  static Result call(const at::Tensor& first, Rest... rest) {
    const c10::OptionalDeviceGuard guard(at::device_of(first));
    return body(backend, first, rest...);
  }
};

template <const Backend& backend>
void register_backend(torch::Library& m) {
  m.impl("attention_forward", &BackendOp<&attention_forward, backend>::call);
  m.impl("attention_backward", &BackendOp<&attention_backward, backend>::call);
  m.impl("attention_weights", &BackendOp<&attention_weights, backend>::call);
  m.impl("attention_dropout_mask", &BackendOp<&attention_dropout_mask, backend>::call);
  m.impl("attention_explain", &BackendOp<&attention_explain, backend>::call);
  m.impl("varlen_attention_forward", &BackendOp<&varlen_attention_forward, backend>::call);
  m.impl("varlen_attention_backward", &BackendOp<&varlen_attention_backward, backend>::call);
}

}  // namespace mha_ext
