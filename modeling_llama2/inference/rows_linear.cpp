// y = x W^T for a few rows of x (decoding: one token, a batch or best-of-N samples), reading every weight once for
// all rows; one call may take several weights of the same x (a layer's q, k and v), their outputs side by side.
// MKL's and oneDNN's small-M kernels read the weight at 3-7 GB/s at 8 rows on this project's 2-core x86 CPU; these
// loops keep a tile of weight rows in L1 while all rows of x pass over it, or, where x fits in L1, stream
// each weight row once past all rows of x (see cpu_kernels.py and benchmarks/README.md for the measurements). The
// weight is fp32, or int8 with one fp32 scale per output (weight-only: x is not rounded).
//
// Built on first use by torch.utils.cpp_extension with -march=native and OpenMP (torch's own runtime, so
// at::parallel_for splits the outputs over torch's threads). GCC vector types keep it portable (AVX2, AVX-512 or
// NEON, whatever the compiler finds); AVX, AVX2 and AVX-512 intrinsics only where GCC's vector code is slow: the
// horizontal sums and the int8 to fp32 loads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "vector.h"

namespace {

using namespace modeling_llama2;

#if defined(__AVX__)
// The eight sums of v[0..7] as one vector (AVX: three rounds of pairwise adds instead of eight scalar chains).
inline vfloat hsum8(const vfloat* v) {
  const __m256 h01 = _mm256_hadd_ps((__m256)v[0], (__m256)v[1]), h23 = _mm256_hadd_ps((__m256)v[2], (__m256)v[3]);
  const __m256 h45 = _mm256_hadd_ps((__m256)v[4], (__m256)v[5]), h67 = _mm256_hadd_ps((__m256)v[6], (__m256)v[7]);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
  return (vfloat)_mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}
#else
inline vfloat hsum8(const vfloat* v) {
  vfloat s;
  for (int k = 0; k < kLanes; ++k) s[k] = hsum(v[k]);
  return s;
}
#endif

// Eight weights as floats. GCC's conversion of an int8 vector type is scalar; AVX2 sign-extends and converts in
// two instructions.
inline vfloat load_weight(const float* p) { return load(p); }
inline vfloat load_weight(const int8_t* p) {
#if defined(__AVX2__)
  return (vfloat)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  typedef int8_t vint8 __attribute__((vector_size(kLanes)));
  vint8 v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, vfloat);
#endif
}

// A weight rows (starting at w; fp32, or int8 converted as loaded) times R rows of x, into y[r * out + a]. A x R
// accumulators fit the 16 vector registers of AVX2 with the A weight vectors they share; their sums leave eight at
// a time (hsum8) when `in` has no tail.
// `next`, where given, is the weight tile after this one, prefetched a line for every two vectors read here: the
// fp32 weights of a decode step, cycled from memory at 8 rows, read 1.26-1.28x faster with it, and fp32 decode b=8
// ran 1.27x [0.93, 1.33] (15M) and 1.23x [1.19, 1.28] (125M); int8 tiles are converted in one sequential pass,
// which gained nothing from it.
template <int A, int R, typename W = float>
inline void tile(const float* x, int64_t in, const W* w, const float* scale, float* y, int64_t out,
                 const W* next = nullptr) {
  vfloat acc[A * R] = {};
  int64_t i = 0;
  for (; i + kLanes <= in; i += kLanes) {
    if (next && i % 16 == 0)
      for (int a = 0; a < A; ++a) __builtin_prefetch(next + a * in + i);
    vfloat wv[A];
    for (int a = 0; a < A; ++a) wv[a] = load_weight(w + a * in + i);
    for (int r = 0; r < R; ++r) {
      const vfloat xv = load(x + r * in + i);
      for (int a = 0; a < A; ++a) acc[a * R + r] += wv[a] * xv;
    }
  }
  int k = 0;
  if (i == in) {
    for (; k + kLanes <= A * R; k += kLanes) {
      const vfloat s = hsum8(acc + k);
      for (int j = 0; j < kLanes; ++j) {
        const int a = (k + j) / R, r = (k + j) % R;
        y[r * out + a] = scale ? s[j] * scale[a] : s[j];
      }
    }
  }
  for (; k < A * R; ++k) {
    const int a = k / R, r = k % R;
    float s = hsum(acc[k]);
    for (int64_t j = i; j < in; ++j) s += static_cast<float>(w[a * in + j]) * x[r * in + j];
    y[r * out + a] = scale ? s * scale[a] : s;
  }
}

