// Sorting-free, exact top-p over variable-length rows, and its fusion with the GQA union + compaction.
//
// Semantics of twilight.prune.top_p_mask: with weights w = exp(x * scale - max) in float32, keep every finite
// entry whose weight is >= w*, the largest weight such that the entries >= w* hold >= p of the row's mass
// (ties kept; p >= 1 keeps every finite entry). Non-negative floats order like their bit patterns, so w*'s bit
// pattern is found by a radix search, 8 bits per round from the top (4 rounds): a round builds the histogram of
// mass per next digit over the entries that share the digits found so far (256 bins in shared memory), and
// keeps the largest digit whose suffix still reaches p * sum(w). Masses are summed in 64-bit fixed point
// (2^F units, F = 63 - bit_length(n), so a row's n weights <= 1 sum below 2^63): integer sums are exact and
// order-independent, so the shared-memory atomics give the same threshold on every run.
// One block per row. A row of up to kMaxSmemWeights entries keeps its weights in shared memory after the
// first round (the logits are read three times: max, round 0, mask); a longer one recomputes them from the
// logits (L2-resident) in each of the 4 rounds: 6 passes over the row, whatever its length.
#include "twilight_cuda.cuh"
#include "twilight_kernels.h"

namespace twilight {
namespace {

// Weights cached per row in dynamic shared memory: 32 KiB, so that with the ~2.3 KiB of static shared memory
// (histogram, reduction scratch) a block stays under the 48 KiB every launch gets without opting in.
constexpr int kMaxSmemWeights = 8192;
constexpr size_t kThresholdMaxDynamicSmem = sizeof(float) * kMaxSmemWeights;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
constexpr int kRounds = 32 / kRadixBits;
constexpr int kBinsPerLane = kBins / 32;  // the round's decision is one warp's: 8 bins per lane

// x * scale - max, rounded twice as torch computes (logits * scale) - max; then exp.
__device__ __forceinline__ float weight_of(float x, float scale, float m) {
  return expf(__fsub_rn(__fmul_rn(x, scale), m));
}

// A weight's mass in fixed point (truncated): w * 2^F with w in [0, 1].
__device__ __forceinline__ unsigned long long fixed_mass(float w, float fx_scale) {
  return static_cast<unsigned long long>(w * fx_scale);
}

struct RadixState {
  uint32_t prefix;           // the digits of w*'s bit pattern found so far
  unsigned long long above;  // mass of the entries above the current prefix's range
  unsigned long long target; // ceil(p * total mass), at least 1 (an empty row keeps nothing)
};

// One round's decision, taken by warp 0 from the round's histogram: the largest digit d whose entries, with all
// the mass above them, still reach the target (d = 0 when none does: only an empty row); the prefix grows by d
// and `above` by the mass of the digits > d. Round 0 also sets the target from the total mass.
__device__ __forceinline__ void radix_pick(const unsigned long long* hist, RadixState* st, bool first, float p) {
  const int lane = threadIdx.x & 31;
  unsigned long long bins[kBinsPerLane];
  unsigned long long own = 0;
#pragma unroll
  for (int j = 0; j < kBinsPerLane; ++j) {
    bins[j] = hist[lane * kBinsPerLane + j];
    own += bins[j];
  }
  unsigned long long suffix = own;  // mass of the bins of this lane and the lanes above it
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long t = __shfl_down_sync(kFullMask, suffix, o);
    if (lane + o < 32) suffix += t;
  }
  const unsigned long long above = st->above;
  unsigned long long target = st->target;
  if (first) {
    const unsigned long long total = __shfl_sync(kFullMask, suffix, 0);
    const double t = ceil(static_cast<double>(p) * static_cast<double>(total));
    target = t < 1.0 ? 1ull : static_cast<unsigned long long>(t);
  }
  int best = -1;
  unsigned long long s = suffix - own;  // mass of the digits above this lane's
#pragma unroll
  for (int j = kBinsPerLane - 1; j >= 0; --j) {
    s += bins[j];
    if (best < 0 && above + s >= target) best = lane * kBinsPerLane + j;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(kFullMask, best, o));
  const int digit = best < 0 ? 0 : best;
  if (lane == digit / kBinsPerLane) {
    unsigned long long higher = suffix - own;  // mass of the digits > digit
#pragma unroll
    for (int j = 0; j < kBinsPerLane; ++j)
      if (j > digit % kBinsPerLane) higher += bins[j];
    st->prefix = (st->prefix << kRadixBits) | static_cast<uint32_t>(digit);
    st->above = above + higher;
    st->target = target;
  }
}

template <bool kCached>
__global__ void __launch_bounds__(1024, 1) top_p_threshold_kernel(
    const float* __restrict__ x, int64_t stride_x, const int32_t* __restrict__ lengths, int group,
    const float* __restrict__ p_arr, float p_value, float scale, int N, int32_t* __restrict__ thr_out,
    float* __restrict__ max_out, int32_t* __restrict__ kept_out, uint8_t* __restrict__ mask, int64_t stride_m) {
  TW_DYNAMIC_SMEM(float, cached_w);
  __shared__ unsigned long long hist[kBins];
  __shared__ RadixState state;
  const int r = blockIdx.x;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int n = lengths ? min(static_cast<int>(lengths[r / group]), N) : N;
  const float* xr = x + static_cast<int64_t>(r) * stride_x;
  const float p = p_arr ? p_arr[r] : p_value;
  const bool keep_all = p >= 1.0f;  // the same for the whole block: the barriers below stay uniform

  float m = -INFINITY;
  for (int i = tid; i < n; i += nt) m = fmaxf(m, __fmul_rn(__ldg(xr + i), scale));
  m = block_max(m);
  if (m == -INFINITY) m = 0.0f;  // a row without candidates: every weight is 0

  uint32_t thr = 0;
  if (!keep_all) {
    const int frac_bits = 63 - (32 - __clz(max(n, 1)));  // n weights <= 1 sum below 2^63
    const float fx_scale = __int_as_float((127 + frac_bits) << 23);  // 2^frac_bits
    if (tid == 0) state = RadixState{0u, 0ull, 0ull};
    for (int round = 0; round < kRounds; ++round) {
      const int shift = 32 - kRadixBits * (round + 1);
      for (int i = tid; i < kBins; i += nt) hist[i] = 0ull;
      __syncthreads();  // the histogram is clear (and the previous round's state has been read)
      for (int i = tid; i < n; i += nt) {
        float w;
        if (kCached && round > 0) {
          w = cached_w[i];
        } else {
          w = weight_of(__ldg(xr + i), scale, m);
          if (kCached) cached_w[i] = w;
        }
        const uint32_t bits = __float_as_uint(w);
        if (round > 0 && (bits >> (shift + kRadixBits)) != thr) continue;  // outside the prefix's range
        const unsigned long long mass = fixed_mass(w, fx_scale);
        if (mass) atomicAdd(&hist[(bits >> shift) & (kBins - 1)], mass);
      }
      __syncthreads();  // the histogram is complete (and cached_w published)
      if (tid < 32) radix_pick(hist, &state, round == 0, p);
      __syncthreads();
      thr = state.prefix;
    }
  }

  int kept = 0;  // (with lengths, mask slots past the row's length are left unwritten: nobody reads them)
  for (int i = tid; i < n; i += nt) {
    bool keep;
    if (keep_all) {
      keep = __fmul_rn(__ldg(xr + i), scale) > -INFINITY;
    } else {  // w > 0 implies a finite logit
      const float w = kCached ? cached_w[i] : weight_of(__ldg(xr + i), scale, m);
      keep = w > 0.0f && __float_as_uint(w) >= thr;
    }
    if (mask) mask[static_cast<int64_t>(r) * stride_m + i] = keep;
    kept += keep;
  }
  kept = block_sum(kept);
  if (tid == 0) {
    thr_out[r] = keep_all ? -1 : static_cast<int32_t>(thr);
    max_out[r] = m;
    kept_out[r] = kept;
  }
}

__global__ void __launch_bounds__(1024) union_compact_kernel(
    const uint8_t* __restrict__ mask, const int32_t* __restrict__ indices, const int32_t* __restrict__ counts,
    int32_t* __restrict__ out_indices, int32_t* __restrict__ out_counts, int G, int K) {
  const int row = blockIdx.x;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int count = min(static_cast<int>(counts[row]), K);
  const int32_t* in = indices + static_cast<int64_t>(row) * K;
  int32_t* out = out_indices + static_cast<int64_t>(row) * K;
  __shared__ int32_t first_kept;
  if (tid == 0) first_kept = 0;
  int written = 0;
  for (int base = 0; base < count; base += nt) {  // uniform trip count: every thread reaches the scan
    const int i = base + tid;
    int keep = 0;
    if (i < count)
      for (int g = 0; g < G; ++g) keep |= mask[(static_cast<int64_t>(row) * G + g) * K + i] != 0;
    int total;
    const int incl = block_inclusive_scan(keep, &total);  // (its barriers also order first_kept's init)
    if (keep) {
      const int slot = written + incl - 1;
      out[slot] = in[i];
      if (slot == 0) first_kept = in[i];
    }
    written += total;
  }
  __syncthreads();  // first_kept is final
  // Padding repeats the first kept position (or 0), as twilight.select.compact does: valid, and write-only.
  const int32_t pad = first_kept;
  for (int i = written + tid; i < K; i += nt) out[i] = pad;
  if (tid == 0) out_counts[row] = written;
}

TW_SMEM_CONTRACT(top_p_threshold_kernel, kThresholdMaxDynamicSmem, false);
TW_SMEM_CONTRACT(union_compact_kernel, 0, false);

}  // namespace

