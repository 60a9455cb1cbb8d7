"""Tests of SegViT's Shrunk backbone (qsegformers/backbones/vit_shrunk.py): QD halves the token grid with
nearest-sampled queries, equals the plain block when nothing is down-sampled, and D2ShrunkViT matches a
reference built from D2ViT's blocks and an independent attention computation."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from qsegformers.backbones.vit import D2ViT
from qsegformers.backbones.vit_shrunk import D2ShrunkViT, downsample_queries, query_downsampled_block
from qsegformers.config import add_qsegformers_config

DIM, HEADS, DEPTH, PATCH = 32, 4, 4, 8
ARGS = dict(patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, pretrain_img_size=64)


def shrunk(qd_block=1, qd_method="nearest_q", out_blocks=(1, 4)):
    torch.manual_seed(0)
    return D2ShrunkViT(qd_block=qd_block, qd_method=qd_method, out_blocks=list(out_blocks), **ARGS).eval()


def grid_tokens(b=2, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1 + h * w, DIM, generator=g), (h, w)


def reference_qd_block(block, query, memory):
    """The QD block written out: per-head softmax(q k^T / sqrt(d)) v with the fused qkv weights."""
    d = DIM // HEADS
    wq, wk, wv = block.attn.qkv.weight.split(DIM)
    bq, bk, bv = block.attn.qkv.bias.split(DIM)
    xq, xm = block.norm1(query), block.norm1(memory)
    q, k, v = xq @ wq.T + bq, xm @ wk.T + bk, xm @ wv.T + bv
    heads = []
    for hd in range(HEADS):
        s = slice(hd * d, (hd + 1) * d)
        attn = (q[..., s] @ k[..., s].transpose(1, 2) / d**0.5).softmax(-1)
        heads.append(attn @ v[..., s])
    y = query + block.attn.proj(torch.cat(heads, -1))
    return y + block.mlp(block.norm2(y))


def test_downsampled_queries_are_the_top_left_token_of_each_cell():
    tokens, (h, w) = grid_tokens(h=6, w=5)
    query, new_hw = downsample_queries(tokens, (h, w))
    assert new_hw == (3, 3)  # ceil(6/2), ceil(5/2)
    grid = tokens[:, 1:].reshape(2, h, w, DIM)
    expected = grid[:, ::2, ::2].reshape(2, 9, DIM)
    torch.testing.assert_close(query[:, 1:], expected)
    torch.testing.assert_close(query[:, :1], tokens[:, :1])  # class token kept


def test_qd_block_without_downsampling_equals_the_vit_block():
    model = shrunk()
    tokens, _ = grid_tokens()
    block = model.blocks[0]
    with torch.no_grad():
        torch.testing.assert_close(query_downsampled_block(block, tokens, tokens), block(tokens), rtol=1e-5, atol=1e-5)


def test_qd_block_matches_written_out_attention():
    model = shrunk()
    tokens, hw = grid_tokens()
    query, _ = downsample_queries(tokens, hw)
    block = model.blocks[1]
    with torch.no_grad():
        out = query_downsampled_block(block, query, tokens)
        torch.testing.assert_close(out, reference_qd_block(block, query, tokens), rtol=1e-4, atol=1e-5)
    assert out.shape == query.shape


def test_shrunk_forward_halves_the_grid_after_the_qd_block():
    model = shrunk(qd_block=1, out_blocks=(1, 2, 4))
    plain = D2ViT(out_blocks=[4], **ARGS).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 48, 40)  # 6 x 5 grid at stride 8
    with torch.no_grad():
        out = model(x)
        tokens, hw = plain.embed(x)
        blk1 = plain.blocks[0](tokens)
        query, _ = downsample_queries(blk1, hw)
        y = reference_qd_block(plain.blocks[1], query, blk1)
        blk2 = y
        for blk in plain.blocks[2:]:
            y = blk(y)
    assert out["blk1"].shape == (2, DIM, 6, 5)
    assert out["blk2"].shape == (2, DIM, 3, 3) and out["blk4"].shape == (2, DIM, 3, 3)
    torch.testing.assert_close(out["blk1"], plain.tokens_to_map(blk1, hw))
    torch.testing.assert_close(out["blk2"], plain.tokens_to_map(blk2, (3, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["blk4"], plain.tokens_to_map(y, (3, 3)), rtol=1e-4, atol=1e-4)
    shapes = model.output_shape()
    assert [shapes[n].stride for n in ("blk1", "blk2", "blk4")] == [PATCH, 2 * PATCH, 2 * PATCH]


def test_nearest_qkv_runs_the_plain_block_on_downsampled_tokens():
    model = shrunk(qd_method="nearest_qkv")
    tokens, hw = grid_tokens()
    with torch.no_grad():
        out, new_hw = model.forward_block(1, tokens, hw)
        query, _ = downsample_queries(tokens, hw)
        torch.testing.assert_close(out, model.blocks[1](query))
    assert new_hw == (3, 3)


def test_conv_q_uses_a_learnable_stride_two_convolution():
    model = shrunk(qd_method="conv_q")
    tokens, hw = grid_tokens(h=6, w=5)
    out, new_hw = model.forward_block(1, tokens, hw)
    assert new_hw == (3, 3) and out.shape == (2, 10, DIM)
    out.sum().backward()
    assert model.qd_conv.weight.grad.abs().sum() > 0


def test_errors_name_the_keys():
    with pytest.raises(ValueError, match="QD_METHOD"):
        shrunk(qd_method="bilinear")
    with pytest.raises(ValueError, match="QD_BLOCK"):
        shrunk(qd_block=7)


def test_built_from_config_with_segvit_l_layout():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2ShrunkViT"
    cfg.MODEL.VIT.update(EMBED_DIM=32, NUM_HEADS=4, DEPTH=24, OUT_BLOCKS=[8, 24], PRETRAIN_IMG_SIZE=64)
    model = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    assert (model.qd_block, model.qd_method) == (8, "nearest_q")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["blk8"].shape[-2:] == (4, 4) and out["blk24"].shape[-2:] == (2, 2)
    assert model.size_divisibility == 32
    assert torch.isfinite(out["blk24"]).all()
