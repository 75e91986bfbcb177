// The CPU kernel of sag_fast::degrade (schema in module.cpp; the CUDA kernel is the Triton one that
// sag_fast/ops/degrade.py registers):
//     y = x + M * (G_sigma * s - s),  s = c1*x + c2*model_output
// G_sigma: the normalised 1-D Gaussian of reference.gaussian_kernel1d (double, then fp32), applied along
// the width and then the height with reflect padding. M: the (B, h, w) mask, nonzero = blur,
// nearest-upsampled with PyTorch's rule src = min(floor(dst * scale), in - 1), scale = fp32(in) / fp32(out).
// Video latents (B, C, F, H, W) are blurred per frame: a plane is (b, c, frame), addressed through the frame
// stride (no copy), and the (B, f, h, w) mask is upsampled to (F, H, W) with the same rule per axis. A 4-D x
// is the case F = 1.
//
// One pass per (b, c) plane, parallel over planes (and row chunks when the planes do not split evenly
// over the threads); the loops are in degrade_cpu_kernel.h. Math in fp32; x and model_output are fp32,
// fp16 or bf16 and are read through their strides (any layout, no copies), the output is empty_like(x)
// (x's memory format) written through its strides. Rows with unit column stride take plain pointer loops.
// The kernel is compiled twice, baseline x86-64 and AVX2, and picked at run time. float64 inputs take a
// composite ATen path in float64 (reflection pad, two 1-D convolutions, nearest upsampling).
#include <ATen/Dispatch.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace sag_fast {
namespace degrade_cpu {

// Elements per thread below which a task is not worth a thread of its own.
constexpr int64_t kMinElementsPerThread = 16384;

struct DegradeArgs {
  int64_t B, C, F, H, W, K;     // F: frames (1 for 4-D x)
  const void* x;
  const void* o;
  void* y;
  int64_t sx[4], so[4], sy[4];  // element strides (b, c, h, w)
  int64_t sxf, sof, syf;        // frame strides (0 for 4-D x)
  const float* g;               // K normalised taps
  const float* c1;              // B coefficients each
  const float* c2;
  const float* mask;            // (B, mf, mh, mw) contiguous 0/1, or nullptr (blur everywhere)
  int64_t mf, mh, mw;
  const int64_t* mframe;        // F: the mask frame each frame reads
  const int64_t* mrow;          // H: the mask row each output row reads
  const int64_t* mcol;          // W: the mask column each output column reads
  int64_t chunks;               // row chunks per plane
};

}  // namespace degrade_cpu
}  // namespace sag_fast

// GCC vector types wider than the baseline ISA only live in registers inside inlined functions.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#define SAG_DEGRADE_ISA generic
#include "degrade_cpu_kernel.h"
#undef SAG_DEGRADE_ISA
#if defined(__x86_64__) && defined(__GNUC__)
#define SAG_DEGRADE_HAS_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define SAG_DEGRADE_ISA avx2
#include "degrade_cpu_kernel.h"
#undef SAG_DEGRADE_ISA
#pragma GCC pop_options
#endif
#pragma GCC diagnostic pop

namespace sag_fast {
namespace degrade_cpu {
namespace {

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "degrade: ", name, " is on ", t.device(), " but x is on ", x.device(),
                    "; they must be on the same device");
}

std::vector<double> gaussian_taps(int64_t K, double sigma) {
  // reference.gaussian_kernel1d: linspace(-(K-1)/2, (K-1)/2, K) is the integers -P..P exactly
  const int64_t P = K / 2;
  std::vector<double> pdf(K);
  double sum = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    const double t = static_cast<double>(i - P) / sigma;
    pdf[i] = std::exp(-0.5 * (t * t));
    sum += pdf[i];
  }
  for (double& v : pdf) v /= sum;
  return pdf;
}

// F.interpolate(mode="nearest")'s source index of every output index.
std::vector<int64_t> nearest_index(int64_t in, int64_t out) {
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  std::vector<int64_t> idx(out);
  for (int64_t d = 0; d < out; ++d)
    idx[d] = std::min(static_cast<int64_t>(std::floor(static_cast<float>(d) * scale)), in - 1);
  return idx;
}

// A 0-dim or (B,) floating tensor as B fp32 values (any stride, fp16/bf16/fp32/fp64).
void check_coefficient(const at::Tensor& c, const at::Tensor& x, const char* name) {
  check_same_device(c, x, name);
  TORCH_CHECK_VALUE(at::isFloatingType(c.scalar_type()), "degrade: ", name,
                    " must be a floating point tensor, got ", c.scalar_type());
  const int64_t B = x.size(0);
  TORCH_CHECK_VALUE(c.dim() == 0 || (c.dim() == 1 && c.size(0) == B), "degrade: ", name,
                    " must be 0-dim or have shape (", B, ",), got ", c.sizes());
}

