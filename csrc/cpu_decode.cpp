// Twilight's decode step on the CPU, fused: what the torch reference does in ~150 small tensor ops per layer,
// in two calls (the `cpu` backend, twilight/kernels/cpu/__init__.py; built just in time with the host compiler).
//
// update_token: a decode token's derived structures (int4 codes in the cache's tile layout, scale and mid, Quest's
//   page bounds widened outward to bf16), exactly as twilight.cache.LayerCache._update_one defines them.
// top_p_attend: per (batch, kv-head) row, each query head's exact top-p over its kv-head's candidates (the
//   semantics of twilight.prune.top_p_mask), their union, and decode attention over the union with the exact K/V.
// quest_page_scores: Quest's page upper bounds, max over each kv-head's query heads (twilight.select's
//   quest_page_scores), from float32 or bfloat16 bounds, in one pass over the bounds.
// int4_scores: the candidates' estimated q.k from the packed int4 keys (twilight.estimate's "int4" estimator:
//   the dequantized keys times q, in float32), eight page-aligned consecutive candidates at a time.
//
// The two scoring loops are written with GCC/Clang vector extensions (eight float lanes): the build's
// -march=native lowers them to the host's vector unit (AVX2 + FMA here) without intrinsics.
//
// float32 caches only (the CPU's dtype); the backend sends other dtypes to the torch reference. The four are torch
// operators, torch.ops.twilight_cpu.* (the schemas at the end), so that torch.compile captures them.
#include <ATen/ATen.h>
#include <torch/library.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr float kFlush = -87.0f;  // exp(z) is subnormal below: flushed to 0 (twilight._tensors.exp_weights)

// exp(z) for z <= 0, 0 below kFlush: Cody-Waite reduction by ln 2 and a degree-7 Taylor polynomial on
// |r| <= ln(2)/2 (relative error below 1e-7, about one float ulp). Branch-free, so the compiler vectorizes the
// loops that call it (std::exp is a scalar library call: it made the softmax of a 8k-candidate row the slowest
// part of the step). The build passes -fno-trapping-math, without which a compiler may not evaluate both sides
// of a floating-point select, and so would not vectorize these loops.
inline float exp_nonpos(float z) {
  const bool live = z >= kFlush;
  const float zc = live ? z : kFlush;  // -inf and negligible weights: computed at the floor, then zeroed
  const float n = std::floor(zc * 1.44269504088896341f + 0.5f);
  float r = zc - n * 0.693359375f;  // ln 2 split in two (the first part has 9 bits: n * it is exact)
  r = r + n * 2.12194440e-4f;
  float q = 1.0f / 5040.0f;
  q = q * r + 1.0f / 720.0f;
  q = q * r + 1.0f / 120.0f;
  q = q * r + 1.0f / 24.0f;
  q = q * r + 1.0f / 6.0f;
  q = q * r + 0.5f;
  q = q * r + 1.0f;
  q = q * r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // n in [-126, 0]
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return live ? q * two_n : 0.0f;
}

// bf16 neighbours of a float32 by its bit pattern: rounded up and down (directed, so bounds stay bounds).
inline float bf16_bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline void bf16_outward(float x, float* up, float* down) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  uint32_t trunc = b & 0xFFFF0000u;
  uint32_t mag_up = (b & 0xFFFFu) ? trunc + 0x10000u : trunc;
  bool nonneg = !(b >> 31);
  *up = bf16_bits_to_float(nonneg ? mag_up : trunc);
  *down = bf16_bits_to_float(nonneg ? trunc : mag_up);
}

inline uint16_t float_to_bf16_exact(float x) {  // x already a bf16 value
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return static_cast<uint16_t>(b >> 16);
}

inline float bf16_to_float(uint16_t h) { return bf16_bits_to_float(static_cast<uint32_t>(h) << 16); }

// Reductions over a row in independent lanes: without -ffast-math a compiler may not reorder a single running sum
// or maximum, so it would not vectorize one; 8 or 16 running partial results it can.
inline float max_scaled(const float* x, int64_t n, float sc) {
  constexpr int L = 16;
  float lanes[L];
  for (int j = 0; j < L; ++j) lanes[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) {
      const float y = x[i + j] * sc;
      lanes[j] = lanes[j] < y ? y : lanes[j];
    }
  }
  float m = -std::numeric_limits<float>::infinity();
  for (; i < n; ++i) m = std::max(m, x[i] * sc);
  for (int j = 0; j < L; ++j) m = std::max(m, lanes[j]);
  return m;
}

