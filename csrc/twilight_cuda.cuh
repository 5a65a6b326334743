// Device helpers shared by the Twilight CUDA kernels (block-wide reductions and scans), the macros that let the
// same source build with nvcc or run under the CPU emulation (cuda_emulation.h):
//   TW_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)   a kernel launch
//   TW_DYNAMIC_SMEM(type, name)                                    the block's dynamic shared memory
// and each kernel's shared-memory contract (TW_SMEM_CONTRACT, below).
// Every block-wide helper must be called by all threads of the block (they synchronise).
#pragma once

#include <cstddef>
#include <vector>

#ifdef TWILIGHT_CUDA_EMULATE
#include "cuda_emulation.h"
#else
#include <cuda_runtime.h>
#include <cmath>
#include <cstdint>
#define TW_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#define TW_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
inline const char* tw_last_error() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
#endif

namespace twilight {

// Shared memory. A block may use at most 48 KiB of static + dynamic shared memory unless its kernel opts in with
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) before the launch (then up to
// 227 KiB on H100/H200, 163 KiB on A100); a launch over the limit fails. Every kernel therefore states, next to
// its launcher, the most dynamic shared memory that launcher can request and whether it opts in:
//   TW_SMEM_CONTRACT(kernel_name, max_dynamic_bytes, opt_in);
// tests/kernels/cuda_compile_check.py reads the contracts (by running this header's registry on the host) and
// adds ptxas' static shared memory of every compiled kernel ("bytes smem"), failing when the sum exceeds the
// limit or a kernel has no contract. The CPU emulation enforces the dynamic part at every launch.
struct SmemContract {
  const char* kernel;        // the kernel's name (all template instances)
  size_t max_dynamic_bytes;  // the largest dynamic shared memory its launcher can request
  bool opt_in;               // whether the launcher raises cudaFuncAttributeMaxDynamicSharedMemorySize first
};
inline std::vector<SmemContract>& smem_contracts() {
  static std::vector<SmemContract> contracts;
  return contracts;
}
#define TW_SMEM_CONTRACT(kernel, max_dynamic_bytes, opt_in)                                          \
  [[maybe_unused]] static const bool tw_smem_contract_##kernel =                                     \
      (::twilight::smem_contracts().push_back({#kernel, static_cast<size_t>(max_dynamic_bytes), (opt_in)}), true)

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxWarps = 32;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ int warp_sum(int v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide reductions; every thread gets the same result (each warp re-reduces the per-warp partials in the
// same order, so float sums are bitwise identical across the block). `scratch` holds kMaxWarps values.
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, T* scratch, T identity, Op warp_op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_op(v);
  __syncthreads();  // the previous use of scratch is finished
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : identity;
  return warp_op(v);
}
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float scratch[kMaxWarps];
  return block_reduce(v, scratch, 0.0f, [](float x) { return warp_sum(x); });
}
__device__ __forceinline__ int block_sum(int v) {
  __shared__ int scratch[kMaxWarps];
  return block_reduce(v, scratch, 0, [](int x) { return warp_sum(x); });
}
__device__ __forceinline__ float block_max(float v) {
  __shared__ float scratch[kMaxWarps];
  return block_reduce(v, scratch, -INFINITY, [](float x) { return warp_max(x); });
}

// Three block-wide sums with one pair of barriers (every thread gets the same results).
struct Float3 {
  float a, b, c;
};
__device__ __forceinline__ Float3 block_sum3(Float3 v) {
  __shared__ float scratch[3][kMaxWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v.a = warp_sum(v.a);
  v.b = warp_sum(v.b);
  v.c = warp_sum(v.c);
  __syncthreads();
  if (lane == 0) {
    scratch[0][warp] = v.a;
    scratch[1][warp] = v.b;
    scratch[2][warp] = v.c;
  }
  __syncthreads();
  Float3 r;
  r.a = warp_sum(lane < nwarps ? scratch[0][lane] : 0.0f);
  r.b = warp_sum(lane < nwarps ? scratch[1][lane] : 0.0f);
  r.c = warp_sum(lane < nwarps ? scratch[2][lane] : 0.0f);
  return r;
}

// Inclusive prefix sum of `v` over the block in thread order; `*total` gets the block's sum.
__device__ __forceinline__ int block_inclusive_scan(int v, int* total) {
  __shared__ int warp_totals[kMaxWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    int t = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += t;
  }
  __syncthreads();
  if (lane == 31) warp_totals[warp] = v;
  __syncthreads();
  int before = 0, all = 0;
  for (int w = 0; w < nwarps; ++w) {
    int t = warp_totals[w];
    before += w < warp ? t : 0;
    all += t;
  }
  *total = all;
  return v + before;
}

}  // namespace twilight
