/*
What both kernel files share (multimem_ops.cu, the technique; decode_ops.cu, the one-GPU fast path):
bf16 <-> fp32 on packed words, programmatic dependent launch, and, for the torch bindings, how an
argument check reports: as a returned message, never as a C++ exception.
*/
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace tw {

// ---------------------------------------------------------------------------------------------
// bf16 <-> fp32 on packed words. A bf16 is the top half of an fp32, so widening is a shift.

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// Both rounded to nearest even, as __float2bfloat16_rn rounds each, in one instruction for the pair.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

__device__ __forceinline__ void unpack8(const uint4& v, float f[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = bf16_lo(w[i]);
    f[2 * i + 1] = bf16_hi(w[i]);
  }
}

__device__ __forceinline__ uint4 pack8(const float f[8]) {
  return make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]),
                    pack_bf16x2(f[6], f[7]));
}

// ---------------------------------------------------------------------------------------------
// Programmatic dependent launch (PDL). The kernels of a decode step (all but the comm kernel and
// down's gemv) are launched with launch_pdl: a kernel's CTAs may start, and set up, while the
// kernel before it in the stream finishes, and the launch latency between them is hidden. After
// pdl_wait the previous kernel has completed and its writes are visible. pdl_launch_dependents,
// only ever after pdl_wait, lets the next kernel launch once every CTA of this one has called it or
// exited: so at most two kernels are in flight, the next one's CTAs only take the SMs that this
// one's last CTAs leave, and when a kernel starts, every kernel but the one just before it has
// completed. So before pdl_wait a kernel may read anything but what that one kernel writes: a norm
// weight, and in decode attention the step's metadata and the keys of earlier steps. Where the
// launch was plain, or the previous kernel is not ours (cuBLAS, torch), both are harmless.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;"); }

// pdl false: a plain launch of the same kernel (it starts when the one before has completed).
template <typename... Args>
cudaError_t launch_maybe_pdl(bool pdl, void (*kernel)(Args...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t stream, const Args&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

template <typename... Args>
cudaError_t launch_pdl(void (*kernel)(Args...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       const Args&... args) {
  return launch_maybe_pdl(true, kernel, grid, block, smem, stream, args...);
}

}  // namespace tw

// ---------------------------------------------------------------------------------------------
// The torch bindings' conventions. A binding checks every argument (cheap: shapes, dtypes,
// alignment; nothing that reads the GPU), then launches; it returns "" or one message that says
// what was wrong, which build_ext.py raises as a RuntimeError. Nothing here throws, and messages
// are built with std::string and std::to_string only: on the H200 machines with torch 2.11 both a
// C++ exception leaving the extension and c10::str (an ostringstream) crashed the process (the
// number formatting resolved to a copy of libstdc++'s iostream code inside the .so and faulted in
// its locale facet).
#ifndef TW_NO_TORCH
// Narrow headers instead of torch/extension.h and ATen/cuda/CUDAContext.h: a third of the build
// time, no warnings from the C++ frontend's headers, and no need for the cuBLAS/cuSPARSE headers.
// c10::cuda::getCurrentCUDAStream is the stream at::cuda::getCurrentCUDAStream returns.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

namespace tw {

inline std::string cuda_error(const char* op, cudaError_t e) {
  if (e == cudaSuccess) e = cudaGetLastError();
  return e == cudaSuccess ? "" : std::string(op) + ": CUDA error: " + cudaGetErrorString(e);
}

inline void* as_ptr(int64_t addr) { return reinterpret_cast<void*>(static_cast<uintptr_t>(addr)); }

inline std::string shape(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kHalf: return "float16";
    default: return "another dtype";
  }
}

// "" if t is a CUDA tensor of `dtype` on `device` with contiguous rows (the last dimension dense),
// 16-byte aligned with rows a multiple of 16 bytes apart where `aligned`, and wholly contiguous
// where `contiguous`; else the message.
inline std::string check_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                                const at::Device& device, bool contiguous = true, bool aligned = true) {
  const std::string what = std::string(op) + ": " + name;
  if (!t.is_cuda() || t.device() != device || t.scalar_type() != dtype)
    return what + " must be a CUDA tensor of dtype " + dtype_name(dtype) + " on " + device.str() + ", got " +
           dtype_name(t.scalar_type()) + " on " + t.device().str();
  if (contiguous ? !t.is_contiguous() : (t.dim() < 1 || t.stride(-1) != 1))
    return what + (contiguous ? " must be contiguous" : " must have contiguous rows (stride 1 in its last dimension)");
  const int64_t vec = 16 / static_cast<int64_t>(t.element_size());
  if (aligned && (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 || (t.dim() >= 2 && t.stride(-2) % vec)))
    return what + " must be 16-byte aligned with rows a multiple of 16 bytes apart; a view at an odd row or "
                  "column offset is not";
  return "";
}

}  // namespace tw

// Returns the check's message from the binding, if it has one. Checks run in order, so a later one
// may rely on an earlier one (t.size(1) after t.dim() == 2: ATen throws on a missing dimension).
#define TW_TRY(check)                    \
  do {                                   \
    std::string tw_error_ = (check);     \
    if (!tw_error_.empty()) return tw_error_; \
  } while (0)
#endif  // TW_NO_TORCH