// sum of w[i] < cut ? w[i] : 0 (cut = +inf: the whole sum), in double
inline double sum_below(const float* w, int64_t n, float cut) {
  constexpr int L = 8;
  double lanes[L] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) lanes[j] += w[i + j] < cut ? static_cast<double>(w[i + j]) : 0.0;
  }
  double total = 0.0;
  for (; i < n; ++i) total += w[i] < cut ? static_cast<double>(w[i]) : 0.0;
  for (int j = 0; j < L; ++j) total += lanes[j];
  return total;
}

// Eight float lanes, and the byte and bf16 vectors that widen to them.
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));
typedef int32_t v8i32 __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Widening conversions: GCC scalarizes __builtin_convertvector from byte and 16-bit lanes, so on AVX2 these use
// the zero-extending loads (vpmovzx) directly; elsewhere the vector-extension form.
inline v8f load8(const uint16_t* p) {  // eight bf16 values, widened exactly
#ifdef __AVX2__
  const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return reinterpret_cast<v8f>(_mm256_castsi256_ps(w));
#else
  v8u16 h;
  std::memcpy(&h, p, sizeof h);
  const v8u32 w = __builtin_convertvector(h, v8u32) << 16;
  return reinterpret_cast<const v8f&>(w);
#endif
}

inline v8f nibbles8(const uint8_t* p, int shift) {  // eight bytes' nibbles at `shift` (0 or 4), as floats
#ifdef __AVX2__
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i c = _mm256_and_si256(_mm256_srl_epi32(w, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(15));
  return reinterpret_cast<v8f>(_mm256_cvtepi32_ps(c));
#else
  v8u8 b;
  std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector((__builtin_convertvector(b, v8i32) >> shift) & 15, v8f);
#endif
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t h) { return bf16_to_float(h); }

inline float hsum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// Quest's bound for NG query heads and NP pages at once: s[p][g] = sum_d q[g][d] * (q[g][d] > 0 ? max_d : min_d)
// (= sum_d max(q_d max_d, q_d min_d), one multiply-add per channel instead of two), with each page's bounds
// [max (D) | min (D)]. Several pages share each q load and give the multiply-adds independent chains.
template <int NG, int NP, typename T>
inline void quest_dots(const float* q, const T* const* b, int64_t D, float (*s)[4]) {
  v8f acc[NP][NG] = {};
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    v8f hi[NP], lo[NP];
    for (int p = 0; p < NP; ++p) {
      hi[p] = load8(b[p] + i);
      lo[p] = load8(b[p] + D + i);
    }
    for (int g = 0; g < NG; ++g) {
      const v8f qv = load8(q + g * D + i);
      const auto pos = qv > 0.0f;  // all-ones lanes where q > 0
      for (int p = 0; p < NP; ++p) acc[p][g] += qv * (pos ? hi[p] : lo[p]);
    }
  }
  for (int p = 0; p < NP; ++p) {
    for (int g = 0; g < NG; ++g) {
      float tail = 0.0f;
      for (int64_t j = i; j < D; ++j) {
        const float x = q[g * D + j];
        tail += x * to_float(x > 0.0f ? b[p][j] : b[p][D + j]);
      }
      s[p][g] = hsum(acc[p][g]) + tail;
    }
  }
}

template <int NP, typename T>
inline void quest_pages(const float* q, int64_t G, const T* const* b, int64_t D, float* best) {
  float s[NP][4];
  for (int p = 0; p < NP; ++p) best[p] = -std::numeric_limits<float>::infinity();
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const float* qg = q + g0 * D;
    const int64_t ng = std::min<int64_t>(4, G - g0);
    switch (ng) {
      case 4: quest_dots<4, NP>(qg, b, D, s); break;
      case 3: quest_dots<3, NP>(qg, b, D, s); break;
      case 2: quest_dots<2, NP>(qg, b, D, s); break;
      default: quest_dots<1, NP>(qg, b, D, s); break;
    }
    for (int p = 0; p < NP; ++p)
      for (int64_t g = 0; g < ng; ++g) best[p] = std::max(best[p], s[p][g]);
  }
}

