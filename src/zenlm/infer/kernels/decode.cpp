// One decoding step of a pre-norm Llama-shape decoder, for one row or a batch, in one native call.
//
// Why: decoding a token through torch is about a thousand small ops, each paying dispatch
// overhead comparable to its work, and torch's GEMVs stream weights well below the memory's
// read rate. Here every layer runs as plain loops over the model's own weight tensors (no
// copies: fp32 rows, int8 rows with one fp32 scale each, or int4 blocks of 32 with an fp32
// scale and offset each), so a step costs what reading the weights costs. Built for AVX2 + FMA
// (8-float vectors) or, where the CPU has it, AVX-512 (16): see ``vec`` below.
//
// Layout, matching zenlm.model exactly: fused q/k/v rows (q, then k, then v), fused gate/up
// rows (gate, then up), RoPE in the "rotate half" layout with the model's own cos and signed
// sin tables, KV cache tensors (rows, kv_heads, capacity, head_dim), fp32 or fp16, written at
// each row's position.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <thread>
#include <type_traits>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <vector>

namespace {

using Opt = std::optional<torch::Tensor>;

// Scratch rows on 64-byte (cache-line) boundaries. malloc promises 16: a buffer that lands off
// a line makes every 512-bit load of its rows straddle two lines, and which one a process got
// changed with the order of its allocations (an fp32 batch-8 step took 23 or 31 ms on a Zen 5
// depending on it). Every row the step keeps is a multiple of 64 bytes for the usual widths.
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, LineAligned<T>>;

inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// The vector every sum below runs over: W floats, 16 where the build was given AVX-512 (the
// loader compiles a second build for CPUs that report it), else 8. On CPUs with two 512-bit
// FMA units (Intel Xeons, Zen 5) that doubles what a batch's products can do per cycle; one
// row, which waits on memory, gains little. Within a build a row sums in one order in every
// kernel below, alone or in a batch; the two builds differ from each other in the last bits,
// as any two summation orders do.
#if defined(__AVX512F__)
constexpr int64_t W = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset(float a) { return _mm512_set1_ps(a); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
// sixteen int8 weights widened to fp32
inline vec vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
// sixteen fp16 values (an fp16 KV cache) as fp32, and back, rounded to nearest even
inline vec vload(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void vstore(uint16_t* p, vec v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
inline vec vfnma(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2^n for whole n in [-126, 127], built in the exponent field
inline vec vpow2(vec n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline float hsum(vec v) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}
#else
constexpr int64_t W = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset(float a) { return _mm256_set1_ps(a); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
// eight int8 weights widened to fp32
inline vec vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vload(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void vstore(uint16_t* p, vec v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
inline vec vfnma(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vpow2(vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline float hsum(vec v) { return hsum8(v); }
#endif

// The four sums of a0..a3's lanes as one vector [sum a0, sum a1, sum a2, sum a3]: a transpose
// folded as it goes, a quarter of four hsum's shuffles.
inline __m128 hsum4(vec a0, vec a1, vec a2, vec a3) {
#if defined(__AVX512F__)
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
#else
  const __m256 t0 = _mm256_add_ps(_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
  const __m256 t1 = _mm256_add_ps(_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
  const __m256 h = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t1))),
                                 _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t1))));
#endif
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// e^x for W floats, x clamped to [-87, 88] (results stay normal and finite): 2^n times a
// degree-7 polynomial of r = x - n ln 2, |r| <= ln2 / 2: at most 1.22 ulp from e^x (measured
// against double exp in steps of 0.0007 over the whole range), where the scalar expf call cost 3%
// of an 8-row step. Softmax and SwiGLU take it for whole vectors, std::exp for a row's rest, so
// an element's arithmetic still depends only on its row.
// A KV cache element as fp32 (fp32 or fp16 caches), and n fp32 values into a cache row.
inline float as_float(float x) { return x; }
inline float as_float(uint16_t h) { return _cvtsh_ss(h); }
inline void put_row(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void put_row(uint16_t* dst, const float* src, int64_t n) {
  int64_t j = 0;
  for (; j + W <= n; j += W) vstore(dst + j, vload(src + j));
  for (; j < n; ++j) dst[j] = _cvtss_sh(src[j], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

inline vec vexp(vec x) {
  x = vmin(vmax(x, vset(-87.0f)), vset(88.0f));
  const vec n = vround(vmul(x, vset(1.44269504f)));
  vec r = vfnma(n, vset(0.693359375f), x);  // x - n ln 2, ln 2 in two parts
  r = vfnma(n, vset(-2.12194440e-4f), r);
  const vec two_n = vpow2(n);
  // e^r = 1 + r + r^2 (1/2 + r (1/6 + r (1/24 + r (1/120 + r (1/720 + r / 5040))))), Horner
  vec p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  const vec r2 = vmul(r, r);
  p = vfma(p, r2, vadd(r, vset(1.0f)));
  return vmul(p, two_n);
}

// Inputs a pass of the batched kernels takes against four weight rows: 4 x NB accumulators
// plus the NB inputs and a weight vector fill AVX2's 16 registers at 3, AVX-512's 32 at 6.
constexpr int NB4 = W == 16 ? 6 : 3;

// f(std::integral_constant<int, nb>) for 1 <= nb <= MAX: the batched kernels are templates on
// their input count, so that their accumulators live in registers.
template <int MAX, typename F>
inline void with_count(int64_t nb, F&& f) {
  if constexpr (MAX > 1) {
    if (nb < MAX) {
      with_count<MAX - 1>(nb, f);
      return;
    }
  }
  f(std::integral_constant<int, MAX>{});
}

// Work shared over threads without a fork-join barrier: a phase is a count of items that
// every thread (the caller included) claims one at a time from one atomic word, and the
// caller waits only for items already claimed. A thread the OS has not scheduled claims
// nothing and delays nothing, which on a busy machine is the difference between a step and a
// stall; on a quiet one a phase costs a few atomics instead of an OpenMP region.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // fn(i) for i in [0, n), spread over the threads; returns when all are done
  void run(int64_t n, const std::function<void(int64_t)>& fn) {
    if (n <= 0) return;
    if (workers_.empty() || n == 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    TORCH_CHECK(n <= MAX_ITEMS, "a phase of ", n, " items is more than the pool's ", MAX_ITEMS);
    job_.store(&fn, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t epoch = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(epoch << 32 | static_cast<uint64_t>(n) << 16, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    claim(epoch);
    while (done_.load(std::memory_order_acquire) < n) _mm_pause();
  }

 private:
  // The phase's item count sits in the word the items are claimed from: read from a separate
  // word, a thread that had just found the last phase's items all claimed could see the next
  // phase's larger count before its phase began, claim an item of the old phase's number and
  // run the new job with it, and the caller could count that item done twice and return while
  // another was still being written (seen as a rare batch whose greedy tokens changed).
  void claim(uint64_t epoch) {
    uint64_t s = state_.load(std::memory_order_acquire);
    while ((s >> 32) == epoch) {
      const int64_t i = static_cast<int64_t>(s & 0xffffu);
      if (i >= static_cast<int64_t>((s >> 16) & 0xffffu)) return;
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
        (*job_.load(std::memory_order_relaxed))(i);
        done_.fetch_add(1, std::memory_order_release);
        s = state_.load(std::memory_order_acquire);
      }
    }
  }

  void work() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t epoch = state_.load(std::memory_order_acquire) >> 32;
      for (int spin = 0; epoch == seen && spin < 20000; ++spin) {
        _mm_pause();
        epoch = state_.load(std::memory_order_acquire) >> 32;
      }
      if (epoch == seen) {  // idle: sleep until the next phase
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1, std::memory_order_seq_cst);
        cv_.wait(lock, [&] { return stop_ || (state_.load(std::memory_order_seq_cst) >> 32) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_seq_cst);
        if (stop_) return;
        continue;
      }
      seen = epoch;
      claim(epoch);
    }
  }

  std::vector<std::thread> workers_;
  static constexpr int64_t MAX_ITEMS = 0xffff;
  std::atomic<uint64_t> state_{0};  // phase (high 32 bits), item count (16), next item (low 16)
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<const std::function<void(int64_t)>*> job_{nullptr};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

// Software prefetch, AHEAD bytes ahead of where the weights are being read. A step reads each
// weight once, in short streams (four interleaved rows of a few hundred bytes each), and the
// hardware prefetchers ramp up on each too late: a core then waits on memory for most of a
// matrix. Measured on one Zen 4 core streaming 177 MB of int8 rows: 5.4 GB/s without, 15-22
// GB/s with; fp32 14 -> 20-24 GB/s. Prefetching changes no arithmetic, and a prefetch past a
// matrix's end (its last rows) is a hint the CPU drops, never a fault.
template <typename T>
constexpr int64_t AHEAD = sizeof(T) == 1 ? 4096 : 16384;

// Prefetch the lines of the stream at ``p`` that one iteration of a loop reading ``step``
// bytes at offset ``pos`` will need AHEAD bytes later (one line per 64 bytes, none twice).
template <int64_t step, _mm_hint hint = _MM_HINT_T0>
inline void prefetch_span(const char* p, int64_t pos) {
  if constexpr (step >= 64) {
    for (int64_t o = 0; o < step; o += 64) _mm_prefetch(p + pos + o, hint);
  } else {
    if (pos % 64 == 0) _mm_prefetch(p + pos, hint);
  }
}

// Rows [r0, r1) of y = W x for a (n, k) matrix of fp32 or int8 elements (int8: before its
// scales). Four consecutive rows at a time: one contiguous stream of memory and four
// independent accumulators, x read once for all four.
template <typename T>
void dot_rows(const T* wt, int64_t k, const float* x, float* y, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const T* w0 = wt + r * k;
    const T *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
    vec a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
    // the four rows are one contiguous block; sweep the one AHEAD bytes on at 4 rows' pace
    const char* ahead = reinterpret_cast<const char*>(w0) + AHEAD<T>;
    int64_t j = 0;
    for (; j + W <= k; j += W) {
      prefetch_span<4 * W * sizeof(T)>(ahead, 4 * j * static_cast<int64_t>(sizeof(T)));
      const vec xv = vload(x + j);
      a0 = vfma(vload(w0 + j), xv, a0);
      a1 = vfma(vload(w1 + j), xv, a1);
      a2 = vfma(vload(w2 + j), xv, a2);
      a3 = vfma(vload(w3 + j), xv, a3);
    }
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (; j < k; ++j) {
      s0 += w0[j] * x[j]; s1 += w1[j] * x[j]; s2 += w2[j] * x[j]; s3 += w3[j] * x[j];
    }
    y[r] = s0; y[r + 1] = s1; y[r + 2] = s2; y[r + 3] = s3;
  }
  for (; r < r1; ++r) {  // one accumulator, as above: a row sums alike wherever it falls
    const T* w = wt + r * k;
    vec a = vzero();
    int64_t j = 0;
    for (; j + W <= k; j += W) a = vfma(vload(w + j), vload(x + j), a);
    float s = hsum(a);
    for (; j < k; ++j) s += w[j] * x[j];
    y[r] = s;
  }
}

// int4 rows (zenlm.infer.quantize.Int4Linear's ``blocks``): blocks of 32 weights in 24 bytes,
// fp32 scale s and offset m, then 16 bytes whose low nibbles are weights 0-15 and high nibbles
// 16-31; w = q * s + m.
constexpr int64_t Q4_BYTES = 24;

constexpr int Q4_VECS = 32 / W;  // vectors in a block

// One block's 32 weights as fp32, in Q4_VECS vectors of W (weights 0-7, 8-15, 16-23, 24-31,
// or 0-15, 16-31). Each is one rounding of q * s + m, so a row dequantized once (batches) or
// block by block (one input) holds the same numbers.
inline void q4_block(const uint8_t* blk, vec w[Q4_VECS]) {
  const vec s = vset(*reinterpret_cast<const float*>(blk));
  const vec m = vset(*reinterpret_cast<const float*>(blk + 4));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 8));
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
#if defined(__AVX512F__)
  w[0] = vfma(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), s, m);
  w[1] = vfma(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), s, m);
#else
  w[0] = vfma(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), s, m);
  w[1] = vfma(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), s, m);
  w[2] = vfma(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), s, m);
  w[3] = vfma(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), s, m);
#endif
}

