// A whole forward step of a llama-family decoder in one native call: embeddings, per layer RMSNorm, QKV
// (+ bias, + per-head q/k RMSNorm), RoPE, KV-cache write, attention, output projection, gated SiLU MLP and
// residuals, then the final norm and the head for the rows whose logits are wanted. No Python runs between ops.
//
// Rows are the flat batch of the engine (runner.py): decode rows and prefill chunks of many sequences side by
// side, each with its own position and cache. Every row is computed on its own (integer block sums, fp32 sums
// in a fixed order, attention one row at a time), so its numbers never depend on the batch it shares.
//
// fp32 and int8 (per channel) linears read the store's weights in place; int4 linears read a copy of theirs
// rewritten once as tiles of 16 outputs (tile_int4), whose vector lanes are outputs, as llama.cpp repacks Q4_0
// for its GEMM. Activations are quantized per block of 32 to int8 for the integer dot products (as llama.cpp
// does). The instruction set is
// chosen at run time (see native_isa.h); work is shared by a persistent pool whose threads take chunks of
// outputs from a counter, so a thread the OS has descheduled delays only the chunk it holds.
#include <torch/extension.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

constexpr int kMaxRows = 4;  // activation rows sharing one pass over a weight row
constexpr int kTileRows = 8;  // … over an int8/int4 tile (16 outputs)
constexpr int64_t kTile = 16;  // outputs per int4 tile
constexpr int64_t kMaxBlocks = 2048;  // inputs per linear up to 65,536

struct Kernels {
  void (*dot_f32)(const float*, int64_t, const float*, int64_t, int, float*);
  void (*tile_q8)(const uint8_t*, int64_t, const uint8_t*, const int8_t*, const float*, int64_t, int64_t, int, float*);
  void (*tile_q4)(const uint8_t*, int64_t, int64_t, const int8_t*, const float*, const float*, int64_t, int64_t,
                  int64_t, int, float*);
  void (*attend)(const float*, int64_t, const float*, const float*, int64_t, int64_t, int64_t, float, float*, float*);
  void (*attend_half)(const float*, int64_t, const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, float, float*,
                      float*);
};

// A row's keys or values into an fp16 cache: round to nearest even, as torch's .half() does.
__attribute__((target("avx2,f16c"))) inline void store_half(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// The first largest of v[0, n) as torch.argmax picks it (a NaN counts as the largest; the first one wins):
// its index, and its value in *value. One vector pass for the maximum (and whether a NaN is there), then a
// scan for its first position.
__attribute__((target("avx2"))) inline int64_t first_largest(const float* v, int64_t n, float* value) {
  __m256 top = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(v + i);
    top = _mm256_max_ps(top, x);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  float best = -INFINITY;
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  for (int k = 0; k < 8; ++k) best = std::max(best, lanes[k]);
  for (int64_t k = i; k < n; ++k) {
    if (std::isnan(v[k])) has_nan = true;
    else best = std::max(best, v[k]);
  }
  for (int64_t k = 0; k < n; ++k)
    if (has_nan ? std::isnan(v[k]) : v[k] == best) {
      *value = v[k];
      return k;
    }
  *value = v[0];  // n > 0 and every value -inf: the first
  return 0;
}

// The head's extra work, done in the job that made each chunk of logits (its thread's cache holds them): divide
// by the model's logits divisor, then each row's first largest logit per chunk; `choose` merges the chunks in
// order, as one scan of the whole row would.
struct HeadScan {
  float divisor = 1.0f;
  int64_t rows = 0;
  std::vector<float> value;  // [chunk][row]
  std::vector<int64_t> index;
  void prepare(int64_t chunks, int64_t n) {
    rows = n;
    value.assign(chunks * n, 0.0f);
    index.assign(chunks * n, -1);
  }
  void scan(int64_t chunk, float* y, int64_t y_width, int64_t begin, int64_t end) {
    for (int64_t n = 0; n < rows; ++n) {
      float* row = y + n * y_width;
      if (divisor != 1.0f)
        for (int64_t o = begin; o < end; ++o) row[o] /= divisor;
      float v = 0.0f;
      const int64_t at = first_largest(row + begin, end - begin, &v);
      value[chunk * rows + n] = v;
      index[chunk * rows + n] = begin + at;
    }
  }
  torch::Tensor choose() const {
    auto out = torch::empty({rows}, torch::kInt64);
    int64_t* best = out.data_ptr<int64_t>();
    const int64_t chunks = rows ? static_cast<int64_t>(index.size()) / rows : 0;
    for (int64_t n = 0; n < rows; ++n) {
      int64_t pick = -1;
      float top = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t at = index[c * rows + n];
        if (at < 0) continue;
        const float v = value[c * rows + n];
        if (pick < 0 || (!std::isnan(top) && (std::isnan(v) || v > top))) {
          pick = at;
          top = v;
        }
      }
      best[n] = pick;
    }
    return out;
  }
};