// One (batch, kv-head) row of Quest scores: for each page, the max over the G query heads of its bound.
template <typename T>
void quest_row(const float* q, int64_t G, const T* bounds, int64_t n_pages, int64_t D, float* out) {
  int64_t p0 = 0;
  for (; p0 + 2 <= n_pages; p0 += 2) {
    const T* b[2] = {bounds + p0 * 2 * D, bounds + (p0 + 1) * 2 * D};
    quest_pages<2>(q, G, b, D, out + p0);
  }
  if (p0 < n_pages) {
    const T* b[1] = {bounds + p0 * 2 * D};
    quest_pages<1>(q, G, b, D, out + p0);
  }
}

// acc[g][j] += q[g] . codes of eight consecutive tokens (bytes `half` apart per channel, nibble at `shift`).
template <int NG>
inline void int4_chunk(const float* q, int64_t D, const uint8_t* base, int64_t half, int shift, v8f* out) {
  v8f acc[NG] = {};  // local, so that the accumulators stay in registers
  for (int64_t d = 0; d < D; ++d) {
    const v8f code = nibbles8(base + d * half, shift);
    for (int g = 0; g < NG; ++g) acc[g] += q[g * D + d] * code;
  }
  for (int g = 0; g < NG; ++g) out[g] = acc[g];
}

// The same for sixteen consecutive tokens (a whole 16-token page): one 16-byte load per channel, and each
// query value broadcast once for both halves.
template <int NG>
inline void int4_chunk16(const float* q, int64_t D, const uint8_t* base, int64_t half, int shift, v8f* lo_out,
                         v8f* hi_out) {
  v8f lo[NG] = {}, hi[NG] = {};
  for (int64_t d = 0; d < D; ++d) {
    const v8f c0 = nibbles8(base + d * half, shift);
    const v8f c1 = nibbles8(base + d * half + 8, shift);
    for (int g = 0; g < NG; ++g) {
      const float x = q[g * D + d];
      lo[g] += x * c0;
      hi[g] += x * c1;
    }
  }
  for (int g = 0; g < NG; ++g) {
    lo_out[g] = lo[g];
    hi_out[g] = hi[g];
  }
}

// logits[g][t] = q[g] . k[rows[t]] * scale for NG query heads and NT keys at once (NG * NT independent chains,
// each key row loaded once for the group).
template <int NG, int NT>
inline void key_dots(const float* q, const float* const* k, int64_t D, float (*out)[2]) {
  v8f acc[NT][NG] = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    v8f kv[NT];
    for (int t = 0; t < NT; ++t) kv[t] = load8(k[t] + d);
    for (int g = 0; g < NG; ++g) {
      const v8f qv = load8(q + g * D + d);
      for (int t = 0; t < NT; ++t) acc[t][g] += qv * kv[t];
    }
  }
  for (int g = 0; g < NG; ++g) {
    for (int t = 0; t < NT; ++t) {
      float tail = 0.0f;
      for (int64_t j = d; j < D; ++j) tail += q[g * D + j] * k[t][j];
      out[g][t] = hsum(acc[t][g]) + tail;
    }
  }
}

template <int NT>
inline void group_dots(const float* q, int64_t G, const float* const* k, int64_t D, float (*out)[2]) {
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    switch (std::min<int64_t>(4, G - g0)) {
      case 4: key_dots<4, NT>(q + g0 * D, k, D, out + g0); break;
      case 3: key_dots<3, NT>(q + g0 * D, k, D, out + g0); break;
      case 2: key_dots<2, NT>(q + g0 * D, k, D, out + g0); break;
      default: key_dots<1, NT>(q + g0 * D, k, D, out + g0); break;
    }
  }
}

// logits [G, nt]: the group's scaled q.k over the key rows kr[rows[t]], two keys at a time.
void group_key_dots(const float* q, int64_t G, const float* kr, const int32_t* rows, int64_t nt, int64_t D,
                    float scale, float* logits) {
  std::vector<float> buf(2 * G);
  float (*out)[2] = reinterpret_cast<float (*)[2]>(buf.data());
  int64_t t = 0;
  for (; t + 2 <= nt; t += 2) {
    const float* k[2] = {kr + static_cast<int64_t>(rows[t]) * D, kr + static_cast<int64_t>(rows[t + 1]) * D};
    group_dots<2>(q, G, k, D, out);
    for (int64_t g = 0; g < G; ++g) {
      logits[g * nt + t] = out[g][0] * scale;
      logits[g * nt + t + 1] = out[g][1] * scale;
    }
  }
  if (t < nt) {
    const float* k[1] = {kr + static_cast<int64_t>(rows[t]) * D};
    group_dots<1>(q, G, k, D, out);
    for (int64_t g = 0; g < G; ++g) logits[g * nt + t] = out[g][0] * scale;
  }
}

}  // namespace