// Prefetch AHEAD bytes past the block at ``blk`` when it is the first block starting in its
// 64-byte line (blocks start 24 bytes apart, so exactly one does): every line once.
inline void q4_prefetch(const uint8_t* blk) {
  if ((reinterpret_cast<uintptr_t>(blk) & 63) < static_cast<uintptr_t>(Q4_BYTES))
    _mm_prefetch(reinterpret_cast<const char*>(blk) + AHEAD<int8_t>, _MM_HINT_T0);
}

// One int4 row (k weights) as fp32 into ``out``: what the batched kernel and prefill's
// dequantization both read.
inline void q4_row(const uint8_t* row, int64_t k, float* out) {
  for (int64_t g = 0; g < k / 32; ++g) {
    q4_prefetch(row + g * Q4_BYTES);
    vec w[Q4_VECS];
    q4_block(row + g * Q4_BYTES, w);
    for (int i = 0; i < Q4_VECS; ++i) vstore(out + g * 32 + W * i, w[i]);
  }
}

// Q4_VECS accumulators summed in one order (both int4 kernels end with this)
inline float q4_sum(const vec* a) {
  if constexpr (Q4_VECS == 4) return hsum(vadd(vadd(a[0], a[1]), vadd(a[2], a[3])));
  else return hsum(vadd(a[0], a[1]));
}

// One int4 row against x: one accumulator per vector of a block.
inline float q4_dot(const uint8_t* row, int64_t k, const float* x) {
  vec a[Q4_VECS];
  for (int i = 0; i < Q4_VECS; ++i) a[i] = vzero();
  for (int64_t g = 0; g < k / 32; ++g) {
    const uint8_t* blk = row + g * Q4_BYTES;
    q4_prefetch(blk);
    vec w[Q4_VECS];
    q4_block(blk, w);
    for (int i = 0; i < Q4_VECS; ++i) a[i] = vfma(w[i], vload(x + g * 32 + W * i), a[i]);
  }
  return q4_sum(a);
}

// The same sums for NB inputs (rows b0.. of x, each k wide) over a row already dequantized
// into ``w`` (k floats): bit for bit q4_dot's for each input. Q4_VECS x NB accumulators, so each
// weight vector loaded serves NB inputs (NB <= NB4 keeps them and the weights in registers).
template <int NB>
inline void q4_dot_dequantized(const float* w, int64_t k, const float* x, int64_t b0, float* out) {
  vec a[NB][Q4_VECS];
  for (int b = 0; b < NB; ++b)
    for (int i = 0; i < Q4_VECS; ++i) a[b][i] = vzero();
  for (int64_t j = 0; j < k; j += 32) {
    for (int i = 0; i < Q4_VECS; ++i) {
      const vec wv = vload(w + j + W * i);
      for (int b = 0; b < NB; ++b) a[b][i] = vfma(wv, vload(x + (b0 + b) * k + j + W * i), a[b][i]);
    }
  }
  for (int b = 0; b < NB; ++b) out[b] = q4_sum(a[b]);
}

// int8 rows against int16 inputs, in builds for CPUs with AVX-512 VNNI, for widths that are not
// whole blocks of 64 (those take int8 inputs in blocks: see quantize8 below). Each input row is
// rounded once to int16 with one scale (x ~ q * s, s = max|x| / qmax), and vpdpwssd sums 32
// weight-input products an instruction into int32 lanes: twice what an fp32 FMA does, and a
// weight vector widens in one instruction instead of two. The sums are exact integers, so a
// row's result depends on no order, blocking, batch or thread count at all; the one rounding
// is the input's (1/qmax of its largest element; SmolLM2's perplexity, simulated in torch:
// 25.3246 -> 25.3238, against int8 weights' +0.6%).
constexpr int64_t QBLOCK = 64;  // inputs a scale covers where inputs are rounded to int8 (below)
constexpr int64_t PACK = 16;    // rows a packed group holds (one zmm of int32 lanes)
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define ZENLM_INT16_INPUTS 1
#endif
#ifdef ZENLM_INT16_INPUTS
constexpr bool INT16_INPUTS = true;

// The largest |q| for inputs k wide: a row's whole sum, k products of |w| <= 128 and |q|,
// must stay below 2^31, so that every partial sum (a lane, two lanes folded) is an exact
// int32 too and four rows' lanes fold together in a few instructions. 32767 up to k = 512;
// SmolLM2's widths: 29127 (576), 10922 (1536).
inline int32_t qmax_for(int64_t k) {
  const int64_t lim = ((int64_t{1} << 31) - 1) / (128 * std::max<int64_t>(k, 1));
  return static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(32767, lim)));
}

