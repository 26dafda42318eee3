// y = x W^T for a few rows of x (decoding) with an int8 weight (one fp32 scale per output) and x rounded to 8 bits
// as fbgemm's dynamic int8 linear rounds it (quantization.round_activations: one scale and zero point for all rows
// of the call, `levels` steps), for cpu_kernels.py's `int8_rows_linear`: the integer sums of (q - zero point) * w
// are exact, then scaled once per output, so a row's result is the rounded model's to float rounding, as fbgemm's
// is. fbgemm's own kernel pays its quantization and packing of x per call (a 15M decode step at batch 1 ran at a
// third of the weight-only speed); here x is rounded once into a small buffer and each weight row streams past all
// rows of x. Built with rows_linear.cpp into one extension.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "vector.h"

namespace {

using modeling_llama2::call_weights;
using modeling_llama2::for_rows;
using modeling_llama2::kPrefetch;
using modeling_llama2::Part;
using modeling_llama2::parts_of;
using modeling_llama2::Weights;

constexpr float kMinScale = 6.1e-5f;  // fbgemm's smallest activation scale, as quantization.MIN_SCALE

struct Rounding {
  float scale, zero_point;
  bool nan;  // x holds a NaN
};

// The scale and zero point of quantization.round_activations (torch's `_choose_qparams_per_tensor`), step for step.
Rounding choose_rounding(const float* x, int64_t n, int levels) {
  float low = 0.f, high = 0.f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) low = std::min(low, x[i]), high = std::max(high, x[i]), nan |= x[i] != x[i];
  const double steps = levels / std::max(static_cast<double>(high) - low, 1e-300);
  const double from_low = -low * steps, from_high = levels - high * steps;
  const double zero_point = -std::abs(low * steps) < levels - std::abs(high * steps) ? from_low : from_high;
  return {std::max(static_cast<float>(1.0 / steps), kMinScale),
          static_cast<float>(std::clamp(std::nearbyint(zero_point), 0.0, static_cast<double>(levels))), nan};
}

// q = clamp(round(x * (1 / scale) + zero point), 0, levels) for each x, both operations rounded (no fused
// multiply-add), as torch's tensor ops compute it; `D` holds q, or q - zero point with `centered`.
template <typename D>
__attribute__((optimize("fp-contract=off"))) void round_row(const float* x, int64_t n, Rounding r, int levels,
                                                            bool centered, D* d) {
  const float inverse = 1.f / r.scale, top = static_cast<float>(levels), shift = centered ? r.zero_point : 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float t = x[i] * inverse;
    d[i] = static_cast<D>(std::clamp(std::nearbyint(t + r.zero_point), 0.f, top) - shift);
  }
}

#if defined(__AVX2__)
// 32 bytes, aligned or not.
inline __m256i load_vector(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Where the CPU has VNNI (AVX-512 VNNI or AVX-VNNI), dpbusd multiplies 8-bit q (unsigned, any of [0, 255]) by w
// (signed) and adds each four products to an int32 lane, exactly: one instruction where AVX2 takes three (and 7-bit
// q). Machines with VNNI round activations to 8 bits (torch_internals.FBGEMM_REDUCE_RANGE), whose several rows took
// the loop `dot` before: on a 2-core AMD EPYC (AVX-512), 8 rows, weights in cache, 1.3-2.4x (paired, per shape).
// One row with AVX-VNNI alone keeps `dot` (GCC's 512-bit int16 dot products beat these 256-bit dpbusd, 0.76-0.94x);
// with AVX-512 VNNI it takes `wide_dot`.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr bool kVnni = true;
inline __m256i add_products(__m256i acc, __m256i q, __m256i w) { return _mm256_dpbusd_epi32(acc, q, w); }
#elif defined(__AVXVNNI__)
constexpr bool kVnni = true;
inline __m256i add_products(__m256i acc, __m256i q, __m256i w) { return _mm256_dpbusd_avx_epi32(acc, q, w); }
#else
constexpr bool kVnni = false;
// maddubs sums pairs of q x w in int16, which 2 x 127 x 127 cannot overflow (q within [0, 127]); then int32 sums.
inline __m256i add_products(__m256i acc, __m256i q, __m256i w) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q, w), _mm256_set1_epi16(1)));
}
#endif

// Σ (q_r[i] - zero point) w[i] for R rows of x (q within [0, 127], or [0, 255] with `kVnni`): int32 sums of q x w,
// and zero point x Σ w[i] (summed in the same pass) subtracted once. The weight row is loaded once for the R rows,
// a cache line (two vectors) a step with one prefetch. Σ w stays in int16 pairs (at most 2 x 128 each) for 64
// vectors, then joins its int32 lanes: one instruction a vector where the int32 sum took three. Against that sum,
// paired, weights in cache (2-core AVX2 EPYC, 7-bit q): one row 1.05-1.24x, eight rows 1.04-1.17x.
constexpr int64_t kShortSumBytes = 64 * 32;

