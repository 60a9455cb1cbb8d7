"""Tests of SegViT's ATM decoders (qsegformers/decoders/atm.py, atm_layers.py): the mask logits are the
head-averaged pre-softmax similarity of the stage's last layer, stage masks accumulate, shapes, token
permutation equivariance, the QU grid and the config wiring."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Instances

from qsegformers.config import add_qsegformers_config
from qsegformers.decoders.atm import ATMDecoder, ATMShrunkDecoder
from qsegformers.decoders.build import build_transformer_decoder
from qsegformers.losses.atm_criterion import ATMCriterion

K, C_IN, D, HEADS, B, H, W = 5, 24, 32, 4, 2, 6, 5


def make_decoder(**kw):
    args = dict(
        in_channels=C_IN,
        num_classes=K,
        embed_dim=D,
        num_heads=HEADS,
        num_stages=3,
        layers_per_stage=2,
        ffn_ratio=4,
        dropout=0.1,
    )
    args.update(kw)
    torch.manual_seed(0)
    return ATMDecoder(**args).eval()


def features(n=3, seed=1, size=(H, W)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C_IN, *size, generator=g) for _ in range(n)]


def independent_similarity(layer, tokens, memory):
    """Head-averaged q.k / sqrt(d) of an ATM layer, recomputed from its weights.

    The query of the cross-attention is the output of the layer's self-attention sub-layer, so that part
    is re-run with nn.MultiheadAttention's functional form; q/k come from the layer's q_proj/k_proj weights.
    """
    sa = layer.self_attn
    x = tokens + sa.self_attn(tokens, tokens, tokens, need_weights=False)[0]
    x = sa.norm(x)  # K x B x D
    ca = layer.cross_attn
    q = x @ ca.q_proj.weight.T + ca.q_proj.bias
    k = memory @ ca.k_proj.weight.T + ca.k_proj.bias
    d = D // HEADS
    sims = []
    for h in range(HEADS):
        qh, kh = q[..., h * d : (h + 1) * d], k[..., h * d : (h + 1) * d]  # K x B x d, L x B x d
        sims.append(torch.einsum("kbd,lbd->bkl", qh, kh) / math.sqrt(d))
    return torch.stack(sims).mean(0)  # B x K x L


def test_stage_mask_equals_head_averaged_similarity_of_last_layer():
    dec = make_decoder()
    feats = features()
    captured = {}

    def hook(module, inputs, output):
        captured.setdefault(id(module), []).append(inputs)

    last = dec.stages[1].layers[-1]
    handle = last.register_forward_hook(hook)
    with torch.no_grad():
        out = dec(feats)
    handle.remove()
    tokens_in, memory = captured[id(last)][0]
    expected = independent_similarity(last, tokens_in, memory).reshape(B, K, H, W)
    stage2 = out["aux_outputs"][1]["stage_masks"]
    torch.testing.assert_close(stage2, expected, rtol=1e-4, atol=1e-5)
    # the attention of that layer is softmax over tokens of the per-head similarity (dropout off in eval)
    _, _, sim = last.cross_attn(last.self_attn(tokens_in), memory)
    torch.testing.assert_close(sim.mean(1), expected.flatten(2), rtol=1e-4, atol=1e-5)


def test_cumulative_masks_and_shapes():
    dec = make_decoder()
    with torch.no_grad():
        out = dec(features())
    preds = out["aux_outputs"] + [{k: v for k, v in out.items() if k != "aux_outputs"}]
    assert len(preds) == 3
    for p in preds:
        assert p["pred_logits"].shape == (B, K, K + 1)
        assert p["pred_masks"].shape == (B, K, H, W)
    torch.testing.assert_close(preds[0]["pred_masks"], preds[0]["stage_masks"])
    for s in (1, 2):
        torch.testing.assert_close(preds[s]["pred_masks"] - preds[s - 1]["pred_masks"], preds[s]["stage_masks"])
    assert not torch.allclose(preds[2]["pred_masks"], preds[2]["stage_masks"])


def test_non_cumulative_masks_are_stage_masks():
    dec = make_decoder(cumulative_masks=False)
    with torch.no_grad():
        out = dec(features())
    torch.testing.assert_close(out["pred_masks"], out["stage_masks"])


def test_cumulative_masks_resize_for_hierarchical_features():
    dec = make_decoder(num_stages=2)
    coarse, fine = features(1, seed=2, size=(3, 3))[0], features(1, seed=3, size=(6, 6))[0]
    with torch.no_grad():
        out = dec([coarse, fine])
    first = out["aux_outputs"][0]["pred_masks"]
    up = torch.nn.functional.interpolate(first, size=(6, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["pred_masks"], up + out["stage_masks"])


def test_token_permutation_permutes_masks_and_keeps_logits():
    """No positional information in the head: shuffling the image tokens (same permutation at every
    stage) permutes the mask logits and leaves the class logits unchanged."""
    dec = make_decoder()
    feats = features(size=(1, H * W))
    perm = torch.randperm(H * W, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = dec(feats)
        out_p = dec([f[..., perm] for f in feats])
    torch.testing.assert_close(out_p["pred_logits"], out["pred_logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_p["pred_masks"], out["pred_masks"][..., perm], rtol=1e-4, atol=1e-5)


def _segment_targets():
    """Two images at twice the mask resolution: image 0 has classes 1 and 3, image 1 has class 0."""
    m0 = torch.zeros(2, 2 * H, 2 * W)
    m0[0, :, :W], m0[1, : 2 * H // 3] = 1, 1
    m1 = torch.zeros(1, 2 * H, 2 * W)
    m1[0, H:, 2:] = 1
    return [{"labels": torch.tensor([1, 3]), "masks": m0}, {"labels": torch.tensor([0]), "masks": m1}]


def test_mask_loss_trains_the_attention_similarity():
    """The focal + dice mask loss of the final prediction reaches the q/k projections of the last ATM layer,
    with the gradient autograd gives through an independent recomputation of that layer's similarity."""
    dec = make_decoder()
    last = dec.stages[-1].layers[-1]
    captured = {}
    last.register_forward_hook(lambda m, args, out: captured.update(inputs=[a.detach() for a in args]))
    out = dec(features())
    crit = ATMCriterion(K, deep_supervision=False)
    targets = _segment_targets()

    def mask_loss(pred_masks):
        losses = crit({"pred_logits": out["pred_logits"].detach(), "pred_masks": pred_masks}, targets)
        return losses["loss_mask"] + losses["loss_dice"]

    params = [last.cross_attn.q_proj.weight, last.cross_attn.k_proj.weight]
    loss = mask_loss(out["pred_masks"])
    assert loss.requires_grad, "the mask logits are detached from the attention similarity"
    got = torch.autograd.grad(loss, params, allow_unused=True)
    assert all(g is not None for g in got), "the mask loss does not reach the q/k projections"
    # reference: the earlier stages' cumulative masks (constant for these weights) + the similarity recomputed
    # from the layer's inputs and weights
    similarity = independent_similarity(last, *captured["inputs"]).reshape(B, K, H, W)
    reference = out["aux_outputs"][-1]["pred_masks"].detach() + similarity
    torch.testing.assert_close(reference, out["pred_masks"].detach(), rtol=1e-4, atol=1e-5)
    expected = torch.autograd.grad(mask_loss(reference), params)
    for g, e in zip(got, expected):
        assert e.norm() > 1e-2  # measured: 0.076 (q) and 0.12 (k); float noise is ~1e-8
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-6 * e.abs().max().item())