// x (k floats) as q (k int16), returning the scale s (x ~ q * s): 0 for a zero row, NaN for a
// row holding NaN or infinity (whose products are then NaN, as fp32's would be).
inline float quantize16(const float* x, int64_t k, int32_t qmax, int16_t* q) {
  __m512 m = _mm512_setzero_ps();
  __mmask16 nan = 0;
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
  }
  float amax = _mm512_reduce_max_ps(m);
  bool finite = nan == 0;
  for (; j < k; ++j) {
    finite = finite && !std::isnan(x[j]);
    amax = std::max(amax, std::fabs(x[j]));
  }
  finite = finite && std::isfinite(amax);
  if (!finite || amax == 0.0f) {
    std::fill(q, q + k, int16_t{0});
    return finite ? 0.0f : NAN;
  }
  const float inv = static_cast<float>(qmax) / amax;
  const __m512 iv = _mm512_set1_ps(inv);
  for (j = 0; j + 16 <= k; j += 16) {  // round to nearest even, as std::nearbyint below
    const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), iv));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), _mm512_cvtsepi32_epi16(r));
  }
  for (; j < k; ++j) q[j] = static_cast<int16_t>(std::nearbyint(x[j] * inv));
  return amax / static_cast<float>(qmax);
}

// The four sums of a0..a3's lanes, as one vector: a transpose folded as it goes.
inline __m128i hsum4_i32(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
  const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// int8 rows r..r+R-1 (R = 4: one contiguous stream, each widened weight vector serving NB
// inputs; or 1) against NB int16 inputs (rows b0.. of q, k wide): exact sums out[b][i].
template <int NB, int R>
inline void int16_block(const int8_t* w0, int64_t k, const int16_t* q, int64_t b0, int32_t (*out)[4]) {
  // GCC 12 keeps __m512i accumulators on the stack here (every vpdpwssd stored and reloaded,
  // 1.7x slower): it sees them as 8 x int64 and the instruction as 16 x int32. Typed as what
  // the instruction computes, they stay in registers.
  __v16si acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int i = 0; i < R; ++i) acc[b][i] = __v16si{};
  const char* ahead = reinterpret_cast<const char*>(w0) + AHEAD<int8_t>;
  int64_t j = 0;
  for (; j + 32 <= k; j += 32) {
    prefetch_span<R * 32>(ahead, R * j);
    __m512i w[R];
    for (int i = 0; i < R; ++i)
      w[i] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + i * k + j)));
    for (int b = 0; b < NB; ++b) {
      const __m512i xv = _mm512_loadu_si512(q + (b0 + b) * k + j);
      for (int i = 0; i < R; ++i) acc[b][i] = (__v16si)_mm512_dpwssd_epi32((__m512i)acc[b][i], w[i], xv);
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int16_t* qb = q + (b0 + b) * k;
    if constexpr (R == 4) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out[b]),
                       hsum4_i32((__m512i)acc[b][0], (__m512i)acc[b][1], (__m512i)acc[b][2], (__m512i)acc[b][3]));
    } else {
      out[b][0] = _mm512_reduce_add_epi32((__m512i)acc[b][0]);
    }
    for (int i = 0; i < R; ++i)
      for (int64_t t = j; t < k; ++t) out[b][i] += int32_t{w0[i * k + t]} * qb[t];
  }
}

// int8 rows against int8 inputs in blocks of 64, for matrices whose width is whole blocks
// (every width of SmolLM2 and the usual models; other widths keep int16 inputs). Each block of
// 64 inputs is rounded to int8 with a scale of its own (a row's one scale cost SmolLM2 +4%
// perplexity, simulated in torch; blocks of 64: 25.31 -> 25.33, against fp32's 25.18), and
// vpdpbusd sums 64 products an instruction: twice vpdpwssd, with no widening of the weights.
// The weights are laid out once, when the step is built, 16 rows at a time, four inputs a
// lane (``pack16``), so one 64-byte load serves 16 rows and a block's 16 sums convert and
// scale in two vector instructions shared by 16 rows (row-major, that conversion and multiply
// fall on every row and input and take back most of the gain). vpdpbusd multiplies unsigned by
// signed bytes: the weights are stored as w + 128, and each block's sum starts at -128 times the
// sum of its inputs, so the integer sum of a block is exactly that of w * q. A (row, input) is
// then always the same chain: F = fma(float(sum of block j), s_j, F) over j in order, and y =
// fma(F, scale, bias): the same alone or in any batch, packed or not.
constexpr int MB8 = 8;      // inputs a pass: 8 block sums + 8 running sums + a weight vector
constexpr int64_t AHEAD8 = 8192;  // one stream a thread: 4 KB ahead was 1.15x slower (Zen 5)

// x (k floats, k a multiple of 64) as q (int8) in blocks, with each block's scale s (x ~ q * s;
// 0 for a zero block, NaN for a block holding NaN or infinity) and neg = -128 * sum(q).
inline void quantize8(const float* x, int64_t k, int8_t* q, float* s, int32_t* neg) {
  for (int64_t j = 0; j < k / QBLOCK; ++j) {
    const float* xb = x + j * QBLOCK;
    __m512 v[4];
    __m512 m = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm512_loadu_ps(xb + 16 * i);
      nan |= _mm512_cmp_ps_mask(v[i], v[i], _CMP_UNORD_Q);
      m = _mm512_max_ps(m, _mm512_abs_ps(v[i]));
    }
    const float amax = _mm512_reduce_max_ps(m);
    if (nan != 0 || !std::isfinite(amax) || amax == 0.0f) {
      std::memset(q + j * QBLOCK, 0, QBLOCK);
      s[j] = nan != 0 || !std::isfinite(amax) ? NAN : 0.0f;
      neg[j] = 0;
      continue;
    }
    const __m512 inv = _mm512_set1_ps(127.0f / amax);
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {  // round to nearest even
      const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));
      sum = _mm512_add_epi32(sum, r);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j * QBLOCK + 16 * i), _mm512_cvtsepi32_epi8(r));
    }
    s[j] = amax / 127.0f;
    neg[j] = -128 * _mm512_reduce_add_epi32(sum);
  }
}

// One int8 row (as the model holds it) against one input rounded by quantize8: the chain above.
inline float block8_dot(const int8_t* w, int64_t k, const int8_t* q, const float* s, const int32_t* neg) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  float f = 0.0f;
  for (int64_t j = 0; j < k / QBLOCK; ++j) {
    const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + j * QBLOCK), flip);
    const __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(q + j * QBLOCK));
    f = std::fma(static_cast<float>(_mm512_reduce_add_epi32(acc) + neg[j]), s[j], f);
  }
  return f;
}

// Rows r0..r0+n16 (a multiple of 16) of int8 w (n, k) as packed groups: group g, then k/4
// chunks of 64 bytes, each the 16 rows' four weights (+128) at that chunk's inputs.
inline void pack16(const int8_t* w, int64_t k, int64_t n16, uint8_t* out) {
  for (int64_t g = 0; g < n16 / PACK; ++g)
    for (int64_t c = 0; c < k / 4; ++c)
      for (int r = 0; r < PACK; ++r)
        for (int t = 0; t < 4; ++t)
          out[(g * (k / 4) + c) * 64 + r * 4 + t] =
              static_cast<uint8_t>(w[(g * PACK + r) * k + c * 4 + t]) ^ 0x80;
}

// A packed group (16 rows) against NB inputs (rows b0.. of q): y[b][r..r+15].
template <int NB>
inline void packed_group(const uint8_t* g, int64_t k, const int8_t* q, const float* s, const int32_t* neg,
                         int64_t b0, const float* scale, const float* bias, float* y, int64_t ystride) {
  const int64_t nblk = k / QBLOCK;
  __m512 f[NB];
  for (int b = 0; b < NB; ++b) f[b] = _mm512_setzero_ps();
  const char* ahead = reinterpret_cast<const char*>(g) + AHEAD8;
  for (int64_t j = 0; j < nblk; ++j) {
    __v16si acc[NB];  // typed as the instruction computes, to stay in registers (see int16_block)
    for (int b = 0; b < NB; ++b) acc[b] = (__v16si)_mm512_set1_epi32(neg[(b0 + b) * nblk + j]);
    const uint8_t* wb = g + j * QBLOCK * PACK;
#pragma GCC unroll 16
    for (int c = 0; c < QBLOCK / 4; ++c) {
      _mm_prefetch(ahead + j * QBLOCK * PACK + c * 64, _MM_HINT_T0);
      const __m512i wv = _mm512_load_si512(wb + c * 64);
      for (int b = 0; b < NB; ++b) {
        int32_t four;
        std::memcpy(&four, q + (b0 + b) * k + j * QBLOCK + c * 4, 4);
        acc[b] = (__v16si)_mm512_dpbusd_epi32((__m512i)acc[b], wv, _mm512_set1_epi32(four));
      }
    }
    for (int b = 0; b < NB; ++b)
      f[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps((__m512i)acc[b]), _mm512_set1_ps(s[(b0 + b) * nblk + j]), f[b]);
  }
  const __m512 sc = _mm512_loadu_ps(scale);
  const __m512 bi = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int b = 0; b < NB; ++b) _mm512_storeu_ps(y + (b0 + b) * ystride, _mm512_fmadd_ps(f[b], sc, bi));
}
#else
constexpr bool INT16_INPUTS = false;
#endif