// q: [B, Hq, D] f32; bounds: [B, H, cap/page, 2, D] f32 or bf16 ([max | min] per page); start: [B] i32.
// Each sequence's pages are cut from its first valid token: page p of sequence b holds positions
// [p * page_size + start[b] % page_size, ...) (twilight.cache).
// Returns [B, H, n_pages] f32: per page, max over the kv-head's query heads of sum_d max(q_d max_d, q_d min_d);
// -inf for pages holding no valid position (before start / page_size, or starting at or past `length`).
at::Tensor quest_page_scores(const at::Tensor& q, const at::Tensor& bounds, const at::Tensor& start,
                             int64_t n_pages, int64_t page_size, int64_t length) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(), "quest_page_scores: q must be contiguous float32");
  TORCH_CHECK(bounds.is_contiguous() && bounds.dim() == 5, "quest_page_scores: bounds must be contiguous [B, H, P, 2, D]");
  TORCH_CHECK(start.scalar_type() == at::kInt, "quest_page_scores: start must be int32");
  const int64_t B = bounds.size(0), H = bounds.size(1), cap_pages = bounds.size(2), D = bounds.size(4);
  const int64_t G = q.size(1) / H, n = 2 * D;
  TORCH_CHECK(n_pages <= cap_pages && q.size(2) == D, "quest_page_scores: shapes do not match");
  auto out = at::empty({B, H, n_pages}, q.options());
  const float* qp = q.data_ptr<float>();
  const int32_t* st = start.data_ptr<int32_t>();
  const bool bf16 = bounds.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || bounds.scalar_type() == at::kFloat, "quest_page_scores: bounds must be float32 or bfloat16");
  for (int64_t r = 0; r < B * H; ++r) {
    const float* qr = qp + r * G * D;  // query heads h * G .. h * G + G - 1 of batch b
    float* o = out.data_ptr<float>() + r * n_pages;
    if (bf16) {
      const uint16_t* b = reinterpret_cast<const uint16_t*>(bounds.data_ptr<at::BFloat16>()) + r * cap_pages * n;
      quest_row(qr, G, b, n_pages, D, o);
    } else {
      quest_row(qr, G, bounds.data_ptr<float>() + r * cap_pages * n, n_pages, D, o);
    }
    const int64_t s0 = st[r / H], offset = s0 % page_size;
    for (int64_t p = 0; p < n_pages; ++p) {
      if (p < s0 / page_size || p * page_size + offset >= length) o[p] = -std::numeric_limits<float>::infinity();
    }
  }
  return out;
}

