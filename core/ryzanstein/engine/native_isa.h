// The kernels of the native step for one instruction set: dot products of weights with up to a few activation
// rows per pass, and attention.
//
// Included three times by native_step.cpp, each time under its own `#pragma GCC target` and namespace
// (ISA_LEVEL 1 = AVX2, 2 = AVX-VNNI, 3 = AVX-512 VNNI), so one library holds every path and the CPU picks at
// run time. Activations arrive quantized per block of 32 to int8 (xq) with one fp32 scale per block (xd) and
// the sums of the quantized values per int4 group (xs):
//   fp32  y = sum_k w[k] x[k]                                   (fp32 activations, no quantization; store's rows)
//   int8  y = sum_b xd[b] * sum_{k in b} w[k] xq[k]             (store's rows; the caller multiplies by the row's scale)
//   int4  y = sum_b xd[b] s[g(b)] * sum_{k in b} q[k] xq[k] + sum_g m[g] * xs[g]   (tiles of 16 outputs, s and m fp16)
// The integer block sums are exact; the fp32 sums over blocks (and lanes) run in one fixed order per row, so a
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

#if ISA_LEVEL == 3
inline float hsum512(__m512 v) {
  return hsum256(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}
#endif

// q · k over one head (fp32), 8/16 lanes then a fixed tree: attention scores.
inline float dot_head(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
  float total = hsum256(acc);
  for (; k < n; ++k) total += a[k] * b[k];
  return total;
}

// out += p * v over one head.
inline void axpy_head(float p, const float* v, float* out, int64_t n) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(out + k, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + k), _mm256_loadu_ps(out + k)));
  for (; k < n; ++k) out[k] += p * v[k];
}

// Softmax in place: each score becomes its probability (e^(s - largest) through exp8, times the reciprocal of
// their sum). Eight lanes, then the tail through the same lanes (zero-padded, its padding left out of the sum);
// the sum runs in one fixed order for a given length.
inline void softmax_in_place(float* s, int64_t n) {
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(s + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  float top = -INFINITY;
  for (int i = 0; i < 8; ++i) top = std::max(top, lanes[i]);
  for (int64_t k = j; k < n; ++k) top = std::max(top, s[k]);
  const __m256 shift = _mm256_set1_ps(top);
  __m256 total8 = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift));
    _mm256_storeu_ps(s + j, e);
    total8 = _mm256_add_ps(total8, e);
  }
  float total = hsum256(total8);
  if (j < n) {
    alignas(32) float tail[8] = {};
    for (int64_t k = j; k < n; ++k) tail[k - j] = s[k];
    _mm256_store_ps(tail, exp8(_mm256_sub_ps(_mm256_load_ps(tail), shift)));
    for (int64_t k = j; k < n; ++k) total += (s[k] = tail[k - j]);
  }
  const __m256 inverse = _mm256_set1_ps(1.0f / total);
  for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inverse));
  for (; j < n; ++j) s[j] *= 1.0f / total;
}