// A batch's inputs rounded for one int8 product (VNNI builds): row b's int16 values at q + b * k
// and its scale s[b]. Each row is rounded on its own, so the step rounds them on its threads,
// together with the work that produces the row.
struct Rounded {
  Buffer<int16_t> q;
  Buffer<float> s;
  Buffer<int8_t> q8;    // widths of whole blocks: int8 values, (B, k)
  Buffer<float> bs;     // and each block's scale, (B, k / 64)
  Buffer<int32_t> neg;  // and -128 * each block's sum, (B, k / 64)
};

// A weight matrix (n, k) as the model holds it: fp32 rows, int8 rows times scale[row], or
// int4 blocks.
struct Mat {
  torch::Tensor keep_w, keep_s, keep_b;  // owners of the pointers below
  const float* wf = nullptr;
  const int8_t* wq = nullptr;
  const uint8_t* w4 = nullptr;
  const float* scale = nullptr;
  const float* bias = nullptr;
  int64_t n = 0, k = 0;
  std::shared_ptr<const Buffer<uint8_t>> packed;  // blocks8: the whole groups of 16 rows, as pack16 lays them

  // Whether this product rounds its inputs to int8 blocks (else int16 on VNNI builds).
  bool blocks8() const {
#ifdef ZENLM_INT16_INPUTS
    return wq != nullptr && k % QBLOCK == 0;
#else
    return false;
#endif
  }

  // Lay the weights out for the packed kernel (the step's own matrices; a copy of the int8
  // rows, built once).
  void pack() {
#ifdef ZENLM_INT16_INPUTS
    if (!blocks8() || n < PACK) return;
    auto buf = std::make_shared<Buffer<uint8_t>>(n / PACK * PACK * k);
    pack16(wq, k, n / PACK * PACK, buf->data());
    packed = std::move(buf);
#endif
  }

  void rows(const float* x, float* y, int64_t r0, int64_t r1) const {
    if (w4) {
      const int64_t stride = k / 32 * Q4_BYTES;
      for (int64_t r = r0; r < r1; ++r) y[r] = q4_dot(w4 + r * stride, k, x);
    } else if (wq) {
      dot_rows(wq, k, x, y, r0, r1);
      for (int64_t r = r0; r < r1; ++r) y[r] *= scale[r];
    } else {
      dot_rows(wf, k, x, y, r0, r1);
    }
    if (bias) for (int64_t r = r0; r < r1; ++r) y[r] += bias[r];
  }

  // Row r against NB inputs (rows b0.. of x, each k wide): one read of the weights serves
  // every input, which is what makes a batch cheaper than its rows one by one.
  template <int NB>
  void row_batch(int64_t r, const float* x, int64_t b0, float* out) const {
    vec acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = vzero();
    const float* wfr = wf ? wf + r * k : nullptr;
    const int8_t* wqr = wq ? wq + r * k : nullptr;
    int64_t j = 0;
    if (wqr) {
      const char* ahead = reinterpret_cast<const char*>(wqr) + AHEAD<int8_t>;
      for (; j + W <= k; j += W) {
        prefetch_span<W>(ahead, j);
        const vec w = vload(wqr + j);
        for (int b = 0; b < NB; ++b) acc[b] = vfma(w, vload(x + (b0 + b) * k + j), acc[b]);
      }
    } else {
      const char* ahead = reinterpret_cast<const char*>(wfr) + AHEAD<float>;
      for (; j + W <= k; j += W) {
        // into L2, not L1: a batch's inputs (8 x 1536 floats for down_proj) fill L1 and
        // evicted the lines fetched 16 KB ahead (batch 8, Xeon: 1.06x; none at all: 0.77x)
        prefetch_span<4 * W, _MM_HINT_T1>(ahead, 4 * j);
        const vec w = vload(wfr + j);
        for (int b = 0; b < NB; ++b) acc[b] = vfma(w, vload(x + (b0 + b) * k + j), acc[b]);
      }
    }
    for (int b = 0; b < NB; ++b) {
      float s = hsum(acc[b]);
      const float* xb = x + (b0 + b) * k;
      for (int64_t t = j; t < k; ++t) s += (wqr ? static_cast<float>(wqr[t]) : wfr[t]) * xb[t];
      out[b] = s;
    }
  }

  // int8 rows r..r+3 against NB inputs (rows b0.. of x): 4 x NB accumulators, so each input
  // vector loaded serves four weight rows and each widened weight vector NB inputs. Every (row,
  // input) pair still sums in one W-wide accumulator in j order, then the tail, exactly as
  // dot_rows and row_batch do: blocking changes which loads are shared, never a row's sum.
  // row_batch's one row keeps only NB FMA chains in flight and loads an input vector per
  // FMA, which with widening's two extra instructions per weight vector makes a small int8
  // batch compute-bound; here 4 x NB chains run and each input load serves four rows (SmolLM2
  // on Zen 4, 2 threads, alternating: batch 2 1.36-1.65x, 5 1.19x, 8 1.01-1.17x). fp32
  // gained nothing from it (0.93-1.05x), so fp32 batches keep row_batch.
  template <int NB>
  void rows4_batch(int64_t r, const float* x, int64_t b0, float (*out)[4]) const {
    vec acc[NB][4];
    for (int b = 0; b < NB; ++b)
      for (int i = 0; i < 4; ++i) acc[b][i] = vzero();
    const float* xb[NB];
    for (int b = 0; b < NB; ++b) xb[b] = x + (b0 + b) * k;
    const int8_t* w0 = wq + r * k;
    const char* ahead = reinterpret_cast<const char*>(w0) + AHEAD<int8_t>;
    int64_t j = 0;
    for (; j + W <= k; j += W) {
      prefetch_span<4 * W>(ahead, 4 * j);
      vec xv[NB];
      for (int b = 0; b < NB; ++b) xv[b] = vload(xb[b] + j);
      for (int i = 0; i < 4; ++i) {
        const vec w = vload(w0 + i * k + j);
        for (int b = 0; b < NB; ++b) acc[b][i] = vfma(w, xv[b], acc[b][i]);
      }
    }
    for (int b = 0; b < NB; ++b) {
      for (int i = 0; i < 4; ++i) {
        float s = hsum(acc[b][i]);
        for (int64_t t = j; t < k; ++t) s += static_cast<float>(w0[i * k + t]) * xb[b][t];
        out[b][i] = s;
      }
    }
  }

