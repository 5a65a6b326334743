// Torch bindings of the Twilight CUDA kernels (csrc/top_p.cu, csrc/int4_spgemv.cu).
//
// Built just in time by twilight.kernels.cuda with torch.utils.cpp_extension.load. With
// -DTWILIGHT_CUDA_EMULATE the same bindings take CPU tensors and run the kernels under the CPU emulation
// (csrc/cuda_emulation.h) — how the test suite checks the kernels on a machine without a GPU.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#ifndef TWILIGHT_CUDA_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "twilight_kernels.h"

namespace {

#ifdef TWILIGHT_CUDA_EMULATE
#ifndef TWILIGHT_EMULATED_THREADS
#define TWILIGHT_EMULATED_THREADS 256
#endif
// The emulation runs the GPU build's block size for top-p (256; any multiple of 32 works, smaller is faster to
// emulate: -DTWILIGHT_EMULATED_THREADS=64).
constexpr int kSpgemvThreads = TWILIGHT_EMULATED_THREADS / 2;
constexpr int kThreads = TWILIGHT_EMULATED_THREADS;
constexpr bool kEmulated = true;
#else
constexpr int kSpgemvThreads = 128;
constexpr int kThreads = 256;
constexpr bool kEmulated = false;
#endif

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(kEmulated ? t.device().is_cpu() : t.device().is_cuda(), name, " must be a ",
              kEmulated ? "CPU tensor (emulated build)" : "CUDA tensor", ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", c10::toString(dtype), ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

struct DeviceScope {
#ifdef TWILIGHT_CUDA_EMULATE
  explicit DeviceScope(const at::Tensor&) {}
  void* stream() const { return nullptr; }
#else
  explicit DeviceScope(const at::Tensor& t) : guard(t.device()) {}
  void* stream() const { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }
  c10::cuda::CUDAGuard guard;
#endif
};

void check_ok(const char* err, const char* what) { TORCH_CHECK(err == nullptr, what, " failed: ", err ? err : ""); }

// q [B, Hq, D] float32; packed [B, Hkv, cap, D/2] uint8; qparams [B, Hkv, cap, 2] float32;
// indices [B, Hkv, K] int32; counts [B, Hkv] int32  ->  [B, Hq, K] float32
at::Tensor int4_spgemv(const at::Tensor& q, const at::Tensor& packed, const at::Tensor& qparams,
                       const at::Tensor& indices, const at::Tensor& counts) {
  check_tensor(q, "q", at::kFloat, 3);
  check_tensor(packed, "packed", at::kByte, 4);
  check_tensor(qparams, "qparams", at::kFloat, 4);
  check_tensor(indices, "indices", at::kInt, 3);
  check_tensor(counts, "counts", at::kInt, 2);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = packed.size(1), cap = packed.size(2), K = indices.size(2);
  TORCH_CHECK(packed.size(0) == B && packed.size(3) * 2 == D, "packed must be [B, Hkv, cap, D/2], got ",
              packed.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "Hq=", Hq, " must be a multiple of Hkv=", Hkv);
  TORCH_CHECK(qparams.size(0) == B && qparams.size(1) == Hkv && qparams.size(2) == cap && qparams.size(3) == 2,
              "qparams must be [B, Hkv, cap, 2], got ", qparams.sizes());
  TORCH_CHECK(indices.size(0) == B && indices.size(1) == Hkv, "indices must be [B, Hkv, K], got ", indices.sizes());
  TORCH_CHECK(counts.size(0) == B && counts.size(1) == Hkv, "counts must be [B, Hkv], got ", counts.sizes());
  DeviceScope scope(q);
  auto out = at::empty({B, Hq, K}, q.options());
  check_ok(twilight::int4_spgemv(q.data_ptr<float>(), packed.data_ptr<uint8_t>(), qparams.data_ptr<float>(),
                                 indices.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), out.data_ptr<float>(),
                                 static_cast<int>(B * Hkv), static_cast<int>(Hq / Hkv), static_cast<int>(K), cap,
                                 static_cast<int>(D), kSpgemvThreads, scope.stream()),
           "int4_spgemv");
  return out;
}

// x [R, N] float32; p: optional [R] float32 (else every row uses p_value); lengths: optional [R / group] int32
// -> (threshold bits [R] int32, row max [R] float32, kept [R] int32, mask [R, N] bool or empty)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> top_p_threshold(
    const at::Tensor& x, const std::optional<at::Tensor>& p, double p_value, double scale,
    const std::optional<at::Tensor>& lengths, int64_t group, bool write_mask) {
  check_tensor(x, "x", at::kFloat, 2);
  const int64_t R = x.size(0), N = x.size(1);
  const float* p_ptr = nullptr;
  if (p.has_value()) {
    check_tensor(*p, "p", at::kFloat, 1);
    TORCH_CHECK(p->size(0) == R, "p must have one entry per row (", R, "), got ", p->size(0));
    p_ptr = p->data_ptr<float>();
  }
  TORCH_CHECK(group >= 1 && R % group == 0, "group=", group, " must divide the row count ", R);
  const int32_t* len_ptr = nullptr;
  if (lengths.has_value()) {
    check_tensor(*lengths, "lengths", at::kInt, 1);
    TORCH_CHECK(lengths->size(0) == R / group, "lengths must have R / group = ", R / group, " entries");
    len_ptr = lengths->data_ptr<int32_t>();
  }
  DeviceScope scope(x);
  auto opts_i = x.options().dtype(at::kInt);
  auto thr = at::empty({R}, opts_i), kept = at::empty({R}, opts_i);
  auto rowmax = at::empty({R}, x.options());
  auto mask = write_mask ? at::empty({R, N}, x.options().dtype(at::kBool)) : at::empty({0}, x.options().dtype(at::kBool));
  check_ok(twilight::top_p_threshold(x.data_ptr<float>(), N, len_ptr, static_cast<int>(group), p_ptr,
                                     static_cast<float>(p_value), static_cast<float>(scale), static_cast<int>(R),
                                     static_cast<int>(N), thr.data_ptr<int32_t>(), rowmax.data_ptr<float>(),
                                     kept.data_ptr<int32_t>(),
                                     write_mask ? reinterpret_cast<uint8_t*>(mask.data_ptr<bool>()) : nullptr, N,
                                     kThreads, scope.stream()),
           "top_p_threshold");
  return {thr, rowmax, kept, mask};
}