// q: [B, Hq, D] f32; packed: [B, H, cap, D/2] u8 in the tiled layout of `block` tokens (twilight.quant);
// qparams: [B, H, cap, 2] f32 (scale, mid); cand: [B, H, K] i32 positions; counts: [B, H] i32.
// Returns [B, Hq, K] f32: sum_d q_d ((code - 8) scale + mid) per candidate, -inf at slots >= counts.
at::Tensor int4_scores(const at::Tensor& q, const at::Tensor& packed, const at::Tensor& qparams,
                       const at::Tensor& cand, const at::Tensor& counts, int64_t block) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(), "int4_scores: q must be contiguous float32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "int4_scores: packed must be uint8");
  TORCH_CHECK(qparams.scalar_type() == at::kFloat && qparams.is_contiguous(), "int4_scores: qparams must be float32");
  TORCH_CHECK(cand.scalar_type() == at::kInt && cand.is_contiguous() && counts.scalar_type() == at::kInt,
              "int4_scores: cand and counts must be int32");
  TORCH_CHECK(block == 32 || block == 64, "int4_scores: block must be 32 or 64");
  const int64_t B = packed.size(0), H = packed.size(1), cap = packed.size(2), D = 2 * packed.size(3);
  const int64_t G = q.size(1) / H, K = cand.size(2), half = block / 2;
  TORCH_CHECK(G <= 64, "int4_scores: at most 64 query heads per kv-head");
  auto out = at::empty({B, H * G, K}, q.options());
  const float* qp = q.data_ptr<float>();
  const int32_t* cp = cand.data_ptr<int32_t>();
  const int32_t* cnt = counts.data_ptr<int32_t>();
  const float* par = qparams.data_ptr<float>();
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  std::vector<double> qsum(G);
  for (int64_t r = 0; r < B * H; ++r) {
    const float* qr = qp + r * G * D;
    for (int64_t g = 0; g < G; ++g) {
      double s = 0.0;
      for (int64_t d = 0; d < D; ++d) s += qr[g * D + d];
      qsum[g] = s;
    }
    const int32_t* idx = cp + r * K;
    const int64_t count = std::min<int64_t>(cnt[r], K);
    const uint8_t* rowp = pk + r * cap * (D / 2);
    const float* rpar = par + r * cap * 2;
    float* o = out.data_ptr<float>() + r * G * K;
    auto consecutive = [idx](int64_t s, int64_t n) {  // slots s .. s+n-1 hold t, t+1, ..., t aligned to n
      return idx[s] % n == 0 && idx[s + n - 1] == idx[s] + n - 1 &&
             std::equal(idx + s + 1, idx + s + n, idx + s, [](int32_t a, int32_t b) { return a == b + 1; });
    };
    for (int64_t s0 = 0; s0 < count;) {
      const int64_t t0 = idx[s0];
      const int64_t c = t0 % block;
      const uint8_t* base = rowp + (t0 - c) * (D / 2) + (c % half);
      const int shift = c < half ? 0 : 4;
      float dots[16 * 64];  // [g][j]: q[g] . codes (as 0..15) of slot s0 + j
      int64_t nj;
      if (s0 + 16 <= count && consecutive(s0, 16)) {  // a whole page
        nj = 16;
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
          v8f lo[4] = {}, hi[4] = {};
          const int64_t ng = std::min<int64_t>(4, G - g0);
          const float* qg = qr + g0 * D;
          switch (ng) {
            case 4: int4_chunk16<4>(qg, D, base, half, shift, lo, hi); break;
            case 3: int4_chunk16<3>(qg, D, base, half, shift, lo, hi); break;
            case 2: int4_chunk16<2>(qg, D, base, half, shift, lo, hi); break;
            default: int4_chunk16<1>(qg, D, base, half, shift, lo, hi); break;
          }
          for (int64_t g = 0; g < ng; ++g)
            for (int j = 0; j < 8; ++j) {
              dots[(g0 + g) * 16 + j] = lo[g][j];
              dots[(g0 + g) * 16 + 8 + j] = hi[g][j];
            }
        }
      } else if (s0 + 8 <= count && consecutive(s0, 8)) {  // eight aligned tokens
        nj = 8;
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
          v8f acc[4] = {};
          const int64_t ng = std::min<int64_t>(4, G - g0);
          const float* qg = qr + g0 * D;
          switch (ng) {
            case 4: int4_chunk<4>(qg, D, base, half, shift, acc); break;
            case 3: int4_chunk<3>(qg, D, base, half, shift, acc); break;
            case 2: int4_chunk<2>(qg, D, base, half, shift, acc); break;
            default: int4_chunk<1>(qg, D, base, half, shift, acc); break;
          }
          for (int64_t g = 0; g < ng; ++g)
            for (int j = 0; j < 8; ++j) dots[(g0 + g) * 16 + j] = acc[g][j];
        }
      } else {  // one token
        nj = 1;
        for (int64_t g = 0; g < G; ++g) {
          float acc = 0.0f;
          for (int64_t d = 0; d < D; ++d) acc += qr[g * D + d] * static_cast<float>((base[d * half] >> shift) & 15);
          dots[g * 16] = acc;
        }
      }
      for (int64_t j = 0; j < nj; ++j) {
        const int64_t t = idx[s0 + j];
        const float scale = rpar[t * 2], mid = rpar[t * 2 + 1];
        for (int64_t g = 0; g < G; ++g) {
          // sum_d q_d (code_d - 8) scale + mid sum_d q_d
          o[g * K + s0 + j] = static_cast<float>((dots[g * 16 + j] - 8.0 * qsum[g]) * scale + mid * qsum[g]);
        }
      }
      s0 += nj;
    }
    for (int64_t g = 0; g < G; ++g) std::fill(o + g * K + count, o + (g + 1) * K, kNegInf);
  }
  return out;
}

