// CPU kernels of multi-scale deformable attention (forward and backward).
//
// Bilinear sampling with zero padding and the align_corners=False pixel convention of
// F.grid_sample: a normalised x in [0, 1] is pixel coordinate x * W - 0.5 (pixel centres at integers).
// float32/float64 run natively; float16/bfloat16 are computed in float32 and cast back.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../ms_deform_attn.h"

namespace qsegformers {
namespace {

struct Dims {
  int64_t n, s, m, d, lq, l, p;
};

Dims dims_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0), value.size(1), value.size(2), value.size(3),
          sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

// One bilinear sample: the four corners (row-major flat index into the level, or -1 when outside) and
// their weights, plus the fractional parts needed by the backward pass.
template <typename scalar_t>
struct Bilinear {
  int64_t idx[4];
  scalar_t w[4];
  scalar_t lh, lw;
  bool inside;

  Bilinear(scalar_t x, scalar_t y, int64_t height, int64_t width) {
    const scalar_t h_im = y * static_cast<scalar_t>(height) - scalar_t(0.5);
    const scalar_t w_im = x * static_cast<scalar_t>(width) - scalar_t(0.5);
    inside = h_im > scalar_t(-1) && w_im > scalar_t(-1) && h_im < static_cast<scalar_t>(height) &&
             w_im < static_cast<scalar_t>(width);
    if (!inside) return;
    const int64_t h_low = static_cast<int64_t>(std::floor(h_im));
    const int64_t w_low = static_cast<int64_t>(std::floor(w_im));
    const int64_t h_high = h_low + 1, w_high = w_low + 1;
    lh = h_im - static_cast<scalar_t>(h_low);
    lw = w_im - static_cast<scalar_t>(w_low);
    const scalar_t hh = 1 - lh, hw = 1 - lw;
    const bool top = h_low >= 0, bottom = h_high < height, left = w_low >= 0, right = w_high < width;
    idx[0] = top && left ? h_low * width + w_low : -1;
    idx[1] = top && right ? h_low * width + w_high : -1;
    idx[2] = bottom && left ? h_high * width + w_low : -1;
    idx[3] = bottom && right ? h_high * width + w_high : -1;
    w[0] = hh * hw;
    w[1] = hh * lw;
    w[2] = lh * hw;
    w[3] = lh * lw;
  }
};

// kD > 0 fixes the channels per head at compile time (fully unrolled, vectorised inner loops); 0 reads k.d.
template <typename scalar_t, int kD>
void forward_kernel(const scalar_t* __restrict__ value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn, scalar_t* __restrict__ out,
                    const Dims& k) {
  const int64_t d = kD > 0 ? kD : k.d;
  const int64_t md = k.m * d;
  const int64_t total = k.n * k.lq * k.m;
  // Each task is one (batch, query, head): it owns D output values, so tasks never race.
  at::parallel_for(0, total, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t head = i % k.m;
      const int64_t b = i / (k.m * k.lq);
      scalar_t* __restrict__ o = out + i * d;
      std::fill(o, o + d, scalar_t(0));
      const scalar_t* loc_i = loc + i * k.l * k.p * 2;
      const scalar_t* attn_i = attn + i * k.l * k.p;
      const scalar_t* value_b = value + b * k.s * md + head * d;
      for (int64_t level = 0; level < k.l; ++level) {
        const int64_t height = shapes[2 * level], width = shapes[2 * level + 1];
        const scalar_t* value_l = value_b + starts[level] * md;
        for (int64_t pt = 0; pt < k.p; ++pt) {
          const int64_t j = level * k.p + pt;
          const Bilinear<scalar_t> bil(loc_i[2 * j], loc_i[2 * j + 1], height, width);
          if (!bil.inside) continue;
          const scalar_t a = attn_i[j];
          for (int c = 0; c < 4; ++c) {
            if (bil.idx[c] < 0) continue;
            const scalar_t coef = a * bil.w[c];
            const scalar_t* __restrict__ v = value_l + bil.idx[c] * md;
            for (int64_t ch = 0; ch < d; ++ch) o[ch] += coef * v[ch];
          }
        }
      }
    }
  });
}