const char* top_p_threshold(const float* x, int64_t stride_x, const int32_t* lengths, int group, const float* p,
                            float p_value, float scale, int R, int N, int32_t* thr, float* rowmax, int32_t* kept,
                            uint8_t* mask, int64_t stride_m, int threads, void* stream) {
  if (R == 0) return nullptr;
  if (group < 1) return "top_p_threshold: group must be >= 1";
  if (threads < 32 || threads % 32 || threads > 1024)
    return "top_p_threshold: threads must be a multiple of 32, at most 1024";
  if (N <= kMaxSmemWeights) {
    auto kernel = top_p_threshold_kernel<true>;
    const size_t smem = sizeof(float) * (N > 0 ? N : 1);  // <= kThresholdMaxDynamicSmem
    TW_LAUNCH(kernel, dim3(R), dim3(threads), smem, stream, x, stride_x, lengths, group, p, p_value, scale, N, thr,
              rowmax, kept, mask, stride_m);
  } else {
    auto kernel = top_p_threshold_kernel<false>;
    TW_LAUNCH(kernel, dim3(R), dim3(threads), 0, stream, x, stride_x, lengths, group, p, p_value, scale, N, thr,
              rowmax, kept, mask, stride_m);
  }
  return tw_last_error();
}

const char* union_compact(const uint8_t* mask, const int32_t* indices, const int32_t* counts, int32_t* out_indices,
                          int32_t* out_counts, int rows, int G, int K, int threads, void* stream) {
  if (rows == 0) return nullptr;
  auto kernel = union_compact_kernel;
  TW_LAUNCH(kernel, dim3(rows), dim3(threads), 0, stream, mask, indices, counts, out_indices, out_counts, G, K);
  return tw_last_error();
}

}  // namespace twilight