  // Rows [r0, r1) of Y = X W^T (+ bias) for B inputs: x (B, k) -> y (B, n). int8: four rows
  // at a time against NB4 inputs a pass (4 x NB4 accumulators, and the weights and inputs
  // they read, fill the vector registers), then rows left over one at a time, as fp32 does.
  void rows_batch(const float* x, float* y, int64_t batch, int64_t r0, int64_t r1) const {
    if (w4) {  // each row dequantized once (into L1), then against every input
      thread_local Buffer<float> wbuf;
      wbuf.resize(k);
      const int64_t stride = k / 32 * Q4_BYTES;
      for (int64_t r = r0; r < r1; ++r) {
        q4_row(w4 + r * stride, k, wbuf.data());
        const float bi = bias ? bias[r] : 0.0f;
        float out[NB4];
        for (int64_t b0 = 0; b0 < batch; b0 += NB4) {
          const int64_t nb = std::min<int64_t>(NB4, batch - b0);
          with_count<NB4>(nb, [&](auto c) { q4_dot_dequantized<decltype(c)::value>(wbuf.data(), k, x, b0, out); });
          for (int64_t b = 0; b < nb; ++b) y[(b0 + b) * n + r] = out[b] + bi;
        }
      }
      return;
    }
    float out4[NB4][4];
    int64_t r = r0;
    for (; wq && r + 4 <= r1; r += 4) {
      for (int64_t b0 = 0; b0 < batch; b0 += NB4) {
        const int64_t nb = std::min<int64_t>(NB4, batch - b0);
        with_count<NB4>(nb, [&](auto c) { rows4_batch<decltype(c)::value>(r, x, b0, out4); });
        for (int64_t b = 0; b < nb; ++b) {
          for (int i = 0; i < 4; ++i) {
            const float bi = bias ? bias[r + i] : 0.0f;
            y[(b0 + b) * n + r + i] = out4[b][i] * scale[r + i] + bi;
          }
        }
      }
    }
    float out[8];
    for (; r < r1; ++r) {
      for (int64_t b0 = 0; b0 < batch; b0 += 8) {
        const int64_t nb = std::min<int64_t>(8, batch - b0);
        with_count<8>(nb, [&](auto c) { row_batch<decltype(c)::value>(r, x, b0, out); });
        const float sc = scale ? scale[r] : 1.0f, bi = bias ? bias[r] : 0.0f;
        for (int64_t b = 0; b < nb; ++b) y[(b0 + b) * n + r] = out[b] * sc + bi;
      }
    }
  }

#ifdef ZENLM_INT16_INPUTS
  // int8 rows [r0, r1) of Y = X W^T (+ bias) for B inputs already rounded to int16 (q, (B, k),
  // and their scales qs): four rows at a time against NB4 inputs a pass, then rows left over
  // one at a time. Every (row, input) pair is one exact integer, then one expression.
  void rows_int16(const int16_t* q, const float* qs, float* y, int64_t batch, int64_t r0, int64_t r1) const {
    int32_t sums[NB4][4];
    for (int64_t r = r0; r < r1;) {
      const int rows = r + 4 <= r1 ? 4 : 1;
      const int8_t* w0 = wq + r * k;
      for (int64_t b0 = 0; b0 < batch; b0 += NB4) {
        const int64_t nb = std::min<int64_t>(NB4, batch - b0);
        with_count<NB4>(nb, [&](auto c) {
          constexpr int C = decltype(c)::value;
          if (rows == 4) int16_block<C, 4>(w0, k, q, b0, sums); else int16_block<C, 1>(w0, k, q, b0, sums);
        });
        for (int64_t b = 0; b < nb; ++b) {
          for (int i = 0; i < rows; ++i) {
            const float bi = bias ? bias[r + i] : 0.0f;
            y[(b0 + b) * n + r + i] = static_cast<float>(sums[b][i]) * qs[b0 + b] * scale[r + i] + bi;
          }
        }
      }
      r += rows;
    }
  }

  // int8 rows [r0, r1) of Y = X W^T (+ bias) for B inputs rounded by quantize8: packed groups
  // of 16 rows against MB8 inputs a pass where packed (r0 a multiple of 16), the other rows
  // (or all, unpacked) one at a time: the same chain for every (row, input) either way.
  void rows_block8(const Rounded& in, float* y, int64_t batch, int64_t r0, int64_t r1) const {
    const int64_t nblk = k / QBLOCK;
    const int8_t* q = in.q8.data();
    const float* bs = in.bs.data();
    const int32_t* neg = in.neg.data();
    int64_t r = r0;
    if (packed) {
      for (; r + PACK <= std::min(r1, n / PACK * PACK); r += PACK) {
        const uint8_t* g = packed->data() + r * k;
        for (int64_t b0 = 0; b0 < batch; b0 += MB8) {
          const int64_t nb = std::min<int64_t>(MB8, batch - b0);
          with_count<MB8>(nb, [&](auto c) {
            packed_group<decltype(c)::value>(g, k, q, bs, neg, b0, scale + r, bias ? bias + r : nullptr, y + r, n);
          });
        }
      }
    }
    for (; r < r1; ++r)
      for (int64_t b = 0; b < batch; ++b)
        y[b * n + r] = std::fma(block8_dot(wq + r * k, k, q + b * k, bs + b * nblk, neg + b * nblk), scale[r],
                                bias ? bias[r] : 0.0f);
  }
#endif

  // Whether this product takes its inputs rounded (``Rounded``): int8 rows on VNNI builds.
  bool rounds_inputs() const { return INT16_INPUTS && wq != nullptr; }

  // Room for ``batch`` rounded input rows, then row b of them from x (k floats), on any thread.
  void make_room(Rounded& r, int64_t batch) const {
    if (!rounds_inputs()) return;
    if (blocks8()) {
      r.q8.resize(batch * k);
      r.bs.resize(batch * k / QBLOCK);
      r.neg.resize(batch * k / QBLOCK);
      return;
    }
    r.q.resize(batch * k);
    r.s.resize(batch);
  }
  void round_row(const float* x, int64_t b, Rounded& r) const {
#ifdef ZENLM_INT16_INPUTS
    if (blocks8()) {
      const int64_t nblk = k / QBLOCK;
      quantize8(x, k, r.q8.data() + b * k, r.bs.data() + b * nblk, r.neg.data() + b * nblk);
    } else if (wq) {
      r.s[b] = quantize16(x, k, qmax_for(k), r.q.data() + b * k);
    }
#endif
  }

  // y = W x (+ bias), in a few items a thread: enough to even out a slow thread, few enough
  // that claiming them (one contended atomic each) costs nothing next to the rows. One row
  // (memory-bound) takes 2 a thread: each item's first AHEAD bytes wait on memory, and a
  // thread's next item is not where its prefetches went (1.1-1.2x over 8, SmolLM2 int8 on
  // Zen 4). A batch (compute-bound) takes 8. Items are multiples of 4 rows, which keeps the
  // four-row kernel whole. ``run(count, fn)`` spreads fn(0..count) over ``threads`` threads:
  // the step's own pool, or torch's between torch ops. ``ready``: x already rounded (where
  // ``rounds_inputs``), else the rows are rounded here, on this thread.
  template <typename Run>
  void apply(int threads, Run&& run, const float* x, float* y, int64_t batch = 1,
             const Rounded* ready = nullptr) const {
    const int64_t items = (batch == 1 ? 2 : 8) * threads;
    const int64_t align = packed ? PACK : 4;  // whole packed groups, or whole four-row blocks
    const int64_t per = std::max<int64_t>(16, ((n + items - 1) / items + align - 1) / align * align);
    const int64_t count = (n + per - 1) / per;
#ifdef ZENLM_INT16_INPUTS
    if (wq) {
      if (!ready) {
        thread_local Rounded own;
        make_room(own, batch);
        for (int64_t b = 0; b < batch; ++b) round_row(x + b * k, b, own);
        ready = &own;
      }
      if (blocks8()) {
        run(count, [&](int64_t i) { rows_block8(*ready, y, batch, i * per, std::min(n, (i + 1) * per)); });
        return;
      }
      const int16_t* qp = ready->q.data();
      const float* sp = ready->s.data();
      run(count, [&](int64_t i) { rows_int16(qp, sp, y, batch, i * per, std::min(n, (i + 1) * per)); });
      return;
    }
#endif
    if (batch == 1) {
      run(count, [&](int64_t i) { rows(x, y, i * per, std::min(n, (i + 1) * per)); });
    } else {
      run(count, [&](int64_t i) { rows_batch(x, y, batch, i * per, std::min(n, (i + 1) * per)); });
    }
  }

  void apply(Pool& pool, const float* x, float* y, int64_t batch = 1, const Rounded* ready = nullptr) const {
    apply(pool.threads(), [&](int64_t count, const std::function<void(int64_t)>& fn) { pool.run(count, fn); },
          x, y, batch, ready);
  }
};

Mat make_mat(const torch::Tensor& w, const Opt& scale, const Opt& bias, bool pack = false) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "weights must be contiguous 2-D CPU tensors");
  Mat m;
  m.keep_w = w;
  m.n = w.size(0);
  m.k = w.size(1);
  if (w.scalar_type() == torch::kByte) {
    TORCH_CHECK(w.size(1) % Q4_BYTES == 0, "int4 rows must be whole blocks of 24 bytes");
    m.k = w.size(1) / Q4_BYTES * 32;
    m.w4 = w.data_ptr<uint8_t>();
  } else if (w.scalar_type() == torch::kInt8) {
    TORCH_CHECK(scale.has_value(), "int8 weights need their row scales");
    TORCH_CHECK(scale->scalar_type() == torch::kFloat && scale->is_contiguous() && scale->numel() == m.n,
                "int8 row scales must be fp32, one per row");
    m.keep_s = *scale;
    m.wq = w.data_ptr<int8_t>();
    m.scale = m.keep_s.data_ptr<float>();
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kFloat, "weights must be fp32, int8 or int4 blocks (uint8)");
    m.wf = w.data_ptr<float>();
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == m.n,
                "a bias must be fp32, one per row");
    m.keep_b = *bias;
    m.bias = m.keep_b.data_ptr<float>();
  }
  if (pack) m.pack();
  return m;
}