template <int R>
inline void dot_rows(const uint8_t* q, int64_t in, const int8_t* w, int32_t zero_point, int32_t* out) {
  const __m256i ones8 = _mm256_set1_epi8(1);
  __m256i acc[R], wsum = _mm256_setzero_si256();
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  int64_t i = 0;
  while (i + 32 <= in) {
    __m256i wsum16 = _mm256_setzero_si256();
    const int64_t stop = std::min(in, i + kShortSumBytes);
    for (; i + 64 <= stop; i += 64) {
      __builtin_prefetch(w + i + kPrefetch);
      const __m256i w0 = load_vector(w + i), w1 = load_vector(w + i + 32);
      wsum16 = _mm256_add_epi16(wsum16, _mm256_maddubs_epi16(ones8, w0));
      wsum16 = _mm256_add_epi16(wsum16, _mm256_maddubs_epi16(ones8, w1));
      for (int r = 0; r < R; ++r) {
        acc[r] = add_products(acc[r], load_vector(q + r * in + i), w0);
        acc[r] = add_products(acc[r], load_vector(q + r * in + i + 32), w1);
      }
    }
    for (; i + 32 <= stop; i += 32) {
      const __m256i w0 = load_vector(w + i);
      wsum16 = _mm256_add_epi16(wsum16, _mm256_maddubs_epi16(ones8, w0));
      for (int r = 0; r < R; ++r) acc[r] = add_products(acc[r], load_vector(q + r * in + i), w0);
    }
    wsum = _mm256_add_epi32(wsum, _mm256_madd_epi16(wsum16, _mm256_set1_epi16(1)));
  }
  int32_t tail = 0;  // Σ w past the last vector
  for (int64_t j = i; j < in; ++j) tail += w[j];
  const __m256i zero_point_sums = _mm256_mullo_epi32(wsum, _mm256_set1_epi32(zero_point));
  for (int r = 0; r < R; ++r) {
    int32_t s = hsum(_mm256_sub_epi32(acc[r], zero_point_sums)) - zero_point * tail;
    for (int64_t j = i; j < in; ++j) s += static_cast<int32_t>(q[r * in + j]) * w[j];
    out[r] = s;
  }
}

template <int R>
inline void rows_of(const uint8_t* q, int64_t in, const int8_t* row, int32_t zero_point, float s, float* y,
                    int64_t out) {
  int32_t sums[R];
  dot_rows<R>(q, in, row, zero_point, sums);
  for (int r = 0; r < R; ++r) y[r * out] = static_cast<float>(sums[r]) * s;
}

// One row of 7-bit q: d = q - zero point fits int8, so Σ d w needs no Σ w, as maddubs(|w|, d with w's signs)
// (llama.cpp's q8_0 product on AVX2 does the same): the same instructions a vector as `dot_rows<1>`, fewer a row.
// Against it, paired, weights in cache (2-core AVX2 EPYC): 288 inputs 1.27-1.44x, 768 1.0-1.09x, 2048 0.96-0.99x,
// hence only up to kSignedDotInputs.
constexpr int64_t kSignedDotInputs = 1024;