// k: [B, H, cap, D] f32 (read); written in place, each None (or empty) where the cache keeps none: k_int4
// [B, H, cap, D/2] u8, k_qparams [B, H, cap, 2] f32, page_bounds [B, H, cap/page, 2, D] f32 or bf16; start: [B]
// i32, each sequence's first valid position (its pages are cut from there: pos is in page
// (pos - start % page_size) / page_size).
void update_token(const at::Tensor& k, const std::optional<at::Tensor>& k_int4_opt,
                  const std::optional<at::Tensor>& k_qparams_opt, const std::optional<at::Tensor>& page_bounds_opt,
                  const at::Tensor& start, int64_t pos, int64_t page_size, int64_t block) {
  TORCH_CHECK(k.scalar_type() == at::kFloat && k.is_contiguous(), "update_token: k must be contiguous float32");
  const int64_t B = k.size(0), H = k.size(1), cap = k.size(2), D = k.size(3);
  const float* kp = k.data_ptr<float>();
  const at::Tensor none;
  const at::Tensor& k_int4 = k_int4_opt.has_value() ? *k_int4_opt : none;
  const at::Tensor& k_qparams = k_qparams_opt.has_value() ? *k_qparams_opt : none;
  const at::Tensor& page_bounds = page_bounds_opt.has_value() ? *page_bounds_opt : none;
  const bool quant = k_int4.defined() && k_int4.numel() > 0;
  const bool bounds = page_bounds.defined() && page_bounds.numel() > 0;
  TORCH_CHECK(!quant || (k_qparams.defined() && k_qparams.numel() > 0), "update_token: k_int4 without k_qparams");
  const int64_t half = block / 2;
  for (int64_t r = 0; r < B * H; ++r) {
    const float* x = kp + (r * cap + pos) * D;
    if (quant) {
      float lo = x[0], hi = x[0];
      for (int64_t d = 1; d < D; ++d) {
        lo = std::min(lo, x[d]);
        hi = std::max(hi, x[d]);
      }
      volatile float range = hi - lo;  // the reference's float32 steps, no contraction into fused multiply-adds
      volatile float scale = std::max(range / 15.0f, 1e-8f);
      volatile float eight_scale = 8.0f * scale;
      volatile float mid = lo + eight_scale;
      float* qp = k_qparams.data_ptr<float>() + (r * cap + pos) * 2;
      qp[0] = scale;
      qp[1] = mid;
      uint8_t* tile = k_int4.data_ptr<uint8_t>() + r * cap * (D / 2) + (pos - pos % block) * (D / 2);
      const int64_t c = pos % block;
      for (int64_t d = 0; d < D; ++d) {
        volatile float centred = x[d] - mid;
        volatile float ratio = centred / scale;
        float code = std::nearbyint(ratio + 8.0f);  // round half to even (the default rounding mode), as torch
        code = std::min(std::max(code, 0.0f), 15.0f);
        uint8_t* byte = tile + d * half + (c % half);
        if (c < half) {
          *byte = static_cast<uint8_t>(code);  // the high nibble belongs to a later position
        } else {
          *byte = static_cast<uint8_t>(*byte | (static_cast<uint8_t>(code) << 4));
        }
      }
    }
    if (bounds) {
      TORCH_CHECK(start.scalar_type() == at::kInt && start.numel() == B, "update_token: start must be [B] int32");
      const int64_t pages = cap / page_size, page = (pos - start.data_ptr<int32_t>()[r / H] % page_size) / page_size;
      if (page_bounds.scalar_type() == at::kFloat) {
        float* pb = page_bounds.data_ptr<float>() + (r * pages + page) * 2 * D;
        for (int64_t d = 0; d < D; ++d) {
          pb[d] = std::max(pb[d], x[d]);
          pb[D + d] = std::min(pb[D + d], x[d]);
        }
      } else {
        TORCH_CHECK(page_bounds.scalar_type() == at::kBFloat16, "update_token: bounds must be float32 or bfloat16");
        uint16_t* pb = reinterpret_cast<uint16_t*>(page_bounds.data_ptr<at::BFloat16>()) + (r * pages + page) * 2 * D;
        for (int64_t d = 0; d < D; ++d) {
          float up, down;
          bf16_outward(x[d], &up, &down);
          pb[d] = float_to_bf16_exact(std::max(bf16_to_float(pb[d]), up));
          pb[D + d] = float_to_bf16_exact(std::min(bf16_to_float(pb[D + d]), down));
        }
      }
    }
  }
}