// mask [B * Hq, K] bool; indices [B, Hkv, K] int32; counts [B, Hkv] int32 -> (indices, counts) of the union
std::tuple<at::Tensor, at::Tensor> union_compact(const at::Tensor& mask, const at::Tensor& indices,
                                                 const at::Tensor& counts) {
  check_tensor(mask, "mask", at::kBool, 2);
  check_tensor(indices, "indices", at::kInt, 3);
  check_tensor(counts, "counts", at::kInt, 2);
  const int64_t B = indices.size(0), Hkv = indices.size(1), K = indices.size(2);
  TORCH_CHECK(counts.size(0) == B && counts.size(1) == Hkv, "counts must be [B, Hkv], got ", counts.sizes());
  TORCH_CHECK(mask.size(1) == K && B * Hkv > 0 && mask.size(0) % (B * Hkv) == 0,
              "mask must be [B * Hq, K] with Hq a multiple of Hkv, got ", mask.sizes());
  const int64_t G = mask.size(0) / (B * Hkv);
  DeviceScope scope(indices);
  auto out = at::empty_like(indices);
  auto out_counts = at::empty_like(counts);
  check_ok(twilight::union_compact(reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()),
                                   indices.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), out.data_ptr<int32_t>(),
                                   out_counts.data_ptr<int32_t>(), static_cast<int>(B * Hkv), static_cast<int>(G),
                                   static_cast<int>(K), kThreads, scope.stream()),
           "union_compact");
  return {out, out_counts};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Twilight CUDA kernels: exact sorting-free top-p (+ GQA union/compaction) and int4 SpGEMV";
  m.attr("emulated") = kEmulated;
  m.def("int4_spgemv", &int4_spgemv, "int4 SpGEMV: [B,Hq,D] f32 queries x packed int4 keys -> [B,Hq,K] f32",
        py::arg("q"), py::arg("packed"), py::arg("qparams"), py::arg("indices"), py::arg("counts"));
  m.def("top_p_threshold", &top_p_threshold, "exact top-p threshold (and mask) of each row of x * scale",
        py::arg("x"), py::arg("p"), py::arg("p_value"), py::arg("scale"), py::arg("lengths"), py::arg("group"),
        py::arg("write_mask"));
  m.def("union_compact", &union_compact, "GQA union of top-p masks and compaction into a selection",
        py::arg("mask"), py::arg("indices"), py::arg("counts"));
}
