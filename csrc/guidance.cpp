// Argument checks and layout helpers of the guidance ops (see guidance.h): the checks the C++ kernels run.
// The fakes in sag_fast/ops/guidance.py check in Python (they see symbolic sizes and the inputs' devices).
#include "guidance.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <string>

namespace sag_fast {
namespace {

// dtypes spelled as Python spells them ("torch.float32"), so that these messages are the fakes' word for word
std::string py_dtype(at::ScalarType dt) { return "torch." + std::string(c10::getDtypeNames(dt).first); }

void check_pair(const char* op, const at::Tensor& pred, const at::Tensor& degraded, bool allow_fp64) {
  const auto dt = pred.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || (allow_fp64 && dt == at::kDouble);
  TORCH_CHECK_VALUE(ok, op, ": pred must be float32, float16 or bfloat16", allow_fp64 ? " (or float64)" : "",
                    " on ", pred.device().type(), ", got ", py_dtype(dt));
  TORCH_CHECK_VALUE(degraded.scalar_type() == dt, op, ": degraded has dtype ", py_dtype(degraded.scalar_type()),
                    " but pred has ", py_dtype(dt), "; they must have the same dtype");
  TORCH_CHECK_VALUE(degraded.device() == pred.device(), op, ": degraded is on ", degraded.device(),
                    " but pred is on ", pred.device(), "; they must be on the same device");
  TORCH_CHECK_VALUE(pred.dim() >= 2, op, ": pred must have at least 2 dims (batch, channels, ...), got shape ",
                    pred.sizes());
  TORCH_CHECK_VALUE(degraded.dim() == pred.dim() && degraded.sizes().slice(2) == pred.sizes().slice(2), op,
                    ": degraded must match pred past the channels (B, C', ...) vs (k*B, C, ...), got degraded ",
                    degraded.sizes(), " and pred ", pred.sizes());
}

int64_t check_guided(const char* op, const at::Tensor& pred, const at::Tensor& degraded, int64_t guided_channels) {
  const int64_t c = pred.size(1);
  TORCH_CHECK_VALUE(guided_channels == -1 || (guided_channels >= 1 && guided_channels <= c), op,
                    ": guided_channels=", guided_channels, " must be -1 (all) or in 1..", c,
                    " (the channels of pred)");
  const int64_t g = guided_channels == -1 ? c : guided_channels;
  TORCH_CHECK_VALUE(g >= 1, op, ": pred has no channels to guide, got shape ", pred.sizes());
  TORCH_CHECK_VALUE(g <= degraded.size(1), op, ": guided_channels=", g, " exceeds the channels of degraded (",
                    degraded.size(1), ")");
  return g;
}

}  // namespace

CombineShape check_combine(const at::Tensor& pred, const at::Tensor& degraded, int64_t guided_channels,
                           bool allow_fp64) {
  constexpr const char* op = "guidance_combine";
  check_pair(op, pred, degraded, allow_fp64);
  const int64_t b = degraded.size(0);
  TORCH_CHECK_VALUE(pred.size(0) == b || pred.size(0) == 2 * b, op, ": pred batch ", pred.size(0),
                    " must be B (one way) or 2B (two ways, unconditional first) for degraded batch B=", b);
  const int64_t g = check_guided(op, pred, degraded, guided_channels);
  return {b, pred.size(1), g, c10::multiply_integers(pred.sizes().slice(2)), pred.size(0) != b};
}

ShiftShape check_shift(const at::Tensor& pred, const at::Tensor& degraded, int64_t guided_channels,
                       int64_t uncond_index, bool allow_fp64) {
  constexpr const char* op = "guidance_shift_";
  check_pair(op, pred, degraded, allow_fp64);
  const int64_t b = degraded.size(0);
  TORCH_CHECK_VALUE(b > 0 && pred.size(0) % b == 0 && pred.size(0) > 0, op, ": pred batch ", pred.size(0),
                    " must be a positive multiple k*B of degraded batch B=", b);
  const int64_t ways = pred.size(0) / b;
  TORCH_CHECK_VALUE(uncond_index >= 0 && uncond_index < ways, op, ": uncond_index=", uncond_index,
                    " must be in 0..", ways - 1, " (pred holds ", ways, " ways)");
  const int64_t g = check_guided(op, pred, degraded, guided_channels);
  // pred is written in place: each element needs its own memory, and degraded must not alias it.
  TORCH_CHECK_VALUE(at::has_internal_overlap(pred) != at::MemOverlap::Yes, op,
                    ": pred has elements that share memory (an expanded view?); it is written in place, so every "
                    "element needs its own memory");
  const auto overlap = at::get_overlap_status(pred, degraded);
  TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
                    ": degraded shares memory with pred, which is written in place");
  return {b, ways, uncond_index, pred.size(1), g, c10::multiply_integers(pred.sizes().slice(2))};
}

bool planes_are_flat(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;  // the stride of a size-1 dim is never used
    if (t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

at::Tensor with_flat_planes(const at::Tensor& t) { return planes_are_flat(t) ? t : t.contiguous(); }

PlaneStrides plane_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

std::vector<int64_t> combine_output_sizes(const at::Tensor& pred, int64_t batch) {
  std::vector<int64_t> sizes = pred.sizes().vec();
  sizes[0] = batch;
  return sizes;
}

}  // namespace sag_fast
