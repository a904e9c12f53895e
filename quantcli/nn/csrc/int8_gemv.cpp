// quantcli's CPU decode kernel for int8 weights: y = (x @ q.T) * scale, with x float or
// bf16 (M small), q int8 (N, K) row-major and one float scale per output row.
//
// Why not PyTorch's `_weight_int8pack_mm`: at decode the weight streams from memory once per
// token, and that kernel reads it at about 60% of the rate a bf16 matmul reads its own
// (measured on a 2-core Xeon), so int8 gained only 1.4-1.6x over bf16 where half the bytes
// promise 2x. This kernel reads four rows at a time and prefetches the next four while it
// multiplies these, which is what keeps the memory busy: 2.5x bf16's time per layer there.
// Everything is multiplied exactly in float32 (int8 and bf16 both fit), summed in float32,
// scaled once per row and rounded once to the activations' dtype.
//
// Built by quantcli.nn.native on first use; one source for AVX-512 and AVX2 machines, the
// instruction set chosen at run time.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace {

constexpr int64_t kRows = 4;     // rows of q multiplied together (and prefetched ahead)
constexpr int64_t kLine = 64;    // bytes of q per row between prefetches
constexpr int64_t kGrain = 16;   // blocks of rows per thread task, at least

enum class Isa { kNone, kAvx2, kAvx512 };

// The widest instruction set this CPU has, or AVX2 where $QUANTCLI_CPU_ISA says "avx2"
// (to test and measure that path on an AVX-512 machine).
Isa detect_isa() {
  __builtin_cpu_init();
  const char* asked = std::getenv("QUANTCLI_CPU_ISA");
  const bool avx2_asked = asked != nullptr && std::string(asked) == "avx2";
  if (!avx2_asked && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx2;
  }
  return Isa::kNone;
}

const Isa kIsa = detect_isa();

// One dot product's tail: the columns past the last whole vector.
inline float dot_tail(const float* x, const int8_t* q, int64_t from, int64_t to) {
  float sum = 0.f;
  for (int64_t k = from; k < to; ++k) sum += x[k] * static_cast<float>(q[k]);
  return sum;
}

__attribute__((target("avx512f,avx512bw,fma"))) inline __m512 widen16(const int8_t* q) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}

// R rows of q against B rows of x (float32), unscaled sums into sums[b * kRows + r]: each
// vector of q is widened once for all B rows of x. The R rows after these are prefetched
// when `prefetch_next`.
template <int64_t R, int64_t B>
__attribute__((target("avx512f,avx512bw,fma"))) void block_avx512(
    const float* x, int64_t K, const int8_t* q, bool prefetch_next, float* sums) {
  const int64_t whole = K / 16 * 16;
  __m512 acc[B][R];
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < whole; k += 16) {
    if (prefetch_next && k % kLine == 0) {
      for (int64_t r = R; r < 2 * R; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + r * K + k), _MM_HINT_T0);
    }
    __m512 w[R];
    for (int64_t r = 0; r < R; ++r) w[r] = widen16(q + r * K + k);
    for (int64_t b = 0; b < B; ++b) {
      const __m512 xv = _mm512_loadu_ps(x + b * K + k);
      for (int64_t r = 0; r < R; ++r) acc[b][r] = _mm512_fmadd_ps(w[r], xv, acc[b][r]);
    }
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < R; ++r)
      sums[b * kRows + r] = _mm512_reduce_add_ps(acc[b][r]) + dot_tail(x + b * K, q + r * K, whole, K);
}

