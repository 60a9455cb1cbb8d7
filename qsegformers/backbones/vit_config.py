"""Config keys of the plain ViT backbone (``MODEL.VIT.*``, read by ``D2ViT``).

The defaults are SegViT's ViT-B/16 (spec segvit.md §2.1, §4). Presets:

- ViT-B/16: EMBED_DIM 768, DEPTH 12, NUM_HEADS 12, OUT_BLOCKS [6, 8, 12], DROP_PATH_RATE 0.1.
- ViT-L/16: EMBED_DIM 1024, DEPTH 24, NUM_HEADS 16, OUT_BLOCKS [8, 16, 24], DROP_PATH_RATE 0.3.

Pretrained weights come from a timm ViT converted by ``tools/convert_timm_vit_to_d2.py``;
PRETRAIN_IMG_SIZE must equal the image size whose position-embedding grid the converted file stores
(the converter prints it and can resample the grid to another size). The AugReg weights SegViT uses are
normalised with mean = std = 127.5 in RGB: set INPUT.FORMAT "RGB", MODEL.PIXEL_MEAN [127.5, 127.5,
127.5] and MODEL.PIXEL_STD [127.5, 127.5, 127.5].
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_vit_config"]


def add_vit_config(cfg):
    """Declare ``MODEL.VIT.*`` with SegViT's ViT-B/16 defaults."""
    cfg.MODEL.VIT = CN()
    vit = cfg.MODEL.VIT
    vit.PATCH_SIZE = 16  # patch embedding kernel and stride; inputs are padded to a multiple of it
    vit.EMBED_DIM = 768  # token width (ViT-L: 1024)
    vit.DEPTH = 12  # blocks of the pretrained model (ViT-L: 24); only blocks up to max(OUT_BLOCKS) are built
    vit.NUM_HEADS = 12  # attention heads (ViT-L: 16)
    vit.MLP_RATIO = 4.0  # FFN hidden width / EMBED_DIM
    vit.QKV_BIAS = True  # bias on the qkv projection
    vit.DROP_PATH_RATE = 0.1  # stochastic depth of the last block of DEPTH (linear from 0; ViT-L: 0.3)
    vit.PRETRAIN_IMG_SIZE = 384  # image size of the stored position-embedding grid (AugReg: 384)
    vit.OUT_BLOCKS = [6, 8, 12]  # 1-based blocks returned as "blk<n>" (ViT-L: [8, 16, 24])
    vit.FINAL_NORM = False  # apply the final LayerNorm to the deepest returned block (SegViT: no)
    vit.USE_CHECKPOINT = False  # activation checkpointing of every block during training