// Several rows of x: 3 weight rows x 4 rows of x (12 accumulators) ran 1.05-1.3x faster than 4 x 2 at 8-16 rows.
constexpr int64_t kTile = 3;
constexpr int kTileRows = 4;

// A weight rows times every row of x, R rows at a time: the weight tile is read from memory once, then from L1; the
// first pass prefetches `next`.
template <int A, int R = kTileRows, typename W = float>
inline void all_rows(const float* x, int64_t rows, int64_t in, const W* w, const float* scale, float* y, int64_t out,
                     const W* next = nullptr) {
  int64_t r = 0;
  for (; r + R <= rows; r += R, next = nullptr) tile<A, R, W>(x + r * in, in, w, scale, y + r * out, out, next);
  if constexpr (R > 4)
    for (; r + 4 <= rows; r += 4, next = nullptr) tile<A, 4, W>(x + r * in, in, w, scale, y + r * out, out, next);
  for (; r + 2 <= rows; r += 2, next = nullptr) tile<A, 2, W>(x + r * in, in, w, scale, y + r * out, out, next);
  if (r < rows) tile<A, 1, W>(x + r * in, in, w, scale, y + r * out, out, next);
}

// Where all rows of x fit in L1 beside a weight row (8 rows of 288: 9 KB; L1 is 32 KB or more on current x86 and
// ARM cores), each weight row streams past them once, times 8 rows at a time (one eight-way horizontal sum for
// eight outputs). On this project's 2-core AMD CPU, against the 3 x 4 tiles, weights cycled from memory: the
// 32000 x 288 head 1.36x at 8 rows and 1.39x at 16, 768 x 288 1.26x and 1.37x, 288 x 768 at 8 rows (24 KB) 1.10x;
// 16 rows of 768 (48 KB) ran at 0.78x, 8 of 2048 at 0.80x. An int8 row is converted as it is loaded (at 8 rows, in
// the one pass over it): 1.29-1.46x converting it into a buffer first.
constexpr int64_t kStreamedRowsBytes = 24 * 1024;
constexpr int kStreamedRows = 8;

// Weight rows o..o+n as floats: an fp32 weight in place; an int8 one converted into `buffer` once per tile, which
// stays in cache while the rows of x pass over it (converting inside `tile` would repeat it for every pair of rows).
inline const float* tile_rows(const float* w, int64_t o, int64_t, int64_t in, std::vector<float>&) {
  return w + o * in;
}

inline const float* tile_rows(const int8_t* w, int64_t o, int64_t n, int64_t in, std::vector<float>& buffer) {
  for (int64_t j = 0; j < n * in; ++j) buffer[j] = static_cast<float>(w[o * in + j]);  // vectorized by GCC
  return buffer.data();
}

// One row of x: each weight row is read as one sequential stream, in independent chains (interleaving the streams
// of several weight rows, as the tiles do, read int8 weights from memory at 0.6x the speed on this project's AMD
// CPU), an int8 weight converted as it is loaded and prefetched `kPrefetch` ahead: from memory 1.7-1.8x the int8
// speed of 8 interleaved rows, fp32 unchanged. With AVX-512, 16 lanes a vector: half the instructions per weight
// (the int8 conversion takes two a vector); one row, paired, weights in cache (AMD EPYC, 2 cores): int8 1.2-1.7x,
// fp32 1.04-1.16x, the fp32 LM head from memory 0.94x.
#if defined(__AVX512F__)
constexpr int kRowLanes = 16, kChains = 4;
#else
constexpr int kRowLanes = kLanes, kChains = 8;
#endif
typedef float vrow __attribute__((vector_size(kRowLanes * sizeof(float))));

inline vrow load_row(const float* p) {
  vrow v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vrow load_row(const int8_t* p) {
#if defined(__AVX512F__)
  return (vrow)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return load_weight(p);
#endif
}

inline float row_sum(vrow v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  return hsum(v);
#endif
}

template <typename W>
inline float row_dot(const float* x, int64_t in, const W* row) {
  vrow acc[kChains] = {};
  int64_t i = 0;
  for (; i + kChains * kRowLanes <= in; i += kChains * kRowLanes) {
    if constexpr (sizeof(W) == 1) __builtin_prefetch(row + i + kPrefetch);
#pragma GCC unroll 8
    for (int u = 0; u < kChains; ++u) acc[u] += load_row(row + i + u * kRowLanes) * load_row(x + i + u * kRowLanes);
  }
  vrow v = acc[0];
#pragma GCC unroll 8
  for (int u = 1; u < kChains; ++u) v += acc[u];
  for (; i + kRowLanes <= in; i += kRowLanes) v += load_row(row + i) * load_row(x + i);
  float s = row_sum(v);
  for (; i < in; ++i) s += static_cast<float>(row[i]) * x[i];
  return s;
}

template <typename W>
void one_row_linear(const float* x, int64_t in, const std::vector<Part<W>>& parts, float* y, int64_t out) {
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    for_rows(parts, begin, end, [&](const Part<W>& part, int64_t row, int64_t o) {
      const float s = row_dot(x, in, part.w + row * in);
      y[o] = part.scale ? s * part.scale[row] : s;
    });
  });
}

