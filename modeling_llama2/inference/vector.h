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

// The parts of `weights` (each (out, in), contiguous, of element type W) and their `scales` (none, or one per
// weight).
template <typename W>
std::vector<Part<W>> parts_of(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& scales) {
  std::vector<Part<W>> parts;
  for (size_t k = 0; k < weights.size(); ++k)
    parts.push_back({weights[k].const_data_ptr<W>(), scales.empty() ? nullptr : scales[k].const_data_ptr<float>(),
                     weights[k].size(0)});
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