// e^x for x in [-87.3, 88.3] (clamped), 8 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-5
// polynomial, 2^n through the exponent bits), within ~2 ulp of std::exp. Every row gets the same function.
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                                 _mm256_set1_ps(0.5f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ISA_NS isa_avx2
#define ISA_LEVEL 1
#include "native_isa.h"
#undef ISA_NS
#undef ISA_LEVEL
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define ISA_NS isa_avxvnni
#define ISA_LEVEL 2
#include "native_isa.h"
#undef ISA_NS
#undef ISA_LEVEL
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define ISA_NS isa_avx512vnni
#define ISA_LEVEL 3
#include "native_isa.h"
#undef ISA_NS
#undef ISA_LEVEL
#pragma GCC pop_options

namespace {

// -- instruction sets ------------------------------------------------------------------------------------
const char* kIsaNames[] = {"", "avx2", "avxvnni", "avx512vnni"};

// AVX-VNNI (VEX) is not implied by AVX-512 VNNI: Ice Lake / Cascade Lake servers have only the latter.
bool isa_supported(int level) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (level) {
    case 1: return avx2;
    case 2: return avx2 && __builtin_cpu_supports("avxvnni");
    case 3: return avx2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    default: return false;
  }
}

int best_isa() {
  for (int level = 3; level >= 1; --level)
    if (isa_supported(level)) return level;
  return 0;
}

const Kernels& kernels_for(int level) {
  switch (level) {
    case 3: return isa_avx512vnni::kernels;
    case 2: return isa_avxvnni::kernels;
    default: return isa_avx2::kernels;
  }
}

// -- thread pool -----------------------------------------------------------------------------------------
long futex(std::atomic<int>* word, int op, int value) {
  return syscall(SYS_futex, reinterpret_cast<int*>(word), op, value, nullptr, nullptr, 0);
}

// Work is a number of chunks; the caller and the workers take chunk indices from `next_` (job id in the high
// 32 bits, so a late worker can never take a chunk of a job it did not see) until none are left.
class Pool {
 public:
  explicit Pool(int threads, int spin) : spin_(spin) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    stop_.store(true);
    epoch_.fetch_add(1);
    futex(&epoch_, FUTEX_WAKE_PRIVATE, INT32_MAX);
    for (auto& t : workers_) t.join();
  }
  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  void run(int64_t chunks, const std::function<void(int64_t)>& work) {
    if (chunks <= 0) return;
    if (workers_.empty() || chunks == 1) {
      for (int64_t c = 0; c < chunks; ++c) work(c);
      return;
    }
    work_ = &work;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t job = (next_.load(std::memory_order_relaxed) >> 32) + 1;
    limit_.store(job << 32 | static_cast<uint64_t>(chunks), std::memory_order_release);
    next_.store(job << 32, std::memory_order_release);
    epoch_.fetch_add(1, std::memory_order_release);
    if (sleepers_.load(std::memory_order_acquire) > 0) futex(&epoch_, FUTEX_WAKE_PRIVATE, INT32_MAX);
    int64_t mine = take(job);
    while (mine >= 0) {
      work(mine);
      done_.fetch_add(1, std::memory_order_acq_rel);
      mine = take(job);
    }
    // Chunks another thread holds: spin briefly, then give the core away (a busy machine may have
    // descheduled that thread; spinning would only keep it off the core).
    for (int i = 0; done_.load(std::memory_order_acquire) < chunks; ++i) {
      if (i < spin_) _mm_pause();
      else sched_yield();
    }
  }

 private:
  int64_t take(uint64_t job) {
    uint64_t current = next_.load(std::memory_order_acquire);
    while (true) {
      // The chunk count is read with its job: a late thread still on the previous job must not compare that
      // job's last index with the next job's count (it then took a chunk of a job that had ended, ran the next
      // job's work with it and counted it as done, so a call could return while chunks still ran: a crash).
      const uint64_t limit = limit_.load(std::memory_order_acquire);
      if ((current >> 32) != job || (limit >> 32) != job || (current & 0xFFFFFFFFu) >= (limit & 0xFFFFFFFFu))
        return -1;
      if (next_.compare_exchange_weak(current, current + 1, std::memory_order_acq_rel)) {
        return static_cast<int64_t>(current & 0xFFFFFFFFu);
      }
    }
  }

  void loop() {
    int seen = 0;  // the epoch at construction: a pool destroyed before this thread ran still stops it
    while (true) {
      int now = epoch_.load(std::memory_order_acquire);
      for (int i = 0; now == seen && i < spin_; ++i) {
        _mm_pause();
        now = epoch_.load(std::memory_order_acquire);
      }
      if (now == seen) {
        sleepers_.fetch_add(1);
        now = epoch_.load(std::memory_order_acquire);
        if (now == seen) futex(&epoch_, FUTEX_WAIT_PRIVATE, seen);
        sleepers_.fetch_sub(1);
        continue;
      }
      seen = now;
      if (stop_.load()) return;
      const uint64_t job = next_.load(std::memory_order_acquire) >> 32;
      int64_t mine = take(job);
      while (mine >= 0) {
        (*work_)(mine);
        done_.fetch_add(1, std::memory_order_acq_rel);
        mine = take(job);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::atomic<int> epoch_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> done_{0};
  const std::function<void(int64_t)>* work_ = nullptr;
  std::atomic<uint64_t> limit_{0};  // the current job << 32 | its chunk count
  int spin_;
};

// -- model -----------------------------------------------------------------------------------------------
enum Kind { kF32 = 0, kInt8 = 1, kInt4 = 2 };  // int8 and int4 as tiles (tile_int8, tile_int4)

struct Linear {
  int kind = kF32;
  int64_t outputs = 0, inputs = 0, group = 0;
  const float* wf = nullptr;
  const uint8_t* tiles = nullptr;   // int8 / int4: tiles of 16 outputs (tile_int8 / tile_int4), scales inside
  int64_t tile_bytes = 0;
  const float* bias = nullptr;
  const float* input_scale = nullptr;  // AWQ: inputs divided per channel before the product
};

struct Layer {
  const float* input_norm;
  const float* post_norm;
  const float* q_norm = nullptr;  // per-head RMSNorm of q and k (Qwen3)
  const float* k_norm = nullptr;
  std::vector<Linear> qkv;        // q, k, v — or one fused projection
  Linear o;
  std::vector<Linear> gate_up;    // gate, up — or one fused projection (gate first)
  Linear down;
};

// -- element-wise work on activations (AVX2: every CPU the native path runs has it) ---------------------
// One block of 32 activations to int8 codes: scale = amax / 127, codes = round-half-even(x / scale) — the same
// IEEE operations, in the same order per element, as the scalar definition (emulated_linear in the tests).
__attribute__((target("avx2,fma"))) void quantize_block(const float* src, const float* input_scale, int8_t* dst,
                                                         float* scale_out, float* sum_out) {
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(src + 8 * i);
    if (input_scale) v[i] = _mm256_div_ps(v[i], _mm256_loadu_ps(input_scale + 8 * i));
    amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], magnitude));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 0x55));
  const float scale = _mm_cvtss_f32(m) / 127.0f;
  const __m256 inverse = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
  __m256i c[4];
  __m256i total = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    c[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    total = _mm256_add_epi32(total, c[i]);
  }
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  *scale_out = scale;
  *sum_out = scale * static_cast<float>(_mm_cvtsi128_si32(t));
}

// y = weight * (x / sqrt(mean(x^2) + eps)) for one row (y may be x): squares summed in 8 lanes, then a fixed
// tree and the tail in order, so a row's norm never depends on the others.
__attribute__((target("avx2,fma"))) void rms_norm_row(const float* x, const float* weight, float* y, int64_t width,
                                                      float eps) {
  __m256 squares = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= width; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    squares = _mm256_add_ps(squares, _mm256_mul_ps(v, v));
  }
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(squares), _mm256_extractf128_ps(squares, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  float total = _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 0x55)));
  for (int64_t k = i; k < width; ++k) total += x[k] * x[k];
  const float inverse = 1.0f / std::sqrt(total / static_cast<float>(width) + eps);
  const __m256 scale = _mm256_set1_ps(inverse);
  for (i = 0; i + 8 <= width; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), scale)));
  for (; i < width; ++i) y[i] = weight[i] * (x[i] * inverse);
}