template <typename W>
void streamed_rows_linear(const float* x, int64_t rows, int64_t in, const std::vector<Part<W>>& parts, float* y,
                          int64_t out) {
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for_rows(parts, begin, end, [&](const Part<W>& part, int64_t row, int64_t o) {
      const W* next = o + 1 < end && row + 1 < part.out ? part.w + (row + 1) * in : nullptr;
      all_rows<1, kStreamedRows, W>(x, rows, in, part.w + row * in, part.scale ? part.scale + row : nullptr, y + o,
                                    out, next);
    });
  });
}

// kTile weight rows at a time, each tile within one part (the last of a part may be shorter).
template <typename W>
void tiled_linear(const float* x, int64_t rows, int64_t in, const std::vector<Part<W>>& parts, float* y,
                  int64_t out) {
  const auto tiles_of = [](const Part<W>& part) { return (part.out + kTile - 1) / kTile; };
  int64_t tiles = 0;
  for (const Part<W>& part : parts) tiles += tiles_of(part);
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(std::is_same_v<W, float> ? 0 : kTile * in);
    int64_t first = 0, column = 0;  // the part's first tile and first column
    for (const Part<W>& part : parts) {
      const int64_t stop = std::min(end, first + tiles_of(part));
      for (int64_t t = std::max(begin, first); t < stop; ++t) {
        const int64_t o = (t - first) * kTile, n = std::min(kTile, part.out - o);
        const float* tile_w = tile_rows(part.w, o, n, in, buffer);
        const float* s = part.scale ? part.scale + o : nullptr;
        if (n == kTile) {
          const float* next = nullptr;
          if constexpr (std::is_same_v<W, float>)
            next = t + 1 < stop && o + 2 * kTile <= part.out ? part.w + (o + kTile) * in : nullptr;
          all_rows<kTile>(x, rows, in, tile_w, s, y + column + o, out, next);
        } else {
          for (int64_t a = 0; a < n; ++a)
            all_rows<1>(x, rows, in, tile_w + a * in, s ? s + a : nullptr, y + column + o + a, out);
        }
      }
      first += tiles_of(part);
      column += part.out;
    }
  });
}

template <typename W>
void linear(const float* x, int64_t rows, int64_t in, const std::vector<Part<W>>& parts, float* y, int64_t out) {
  if (rows == 1) return one_row_linear(x, in, parts, y, out);
  if (rows >= kStreamedRows && rows * in * static_cast<int64_t>(sizeof(float)) <= kStreamedRowsBytes)
    return streamed_rows_linear(x, rows, in, parts, y, out);
  tiled_linear(x, rows, in, parts, y, out);
}

// x times each of `weights` (all fp32, or all int8 with their `scales`), as one (rows, sum of outs) output.
at::Tensor rows_linear(const at::Tensor& x, at::TensorList weights, at::TensorList scales) {
  const Weights call = call_weights("rows_linear", x, weights, scales);
  const auto xc = x.contiguous();
  const int64_t rows = x.size(0), in = x.size(1);
  auto y = at::empty({rows, call.out}, x.options());
  if (call.int8)
    linear(xc.const_data_ptr<float>(), rows, in, parts_of<int8_t>(call), y.data_ptr<float>(), call.out);
  else
    linear(xc.const_data_ptr<float>(), rows, in, parts_of<float>(call), y.data_ptr<float>(), call.out);
  return y;
}

// fp32 weights alone: an op of their own, as AOTInductor's generated code passes an empty list of scales as None.
at::Tensor float_rows_linear(const at::Tensor& x, at::TensorList weights) { return rows_linear(x, weights, {}); }

}  // namespace

TORCH_LIBRARY(modeling_llama2_kernels, m) {
  m.def("rows_linear(Tensor x, Tensor[] weights, Tensor[] scales) -> Tensor");
  m.def("float_rows_linear(Tensor x, Tensor[] weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(modeling_llama2_kernels, CPU, m) {
  m.impl("rows_linear", rows_linear);
  m.impl("float_rows_linear", float_rows_linear);
}
