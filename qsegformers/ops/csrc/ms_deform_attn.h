// Shared argument checks of the multi-scale deformable attention kernels (CPU and CUDA).
//
// The kernels index value with spatial_shapes and level_start_index without bounds checks, so these
// checks are what keeps an inconsistent call from reading out of bounds. Bad shapes or sizes raise
// c10::ValueError, bad dtypes c10::TypeError (ValueError / TypeError in Python).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <string>
#include <vector>

namespace qsegformers {

namespace detail {

// Checks of the level sizes against value's length S and level_start_index. Reads the values of the two
// tensors, so both must be host tensors.
inline void check_level_sizes(int64_t num_positions, const at::Tensor& spatial_shapes_host,
                              const at::Tensor& level_start_index_host) {
  const at::Tensor shapes_t = spatial_shapes_host.contiguous();
  const at::Tensor starts_t = level_start_index_host.contiguous();
  const int64_t* shapes = shapes_t.const_data_ptr<int64_t>();
  const int64_t* starts = starts_t.const_data_ptr<int64_t>();
  const int64_t num_levels = shapes_t.size(0);
  std::vector<int64_t> expected_starts(num_levels);
  std::string terms;
  int64_t total = 0;
  for (int64_t level = 0; level < num_levels; ++level) {
    const int64_t height = shapes[2 * level], width = shapes[2 * level + 1];
    TORCH_CHECK_VALUE(height >= 0 && width >= 0, "ms_deform_attn: spatial_shapes must be non-negative, level ", level,
                      " is ", height, " x ", width);
    expected_starts[level] = total;
    total += height * width;
    terms += c10::str(level > 0 ? " + " : "", height, "*", width);
  }
  TORCH_CHECK_VALUE(num_positions == total, "ms_deform_attn: value has ", num_positions,
                    " positions but spatial_shapes sums to ", total, " (= ", num_levels > 0 ? terms : "0", ")");
  const c10::IntArrayRef expected(expected_starts), actual(starts, num_levels);
  TORCH_CHECK_VALUE(expected == actual,
                    "ms_deform_attn: level_start_index must be the exclusive cumulative sum of H*W over "
                    "spatial_shapes, ",
                    expected, ", got ", actual);
}

}  // namespace detail

// Checks ranks, sizes, dtypes and devices of all arguments, and, when check_levels is set, that the level
// sizes match value's length and level_start_index. With spatial_shapes on the GPU, the level check
// copies it and level_start_index to the host: a small blocking sync (L x 2 and L int64 values).
inline void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                        const at::Tensor& attention_weights, bool check_levels = true) {
  TORCH_CHECK_VALUE(value.dim() == 4, "ms_deform_attn: value must be N x S x M x D (4 dims), got ", value.sizes());
  const auto dtype = value.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "ms_deform_attn: value must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "ms_deform_attn: spatial_shapes must be L x 2 (H, W per level), got ", spatial_shapes.sizes());
  TORCH_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong, "ms_deform_attn: spatial_shapes must be int64, got ",
                   spatial_shapes.scalar_type());
  const int64_t n = value.size(0), m = value.size(2), num_levels = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == num_levels,
                    "ms_deform_attn: level_start_index must have L = ", num_levels,
                    " entries (one per row of spatial_shapes), got shape ", level_start_index.sizes());
  TORCH_CHECK_TYPE(level_start_index.scalar_type() == at::kLong,
                   "ms_deform_attn: level_start_index must be int64, got ", level_start_index.scalar_type());
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(0) == n &&
                        sampling_locations.size(2) == m && sampling_locations.size(3) == num_levels &&
                        sampling_locations.size(5) == 2,
                    "ms_deform_attn: sampling_locations must be N x Lq x M x L x P x 2 with N = ", n, ", M = ", m,
                    " (from value) and L = ", num_levels, " (from spatial_shapes), got ", sampling_locations.sizes());
  TORCH_CHECK_VALUE(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
                    "ms_deform_attn: attention_weights must be N x Lq x M x L x P = ",
                    sampling_locations.sizes().slice(0, 5), " (from sampling_locations), got ",
                    attention_weights.sizes());
  TORCH_CHECK_TYPE(sampling_locations.scalar_type() == dtype && attention_weights.scalar_type() == dtype,
                   "ms_deform_attn: value, sampling_locations and attention_weights must have one dtype, got ", dtype,
                   ", ", sampling_locations.scalar_type(), " and ", attention_weights.scalar_type());
  const auto device = value.device();
  TORCH_CHECK_VALUE(sampling_locations.device() == device && attention_weights.device() == device &&
                        spatial_shapes.device() == device && level_start_index.device() == device,
                    "ms_deform_attn: all tensors must be on one device, got value on ", device,
                    ", spatial_shapes on ", spatial_shapes.device(), ", level_start_index on ",
                    level_start_index.device(), ", sampling_locations on ", sampling_locations.device(),
                    ", attention_weights on ", attention_weights.device());
  if (check_levels) {
    detail::check_level_sizes(value.size(1), spatial_shapes.to(at::kCPU), level_start_index.to(at::kCPU));
  }
}

}  // namespace qsegformers
