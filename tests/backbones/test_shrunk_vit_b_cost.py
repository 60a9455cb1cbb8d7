"""The ViT-B Shrunk config puts QD where the paper's costs say it is (SegViT Tab. 8, 512x512, fvcore FLOPs).

Tab. 8 gives "Single" (ViT-B + one ATM stage on the last block, 115.8 GFLOPs) and "Naive Shrunk" (the same
with QD, ATM on the 1/32 tokens, 74.1). Their difference is what QD saves in the backbone plus what the ATM
stage saves on 4x fewer tokens; both are written out here from the transformer FLOP formulas (one
multiply-add = one FLOP), independently of the model code. tools/analyze_model.py measures the whole config
at 97.16 GFLOPs (paper: 97.1); with QD in block index 4 (the "1/3 depth" rule) it measured 83.25.
"""
import os

from detectron2.config import get_cfg

from qsegformers.config import add_qsegformers_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(REPO, "configs/ade20k/semantic-segmentation/segvit/segvit_shrunk_vit_base_bs16_160k.yaml")
PAPER_SINGLE_GFLOPS, PAPER_NAIVE_SHRUNK_GFLOPS = 115.8, 74.1
# Off by 13.9 GFLOPs with QD in block index 4 and by 6.9 with 5 or 7; block index 6 lands within 0.1.
TOLERANCE_GFLOPS = 2.0
MLP_RATIO = 4


def vit_block_flops(num_q: int, num_kv: int, dim: int) -> int:
    """Pre-norm ViT block whose queries (and MLP) run on num_q tokens and keys/values on num_kv tokens."""
    q_and_proj = 2 * num_q * dim * dim
    kv = 2 * num_kv * dim * dim
    attention = 2 * num_q * num_kv * dim  # q k^T and attn v
    mlp = 2 * MLP_RATIO * num_q * dim * dim
    return q_and_proj + kv + attention + mlp


def qd_savings(depth: int, qd_block: int, full: int, shrunk: int, dim: int) -> int:
    """Backbone FLOPs saved by QD in 0-based block ``qd_block``: that block's queries and every later block run
    on the shrunk token count."""
    per_block = vit_block_flops(full, full, dim) - vit_block_flops(shrunk, shrunk, dim)
    qd = vit_block_flops(full, full, dim) - vit_block_flops(shrunk, full, dim)
    return (depth - qd_block - 1) * per_block + qd


def atm_stage_token_flops(num_tokens: int, in_dim: int, dim: int, num_classes: int, layers: int) -> int:
    """The part of one ATM stage's cost that grows with the image tokens: the input projection, and per layer
    the key/value projections and the class-token x image-token products."""
    per_layer = 2 * num_tokens * dim * dim + 2 * num_classes * num_tokens * dim
    return num_tokens * in_dim * dim + layers * per_layer


def test_qd_block_reproduces_the_papers_naive_shrunk_cost():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.merge_from_file(CONFIG)
    vit, crop = cfg.MODEL.VIT, cfg.INPUT.CROP.SIZE
    side = crop[0] // vit.PATCH_SIZE
    full, shrunk = 1 + side * side, 1 + (side // 2) ** 2  # with the class token
    saved = qd_savings(vit.DEPTH, cfg.MODEL.SHRUNK.QD_BLOCK, full, shrunk, vit.EMBED_DIM)
    atm = [
        atm_stage_token_flops(n - 1, vit.EMBED_DIM, cfg.MODEL.ATM.EMBED_DIM, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
                              cfg.MODEL.ATM.LAYERS_PER_STAGE)
        for n in (full, shrunk)
    ]
    naive = PAPER_SINGLE_GFLOPS - (saved + atm[0] - atm[1]) / 1e9
    assert abs(naive - PAPER_NAIVE_SHRUNK_GFLOPS) < TOLERANCE_GFLOPS, (cfg.MODEL.SHRUNK.QD_BLOCK, naive)
    # QU reads the last 1/16 block: the one just before QD
    assert cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES == [f"blk{cfg.MODEL.SHRUNK.QD_BLOCK}", f"blk{vit.DEPTH}"]
