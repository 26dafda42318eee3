// Softmax attention of one query token a row over a KV cache's slots (a decode step), for cpu_kernels.py: each
// (row, query head) reads its key/value head's slots once (grouped heads share them where they are), with none of
// the blocking, buffers and per-call setup that CPU flash attention pays for a query of one token (15M shape,
// batch 8: attention took a quarter of a decode step). Built with rows_linear.cpp into one extension.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "vector.h"

namespace {

using namespace modeling_llama2;

inline float dot(const float* a, const float* b, int64_t d) {
  vfloat acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= d; i += 2 * kLanes) {
    acc0 += load(a + i) * load(b + i);
    acc1 += load(a + i + kLanes) * load(b + i + kLanes);
  }
  for (; i + kLanes <= d; i += kLanes) acc0 += load(a + i) * load(b + i);
  float s = hsum(acc0 + acc1);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// q (batch, heads, 1, d); k, v (batch, kv_heads, slots, d); mask (batch, slots), true where a slot is attended, or
// none: out (batch, heads, d). A row with no slot to attend to gets zeros.
at::Tensor one_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0,
              "one_query_attention: q (b, h, 1, d) and k, v (b, kv, slots, d) expected, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "one_query_attention: float32 expected");
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), kv = k.size(1), slots = k.size(2), d = q.size(3);
  const int64_t groups = heads / kv;
  at::Tensor mc;
  const bool* m = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == batch * slots,
                "one_query_attention: a bool mask of (batch, slots) expected, got ", mask->sizes());
    mc = mask->contiguous();
    m = mc.const_data_ptr<bool>();
  }
  auto out = at::empty({batch, heads, d}, q.options());
  const float* Q = qc.const_data_ptr<float>();
  const float* K = kc.const_data_ptr<float>();
  const float* V = vc.const_data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(slots);
    std::vector<float> acc(d);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const float* qv = Q + bh * d;
      const float* kh = K + (b * kv + h / groups) * slots * d;
      const float* vh = V + (b * kv + h / groups) * slots * d;
      const bool* mb = m ? m + b * slots : nullptr;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < slots; ++s) {
        p[s] = (!mb || mb[s]) ? dot(qv, kh + s * d, d) * static_cast<float>(scale)
                              : -std::numeric_limits<float>::infinity();
        top = std::max(top, p[s]);
      }
      float total = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      if (top == -std::numeric_limits<float>::infinity()) {  // no slot to attend to: zeros, as a fully masked row
        std::memcpy(O + bh * d, acc.data(), d * sizeof(float));
        continue;
      }
      for (int64_t s = 0; s < slots; ++s) {
        if (mb && !mb[s]) continue;
        const float w = std::exp(p[s] - top);
        total += w;
        const float* vs = vh + s * d;
        int64_t i = 0;
        const vfloat wv = vfloat{} + w;
        for (; i + kLanes <= d; i += kLanes) store(acc.data() + i, load(acc.data() + i) + wv * load(vs + i));
        for (; i < d; ++i) acc[i] += w * vs[i];
      }
      const float inv = 1.f / total;
      for (int64_t i = 0; i < d; ++i) O[bh * d + i] = acc[i] * inv;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(modeling_llama2_kernels, m) {
  m.def("one_query_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(modeling_llama2_kernels, CPU, m) { m.impl("one_query_attention", one_query_attention); }