inline int32_t signed_dot(const int8_t* d, int64_t in, const int8_t* w) {
  const auto products = [](__m256i wv, __m256i dv) {  // pairs of |w| x ±d: at most 2 x 127 x 127 in int16
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(dv, wv)),
                             _mm256_set1_epi16(1));
  };
  __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 64 <= in; i += 64) {
    __builtin_prefetch(w + i + kPrefetch);
    acc0 = _mm256_add_epi32(acc0, products(load_vector(w + i), load_vector(d + i)));
    acc1 = _mm256_add_epi32(acc1, products(load_vector(w + i + 32), load_vector(d + i + 32)));
  }
  for (; i + 32 <= in; i += 32) acc0 = _mm256_add_epi32(acc0, products(load_vector(w + i), load_vector(d + i)));
  int32_t s = hsum(_mm256_add_epi32(acc0, acc1));
  for (; i < in; ++i) s += static_cast<int32_t>(d[i]) * w[i];
  return s;
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// One row of q (7 or 8 bits) with AVX-512 VNNI: 64 products an instruction, dpbusd for q x w and for zero point x w
// (the zero point, within [0, 255], as the unsigned operand), subtracted once a row; a cache line of w a step, two
// steps in flight; the last under 64 inputs in masked loads, zeros past the row. Both sums may wrap in int32, their
// difference (at most 255 x 128 x 65536) does not. Against `dot` (and `signed_dot` for 7 bits), paired, weights in
// cache (2-core AMD EPYC Zen 5): 1.25-2.26x at 288 inputs, 1.16-1.61x at 768, 1.86x at 2048, 2.42x at 8192.
inline int32_t wide_dot(const uint8_t* q, int64_t in, const int8_t* w, __m512i zero_points) {
  __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, zw0 = acc0, zw1 = acc0;
  int64_t i = 0;
  for (; i + 128 <= in; i += 128) {
    __builtin_prefetch(w + i + kPrefetch);
    __builtin_prefetch(w + i + kPrefetch + 64);
    const __m512i w0 = _mm512_loadu_si512(w + i), w1 = _mm512_loadu_si512(w + i + 64);
    acc0 = _mm512_dpbusd_epi32(acc0, _mm512_loadu_si512(q + i), w0);
    acc1 = _mm512_dpbusd_epi32(acc1, _mm512_loadu_si512(q + i + 64), w1);
    zw0 = _mm512_dpbusd_epi32(zw0, zero_points, w0);
    zw1 = _mm512_dpbusd_epi32(zw1, zero_points, w1);
  }
  for (; i < in; i += 64) {
    const __mmask64 m = in - i >= 64 ? ~0ULL : (1ULL << (in - i)) - 1;
    const __m512i wv = _mm512_maskz_loadu_epi8(m, w + i);
    acc0 = _mm512_dpbusd_epi32(acc0, _mm512_maskz_loadu_epi8(m, q + i), wv);
    zw0 = _mm512_dpbusd_epi32(zw0, zero_points, wv);
  }
  return _mm512_reduce_add_epi32(_mm512_sub_epi32(_mm512_add_epi32(acc0, acc1), _mm512_add_epi32(zw0, zw1)));
}

// Eight rows of q with AVX-512 VNNI: each vector of w feeds eight dpbusd, and the eight row sums leave in one pass
// (halves, then pairwise adds across rows) instead of eight horizontal sums; masked loads only for the tail. Against
// `dot_rows<8>`, paired, weights in cache (Zen 5 EPYC): 1.07-1.17x at 288 inputs, 1.07-1.36x at 768, 1.30x at 2048,
// 1.05x at 8192 (with a horizontal sum a row it lost at 288 inputs, 0.79-0.84x; with masked loads throughout,
// 0.73-0.98x everywhere). Decode b=8 with int8 activations: 15M 1.01x, 125M 1.11x (alternating processes).
inline void wide_dot_8(const uint8_t* q, int64_t in, const int8_t* w, __m512i zero_points, int32_t* out) {
  __m512i acc[8], zw = _mm512_setzero_si512();
  for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 64 <= in; i += 64) {
    __builtin_prefetch(w + i + kPrefetch);
    const __m512i wv = _mm512_loadu_si512(w + i);
    zw = _mm512_dpbusd_epi32(zw, zero_points, wv);
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_loadu_si512(q + r * in + i), wv);
  }
  if (i < in) {
    const __mmask64 m = (1ULL << (in - i)) - 1;
    const __m512i wv = _mm512_maskz_loadu_epi8(m, w + i);
    zw = _mm512_dpbusd_epi32(zw, zero_points, wv);
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_maskz_loadu_epi8(m, q + r * in + i), wv);
  }
  __m256i half[8];
  for (int r = 0; r < 8; ++r)
    half[r] = _mm256_add_epi32(_mm512_castsi512_si256(acc[r]), _mm512_extracti64x4_epi64(acc[r], 1));
  const __m256i h01 = _mm256_hadd_epi32(half[0], half[1]), h23 = _mm256_hadd_epi32(half[2], half[3]);
  const __m256i h45 = _mm256_hadd_epi32(half[4], half[5]), h67 = _mm256_hadd_epi32(half[6], half[7]);
  const __m256i lo = _mm256_hadd_epi32(h01, h23), hi = _mm256_hadd_epi32(h45, h67);
  const __m256i sums =
      _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_sub_epi32(sums, _mm256_set1_epi32(_mm512_reduce_add_epi32(zw))));
}
#endif

// The same sums for any d (8 bits: |d| up to 255), in int32 (GCC vectorizes the loop).
template <typename D>
inline int32_t dot(const D* d, int64_t in, const int8_t* w) {
  int32_t s = 0;
  for (int64_t i = 0; i < in; ++i) s += static_cast<int32_t>(d[i]) * w[i];
  return s;
}

