// bfloat16 matrix-vector products for XLA's CPU backend, read as bfloat16 (see native.py).
//
//   zaremba_bf16_matvec: y[N] = W[N, K] h[K]   (W^T h for a transposed W_hh: rows are dot products)
//   zaremba_bf16_vecmat: y[N] = h[K] W[K, N]   (h W for W_hh as stored: rows are scaled and added)
//
// W is bfloat16, h and y float32. h is rounded to bfloat16 first, each product of two bfloat16
// numbers is exact in float32 and the sums are float32: the numbers of XLA's bfloat16 dot with a
// float32 result, up to the order of the sums. Built with -mavx512f -mavx512bw -mavx512vl
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

namespace {

// h rounded to bfloat16 (round to nearest even, as XLA's convert), zero-padded to whole 32-lane
// loads; kept per thread so that a call allocates nothing once warm.
const uint16_t* RoundToBf16(const float* h, int64_t k) {
  thread_local std::vector<uint16_t> buffer;
  buffer.assign((k + 31) / 32 * 32, 0);
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(h + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(buffer.data() + j), (__m256i)v);
  }
  if (j < k) {
    const __mmask16 m = (__mmask16)((1u << (k - j)) - 1);
    __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, h + j));
    _mm256_mask_storeu_epi16(buffer.data() + j, m, (__m256i)v);
  }
  return buffer.data();
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

int64_t NumParts(ffi::ThreadPool& pool, int64_t outputs, int64_t min_outputs_per_part) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::max<int64_t>(1, std::min(threads, outputs / min_outputs_per_part));
}

ffi::Error Matvec(ffi::ThreadPool pool, Bf16Matrix w, F32Vector h, F32Result y) {
  const int64_t n = w.dimensions()[0], k = w.dimensions()[1];
  if (h.dimensions()[0] != k || y->dimensions()[0] != n)
    return ffi::Error::InvalidArgument("zaremba_bf16_matvec: shapes W[N,K], h[K], y[N] do not match");
  const uint16_t* hb = RoundToBf16(h.typed_data(), k);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();
  const int64_t parts = NumParts(pool, n, 256);
  const int64_t rows = (n / parts + 3) / 4 * 4;
  RunParts(pool, parts, [&](int64_t p) {
    MatvecRows(wp, hb, yp, std::min(p * rows, n), p + 1 == parts ? n : std::min((p + 1) * rows, n), k);
  });
  return ffi::Error::Success();
}

ffi::Error Vecmat(ffi::ThreadPool pool, F32Vector h, Bf16Matrix w, F32Result y) {
  const int64_t k = w.dimensions()[0], n = w.dimensions()[1];
  if (h.dimensions()[0] != k || y->dimensions()[0] != n)
    return ffi::Error::InvalidArgument("zaremba_bf16_vecmat: shapes h[K], W[K,N], y[N] do not match");
  const uint16_t* hb = RoundToBf16(h.typed_data(), k);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();
  const int64_t parts = NumParts(pool, n, 512);
  const int64_t columns = (n / parts + 127) / 128 * 128;
  RunParts(pool, parts, [&](int64_t p) {
    VecmatColumns(wp, hb, yp, std::min(p * columns, n),
                  p + 1 == parts ? n : std::min((p + 1) * columns, n), k, n);
  });
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