#if ISA_LEVEL == 3
using vec = __m512;
constexpr int kLanes = 16;
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vset1(float v) { return _mm512_set1_ps(v); }
inline vec vzero() { return _mm512_setzero_ps(); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline __m256 halves(vec v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }
inline vec vload(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#else
using vec = __m256;
constexpr int kLanes = 8;
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vset1(float v) { return _mm256_set1_ps(v); }
inline vec vzero() { return _mm256_setzero_ps(); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline __m256 halves(vec v) { return v; }
inline vec vload(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

// The lane sums of four vectors, each by the same tree ((x0+x1)+(x2+x3))+((x4+x5)+(x6+x7)) after folding 16
// lanes to 8: a key's score never depends on which slot of the four it took.
inline __m128 sum4(vec a, vec b, vec c, vec d) {
  const __m256 ab = _mm256_hadd_ps(halves(a), halves(b)), cd = _mm256_hadd_ps(halves(c), halves(d));
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// Attention of H query heads that share one KV head (GQA), over `length` cached positions (fp32, or fp16 bits
// widened as they load), for heads of V vectors: q and the outputs stay in registers, each key and value row
// is loaded once for the H heads, scores are formed four keys at a time (the last few keys through a
// zero-padded copy, so every key takes the same path). s: H × length scratch. Per head the arithmetic is the
// same whichever heads share the call and whatever the batch.
template <int V, int H, typename T>
void attend_group(const float* q, const T* keys, const T* values, int64_t length, int64_t stride,
                  float scale, float* s, float* out) {
  constexpr int64_t dim = V * kLanes;
  vec qv[H][V];
  for (int h = 0; h < H; ++h)
    for (int v = 0; v < V; ++v) qv[h][v] = vload(q + h * dim + v * kLanes);
  const auto four_keys = [&](const T* k4, int64_t k_stride, int64_t j, int64_t count) {
    vec acc[H][4];
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < 4; ++i) acc[h][i] = vzero();
    for (int i = 0; i < 4; ++i)
      for (int v = 0; v < V; ++v) {
        const vec k = vload(k4 + i * k_stride + v * kLanes);
        for (int h = 0; h < H; ++h) acc[h][i] = vfma(qv[h][v], k, acc[h][i]);
      }
    for (int h = 0; h < H; ++h) {
      alignas(16) float four[4];
      _mm_store_ps(four, sum4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]));
      for (int64_t i = 0; i < count; ++i) s[h * length + j + i] = four[i] * scale;
    }
  };
  int64_t j = 0;
  for (; j + 4 <= length; j += 4) four_keys(keys + j * stride, stride, j, 4);
  if (j < length) {
    alignas(64) T padded[4 * dim] = {};
    for (int64_t i = 0; j + i < length; ++i) std::memcpy(padded + i * dim, keys + (j + i) * stride, dim * sizeof(T));
    four_keys(padded, dim, j, length - j);
  }
  for (int h = 0; h < H; ++h) softmax_in_place(s + h * length, length);
  vec o[H][V];
  for (int h = 0; h < H; ++h)
    for (int v = 0; v < V; ++v) o[h][v] = vzero();
  for (j = 0; j < length; ++j) {
    vec p[H];
    for (int h = 0; h < H; ++h) p[h] = vset1(s[h * length + j]);
    for (int v = 0; v < V; ++v) {
      const vec value = vload(values + j * stride + v * kLanes);
      for (int h = 0; h < H; ++h) o[h][v] = vfma(p[h], value, o[h][v]);
    }
  }
  for (int h = 0; h < H; ++h)
    for (int v = 0; v < V; ++v) vstore(out + h * dim + v * kLanes, o[h][v]);
}

// Up to three heads at a time (a GQA group of 3, as in SmolLM2, in one pass over its keys and values) while
// their outputs fit in half the registers (heads × V vectors), the rest in pairs or one at a time.
template <int V, typename T>
void attend_heads(const float* q, int64_t heads, const T* keys, const T* values, int64_t length,
                  int64_t stride, float scale, float* scores, float* out) {
  constexpr int64_t dim = V * kLanes;
  constexpr int registers = kLanes == 16 ? 32 : 16;  // zmm / ymm
  constexpr int most = std::max(1, std::min(3, registers / 2 / V));
  const auto group = [&](auto size, int64_t h) {
    attend_group<V, decltype(size)::value, T>(q + h * dim, keys, values, length, stride, scale,
                                              scores + h * length, out + h * dim);
  };
  int64_t h = 0;
  for (; h + most <= heads; h += most) group(std::integral_constant<int, most>(), h);
  if constexpr (most > 2)
    for (; h + 2 <= heads; h += 2) group(std::integral_constant<int, 2>(), h);
  for (; h < heads; ++h) group(std::integral_constant<int, 1>(), h);
}

// Any other head size: one key at a time through dot_head / axpy_head (fp16 rows widened first).
inline const float* as_f32(const float* row, int64_t, float*) { return row; }
inline const float* as_f32(const uint16_t* row, int64_t dim, float* buffer) {
  int64_t k = 0;
  for (; k + kLanes <= dim; k += kLanes) vstore(buffer + k, vload(row + k));
  for (; k < dim; ++k) buffer[k] = _cvtsh_ss(row[k]);
  return buffer;
}

template <typename T>
void attend_any(const float* q, int64_t heads, const T* keys, const T* values, int64_t length,
                int64_t stride, int64_t dim, float scale, float* scores, float* out) {
  std::vector<float> row(dim);
  for (int64_t h = 0; h < heads; ++h) {
    float* s = scores + h * length;
    for (int64_t j = 0; j < length; ++j)
      s[j] = dot_head(q + h * dim, as_f32(keys + j * stride, dim, row.data()), dim) * scale;
    softmax_in_place(s, length);
    std::fill(out + h * dim, out + (h + 1) * dim, 0.0f);
    for (int64_t j = 0; j < length; ++j)
      axpy_head(s[j], as_f32(values + j * stride, dim, row.data()), out + h * dim, dim);
  }
}

template <typename T>
void attend_kv(const float* q, int64_t heads, const T* keys, const T* values, int64_t length, int64_t stride,
               int64_t dim, float scale, float* scores, float* out) {
  if (dim % kLanes == 0) {
    switch (dim / kLanes) {  // head sizes 32-128 (AVX-512) / 32-64 (AVX2: 16 registers)
#if ISA_LEVEL == 3
      case 2: return attend_heads<2>(q, heads, keys, values, length, stride, scale, scores, out);
      case 4: return attend_heads<4>(q, heads, keys, values, length, stride, scale, scores, out);
      case 5: return attend_heads<5>(q, heads, keys, values, length, stride, scale, scores, out);
      case 6: return attend_heads<6>(q, heads, keys, values, length, stride, scale, scores, out);
      case 8: return attend_heads<8>(q, heads, keys, values, length, stride, scale, scores, out);
#else
      case 4: return attend_heads<4>(q, heads, keys, values, length, stride, scale, scores, out);
      case 8: return attend_heads<8>(q, heads, keys, values, length, stride, scale, scores, out);
#endif
      default: break;
    }
  }
  attend_any(q, heads, keys, values, length, stride, dim, scale, scores, out);
}

void attend(const float* q, int64_t heads, const float* keys, const float* values, int64_t length, int64_t stride,
            int64_t dim, float scale, float* scores, float* out) {
  attend_kv(q, heads, keys, values, length, stride, dim, scale, scores, out);
}

void attend_half(const float* q, int64_t heads, const uint16_t* keys, const uint16_t* values, int64_t length,
                 int64_t stride, int64_t dim, float scale, float* scores, float* out) {
  attend_kv(q, heads, keys, values, length, stride, dim, scale, scores, out);
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

// Weights stream from memory once per token: asking for the lines 2 KB ahead of the loads keeps more misses in
// flight than the hardware prefetcher alone (1B decode +9% here). Past the tensor's end it is only a hint.
constexpr int64_t kPrefetchAhead = 2048;
inline void prefetch_ahead(const void* p, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64)
    _mm_prefetch(static_cast<const char*>(p) + kPrefetchAhead + at, _MM_HINT_T0);
}

// int8 tiles (tile_int8 in native_step.cpp): 16 outputs' fp32 row scales, then per block of 32 inputs 8 chunks
// of 64 bytes; chunk c holds inputs 4c..4c+3, byte j output j/4's input 4c + j%4. VNNI multiplies unsigned by
// signed bytes, so the activations come offset by 128 (xu = x + 128, see Quantized::offset) and each block
// subtracts 128 × its weights' sum, formed once for all rows: the integer block sums stay exact.
// Per output, whatever the rows: acc += float(block sum) * xd block by block, then acc * row scale.
template <int rows>
void tile_q8_rows(const uint8_t* tile, int64_t blocks, const uint8_t* xu, const int8_t* xq, const float* xd,
                  int64_t q_stride, int64_t d_stride, float* out) {
  const float* row_scale = reinterpret_cast<const float*>(tile);
  const int8_t* p = reinterpret_cast<const int8_t*>(tile + 64);
#if ISA_LEVEL == 3
  (void)xq;
  __m512 acc[rows];
  for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < blocks; ++b, p += 512) {
    prefetch_ahead(p, 512);
    __m512i w[8];
    __m512i offset = _mm512_setzero_si512();
    for (int c = 0; c < 8; ++c) {
      w[c] = _mm512_loadu_si512(p + 64 * c);
      offset = _mm512_dpbusd_epi32(offset, k128, w[c]);
    }
    for (int r = 0; r < rows; ++r) {
      const int32_t* x4 = reinterpret_cast<const int32_t*>(xu + r * q_stride + b * 32);
      __m512i even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi32(x4[0]), w[0]);
      __m512i odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi32(x4[1]), w[1]);
      for (int c = 2; c < 8; c += 2) {
        even = _mm512_dpbusd_epi32(even, _mm512_set1_epi32(x4[c]), w[c]);
        odd = _mm512_dpbusd_epi32(odd, _mm512_set1_epi32(x4[c + 1]), w[c + 1]);
      }
      const __m512i sum = _mm512_sub_epi32(_mm512_add_epi32(even, odd), offset);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xd[r * d_stride + b]), acc[r]);
    }
  }
  const __m512 scale = _mm512_loadu_ps(row_scale);
  for (int r = 0; r < rows; ++r) _mm512_storeu_ps(out + r * 16, _mm512_mul_ps(acc[r], scale));