// out = silu(gate) * up = gate / (1 + e^-gate) * up
__attribute__((target("avx2,fma"))) void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
  }
  if (i < n) {  // the tail through the same lanes (padded with zeros), so every element sees exp8
    alignas(32) float g[8] = {}, u[8] = {}, o[8];
    for (int64_t j = i; j < n; ++j) g[j - i] = gate[j], u[j - i] = up[j];
    silu_mul(g, u, o, 8);
    for (int64_t j = i; j < n; ++j) out[j] = o[j - i];
  }
}

// Activations of `rows` rows quantized per block of 32: codes, scales, and each block's sum *of the quantized
// values* (scale × sum of codes). The int4 min term uses that sum, so a linear computes exactly w · x̂ (x̂ the
// quantized activations): the activation error then meets weights centred on zero, not the all-positive
// codes × scale. With the exact fp32 sum instead, the default model's KL to fp32 was 4-5x higher (0.015 vs
// 0.003 nats) — the same choice as llama.cpp's Q8_1 `s`.
struct Quantized {
  std::vector<int8_t> q;
  std::vector<float> s, d;  // per block: sum of the quantized values, scale
  int64_t depth = 0;
  void fill(const float* x, int64_t rows, int64_t width, const float* input_scale, Pool& pool) {
    prepare(rows, width);
    const std::function<void(int64_t)> each = [&](int64_t n) { row(x + n * width, n, input_scale); };
    pool.run(rows, each);
  }
  // Room for `rows` rows, then each row on its own (a fused per-row job quantizes the row it has just made).
  void prepare(int64_t rows, int64_t width) {
    depth = width;
    q.resize(rows * width);
    s.resize(rows * width / 32);
    d.resize(rows * width / 32);
    unsigned_codes.clear();
    by_group.clear();
  }
  void row(const float* x, int64_t n, const float* input_scale) {
    const int64_t blocks = depth / 32;
    for (int64_t b = 0; b < blocks; ++b)
      quantize_block(x + b * 32, input_scale ? input_scale + b * 32 : nullptr, q.data() + n * depth + b * 32,
                     &d[n * blocks + b], &s[n * blocks + b]);
  }
  // the codes + 128 as unsigned bytes, for int8 weights (VNNI multiplies unsigned by signed bytes)
  const uint8_t* offset() {
    if (unsigned_codes.empty()) {
      unsigned_codes.resize(q.size());
      for (size_t i = 0; i < q.size(); ++i) unsigned_codes[i] = static_cast<uint8_t>(q[i] ^ 0x80);
    }
    return unsigned_codes.data();
  }
  std::vector<uint8_t> unsigned_codes;
  // sums of x̂ over groups of `group` inputs (block sums added in order), for the int4 min term
  const float* group_sums(int64_t group, int64_t rows) {
    for (auto& [size, sums] : by_group)
      if (size == group) return sums.data();
    const int64_t blocks = depth / 32, per = group / 32, groups = depth / group;
    std::vector<float> sums(rows * groups, 0.0f);
    for (int64_t n = 0; n < rows; ++n)
      for (int64_t g = 0; g < groups; ++g) {
        float total = 0.0f;
        for (int64_t i = 0; i < per; ++i) total += s[n * blocks + g * per + i];
        sums[n * groups + g] = total;
      }
    by_group.emplace_back(group, std::move(sums));
    return by_group.back().second.data();
  }
  std::vector<std::pair<int64_t, std::vector<float>>> by_group;  // few entries; pointers stay valid (reserved)
  Quantized() { by_group.reserve(8); }
};

// Bytes of one int4 tile: per group 16 fp16 scales and 16 fp16 mins, per block of 32 inputs 256 bytes.
int64_t tile_bytes(int64_t inputs, int64_t group) { return inputs / group * 64 + inputs / 32 * 256; }

// Where block b's codes start in an int4 tile (per = blocks per group; each group opens with its 64 bytes of
// scales and mins), and where in a block output j (0-15) keeps input i (0-31): the byte and the nibble's shift.
int64_t int4_block(int64_t b, int64_t per) { return b / per * (64 + per * 256) + 64 + b % per * 256; }
struct Nibble {
  int64_t byte;
  int shift;
};
Nibble int4_in_block(int64_t j, int64_t i) { return {i / 4 * 32 + j % 8 * 4 + i % 4, j < 8 ? 0 : 4}; }

// Where output j of an int8 tile keeps input k's weight (after the 16 fp32 row scales).
int64_t int8_at(int64_t j, int64_t k) { return 64 + k / 32 * 512 + k % 32 / 4 * 64 + j * 4 + k % 4; }

// The store's int4 linear ([outputs, inputs / 2] bytes, even input in the low nibble; scale and min per
// output and group) rewritten as tiles of 16 outputs for tile_q4 (native_isa.h describes the layout). Outputs
// past the last multiple of 16 are zero codes with zero scale and min: they add nothing and are never stored.
torch::Tensor tile_int4(torch::Tensor packed, torch::Tensor scale, torch::Tensor mins, int64_t group) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 2, "packed int4 weight [outputs, inputs / 2]");
  const int64_t outputs = packed.size(0), inputs = packed.size(1) * 2;
  TORCH_CHECK(group % 32 == 0 && inputs % group == 0, "int4 groups must be a multiple of 32 dividing the inputs");
  const int64_t groups = inputs / group, per = group / 32, tiles = (outputs + kTile - 1) / kTile;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == outputs && scale.size(1) == groups && mins.sizes() == scale.sizes(),
              "one scale and min per output and group");
  packed = packed.contiguous();
  auto s16 = scale.to(torch::kFloat16).contiguous(), m16 = mins.to(torch::kFloat16).contiguous();
  const int64_t bytes = tile_bytes(inputs, group);
  auto out = torch::zeros({tiles, bytes}, torch::kUInt8);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(s16.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(m16.data_ptr<at::Half>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const auto code = [&](int64_t o, int64_t k) -> uint8_t {  // zero past the last output (tiles start zeroed)
    return o < outputs ? (w[o * (inputs / 2) + k / 2] >> (4 * (k & 1))) & 0x0F : 0;
  };
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      uint8_t* tile = dst + t * bytes;
      for (int64_t g = 0; g < groups; ++g) {
        uint16_t* sc = reinterpret_cast<uint16_t*>(tile + g * (64 + per * 256));
        for (int64_t j = 0; j < kTile; ++j) {
          const int64_t o = t * kTile + j;
          sc[j] = o < outputs ? sp[o * groups + g] : 0;
          sc[kTile + j] = o < outputs ? mp[o * groups + g] : 0;
        }
      }
      for (int64_t j = 0; j < kTile; ++j)
        for (int64_t b = 0; b < inputs / 32; ++b) {
          uint8_t* block = tile + int4_block(b, per);
          for (int64_t i = 0; i < 32; ++i) {
            const Nibble at = int4_in_block(j, i);
            block[at.byte] |= static_cast<uint8_t>(code(t * kTile + j, b * 32 + i) << at.shift);
          }
        }
    }
  });
  return out;
}

