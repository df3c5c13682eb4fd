// Dot products of one weight row with up to kMaxRows activation rows, for one instruction set.
//
// Included three times by native_step.cpp, each time under its own `#pragma GCC target` and namespace
// (ISA_LEVEL 1 = AVX2, 2 = AVX-VNNI, 3 = AVX-512 VNNI), so one library holds every path and the CPU picks at
// run time. Activations arrive quantized per block of 32 to int8 (xq) with one fp32 scale per block (xd) and
// the fp32 sum of each block (xs); weights stay in the store's formats:
//   fp32  y = sum_k w[k] x[k]                                   (fp32 activations, no quantization)
//   int8  y = sum_b xd[b] * sum_{k in b} w[k] xq[k]               (the caller multiplies by the row's scale)
//   int4  y = sum_b xd[b] s[g(b)] * sum_{k in b} q[k] xq[k] + sum_g m[g] * xs[g]   (s, m read as fp16)   (xs: sums of the quantized x per group)
// xd holds each block's activation scale 8 times over (one 256-bit lane set per block), so scales are loaded, not
// broadcast. The integer block sums are exact; the fp32 sums over blocks and lanes run in one fixed order per row, so a
// row's result never depends on which other rows share the call.

namespace ISA_NS {

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

// 8 int32 lanes holding partial sums of u[k] * s[k] over 32 bytes (u unsigned, s signed; |u*s| small enough
// that AVX2's int16 pair sums cannot saturate: |u| <= 127, |s| <= 127).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if ISA_LEVEL == 1
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#elif ISA_LEVEL == 2
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#endif
}

// 32 int4 codes (16 bytes, low nibble = even input) widened to bytes in input order: each byte becomes a 16-bit
// lane holding its low nibble in the low byte and its high nibble in the high byte.
inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m256i z = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_or_si256(_mm256_and_si256(z, _mm256_set1_epi16(0x000F)),
                         _mm256_and_si256(_mm256_slli_epi16(z, 4), _mm256_set1_epi16(0x0F00)));
}

#if ISA_LEVEL == 3
inline float hsum512(__m512 v) {
  return hsum256(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}
inline __m512 pair_scale(float a, float b) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(a)), _mm256_set1_ps(b), 1);
}
inline __m512i unpack_nibbles2(const uint8_t* p) {  // 64 codes from 32 bytes
  const __m512i z = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_or_si512(_mm512_and_si512(z, _mm512_set1_epi16(0x000F)),
                         _mm512_and_si512(_mm512_slli_epi16(z, 4), _mm512_set1_epi16(0x0F00)));
}
#endif

// q · k over one head (fp32), 8/16 lanes then a fixed tree: attention scores.
float dot_head(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
  float total = hsum256(acc);
  for (; k < n; ++k) total += a[k] * b[k];
  return total;
}

// out += p * v over one head.
void axpy_head(float p, const float* v, float* out, int64_t n) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(out + k, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + k), _mm256_loadu_ps(out + k)));
  for (; k < n; ++k) out[k] += p * v[k];
}

template <int rows>
void dot_f32_rows(const float* w, int64_t depth, const float* x, int64_t x_stride, float* out) {
#if ISA_LEVEL == 3
  __m512 acc[kMaxRows];
  for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= depth; k += 16) {
    const __m512 wv = _mm512_loadu_ps(w + k);
    for (int r = 0; r < rows; ++r) acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * x_stride + k), acc[r]);
  }
  for (int r = 0; r < rows; ++r) {
    float total = hsum512(acc[r]);
    for (int64_t t = k; t < depth; ++t) total += w[t] * x[r * x_stride + t];
    out[r] = total;
  }
#else
  __m256 acc[kMaxRows];
  for (int r = 0; r < rows; ++r) acc[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= depth; k += 8) {
    const __m256 wv = _mm256_loadu_ps(w + k);
    for (int r = 0; r < rows; ++r) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * x_stride + k), acc[r]);
  }
  for (int r = 0; r < rows; ++r) {
    float total = hsum256(acc[r]);
    for (int64_t t = k; t < depth; ++t) total += w[t] * x[r * x_stride + t];
    out[r] = total;
  }
#endif
}

template <int rows>
void dot_q8_rows(const int8_t* w, int64_t depth, const int8_t* xq, const float* xd, int64_t q_stride,
            int64_t d_stride, float* out) {
  const int64_t blocks = depth / 32;
  int64_t b = 0;
#if ISA_LEVEL == 3
  __m512 acc[kMaxRows];
  for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
  for (; b + 2 <= blocks; b += 2) {
    const __m512i wv = _mm512_loadu_si512(w + b * 32);
    const __m512i aw = _mm512_abs_epi8(wv);
    const __mmask64 negative = _mm512_movepi8_mask(wv);
    for (int r = 0; r < rows; ++r) {
      const __m512i xv = _mm512_loadu_si512(xq + r * q_stride + b * 32);
      const __m512i sx = _mm512_mask_sub_epi8(xv, negative, _mm512_setzero_si512(), xv);
      const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sx);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(xd + r * d_stride + b * 8), acc[r]);
    }
  }
  __m256 tail[kMaxRows];
  for (int r = 0; r < rows; ++r) tail[r] = _mm256_setzero_ps();
