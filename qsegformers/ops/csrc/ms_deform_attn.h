// Shared argument checks of the multi-scale deformable attention kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace qsegformers {

inline void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                        const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be N x S x M x D, got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be L x 2, got ", spatial_shapes.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  const int64_t num_levels = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == num_levels,
              "ms_deform_attn: level_start_index must have L = ", num_levels, " entries");
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(0) == value.size(0) &&
                  sampling_locations.size(2) == value.size(2) && sampling_locations.size(3) == num_levels &&
                  sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be N x Lq x M x L x P x 2, got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be N x Lq x M x L x P, got ", attention_weights.sizes());
  TORCH_CHECK(value.scalar_type() == sampling_locations.scalar_type() &&
                  value.scalar_type() == attention_weights.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must have one dtype");
  TORCH_CHECK(value.device() == sampling_locations.device() && value.device() == attention_weights.device() &&
                  value.device() == spatial_shapes.device() && value.device() == level_start_index.device(),
              "ms_deform_attn: all tensors must be on one device");
}

}  // namespace qsegformers