#else
  __m256 lo[rows], hi[rows];  // outputs 0-7, 8-15
  for (int r = 0; r < rows; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
#if ISA_LEVEL == 1
  (void)xu;
  __m256i mag[16];  // |w| of the block's chunks: mag[2c] outputs 0-7, mag[2c + 1] outputs 8-15
#else
  (void)xq;
  const __m256i k128 = _mm256_set1_epi8(static_cast<char>(0x80));
#endif
  __m256i w[16];
  for (int64_t b = 0; b < blocks; ++b, p += 512) {
    prefetch_ahead(p, 512);
    for (int i = 0; i < 16; ++i) w[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * i));
#if ISA_LEVEL == 1
    // AVX2 multiplies unsigned by signed bytes into saturating int16 pairs: |w| times x carrying w's sign
    // (|127 * 127 * 2| < 32,767), widened to int32 per chunk
    for (int i = 0; i < 16; ++i) mag[i] = _mm256_sign_epi8(w[i], w[i]);
    for (int r = 0; r < rows; ++r) {
      const int32_t* x4 = reinterpret_cast<const int32_t*>(xq + r * q_stride + b * 32);
      __m256i i_lo = _mm256_setzero_si256(), i_hi = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i x = _mm256_set1_epi32(x4[c]);
        i_lo = _mm256_add_epi32(i_lo, dot_u8s8(mag[2 * c], _mm256_sign_epi8(x, w[2 * c])));
        i_hi = _mm256_add_epi32(i_hi, dot_u8s8(mag[2 * c + 1], _mm256_sign_epi8(x, w[2 * c + 1])));
      }
#else
    __m256i off_lo = _mm256_setzero_si256(), off_hi = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      off_lo = _mm256_dpbusd_avx_epi32(off_lo, k128, w[2 * c]);
      off_hi = _mm256_dpbusd_avx_epi32(off_hi, k128, w[2 * c + 1]);
    }
    for (int r = 0; r < rows; ++r) {
      const int32_t* x4 = reinterpret_cast<const int32_t*>(xu + r * q_stride + b * 32);
      __m256i i_lo = _mm256_setzero_si256(), i_hi = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i x = _mm256_set1_epi32(x4[c]);
        i_lo = _mm256_dpbusd_avx_epi32(i_lo, x, w[2 * c]);
        i_hi = _mm256_dpbusd_avx_epi32(i_hi, x, w[2 * c + 1]);
      }
      i_lo = _mm256_sub_epi32(i_lo, off_lo);
      i_hi = _mm256_sub_epi32(i_hi, off_hi);