__attribute__((target("avx2,fma"))) inline __m256 widen8(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

__attribute__((target("avx2,fma"))) inline float reduce8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int64_t R, int64_t B>
__attribute__((target("avx2,fma"))) void block_avx2(
    const float* x, int64_t K, const int8_t* q, bool prefetch_next, float* sums) {
  const int64_t whole = K / 8 * 8;
  __m256 acc[B][R];
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < R; ++r) acc[b][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < whole; k += 8) {
    if (prefetch_next && k % kLine == 0) {
      for (int64_t r = R; r < 2 * R; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + r * K + k), _MM_HINT_T0);
    }
    __m256 w[R];
    for (int64_t r = 0; r < R; ++r) w[r] = widen8(q + r * K + k);
    for (int64_t b = 0; b < B; ++b) {
      const __m256 xv = _mm256_loadu_ps(x + b * K + k);
      for (int64_t r = 0; r < R; ++r) acc[b][r] = _mm256_fmadd_ps(w[r], xv, acc[b][r]);
    }
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < R; ++r)
      sums[b * kRows + r] = reduce8(acc[b][r]) + dot_tail(x + b * K, q + r * K, whole, K);
}

// Rows of x taken together: as many as the vector registers hold accumulators for, with
// kRows rows of q (AVX-512 has 32 registers, AVX2 16).
constexpr int64_t kBatch512 = 4;
constexpr int64_t kBatch2 = 2;

// `rows` (kRows or 1) rows of q against all M rows of x, with this CPU's instructions;
// the next block is prefetched while the first rows of x are multiplied.
template <int64_t R>
void block(const float* x, int64_t M, int64_t K, const int8_t* q, bool prefetch_next, float* sums) {
  const int64_t batch = kIsa == Isa::kAvx512 ? kBatch512 : kBatch2;
  int64_t m = 0;
  for (; m + batch <= M; m += batch, prefetch_next = false) {
    if (kIsa == Isa::kAvx512) {
      block_avx512<R, kBatch512>(x + m * K, K, q, prefetch_next, sums + m * kRows);
    } else {
      block_avx2<R, kBatch2>(x + m * K, K, q, prefetch_next, sums + m * kRows);
    }
  }
  for (; m < M; ++m, prefetch_next = false) {
    if (kIsa == Isa::kAvx512) {
      block_avx512<R, 1>(x + m * K, K, q, prefetch_next, sums + m * kRows);
    } else {
      block_avx2<R, 1>(x + m * K, K, q, prefetch_next, sums + m * kRows);
    }
  }
}

template <typename T>
void run(const float* x, int64_t M, int64_t K, const int8_t* q, int64_t N, const float* scale,
         T* out) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, kGrain, [&](int64_t first, int64_t last) {
    float sums[64 * kRows];  // M <= 64, checked by the caller
    for (int64_t b = first; b < last; ++b) {
      const int64_t n = b * kRows;
      const int64_t rows = std::min(kRows, N - n);
      if (rows == kRows) {
        block<kRows>(x, M, K, q + n * K, N - n >= 2 * kRows, sums);
      } else {
        for (int64_t r = 0; r < rows; ++r) block<1>(x, M, K, q + (n + r) * K, false, sums + r);
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t r = 0; r < rows; ++r) {
          out[m * N + n + r] = static_cast<T>(sums[m * kRows + r] * scale[n + r]);
        }
      }
    }
  });
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(kIsa != Isa::kNone, "quantcli::int8_gemv needs AVX2 and FMA");
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "x (M, K) and q (N, K)");
  TORCH_CHECK(x.size(0) <= 64, "quantcli::int8_gemv takes at most 64 rows of x");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous(), "q: contiguous int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == q.size(0), "scale: contiguous float32, one per row of q");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x: float32 or bfloat16");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  const float* xp = xf.const_data_ptr<float>();
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const float* sp = scale.const_data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    run(xp, M, K, qp, N, sp, out.mutable_data_ptr<float>());
  } else {
    run(xp, M, K, qp, N, sp, out.mutable_data_ptr<c10::BFloat16>());
  }
  return out;
}

std::string int8_gemv_isa() {
  return kIsa == Isa::kAvx512 ? "avx512" : kIsa == Isa::kAvx2 ? "avx2" : "";
}

}  // namespace

TORCH_LIBRARY(quantcli, m) {
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("int8_gemv_isa() -> str", &int8_gemv_isa);
}

TORCH_LIBRARY_IMPL(quantcli, CPU, m) { m.impl("int8_gemv", &int8_gemv); }
