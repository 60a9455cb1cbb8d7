#!/usr/bin/env python
"""Benchmark multi-scale deformable attention: pure-PyTorch path vs the compiled kernel (qsegformers._C).

Prints a table of median forward and forward+backward times (after warm-up) at Mask2Former R50 shapes
(encoder levels at strides 8, 16, 32; 8 heads, 4 points, 256 channels; queries = every pixel of the
three levels), for 512x512 and 1024x1024 inputs, batch 1 and 2; then the whole MSDeformAttnPixelDecoder
(R50 features res2..res5, 6 encoder layers) end to end both ways.

Usage:
    python tools/benchmark_msdeform.py [--threads 2] [--repeats 5] [--device cpu] [--sizes 512 1024]
"""
import argparse

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

from qsegformers.config import add_qsegformers_config
from qsegformers.ops.ms_deform_attn import compiled_kernel_available, ms_deform_attn
from qsegformers.pixel_decoders.build import build_pixel_decoder
from qsegformers.utils.benchmark import median_time

HEADS, POINTS, CHANNELS = 8, 4, 256
ENCODER_STRIDES = (8, 16, 32)
R50_SHAPES = {
    "res2": ShapeSpec(channels=256, stride=4),
    "res3": ShapeSpec(channels=512, stride=8),
    "res4": ShapeSpec(channels=1024, stride=16),
    "res5": ShapeSpec(channels=2048, stride=32),
}


def _op_inputs(size: int, batch: int, device: torch.device):
    shapes = torch.tensor([(size // s, size // s) for s in ENCODER_STRIDES], dtype=torch.long, device=device)
    start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    s = int(shapes.prod(1).sum())
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(batch, s, HEADS, CHANNELS // HEADS, generator=gen).to(device)
    # As in the encoder: each query samples around its own position (the centre of its pixel, the same
    # normalised point on every level) with offsets of a few pixels of each level (std 2 pixels).
    refs = []
    for h, w in shapes.tolist():
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        refs.append(torch.stack((xs.flatten(), ys.flatten()), -1))
    refs = torch.cat(refs)[None, :, None, None, None, :]
    pixel = 1.0 / shapes.flip(1).float().cpu()[None, None, None, :, None, :]  # (1/W_l, 1/H_l)
    offsets = 2.0 * torch.randn(batch, s, HEADS, len(ENCODER_STRIDES), POINTS, 2, generator=gen)
    locations = (refs + offsets * pixel).to(device)
    weights = torch.rand(batch, s, HEADS, len(ENCODER_STRIDES), POINTS, generator=gen).to(device)
    return value, shapes, start, locations, weights


def _op_case(size, batch, impl, device, warmup, repeats):
    value, shapes, start, locations, weights = _op_inputs(size, batch, device)

    def forward():
        with torch.no_grad():
            ms_deform_attn(value, shapes, start, locations, weights, impl=impl)

    leaves = [t.detach().requires_grad_(True) for t in (value, locations, weights)]
    grad = torch.randn(batch, value.shape[1], CHANNELS, device=device)

    def forward_backward():
        out = ms_deform_attn(leaves[0], shapes, start, leaves[1], leaves[2], impl=impl)
        out.backward(grad)

    return median_time(forward, device, warmup, repeats), median_time(forward_backward, device, warmup, repeats)


def _decoder_case(size, batch, impl, device, warmup, repeats):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    ssh = cfg.MODEL.SEM_SEG_HEAD
    ssh.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    ssh.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    ssh.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    ssh.CONVS_DIM = 256
    ssh.MASK_DIM = 256
    ssh.NORM = "GN"
    ssh.TRANSFORMER_ENC_LAYERS = 6
    ssh.COMMON_STRIDE = 4
    ssh.DEFORMABLE_ATTN_IMPL = impl
    torch.manual_seed(0)
    decoder = build_pixel_decoder(cfg, R50_SHAPES).to(device).eval()
    feats = {k: torch.randn(batch, s.channels, size // s.stride, size // s.stride, device=device)
             for k, s in R50_SHAPES.items()}

    def forward():
        with torch.no_grad():
            decoder.forward_features(feats)

    def forward_backward():
        mask_features, _, multi_scale = decoder.forward_features(feats)
        (mask_features.mean() + sum(f.mean() for f in multi_scale)).backward()

    return median_time(forward, device, warmup, repeats), median_time(forward_backward, device, warmup, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="input image sizes")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-decoder", action="store_true", help="only time the op")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not compiled_kernel_available(device):
        raise SystemExit(f"qsegformers._C has no kernel for {device}; build it with `pip install -e .` first.")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats} after {args.warmup} warm-up; times in ms")
    header = (f"{'case':<28}{'pytorch fwd':>13}{'compiled fwd':>14}{'x':>7}"
              f"{'pytorch f+b':>13}{'compiled f+b':>14}{'x':>7}")
    print(header)
    print("-" * len(header))
    cases = [("op", _op_case)] + ([] if args.skip_decoder else [("pixel decoder", _decoder_case)])
    for label, case in cases:
        for size in args.sizes:
            for batch in args.batches:
                py_f, py_fb = case(size, batch, "pytorch", device, args.warmup, args.repeats)
                c_f, c_fb = case(size, batch, "compiled", device, args.warmup, args.repeats)
                name = f"{label} {size}x{size} b{batch}"
                print(f"{name:<28}{py_f * 1e3:>13.1f}{c_f * 1e3:>14.1f}{py_f / c_f:>7.1f}"
                      f"{py_fb * 1e3:>13.1f}{c_fb * 1e3:>14.1f}{py_fb / c_fb:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