// round(x) times each of `weights` (int8, each with one float32 scale per output row), as one (rows, sum of outs)
// output.
at::Tensor int8_rows_linear(const at::Tensor& x, at::TensorList weights, at::TensorList scales, int64_t levels) {
  const Weights call = call_weights("int8_rows_linear", x, weights, scales);
  TORCH_CHECK(call.int8, "int8_rows_linear: int8 weights expected, got ", weights[0].scalar_type());
  TORCH_CHECK(levels == 127 || levels == 255, "int8_rows_linear: levels is 127 or 255, got ", levels);
  // int32 sums of `in` products of |q - zero point| <= 255 and |w| <= 127 (Llama 2's widest: 28672)
  TORCH_CHECK(x.size(1) <= 65536, "int8_rows_linear: at most 65536 inputs, got ", x.size(1));
  const int64_t out = call.out;
  const auto xc = x.contiguous();
  const int64_t rows = x.size(0), in = x.size(1);
  const float* xp = xc.const_data_ptr<float>();
  const std::vector<Part<int8_t>> parts = parts_of<int8_t>(call);
  auto y = at::empty({rows, out}, x.options());
  float* yp = y.data_ptr<float>();
  const Rounding rounding = choose_rounding(xp, rows * in, static_cast<int>(levels));
  if (rounding.nan) return y.fill_(NAN);  // as round_activations: a NaN leaves no range, every output NaN
  const int lv = static_cast<int>(levels);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (rows == 1) {
    std::vector<uint8_t> q(in);
    round_row(xp, in, rounding, lv, false, q.data());
    const __m512i zero_points = _mm512_set1_epi8(static_cast<char>(rounding.zero_point));
    at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
      for_rows(parts, begin, end, [&](const Part<int8_t>& part, int64_t row, int64_t o) {
        yp[o] = static_cast<float>(wide_dot(q.data(), in, part.w + row * in, zero_points)) *
                (rounding.scale * part.scale[row]);
      });
    });
    return y;
  }
#endif
#if defined(__AVX2__)
  if (levels <= 127 && rows == 1 && in <= kSignedDotInputs) {
    std::vector<int8_t> d(in);
    round_row(xp, in, rounding, lv, true, d.data());
    at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
      for_rows(parts, begin, end, [&](const Part<int8_t>& part, int64_t row, int64_t o) {
        yp[o] = static_cast<float>(signed_dot(d.data(), in, part.w + row * in)) * (rounding.scale * part.scale[row]);
      });
    });
    return y;
  }
  if (levels <= 127 || (kVnni && rows > 1)) {
    std::vector<uint8_t> q(rows * in);
    round_row(xp, rows * in, rounding, lv, false, q.data());
    const auto zero_point = static_cast<int32_t>(rounding.zero_point);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const __m512i zero_points = _mm512_set1_epi8(static_cast<char>(zero_point));
#endif
    at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
      for_rows(parts, begin, end, [&](const Part<int8_t>& part, int64_t row, int64_t o) {
        const float s = rounding.scale * part.scale[row];
        const int8_t* w = part.w + row * in;
        int64_t r = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        for (; r + 8 <= rows; r += 8) {
          int32_t sums[8];
          wide_dot_8(q.data() + r * in, in, w, zero_points, sums);
          for (int k = 0; k < 8; ++k) yp[(r + k) * out + o] = static_cast<float>(sums[k]) * s;
        }
#endif
        for (; r + 8 <= rows; r += 8) rows_of<8>(q.data() + r * in, in, w, zero_point, s, yp + r * out + o, out);
        if (r + 4 <= rows) rows_of<4>(q.data() + r * in, in, w, zero_point, s, yp + r * out + o, out), r += 4;
        if (r + 2 <= rows) rows_of<2>(q.data() + r * in, in, w, zero_point, s, yp + r * out + o, out), r += 2;
        if (r < rows) rows_of<1>(q.data() + r * in, in, w, zero_point, s, yp + r * out + o, out);
      });
    });
    return y;
  }
#endif
  std::vector<int16_t> d(rows * in);
  round_row(xp, rows * in, rounding, lv, true, d.data());
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    for_rows(parts, begin, end, [&](const Part<int8_t>& part, int64_t row, int64_t o) {
      const float s = rounding.scale * part.scale[row];
      for (int64_t r = 0; r < rows; ++r)
        yp[r * out + o] = static_cast<float>(dot(d.data() + r * in, in, part.w + row * in)) * s;
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(modeling_llama2_kernels, m) {
  m.def("int8_rows_linear(Tensor x, Tensor[] weights, Tensor[] scales, int levels) -> Tensor");
}

TORCH_LIBRARY_IMPL(modeling_llama2_kernels, CPU, m) { m.impl("int8_rows_linear", int8_rows_linear); }