// scores: [B, Hq, K] f32 raw q.k of the candidates; cand: [B, H, K] i32 positions; counts: [B, H] i32;
// q: [B, Hq, D] f32; k, v: [B, H, cap, D] f32. Returns out [B, Hq, D] f32, q_counts [B, Hq] i32,
// kept [B, H, W] i32 (each row's union of kept positions, ascending by candidate slot, padded with the row's
// first kept position or 0) and kv_counts [B, H] i32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> top_p_attend(
    const at::Tensor& scores, const at::Tensor& cand, const at::Tensor& counts, double p, double scale,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::optional<int64_t> kept_width) {
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.is_contiguous(), "scores must be contiguous float32");
  TORCH_CHECK(!kept_width.has_value() || *kept_width >= cand.size(2),
              "kept_width must be at least the candidates' width (a union never holds more)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "q, k, v must be float32");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  const int64_t B = scores.size(0), Hq = scores.size(1), K = scores.size(2);
  const int64_t H = cand.size(1), G = Hq / H, cap = k.size(2), D = k.size(3);
  auto cand_c = cand.contiguous();
  auto counts_c = counts.contiguous();
  const float* sp = scores.data_ptr<float>();
  const int32_t* cp = cand_c.data_ptr<int32_t>();
  const int32_t* np = counts_c.data_ptr<int32_t>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  auto out = at::zeros({B, Hq, D}, q.options());
  auto q_counts = at::zeros({B, Hq}, counts.options());
  auto kv_counts = at::zeros({B, H}, counts.options());
  float* op = out.data_ptr<float>();
  int32_t* qcp = q_counts.data_ptr<int32_t>();
  int32_t* kvp = kv_counts.data_ptr<int32_t>();
  std::vector<std::vector<int32_t>> kept_rows(B * H);
  std::vector<float> w(K);
  std::vector<uint8_t> mark(K);
  std::vector<std::pair<float, int32_t>> heavy;
  std::vector<float> logits;
  for (int64_t r = 0; r < B * H; ++r) {
    const int64_t n = np[r];
    std::fill(mark.begin(), mark.begin() + n, 0);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t hq_row = r * G + g;  // (b * H + h) * G + g == b * Hq + h * G + g
      const float* x = sp + hq_row * K;
      const float sc = static_cast<float>(scale);
      const float m = max_scaled(x, n, sc);
      if (!std::isfinite(m)) continue;  // no candidate
      float* wp = w.data();
      for (int64_t i = 0; i < n; ++i) wp[i] = exp_nonpos(x[i] * sc - m);  // -inf -> 0
      const double total = sum_below(wp, n, std::numeric_limits<float>::infinity());
      int32_t kept = 0;
      if (p >= 1.0) {  // every finite candidate, underflowed ones too
        for (int64_t i = 0; i < n; ++i) {
          if (std::isfinite(x[i])) {
            mark[i] = 1;
            ++kept;
          }
        }
      } else {
        // Elements below a cut that hold at most 1 - p of the mass together cannot reach the threshold weight: only
        // the ones above it are sorted. `floor` (mass * (1 - p) / n) is such a cut by construction; higher cuts
        // (8x to 4096x) usually are too, on peaked rows, and are taken when a sum over the row says so.
        const double target = p * total, light = (1.0 - p) * total;
        const double floor = light / static_cast<double>(n);
        constexpr int kCuts = 4;
        const float mult[kCuts] = {4096.0f, 512.0f, 64.0f, 8.0f};
        float cuts[kCuts];
        double below[kCuts] = {0.0, 0.0, 0.0, 0.0};
        for (int c = 0; c < kCuts; ++c) cuts[c] = static_cast<float>(floor * mult[c]);
        for (int c = 0; c < kCuts; ++c) below[c] = sum_below(wp, n, cuts[c]);
        float cut = static_cast<float>(floor);
        for (int c = 0; c < kCuts; ++c) {
          if (below[c] <= light * (1.0 - 1e-4)) {  // a margin for the float sums
            cut = cuts[c];
            break;
          }
        }
        heavy.clear();
        for (int64_t i = 0; i < n; ++i) {
          if (wp[i] > 0.0f && wp[i] >= cut) heavy.emplace_back(wp[i], static_cast<int32_t>(i));
        }
        std::sort(heavy.begin(), heavy.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
        double csum = 0.0;
        float thr = heavy.empty() ? 0.0f : heavy.back().first;
        for (const auto& e : heavy) {
          csum += e.first;
          if (csum >= target) {
            thr = e.first;
            break;
          }
        }
        for (const auto& e : heavy) {  // every weight at or above the threshold (ties kept)
          if (e.first < thr) break;
          mark[e.second] = 1;
          ++kept;
        }
      }
      qcp[hq_row] = kept;
    }
    auto& row = kept_rows[r];
    for (int64_t i = 0; i < n; ++i) {
      if (mark[i]) row.push_back(cp[r * K + i]);
    }
    kvp[r] = static_cast<int32_t>(row.size());
    // attention of the group's queries over the row's union: each K and V row read once for the whole group
    const int64_t b = r / H, h = r % H;
    const float* kr = kp + (b * H + h) * cap * D;
    const float* vr = vp + (b * H + h) * cap * D;
    const int64_t nt = static_cast<int64_t>(row.size());
    if (nt == 0) continue;
    logits.resize(static_cast<size_t>(G * nt));
    const float* qg = qp + r * G * D;  // the group's queries, [G, D]
    group_key_dots(qg, G, kr, row.data(), nt, D, static_cast<float>(scale), logits.data());
    std::vector<double> totals(G, 0.0);
    for (int64_t g = 0; g < G; ++g) {
      float* lg = logits.data() + g * nt;
      const float m = max_scaled(lg, nt, 1.0f);
      for (int64_t t = 0; t < nt; ++t) lg[t] = exp_nonpos(lg[t] - m);  // now the softmax numerators
      totals[g] = sum_below(lg, nt, std::numeric_limits<float>::infinity());
    }
    float* og = op + r * G * D;
    for (int64_t t = 0; t < nt; ++t) {
      const float* vt = vr + static_cast<int64_t>(row[t]) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float e = logits[g * nt + t];
        float* o = og + g * D;
        for (int64_t d = 0; d < D; ++d) o[d] += e * vt[d];
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const float inv = totals[g] > 0.0 ? static_cast<float>(1.0 / totals[g]) : 0.0f;
      for (int64_t d = 0; d < D; ++d) og[g * D + d] *= inv;
    }
  }
  // The kept positions' width: the widest union (at least 1), or kept_width when given (a shape known before the
  // call: a compiled step's).
  int64_t width = 1;
  for (const auto& row : kept_rows) width = std::max<int64_t>(width, static_cast<int64_t>(row.size()));
  if (kept_width.has_value()) width = *kept_width;
  auto kept = at::zeros({B, H, width}, counts.options());
  int32_t* kp_out = kept.data_ptr<int32_t>();
  for (int64_t r = 0; r < B * H; ++r) {
    const auto& row = kept_rows[r];
    std::copy(row.begin(), row.end(), kp_out + r * width);
    const int32_t pad = row.empty() ? 0 : row[0];
    std::fill(kp_out + r * width + row.size(), kp_out + (r + 1) * width, pad);
  }
  return std::make_tuple(out, q_counts, kept, kv_counts);
}

