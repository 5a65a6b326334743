// The CUDA kernels compiled for the CPU emulation (csrc/cuda_emulation.h): the test suite's way to run the
// exact kernel source on a machine without a GPU. Built by twilight.kernels.cuda.load_emulated() together with
// bindings.cpp, both with -DTWILIGHT_CUDA_EMULATE.
#ifndef TWILIGHT_CUDA_EMULATE
#error "emulated_kernels.cpp is only for the CPU emulation build (-DTWILIGHT_CUDA_EMULATE)"
#endif
#include "top_p.cu"
#include "int4_spgemv.cu"
