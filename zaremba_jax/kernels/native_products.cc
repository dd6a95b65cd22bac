// Products for XLA's CPU backend where its own are slow: bfloat16 ones that read the weights as
// bfloat16, and float32 ones of one or a few rows (see native.py). ZAREMBA_KERNELS, at the end,
// lists them.
//
// One source serves both precisions: each kernel is a template over a precision (`Bf16`, `F32`)
// that says how W's elements are loaded, how an element of h is broadcast and how products are
// summed into float32 lanes. In bfloat16 W is bfloat16, h and y float32: h is rounded to bfloat16
// first, each product of two bfloat16 numbers is exact in float32 and the sums are float32 (the
// numbers of XLA's bfloat16 dot with a float32 result, up to the order of the sums), by
// vdpbf16ps; in float32 the products and sums are float32 fused multiply-adds (XLA's float32
// dot's numbers, up to the order of the sums).
//
// The file is built with -mavx512f, what the float32 kernels need; the bfloat16 ones are compiled
// for AVX512-BF16 (and the BW and VL instructions they use) function by function
// (ZAREMBA_BF16), and native.py registers them only on a CPU that has avx512_bf16. The output
// rows or columns are split into parts run on XLA's intra-op thread pool and the calling thread.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The thread pool as a handler's context, so that each handler's binding is read from its
// signature (XLA_FFI_DEFINE_HANDLER_SYMBOL without an explicit binding).
template <>
struct xla::ffi::CtxBinding<xla::ffi::ThreadPool> {
  using Ctx = xla::ffi::ThreadPool;
};

using F32Vector = ffi::Buffer<ffi::F32, 1>;
using F32Result = ffi::ResultBuffer<ffi::F32, 1>;
using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using F32MatrixResult = ffi::ResultBuffer<ffi::F32, 2>;

// Code compiled for the bfloat16 instructions: the precision's operations and the kernels' entry
// points, into which `flatten` inlines the templates (compiled with this target only there).
#define ZAREMBA_BF16 __attribute__((target("avx512bw,avx512vl,avx512bf16")))
#define ZAREMBA_BF16_ENTRY __attribute__((target("avx512bw,avx512vl,avx512bf16"), flatten))
#define ZAREMBA_F32_ENTRY __attribute__((flatten))