#endif
      const __m256 dx = _mm256_set1_ps(xd[r * d_stride + b]);
      lo[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i_lo), dx, lo[r]);
      hi[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i_hi), dx, hi[r]);
    }
  }
  const __m256 s_lo = _mm256_loadu_ps(row_scale), s_hi = _mm256_loadu_ps(row_scale + 8);
  for (int r = 0; r < rows; ++r) {
    _mm256_storeu_ps(out + r * 16, _mm256_mul_ps(lo[r], s_lo));
    _mm256_storeu_ps(out + r * 16 + 8, _mm256_mul_ps(hi[r], s_hi));
  }
#endif
}

// int4 tiles: 16 outputs side by side, so vector lanes are outputs (the layout tile_int4 in native_step.cpp
// writes). Per group of a tile's inputs: 16 fp16 scales, 16 fp16 mins, then per block of 32 inputs 8 chunks of
// 32 bytes; chunk c holds inputs 4c..4c+3, byte j output j/4's in its low nibble and output 8 + j/4's in its
// high nibble. Unpacked, a chunk is 16 lanes (outputs) of 4 codes: one dot product with 4 broadcast activation
// bytes advances 16 outputs' block sums, and per block one convert and one fma scale all 16 — the scale work is
// per block rather than per (output, block), and each unpacked chunk serves every row.
// Per output, in this order whatever the rows: acc += float(block sum) * (scale * xd) block by block, and after
// each group acc += min * (that group's sum of x̂). Lanes never mix, so every ISA gives the same bits.
template <int rows>
void tile_q4_rows(const uint8_t* tile, int64_t blocks, int64_t per_group, const int8_t* xq, const float* xd,
                  const float* xs, int64_t q_stride, int64_t d_stride, int64_t gs_stride, float* out) {
  const uint8_t* p = tile;
#if ISA_LEVEL == 3
  __m512 acc[rows];
  for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F), shift = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
  for (int64_t g = 0, b = 0; b < blocks; ++g) {
    const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512 wm = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
    p += 64;
    for (int64_t e = 0; e < per_group; ++e, ++b, p += 256) {
      prefetch_ahead(p, 256);
      __m512i q[8];
      for (int c = 0; c < 8; ++c)
        q[c] = _mm512_and_si512(
            _mm512_srlv_epi64(_mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c))),
                              shift), low);
      for (int r = 0; r < rows; ++r) {
        const int32_t* x4 = reinterpret_cast<const int32_t*>(xq + r * q_stride + b * 32);
        __m512i even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[0], _mm512_set1_epi32(x4[0]));
        __m512i odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[1], _mm512_set1_epi32(x4[1]));
        for (int c = 2; c < 8; c += 2) {
          even = _mm512_dpbusd_epi32(even, q[c], _mm512_set1_epi32(x4[c]));
          odd = _mm512_dpbusd_epi32(odd, q[c + 1], _mm512_set1_epi32(x4[c + 1]));
        }
        const __m512 d = _mm512_mul_ps(ws, _mm512_set1_ps(xd[r * d_stride + b]));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even, odd)), d, acc[r]);
      }
    }
    for (int r = 0; r < rows; ++r) acc[r] = _mm512_fmadd_ps(wm, _mm512_set1_ps(xs[r * gs_stride + g]), acc[r]);
  }
  for (int r = 0; r < rows; ++r) _mm512_storeu_ps(out + r * 16, acc[r]);
