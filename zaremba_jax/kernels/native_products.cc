// Products for XLA's CPU backend where its own are slow: bfloat16 ones that read the weights as
// bfloat16, and a float32 product of a few rows (see native.py).
//
//   zaremba_bf16_matvec: y[N] = W[N, K] h[K]      (W^T h for a transposed W_hh: rows are dot products)
//   zaremba_bf16_vecmat: y[N] = h[K] W[K, N]      (h W for W_hh as stored: rows are scaled and added)
//   zaremba_bf16_matmul: y[B, N] = h[B, K] W[K, N], W given as row pairs P[K/2, N, 2]
//                        (P[p, n] = W[2p, n], W[2p + 1, n]: the operand order of vdpbf16ps)
//   zaremba_f32_matvec:  y[N] = W[N, K] h[K], all float32
//   zaremba_f32_matmul:  y[B, N] = h[B, K] W[K, N], all float32 (a few rows: XLA's float32
//                        product of an evaluation step's shapes runs at half this kernel's rate)
//
// In the bfloat16 products W is bfloat16, h and y float32. h is rounded to bfloat16 first, each
// product of two bfloat16 numbers is exact in float32 and the sums are float32: the numbers of
// XLA's bfloat16 dot with a float32 result, up to the order of the sums (as the float32 product's
// are XLA's float32 dot's). Built with -mavx512f -mavx512bw -mavx512vl
// -mavx512bf16; native.py loads it only on a CPU that has avx512_bf16. The output rows are split
// into parts run on XLA's intra-op thread pool and the calling thread.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using Bf16Matrix = ffi::Buffer<ffi::BF16, 2>;
using F32Vector = ffi::Buffer<ffi::F32, 1>;
using F32Result = ffi::ResultBuffer<ffi::F32, 1>;
using Bf16Pairs = ffi::Buffer<ffi::BF16, 3>;
using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using F32MatrixResult = ffi::ResultBuffer<ffi::F32, 2>;

namespace {

// k floats rounded to bfloat16 (round to nearest even, as XLA's convert) into out[0 .. k).
void RoundRowToBf16(const float* h, int64_t k, uint16_t* out) {
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(h + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)v);
  }
  if (j < k) {
    const __mmask16 m = (__mmask16)((1u << (k - j)) - 1);
    _mm256_mask_storeu_epi16(out + j, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, h + j)));
  }
}

// h rounded to bfloat16, zero-padded to whole 32-lane loads; kept per thread so that a call
// allocates nothing once warm.
const uint16_t* RoundToBf16(const float* h, int64_t k) {
  thread_local std::vector<uint16_t> buffer;
  buffer.assign((k + 31) / 32 * 32, 0);
  RoundRowToBf16(h, k, buffer.data());
  return buffer.data();
}

inline __mmask16 LanesLeft(int64_t left) {
  return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

inline __m512 Bf16ToF32(__m256i x) {  // 16 bfloat16 -> 16 float32 (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

inline __m512 Bf16Broadcast(uint16_t x) {  // one bfloat16 -> 16 lanes of float32
  return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int32_t>(uint32_t{x} << 16)));
}

// y[r] = W[r, :] . h for rows [r0, r1); h is padded to whole 32-lane loads.
void MatvecRows(const uint16_t* w, const uint16_t* h, float* y, int64_t r0, int64_t r1, int64_t k) {
  const int64_t whole = k / 32 * 32;
  const __mmask32 tail = (__mmask32)((1ull << (k - whole)) - 1);
  auto load = [](const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); };
  auto load_tail = [tail](const uint16_t* p) { return (__m512bh)_mm512_maskz_loadu_epi16(tail, p); };
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {  // four rows share each load of h
    const uint16_t* w0 = w + r * k;
    const uint16_t *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < whole; j += 32) {
      const __m512bh hv = load(h + j);
      a0 = _mm512_dpbf16_ps(a0, load(w0 + j), hv);
      a1 = _mm512_dpbf16_ps(a1, load(w1 + j), hv);
      a2 = _mm512_dpbf16_ps(a2, load(w2 + j), hv);
      a3 = _mm512_dpbf16_ps(a3, load(w3 + j), hv);
    }
    if (tail) {
      const __m512bh hv = load(h + whole);
      a0 = _mm512_dpbf16_ps(a0, load_tail(w0 + whole), hv);
      a1 = _mm512_dpbf16_ps(a1, load_tail(w1 + whole), hv);
      a2 = _mm512_dpbf16_ps(a2, load_tail(w2 + whole), hv);
      a3 = _mm512_dpbf16_ps(a3, load_tail(w3 + whole), hv);
    }
    y[r] = _mm512_reduce_add_ps(a0);
    y[r + 1] = _mm512_reduce_add_ps(a1);
    y[r + 2] = _mm512_reduce_add_ps(a2);
    y[r + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; r < r1; ++r) {
    const uint16_t* w0 = w + r * k;
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t j = 0; j < whole; j += 32) a0 = _mm512_dpbf16_ps(a0, load(w0 + j), load(h + j));
    if (tail) a0 = _mm512_dpbf16_ps(a0, load_tail(w0 + whole), load(h + whole));
    y[r] = _mm512_reduce_add_ps(a0);
  }
}

