// The CUDA kernels of the guidance ops, in plain CUDA (no torch headers) so that they compile and are
// checked for register spills on their own (tests/test_csrc_nvcc.py). guidance_cuda.cu launches them.
//
// Layout (see guidance.h): every (sample, channel) plane is one contiguous span of `plane` elements,
// samples and channels at any stride. blockIdx.y walks planes, blockIdx.x/threadIdx.x the elements of a
// plane, both with grid-stride loops, so no per-element division. VEC is the number of elements per
// memory access: 16 bytes' worth when every plane start of every tensor is 16-byte aligned and the
// plane length is a multiple of it, else 1 (the scalar fallback, for odd sizes and offset views).
// Arithmetic is fp32 for every element type (float, __half, __nv_bfloat16).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sag_fast {

constexpr int kGuidanceThreads = 256;
// At least 4 resident blocks (1024 threads) per SM: caps registers at 64 per thread. With the thread
// count alone, ptxas aims at 8 blocks (32 registers) and spills the fp32 shift kernel on sm_80.
constexpr int kGuidanceMinBlocks = 4;

template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

// VEC elements loaded and stored as one access (ld/st.global.v4 for 16 bytes).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
struct CombineArgs {
  const T* uncond;    // pred's first way (its only way when !two_way)
  const T* cond;      // pred's second way: uncond + batch * pred_batch_stride (== uncond when !two_way)
  const T* degraded;  // (batch, >= guided, plane)
  T* out;             // (batch, channels, plane), contiguous
  int64_t batch, channels, guided, plane;
  int64_t pred_batch_stride, pred_channel_stride, deg_batch_stride, deg_channel_stride;
  float cfg_scale, sag_scale;
  bool two_way;
};

// out = u + w*(c - u) + s*(u - d) on the guided channels (u + s*(u - d) for one way); the other
// channels are the conditional way's.
template <typename T, int VEC>
__global__ void __launch_bounds__(kGuidanceThreads, kGuidanceMinBlocks) guidance_combine_kernel(const CombineArgs<T> a) {
  using P = Pack<T, VEC>;
  const int64_t planes = a.batch * a.channels;
  const int64_t packs = a.plane / VEC;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = blockIdx.y; p < planes; p += gridDim.y) {
    const int64_t b = p / a.channels, ch = p - b * a.channels;
    const int64_t off = b * a.pred_batch_stride + ch * a.pred_channel_stride;
    const P* __restrict__ c = reinterpret_cast<const P*>(a.cond + off);
    P* __restrict__ o = reinterpret_cast<P*>(a.out + p * a.plane);
    if (ch >= a.guided) {
      for (int64_t i = first; i < packs; i += step) o[i] = c[i];
      continue;
    }
    const P* __restrict__ u = reinterpret_cast<const P*>(a.uncond + off);
    const P* __restrict__ d =
        reinterpret_cast<const P*>(a.degraded + b * a.deg_batch_stride + ch * a.deg_channel_stride);
    for (int64_t i = first; i < packs; i += step) {
      const P pu = u[i];
      const P pd = d[i];
      P r;
      if (a.two_way) {
        const P pc = c[i];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float uu = to_float(pu.v[k]);
          const float acc = uu + a.cfg_scale * (to_float(pc.v[k]) - uu);
          r.v[k] = from_float<T>(acc + a.sag_scale * (uu - to_float(pd.v[k])));
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float uu = to_float(pu.v[k]);
          r.v[k] = from_float<T>(uu + a.sag_scale * (uu - to_float(pd.v[k])));
        }
      }
      o[i] = r;
    }
  }
}

template <typename T>
struct ShiftArgs {
  T* pred;            // (ways * batch, channels, plane), written in place
  const T* degraded;  // (batch, >= guided, plane)
  int64_t batch, ways, uncond_index, guided, plane;
  int64_t pred_batch_stride, pred_channel_stride, deg_batch_stride, deg_channel_stride;
  float sag_scale;
};