std::vector<float> per_sample(const at::Tensor& c, int64_t B) {
  std::vector<float> v(B);
  const int64_t stride = c.dim() == 0 ? 0 : c.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "degrade_cpu", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) v[b] = static_cast<float>(p[b * stride]);
  });
  return v;
}

// The low-resolution (B, f, h, w) mask as contiguous fp32 0/1 (nonzero = 1), read through its strides.
std::vector<float> mask_values(const at::Tensor& m) {
  const int64_t B = m.size(0), f = m.size(1), h = m.size(2), w = m.size(3);
  std::vector<float> v(B * f * h * w);
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, m.scalar_type(), "degrade_cpu", [&] {
    const scalar_t* p = m.const_data_ptr<scalar_t>();
    float* out = v.data();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < f; ++t)
        for (int64_t i = 0; i < h; ++i)
          for (int64_t j = 0; j < w; ++j) {
            const int64_t at = b * m.stride(0) + t * m.stride(1) + i * m.stride(2) + j * m.stride(3);
            *out++ = static_cast<float>(p[at]) != 0.0f ? 1.0f : 0.0f;
          }
  });
  return v;
}

// Row chunks per plane: one when the planes spread evenly over the threads (or there are many),
// else enough chunks for ~4 tasks per thread, each at least 16 rows (halo recomputation <= 2P/16).
int64_t row_chunks(int64_t planes, int64_t H, int64_t P) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || planes % threads == 0 || planes >= 8 * threads) return 1;
  const int64_t want = (4 * threads + planes - 1) / planes;
  const int64_t min_rows = std::max<int64_t>(16, 2 * P);
  const int64_t chunks = std::max<int64_t>(1, std::min(want, H / min_rows));
  const int64_t rows = (H + chunks - 1) / chunks;
  return (H + rows - 1) / rows;
}

bool has_avx2() {
#ifdef SAG_DEGRADE_HAS_AVX2
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
#else
  return false;
#endif
}

// float64: the same math composed of ATen ops, in float64 throughout (video: planes are (b, c, frame)).
at::Tensor degrade_fp64(const at::Tensor& x, const at::Tensor& model_output, const std::optional<at::Tensor>& mask,
                        const at::Tensor& c1, const at::Tensor& c2, int64_t kernel_size, double sigma) {
  const int64_t B = x.size(0), H = x.size(-2), W = x.size(-1), P = kernel_size / 2;
  std::vector<int64_t> per_shape(x.dim(), 1);
  const auto per = [&](const at::Tensor& c) {
    per_shape[0] = c.dim() == 0 ? 1 : B;
    return c.to(at::kDouble).reshape(per_shape);
  };
  const at::Tensor s = per(c1) * x + per(c2) * model_output;
  const std::vector<double> g = gaussian_taps(kernel_size, sigma);
  at::Tensor taps = at::empty({kernel_size}, x.options().dtype(at::kDouble));
  std::copy(g.begin(), g.end(), taps.mutable_data_ptr<double>());
  at::Tensor blurred = at::reflection_pad2d(s.reshape({-1, 1, H, W}), {P, P, P, P});
  blurred = at::conv2d(at::conv2d(blurred, taps.view({1, 1, 1, kernel_size})), taps.view({1, 1, kernel_size, 1}));
  at::Tensor delta = blurred.view(x.sizes()) - s;
  if (mask.has_value()) {
    const at::Tensor m = mask->unsqueeze(1).to(at::kDouble);
    const at::Tensor up =
        (x.dim() == 5 ? at::upsample_nearest3d(m, {x.size(2), H, W}) : at::upsample_nearest2d(m, {H, W})) != 0;
    delta = delta * up;
  }
  at::Tensor y = at::empty_like(x);
  return y.copy_(x + delta);
}