#else
  __m256 tail[kMaxRows];
  for (int r = 0; r < rows; ++r) tail[r] = _mm256_setzero_ps();
#endif
  for (; b < blocks; ++b) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 32));
    const __m256i aw = _mm256_sign_epi8(wv, wv);
    for (int r = 0; r < rows; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * q_stride + b * 32));
      const __m256i p = dot_u8s8(aw, _mm256_sign_epi8(xv, wv));
      tail[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_loadu_ps(xd + r * d_stride + b * 8), tail[r]);
    }
  }
  for (int r = 0; r < rows; ++r) {
#if ISA_LEVEL == 3
    out[r] = hsum512(acc[r]) + hsum256(tail[r]);
#else
    out[r] = hsum256(tail[r]);
#endif
  }
}

// sum_i half(a[i]) * b[i]: the int4 min term (fp16 mins), 8 lanes then a fixed tree.
float dot_half(const uint16_t* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + k))),
                          _mm256_loadu_ps(b + k), acc);
  float total = hsum256(acc);
  for (; k < n; ++k) total += _cvtsh_ss(a[k]) * b[k];
  return total;
}

template <int rows>
void dot_q4_rows(const uint8_t* w, int64_t depth, int64_t group, const uint16_t* scale, const uint16_t* mins,
            const int8_t* xq, const float* xd, const float* xs, int64_t q_stride, int64_t d_stride,
            int64_t gs_stride, float* out) {
  const int64_t blocks = depth / 32, per_group = group / 32;
  const int shift = __builtin_ctzll(per_group);  // groups of 32 * 2^shift inputs: block b is in group b >> shift
  int64_t b = 0;
#if ISA_LEVEL == 3
  __m512 acc[kMaxRows];
  for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
  for (; b + 2 <= blocks; b += 2) {
    const __m512i qv = unpack_nibbles2(w + b * 16);
    const __m512 sv = pair_scale(_cvtsh_ss(scale[b >> shift]), _cvtsh_ss(scale[(b + 1) >> shift]));  // all rows
    for (int r = 0; r < rows; ++r) {
      const __m512i xv = _mm512_loadu_si512(xq + r * q_stride + b * 32);
      const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qv, xv);
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(p), sv), _mm512_loadu_ps(xd + r * d_stride + b * 8),
                               acc[r]);
    }
  }
#endif
  __m256 tail[kMaxRows];
  for (int r = 0; r < rows; ++r) tail[r] = _mm256_setzero_ps();
  for (; b < blocks; ++b) {
    const __m256i qv = unpack_nibbles(w + b * 16);
    const __m256 sv = _mm256_set1_ps(_cvtsh_ss(scale[b >> shift]));
    for (int r = 0; r < rows; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * q_stride + b * 32));
      const __m256i p = dot_u8s8(qv, xv);
      tail[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(p), sv), _mm256_loadu_ps(xd + r * d_stride + b * 8),
                                tail[r]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const float min_term = dot_half(mins, xs + r * gs_stride, depth / group);
#if ISA_LEVEL == 3
    out[r] = hsum512(acc[r]) + hsum256(tail[r]) + min_term;
#else
    out[r] = hsum256(tail[r]) + min_term;
#endif
  }
}

void dot_f32(const float* w, int64_t depth, const float* x, int64_t x_stride, int rows, float* out) {
  switch (rows) {
    case 1: return dot_f32_rows<1>(w, depth, x, x_stride, out);
    case 2: return dot_f32_rows<2>(w, depth, x, x_stride, out);
    case 3: return dot_f32_rows<3>(w, depth, x, x_stride, out);
    default: return dot_f32_rows<4>(w, depth, x, x_stride, out);
  }
}

void dot_q8(const int8_t* w, int64_t depth, const int8_t* xq, const float* xd, int64_t q_stride,
            int64_t d_stride, int rows, float* out) {
  switch (rows) {
    case 1: return dot_q8_rows<1>(w, depth, xq, xd, q_stride, d_stride, out);
    case 2: return dot_q8_rows<2>(w, depth, xq, xd, q_stride, d_stride, out);
    case 3: return dot_q8_rows<3>(w, depth, xq, xd, q_stride, d_stride, out);
    default: return dot_q8_rows<4>(w, depth, xq, xd, q_stride, d_stride, out);
  }
}

void dot_q4(const uint8_t* w, int64_t depth, int64_t group, const uint16_t* scale, const uint16_t* mins,
            const int8_t* xq, const float* xd, const float* xs, int64_t q_stride, int64_t d_stride,
            int64_t gs_stride, int rows, float* out) {
  switch (rows) {
    case 1: return dot_q4_rows<1>(w, depth, group, scale, mins, xq, xd, xs, q_stride, d_stride, gs_stride, out);
    case 2: return dot_q4_rows<2>(w, depth, group, scale, mins, xq, xd, xs, q_stride, d_stride, gs_stride, out);
    case 3: return dot_q4_rows<3>(w, depth, group, scale, mins, xq, xd, xs, q_stride, d_stride, gs_stride, out);
    default: return dot_q4_rows<4>(w, depth, group, scale, mins, xq, xd, xs, q_stride, d_stride, gs_stride, out);
  }
}

const Kernels kernels = {dot_f32, dot_q8, dot_q4, dot_head, axpy_head};

}  // namespace ISA_NS