// Bytes of one int8 tile: 16 fp32 row scales, then per block of 32 inputs 512 bytes.
int64_t tile_bytes_int8(int64_t inputs) { return 64 + inputs / 32 * 512; }

// The store's int8 linear ([outputs, inputs], one fp32 scale per output) as tiles of 16 outputs for tile_q8
// (native_isa.h); the padded outputs of a last partial tile have zero weights and scale.
torch::Tensor tile_int8(torch::Tensor weight, torch::Tensor scale) {
  TORCH_CHECK(weight.dtype() == torch::kInt8 && weight.dim() == 2 && weight.size(1) % 32 == 0,
              "int8 weight [outputs, inputs], inputs a multiple of 32");
  const int64_t outputs = weight.size(0), inputs = weight.size(1), tiles = (outputs + kTile - 1) / kTile;
  TORCH_CHECK(scale.numel() == outputs, "one scale per output");
  weight = weight.contiguous();
  auto s32 = scale.to(torch::kFloat32).contiguous();
  const int64_t bytes = tile_bytes_int8(inputs);
  auto out = torch::zeros({tiles, bytes}, torch::kUInt8);
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* sp = s32.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      uint8_t* tile = dst + t * bytes;
      float* sc = reinterpret_cast<float*>(tile);
      for (int64_t j = 0; j < kTile; ++j) sc[j] = t * kTile + j < outputs ? sp[t * kTile + j] : 0.0f;
      for (int64_t j = 0; j < kTile && t * kTile + j < outputs; ++j)
        for (int64_t k = 0; k < inputs; ++k)
          tile[int8_at(j, k)] = static_cast<uint8_t>(w[(t * kTile + j) * inputs + k]);
    }
  });
  return out;
}

// The store's layout back from tiles (exact: tiles hold the same codes), for whoever needs it after the native
// path released it (native.py restore_store_layout): int4 packed bytes [outputs, inputs / 2], int8 [outputs, inputs].
torch::Tensor untile_int4(torch::Tensor tiles, int64_t outputs, int64_t inputs, int64_t group) {
  TORCH_CHECK(tiles.dtype() == torch::kUInt8 && tiles.dim() == 2 && group % 32 == 0 && inputs % group == 0 &&
              tiles.size(0) == (outputs + kTile - 1) / kTile && tiles.size(1) == tile_bytes(inputs, group),
              "weight tiles do not match their shape");
  tiles = tiles.contiguous();
  const int64_t per = group / 32, bytes = tiles.size(1);
  auto out = torch::zeros({outputs, inputs / 2}, torch::kUInt8);
  const uint8_t* src = tiles.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, outputs, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* tile = src + o / kTile * bytes;
      for (int64_t b = 0; b < inputs / 32; ++b) {
        const uint8_t* block = tile + int4_block(b, per);
        for (int64_t i = 0; i < 32; ++i) {
          const Nibble at = int4_in_block(o % kTile, i);
          const int code = (block[at.byte] >> at.shift) & 0x0F;
          dst[o * (inputs / 2) + b * 16 + i / 2] |= static_cast<uint8_t>(code << (4 * (i & 1)));
        }
      }
    }
  });
  return out;
}

torch::Tensor untile_int8(torch::Tensor tiles, int64_t outputs, int64_t inputs) {
  TORCH_CHECK(tiles.dtype() == torch::kUInt8 && tiles.dim() == 2 && inputs % 32 == 0 &&
              tiles.size(0) == (outputs + kTile - 1) / kTile && tiles.size(1) == tile_bytes_int8(inputs),
              "weight tiles do not match their shape");
  tiles = tiles.contiguous();
  const int64_t bytes = tiles.size(1);
  auto out = torch::empty({outputs, inputs}, torch::kInt8);
  const uint8_t* src = tiles.data_ptr<uint8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, outputs, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* tile = src + o / kTile * bytes;
      for (int64_t k = 0; k < inputs; ++k) dst[o * inputs + k] = static_cast<int8_t>(tile[int8_at(o % kTile, k)]);
    }
  });
  return out;
}

class NativeModel {
 public:
  NativeModel(py::dict config, torch::Tensor embed, torch::Tensor final_norm, py::tuple head, py::list layers,
              torch::Tensor inv_freq)
      : embed_(embed.contiguous()), final_norm_(final_norm.contiguous()), inv_freq_(inv_freq.contiguous().to(torch::kFloat32)) {
    hidden_ = config["hidden"].cast<int64_t>();
    heads_ = config["heads"].cast<int64_t>();
    kv_heads_ = config["kv_heads"].cast<int64_t>();
    head_dim_ = config["head_dim"].cast<int64_t>();
    intermediate_ = config["intermediate"].cast<int64_t>();
    eps_ = config["eps"].cast<float>();
    attention_scale_ = config["attention_scale"].cast<float>();
    rope_factor_ = config["rope_factor"].cast<float>();
    embedding_multiplier_ = config["embedding_multiplier"].cast<float>();
    residual_multiplier_ = config["residual_multiplier"].cast<float>();
    logits_divisor_ = config["logits_divisor"].cast<float>();
    rotary_dim_ = inv_freq_.numel() * 2;
    TORCH_CHECK(rotary_dim_ <= head_dim_, "rotary dimension larger than the head");
    TORCH_CHECK(embed_.dtype() == torch::kFloat32 && final_norm_.dtype() == torch::kFloat32, "fp32 embeddings");
    head_ = linear(head);
    for (auto item : layers) {
      auto t = item.cast<py::tuple>();
      Layer layer;
      layer.input_norm = f32(t[0].cast<torch::Tensor>());
      layer.post_norm = f32(t[1].cast<torch::Tensor>());
      auto qn = t[2].cast<torch::Tensor>(), kn = t[3].cast<torch::Tensor>();
      if (qn.numel()) layer.q_norm = f32(qn);
      if (kn.numel()) layer.k_norm = f32(kn);
      for (auto l : t[4].cast<py::list>()) layer.qkv.push_back(linear(l.cast<py::tuple>()));
      layer.o = linear(t[5].cast<py::tuple>());
      for (auto l : t[6].cast<py::list>()) layer.gate_up.push_back(linear(l.cast<py::tuple>()));
      layer.down = linear(t[7].cast<py::tuple>());
      layers_.push_back(std::move(layer));
    }
    set_threads(1, 20000);
    set_isa(best_isa());
  }