// The float32 W h: y[r] = W[r, :] . h for rows [r0, r1), four rows sharing each load of h.
void MatvecRowsF32(const float* w, const float* h, float* y, int64_t r0, int64_t r1, int64_t k) {
  const int64_t whole = k / 16 * 16;
  const __mmask16 tail = LanesLeft(k - whole);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const float* w0 = w + r * k;
    const float *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < whole; j += 16) {
      const __m512 hv = _mm512_loadu_ps(h + j);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + j), hv, a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + j), hv, a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + j), hv, a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + j), hv, a3);
    }
    if (tail) {
      const __m512 hv = _mm512_maskz_loadu_ps(tail, h + whole);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + whole), hv, a0);
      a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w1 + whole), hv, a1);
      a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w2 + whole), hv, a2);
      a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w3 + whole), hv, a3);
    }
    y[r] = _mm512_reduce_add_ps(a0);
    y[r + 1] = _mm512_reduce_add_ps(a1);
    y[r + 2] = _mm512_reduce_add_ps(a2);
    y[r + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; r < r1; ++r) {
    const float* w0 = w + r * k;
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t j = 0; j < whole; j += 16)
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + j), _mm512_loadu_ps(h + j), a0);
    if (tail)
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + whole),
                           _mm512_maskz_loadu_ps(tail, h + whole), a0);
    y[r] = _mm512_reduce_add_ps(a0);
  }
}

// y[c] = sum_j h[j] W[j, c] for columns [c0, c1): 128 columns at a time held in registers while
// the loop runs down the rows.
void VecmatColumns(const uint16_t* w, const uint16_t* h, float* y, int64_t c0, int64_t c1,
                   int64_t k, int64_t n) {
  int64_t c = c0;
  for (; c + 128 <= c1; c += 128) {
    __m512 a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm512_setzero_ps();
    const uint16_t* p = w + c;
    for (int64_t j = 0; j < k; ++j, p += n) {
      const __m512 hj = Bf16Broadcast(h[j]);
      for (int i = 0; i < 8; ++i) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * i));
        a[i] = _mm512_fmadd_ps(Bf16ToF32(x), hj, a[i]);
      }
    }
    for (int i = 0; i < 8; ++i) _mm512_storeu_ps(y + c + 16 * i, a[i]);
  }
  for (; c < c1; c += 16) {
    const int64_t left = c1 - c;
    const __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    __m512 a0 = _mm512_setzero_ps();
    const uint16_t* p = w + c;
    for (int64_t j = 0; j < k; ++j, p += n) {
      const __m512 hj = Bf16Broadcast(h[j]);
      a0 = _mm512_fmadd_ps(Bf16ToF32(_mm256_maskz_loadu_epi16(m, p)), hj, a0);
    }
    _mm512_mask_storeu_ps(y + c, m, a0);
  }
}

// h [B, K] rounded to bfloat16 and zero-padded to even rows: row b's pair p at [b * KP + p].
const uint32_t* RoundRowsToBf16Pairs(const float* h, int64_t batch, int64_t k, int64_t kp) {
  thread_local std::vector<uint32_t> buffer;
  buffer.assign(batch * kp, 0);
  for (int64_t b = 0; b < batch; ++b)
    RoundRowToBf16(h + b * k, k, reinterpret_cast<uint16_t*>(buffer.data() + b * kp));
  return buffer.data();
}

inline __m512bh BroadcastPair(uint32_t pair) { return (__m512bh)_mm512_set1_epi32((int32_t)pair); }