at::Tensor degrade_cpu(const at::Tensor& x, const at::Tensor& model_output, const std::optional<at::Tensor>& mask,
                       const at::Tensor& c1, const at::Tensor& c2, int64_t kernel_size, double sigma) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(x.device().is_cpu(), "degrade: x must be a CPU tensor for the CPU kernel, got ", x.device());
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                    "degrade: x must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK_VALUE(x.dim() == 4 || x.dim() == 5,
                    "degrade: x must be (B, C, H, W) or a video (B, C, F, H, W), got shape ", x.sizes());
  const bool video = x.dim() == 5;
  check_same_device(model_output, x, "model_output");
  TORCH_CHECK_VALUE(model_output.scalar_type() == dt, "degrade: model_output must have x's dtype ", dt,
                    ", got ", model_output.scalar_type());
  TORCH_CHECK_VALUE(model_output.sizes() == x.sizes(), "degrade: model_output must have x's shape ",
                    x.sizes(), ", got ", model_output.sizes());
  check_coefficient(c1, x, "c1");
  check_coefficient(c2, x, "c2");
  const int64_t B = x.size(0), C = x.size(1), F = video ? x.size(2) : 1, H = x.size(-2), W = x.size(-1);
  const int64_t P = kernel_size / 2;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_same_device(m, x, "mask");
    bool ok = m.dim() == x.dim() - 1 && m.size(0) == B;
    for (int64_t d = 1; ok && d < m.dim(); ++d) ok = m.size(d) >= 1;
    TORCH_CHECK_VALUE(ok, "degrade: mask must be (B=", B,
                      video ? ", f, h, w) with f, h, w >= 1" : ", h, w) with h, w >= 1", " for x of shape ", x.sizes(),
                      ", got ", m.sizes());
    TORCH_CHECK_VALUE(!at::isComplexType(m.scalar_type()), "degrade: mask must be bool, integer or floating point, got ",
                      m.scalar_type());
  }
  TORCH_CHECK_VALUE(kernel_size >= 1 && kernel_size % 2 == 1, "degrade: kernel_size must be a positive odd int, got ",
                    kernel_size);
  TORCH_CHECK_VALUE(sigma > 0 && std::isfinite(sigma), "degrade: sigma must be a positive finite number, got ",
                    sigma);
  TORCH_CHECK_VALUE(P < H && P < W, "degrade: kernel_size=", kernel_size, " needs height and width > ", P,
                    " for reflect padding, got height=", H, ", width=", W);
  if (dt == at::kDouble) return degrade_fp64(x, model_output, mask, c1, c2, kernel_size, sigma);
  const std::vector<float> cv1 = per_sample(c1, B), cv2 = per_sample(c2, B);
  std::vector<float> mv;
  std::vector<int64_t> mframe{0}, mrow, mcol;
  int64_t mf = 1, mh = 0, mw = 0;
  if (mask.has_value()) {
    const at::Tensor m = video ? *mask : mask->unsqueeze(1);  // (B, f, h, w), f = 1 for an image
    mf = m.size(1);
    mh = m.size(2);
    mw = m.size(3);
    mv = mask_values(m);
    mframe = nearest_index(mf, F);
    mrow = nearest_index(mh, H);
    mcol = nearest_index(mw, W);
  }
  at::Tensor y = at::empty_like(x);  // x's memory format (contiguous, channels_last, or x's dense strides)
  if (y.numel() == 0) return y;
  std::vector<float> g;
  for (double v : gaussian_taps(kernel_size, sigma)) g.push_back(static_cast<float>(v));
  DegradeArgs a{};
  a.B = B, a.C = C, a.F = F, a.H = H, a.W = W, a.K = kernel_size;
  a.x = x.const_data_ptr(), a.o = model_output.const_data_ptr(), a.y = y.mutable_data_ptr();
  const int64_t dims[4] = {0, 1, x.dim() - 2, x.dim() - 1};  // b, c, h, w
  for (int d = 0; d < 4; ++d) {
    a.sx[d] = x.stride(dims[d]);
    a.so[d] = model_output.stride(dims[d]);
    a.sy[d] = y.stride(dims[d]);
  }
  a.sxf = video ? x.stride(2) : 0, a.sof = video ? model_output.stride(2) : 0, a.syf = video ? y.stride(2) : 0;
  a.g = g.data(), a.c1 = cv1.data(), a.c2 = cv2.data();
  a.mask = mask.has_value() ? mv.data() : nullptr;
  a.mf = mf, a.mh = mh, a.mw = mw, a.mframe = mframe.data(), a.mrow = mrow.data(), a.mcol = mcol.data();
  a.chunks = row_chunks(B * C * F, H, P);
#ifdef SAG_DEGRADE_HAS_AVX2
  if (has_avx2()) {
    avx2::dispatch(a, dt);
    return y;
  }
#endif
  generic::dispatch(a, dt);
  return y;
}

}  // namespace
}  // namespace degrade_cpu
}  // namespace sag_fast

TORCH_LIBRARY_IMPL(sag_fast, CPU, m) { m.impl("degrade", &sag_fast::degrade_cpu::degrade_cpu); }
