// Shared by the CPU and CUDA implementations of the guidance ops: argument checks and the memory
// layout the kernels walk. Host C++ on ATen; the CUDA kernels themselves are in guidance_kernels.cuh.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sag_fast {

// The kernels see a (batch, channels, ...) tensor as planes: every (sample, channel) pair is one
// contiguous span of `plane` elements, while samples and channels may sit at any stride. That covers
// contiguous tensors, the two halves of pred read in place, and channel slices such as `t[:, :4]`.
struct PlaneStrides {
  int64_t batch;
  int64_t channel;
};

struct CombineShape {
  int64_t batch;     // B, the batch of degraded and of the output
  int64_t channels;  // C of pred and of the output
  int64_t guided;    // the first `guided` channels are guided, the rest copied from the conditional way
  int64_t plane;     // elements per (sample, channel): the product of the dims past the channels
  bool two_way;      // pred is (2B, C, ...), unconditional half first
};

struct ShiftShape {
  int64_t batch, ways, uncond_index, channels, guided, plane;
};

// Checks pred and degraded (dtype, device, dims, batch, channels) and raises a ValueError naming
// the argument. CUDA has no fp64 kernel, so it passes allow_fp64 = false.
CombineShape check_combine(const at::Tensor& pred, const at::Tensor& degraded, int64_t guided_channels,
                           bool allow_fp64);
// check_shift also refuses a pred with self-overlapping elements or one that aliases degraded.
ShiftShape check_shift(const at::Tensor& pred, const at::Tensor& degraded, int64_t guided_channels,
                       int64_t uncond_index, bool allow_fp64);

// Whether the dims past the channels of t form one contiguous span per (sample, channel).
bool planes_are_flat(const at::Tensor& t);
// t itself when its planes are flat, else a contiguous copy (channels_last, transposed, expanded).
at::Tensor with_flat_planes(const at::Tensor& t);
PlaneStrides plane_strides(const at::Tensor& t);

// Shape of the output of guidance_combine: pred's with the batch of degraded.
std::vector<int64_t> combine_output_sizes(const at::Tensor& pred, int64_t batch);

}  // namespace sag_fast
