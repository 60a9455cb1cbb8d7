// CUDA kernels of multi-scale deformable attention (forward and backward).
//
// Same sampling convention as the CPU kernel (bilinear, zero padding, pixel coordinate = x * W - 0.5).
// float32/float64/float16/bfloat16, accumulating in at::opmath_type (float for the half types).
// Forward: one thread per output element (batch, query, head, channel). Backward: one thread per
// (batch, query, head, channel); grad_value, grad_sampling_locations and grad_attention_weights are
// accumulated with gpuAtomicAdd into opmath buffers, cast to the input dtype at the end.
// Only c10 CUDA headers besides Atomic.cuh: ATen/cuda/CUDAContext.h needs the cuBLAS/cuSPARSE
// headers, which a minimal toolkit (nvcc only) lacks.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../ms_deform_attn.h"

namespace qsegformers {
namespace {

constexpr int kThreads = 256;

inline int64_t num_blocks(int64_t total) { return (total + kThreads - 1) / kThreads; }

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                               const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, int64_t n, int64_t s,
                               int64_t m, int64_t d, int64_t lq, int64_t num_levels, int64_t num_points) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t total = n * lq * m * d;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t ch = t % d;
    const int64_t i = t / d;  // (batch, query, head)
    const int64_t head = i % m;
    const int64_t b = i / (m * lq);
    const int64_t md = m * d;
    const scalar_t* value_b = value + b * s * md + head * d + ch;
    const scalar_t* loc_i = loc + i * num_levels * num_points * 2;
    const scalar_t* attn_i = attn + i * num_levels * num_points;
    opmath_t acc = 0;
    for (int64_t level = 0; level < num_levels; ++level) {
      const int64_t height = shapes[2 * level], width = shapes[2 * level + 1];
      const scalar_t* value_l = value_b + starts[level] * md;
      for (int64_t pt = 0; pt < num_points; ++pt) {
        const int64_t j = level * num_points + pt;
        const opmath_t h_im = static_cast<opmath_t>(loc_i[2 * j + 1]) * height - opmath_t(0.5);
        const opmath_t w_im = static_cast<opmath_t>(loc_i[2 * j]) * width - opmath_t(0.5);
        if (!(h_im > -1 && w_im > -1 && h_im < height && w_im < width)) continue;
        const int64_t h_low = static_cast<int64_t>(floor(h_im)), w_low = static_cast<int64_t>(floor(w_im));
        const int64_t h_high = h_low + 1, w_high = w_low + 1;
        const opmath_t lh = h_im - h_low, lw = w_im - w_low, hh = 1 - lh, hw = 1 - lw;
        opmath_t sample = 0;
        if (h_low >= 0 && w_low >= 0) sample += hh * hw * static_cast<opmath_t>(value_l[(h_low * width + w_low) * md]);
        if (h_low >= 0 && w_high < width)
          sample += hh * lw * static_cast<opmath_t>(value_l[(h_low * width + w_high) * md]);
        if (h_high < height && w_low >= 0)
          sample += lh * hw * static_cast<opmath_t>(value_l[(h_high * width + w_low) * md]);
        if (h_high < height && w_high < width)
          sample += lh * lw * static_cast<opmath_t>(value_l[(h_high * width + w_high) * md]);
        acc += static_cast<opmath_t>(attn_i[j]) * sample;
      }
    }
    out[t] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename opmath_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                                opmath_t* __restrict__ grad_value, opmath_t* __restrict__ grad_loc,
                                opmath_t* __restrict__ grad_attn, int64_t n, int64_t s, int64_t m, int64_t d,
                                int64_t lq, int64_t num_levels, int64_t num_points) {
  const int64_t total = n * lq * m * d;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t ch = t % d;
    const int64_t i = t / d;
    const int64_t head = i % m;
    const int64_t b = i / (m * lq);
    const int64_t md = m * d;
    const int64_t value_offset = b * s * md + head * d + ch;
    const opmath_t go = static_cast<opmath_t>(grad_out[t]);
    const scalar_t* loc_i = loc + i * num_levels * num_points * 2;
    const scalar_t* attn_i = attn + i * num_levels * num_points;
    for (int64_t level = 0; level < num_levels; ++level) {
      const int64_t height = shapes[2 * level], width = shapes[2 * level + 1];
      const int64_t level_offset = value_offset + starts[level] * md;
      for (int64_t pt = 0; pt < num_points; ++pt) {
        const int64_t j = level * num_points + pt;
        const opmath_t h_im = static_cast<opmath_t>(loc_i[2 * j + 1]) * height - opmath_t(0.5);
        const opmath_t w_im = static_cast<opmath_t>(loc_i[2 * j]) * width - opmath_t(0.5);
        if (!(h_im > -1 && w_im > -1 && h_im < height && w_im < width)) continue;
        const int64_t h_low = static_cast<int64_t>(floor(h_im)), w_low = static_cast<int64_t>(floor(w_im));
        const int64_t h_high = h_low + 1, w_high = w_low + 1;
        const opmath_t lh = h_im - h_low, lw = w_im - w_low, hh = 1 - lh, hw = 1 - lw;
        const opmath_t a = static_cast<opmath_t>(attn_i[j]);
        const int64_t idx[4] = {h_low * width + w_low, h_low * width + w_high, h_high * width + w_low,
                                h_high * width + w_high};
        const bool valid[4] = {h_low >= 0 && w_low >= 0, h_low >= 0 && w_high < width,
                               h_high < height && w_low >= 0, h_high < height && w_high < width};
        const opmath_t wts[4] = {hh * hw, hh * lw, lh * hw, lh * lw};
        const opmath_t dw[4] = {-hh, hh, -lh, lh};
        const opmath_t dh[4] = {-hw, -lw, hw, lw};
        opmath_t g_attn = 0, g_w = 0, g_h = 0;
        for (int c = 0; c < 4; ++c) {
          if (!valid[c]) continue;
          const int64_t pos = level_offset + idx[c] * md;
          const opmath_t dot = go * static_cast<opmath_t>(value[pos]);
          gpuAtomicAdd(grad_value + pos, a * wts[c] * go);
          g_attn += wts[c] * dot;
          g_w += dw[c] * dot;
          g_h += dh[c] * dot;
        }
        gpuAtomicAdd(grad_attn + i * num_levels * num_points + j, g_attn);
        gpuAtomicAdd(grad_loc + (i * num_levels * num_points + j) * 2, a * g_w * width);
        gpuAtomicAdd(grad_loc + (i * num_levels * num_points + j) * 2 + 1, a * g_h * height);
      }
    }
  }
}