torch::Tensor checked_vec(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.numel() == n, what, " must be fp32 of ", n);
  return t;
}

struct Layer {
  torch::Tensor attn_norm, mlp_norm;
  Mat qkv, o, gate_up, down;
};

class Decoder {
 public:
  Decoder(torch::Tensor embedding, torch::Tensor final_norm, torch::Tensor head, Opt head_scale,
          torch::Tensor rope_cos, torch::Tensor rope_sin, int64_t n_head, int64_t n_kv_head,
          int64_t head_dim, int64_t d_ff, double eps)
      : nh_(n_head), nkv_(n_kv_head), hd_(head_dim), ff_(d_ff), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(embedding.dim() == 2 && embedding.scalar_type() == torch::kFloat && embedding.is_contiguous(),
                "the embedding table must be contiguous fp32");
    TORCH_CHECK(n_head % n_kv_head == 0, "n_head must be a multiple of n_kv_head");
    TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 512, "head_dim must be even and at most 512");
    emb_ = embedding;
    vocab_ = embedding.size(0);
    d_ = embedding.size(1);
    final_norm_ = checked_vec(final_norm, d_, "the final norm");
    head_ = make_mat(head, head_scale, std::nullopt, true);
    TORCH_CHECK(head_.k == d_, "the head's width must be d_model");
    TORCH_CHECK(rope_cos.dim() == 2 && rope_cos.size(1) == hd_ && rope_cos.is_contiguous() &&
                rope_cos.scalar_type() == torch::kFloat && rope_sin.sizes() == rope_cos.sizes() &&
                rope_sin.is_contiguous() && rope_sin.scalar_type() == torch::kFloat,
                "rope tables must be contiguous fp32 (max_len, head_dim)");
    cos_ = rope_cos;
    sin_ = rope_sin;
  }

  void add_layer(torch::Tensor attn_norm, torch::Tensor qkv, Opt qkv_scale, Opt qkv_bias,
                 torch::Tensor o, Opt o_scale, Opt o_bias, torch::Tensor mlp_norm,
                 torch::Tensor gate_up, Opt gate_up_scale, Opt gate_up_bias,
                 torch::Tensor down, Opt down_scale, Opt down_bias) {
    Layer l;
    l.attn_norm = checked_vec(attn_norm, d_, "an attention norm");
    l.mlp_norm = checked_vec(mlp_norm, d_, "an MLP norm");
    l.qkv = make_mat(qkv, qkv_scale, qkv_bias, true);
    l.o = make_mat(o, o_scale, o_bias, true);
    l.gate_up = make_mat(gate_up, gate_up_scale, gate_up_bias, true);
    l.down = make_mat(down, down_scale, down_bias, true);
    TORCH_CHECK(l.qkv.n == (nh_ + 2 * nkv_) * hd_ && l.qkv.k == d_, "q/k/v shape");
    TORCH_CHECK(l.o.n == d_ && l.o.k == nh_ * hd_, "o_proj shape");
    TORCH_CHECK(l.gate_up.n == 2 * ff_ && l.gate_up.k == d_, "gate/up shape");
    TORCH_CHECK(l.down.n == d_ && l.down.k == ff_, "down_proj shape");
    layers_.push_back(std::move(l));
  }

  // Logits (B, 1, vocab) of ``tokens[b]`` at ``positions[b]`` in cache row ``cache_rows[b]``;
  // their keys and values are written into every layer's cache tensors (rows, kv_heads,
  // capacity, head_dim) there, and attention reads that row's positions 0..positions[b]. Every
  // row's sums run in one order whatever the batch or the threads, so a row decodes the same
  // alone or in any batch. A layer writes every row's keys before any row attends, so rows
  // of one cache row at successive positions are a causal prompt chunk, computed exactly as
  // those tokens would be one step each. ``logit_rows`` (ascending; empty: all) picks the
  // rows whose logits are wanted: a prompt chunk needs only its last.
  torch::Tensor step(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                     const std::vector<int64_t>& cache_rows, const std::vector<torch::Tensor>& keys,
                     const std::vector<torch::Tensor>& values, const std::vector<int64_t>& logit_rows) {
    std::lock_guard<std::mutex> guard(mu_);  // one step at a time: the scratch is shared
    const int want = std::max(1, at::get_num_threads());  // torch's thread count, as it is now
    if (!pool_ || pool_->threads() != want) pool_ = std::make_unique<Pool>(want);
    const int64_t L = static_cast<int64_t>(layers_.size());
    const int64_t B = static_cast<int64_t>(tokens.size());
    TORCH_CHECK(B >= 1 && static_cast<int64_t>(positions.size()) == B &&
                static_cast<int64_t>(cache_rows.size()) == B, "one position and cache row per token");
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == L && static_cast<int64_t>(values.size()) == L,
                "one key and one value tensor per layer");
    int64_t longest = 0, rows_needed = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(cache_rows[b] >= 0, "cache rows must be >= 0");
      rows_needed = std::max(rows_needed, cache_rows[b] + 1);
      TORCH_CHECK(tokens[b] >= 0 && tokens[b] < vocab_, "token id out of range");
      TORCH_CHECK(positions[b] >= 0 && positions[b] < cos_.size(0), "position beyond the rope tables");
      longest = std::max(longest, positions[b] + 1);
    }
    for (size_t j = 0; j < logit_rows.size(); ++j)
      TORCH_CHECK(logit_rows[j] >= 0 && logit_rows[j] < B && (j == 0 || logit_rows[j] > logit_rows[j - 1]),
                  "logit rows must be ascending row indices");
    for (int64_t i = 0; i < L; ++i) {
      for (const auto* t : {&keys[i], &values[i]}) {
        TORCH_CHECK(t->scalar_type() == keys[0].scalar_type() && t->dim() == 4 && t->size(0) >= rows_needed &&
                    t->size(1) == nkv_ && t->size(3) == hd_ && t->size(2) >= longest && t->is_contiguous(),
                    "KV cache tensors must be contiguous fp32 or fp16, all alike (batch, kv_heads, > position, head_dim)");
      }
    }
    TORCH_CHECK(L == 0 || keys[0].scalar_type() == torch::kFloat || keys[0].scalar_type() == torch::kHalf,
                "KV cache tensors must be fp32 or fp16");
    const bool half = L > 0 && keys[0].scalar_type() == torch::kHalf;
    const int64_t nq = (nh_ + 2 * nkv_) * hd_;
    x_.resize(B * d_);
    xn_.resize(B * d_);
    qkv_.resize(B * nq);
    att_.resize(B * nh_ * hd_);
    gu_.resize(B * 2 * ff_);
    tmp_.resize(B * std::max(d_, ff_));
    if (static_cast<int64_t>(scores_.size()) < B * nh_ * longest) scores_.resize(B * nh_ * longest * 2);
    // The work between products is per row (norms, RoPE, the residual, SwiGLU, rounding the
    // next product's inputs), so it runs a row an item over the pool instead of on this thread
    // while the others wait: at batch 8 that work was a quarter of a step's wall time. A row's
    // arithmetic is the same on any thread, and one row runs here, as before.
    auto each_row = [&](int64_t rows, const std::function<void(int64_t)>& fn) { pool_->run(rows, fn); };
    const float* emb = emb_.data_ptr<float>();
    for (int64_t i = 0; i < L; ++i) {
      const Layer& l = layers_[i];
      const float* attn_norm = l.attn_norm.data_ptr<float>();
      l.qkv.make_room(in_, B);
      each_row(B, [&](int64_t b) {  // the residual stream in: the embedding, or the last layer's sum
        float* x = x_.data() + b * d_;
        if (i == 0) {
          std::memcpy(x, emb + tokens[b] * d_, d_ * sizeof(float));
        } else {
          add(x, xn_.data() + b * d_, d_);
        }
        rmsnorm(x, attn_norm, xn_.data() + b * d_);
        l.qkv.round_row(xn_.data() + b * d_, b, in_);
      });
      l.qkv.apply(*pool_, xn_.data(), qkv_.data(), B, &in_);
      const int64_t cap = keys[i].size(2);
      each_row(B, [&](int64_t b) {  // RoPE, then this row's key and value into its cache row
        const int64_t pos = positions[b];
        const float* cos = cos_.data_ptr<float>() + pos * hd_;
        const float* sin = sin_.data_ptr<float>() + pos * hd_;
        float* q = qkv_.data() + b * nq;
        float* k = q + nh_ * hd_;
        float* v = k + nkv_ * hd_;
        for (int64_t h = 0; h < nh_; ++h) rope(q + h * hd_, cos, sin);
        for (int64_t h = 0; h < nkv_; ++h) rope(k + h * hd_, cos, sin);
        const int64_t at = cache_rows[b] * nkv_ * cap * hd_;
        if (half) {
          put_kv(static_cast<uint16_t*>(keys[i].data_ptr()) + at, static_cast<uint16_t*>(values[i].data_ptr()) + at,
                 k, v, cap, pos);
        } else {
          put_kv(keys[i].data_ptr<float>() + at, values[i].data_ptr<float>() + at, k, v, cap, pos);
        }
      });
      if (half) {
        attend(static_cast<const uint16_t*>(keys[i].data_ptr()), static_cast<const uint16_t*>(values[i].data_ptr()),
               cap, positions, cache_rows, nq, longest);
      } else {
        attend(keys[i].data_ptr<float>(), values[i].data_ptr<float>(), cap, positions, cache_rows, nq, longest);
      }
      if (l.o.rounds_inputs()) {  // attention wrote the rows; a phase only where they are rounded
        l.o.make_room(in_, B);
        each_row(B, [&](int64_t b) { l.o.round_row(att_.data() + b * nh_ * hd_, b, in_); });
      }
      l.o.apply(*pool_, att_.data(), tmp_.data(), B, &in_);
      const float* mlp_norm = l.mlp_norm.data_ptr<float>();
      l.gate_up.make_room(in_, B);
      each_row(B, [&](int64_t b) {
        float* x = x_.data() + b * d_;
        add(x, tmp_.data() + b * d_, d_);
        rmsnorm(x, mlp_norm, xn_.data() + b * d_);
        l.gate_up.round_row(xn_.data() + b * d_, b, in_);
      });
      l.gate_up.apply(*pool_, xn_.data(), gu_.data(), B, &in_);
      l.down.make_room(in_, B);
      each_row(B, [&](int64_t b) {  // SwiGLU: silu(gate) * up
        const float* gu = gu_.data() + b * 2 * ff_;
        float* act = tmp_.data() + b * ff_;
        int64_t j = 0;
        for (; j + W <= ff_; j += W) {
          const vec g = vload(gu + j);
          const vec e = vexp(vmul(g, vset(-1.0f)));
          vstore(act + j, vmul(vdiv(g, vadd(vset(1.0f), e)), vload(gu + ff_ + j)));
        }
        for (; j < ff_; ++j) act[j] = gu[j] / (1.0f + std::exp(-gu[j])) * gu[ff_ + j];
        l.down.round_row(act, b, in_);
      });
      l.down.apply(*pool_, tmp_.data(), xn_.data(), B, &in_);
    }
    each_row(B, [&](int64_t b) { add(x_.data() + b * d_, xn_.data() + b * d_, d_); });
    const int64_t out_rows = logit_rows.empty() ? B : static_cast<int64_t>(logit_rows.size());
    head_.make_room(in_, out_rows);
    each_row(out_rows, [&](int64_t j) {  // the wanted rows, packed at the front
      const int64_t b = logit_rows.empty() ? j : logit_rows[j];
      rmsnorm(x_.data() + b * d_, final_norm_.data_ptr<float>(), xn_.data() + j * d_);
      head_.round_row(xn_.data() + j * d_, j, in_);
    });
    torch::Tensor logits = torch::empty({out_rows, 1, vocab_}, torch::kFloat);
    head_.apply(*pool_, xn_.data(), logits.data_ptr<float>(), out_rows, &in_);
    return logits;
  }

  int64_t n_layer() const { return static_cast<int64_t>(layers_.size()); }

 private:
  void rmsnorm(const float* x, const float* w, float* y) const {
    double ss = 0.0;
    for (int64_t j = 0; j < d_; ++j) ss += static_cast<double>(x[j]) * x[j];
    const float r = 1.0f / std::sqrt(static_cast<float>(ss / d_) + eps_);
    for (int64_t j = 0; j < d_; ++j) y[j] = x[j] * r * w[j];
  }

  // x * cos + rotate_half(x) * sin, sin's first half already negated (the model's tables)
  void rope(float* x, const float* cos, const float* sin) const {
    const int64_t half = hd_ / 2;
    float buf[512];  // rotate_half's x: the second half, then the first
    std::memcpy(buf, x + half, half * sizeof(float));
    std::memcpy(buf + half, x, half * sizeof(float));
    for (int64_t j = 0; j < hd_; ++j) x[j] = x[j] * cos[j] + buf[j] * sin[j];
  }

  static void add(float* x, const float* y, int64_t n) {
    for (int64_t j = 0; j < n; ++j) x[j] += y[j];
  }

  // q's dot with keys 0..n-1 (k, n x hd) times scale into s, and their largest: four keys at a
  // time, one accumulator each, folded together. Which sums a key's score takes depends only on
  // n (the row's own length), never on the batch or the thread.
  // This row's key and value at ``pos`` of its cache rows (kb, vb: the row's first KV head).
  template <typename T>
  void put_kv(T* kb, T* vb, const float* k, const float* v, int64_t cap, int64_t pos) const {
    for (int64_t h = 0; h < nkv_; ++h) {
      put_row(kb + (h * cap + pos) * hd_, k + h * hd_, hd_);
      put_row(vb + (h * cap + pos) * hd_, v + h * hd_, hd_);
    }
  }

  template <typename T>
  float scores(const float* q, const T* k, int64_t n, float scale, float* s) const {
    const int64_t hv = hd_ / W * W;
    float m = -INFINITY;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
      const T* k0 = k + t * hd_;
      vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
      for (int64_t j = 0; j < hv; j += W) {
        const vec qv = vload(q + j);
        a0 = vfma(qv, vload(k0 + j), a0);
        a1 = vfma(qv, vload(k0 + hd_ + j), a1);
        a2 = vfma(qv, vload(k0 + 2 * hd_ + j), a2);
        a3 = vfma(qv, vload(k0 + 3 * hd_ + j), a3);
      }
      _mm_storeu_ps(s + t, hsum4(a0, a1, a2, a3));
      for (int64_t i = 0; i < 4; ++i) {
        for (int64_t j = hv; j < hd_; ++j) s[t + i] += q[j] * as_float(k0[i * hd_ + j]);
        s[t + i] *= scale;
        m = std::max(m, s[t + i]);
      }
    }
    for (; t < n; ++t) {
      const T* kt = k + t * hd_;
      vec a = vzero();
      for (int64_t j = 0; j < hv; j += W) a = vfma(vload(q + j), vload(kt + j), a);
      s[t] = hsum(a);
      for (int64_t j = hv; j < hd_; ++j) s[t] += q[j] * as_float(kt[j]);
      s[t] *= scale;
      m = std::max(m, s[t]);
    }
    return m;
  }

  // out (hd) = sum over t < n of p[t] * v[t] (v: n x hd), held in registers over all positions,
  // up to eight vectors of it at a time.
  template <int NV, typename T>
  static void weighted_block(const float* p, const T* v, int64_t n, int64_t hd, float* out) {
    vec acc[NV];
    for (int i = 0; i < NV; ++i) acc[i] = vzero();
    for (int64_t t = 0; t < n; ++t) {
      const vec pv = vset(p[t]);
      for (int i = 0; i < NV; ++i) acc[i] = vfma(pv, vload(v + t * hd + i * W), acc[i]);
    }
    for (int i = 0; i < NV; ++i) vstore(out + i * W, acc[i]);
  }
  template <typename T>
  void weighted_sum(const float* p, const T* v, int64_t n, float* out) const {
    const int64_t hv = hd_ / W * W;
    for (int64_t c = 0; c < hv; c += 8 * W) {
      with_count<8>(std::min<int64_t>(8, (hv - c) / W),
                    [&](auto nv) { weighted_block<decltype(nv)::value>(p, v + c, n, hd_, out + c); });
    }
    for (int64_t j = hv; j < hd_; ++j) {
      out[j] = 0.0f;
      for (int64_t t = 0; t < n; ++t) out[j] += p[t] * as_float(v[t * hd_ + j]);
    }
  }

  // One query per head and row over that row's positions 0..pos; softmax in fp32. A work item
  // is one row's KV head with the query heads that share it (GQA), one after another on one
  // thread, so the group's keys and values are read from memory once and then from this core's
  // cache: a batch's KV is tens of MB a step (8 rows of SmolLM2 at position 100: 37 MB), and
  // an item per query head made the threads fetch it once per head (an int8 step of 8 rows at
  // position 100 / 400, alternating on a Zen 4: 1.06x / 1.44x). A row or two keep an item a
  // head: their few groups would leave a thread idle (one row: 0.91x).
  template <typename T>
  void attend(const T* kc, const T* vc, int64_t cap, const std::vector<int64_t>& positions,
              const std::vector<int64_t>& cache_rows, int64_t nq, int64_t longest) {
    const int64_t group = nh_ / nkv_;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd_));
    const int64_t B = static_cast<int64_t>(positions.size());
    int64_t work = 0;
    for (int64_t p : positions) work += (p + 1) * hd_;
    auto head = [&](int64_t b, int64_t h) {
      const int64_t item = b * nh_ + h;
      const int64_t n = positions[b] + 1;
      const float* qh = qkv_.data() + b * nq + h * hd_;
      const T* kh = kc + (cache_rows[b] * nkv_ + h / group) * cap * hd_;
      const T* vh = vc + (cache_rows[b] * nkv_ + h / group) * cap * hd_;
      float* s = scores_.data() + item * longest;
      const float m = scores(qh, kh, n, scale, s);
      float sum = 0.0f;
      int64_t t = 0;
      for (; t + W <= n; t += W) {
        const vec e = vexp(vadd(vload(s + t), vset(-m)));
        vstore(s + t, e);
        for (int i = 0; i < W; ++i) sum += s[t + i];  // in order, as the tail below
      }
      for (; t < n; ++t) {
        s[t] = std::exp(s[t] - m);
        sum += s[t];
      }
      const float inv = 1.0f / sum;
      for (int64_t t = 0; t < n; ++t) s[t] *= inv;
      weighted_sum(s, vh, n, att_.data() + item * hd_);
    };
    auto kv_head = [&](int64_t item) {
      const int64_t b = item / nkv_, g = item % nkv_;
      for (int64_t h = g * group; h < (g + 1) * group; ++h) head(b, h);
    };
    // too few groups to keep every thread busy (one row: 3 groups on 2 threads), one item a head
    const bool grouped = B * nkv_ >= 4 * pool_->threads();
    const int64_t items = grouped ? B * nkv_ : B * nh_;
    auto item_fn = [&](int64_t item) {
      if (grouped) kv_head(item); else head(item / nh_, item % nh_);
    };
    if (work >= 4096) {
      pool_->run(items, item_fn);
    } else {
      for (int64_t item = 0; item < items; ++item) item_fn(item);
    }
  }

  int64_t nh_, nkv_, hd_, ff_, d_ = 0, vocab_ = 0;
  float eps_;
  torch::Tensor emb_, final_norm_, cos_, sin_;
  Mat head_;
  std::vector<Layer> layers_;
  Buffer<float> x_, xn_, qkv_, att_, gu_, tmp_, scores_;
  Rounded in_;  // the next product's inputs, rounded
  std::mutex mu_;
  std::unique_ptr<Pool> pool_;
};