// The operators, torch.ops.twilight_cpu.<name> (a plain shared library: twilight/kernels/cpu loads it with
// torch.ops.load_library and registers their fake implementations, for torch.compile, in Python). The schemas say
// exactly what each writes: update_token its three derived buffers in place (each absent, None, where the cache
// keeps none), the others nothing (they return new tensors). The scalars that change every decode step (positions,
// lengths, page counts) are SymInt, so that a compiled step traces them as symbols; the kernels take them as int64.
TORCH_LIBRARY(twilight_cpu, m) {
  m.def("update_token(Tensor k, Tensor(a!)? k_int4, Tensor(b!)? k_qparams, Tensor(c!)? page_bounds, Tensor start, "
        "SymInt pos, int page_size, int block) -> ()");
  m.def("top_p_attend(Tensor scores, Tensor cand, Tensor counts, float p, float scale, Tensor q, Tensor k, "
        "Tensor v, SymInt? kept_width=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("quest_page_scores(Tensor q, Tensor bounds, Tensor start, SymInt n_pages, int page_size, SymInt length) "
        "-> Tensor");
  m.def("int4_scores(Tensor q, Tensor packed, Tensor qparams, Tensor cand, Tensor counts, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(twilight_cpu, CPU, m) {
  m.impl("update_token", &update_token);
  m.impl("top_p_attend", &top_p_attend);
  m.impl("quest_page_scores", &quest_page_scores);
  m.impl("int4_scores", &int4_scores);
}
