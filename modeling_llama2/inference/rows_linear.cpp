// y = x W^T for a few rows of x (decoding: a batch or best-of-N samples, one token each), reading every weight
// once for all rows. MKL's and oneDNN's small-M kernels read the weight at 3-7 GB/s at 8 rows on this project's
// 2-core x86 CPU; this loop keeps a tile of 4 weight rows in L1 while all rows of x pass over it (see
// cpu_kernels.py for the measurements). The weight is fp32, or int8 with one fp32 scale per output (weight-only:
// x is not rounded), converted a tile at a time.
//
// Built on first use by torch.utils.cpp_extension with -march=native and OpenMP (torch's own runtime, so
// at::parallel_for splits the outputs over torch's threads). GCC vector types keep it portable: AVX2, AVX-512 or
// NEON, whatever the compiler finds.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int kLanes = 8;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float hsum(vfloat v) {
  float s = 0.f;
  for (int k = 0; k < kLanes; ++k) s += v[k];
  return s;
}

// A weight rows (starting at w) times R rows of x, into y[r * out + a]. A x R accumulators fit the 16 vector
// registers of AVX2 with the A weight vectors they share.
template <int A, int R>
inline void tile(const float* x, int64_t in, const float* w, const float* scale, float* y, int64_t out) {
  vfloat acc[A][R] = {};
  int64_t i = 0;
  for (; i + kLanes <= in; i += kLanes) {
    vfloat wv[A];
    for (int a = 0; a < A; ++a) wv[a] = load(w + a * in + i);
    for (int r = 0; r < R; ++r) {
      const vfloat xv = load(x + r * in + i);
      for (int a = 0; a < A; ++a) acc[a][r] += wv[a] * xv;
    }
  }
  for (int a = 0; a < A; ++a) {
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[a][r]);
      for (int64_t j = i; j < in; ++j) s += w[a * in + j] * x[r * in + j];
      y[r * out + a] = scale ? s * scale[a] : s;
    }
  }
}

// A weight rows times every row of x: the weight tile is read from memory once, then from L1.
template <int A>
inline void all_rows(const float* x, int64_t rows, int64_t in, const float* w, const float* scale, float* y,
                     int64_t out) {
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) tile<A, 2>(x + r * in, in, w, scale, y + r * out, out);
  if (r < rows) tile<A, 1>(x + r * in, in, w, scale, y + r * out, out);
}

constexpr int64_t kTile = 4;

// Weight rows o..o+n as floats: an fp32 weight in place; an int8 one converted into `buffer` once per tile, which
// stays in cache while the rows of x pass over it (converting inside `tile` would repeat it for every pair of rows).
inline const float* tile_rows(const float* w, int64_t o, int64_t, int64_t in, std::vector<float>&) {
  return w + o * in;
}

inline const float* tile_rows(const int8_t* w, int64_t o, int64_t n, int64_t in, std::vector<float>& buffer) {
  for (int64_t j = 0; j < n * in; ++j) buffer[j] = static_cast<float>(w[o * in + j]);
  return buffer.data();
}

template <typename W>
void linear(const float* x, int64_t rows, int64_t in, const W* w, const float* scale, float* y, int64_t out) {
  at::parallel_for(0, (out + kTile - 1) / kTile, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(std::is_same_v<W, float> ? 0 : kTile * in);
    for (int64_t o = begin * kTile, stop = std::min(out, end * kTile); o < stop; o += kTile) {
      const int64_t n = std::min(kTile, stop - o);
      const float* t = tile_rows(w, o, n, in, buffer);
      const float* s = scale ? scale + o : nullptr;
      if (n == kTile) {
        all_rows<kTile>(x, rows, in, t, s, y + o, out);
      } else {
        for (int64_t a = 0; a < n; ++a) all_rows<1>(x, rows, in, t + a * in, s ? s + a : nullptr, y + o + a, out);
      }
    }
  });
}

at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "rows_linear: x (rows, in) and weight (out, in) expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rows_linear runs on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "rows_linear: x must be float32, got ", x.scalar_type());
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  auto y = at::empty({rows, out}, x.options());
  if (weight.scalar_type() == at::kFloat) {
    TORCH_CHECK(!scale.has_value(), "rows_linear: an fp32 weight takes no scale");
    linear(xc.const_data_ptr<float>(), rows, in, wc.const_data_ptr<float>(), nullptr, y.data_ptr<float>(), out);
  } else {
    TORCH_CHECK(weight.scalar_type() == at::kChar && scale.has_value() && scale->scalar_type() == at::kFloat &&
                    scale->numel() == out,
                "rows_linear: an int8 weight needs one float32 scale per output row");
    const auto sc = scale->contiguous();
    linear(xc.const_data_ptr<float>(), rows, in, wc.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(),
           y.data_ptr<float>(), out);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(modeling_llama2_kernels, m) {
  m.def("rows_linear(Tensor x, Tensor weight, Tensor? scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(modeling_llama2_kernels, CPU, m) { m.impl("rows_linear", rows_linear); }