  void set_isa(int level) {
    TORCH_CHECK(level >= 1 && level <= 3, "instruction-set level must be 1 (avx2), 2 (avxvnni) or 3 (avx512vnni)");
    TORCH_CHECK(isa_supported(level), "this CPU does not support ", kIsaNames[level]);
    isa_ = level;
    k_ = &kernels_for(level);
  }
  std::string isa() const { return kIsaNames[isa_]; }
  void set_threads(int threads, int spin) {
    TORCH_CHECK(threads >= 1 && threads <= 256, "threads must be 1..256");
    pool_.reset();
    pool_ = std::make_unique<Pool>(threads, spin);
  }
  int threads() const { return pool_->threads(); }

  // tokens/positions/cache_of_row: [T]; keys/values: per sequence, per layer [capacity, kv_heads, head_dim];
  // keep: rows whose logits are returned. Writes each row's keys/values at its position.
  // The kept rows' logits and each one's greedy choice (its first largest logit).
  std::tuple<torch::Tensor, torch::Tensor> step(torch::Tensor tokens, torch::Tensor positions,
                                                 torch::Tensor cache_of_row,
                                                 std::vector<std::vector<torch::Tensor>> keys,
                                                 std::vector<std::vector<torch::Tensor>> values,
                                                 torch::Tensor keep) {
    tokens = tokens.contiguous().to(torch::kInt64);
    positions = positions.contiguous().to(torch::kInt64);
    cache_of_row = cache_of_row.contiguous().to(torch::kInt64);
    keep = keep.contiguous().to(torch::kInt64);
    const int64_t rows = tokens.numel();
    TORCH_CHECK(positions.numel() == rows && cache_of_row.numel() == rows, "one position and cache per row");
    TORCH_CHECK(keys.size() == values.size(), "keys and values per sequence");
    const int64_t* tok = tokens.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* seq = cache_of_row.data_ptr<int64_t>();
    const int64_t vocab_in = embed_.size(0);
    for (int64_t n = 0; n < rows; ++n) {
      TORCH_CHECK(tok[n] >= 0 && tok[n] < vocab_in, "token id out of range");
      TORCH_CHECK(seq[n] >= 0 && seq[n] < static_cast<int64_t>(keys.size()), "cache index out of range");
    }
    // every cache fp32, or every cache fp16 (one load's setting)
    const bool half_kv = !keys.empty() && !keys[0].empty() && keys[0][0].dtype() == torch::kFloat16;
    const auto cache_dtype = half_kv ? torch::kFloat16 : torch::kFloat32;
    std::vector<std::vector<void*>> kp(keys.size()), vp(values.size());
    for (size_t s = 0; s < keys.size(); ++s) {
      TORCH_CHECK(keys[s].size() == layers_.size() && values[s].size() == layers_.size(), "a cache per layer");
      for (size_t l = 0; l < layers_.size(); ++l) {
        const auto& k = keys[s][l];
        const auto& v = values[s][l];
        TORCH_CHECK(k.dtype() == cache_dtype && v.dtype() == cache_dtype && k.is_contiguous() && v.is_contiguous() &&
                    k.dim() == 3 && k.size(1) == kv_heads_ && k.size(2) == head_dim_ && v.sizes() == k.sizes(),
                    "caches must be contiguous [capacity, kv_heads, head_dim], all fp32 or all fp16");
        kp[s].push_back(k.data_ptr());
        vp[s].push_back(v.data_ptr());
      }
      for (int64_t n = 0; n < rows; ++n)
        if (seq[n] == static_cast<int64_t>(s)) TORCH_CHECK(pos[n] >= 0 && pos[n] < keys[s][0].size(0), "position beyond the cache");
    }

    const int64_t q_width = heads_ * head_dim_, kv_width = kv_heads_ * head_dim_;
    const int64_t qkv_width = q_width + 2 * kv_width;
    std::vector<float> h(rows * hidden_), x(rows * hidden_), qkv(rows * qkv_width), att(rows * q_width),
        mlp(rows * 2 * intermediate_), act(rows * intermediate_), out(rows * hidden_);
    for (int64_t n = 0; n < rows; ++n) {
      const float* e = embed_.data_ptr<float>() + tok[n] * hidden_;
      for (int64_t i = 0; i < hidden_; ++i) h[n * hidden_ + i] = e[i] * embedding_multiplier_;
    }
    // cos/sin per row, as transformers computes them: cos(position * inv_freq) * attention factor
    const int64_t half = rotary_dim_ / 2;
    std::vector<float> cosv(rows * half), sinv(rows * half);
    const float* freq = inv_freq_.data_ptr<float>();
    for (int64_t n = 0; n < rows; ++n)
      for (int64_t i = 0; i < half; ++i) {
        const float angle = static_cast<float>(pos[n]) * freq[i];
        cosv[n * half + i] = std::cos(angle) * rope_factor_;
        sinv[n * half + i] = std::sin(angle) * rope_factor_;
      }

    // Element-wise work runs in per-row pool jobs, each ending with the quantization its next linear needs
    // (the same operations per row as one at a time: rows never mix). `out` holds a down projection not yet
    // added to h until the next layer's first job (or the end) adds it.
    Quantized for_qkv, for_o, for_gate_up, for_down;
    bool pending = false;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& layer = layers_[l];
      Quantized* qa = prequantized(layer.qkv, for_qkv, rows, hidden_);
      const std::function<void(int64_t)> before_attention = [&](int64_t n) {
        add_and_norm(n, pending, layer.input_norm, h.data(), out.data(), x.data(), qa);
      };
      pool_->run(rows, before_attention);
      project(layer.qkv, x.data(), rows, qkv.data(), qkv_width, qa);
      // per-head norms, RoPE, then the cache write of every row before any row attends
      const std::function<void(int64_t)> place = [&](int64_t n) {
        float* row = qkv.data() + n * qkv_width;
        for (int64_t hd = 0; hd < heads_ + kv_heads_; ++hd) {
          float* v = row + hd * head_dim_;
          const float* norm = hd < heads_ ? layer.q_norm : layer.k_norm;
          if (norm) rms_norm(v, norm, v, 1, head_dim_);
          rope(v, cosv.data() + n * half, sinv.data() + n * half, half);
        }
        const int64_t s = seq[n], p = pos[n];
        if (half_kv) {
          store_half(row + q_width, static_cast<uint16_t*>(kp[s][l]) + p * kv_width, kv_width);
          store_half(row + q_width + kv_width, static_cast<uint16_t*>(vp[s][l]) + p * kv_width, kv_width);
        } else {
          std::memcpy(static_cast<float*>(kp[s][l]) + p * kv_width, row + q_width, kv_width * sizeof(float));
          std::memcpy(static_cast<float*>(vp[s][l]) + p * kv_width, row + q_width + kv_width, kv_width * sizeof(float));
        }
      };
      pool_->run(rows, place);
      Quantized* qo = prequantized({layer.o}, for_o, rows, q_width);
      const bool quantized = attention(qkv.data(), qkv_width, att.data(), rows, pos, seq, kp, vp, half_kv, l, qo);
      project({layer.o}, att.data(), rows, out.data(), hidden_, quantized ? qo : nullptr);
      Quantized* qg = prequantized(layer.gate_up, for_gate_up, rows, hidden_);
      const std::function<void(int64_t)> before_mlp = [&](int64_t n) {
        add_and_norm(n, true, layer.post_norm, h.data(), out.data(), x.data(), qg);
      };
      pool_->run(rows, before_mlp);
      project(layer.gate_up, x.data(), rows, mlp.data(), 2 * intermediate_, qg);
      Quantized* qd = prequantized({layer.down}, for_down, rows, intermediate_);
      const std::function<void(int64_t)> gated = [&](int64_t n) {
        const float* g = mlp.data() + n * 2 * intermediate_;
        float* a = act.data() + n * intermediate_;
        silu_mul(g, g + intermediate_, a, intermediate_);
        if (qd) qd->row(a, n, nullptr);
      };
      pool_->run(rows, gated);
      project({layer.down}, act.data(), rows, out.data(), hidden_, qd);
      pending = true;
    }
    if (pending) residual(h.data(), out.data(), rows * hidden_);