// y[b0 .. b0 + 5, c .. c + 64] (masked at the matrix's right edge): 20 accumulators in registers,
// each load of P feeding five rows. Written out, not as arrays, which the compiler spills.
void Matmul5x64(const uint32_t* p, const uint32_t* h, int64_t kp, int64_t n, int64_t c, float* y) {
  const __mmask16 m0 = LanesLeft(n - c), m1 = LanesLeft(n - c - 16), m2 = LanesLeft(n - c - 32),
                  m3 = LanesLeft(n - c - 48);
#define ZAREMBA_ROW(r) __m512 a##r##0 = _mm512_setzero_ps(), a##r##1 = a##r##0, a##r##2 = a##r##0, \
                       a##r##3 = a##r##0;
  ZAREMBA_ROW(0) ZAREMBA_ROW(1) ZAREMBA_ROW(2) ZAREMBA_ROW(3) ZAREMBA_ROW(4)
#undef ZAREMBA_ROW
  const uint32_t* w = p + c;
  for (int64_t j = 0; j < kp; ++j, w += n) {
    const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, w);
    const __m512bh w1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, w + 16);
    const __m512bh w2 = (__m512bh)_mm512_maskz_loadu_epi32(m2, w + 32);
    const __m512bh w3 = (__m512bh)_mm512_maskz_loadu_epi32(m3, w + 48);
#define ZAREMBA_ROW(r)                                   \
  {                                                      \
    const __m512bh hr = BroadcastPair(h[r * kp + j]);    \
    a##r##0 = _mm512_dpbf16_ps(a##r##0, w0, hr);         \
    a##r##1 = _mm512_dpbf16_ps(a##r##1, w1, hr);         \
    a##r##2 = _mm512_dpbf16_ps(a##r##2, w2, hr);         \
    a##r##3 = _mm512_dpbf16_ps(a##r##3, w3, hr);         \
  }
    ZAREMBA_ROW(0) ZAREMBA_ROW(1) ZAREMBA_ROW(2) ZAREMBA_ROW(3) ZAREMBA_ROW(4)
#undef ZAREMBA_ROW
  }