#else
  __m256 lo[rows], hi[rows];  // outputs 0-7, 8-15
  for (int r = 0; r < rows; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256i u[16];  // the block's chunks unpacked: u[2c] outputs 0-7, u[2c + 1] outputs 8-15
  for (int64_t g = 0, b = 0; b < blocks; ++g) {
    const __m128i* h = reinterpret_cast<const __m128i*>(p);
    const __m256 ws_lo = _mm256_cvtph_ps(_mm_loadu_si128(h)), ws_hi = _mm256_cvtph_ps(_mm_loadu_si128(h + 1));
    const __m256 wm_lo = _mm256_cvtph_ps(_mm_loadu_si128(h + 2)), wm_hi = _mm256_cvtph_ps(_mm_loadu_si128(h + 3));
    p += 64;
    for (int64_t e = 0; e < per_group; ++e, ++b, p += 256) {
      prefetch_ahead(p, 256);
      for (int c = 0; c < 8; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c));
        u[2 * c] = _mm256_and_si256(v, low);
        u[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      }
      for (int r = 0; r < rows; ++r) {
        const int32_t* x4 = reinterpret_cast<const int32_t*>(xq + r * q_stride + b * 32);
#if ISA_LEVEL == 1
        // int16 pair sums: |15 * 127 * 2| = 3,810 per chunk, 30,480 over 8 chunks — exact, no saturation
        __m256i s_lo = _mm256_setzero_si256(), s_hi = _mm256_setzero_si256();
        for (int c = 0; c < 8; ++c) {
          const __m256i x = _mm256_set1_epi32(x4[c]);
          s_lo = _mm256_add_epi16(s_lo, _mm256_maddubs_epi16(u[2 * c], x));
          s_hi = _mm256_add_epi16(s_hi, _mm256_maddubs_epi16(u[2 * c + 1], x));
        }
        const __m256i i_lo = _mm256_madd_epi16(s_lo, _mm256_set1_epi16(1));
        const __m256i i_hi = _mm256_madd_epi16(s_hi, _mm256_set1_epi16(1));
#else
        __m256i i_lo = _mm256_setzero_si256(), i_hi = _mm256_setzero_si256();
        for (int c = 0; c < 8; ++c) {
          const __m256i x = _mm256_set1_epi32(x4[c]);
          i_lo = _mm256_dpbusd_avx_epi32(i_lo, u[2 * c], x);
          i_hi = _mm256_dpbusd_avx_epi32(i_hi, u[2 * c + 1], x);
        }
#endif
        const __m256 dx = _mm256_set1_ps(xd[r * d_stride + b]);
        lo[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i_lo), _mm256_mul_ps(ws_lo, dx), lo[r]);
        hi[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i_hi), _mm256_mul_ps(ws_hi, dx), hi[r]);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const __m256 sum = _mm256_set1_ps(xs[r * gs_stride + g]);
      lo[r] = _mm256_fmadd_ps(wm_lo, sum, lo[r]);
      hi[r] = _mm256_fmadd_ps(wm_hi, sum, hi[r]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    _mm256_storeu_ps(out + r * 16, lo[r]);
    _mm256_storeu_ps(out + r * 16 + 8, hi[r]);
  }
#endif
}

