// CPU kernels of sag_fast::guidance_combine and sag_fast::guidance_shift_.
//
// Work is split with at::parallel_for over the flat (plane, element) index space, and each task walks
// its range as contiguous spans of one (sample, channel) plane: one division per span, none per
// element, so the inner loops are plain pointer loops the compiler vectorises (fp32/fp64).
// Arithmetic is in at::opmath_type: fp32 for fp16/bf16/fp32, fp64 for fp64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "guidance.h"

namespace sag_fast {
namespace {

// Elements per task: large enough that the task start is noise, small enough to split 64K-element planes.
constexpr int64_t kGrain = 16384;
// Elements per block of guidance_shift_'s delta buffer (kept on the stack, in L1).
constexpr int64_t kShiftBlock = 512;

// Calls f(plane_index, offset, length) for contiguous spans covering planes x plane elements, in parallel.
template <typename F>
void for_each_span(int64_t planes, int64_t plane, const F& f) {
  at::parallel_for(0, planes * plane, kGrain, [&](int64_t begin, int64_t end) {
    int64_t p = begin / plane;
    int64_t off = begin - p * plane;
    while (begin < end) {
      const int64_t n = std::min(plane - off, end - begin);
      f(p, off, n);
      begin += n;
      ++p;
      off = 0;
    }
  });
}

// out = u + w*(c - u) + s*(u - d), in the reference's order of operations; one way drops the w term.
template <bool TwoWay, typename T, typename A>
void combine_span(const T* __restrict u, const T* __restrict c, const T* __restrict d, T* __restrict out,
                  int64_t n, A w, A s) {
  for (int64_t i = 0; i < n; ++i) {
    const A uu = static_cast<A>(u[i]);
    A acc = uu;
    if constexpr (TwoWay) acc = acc + w * (static_cast<A>(c[i]) - uu);
    out[i] = static_cast<T>(acc + s * (uu - static_cast<A>(d[i])));
  }
}

template <typename T>
void combine_kernel(const T* pred, const T* deg, T* out, const CombineShape& sh, PlaneStrides ps,
                    PlaneStrides ds, double cfg_scale, double sag_scale) {
  using A = at::opmath_type<T>;
  const int64_t cond_offset = sh.two_way ? sh.batch * ps.batch : 0;
  const A w = static_cast<A>(cfg_scale), s = static_cast<A>(sag_scale);
  for_each_span(sh.batch * sh.channels, sh.plane, [&](int64_t p, int64_t off, int64_t n) {
    const int64_t b = p / sh.channels, ch = p - b * sh.channels;
    const T* u = pred + b * ps.batch + ch * ps.channel + off;
    const T* c = u + cond_offset;
    T* o = out + p * sh.plane + off;
    if (ch >= sh.guided) {
      std::copy_n(c, n, o);  // a learned variance: the conditional way's, untouched
    } else if (sh.two_way) {
      combine_span<true>(u, c, deg + b * ds.batch + ch * ds.channel + off, o, n, w, s);
    } else {
      combine_span<false>(u, c, deg + b * ds.batch + ch * ds.channel + off, o, n, w, s);
    }
  });
}

template <typename T>
void shift_kernel(T* pred, const T* deg, const ShiftShape& sh, PlaneStrides ps, PlaneStrides ds, double sag_scale) {
  using A = at::opmath_type<T>;
  const A s = static_cast<A>(sag_scale);
  const int64_t way_stride = sh.batch * ps.batch;
  for_each_span(sh.batch * sh.guided, sh.plane, [&](int64_t p, int64_t off, int64_t n) {
    const int64_t b = p / sh.guided, ch = p - b * sh.guided;
    T* base = pred + b * ps.batch + ch * ps.channel + off;
    const T* u = base + sh.uncond_index * way_stride;
    const T* d = deg + b * ds.batch + ch * ds.channel + off;
    A delta[kShiftBlock];
    for (int64_t i0 = 0; i0 < n; i0 += kShiftBlock) {
      const int64_t m = std::min(kShiftBlock, n - i0);
      // The whole block's delta is read from u before any way (u included) is written.
      for (int64_t i = 0; i < m; ++i) delta[i] = s * (static_cast<A>(u[i0 + i]) - static_cast<A>(d[i0 + i]));
      for (int64_t k = 0; k < sh.ways; ++k) {
        T* __restrict q = base + k * way_stride + i0;
        for (int64_t i = 0; i < m; ++i) q[i] = static_cast<T>(static_cast<A>(q[i]) + delta[i]);
      }
    }
  });
}

at::Tensor guidance_combine_cpu(const at::Tensor& pred, const at::Tensor& degraded, double cfg_scale,
                                double sag_scale, int64_t guided_channels) {
  const CombineShape sh = check_combine(pred, degraded, guided_channels, /*allow_fp64=*/true);
  // Strided inputs: planes must be flat (guidance.h); anything else is copied to contiguous first.
  const at::Tensor p = with_flat_planes(pred);
  const at::Tensor d = with_flat_planes(degraded.narrow(1, 0, sh.guided));
  at::Tensor out = at::empty(combine_output_sizes(pred, sh.batch), pred.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "guidance_combine_cpu", [&] {
    combine_kernel<scalar_t>(p.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(),
                             out.mutable_data_ptr<scalar_t>(), sh, plane_strides(p), plane_strides(d), cfg_scale,
                             sag_scale);
  });
  return out;
}

void guidance_shift_cpu(at::Tensor& pred, const at::Tensor& degraded, double sag_scale, int64_t guided_channels,
                        int64_t uncond_index) {
  const ShiftShape sh = check_shift(pred, degraded, guided_channels, uncond_index, /*allow_fp64=*/true);
  // A pred whose planes are not flat is shifted in a contiguous copy that is then written back, so the
  // result always lands in pred itself.
  at::Tensor work = planes_are_flat(pred) ? pred : pred.contiguous();
  const at::Tensor d = with_flat_planes(degraded.narrow(1, 0, sh.guided));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "guidance_shift_cpu", [&] {
    shift_kernel<scalar_t>(work.mutable_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(), sh,
                           plane_strides(work), plane_strides(d), sag_scale);
  });
  if (!work.is_same(pred)) pred.copy_(work);
}

}  // namespace
}  // namespace sag_fast

TORCH_LIBRARY_IMPL(sag_fast, CPU, m) {
  m.impl("guidance_combine", &sag_fast::guidance_combine_cpu);
  m.impl("guidance_shift_", &sag_fast::guidance_shift_cpu);
}
