// Prototype (not built by the project; issue 14's next step): int4 weights repacked so that vector lanes are
// outputs, 16 at a time, as llama.cpp's ggml_gemm_q4_0_8x8_q8_0 does for Q4_0. Per block of 32 inputs a row then
// costs 8 dpbusd with broadcast activations and one convert + fma for 16 outputs, instead of 4 vector ops per
// output per 64 weights. Random data, timing only (results are not checked).
//   g++ -O3 -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512dq -mf16c -mfma -o lanes lanes_outputs.cpp
//   ./lanes 32      # rows; compare with the native kernel on one thread (NativeModel.linear_forward)
// Measured 2026-12-05, Zen 4, 1 thread, 11008x4096 int4-g32: 32 rows 126 GMAC/s vs the native kernel's 56.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <algorithm>

// Layout per (tile of 16 outputs, block b): 8 groups of 4 inputs, one 32-byte chunk each; byte j holds output
// j / 4, input j % 4 of the group in its low nibble and output 8 + j / 4 in its high nibble. Scales and mins per
// (tile, block): 16 fp16 each.
template <int R>
void tile_rows(const uint8_t* w, const uint16_t* sc, const uint16_t* mn, int64_t blocks, const int8_t* xq,
               const float* xd, const float* xs, int64_t depth, float* y, int64_t ystride) {
  __m512 acc[R], mac[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), mac[r] = _mm512_setzero_ps();
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i sh = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* p = w + b * 256;
    __m512i q[8];
    for (int c = 0; c < 8; ++c) {
      const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(p + c * 32)));
      q[c] = _mm512_and_si512(_mm512_srlv_epi64(v, sh), m4);  // lanes 0-7: outputs 0-7, 8-15: outputs 8-15
    }
    const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sc + b * 16)));
    const __m512 wm = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mn + b * 16)));
    for (int r = 0; r < R; ++r) {
      const int32_t* x4 = (const int32_t*)(xq + r * depth + b * 32);
      __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();
      for (int c = 0; c < 8; ++c) {
        const __m512i xv = _mm512_set1_epi32(x4[c]);  // lanes 0-7 outputs 0-7 (low nibbles), 8-15 outputs 8-15
        if (c & 1) i1 = _mm512_dpbusd_epi32(i1, q[c], xv); else i0 = _mm512_dpbusd_epi32(i0, q[c], xv);
      }
      const __m512 d = _mm512_mul_ps(ws, _mm512_set1_ps(xd[r * blocks + b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1)), d, acc[r]);
      mac[r] = _mm512_fmadd_ps(wm, _mm512_set1_ps(xs[r * blocks + b]), mac[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ystride, _mm512_add_ps(acc[r], mac[r]));
}

int main(int argc, char** argv) {
  const int64_t outs = 11008, depth = 4096, blocks = depth / 32;
  const int rows = argc > 1 ? atoi(argv[1]) : 32;
  std::vector<uint8_t> w(outs / 16 * blocks * 256);
  std::vector<uint16_t> sc(outs / 16 * blocks * 16, 0x2000), mn(outs / 16 * blocks * 16, 0xA000);
  for (auto& v : w) v = rand();
  std::vector<int8_t> xq(rows * depth);
  for (auto& v : xq) v = rand() % 255 - 127;
  std::vector<float> xd(rows * blocks, 0.01f), xs(rows * blocks, 0.5f), y(rows * outs);
  double best = 1e9;
  for (int it = 0; it < 7; ++it) {
    auto t0 = std::chrono::steady_clock::now();
    const int64_t span = 16 * 8;  // outputs per L2 span: 8 tiles x 128 KB
    for (int64_t o0 = 0; o0 < outs; o0 += span)
      for (int r0 = 0; r0 < rows; r0 += 4)
        for (int64_t t = o0 / 16; t < std::min(outs, o0 + span) / 16; ++t) {
          const uint8_t* wt = w.data() + t * blocks * 256;
          const int R = std::min(4, rows - r0);
          const int8_t* x = xq.data() + r0 * depth;
          float* yy = y.data() + r0 * outs + t * 16;
          const uint16_t* s = sc.data() + t * blocks * 16; const uint16_t* m = mn.data() + t * blocks * 16;
          const float* d = xd.data() + r0 * blocks; const float* ss = xs.data() + r0 * blocks;
          if (R == 4) tile_rows<4>(wt, s, m, blocks, x, d, ss, depth, yy, outs);
          else if (R == 1) tile_rows<1>(wt, s, m, blocks, x, d, ss, depth, yy, outs);
          else if (R == 2) tile_rows<2>(wt, s, m, blocks, x, d, ss, depth, yy, outs);
          else tile_rows<3>(wt, s, m, blocks, x, d, ss, depth, yy, outs);
        }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  printf("lanes=outputs prototype, 1 thread, %ldx%ld int4-g32, rows %d: %.2f ms  %.1f GMAC/s  (y0=%g)\n", outs, depth, rows,
         best * 1e3, outs * depth * rows / best / 1e9, y[0]);
}