    const int64_t kept = keep.numel();
    const int64_t* kr = keep.data_ptr<int64_t>();
    std::vector<float> last(kept * hidden_);
    for (int64_t i = 0; i < kept; ++i) {
      TORCH_CHECK(kr[i] >= 0 && kr[i] < rows, "kept row out of range");
      rms_norm(h.data() + kr[i] * hidden_, final_norm_.data_ptr<float>(), last.data() + i * hidden_, 1, hidden_);
    }
    auto logits = torch::empty({kept, head_.outputs}, torch::kFloat32);
    HeadScan scan;
    scan.divisor = logits_divisor_;
    project({head_}, last.data(), kept, logits.data_ptr<float>(), head_.outputs, nullptr, &scan);
    return {logits, scan.choose()};
  }

  // One linear on its own (tests compare it with the dequantized weight).
  torch::Tensor linear_forward(py::tuple spec, torch::Tensor x) {
    Linear l = linear(spec);
    x = x.contiguous().to(torch::kFloat32);
    TORCH_CHECK(x.dim() == 2 && x.size(1) == l.inputs, "x must be [rows, inputs]");
    auto y = torch::empty({x.size(0), l.outputs}, torch::kFloat32);
    project({l}, x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), l.outputs);
    return y;
  }

 private:
  const float* f32(torch::Tensor t) {
    TORCH_CHECK(t.dtype() == torch::kFloat32, "expected float32");
    t = t.contiguous();
    keep_.push_back(t);
    return t.data_ptr<float>();
  }

  Linear linear(py::tuple t) {
    Linear l;
    l.kind = t[0].cast<int>();
    l.group = t[1].cast<int64_t>();
    auto w = t[2].cast<torch::Tensor>().contiguous();
    auto bias = t[5].cast<torch::Tensor>(), input_scale = t[6].cast<torch::Tensor>();  // 3, 4: unused (empty)
    keep_.push_back(w);
    l.outputs = w.size(0);
    if (l.kind == kF32) {
      TORCH_CHECK(w.dtype() == torch::kFloat32, "fp32 weight expected");
      l.inputs = w.size(1);
      l.wf = w.data_ptr<float>();
    } else {
      TORCH_CHECK((l.kind == kInt8 || l.kind == kInt4) && t.size() == 9 && w.dtype() == torch::kUInt8 && w.dim() == 2,
                  "int8 and int4 weights come as tiles (tile_int8, tile_int4)");
      l.outputs = t[7].cast<int64_t>();
      l.inputs = t[8].cast<int64_t>();
      const bool fits = l.kind == kInt8 ? l.inputs % 32 == 0 && w.size(1) == tile_bytes_int8(l.inputs)
                                        : l.group % 32 == 0 && l.inputs % l.group == 0 &&
                                              w.size(1) == tile_bytes(l.inputs, l.group);
      TORCH_CHECK(fits && w.size(0) == (l.outputs + kTile - 1) / kTile, "weight tiles do not match their shape");
      l.tiles = w.data_ptr<uint8_t>();
      l.tile_bytes = w.size(1);
    }
    TORCH_CHECK(l.kind == kF32 || l.inputs % 32 == 0, "inputs must be a multiple of 32");
    TORCH_CHECK(l.inputs <= kMaxBlocks * 32, "at most ", kMaxBlocks * 32, " inputs per linear");
    if (bias.numel()) l.bias = f32(bias);
    if (input_scale.numel()) l.input_scale = f32(input_scale);
    return l;
  }

  void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t width) const {
    for (int64_t n = 0; n < rows; ++n) rms_norm_row(x + n * width, weight, y + n * width, width, eps_);
  }

  static void rope(float* v, const float* c, const float* s, int64_t half) {
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * c[i] - b * s[i];
      v[i + half] = b * c[i] + a * s[i];
    }
  }

  void residual(float* h, const float* out, int64_t n) const {
    for (int64_t i = 0; i < n; ++i) h[i] += out[i] * residual_multiplier_;
  }

  // Row n of a pool job: h += out (when `add`), x = RMSNorm(h) and, when q is given, x's int8 blocks.
  void add_and_norm(int64_t n, bool add, const float* norm, float* h, const float* out, float* x, Quantized* q) const {
    float* hn = h + n * hidden_;
    float* xn = x + n * hidden_;
    if (add) residual(hn, out + n * hidden_, hidden_);
    rms_norm_row(hn, norm, xn, hidden_, eps_);
    if (q) q->row(xn, n, nullptr);
  }

  // `into`, ready for rows × width, when every part of a linear reads integer codes of the plain input (no
  // fp32 part, no per-input scale): the job that makes the input then quantizes each row it has made.
  static Quantized* prequantized(const std::vector<Linear>& parts, Quantized& into, int64_t rows, int64_t width) {
    for (const auto& l : parts)
      if (l.kind == kF32 || l.input_scale != nullptr) return nullptr;
    into.prepare(rows, width);
    return &into;
  }

  // y[n, offset(l) + o] for the linears side by side (fused QKV / gate-up), one pool job over all outputs.
  // given: x already quantized (prequantized) for the parts without their own input scale.
  // scan: the head's division and first-largest search, per chunk in the job that made it (HeadScan).
  void project(const std::vector<Linear>& parts, const float* x, int64_t rows, float* y, int64_t y_width,
               Quantized* given = nullptr, HeadScan* scan = nullptr) {
    const int64_t inputs = parts[0].inputs;
    // parts without their own input scale share one quantization of x
    std::vector<Quantized> quantized(parts.size());
    std::vector<Quantized*> qx(parts.size(), nullptr);
    for (size_t i = 0; i < parts.size(); ++i) {
      if (parts[i].kind == kF32) continue;
      if (given != nullptr && parts[i].input_scale == nullptr) {
        qx[i] = given;
        continue;
      }
      for (size_t j = 0; j < i && qx[i] == nullptr; ++j)
        if (qx[j] != nullptr && parts[j].input_scale == nullptr && parts[i].input_scale == nullptr) qx[i] = qx[j];
      if (qx[i] == nullptr) {
        quantized[i].fill(x, rows, inputs, parts[i].input_scale, *pool_);
        qx[i] = &quantized[i];
      }
    }
    std::vector<const float*> sums(parts.size(), nullptr);  // int4: x summed per group
    std::vector<const uint8_t*> offsets8(parts.size(), nullptr);  // int8: codes + 128
    for (size_t i = 0; i < parts.size(); ++i) {  // made here, before the threads share them
      if (parts[i].kind == kInt4) sums[i] = qx[i]->group_sums(parts[i].group, rows);
      if (parts[i].kind == kInt8) offsets8[i] = qx[i]->offset();
    }
    std::vector<int64_t> offsets{0};
    for (const auto& l : parts) offsets.push_back(offsets.back() + l.outputs);
    // about four chunks per thread: enough to rebalance when a thread is descheduled, few enough that taking
    // them (a shared counter) costs nothing next to the work
    const int64_t per_thread = (offsets.back() + 4 * pool_->threads() - 1) / (4 * pool_->threads());
    const int64_t chunk = std::max<int64_t>(16, (per_thread + 15) / 16 * 16);
    const int64_t chunks = (offsets.back() + chunk - 1) / chunk;
    // Within a chunk, spans of outputs whose weights fit in L2 (~256 KB); per span, rows outside and outputs
    // inside: kTileRows activation rows stay in L1 while the span's weights come from L2, and each
    // weight row is read from memory once per call, not once per row tile (a 7B layer's chunk is megabytes).
    int64_t row_bytes = 1;
    for (const auto& l : parts)
      row_bytes = std::max(row_bytes, l.kind == kF32 ? inputs * 4 : l.tile_bytes / kTile);
    const int64_t span = std::max<int64_t>(kTile, (256 << 10) / row_bytes / kTile * kTile);
    const int64_t blocks = inputs / 32;
    // outputs [o_begin, o_end) for rows n0 … n0 + nb - 1 (nb <= kTileRows)
    const auto tile = [&](int64_t o_begin, int64_t o_end, int64_t n0, int nb) {
      float out[kTileRows * kTile];
      size_t p = 0;
      for (int64_t o = o_begin; o < o_end;) {
        while (o >= offsets[p + 1]) ++p;
        const Linear& l = parts[p];
        const int64_t r = o - offsets[p];
        const Quantized* xq = qx[p];
        if (l.kind != kF32) {  // the whole tile holding output r; store the part of it inside the range
          const int64_t first = r / kTile * kTile, last = std::min({first + kTile, l.outputs, o_end - offsets[p]});
          const uint8_t* at = l.tiles + first / kTile * l.tile_bytes;
          if (l.kind == kInt8) {
            k_->tile_q8(at, blocks, offsets8[p] + n0 * inputs, xq->q.data() + n0 * inputs, xq->d.data() + n0 * blocks,
                        inputs, blocks, nb, out);
          } else {
            const int64_t groups = inputs / l.group;
            k_->tile_q4(at, blocks, l.group / 32, xq->q.data() + n0 * inputs, xq->d.data() + n0 * blocks,
                        sums[p] + n0 * groups, inputs, blocks, groups, nb, out);
          }
          for (int i = 0; i < nb; ++i)
            for (int64_t j = r; j < last; ++j) {
              const float v = out[i * kTile + j - first];
              y[(n0 + i) * y_width + offsets[p] + j] = l.bias ? v + l.bias[j] : v;
            }
          o = offsets[p] + last;
          continue;
        }
        for (int i0 = 0; i0 < nb; i0 += kMaxRows) {  // fp32: one weight row at a time
          const int n = n0 + i0, count = std::min(kMaxRows, nb - i0);
          k_->dot_f32(l.wf + r * inputs, inputs, x + n * inputs, inputs, count, out);
          for (int i = 0; i < count; ++i) y[(n + i) * y_width + o] = l.bias ? out[i] + l.bias[r] : out[i];
        }
        ++o;
      }
    };
    if (scan) scan->prepare(chunks, rows);
    const std::function<void(int64_t)> work = [&](int64_t c) {
      const int64_t o_last = std::min(offsets.back(), (c + 1) * chunk);
      for (int64_t o_begin = c * chunk; o_begin < o_last; o_begin += span)
        for (int64_t n0 = 0; n0 < rows; n0 += kTileRows)
          tile(o_begin, std::min(o_last, o_begin + span), n0, static_cast<int>(std::min<int64_t>(kTileRows, rows - n0)));
      if (scan && c * chunk < o_last) scan->scan(c, y, y_width, c * chunk, o_last);
    };
    for (const auto& l : parts)
      TORCH_CHECK(l.kind != kF32 || l.input_scale == nullptr, "fp32 weights with an input scale");
    pool_->run(chunks, work);
  }

  // Returns whether it also quantized each row's output into `qo` (when a chunk is a whole row).
  bool attention(const float* qkv, int64_t qkv_width, float* out, int64_t rows, const int64_t* pos,
                 const int64_t* seq, const std::vector<std::vector<void*>>& kp,
                 const std::vector<std::vector<void*>>& vp, bool half, size_t layer, Quantized* qo) {
    const int64_t group = heads_ / kv_heads_, kv_width = kv_heads_ * head_dim_;
    // A chunk is a whole row when there are rows enough to share out (its cache rows are read front to back,
    // and the job quantizes the row it has finished), else one row's query heads sharing a KV head (its keys
    // read once), else a single query head (decode of one sequence). Each head's numbers are the same either way.
    const bool whole_rows = rows >= 2 * pool_->threads();
    const int64_t per_chunk = whole_rows ? heads_ : rows * kv_heads_ >= 2 * pool_->threads() ? group : 1;
    const int64_t per_row = heads_ / per_chunk;
    const std::function<void(int64_t)> work = [&](int64_t c) {
      const int64_t n = c / per_row, first = (c % per_row) * per_chunk;
      const int64_t length = pos[n] + 1;
      thread_local std::vector<float> scores;
      scores.resize(std::min(per_chunk, group) * length);
      for (int64_t hd = first; hd < first + per_chunk;) {  // heads sharing one KV head per call
        const int64_t g = hd / group, count = std::min(first + per_chunk, (g + 1) * group) - hd;
        const float* q = qkv + n * qkv_width + hd * head_dim_;
        float* o = out + n * heads_ * head_dim_ + hd * head_dim_;
        if (half)
          k_->attend_half(q, count, static_cast<const uint16_t*>(kp[seq[n]][layer]) + g * head_dim_,
                          static_cast<const uint16_t*>(vp[seq[n]][layer]) + g * head_dim_, length, kv_width, head_dim_,
                          attention_scale_, scores.data(), o);
        else
          k_->attend(q, count, static_cast<const float*>(kp[seq[n]][layer]) + g * head_dim_,
                     static_cast<const float*>(vp[seq[n]][layer]) + g * head_dim_, length, kv_width, head_dim_,
                     attention_scale_, scores.data(), o);
        hd += count;
      }
      if (whole_rows && qo) qo->row(out + n * heads_ * head_dim_, n, nullptr);
    };
    pool_->run(rows * per_row, work);
    return whole_rows && qo;
  }

  torch::Tensor embed_, final_norm_, inv_freq_;
  std::vector<torch::Tensor> keep_;
  std::vector<Layer> layers_;
  Linear head_;
  int64_t hidden_, heads_, kv_heads_, head_dim_, intermediate_, rotary_dim_;
  float eps_, attention_scale_, rope_factor_, embedding_multiplier_, residual_multiplier_, logits_divisor_;
  std::unique_ptr<Pool> pool_;
  int isa_ = 1;
  const Kernels* k_ = nullptr;
};

