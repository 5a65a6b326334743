// Sorting-free, exact top-p over variable-length rows, and its fusion with the GQA union + compaction.
//
// Semantics of twilight.prune.top_p_mask: with weights w = exp(x * scale - max) in float32, keep every finite
// entry whose weight is >= w*, the largest weight such that the entries >= w* hold >= p of the row's mass
// (ties kept; p >= 1 keeps every finite entry). Non-negative floats order like their bit patterns and every
// weight is <= 1.0 (bits < 2^30), so w*'s bit pattern is built from bit 29 down, keeping the largest bits whose
// pattern still has p * sum(w) of mass at or above it: two bits per pass (three sums reduced together), 15
// block-wide reductions, exact, no sort. One block per
// row; the row's weights are cached in shared memory when they fit (one read of the logits), otherwise each
// step streams the row again (L2-resident).
#include "twilight_cuda.cuh"
#include "twilight_kernels.h"

namespace twilight {
namespace {

constexpr int kMaxSmemWeights = 12288;  // 48 KiB of float weights: the default dynamic shared memory limit

// x * scale - max, rounded twice as torch computes (logits * scale) - max; then exp.
__device__ __forceinline__ float weight_of(float x, float scale, float m) {
  return expf(__fsub_rn(__fmul_rn(x, scale), m));
}

template <bool kCached>
__global__ void __launch_bounds__(1024) top_p_threshold_kernel(
    const float* __restrict__ x, int64_t stride_x, const int32_t* __restrict__ lengths, int group,
    const float* __restrict__ p_arr, float scale, int N, int32_t* __restrict__ thr_out, float* __restrict__ max_out,
    int32_t* __restrict__ kept_out, uint8_t* __restrict__ mask, int64_t stride_m) {
  TW_DYNAMIC_SMEM(float, cached_w);
  const int r = blockIdx.x;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int n = lengths ? min(static_cast<int>(lengths[r / group]), N) : N;
  const float* xr = x + static_cast<int64_t>(r) * stride_x;
  const float p = p_arr[r];

  float m = -INFINITY;
  for (int i = tid; i < n; i += nt) m = fmaxf(m, __fmul_rn(__ldg(xr + i), scale));
  m = block_max(m);
  if (m == -INFINITY) m = 0.0f;  // a row without candidates: every weight is 0

  float total = 0.0f;
  for (int i = tid; i < n; i += nt) {
    float w = weight_of(__ldg(xr + i), scale, m);
    if (kCached) cached_w[i] = w;
    total += w;
  }
  total = block_sum(total);  // (its barriers also publish cached_w)
  const float target = p * total;

  // Binary search over the bit pattern, two bits per pass: the masses at or above thr|01, thr|10, thr|11.
  int32_t thr = 0;
  for (int shift = 28; shift >= 0; shift -= 2) {
    const int32_t c1 = thr | (1 << shift), c2 = thr | (2 << shift), c3 = thr | (3 << shift);
    Float3 mass = {0.0f, 0.0f, 0.0f};
    for (int i = tid; i < n; i += nt) {
      const float w = kCached ? cached_w[i] : weight_of(__ldg(xr + i), scale, m);
      const int32_t bits = __float_as_int(w);
      mass.a += bits >= c1 ? w : 0.0f;
      mass.b += bits >= c2 ? w : 0.0f;
      mass.c += bits >= c3 ? w : 0.0f;
    }
    mass = block_sum3(mass);
    thr = mass.c >= target ? c3 : mass.b >= target ? c2 : mass.a >= target ? c1 : thr;
  }
  if (p >= 1.0f) thr = -1;

  int kept = 0;  // (with lengths, mask slots past the row's length are left unwritten: nobody reads them)
  for (int i = tid; i < n; i += nt) {
    const float y = __fmul_rn(__ldg(xr + i), scale);
    const float w = kCached ? cached_w[i] : weight_of(__ldg(xr + i), scale, m);
    const bool keep = y > -INFINITY && (thr < 0 || (w > 0.0f && __float_as_int(w) >= thr));
    if (mask) mask[static_cast<int64_t>(r) * stride_m + i] = keep;
    kept += keep;
  }
  kept = block_sum(kept);
  if (tid == 0) {
    thr_out[r] = thr;
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

}  // namespace

const char* top_p_threshold(const float* x, int64_t stride_x, const int32_t* lengths, int group, const float* p,
                            float scale, int R, int N, int32_t* thr, float* rowmax, int32_t* kept, uint8_t* mask,
                            int64_t stride_m, int threads, void* stream) {
  if (R == 0) return nullptr;
  if (group < 1) return "top_p_threshold: group must be >= 1";
  if (N <= kMaxSmemWeights) {
    auto kernel = top_p_threshold_kernel<true>;
    TW_LAUNCH(kernel, dim3(R), dim3(threads), sizeof(float) * (N > 0 ? N : 1), stream, x, stride_x, lengths,
              group, p, scale, N, thr, rowmax, kept, mask, stride_m);
  } else {
    auto kernel = top_p_threshold_kernel<false>;
    TW_LAUNCH(kernel, dim3(R), dim3(threads), 0, stream, x, stride_x, lengths, group, p, scale, N, thr, rowmax,
              kept, mask, stride_m);
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
