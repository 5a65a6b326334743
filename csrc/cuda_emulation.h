// CPU emulation of the small part of the CUDA execution model our kernels use, so that the *same* kernel
// source (csrc/*.cu) runs and is tested on a machine without a GPU. Compiled only with
// -DTWILIGHT_CUDA_EMULATE (by twilight.kernels.cuda.load_emulated); never part of the GPU build.
//
// Model: blocks run one after another; the threads of a block are cooperative coroutines (ucontext) on one
// OS thread, switched only at __syncthreads() and warp shuffles, so every interleaving is deterministic and
// shared memory (`__shared__` -> a function-static variable) is shared by the threads of the running block.
// Supported: threadIdx/blockIdx/blockDim/gridDim (x, y, z), __syncthreads, __shfl_{xor,up,down,}_sync over
// full warps, dynamic shared memory (TW_DYNAMIC_SMEM) with the runtime's limit (48 KiB per launch unless the
// kernel opted in with cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes); static
// shared memory is not counted here: the compile check adds ptxas' figure), atomicAdd (threads switch only at
// barriers, so it is a plain read-modify-write), and a few math intrinsics. A barrier that can never complete
// (divergent __syncthreads, a shuffle with lanes missing) throws instead of hanging, as does a launch asking for
// more dynamic shared memory than the kernel may have.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace twemu {

enum State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Thread {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 idx;
  State state = kRunnable;
};

inline dim3 g_block_idx, g_block_dim, g_grid_dim;
inline std::vector<Thread> g_threads;
inline int g_cur = 0;
inline ucontext_t g_scheduler;
inline std::function<void()> g_body;
inline std::vector<unsigned char> g_dynamic_smem;
inline std::vector<uint64_t> g_shuffle;  // one exchange slot per thread
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;  // what a launch may ask for without opting in

// cudaFuncAttributeMaxDynamicSharedMemorySize per kernel (by function address), as cudaFuncSetAttribute set it.
inline std::map<const void*, size_t>& dynamic_smem_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

inline void yield_as(State s) {
  Thread& t = g_threads[g_cur];
  t.state = s;
  swapcontext(&t.ctx, &g_scheduler);
}

inline void trampoline() {
  g_body();
  g_threads[g_cur].state = kDone;  // uc_link returns to the scheduler
}

inline void run_block(unsigned nthreads) {
  if (nthreads % 32) throw std::runtime_error("emulation needs blockDim to be a multiple of 32");
  if (g_threads.size() < nthreads) g_threads.resize(nthreads);
  g_shuffle.assign(nthreads, 0);
  for (unsigned i = 0; i < nthreads; ++i) {
    Thread& t = g_threads[i];
    if (t.stack.empty()) t.stack.resize(kStackBytes);
    t.idx = dim3(i % g_block_dim.x, (i / g_block_dim.x) % g_block_dim.y, i / (g_block_dim.x * g_block_dim.y));
    t.state = kRunnable;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.data();
    t.ctx.uc_stack.ss_size = t.stack.size();
    t.ctx.uc_link = &g_scheduler;
    makecontext(&t.ctx, trampoline, 0);
  }
  for (;;) {
    for (unsigned i = 0; i < nthreads; ++i) {
      if (g_threads[i].state != kRunnable) continue;
      g_cur = static_cast<int>(i);
      swapcontext(&g_scheduler, &g_threads[i].ctx);
    }
    // Everyone is blocked or done: release whichever barrier is complete.
    bool all_done = true, released = false;
    unsigned at_block = 0, alive = 0;
    for (unsigned i = 0; i < nthreads; ++i) {
      if (g_threads[i].state != kDone) { all_done = false; ++alive; }
      if (g_threads[i].state == kAtBlockBarrier) ++at_block;
    }
    if (all_done) return;
    if (at_block == alive) {  // __syncthreads: every live thread arrived
      for (unsigned i = 0; i < nthreads; ++i)
        if (g_threads[i].state == kAtBlockBarrier) g_threads[i].state = kRunnable;
      released = true;
    }
    for (unsigned w = 0; w < nthreads / 32; ++w) {  // warp-synchronous ops: all 32 lanes arrived
      bool full = true;
      for (unsigned l = 0; l < 32; ++l) full &= g_threads[w * 32 + l].state == kAtWarpBarrier;
      if (full) {
        for (unsigned l = 0; l < 32; ++l) g_threads[w * 32 + l].state = kRunnable;
        released = true;
      }
    }
    if (!released) throw std::runtime_error("emulated kernel deadlocked: a barrier or shuffle that not all threads reach");
  }
}

template <class Kernel, class... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  const auto limit = dynamic_smem_limits().find(reinterpret_cast<const void*>(kernel));
  const size_t max_smem = limit == dynamic_smem_limits().end() ? kDefaultDynamicSmem : limit->second;
  if (smem > max_smem)
    throw std::runtime_error("launch asks for " + std::to_string(smem) + " bytes of dynamic shared memory; the kernel "
                             "may have " + std::to_string(max_smem) + " (48 KiB unless it opted in with "
                             "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))");
  g_grid_dim = grid;
  g_block_dim = block;
  g_dynamic_smem.assign(smem + 16, 0);
  g_body = [=]() { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = dim3(x, y, z);
        run_block(block.x * block.y * block.z);
      }
}

inline unsigned linear_tid() {
  const dim3& i = g_threads[g_cur].idx;
  return i.x + g_block_dim.x * (i.y + g_block_dim.y * i.z);
}

template <class T>
T exchange(T v, int src_lane, bool valid_src) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  unsigned tid = linear_tid(), base = tid & ~31u;
  uint64_t slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  g_shuffle[tid] = slot;
  yield_as(kAtWarpBarrier);  // every lane has published its value
  T r = v;
  if (valid_src) std::memcpy(&r, &g_shuffle[base + static_cast<unsigned>(src_lane)], sizeof(T));
  yield_as(kAtWarpBarrier);  // every lane has read before the slots are reused
  return r;
}

}  // namespace twemu

#define threadIdx (twemu::g_threads[twemu::g_cur].idx)
#define blockIdx (twemu::g_block_idx)
#define blockDim (twemu::g_block_dim)
#define gridDim (twemu::g_grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define TW_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(twemu::g_dynamic_smem.data())
#define TW_LAUNCH(kernel, grid, block, smem, stream, ...) twemu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)

inline void __syncthreads() { twemu::yield_as(twemu::kAtBlockBarrier); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  int lane = static_cast<int>(twemu::linear_tid() & 31u);
  return twemu::exchange(v, lane ^ lane_mask, true);
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
  int lane = static_cast<int>(twemu::linear_tid() & 31u);
  return twemu::exchange(v, lane - static_cast<int>(delta), lane >= static_cast<int>(delta));
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned delta) {
  int lane = static_cast<int>(twemu::linear_tid() & 31u);
  return twemu::exchange(v, lane + static_cast<int>(delta), lane + static_cast<int>(delta) < 32);
}
template <class T>
T __shfl_sync(unsigned, T v, int src_lane) { return twemu::exchange(v, src_lane & 31, true); }
template <class T>
T __ldg(const T* p) { return *p; }
template <class T>
T atomicAdd(T* address, T value) {  // threads switch only at barriers: nothing can interleave
  const T old = *address;
  *address = old + value;
  return old;
}
template <class T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize)
    twemu::dynamic_smem_limits()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline const char* tw_last_error() { return nullptr; }
using std::max;
using std::min;
