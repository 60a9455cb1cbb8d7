#!/usr/bin/env python
"""Peak memory and time of one training iteration of FASeg's transformer decoder with HRCA on the 1/4
features versus dense (vanilla) cross-attention on the same 1/4 features (spec Table 6, "Vanilla" row).

Both variants are the same ``FASegTransformerDecoder`` (same weights, DFPQ on, 13 layers) on the same random
pixel-decoder outputs for an ``--size`` x ``--size`` input; only ``MODEL.HRCA.SELECTION`` differs ("topk"
gathers floor(HW_32 / omega) cells of 8 x 8 tokens, "all" attends to every 1/4 token). One iteration is
forward + loss + backward, with gradients flowing into the input features as they would into the pixel decoder.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the memory held before the iteration. On CPU
(no allocator statistics), the peak of the bytes of tensor storages alive during the iteration, tracked by a
``TorchDispatchMode`` that registers every storage an op creates and releases it when it is freed (storages
that existed before the iteration, i.e. weights and inputs, are not counted on either device).

Example (the numbers reported for issue 7):
    python tools/benchmark_hrca.py --size 512 --batch 1 --json /tmp/hrca.json
"""
import argparse
import json
import logging
import weakref
from typing import Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qsegformers.decoders.faseg import FASegTransformerDecoder
from qsegformers.utils.benchmark import median_time

logger = logging.getLogger("benchmark_hrca")

MIB = 2 ** 20
STRIDES = (32, 16, 8, 4)  # decoder levels: 1/32, 1/16, 1/8 and the HRCA level 1/4
VARIANTS = {"hrca": "topk", "dense": "all"}  # name -> MODEL.HRCA.SELECTION


class StoragePeakTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive (CPU peak-memory stand-in)."""

    def __init__(self, existing: List[torch.Tensor]):
        """existing: tensors allocated before (weights, inputs); their storages and views are not counted."""
        super().__init__()
        self._existing = [t.untyped_storage() for t in existing]  # kept alive, so their ids stay unique
        self._excluded = {id(s) for s in self._existing}
        self.live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _register(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.live or key in self._excluded or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._register(leaf)
        return out


def build_decoder(args, selection: str) -> FASegTransformerDecoder:
    torch.manual_seed(0)
    return FASegTransformerDecoder(
        args.hidden_dim,
        num_classes=args.num_classes, hidden_dim=args.hidden_dim, num_queries=args.queries, nheads=args.heads,
        dim_feedforward=args.ffn, dec_layers=args.dec_layers, pre_norm=False, mask_dim=args.hidden_dim,
        enforce_input_project=False, dfpq_enabled=True, query_type="dfpq", mlp_layers=2, share_mlp=True,
        use_bias=True, first_layer_pool="foreground", first_layer_pool_threshold=0.5, detach_attn=False,
        attn_mask_threshold=0.15, hrca_enabled=True, omega_rate=args.omega_rate, select_from_level=0,
        shared_across_queries=True, mapping="block", selection=selection, hrca_query_pos="static",
        extra_final_low_res_layer=True,
    ).to(args.device).train()


def make_inputs(args):
    """Random pixel-decoder outputs for an input of size x size: features, K_p maps, mask features."""
    g = torch.Generator().manual_seed(1)
    shapes = [(args.batch, args.hidden_dim, args.size // s, args.size // s) for s in STRIDES]
    feats = [torch.randn(*s, generator=g).to(args.device).requires_grad_() for s in shapes]
    pos = [torch.randn(*s, generator=g).to(args.device).requires_grad_() for s in shapes]
    mask_features = torch.randn(*shapes[-1], generator=g).to(args.device).requires_grad_()
    return feats, pos, mask_features


def train_iteration(decoder, feats, pos, mask_features) -> None:
    """Forward, a loss on every prediction (deep supervision) and backward."""
    out = decoder(feats, mask_features, pos_embeddings=pos)
    loss = sum(o["pred_masks"].sigmoid().mean() + o["pred_logits"].logsumexp(-1).mean()
               for o in out["aux_outputs"] + [out])
    loss.backward()


def measure(args, name: str) -> Dict:
    decoder = build_decoder(args, VARIANTS[name])
    feats, pos, mask_features = make_inputs(args)
    if args.device.type == "cuda":
        torch.cuda.synchronize(args.device)
        base = torch.cuda.memory_allocated(args.device)
        torch.cuda.reset_peak_memory_stats(args.device)
        train_iteration(decoder, feats, pos, mask_features)
        torch.cuda.synchronize(args.device)
        peak = torch.cuda.max_memory_allocated(args.device) - base
        method = "cuda max_memory_allocated"
    else:
        with StoragePeakTracker(list(decoder.parameters()) + feats + pos + [mask_features]) as tracker:
            train_iteration(decoder, feats, pos, mask_features)
        peak, method = tracker.peak, "peak live tensor storage (dispatch tracker)"

    def fresh_iteration():
        decoder.zero_grad(set_to_none=True)
        for t in feats + pos + [mask_features]:
            t.grad = None
        train_iteration(decoder, feats, pos, mask_features)

    seconds = median_time(fresh_iteration, args.device, warmup=0, repeats=args.repeats)
    hw4 = (args.size // STRIDES[-1]) ** 2
    hw32 = (args.size // STRIDES[0]) ** 2
    keys = hw4 if name == "dense" else max(1, hw32 // args.omega_rate) * (STRIDES[0] // STRIDES[-1]) ** 2
    return {
        "variant": name,
        "selection": VARIANTS[name],
        "size": args.size,
        "batch": args.batch,
        "high_res_keys": keys,
        "peak_memory_mib": peak / MIB,
        "time_s": seconds,
        "memory_method": method,
    }


def format_table(rows: List[Dict]) -> str:
    header = f"{'variant':<8}{'1/4 keys':>10}{'peak memory (MiB)':>20}{'time / iter (s)':>17}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['variant']:<8}{r['high_res_keys']:>10d}{r['peak_memory_mib']:>20.1f}{r['time_s']:>17.3f}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="input side (multiple of 32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--dec-layers", type=int, default=14, help="MODEL.MASK_FORMER.DEC_LAYERS")
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--omega-rate", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="timed iterations (median reported)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.size % STRIDES[0]:
        parser.error(f"--size must be a multiple of {STRIDES[0]}, got {args.size}")
    args.device = torch.device(args.device)
    return args


def main(argv=None) -> List[Dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    logger.info("torch %s, device %s, threads %d", torch.__version__, args.device, torch.get_num_threads())
    rows = [measure(args, name) for name in args.variants]
    print(format_table(rows))  # the table is this tool's output
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