def test_gradients_reach_every_parameter():
    dec = make_decoder().train()
    out = dec(features())
    loss = out["pred_logits"].sum() + out["pred_masks"].sum()
    loss = loss + sum(a["pred_logits"].sum() + a["pred_masks"].sum() for a in out["aux_outputs"])
    loss.backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_wrong_number_of_features_is_a_clear_error():
    with pytest.raises(ValueError, match="IN_FEATURES"):
        make_decoder()(features(2))


@pytest.mark.parametrize("memory_sizes", [[(4, 4), (2, 2)], [(4, 4), (4, 4)]])
def test_shrunk_decoder_qu_grid_and_supervised_layers(memory_sizes):
    torch.manual_seed(0)
    grid = (4, 3)
    dec = ATMShrunkDecoder(
        in_channels=C_IN, num_classes=K, embed_dim=D, num_heads=HEADS, ffn_ratio=2, dropout=0.0,
        num_features=2, qu_layers_per_stage=1, atm_layers=3, grid_hw=grid,
    ).eval()
    feats = [torch.randn(B, C_IN, *s) for s in memory_sizes]
    with torch.no_grad():
        fused = dec.upsampler(feats)
        out = dec(feats)
    assert fused.shape == (B, D, *grid)
    assert len(out["aux_outputs"]) == 2
    assert out["pred_masks"].shape == (B, K, *grid) and out["pred_logits"].shape == (B, K, K + 1)
    # no accumulation: the prediction is the last layer's own similarity, unlike the earlier layers'
    torch.testing.assert_close(out["pred_masks"], out["stage_masks"])
    assert not torch.allclose(out["pred_masks"], out["aux_outputs"][1]["pred_masks"])


