// What the CPU kernels share: the vector type of rows_linear.cpp and one_query_attention.cpp (eight floats as a GCC
// vector, which the compiler maps to AVX2, AVX-512 halves or two NEON registers, whatever -march=native finds), and
// for rows_linear.cpp and int8_rows_linear.cpp the prefetch distance of streamed int8 weight rows and the weights of
// one call.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace modeling_llama2 {

constexpr int kLanes = 8;
// How far ahead (bytes) a streamed int8 weight row is prefetched: 1.2x at one row (rows_linear.cpp), where fp32
// rows ran slower with it.
constexpr long kPrefetch = 2048;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

inline float hsum(vfloat v) {
  float s = 0.f;
  for (int k = 0; k < kLanes; ++k) s += v[k];
  return s;
}

// One weight of a call that multiplies the same x by several weights (a layer's q, k and v projections): `out`
// rows from `w`, with one scale per row for an int8 weight. A call's weights number their rows one after the
// other, as the columns of its one output. One call and one parallel region for all of them saves each layer of a
// decode step three kernel calls (q, k, v and gate, up), each with its dispatch and its threads' start and join.
template <typename W>
struct Part {
  const W* w;
  const float* scale;
  int64_t out;
};

// The weights of one call on x (rows, in), checked and made contiguous (`op` names the kernel in its errors):
// (out, in) each, on the CPU, all float32 or all int8, an int8 one with one float32 scale per row, a float32 one
// with none; `out` is their rows together, the columns of the call's output.
struct Weights {
  std::vector<at::Tensor> w, scale;
  int64_t out = 0;
  bool int8 = false;
};

inline Weights call_weights(const char* op, const at::Tensor& x, at::TensorList weights, at::TensorList scales) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.scalar_type() == at::kFloat, op,
              ": x (rows, in), float32 on the CPU expected, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(!weights.empty(), op, ": at least one weight expected");
  Weights call;
  call.int8 = weights[0].scalar_type() == at::kChar;
  TORCH_CHECK(call.int8 ? scales.size() == weights.size() : scales.empty(), op,
              ": int8 weights take one scale tensor for each, float32 weights none");
  for (size_t k = 0; k < weights.size(); ++k) {
    const at::Tensor& w = weights[k];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && w.device().is_cpu(), op,
                ": weights (out, in) on the CPU with x's ", x.size(1), " inputs expected, got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == (call.int8 ? at::kChar : at::kFloat), op,
                ": the weights of one call are all float32 or all int8, got ", weights[0].scalar_type(), " and ",
                w.scalar_type());
    if (call.int8) {
      TORCH_CHECK(scales[k].scalar_type() == at::kFloat && scales[k].numel() == w.size(0), op,
                  ": an int8 weight needs one float32 scale per output row");
      call.scale.push_back(scales[k].contiguous());
    }
    call.w.push_back(w.contiguous());
    call.out += w.size(0);
  }
  return call;
}

// The parts of a call's weights, of element type W.
template <typename W>
std::vector<Part<W>> parts_of(const Weights& call) {
  std::vector<Part<W>> parts;
  for (size_t k = 0; k < call.w.size(); ++k)
    parts.push_back({call.w[k].const_data_ptr<W>(), call.int8 ? call.scale[k].const_data_ptr<float>() : nullptr,
                     call.w[k].size(0)});
  return parts;
}

// Calls f(part, row of that part, column of y) for the columns begin..end of a call's output.
template <typename W, typename F>
inline void for_rows(const std::vector<Part<W>>& parts, int64_t begin, int64_t end, F f) {
  int64_t first = 0;
  for (const Part<W>& part : parts) {
    const int64_t last = first + part.out;
    for (int64_t o = std::max(begin, first); o < std::min(end, last); ++o) f(part, o - first, o);
    first = last;
  }
}

}  // namespace modeling_llama2