namespace {

inline __mmask16 LanesLeft(int64_t left) {
  return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

// k floats rounded to bfloat16 (round to nearest even, as XLA's convert) into out[0 .. k).
ZAREMBA_BF16 void RoundRowToBf16(const float* h, int64_t k, uint16_t* out) {
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
ZAREMBA_BF16 const uint16_t* RoundToBf16(const float* h, int64_t k) {
  thread_local std::vector<uint16_t> buffer;
  buffer.assign((k + 31) / 32 * 32, 0);
  RoundRowToBf16(h, k, buffer.data());
  return buffer.data();
}

// h [B, K] rounded to bfloat16 and zero-padded to even rows: row b's pair p at [b * KP + p].
ZAREMBA_BF16 const uint32_t* RoundRowsToBf16Pairs(const float* h, int64_t batch, int64_t k,
                                                  int64_t kp) {
  thread_local std::vector<uint32_t> buffer;
  buffer.assign(batch * kp, 0);
  for (int64_t b = 0; b < batch; ++b)
    RoundRowToBf16(h + b * k, k, reinterpret_cast<uint16_t*>(buffer.data() + b * kp));
  return buffer.data();
}

// bfloat16: W h reads rows of W 32 bfloat16 lanes at a time against h rounded and padded; h W reads
// W as row pairs, P[K/2, N, 2] (P[p, n] = W[2p, n], W[2p + 1, n]: the operand order of vdpbf16ps),
// one 32-bit pair a lane, against a broadcast pair of h.
struct Bf16 {
  static constexpr ffi::DataType kType = ffi::BF16;
  using Lane = uint16_t;  // W h: one element of a row of W
  using Unit = uint32_t;  // h W: a pair of W's rows (and of h's elements)
  using Vec = __m512bh;
  using Mask = __mmask32;
  static constexpr int64_t kLanes = 32;
  using MatmulWeights = ffi::Buffer<ffi::BF16, 3>;
  static constexpr const char* kMatvecShapes =
      "zaremba_bf16_matvec: shapes W[N,K], h[K], y[N] do not match";
  static constexpr const char* kMatmulShapes =
      "zaremba_bf16_matmul: shapes h[B,K], P[(K+1)/2,N,2], y[B,N] do not match";

  static Mask Tail(int64_t left) { return (Mask)((1ull << left) - 1); }
  ZAREMBA_BF16 static Vec Load(const Lane* p) { return (Vec)_mm512_loadu_si512(p); }
  ZAREMBA_BF16 static Vec LoadTail(Mask m, const Lane* p) {
    return (Vec)_mm512_maskz_loadu_epi16(m, p);
  }
  ZAREMBA_BF16 static Vec LoadTailOfH(Mask, const Lane* h) { return Load(h); }  // h is padded
  ZAREMBA_BF16 static Vec LoadUnits(__mmask16 m, const Unit* p) {
    return (Vec)_mm512_maskz_loadu_epi32(m, p);
  }
  ZAREMBA_BF16 static Vec Broadcast(Unit pair) { return (Vec)_mm512_set1_epi32((int32_t)pair); }
  ZAREMBA_BF16 static __m512 Dot(__m512 a, Vec w, Vec h) { return _mm512_dpbf16_ps(a, w, h); }

  static const Lane* VectorOfH(const float* h, int64_t k) { return RoundToBf16(h, k); }
  static const Unit* RowsOfH(const float* h, int64_t batch, int64_t k, int64_t units) {
    return RoundRowsToBf16Pairs(h, batch, k, units);
  }
  static bool MatchesK(const MatmulWeights& w, int64_t k) {
    return w.dimensions()[2] == 2 && w.dimensions()[0] == (k + 1) / 2;
  }

  // The kernels' entry points, defined below.
  ZAREMBA_BF16_ENTRY static void MatvecRows(const Lane* w, const Lane* h, float* y, int64_t r0,
                                            int64_t r1, int64_t k);
  ZAREMBA_BF16_ENTRY static void MatmulColumns(const Unit* w, const Unit* h, int64_t batch,
                                               int64_t units, int64_t n, int64_t c0, int64_t c1,
                                               float* y);
};

// float32: W's elements and h's as they are, 16 lanes a load.
struct F32 {
  static constexpr ffi::DataType kType = ffi::F32;
  using Lane = float;
  using Unit = float;
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kLanes = 16;
  using MatmulWeights = ffi::Buffer<ffi::F32, 2>;
  static constexpr const char* kMatvecShapes =
      "zaremba_f32_matvec: shapes W[N,K], h[K], y[N] do not match";
  static constexpr const char* kMatmulShapes =
      "zaremba_f32_matmul: shapes h[B,K], W[K,N], y[B,N] do not match";

  static Mask Tail(int64_t left) { return LanesLeft(left); }
  static Vec Load(const Lane* p) { return _mm512_loadu_ps(p); }
  static Vec LoadTail(Mask m, const Lane* p) { return _mm512_maskz_loadu_ps(m, p); }
  static Vec LoadTailOfH(Mask m, const Lane* h) { return _mm512_maskz_loadu_ps(m, h); }
  static Vec LoadUnits(__mmask16 m, const Unit* p) { return _mm512_maskz_loadu_ps(m, p); }
  static Vec Broadcast(Unit x) { return _mm512_set1_ps(x); }
  static __m512 Dot(__m512 a, Vec w, Vec h) { return _mm512_fmadd_ps(w, h, a); }

  static const Lane* VectorOfH(const float* h, int64_t) { return h; }
  static const Unit* RowsOfH(const float* h, int64_t, int64_t, int64_t) { return h; }
  static bool MatchesK(const MatmulWeights& w, int64_t k) { return w.dimensions()[0] == k; }

  ZAREMBA_F32_ENTRY static void MatvecRows(const Lane* w, const Lane* h, float* y, int64_t r0,
                                           int64_t r1, int64_t k);
  ZAREMBA_F32_ENTRY static void MatmulColumns(const Unit* w, const Unit* h, int64_t batch,
                                              int64_t units, int64_t n, int64_t c0, int64_t c1,
                                              float* y);
};

// y[r] = W[r, :] . h for rows [r0, r1): four rows share each load of h.
template <typename P>
void MatvecRows(const typename P::Lane* w, const typename P::Lane* h, float* y, int64_t r0,
                int64_t r1, int64_t k) {
  const int64_t whole = k / P::kLanes * P::kLanes;
  const typename P::Mask tail = P::Tail(k - whole);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const typename P::Lane* w0 = w + r * k;
    const typename P::Lane *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < whole; j += P::kLanes) {
      const typename P::Vec hv = P::Load(h + j);
      a0 = P::Dot(a0, P::Load(w0 + j), hv);
      a1 = P::Dot(a1, P::Load(w1 + j), hv);
      a2 = P::Dot(a2, P::Load(w2 + j), hv);
      a3 = P::Dot(a3, P::Load(w3 + j), hv);
    }
    if (tail) {
      const typename P::Vec hv = P::LoadTailOfH(tail, h + whole);
      a0 = P::Dot(a0, P::LoadTail(tail, w0 + whole), hv);
      a1 = P::Dot(a1, P::LoadTail(tail, w1 + whole), hv);
      a2 = P::Dot(a2, P::LoadTail(tail, w2 + whole), hv);
      a3 = P::Dot(a3, P::LoadTail(tail, w3 + whole), hv);
    }
    y[r] = _mm512_reduce_add_ps(a0);
    y[r + 1] = _mm512_reduce_add_ps(a1);
    y[r + 2] = _mm512_reduce_add_ps(a2);
    y[r + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; r < r1; ++r) {
    const typename P::Lane* w0 = w + r * k;
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t j = 0; j < whole; j += P::kLanes) a0 = P::Dot(a0, P::Load(w0 + j), P::Load(h + j));
    if (tail) a0 = P::Dot(a0, P::LoadTail(tail, w0 + whole), P::LoadTailOfH(tail, h + whole));
    y[r] = _mm512_reduce_add_ps(a0);
  }
}

// y[b0 .. b0 + 5, c .. c + 64] (masked at the matrix's right edge) of h W, W's rows (pairs, in
// bfloat16) `units` long: 20 accumulators in registers, each load of W feeding five rows. Written
// out, not as arrays, which the compiler spills.
template <typename P>
void Matmul5x64(const typename P::Unit* w_kn, const typename P::Unit* h, int64_t units, int64_t n,
                int64_t c, float* y) {
  const __mmask16 m0 = LanesLeft(n - c), m1 = LanesLeft(n - c - 16), m2 = LanesLeft(n - c - 32),
                  m3 = LanesLeft(n - c - 48);
#define ZAREMBA_ROW(r) __m512 a##r##0 = _mm512_setzero_ps(), a##r##1 = a##r##0, a##r##2 = a##r##0, \
                       a##r##3 = a##r##0;
  ZAREMBA_ROW(0) ZAREMBA_ROW(1) ZAREMBA_ROW(2) ZAREMBA_ROW(3) ZAREMBA_ROW(4)
#undef ZAREMBA_ROW
  const typename P::Unit* w = w_kn + c;
  for (int64_t j = 0; j < units; ++j, w += n) {
    const typename P::Vec w0 = P::LoadUnits(m0, w), w1 = P::LoadUnits(m1, w + 16),
                          w2 = P::LoadUnits(m2, w + 32), w3 = P::LoadUnits(m3, w + 48);
#define ZAREMBA_ROW(r)                                          \
  {                                                             \
    const typename P::Vec hr = P::Broadcast(h[r * units + j]);  \
    a##r##0 = P::Dot(a##r##0, w0, hr);                          \
    a##r##1 = P::Dot(a##r##1, w1, hr);                          \
    a##r##2 = P::Dot(a##r##2, w2, hr);                          \
    a##r##3 = P::Dot(a##r##3, w3, hr);                          \
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
template <typename P>
void Matmul1x64(const typename P::Unit* w_kn, const typename P::Unit* h, int64_t units, int64_t n,
                int64_t c, float* y) {
  for (int64_t i = 0; i < 4 && c + 16 * i < n; ++i) {
    const __mmask16 m = LanesLeft(n - c - 16 * i);
    __m512 a = _mm512_setzero_ps();
    const typename P::Unit* w = w_kn + c + 16 * i;
    for (int64_t j = 0; j < units; ++j, w += n)
      a = P::Dot(a, P::LoadUnits(m, w), P::Broadcast(h[j]));
    _mm512_mask_storeu_ps(y + c + 16 * i, m, a);
  }
}

// Columns [c0, c1) of y for every row: 64 columns at a time, the rows five at a time over them.
template <typename P>
void MatmulColumns(const typename P::Unit* w, const typename P::Unit* h, int64_t batch,
                   int64_t units, int64_t n, int64_t c0, int64_t c1, float* y) {
  for (int64_t c = c0; c < c1; c += 64) {
    int64_t b = 0;
    for (; b + 5 <= batch; b += 5) Matmul5x64<P>(w, h + b * units, units, n, c, y + b * n);
    for (; b < batch; ++b) Matmul1x64<P>(w, h + b * units, units, n, c, y + b * n);
  }
}

void Bf16::MatvecRows(const Lane* w, const Lane* h, float* y, int64_t r0, int64_t r1, int64_t k) {
  ::MatvecRows<Bf16>(w, h, y, r0, r1, k);
}
void Bf16::MatmulColumns(const Unit* w, const Unit* h, int64_t batch, int64_t units, int64_t n,
                         int64_t c0, int64_t c1, float* y) {
  ::MatmulColumns<Bf16>(w, h, batch, units, n, c0, c1, y);
}
void F32::MatvecRows(const Lane* w, const Lane* h, float* y, int64_t r0, int64_t r1, int64_t k) {
  ::MatvecRows<F32>(w, h, y, r0, r1, k);
}
void F32::MatmulColumns(const Unit* w, const Unit* h, int64_t batch, int64_t units, int64_t n,
                        int64_t c0, int64_t c1, float* y) {
  ::MatmulColumns<F32>(w, h, batch, units, n, c0, c1, y);
}

inline __m512 Bf16ToF32(__m256i x) {  // 16 bfloat16 -> 16 float32 (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

inline __m512 Bf16Broadcast(uint16_t x) {  // one bfloat16 -> 16 lanes of float32
  return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int32_t>(uint32_t{x} << 16)));
}

// The bfloat16 h W with W as stored: y[c] = sum_j h[j] W[j, c] for columns [c0, c1), 128 columns
// at a time held in registers while the loop runs down the rows.
ZAREMBA_BF16 void VecmatColumns(const uint16_t* w, const uint16_t* h, float* y, int64_t c0,
                                int64_t c1, int64_t k, int64_t n) {
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

// y[N] = W[N, K] h[K]: each output a dot product of a row of W with h.
template <typename P>
ffi::Error Matvec(ffi::ThreadPool pool, ffi::Buffer<P::kType, 2> w, F32Vector h, F32Result y) {
  const int64_t n = w.dimensions()[0], k = w.dimensions()[1];
  if (h.dimensions()[0] != k || y->dimensions()[0] != n)
    return ffi::Error::InvalidArgument(P::kMatvecShapes);
  const typename P::Lane* hp = P::VectorOfH(h.typed_data(), k);
  const auto* wp = reinterpret_cast<const typename P::Lane*>(w.typed_data());
  float* yp = y->typed_data();
  RunRanges(pool, n, 256, 4, [&](int64_t r0, int64_t r1) { P::MatvecRows(wp, hp, yp, r0, r1, k); });
  return ffi::Error::Success();
}

// y[B, N] = h[B, K] W[K, N]: each output column a sum of W's rows scaled by h's elements.
template <typename P>
ffi::Error Matmul(ffi::ThreadPool pool, F32Matrix h, typename P::MatmulWeights w,
                  F32MatrixResult y) {
  const int64_t batch = h.dimensions()[0], k = h.dimensions()[1];
  const int64_t units = w.dimensions()[0], n = w.dimensions()[1];
  if (!P::MatchesK(w, k) || y->dimensions()[0] != batch || y->dimensions()[1] != n)
    return ffi::Error::InvalidArgument(P::kMatmulShapes);
  const typename P::Unit* hp = P::RowsOfH(h.typed_data(), batch, k, units);
  const auto* wp = reinterpret_cast<const typename P::Unit*>(w.typed_data());
  float* yp = y->typed_data();
  RunRanges(pool, n, 256, 64, [&](int64_t c0, int64_t c1) {
    P::MatmulColumns(wp, hp, batch, units, n, c0, c1, yp);
  });
  return ffi::Error::Success();
}

// y[N] = h[K] W[K, N] in bfloat16, W as stored.
ffi::Error Vecmat(ffi::ThreadPool pool, F32Vector h, ffi::Buffer<ffi::BF16, 2> w, F32Result y) {
  const int64_t k = w.dimensions()[0], n = w.dimensions()[1];
  if (h.dimensions()[0] != k || y->dimensions()[0] != n)
    return ffi::Error::InvalidArgument(
        "zaremba_bf16_vecmat: shapes h[K], W[K,N], y[N] do not match");
  const uint16_t* hb = RoundToBf16(h.typed_data(), k);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();
  RunRanges(pool, n, 512, 128,
            [&](int64_t c0, int64_t c1) { VecmatColumns(wp, hb, yp, c0, c1, k, n); });
  return ffi::Error::Success();
}

}  // namespace

// The kernels, each named once: its FFI target (also the C symbol native.py registers), the
// precision whose CPU features it needs (native.py registers it only where the CPU has them), and
// its handler. The bfloat16 ones take W as bfloat16, h and y as float32:
//   zaremba_bf16_matvec: y[N] = W[N, K] h[K]       (W^T h for a transposed W_hh)
//   zaremba_bf16_vecmat: y[N] = h[K] W[K, N]       (h W for W_hh as stored)
//   zaremba_bf16_matmul: y[B, N] = h[B, K] W[K, N], W as row pairs P[(K+1)/2, N, 2]
//   zaremba_f32_matvec:  y[N] = W[N, K] h[K]
//   zaremba_f32_matmul:  y[B, N] = h[B, K] W[K, N] (a few rows: XLA's float32 product of an
//                        evaluation step's shapes runs at half this kernel's rate)
#define ZAREMBA_KERNELS(X)                       \
  X(zaremba_bf16_matvec, bfloat16, Matvec<Bf16>) \
  X(zaremba_bf16_vecmat, bfloat16, Vecmat)       \
  X(zaremba_bf16_matmul, bfloat16, Matmul<Bf16>) \
  X(zaremba_f32_matvec, float32, Matvec<F32>)    \
  X(zaremba_f32_matmul, float32, Matmul<F32>)

#define ZAREMBA_DEFINE_HANDLER(target, precision, handler) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(target, handler);
ZAREMBA_KERNELS(ZAREMBA_DEFINE_HANDLER)

// "target precision" lines, one a kernel, for native.py.
#define ZAREMBA_LIST_KERNEL(target, precision, handler) #target " " #precision "\n"
extern "C" const char* zaremba_kernels() { return ZAREMBA_KERNELS(ZAREMBA_LIST_KERNEL); }