// int4 blocks (n, k/32 * 24 bytes) as the fp32 weight (n, k) the step computes with, each weight
// the one rounding of q * s + m that q4_block makes. For prefill: its many rows make the float
// GEMM faster than torch's weight-only int4 kernel, and the weights stay the step's own. Rows
// go over torch's threads, since this runs between torch ops.
torch::Tensor q4_dequantize(const torch::Tensor& blocks, int64_t k) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == torch::kByte && blocks.is_contiguous() &&
                  k % 32 == 0 && blocks.size(1) == k / 32 * Q4_BYTES,
              "int4 blocks must be contiguous uint8 (n, k/32 * 24)");
  const int64_t n = blocks.size(0);
  torch::Tensor out = torch::empty({n, k}, torch::kFloat);
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) q4_row(src + r * (k / 32) * Q4_BYTES, k, dst + r * k);
  });
  return out;
}

// y = x W^T (+ bias) for int8 rows with their scales, x (m, k) fp32: the step's own int8
// product for torch's forward (prefill chunks, and models the step does not take), so that a
// prompt's tokens go through the same arithmetic as the tokens decoded after it. Rows go over
// torch's threads, since this runs between torch ops.
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                          const Opt& bias) {
  TORCH_CHECK(w.scalar_type() == torch::kInt8, "int8_linear takes int8 weights");
  // a few rows or more: lay the weights out for the packed kernel (the same arithmetic; laying
  // them out costs about one read of them, which one row's product is)
  const Mat m = make_mat(w, scale, bias, x.dim() == 2 && x.size(0) >= 4);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == m.k && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "int8_linear's input must be contiguous fp32 (rows, ", m.k, ")");
  const int64_t rows = x.size(0);
  torch::Tensor y = torch::empty({rows, m.n}, torch::kFloat);
  if (rows == 0) return y;
  auto run = [](int64_t count, const std::function<void(int64_t)>& fn) {
    at::parallel_for(0, count, 1, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) fn(i);
    });
  };
  m.apply(std::max(1, at::get_num_threads()), run, x.data_ptr<float>(), y.data_ptr<float>(), rows);
  return y;
}