// HeadScan over given logits [rows, n] cut into chunks of `chunk` outputs (tests: the same choice as torch.argmax,
// ties, NaN and infinities included, whatever the cut). The logits are left as they are (divisor 1).
torch::Tensor head_choices(torch::Tensor logits, int64_t chunk) {
  logits = logits.contiguous().clone();
  TORCH_CHECK(logits.dtype() == torch::kFloat32 && logits.dim() == 2 && chunk > 0, "[rows, n] float32 logits");
  const int64_t rows = logits.size(0), n = logits.size(1), chunks = (n + chunk - 1) / chunk;
  HeadScan scan;
  scan.prepare(chunks, rows);
  for (int64_t c = 0; c < chunks; ++c) scan.scan(c, logits.data_ptr<float>(), n, c * chunk, std::min(n, (c + 1) * chunk));
  return scan.choose();
}

// Many back-to-back jobs of varying sizes, each chunk counted in memory that lives only for its job: returns
// how many chunks ran other than exactly once, or after their job had returned (tests: the pool's hand-over).
int64_t pool_selftest(int threads, int64_t jobs) {
  Pool pool(threads, 2000);
  std::atomic<int64_t> wrong{0};
  for (int64_t j = 0; j < jobs; ++j) {
    const int64_t chunks = 1 + (j * 7) % 13;
    auto hits = std::make_unique<std::atomic<int>[]>(chunks);
    for (int64_t c = 0; c < chunks; ++c) hits[c] = 0;
    std::atomic<bool> open{true};
    const std::function<void(int64_t)> work = [&](int64_t c) {
      if (!open.load() || c < 0 || c >= chunks) ++wrong;
      else hits[c].fetch_add(1);
    };
    pool.run(chunks, work);
    open.store(false);
    for (int64_t c = 0; c < chunks; ++c) wrong += hits[c].load() != 1;
  }
  return wrong.load();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("best_isa", &best_isa, "highest instruction-set level this CPU runs: 1 avx2, 2 avxvnni, 3 avx512vnni");
  m.def("isa_supported", &isa_supported, "whether this CPU runs a level");
  m.def("head_choices", &head_choices, "each row's first largest logit found chunk by chunk, as the step does");
  m.def("pool_selftest", &pool_selftest, py::call_guard<py::gil_scoped_release>(),
        "back-to-back jobs on a fresh pool; the number of chunks run other than once within their job");
  m.def("tile_int4", &tile_int4, "an int4 linear as tiles of 16 outputs (the native layout)");
  m.def("tile_int8", &tile_int8, "an int8 linear as tiles of 16 outputs (the native layout)");
  m.def("untile_int4", &untile_int4, "int4 tiles back to the store's packed layout");
  m.def("untile_int8", &untile_int8, "int8 tiles back to the store's layout");
  py::class_<NativeModel>(m, "NativeModel")
      .def(py::init<py::dict, torch::Tensor, torch::Tensor, py::tuple, py::list, torch::Tensor>())
      .def("step", &NativeModel::step, py::call_guard<py::gil_scoped_release>())
      .def("linear_forward", &NativeModel::linear_forward)
      .def("set_isa", &NativeModel::set_isa)
      .def("isa", &NativeModel::isa)
      .def("set_threads", &NativeModel::set_threads)
      .def("threads", &NativeModel::threads);
}
