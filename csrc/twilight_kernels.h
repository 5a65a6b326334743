// Host-side entry points of the Twilight CUDA kernels (raw pointers, no torch types), implemented in
// csrc/top_p.cu and csrc/int4_spgemv.cu and bound to Python by csrc/bindings.cpp. `stream` is a
// cudaStream_t (nullptr under the CPU emulation). Each returns nullptr on success or an error message.
#pragma once

#include <cstdint>

namespace twilight {

// Estimated q·k of every candidate from the packed int4 keys (layout: twilight/quant.py).
//   q        [rows * G, D] float32        (rows = B * Hkv; query head g of kv-row r is row r * G + g)
//   packed   [rows, cap, D / 2] uint8     qparams [rows, cap, 2] float32 (scale, mid)
//   indices  [rows, K] int32              counts  [rows] int32
//   out      [rows * G, K] float32        -inf at slots >= counts[row]
const char* int4_spgemv(const float* q, const uint8_t* packed, const float* qparams, const int32_t* indices,
                        const int32_t* counts, float* out, int rows, int G, int K, int64_t cap, int D,
                        int threads, void* stream);

// Exact top-p threshold of each row of x * scale (semantics of twilight.prune.top_p_mask).
//   x [R, N] float32 with row stride stride_x
//   p: [R] float32 (one p per row), or nullptr: every row uses p_value; p >= 1 keeps every finite entry
//   lengths: nullptr, or [R / group] int32: row r reads only its first min(lengths[r / group], N) entries
//   thr/rowmax/kept [R]: threshold bit pattern (-1: keep every finite entry), max of x * scale, kept count
//   mask: nullptr, or [R, N] uint8 (row stride stride_m) receiving the kept flags of each row's first n slots
const char* top_p_threshold(const float* x, int64_t stride_x, const int32_t* lengths, int group, const float* p,
                            float p_value, float scale, int R, int N, int32_t* thr, float* rowmax, int32_t* kept,
                            uint8_t* mask, int64_t stride_m, int threads, void* stream);

// Union over each GQA group of the kept flags and compaction of the candidates into a pruned selection.
//   mask [rows * G, K] uint8; indices [rows, K] int32; counts [rows] int32
//   out_indices [rows, K] int32 (kept candidates first, in order; later slots repeat the first kept one, or 0)
//   out_counts [rows] int32
const char* union_compact(const uint8_t* mask, const int32_t* indices, const int32_t* counts, int32_t* out_indices,
                          int32_t* out_counts, int rows, int G, int K, int threads, void* stream);

}  // namespace twilight