def _attention(mha, query, key):
    """nn.MultiheadAttention written out: per-head softmax(q k^T / sqrt(d)) v, heads concatenated, out_proj.
    query: B x N x D, key (= value): B x L x D -> B x N x D."""
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q, k, v = query @ w_q.T + b_q, key @ w_k.T + b_k, key @ w_v.T + b_v
    d = q.shape[-1] // mha.num_heads
    heads = []
    for h in range(mha.num_heads):
        s = slice(h * d, (h + 1) * d)
        heads.append((q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d)).softmax(-1) @ v[..., s])
    return torch.cat(heads, -1) @ mha.out_proj.weight.T + mha.out_proj.bias


def _layer_norm(norm, x):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def reference_qu(upsampler, feats):
    """QU written out (batch-first): the grid queries decode feature 0 (early, 1/16) with the layers of stage 0,
    then feature 1 (last, 1/32) with those of stage 1; each layer is post-norm SA, CA, ReLU FFN."""
    batch = feats[0].shape[0]
    x = upsampler.queries.weight[None].expand(batch, -1, -1)
    for proj, layers, f in zip(upsampler.input_proj, upsampler.stages, feats):
        tokens = f.flatten(2).transpose(1, 2)  # B x (h*w) x C
        memory = _layer_norm(proj.norm, tokens @ proj.proj.weight.T + proj.proj.bias)
        for layer in layers:
            x = _layer_norm(layer.self_attn.norm, x + _attention(layer.self_attn.self_attn, x, x))
            x = _layer_norm(layer.cross_attn.norm, x + _attention(layer.cross_attn.multihead_attn, x, memory))
            ffn = layer.ffn
            hidden = F.relu(x @ ffn.linear1.weight.T + ffn.linear1.bias)
            x = _layer_norm(ffn.norm, x + hidden @ ffn.linear2.weight.T + ffn.linear2.bias)
    return x.transpose(1, 2).reshape(batch, -1, *upsampler.grid_hw)


def test_qu_decodes_the_early_feature_then_the_last_one():
    """QU equals its written-out computation on (early 1/16, last 1/32) features, and the early feature matters:
    replacing it changes the fused map well beyond the tolerance."""
    torch.manual_seed(0)
    grid = (4, 3)
    dec = ATMShrunkDecoder(
        in_channels=C_IN, num_classes=K, embed_dim=D, num_heads=HEADS, ffn_ratio=2, dropout=0.0,
        num_features=2, qu_layers_per_stage=2, atm_layers=1, grid_hw=grid,
    ).eval()
    g = torch.Generator().manual_seed(6)
    early, last = torch.randn(B, C_IN, 4, 4, generator=g), torch.randn(B, C_IN, 2, 2, generator=g)
    with torch.no_grad():
        fused = dec.upsampler([early, last])
        torch.testing.assert_close(fused, reference_qu(dec.upsampler, [early, last]), rtol=1e-4, atol=1e-5)
        other = dec.upsampler([torch.randn(B, C_IN, 4, 4, generator=g), last])
    assert (other - fused).abs().max() > 0.1  # measured: 0.64