#define ZAREMBA_ROW(r)                                         \
  _mm512_mask_storeu_ps(y + r * n + c, m0, a##r##0);           \
  _mm512_mask_storeu_ps(y + r * n + c + 16, m1, a##r##1);      \
  _mm512_mask_storeu_ps(y + r * n + c + 32, m2, a##r##2);      \
  _mm512_mask_storeu_ps(y + r * n + c + 48, m3, a##r##3);
  ZAREMBA_ROW(0) ZAREMBA_ROW(1) ZAREMBA_ROW(2) ZAREMBA_ROW(3) ZAREMBA_ROW(4)
#undef ZAREMBA_ROW
}

// One row of h: y[c .. c + 64].
void Matmul1x64(const uint32_t* p, const uint32_t* h, int64_t kp, int64_t n, int64_t c, float* y) {
  for (int64_t i = 0; i < 4 && c + 16 * i < n; ++i) {
    const __mmask16 m = LanesLeft(n - c - 16 * i);
    __m512 a = _mm512_setzero_ps();
    const uint32_t* w = p + c + 16 * i;
    for (int64_t j = 0; j < kp; ++j, w += n)
      a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi32(m, w), BroadcastPair(h[j]));
    _mm512_mask_storeu_ps(y + c + 16 * i, m, a);
  }
}

// The float32 product's block, y[b0 .. b0 + 5, c .. c + 64], as Matmul5x64 with W's rows as they are.
void MatmulF32_5x64(const float* w_kn, const float* h, int64_t k, int64_t n, int64_t c, float* y) {
  const __mmask16 m0 = LanesLeft(n - c), m1 = LanesLeft(n - c - 16), m2 = LanesLeft(n - c - 32),
                  m3 = LanesLeft(n - c - 48);
#define ZAREMBA_ROW(r) __m512 a##r##0 = _mm512_setzero_ps(), a##r##1 = a##r##0, a##r##2 = a##r##0, \
                       a##r##3 = a##r##0;
  ZAREMBA_ROW(0) ZAREMBA_ROW(1) ZAREMBA_ROW(2) ZAREMBA_ROW(3) ZAREMBA_ROW(4)
#undef ZAREMBA_ROW
  const float* w = w_kn + c;
  for (int64_t j = 0; j < k; ++j, w += n) {
    const __m512 w0 = _mm512_maskz_loadu_ps(m0, w), w1 = _mm512_maskz_loadu_ps(m1, w + 16),
                 w2 = _mm512_maskz_loadu_ps(m2, w + 32), w3 = _mm512_maskz_loadu_ps(m3, w + 48);
#define ZAREMBA_ROW(r)                                   \
  {                                                      \
    const __m512 hr = _mm512_set1_ps(h[r * k + j]);      \
    a##r##0 = _mm512_fmadd_ps(w0, hr, a##r##0);          \
    a##r##1 = _mm512_fmadd_ps(w1, hr, a##r##1);          \
    a##r##2 = _mm512_fmadd_ps(w2, hr, a##r##2);          \
    a##r##3 = _mm512_fmadd_ps(w3, hr, a##r##3);          \
  }
    ZAREMBA_ROW(0) ZAREMBA_ROW(1) ZAREMBA_ROW(2) ZAREMBA_ROW(3) ZAREMBA_ROW(4)
#undef ZAREMBA_ROW
  }
#define ZAREMBA_ROW(r)                                         \
  _mm512_mask_storeu_ps(y + r * n + c, m0, a##r##0);           \
  _mm512_mask_storeu_ps(y + r * n + c + 16, m1, a##r##1);      \
  _mm512_mask_storeu_ps(y + r * n + c + 32, m2, a##r##2);      \
  _mm512_mask_storeu_ps(y + r * n + c + 48, m3, a##r##3);
  ZAREMBA_ROW(0) ZAREMBA_ROW(1) ZAREMBA_ROW(2) ZAREMBA_ROW(3) ZAREMBA_ROW(4)
#undef ZAREMBA_ROW
}

void MatmulF32_1x64(const float* w_kn, const float* h, int64_t k, int64_t n, int64_t c, float* y) {
  for (int64_t i = 0; i < 4 && c + 16 * i < n; ++i) {
    const __mmask16 m = LanesLeft(n - c - 16 * i);
    __m512 a = _mm512_setzero_ps();
    const float* w = w_kn + c + 16 * i;
    for (int64_t j = 0; j < k; ++j, w += n)
      a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w), _mm512_set1_ps(h[j]), a);
    _mm512_mask_storeu_ps(y + c + 16 * i, m, a);
  }
}

// Columns [c0, c1) of y for every row: 64 columns at a time, the rows five at a time over them.
void MatmulColumns(const uint32_t* p, const uint32_t* h, int64_t batch, int64_t kp, int64_t n,
                   int64_t c0, int64_t c1, float* y) {
  for (int64_t c = c0; c < c1; c += 64) {
    int64_t b = 0;
    for (; b + 5 <= batch; b += 5) Matmul5x64(p, h + b * kp, kp, n, c, y + b * n);
    for (; b < batch; ++b) Matmul1x64(p, h + b * kp, kp, n, c, y + b * n);
  }
}

void MatmulF32Columns(const float* w, const float* h, int64_t batch, int64_t k, int64_t n,
                      int64_t c0, int64_t c1, float* y) {
  for (int64_t c = c0; c < c1; c += 64) {
    int64_t b = 0;
    for (; b + 5 <= batch; b += 5) MatmulF32_5x64(w, h + b * k, k, n, c, y + b * n);
    for (; b < batch; ++b) MatmulF32_1x64(w, h + b * k, k, n, c, y + b * n);
  }
}

// Runs part(p) for p in [0, parts) on the calling thread and parts - 1 tasks of the pool. Each
// part is taken by whichever thread claims it first, so the call finishes even when the pool's
// threads are busy (or the caller is one of them); the state outlives a task that starts late.
template <typename Part>
void RunParts(ffi::ThreadPool& pool, int64_t parts, Part part) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, parts, &part] {
    for (int64_t p; (p = state->next.fetch_add(1)) < parts;) {
      part(p);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < parts; ++t) {
    // A late task finds no part left and touches only `state`, which it co-owns.
    pool.Schedule([state, parts, work] {
      if (state->next.load() < parts) work();
    });
  }
  work();
  while (state->done.load(std::memory_order_acquire) < parts) _mm_pause();
}

// Runs range(begin, end) over the outputs [0, n), split into parts of at least `min_per_part`
// outputs (one a pool thread at most) whose boundaries are multiples of `multiple` (the kernel's
// block of rows or columns).
template <typename Range>
void RunRanges(ffi::ThreadPool& pool, int64_t n, int64_t min_per_part, int64_t multiple,
               Range range) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t parts = std::max<int64_t>(1, std::min(threads, n / min_per_part));
  const int64_t size = (n / parts + multiple - 1) / multiple * multiple;
  RunParts(pool, parts, [&](int64_t p) {
    range(std::min(p * size, n), p + 1 == parts ? n : std::min((p + 1) * size, n));
  });
}

ffi::Error Matvec(ffi::ThreadPool pool, Bf16Matrix w, F32Vector h, F32Result y) {
  const int64_t n = w.dimensions()[0], k = w.dimensions()[1];
  if (h.dimensions()[0] != k || y->dimensions()[0] != n)
    return ffi::Error::InvalidArgument("zaremba_bf16_matvec: shapes W[N,K], h[K], y[N] do not match");
  const uint16_t* hb = RoundToBf16(h.typed_data(), k);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();
  RunRanges(pool, n, 256, 4, [&](int64_t r0, int64_t r1) { MatvecRows(wp, hb, yp, r0, r1, k); });
  return ffi::Error::Success();
}

ffi::Error Vecmat(ffi::ThreadPool pool, F32Vector h, Bf16Matrix w, F32Result y) {
  const int64_t k = w.dimensions()[0], n = w.dimensions()[1];
  if (h.dimensions()[0] != k || y->dimensions()[0] != n)
    return ffi::Error::InvalidArgument("zaremba_bf16_vecmat: shapes h[K], W[K,N], y[N] do not match");
  const uint16_t* hb = RoundToBf16(h.typed_data(), k);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();
  RunRanges(pool, n, 512, 128,
            [&](int64_t c0, int64_t c1) { VecmatColumns(wp, hb, yp, c0, c1, k, n); });
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::ThreadPool pool, F32Matrix h, Bf16Pairs pairs, F32MatrixResult y) {
  const int64_t batch = h.dimensions()[0], k = h.dimensions()[1];
  const int64_t kp = pairs.dimensions()[0], n = pairs.dimensions()[1];
  if (pairs.dimensions()[2] != 2 || kp != (k + 1) / 2 || y->dimensions()[0] != batch ||
      y->dimensions()[1] != n)
    return ffi::Error::InvalidArgument(
        "zaremba_bf16_matmul: shapes h[B,K], P[(K+1)/2,N,2], y[B,N] do not match");
  const uint32_t* hp = RoundRowsToBf16Pairs(h.typed_data(), batch, k, kp);
  const auto* pp = reinterpret_cast<const uint32_t*>(pairs.typed_data());
  float* yp = y->typed_data();
  RunRanges(pool, n, 256, 64,
            [&](int64_t c0, int64_t c1) { MatmulColumns(pp, hp, batch, kp, n, c0, c1, yp); });
  return ffi::Error::Success();
}

ffi::Error MatvecF32(ffi::ThreadPool pool, F32Matrix w, F32Vector h, F32Result y) {
  const int64_t n = w.dimensions()[0], k = w.dimensions()[1];
  if (h.dimensions()[0] != k || y->dimensions()[0] != n)
    return ffi::Error::InvalidArgument("zaremba_f32_matvec: shapes W[N,K], h[K], y[N] do not match");
  const float* wp = w.typed_data();
  const float* hp = h.typed_data();
  float* yp = y->typed_data();
  RunRanges(pool, n, 256, 4, [&](int64_t r0, int64_t r1) { MatvecRowsF32(wp, hp, yp, r0, r1, k); });
  return ffi::Error::Success();
}

ffi::Error MatmulF32(ffi::ThreadPool pool, F32Matrix h, F32Matrix w, F32MatrixResult y) {
  const int64_t batch = h.dimensions()[0], k = h.dimensions()[1], n = w.dimensions()[1];
  if (w.dimensions()[0] != k || y->dimensions()[0] != batch || y->dimensions()[1] != n)
    return ffi::Error::InvalidArgument("zaremba_f32_matmul: shapes h[B,K], W[K,N], y[B,N] do not match");
  const float* hp = h.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  RunRanges(pool, n, 256, 64,
            [&](int64_t c0, int64_t c1) { MatmulF32Columns(wp, hp, batch, k, n, c0, c1, yp); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZarembaBf16Matvec, Matvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Bf16Matrix>()
                                  .Arg<F32Vector>()
                                  .Ret<F32Vector>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZarembaBf16Vecmat, Vecmat,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Vector>()
                                  .Arg<Bf16Matrix>()
                                  .Ret<F32Vector>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZarembaBf16Matmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<Bf16Pairs>()
                                  .Ret<F32Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZarembaF32Matmul, MatmulF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Matrix>()
                                  .Ret<F32Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZarembaF32Matvec, MatvecF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Vector>()
                                  .Ret<F32Vector>());
