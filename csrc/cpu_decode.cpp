// Twilight's decode step on the CPU, fused: what the torch reference does in ~150 small tensor ops per layer,
// in two calls (the `cpu` backend, twilight/kernels/cpu/__init__.py; built just in time with the host compiler).
//
// update_token: a decode token's derived structures (int4 codes in the cache's tile layout, scale and mid, Quest's
//   page bounds widened outward to bf16), exactly as twilight.cache.LayerCache._update_one defines them.
// top_p_attend: per (batch, kv-head) row, each query head's exact top-p over its kv-head's candidates (the
//   semantics of twilight.prune.top_p_mask), their union, and decode attention over the union with the exact K/V.
//
// float32 caches only (the CPU's dtype); the backend sends other dtypes to the torch reference.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

}  // namespace

// k: [B, H, cap, D] f32; k_int4: [B, H, cap, D/2] u8 (or empty); k_qparams: [B, H, cap, 2] f32 (or empty);
// page_bounds: [B, H, cap/page, 2, D] f32 or bf16 (or empty).
void update_token(const at::Tensor& k, const at::Tensor& k_int4, const at::Tensor& k_qparams,
                  const at::Tensor& page_bounds, int64_t pos, int64_t page_size, int64_t block) {
  TORCH_CHECK(k.scalar_type() == at::kFloat && k.is_contiguous(), "update_token: k must be contiguous float32");
  const int64_t B = k.size(0), H = k.size(1), cap = k.size(2), D = k.size(3);
  const float* kp = k.data_ptr<float>();
  const bool quant = k_int4.numel() > 0, bounds = page_bounds.numel() > 0;
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
      const int64_t pages = cap / page_size, page = pos / page_size;
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
std::vector<at::Tensor> top_p_attend(const at::Tensor& scores, const at::Tensor& cand, const at::Tensor& counts,
                                     double p, double scale, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v) {
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.is_contiguous(), "scores must be contiguous float32");
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
    for (int64_t t = 0; t < nt; ++t) {
      const float* kt = kr + static_cast<int64_t>(row[t]) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qv = qg + g * D;
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += qv[d] * kt[d];
        logits[g * nt + t] = dot * static_cast<float>(scale);
      }
    }
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
  int64_t width = 1;
  for (const auto& row : kept_rows) width = std::max<int64_t>(width, static_cast<int64_t>(row.size()));
  auto kept = at::zeros({B, H, width}, counts.options());
  int32_t* kp_out = kept.data_ptr<int32_t>();
  for (int64_t r = 0; r < B * H; ++r) {
    const auto& row = kept_rows[r];
    std::copy(row.begin(), row.end(), kp_out + r * width);
    const int32_t pad = row.empty() ? 0 : row[0];
    std::fill(kp_out + r * width + row.size(), kp_out + (r + 1) * width, pad);
  }
  return {out, q_counts, kept, kv_counts};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("update_token", &update_token, "a decode token's int4 codes, scale/mid and page bounds");
  m.def("top_p_attend", &top_p_attend, "per-head top-p, GQA union and decode attention over the union");
}