template <typename scalar_t, int kD>
void backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value, const int64_t* shapes,
                     const int64_t* starts, const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                     scalar_t* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                     scalar_t* __restrict__ grad_attn, const Dims& k) {
  const int64_t d = kD > 0 ? kD : k.d;
  const int64_t md = k.m * d;
  // Each task is one (batch, head) and walks all its queries: grad_value of a (batch, head) is only
  // written by that task, so no atomics and a deterministic result.
  at::parallel_for(0, k.n * k.m, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / k.m, head = bh % k.m;
      const scalar_t* value_b = value + b * k.s * md + head * d;
      scalar_t* grad_value_b = grad_value + b * k.s * md + head * d;
      for (int64_t q = 0; q < k.lq; ++q) {
        const int64_t i = (b * k.lq + q) * k.m + head;
        const scalar_t* __restrict__ go = grad_out + i * d;
        const scalar_t* loc_i = loc + i * k.l * k.p * 2;
        const scalar_t* attn_i = attn + i * k.l * k.p;
        scalar_t* grad_loc_i = grad_loc + i * k.l * k.p * 2;
        scalar_t* grad_attn_i = grad_attn + i * k.l * k.p;
        for (int64_t level = 0; level < k.l; ++level) {
          const int64_t height = shapes[2 * level], width = shapes[2 * level + 1];
          const int64_t offset = starts[level] * md;
          for (int64_t pt = 0; pt < k.p; ++pt) {
            const int64_t j = level * k.p + pt;
            const Bilinear<scalar_t> bil(loc_i[2 * j], loc_i[2 * j + 1], height, width);
            grad_loc_i[2 * j] = grad_loc_i[2 * j + 1] = grad_attn_i[j] = scalar_t(0);
            if (!bil.inside) continue;
            const scalar_t a = attn_i[j];
            const scalar_t lh = bil.lh, lw = bil.lw, hh = 1 - lh, hw = 1 - lw;
            // d(corner weight)/d(w_im) and d(corner weight)/d(h_im) of corners 00, 01, 10, 11.
            const scalar_t dw[4] = {-hh, hh, -lh, lh};
            const scalar_t dh[4] = {-hw, -lw, hw, lw};
            scalar_t g_attn = 0, g_w = 0, g_h = 0;
            for (int c = 0; c < 4; ++c) {
              if (bil.idx[c] < 0) continue;
              const scalar_t* __restrict__ v = value_b + offset + bil.idx[c] * md;
              scalar_t* __restrict__ gv = grad_value_b + offset + bil.idx[c] * md;
              const scalar_t coef = a * bil.w[c];
              scalar_t dot = 0;
              for (int64_t ch = 0; ch < d; ++ch) {
                dot += go[ch] * v[ch];
                gv[ch] += coef * go[ch];
              }
              g_attn += bil.w[c] * dot;
              g_w += dw[c] * dot;
              g_h += dh[c] * dot;
            }
            grad_attn_i[j] = g_attn;
            grad_loc_i[2 * j] = a * g_w * static_cast<scalar_t>(width);
            grad_loc_i[2 * j + 1] = a * g_h * static_cast<scalar_t>(height);
          }
        }
      }
    }
  });
}

// Calls fn with the compile-time channel count matching d (Mask2Former uses 32), or 0 (runtime).
template <typename Fn>
void with_static_channels(int64_t d, Fn&& fn) {
  switch (d) {
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 64: fn(std::integral_constant<int, 64>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

bool is_reduced(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                      const at::Tensor& level_start_index_in, const at::Tensor& loc_in,
                                      const at::Tensor& attn_in) {
  check_ms_deform_attn_inputs(value_in, spatial_shapes_in, level_start_index_in, loc_in, attn_in);
  const auto dtype = value_in.scalar_type();
  // Half precision: compute (and accumulate) in float32, cast the result back.
  const auto compute = is_reduced(dtype) ? at::kFloat : dtype;
  const at::Tensor value = value_in.to(compute).contiguous();
  const at::Tensor loc = loc_in.to(compute).contiguous();
  const at::Tensor attn = attn_in.to(compute).contiguous();
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const Dims k = dims_of(value, loc);
  at::Tensor out = at::empty({k.n, k.lq, k.m * k.d}, value.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(compute, "ms_deform_attn_forward_cpu", [&] {
      with_static_channels(k.d, [&](auto channels) {
        forward_kernel<scalar_t, decltype(channels)::value>(
            value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
            level_start_index.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
            attn.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), k);
      });
    });
  }
  return out.to(dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output_in, const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
    const at::Tensor& level_start_index_in, const at::Tensor& loc_in, const at::Tensor& attn_in) {
  check_ms_deform_attn_inputs(value_in, spatial_shapes_in, level_start_index_in, loc_in, attn_in);
  const auto dtype = value_in.scalar_type();
  const auto compute = is_reduced(dtype) ? at::kFloat : dtype;
  const at::Tensor grad_output = grad_output_in.to(compute).contiguous();
  const at::Tensor value = value_in.to(compute).contiguous();
  const at::Tensor loc = loc_in.to(compute).contiguous();
  const at::Tensor attn = attn_in.to(compute).contiguous();
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const Dims k = dims_of(value, loc);
  const std::vector<int64_t> output_sizes{k.n, k.lq, k.m * k.d};
  TORCH_CHECK_VALUE(grad_output.sizes() == c10::IntArrayRef(output_sizes),
                    "ms_deform_attn_backward: grad_output must be N x Lq x (M*D) = ", c10::IntArrayRef(output_sizes),
                    ", got ", grad_output_in.sizes());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options());
  // The kernel writes every element of these two (zero for points outside the map).
  at::Tensor grad_loc = at::empty(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options());
  if (grad_output.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(compute, "ms_deform_attn_backward_cpu", [&] {
      with_static_channels(k.d, [&](auto channels) {
        backward_kernel<scalar_t, decltype(channels)::value>(
            grad_output.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
            spatial_shapes.const_data_ptr<int64_t>(), level_start_index.const_data_ptr<int64_t>(),
            loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(), grad_value.mutable_data_ptr<scalar_t>(),
            grad_loc.mutable_data_ptr<scalar_t>(), grad_attn.mutable_data_ptr<scalar_t>(), k);
      });
    });
  }
  return {grad_value.to(dtype), grad_loc.to(dtype), grad_attn.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(qsegformers, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace qsegformers