void dot_f32(const float* w, int64_t depth, const float* x, int64_t x_stride, int rows, float* out) {
  switch (rows) {
    case 1: return dot_f32_rows<1>(w, depth, x, x_stride, out);
    case 2: return dot_f32_rows<2>(w, depth, x, x_stride, out);
    case 3: return dot_f32_rows<3>(w, depth, x, x_stride, out);
    default: return dot_f32_rows<4>(w, depth, x, x_stride, out);
  }
}

// Rows in one pass over a tile: up to 8 on AVX-512; AVX2 has half the registers, so 4 at a time. Calls
// kernel(std::integral_constant<int, n>, first row) for each pass.
constexpr int kPassRows = ISA_LEVEL == 3 ? 8 : 4;
template <typename Kernel>
void by_passes(int rows, const Kernel& kernel) {
  for (int r0 = 0; r0 < rows; r0 += kPassRows) {
    switch (std::min(kPassRows, rows - r0)) {
      case 1: kernel(std::integral_constant<int, 1>(), r0); break;
      case 2: kernel(std::integral_constant<int, 2>(), r0); break;
      case 3: kernel(std::integral_constant<int, 3>(), r0); break;
      case 4: kernel(std::integral_constant<int, 4>(), r0); break;
#if ISA_LEVEL == 3
      case 5: kernel(std::integral_constant<int, 5>(), r0); break;
      case 6: kernel(std::integral_constant<int, 6>(), r0); break;
      case 7: kernel(std::integral_constant<int, 7>(), r0); break;
      case 8: kernel(std::integral_constant<int, 8>(), r0); break;
#endif
      default: break;
    }
  }
}

void tile_q4(const uint8_t* tile, int64_t blocks, int64_t per_group, const int8_t* xq, const float* xd,
             const float* xs, int64_t q_stride, int64_t d_stride, int64_t gs_stride, int rows, float* out) {
  by_passes(rows, [&](auto n, int r0) {
    tile_q4_rows<decltype(n)::value>(tile, blocks, per_group, xq + r0 * q_stride, xd + r0 * d_stride,
                                     xs + r0 * gs_stride, q_stride, d_stride, gs_stride, out + r0 * 16);
  });
}

void tile_q8(const uint8_t* tile, int64_t blocks, const uint8_t* xu, const int8_t* xq, const float* xd,
             int64_t q_stride, int64_t d_stride, int rows, float* out) {
  by_passes(rows, [&](auto n, int r0) {
    tile_q8_rows<decltype(n)::value>(tile, blocks, xu + r0 * q_stride, xq + r0 * q_stride, xd + r0 * d_stride,
                                     q_stride, d_stride, out + r0 * 16);
  });
}

const Kernels kernels = {dot_f32, tile_q8, tile_q4, attend, attend_half};

}  // namespace ISA_NS
