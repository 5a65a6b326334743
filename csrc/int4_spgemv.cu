// 4-bit SpGEMV: estimated q·k of each candidate token from the packed int4 K cache, for all query heads of a
// GQA group in one pass over the kv-head's keys.
//
// Layout (twilight/quant.py): tokens in tiles of 64, stored dim-major; byte [tile, d, c % 32] holds channel d
// of token c of the tile in its low nibble (c < 32) or high nibble (c >= 32). Per token (scale, mid) with
// k ≈ (code - 8) * scale + mid, so q·k ≈ scale * (q · (code - 8)) + mid * sum(q).
//
// One thread per candidate: it walks the token's D bytes (stride 32 bytes), so the threads of a warp read
// consecutive bytes whenever their candidates are consecutive tokens (Quest pages, pruned runs). The group's
// queries sit in shared memory (broadcast reads); each thread keeps G accumulators.
#include "twilight_cuda.cuh"
#include "twilight_kernels.h"

namespace twilight {
namespace {

// The group's queries and their sums in dynamic shared memory: at most 48 KiB (the kernel has no static shared
// memory), the most a launch gets without opting in.
constexpr size_t kMaxQueryFloats = 12288;
constexpr size_t kSpgemvMaxDynamicSmem = sizeof(float) * kMaxQueryFloats;

template <int kMaxG>
__global__ void __launch_bounds__(256) int4_spgemv_kernel(
    const float* __restrict__ q, const uint8_t* __restrict__ packed, const float* __restrict__ qparams,
    const int32_t* __restrict__ indices, const int32_t* __restrict__ counts, float* __restrict__ out, int G, int K,
    int64_t cap, int D) {
  TW_DYNAMIC_SMEM(float, q_s);  // [G * D] queries, then [G] their sums
  const int row = blockIdx.y;
  const int tid = threadIdx.x;
  float* qsum_s = q_s + G * D;
  const float* qrow = q + static_cast<int64_t>(row) * G * D;
  for (int i = tid; i < G * D; i += blockDim.x) q_s[i] = qrow[i];
  __syncthreads();
  if (tid < G) {
    float s = 0.0f;
    for (int d = 0; d < D; ++d) s += q_s[tid * D + d];
    qsum_s[tid] = s;
  }
  __syncthreads();

  const int n = blockIdx.x * blockDim.x + tid;
  if (n >= K) return;
  float* o = out + static_cast<int64_t>(row) * G * K + n;
  if (n >= counts[row]) {
    for (int g = 0; g < G; ++g) o[static_cast<int64_t>(g) * K] = -INFINITY;
    return;
  }
  const int32_t t = __ldg(indices + static_cast<int64_t>(row) * K + n);
  const uint8_t* bytes = packed + static_cast<int64_t>(row) * cap * (D / 2) + static_cast<int64_t>(t >> 6) * 32 * D +
                         (t & 31);
  const int shift = (t & 32) ? 4 : 0;
  float acc[kMaxG];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) acc[g] = 0.0f;
#pragma unroll 4
  for (int d = 0; d < D; ++d) {
    const float v = static_cast<float>(((__ldg(bytes + d * 32) >> shift) & 0xF) - 8);
#pragma unroll
    for (int g = 0; g < kMaxG; ++g)
      if (g < G) acc[g] += q_s[g * D + d] * v;
  }
  const float* qp = qparams + (static_cast<int64_t>(row) * cap + t) * 2;
  const float scale = __ldg(qp), mid = __ldg(qp + 1);
#pragma unroll
  for (int g = 0; g < kMaxG; ++g)
    if (g < G) o[static_cast<int64_t>(g) * K] = acc[g] * scale + qsum_s[g] * mid;
}

template <int kMaxG>
void launch_spgemv(const float* q, const uint8_t* packed, const float* qparams, const int32_t* indices,
                   const int32_t* counts, float* out, int rows, int G, int K, int64_t cap, int D, int threads,
                   void* stream) {
  auto kernel = int4_spgemv_kernel<kMaxG>;
  const size_t smem = sizeof(float) * (static_cast<size_t>(G) * D + G);  // <= kSpgemvMaxDynamicSmem
  TW_LAUNCH(kernel, dim3((K + threads - 1) / threads, rows), dim3(threads), smem, stream, q, packed, qparams,
            indices, counts, out, G, K, cap, D);
}

TW_SMEM_CONTRACT(int4_spgemv_kernel, kSpgemvMaxDynamicSmem, false);

}  // namespace

const char* int4_spgemv(const float* q, const uint8_t* packed, const float* qparams, const int32_t* indices,
                        const int32_t* counts, float* out, int rows, int G, int K, int64_t cap, int D, int threads,
                        void* stream) {
  if (rows == 0 || K == 0) return nullptr;
  if (D % 2) return "int4_spgemv: D must be even";
  if (static_cast<size_t>(G) * D + G > kMaxQueryFloats) return "int4_spgemv: G * D too large for shared memory";
  if (G <= 1) launch_spgemv<1>(q, packed, qparams, indices, counts, out, rows, G, K, cap, D, threads, stream);
  else if (G <= 2) launch_spgemv<2>(q, packed, qparams, indices, counts, out, rows, G, K, cap, D, threads, stream);
  else if (G <= 4) launch_spgemv<4>(q, packed, qparams, indices, counts, out, rows, G, K, cap, D, threads, stream);
  else if (G <= 8) launch_spgemv<8>(q, packed, qparams, indices, counts, out, rows, G, K, cap, D, threads, stream);
  else if (G <= 16) launch_spgemv<16>(q, packed, qparams, indices, counts, out, rows, G, K, cap, D, threads, stream);
  else if (G <= 32) launch_spgemv<32>(q, packed, qparams, indices, counts, out, rows, G, K, cap, D, threads, stream);
  else return "int4_spgemv: at most 32 query heads per kv-head";
  return tw_last_error();
}

}  // namespace twilight