def test_built_from_config_with_spec_defaults():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "ATMDecoder"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 150
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["blk12", "blk8", "blk6"]
    dec = build_transformer_decoder(cfg, 768)
    assert (dec.num_stages, len(dec.stages[0].layers)) == (3, 3)
    assert dec.class_tokens.weight.shape == (150, 384)
    assert dec.class_embed.out_features == 151
    assert dec.stages[0].layers[0].cross_attn.num_heads == 12
    assert dec.stages[0].layers[0].ffn.linear1.out_features == 4 * 384
    assert (dec.class_activation, dec.matcher_name, dec.criterion_name) == ("softmax", "FixedMatcher", "ATMCriterion")
    x = [torch.randn(1, 768, 32, 32) for _ in range(3)]
    with torch.no_grad():
        out = dec.eval()(x)
    assert out["pred_logits"].shape == (1, 150, 151) and out["pred_masks"].shape == (1, 150, 32, 32)
    assert len(out["aux_outputs"]) == 2


REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SEGVIT_CONFIGS = sorted(
    os.path.relpath(os.path.join(d, f), REPO)
    for d, _, files in os.walk(os.path.join(REPO, "configs"))
    for f in files
    if "segvit" in os.path.join(d, f) and not f.startswith("Base-")
)


def merged_cfg(path, *opts):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, path))
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.mark.parametrize("path", SEGVIT_CONFIGS)
def test_segvit_configs_are_consistent(path):
    """Every SegViT config: stage/QU inputs are returned by the backbone, the identity pixel decoder's width is
    the ViT width, head dim 32 (toy: 16), and sliding-window testing at the training crop for the Shrunk head."""
    cfg = merged_cfg(path)
    vit, atm = cfg.MODEL.VIT, cfg.MODEL.ATM
    assert set(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES) == {f"blk{b}" for b in vit.OUT_BLOCKS}
    assert cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM == vit.EMBED_DIM
    assert cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME == "IdentityPixelDecoder"
    if "toy" not in path:
        assert atm.EMBED_DIM == vit.EMBED_DIM // 2 and atm.EMBED_DIM // atm.NUM_HEADS == 32
        assert cfg.TEST.SLIDING_WINDOW and cfg.TEST.SLIDE_CROP == cfg.INPUT.CROP.SIZE[0]
        assert (cfg.SOLVER.BASE_LR * cfg.SOLVER.BACKBONE_MULTIPLIER, cfg.SOLVER.POLY_LR_POWER) == (2e-5, 1.0)
        assert (cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE) == (1500, 35.0)
    if cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME == "ATMShrunkDecoder":
        assert cfg.MODEL.BACKBONE.NAME == "D2ShrunkViT"
        first, last = (int(f[3:]) for f in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
        assert first <= cfg.MODEL.SHRUNK.QD_BLOCK < last  # QU reads a 1/16 then a 1/32 feature


def test_toy_model_trains_a_step_and_predicts():
    cfg = merged_cfg("configs/toy/semantic-segmentation/segvit_tiny_toy.yaml", "MODEL.DEVICE", "cpu")
    torch.manual_seed(0)
    model = build_model(cfg)
    inst = Instances((64, 64))
    inst.gt_classes = torch.tensor([1, 4])
    inst.gt_masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    inst.gt_masks[0, :32], inst.gt_masks[1, 32:] = True, True
    batch = [{"image": torch.rand(3, 64, 64) * 255, "instances": inst}]
    losses = model.train()(batch)
    assert set(losses) == {f"{k}{s}" for k in ("loss_ce", "loss_mask", "loss_dice") for s in ("", "_0")}
    sum(losses.values()).backward()
    assert model.sem_seg_head.predictor.class_tokens.weight.grad.abs().sum() > 0
    with torch.no_grad():
        out = model.eval()([{"image": torch.rand(3, 40, 56) * 255}])
    assert out[0]["sem_seg"].shape == (6, 40, 56)
