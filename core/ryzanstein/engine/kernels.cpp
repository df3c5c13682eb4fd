// Weight-only int8 and int4 linears for CPU decode.
//   int8: y[n, o] = scale[o] * sum_k x[n, k] * w[o, k]            (per output channel, symmetric)
//   int4: y[n, o] = sum_groups scale[o, g] * sum_k x[n, k] * q[o, k] + min[o, g] * sum_k x[n, k]
//         (groups of `group` inputs, asymmetric: w = q * scale + min, q in 0..15, two per byte, low nibble first)
//
// Decode is bound by reading weights; int8 is a quarter of fp32's bytes, int4 an eighth (plus scales). The
// values are widened to fp32 in registers (AVX2 + FMA), so accuracy is that of the quantization only.
//
// Every dot product is summed in one fixed order (8 fp32 lanes over k ascending, then a fixed lane tree), so a
// row's result never depends on how many other rows share the call or where it sits among them: batching
// stays bit-exact without shape regimes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

namespace {

constexpr int kRowsPerPass = 4;  // activation rows that share one pass over a weight row

inline float lane_sum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);              // 4 lanes
  __m128 t = _mm_movehl_ps(s, s);             // lanes 2,3
  __m128 u = _mm_add_ps(s, t);                // 2 lanes
  __m128 w = _mm_shuffle_ps(u, u, 0x55);      // lane 1
  return _mm_cvtss_f32(_mm_add_ss(u, w));
}

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(x.dtype() == torch::kFloat32, "x must be float32");
  TORCH_CHECK(w.dtype() == torch::kInt8, "w must be int8");
  TORCH_CHECK(scale.dtype() == torch::kFloat32, "scale must be float32");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes: x [N, K], w [O, K]");
  x = x.contiguous();
  w = w.contiguous();
  scale = scale.contiguous();
  const int64_t rows = x.size(0), depth = x.size(1), outputs = w.size(0);
  auto y = torch::empty({rows, outputs}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t vec_depth = depth - depth % 16;

  at::parallel_for(0, outputs, 16, [&](int64_t o_begin, int64_t o_end) {
    for (int64_t o = o_begin; o < o_end; ++o) {
      const int8_t* wr = wp + o * depth;
      for (int64_t n0 = 0; n0 < rows; n0 += kRowsPerPass) {
        const int nb = static_cast<int>(std::min<int64_t>(kRowsPerPass, rows - n0));
        __m256 acc[kRowsPerPass];
        for (int i = 0; i < kRowsPerPass; ++i) acc[i] = _mm256_setzero_ps();
        for (int64_t k = 0; k < vec_depth; k += 16) {
          __m128i w16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k));
          __m256 w_lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w16));
          __m256 w_hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w16, 8)));
          for (int i = 0; i < nb; ++i) {
            const float* xr = xp + (n0 + i) * depth + k;
            acc[i] = _mm256_fmadd_ps(w_lo, _mm256_loadu_ps(xr), acc[i]);
            acc[i] = _mm256_fmadd_ps(w_hi, _mm256_loadu_ps(xr + 8), acc[i]);
          }
        }
        for (int i = 0; i < nb; ++i) {
          float total = lane_sum(acc[i]);
          const float* xr = xp + (n0 + i) * depth;
          for (int64_t k = vec_depth; k < depth; ++k) total += xr[k] * static_cast<float>(wr[k]);
          yp[(n0 + i) * outputs + o] = total * sp[o];
        }
      }
    }
  });
  return y;
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor mins,
                          int64_t group) {
  TORCH_CHECK(x.dtype() == torch::kFloat32, "x must be float32");
  TORCH_CHECK(packed.dtype() == torch::kUInt8, "packed must be uint8");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && mins.dtype() == torch::kFloat32, "scales must be float32");
  TORCH_CHECK(group % 16 == 0 && group > 0, "group must be a positive multiple of 16");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 2 && x.size(1) == packed.size(1) * 2, "shapes: x [N, K], packed [O, K/2]");
  TORCH_CHECK(x.size(1) % group == 0, "K must be a multiple of the group size");
  x = x.contiguous();
  packed = packed.contiguous();
  scale = scale.contiguous();
  mins = mins.contiguous();
  const int64_t rows = x.size(0), depth = x.size(1), outputs = packed.size(0), groups = depth / group;
  TORCH_CHECK(scale.numel() == outputs * groups && mins.numel() == outputs * groups, "one scale and min per group");
  auto y = torch::empty({rows, outputs}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* mp = mins.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Sum of x over each group, per row: the min term of every output reuses it.
  std::vector<float> xsum(rows * groups, 0.0f);
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t g = 0; g < groups; ++g) {
      float total = 0.0f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) total += xp[n * depth + k];
      xsum[n * groups + g] = total;
    }
  const __m128i low_mask = _mm_set1_epi8(0x0F);

  at::parallel_for(0, outputs, 16, [&](int64_t o_begin, int64_t o_end) {
    for (int64_t o = o_begin; o < o_end; ++o) {
      const uint8_t* wr = pp + o * (depth / 2);
      for (int64_t n0 = 0; n0 < rows; n0 += kRowsPerPass) {
        const int nb = static_cast<int>(std::min<int64_t>(kRowsPerPass, rows - n0));
        __m256 acc[kRowsPerPass];
        float min_acc[kRowsPerPass];
        for (int i = 0; i < kRowsPerPass; ++i) { acc[i] = _mm256_setzero_ps(); min_acc[i] = 0.0f; }
        for (int64_t g = 0; g < groups; ++g) {
          __m256 gacc[kRowsPerPass];
          for (int i = 0; i < kRowsPerPass; ++i) gacc[i] = _mm256_setzero_ps();
          for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
            __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k / 2));
            __m128i lo = _mm_and_si128(bytes, low_mask);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
            __m128i q16 = _mm_unpacklo_epi8(lo, hi);  // q[k], q[k+1], ... in order
            __m256 w_lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q16));
            __m256 w_hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q16, 8)));
            for (int i = 0; i < nb; ++i) {
              const float* xr = xp + (n0 + i) * depth + k;
              gacc[i] = _mm256_fmadd_ps(w_lo, _mm256_loadu_ps(xr), gacc[i]);
              gacc[i] = _mm256_fmadd_ps(w_hi, _mm256_loadu_ps(xr + 8), gacc[i]);
            }
          }
          const __m256 s = _mm256_set1_ps(sp[o * groups + g]);
          const float m = mp[o * groups + g];
          for (int i = 0; i < nb; ++i) {
            acc[i] = _mm256_fmadd_ps(s, gacc[i], acc[i]);
            min_acc[i] += m * xsum[(n0 + i) * groups + g];
          }
        }
        for (int i = 0; i < nb; ++i) yp[(n0 + i) * outputs + o] = lane_sum(acc[i]) + min_acc[i];
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "weight-only int8 linear (AVX2, batch-invariant)");
  m.def("int4_linear", &int4_linear, "weight-only group-wise int4 linear (AVX2, batch-invariant)");
}