// Each row's index of its largest value, the first of equals, a NaN counting as largest (its
// first), as torch.argmax picks: greedy decoding's token for every row of a step. torch took
// 0.6 ms a step for 8 x 49152 logits inside the engine (its reduction's threads meet the pool's
// still spinning one), a tenth of an int8 step; one thread here takes about 0.05.
std::vector<int64_t> argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.size(1) > 0,
              "argmax_rows takes contiguous fp32 rows (rows, n), n > 0");
  const int64_t rows = x.size(0), n = x.size(1);
  std::vector<int64_t> out(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = x.data_ptr<float>() + r * n;
    vec m = vset(-INFINITY), odd = vzero();  // odd: NaN where any x is NaN or infinite
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const vec v = vload(p + j);
      m = vmax(m, v);
      odd = vadd(odd, vmul(v, vzero()));
    }
    float best = -INFINITY;
    float lanes[W];
    vstore(lanes, m);
    for (int i = 0; i < W; ++i) best = std::max(best, lanes[i]);
    bool plain = !std::isnan(hsum(odd));
    for (int64_t t = j; t < n; ++t) {
      plain = plain && std::isfinite(p[t]);
      best = std::max(best, p[t]);
    }
    int64_t at = 0;
    if (plain) {
      while (p[at] != best) ++at;
    } else {  // the exact rule: the first NaN, else the first largest (infinities included)
      at = -1;
      for (int64_t t = 0; t < n && at < 0; ++t) if (std::isnan(p[t])) at = t;
      if (at < 0) {
        at = 0;
        for (int64_t t = 1; t < n; ++t) if (p[t] > p[at]) at = t;
      }
    }
    out[r] = at;
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, Opt, torch::Tensor, torch::Tensor,
                    int64_t, int64_t, int64_t, int64_t, double>())
      .def("add_layer", &Decoder::add_layer)
      .def("step", &Decoder::step, py::arg("tokens"), py::arg("positions"), py::arg("cache_rows"),
           py::arg("keys"), py::arg("values"), py::arg("logit_rows") = std::vector<int64_t>{},
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("n_layer", &Decoder::n_layer);
  m.def("q4_dequantize", &q4_dequantize, py::call_guard<py::gil_scoped_release>());
  m.def("int8_linear", &int8_linear, py::call_guard<py::gil_scoped_release>());
  m.def("argmax_rows", &argmax_rows, py::call_guard<py::gil_scoped_release>());
  // whether int8 products round their inputs (AVX-512 VNNI: to int8 in blocks of int8_block
  // inputs where a matrix's width is whole blocks, else to int16) or keep them fp32
  m.attr("int16_inputs") = py::bool_(INT16_INPUTS);
#ifdef ZENLM_INT16_INPUTS
  m.attr("int8_block") = py::int_(QBLOCK);
#else
  m.attr("int8_block") = py::int_(0);
#endif
}