// True while the current stream of `t`'s GPU is being captured into a CUDA graph.
bool stream_is_capturing(const at::Tensor& t) {
  if (!t.is_cuda()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(t.device().index()), &status));
  return status != cudaStreamCaptureStatusNone;
}

// The shared checks. Checking the level sizes copies spatial_shapes and level_start_index (L x 2 and L int64)
// to the host, a small sync; a stream under CUDA graph capture cannot sync, so there only shapes, dtypes and
// devices are checked (the official implementation checks nothing in the kernel).
void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& loc, const at::Tensor& attn) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, loc, attn,
                              /*check_levels=*/!stream_is_capturing(spatial_shapes));
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                       const at::Tensor& level_start_index_in, const at::Tensor& loc_in,
                                       const at::Tensor& attn_in) {
  check_inputs(value_in, spatial_shapes_in, level_start_index_in, loc_in, attn_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous(), loc = loc_in.contiguous(), attn = attn_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous(), starts = level_start_index_in.contiguous();
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = loc.size(1), num_levels = loc.size(3), num_points = loc.size(4);
  at::Tensor out = at::empty({n, lq, m * d}, value.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        value.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
        loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, s, m, d,
        lq, num_levels, num_points);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output_in, const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
    const at::Tensor& level_start_index_in, const at::Tensor& loc_in, const at::Tensor& attn_in) {
  check_inputs(value_in, spatial_shapes_in, level_start_index_in, loc_in, attn_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor grad_output = grad_output_in.to(value_in.scalar_type()).contiguous();
  const at::Tensor value = value_in.contiguous(), loc = loc_in.contiguous(), attn = attn_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous(), starts = level_start_index_in.contiguous();
  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = loc.size(1), num_levels = loc.size(3), num_points = loc.size(4);
  const std::vector<int64_t> output_sizes{n, lq, m * d};
  TORCH_CHECK_VALUE(grad_output.sizes() == c10::IntArrayRef(output_sizes),
                    "ms_deform_attn_backward: grad_output must be N x Lq x (M*D) = ", c10::IntArrayRef(output_sizes),
                    ", got ", grad_output_in.sizes());
  const auto opmath = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(opmath));
  at::Tensor grad_loc = at::zeros(loc.sizes(), loc.options().dtype(opmath));
  at::Tensor grad_attn = at::zeros(attn.sizes(), attn.options().dtype(opmath));
  const int64_t total = grad_output.numel();
  if (total > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, opmath_t><<<num_blocks(total), kThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
          starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(),
          grad_value.mutable_data_ptr<opmath_t>(), grad_loc.mutable_data_ptr<opmath_t>(),
          grad_attn.mutable_data_ptr<opmath_t>(), n, s, m, d, lq, num_levels, num_points);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto dtype = value.scalar_type();
  return {grad_value.to(dtype), grad_loc.to(dtype), grad_attn.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(qsegformers, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace qsegformers
