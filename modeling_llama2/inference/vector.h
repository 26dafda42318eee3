// What the CPU kernels share: the vector type of rows_linear.cpp and one_query_attention.cpp (eight floats as a GCC
// vector, which the compiler maps to AVX2, AVX-512 halves or two NEON registers, whatever -march=native finds), and
// the prefetch distance of streamed int8 weight rows (rows_linear.cpp, int8_rows_linear.cpp).
#pragma once

#include <cstring>

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

}  // namespace modeling_llama2
