// CUDA implementations of sag_fast::guidance_combine and sag_fast::guidance_shift_: torch-facing
// checks and launches on the current stream; the kernels are in guidance_kernels.cuh.
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE): the stream, the
// device guard and error checks are all this file needs.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "guidance.h"
#include "guidance_kernels.cuh"

namespace sag_fast {
namespace {

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Calls f.template operator()<cuda element type>() for fp32/fp16/bf16 (check_* already rejected the rest).
template <typename F>
void dispatch_cuda_float(at::ScalarType dt, const F& f) {
  switch (dt) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(__half{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    default: TORCH_CHECK_VALUE(false, "sag_fast guidance ops: no CUDA kernel for dtype ", dt);
  }
}

int sm_count(const at::Tensor& t) {
  int n = 0;  // a cheap attribute query (no cudaGetDeviceProperties)
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.get_device()));
  return n;
}

at::Tensor guidance_combine_cuda(const at::Tensor& pred, const at::Tensor& degraded, double cfg_scale,
                                 double sag_scale, int64_t guided_channels) {
  const CombineShape sh = check_combine(pred, degraded, guided_channels, /*allow_fp64=*/false);
  const c10::cuda::CUDAGuard guard(pred.device());
  const at::Tensor p = with_flat_planes(pred);
  const at::Tensor d = with_flat_planes(degraded.narrow(1, 0, sh.guided));
  at::Tensor out = at::empty(combine_output_sizes(pred, sh.batch), pred.options());
  if (out.numel() == 0) return out;
  dispatch_cuda_float(p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    CombineArgs<T> a;
    a.uncond = reinterpret_cast<const T*>(p.const_data_ptr());
    a.cond = a.uncond + (sh.two_way ? sh.batch * p.stride(0) : 0);
    a.degraded = reinterpret_cast<const T*>(d.const_data_ptr());
    a.out = reinterpret_cast<T*>(out.mutable_data_ptr());
    a.batch = sh.batch;
    a.channels = sh.channels;
    a.guided = sh.guided;
    a.plane = sh.plane;
    a.pred_batch_stride = p.stride(0);
    a.pred_channel_stride = p.stride(1);
    a.deg_batch_stride = d.stride(0);
    a.deg_channel_stride = d.stride(1);
    a.cfg_scale = static_cast<float>(cfg_scale);
    a.sag_scale = static_cast<float>(sag_scale);
    a.two_way = sh.two_way;
    C10_CUDA_CHECK(launch_guidance_combine(a, sm_count(p), c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

void guidance_shift_cuda(at::Tensor& pred, const at::Tensor& degraded, double sag_scale, int64_t guided_channels,
                         int64_t uncond_index) {
  const ShiftShape sh = check_shift(pred, degraded, guided_channels, uncond_index, /*allow_fp64=*/false);
  const c10::cuda::CUDAGuard guard(pred.device());
  // Non-flat planes: shift a contiguous copy and write it back, so the result lands in pred itself.
  at::Tensor work = planes_are_flat(pred) ? pred : pred.contiguous();
  const at::Tensor d = with_flat_planes(degraded.narrow(1, 0, sh.guided));
  if (work.numel() != 0) {
    dispatch_cuda_float(work.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      ShiftArgs<T> a;
      a.pred = reinterpret_cast<T*>(work.mutable_data_ptr());
      a.degraded = reinterpret_cast<const T*>(d.const_data_ptr());
      a.batch = sh.batch;
      a.ways = sh.ways;
      a.uncond_index = sh.uncond_index;
      a.guided = sh.guided;
      a.plane = sh.plane;
      a.pred_batch_stride = work.stride(0);
      a.pred_channel_stride = work.stride(1);
      a.deg_batch_stride = d.stride(0);
      a.deg_channel_stride = d.stride(1);
      a.sag_scale = static_cast<float>(sag_scale);
      C10_CUDA_CHECK(launch_guidance_shift(a, sm_count(work), c10::cuda::getCurrentCUDAStream()));
    });
  }
  if (!work.is_same(pred)) pred.copy_(work);
}

}  // namespace
}  // namespace sag_fast

TORCH_LIBRARY_IMPL(sag_fast, CUDA, m) {
  m.impl("guidance_combine", &sag_fast::guidance_combine_cuda);
  m.impl("guidance_shift_", &sag_fast::guidance_shift_cuda);
}