// Every way of pred += s*(u - d) on the guided channels, u = way uncond_index. Each thread computes the
// delta of its elements from u before it writes any way, u included; no other thread reads them.
template <typename T, int VEC>
__global__ void __launch_bounds__(kGuidanceThreads, kGuidanceMinBlocks) guidance_shift_kernel(const ShiftArgs<T> a) {
  using P = Pack<T, VEC>;
  const int64_t planes = a.batch * a.guided;
  const int64_t packs = a.plane / VEC;
  const int64_t way_stride = a.batch * a.pred_batch_stride;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = blockIdx.y; p < planes; p += gridDim.y) {
    const int64_t b = p / a.guided, ch = p - b * a.guided;
    T* base = a.pred + b * a.pred_batch_stride + ch * a.pred_channel_stride;
    const P* u = reinterpret_cast<const P*>(base + a.uncond_index * way_stride);
    const P* d = reinterpret_cast<const P*>(a.degraded + b * a.deg_batch_stride + ch * a.deg_channel_stride);
    for (int64_t i = first; i < packs; i += step) {
      const P pu = u[i];
      const P pd = d[i];
      float delta[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) delta[k] = a.sag_scale * (to_float(pu.v[k]) - to_float(pd.v[k]));
      for (int64_t w = 0; w < a.ways; ++w) {
        // Way uncond_index is reloaded too: this thread has not written it yet, so it still holds u.
        P* q = reinterpret_cast<P*>(base + w * way_stride);
        P r = q[i];
#pragma unroll
        for (int k = 0; k < VEC; ++k) r.v[k] = from_float<T>(to_float(r.v[k]) + delta[k]);
        q[i] = r;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------- launch
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Whether every plane start is 16-byte aligned and every plane a whole number of VEC-element packs.
template <typename T>
bool can_vectorize(const void* const* ptrs, int n_ptrs, const int64_t* strides, int n_strides, int64_t plane) {
  constexpr int vec = vec_width<T>();
  for (int i = 0; i < n_ptrs; ++i)
    if (!aligned16(ptrs[i])) return false;
  for (int i = 0; i < n_strides; ++i)
    if (strides[i] % vec != 0) return false;
  return plane % vec == 0;
}

// blockIdx.y over planes (at most 65535, the rest by grid-stride), blockIdx.x over a plane's packs,
// about 8 blocks of 256 threads per SM in all (one or two waves; threads loop over the rest).
inline dim3 guidance_grid(int64_t planes, int64_t packs, int sm_count) {
  const int64_t gy = planes < 65535 ? planes : 65535;
  const int64_t want_x = (packs + kGuidanceThreads - 1) / kGuidanceThreads;
  int64_t budget_x = (static_cast<int64_t>(sm_count) * 8 + gy - 1) / gy;
  if (budget_x < 1) budget_x = 1;
  int64_t gx = want_x < budget_x ? want_x : budget_x;
  if (gx < 1) gx = 1;
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
}

template <typename T>
cudaError_t launch_guidance_combine(const CombineArgs<T>& a, int sm_count, cudaStream_t stream) {
  const int64_t planes = a.batch * a.channels;
  if (planes == 0 || a.plane == 0) return cudaSuccess;
  const void* ptrs[] = {a.uncond, a.cond, a.degraded, a.out};
  const int64_t strides[] = {a.pred_batch_stride, a.pred_channel_stride, a.deg_batch_stride, a.deg_channel_stride};
  constexpr int vec = vec_width<T>();
  if (can_vectorize<T>(ptrs, 4, strides, 4, a.plane)) {
    guidance_combine_kernel<T, vec><<<guidance_grid(planes, a.plane / vec, sm_count), kGuidanceThreads, 0, stream>>>(a);
  } else {
    guidance_combine_kernel<T, 1><<<guidance_grid(planes, a.plane, sm_count), kGuidanceThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_guidance_shift(const ShiftArgs<T>& a, int sm_count, cudaStream_t stream) {
  const int64_t planes = a.batch * a.guided;
  if (planes == 0 || a.plane == 0) return cudaSuccess;
  const void* ptrs[] = {a.pred, a.degraded};
  const int64_t strides[] = {a.pred_batch_stride, a.pred_channel_stride, a.deg_batch_stride, a.deg_channel_stride};
  constexpr int vec = vec_width<T>();
  if (can_vectorize<T>(ptrs, 2, strides, 4, a.plane)) {
    guidance_shift_kernel<T, vec><<<guidance_grid(planes, a.plane / vec, sm_count), kGuidanceThreads, 0, stream>>>(a);
  } else {
    guidance_shift_kernel<T, 1><<<guidance_grid(planes, a.plane, sm_count), kGuidanceThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace sag_fast
