"""FASegTransformerDecoder: Mask2Former equivalence, layer schedule, positional-query flow, masks, gradients;
the 4-scale PEG pixel decoder and the toy FASeg model."""
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from qsegformers.config import add_qsegformers_config
from qsegformers.decoders.faseg import FASegTransformerDecoder
from qsegformers.decoders.mask2former import MultiScaleMaskedTransformerDecoder
from qsegformers.pixel_decoders.build import build_pixel_decoder

from faseg_test_utils import B, C, D, K, MASK_SIZE, Q, SIZES, faseg_inputs, make_faseg


def _mask2former(dec_layers=10):
    torch.manual_seed(3)
    return MultiScaleMaskedTransformerDecoder(
        C, num_classes=K, hidden_dim=C, num_queries=Q, nheads=4, dim_feedforward=64, dec_layers=dec_layers,
        pre_norm=False, mask_dim=D, enforce_input_project=False,
    ).eval()


def test_both_features_off_is_mask2former_exactly():
    """DFPQ/HRCA off, sine PE, threshold 0.5, 10 layers: same parameters, same outputs for the same weights."""
    m2f = _mask2former()
    faseg = make_faseg(seed=7, dec_layers=10, dfpq_enabled=False, hrca_enabled=False, attn_mask_threshold=0.5)
    assert [(k, v.shape) for k, v in faseg.state_dict().items()] == [
        (k, v.shape) for k, v in m2f.state_dict().items()
    ]
    faseg.load_state_dict(m2f.state_dict(), strict=True)
    feats, _, mask_features = faseg_inputs(SIZES[:3])
    expected, got = m2f(feats, mask_features), faseg(feats, mask_features)
    assert len(got["aux_outputs"]) == len(expected["aux_outputs"]) == 9
    for e, g in zip(expected["aux_outputs"] + [expected], got["aux_outputs"] + [got]):
        torch.testing.assert_close(g["pred_logits"], e["pred_logits"], atol=1e-6, rtol=0)
        torch.testing.assert_close(g["pred_masks"], e["pred_masks"], atol=1e-6, rtol=0)
    # and the comparison is sensitive: FASeg's 0.15 threshold changes the outputs of the same weights
    faseg.attn_mask_threshold = 0.15
    assert not torch.allclose(faseg(feats, mask_features)["pred_masks"], expected["pred_masks"], atol=1e-4)


def test_outputs_and_parameters_of_the_full_decoder():
    decoder = make_faseg()
    feats, pos, mask_features = faseg_inputs()
    out = decoder(feats, mask_features, pos_embeddings=pos)
    assert out["pred_logits"].shape == (B, Q, K + 1) and out["pred_masks"].shape == (B, Q, *MASK_SIZE)
    assert len(out["aux_outputs"]) == 13  # 14 predictions with DEC_LAYERS = 14
    assert decoder.level_embed.weight.shape == (4, C)
    # shared 2-layer MLP h, official names adapt_pos2d.0 / adapt_pos2d.2
    assert [k for k, _ in decoder.adapt_pos2d.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # DFPQ adds only h (no extra params with dfpq_enabled False beyond it)
    off = make_faseg(dfpq_enabled=False)
    extra = sum(p.numel() for p in decoder.parameters()) - sum(p.numel() for p in off.parameters())
    assert extra == 2 * (C * C + C)


def _record_layer_inputs(decoder):
    """Hooks recording, per layer, the cross-attention key count and the self-attention positional query."""
    keys, pos_q = {}, {}
    for i, layer in enumerate(decoder.transformer_cross_attention_layers):
        layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: keys.__setitem__(i, args[1].shape[0]), with_kwargs=True
        )
    for i, layer in enumerate(decoder.transformer_self_attention_layers):
        layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: pos_q.__setitem__(i, kwargs["query_pos"].detach().clone()), with_kwargs=True
        )
    return keys, pos_q


def test_layer_schedule_and_hrca_token_count():
    """Levels 1/32, 1/16, 1/8, HRCA x 3 + a final 1/32 layer; HRCA sees floor(64/32) cells x 8 x 8 = 128 keys."""
    decoder = make_faseg()
    keys, _ = _record_layer_inputs(decoder)
    feats, pos, mask_features = faseg_inputs()
    decoder(feats, mask_features, pos_embeddings=pos)
    hw = [h * w for h, w in SIZES]
    assert [keys[i] for i in range(13)] == [hw[0], hw[1], hw[2], 2 * 64] * 3 + [hw[0]]
    vanilla = make_faseg(selection="all")
    keys_all, _ = _record_layer_inputs(vanilla)
    vanilla(feats, mask_features, pos_embeddings=pos)
    assert keys_all[3] == hw[3]


def test_positional_query_not_refreshed_by_hrca():
    """P of layer 4 (1/32) == P of layer 3 (HRCA) == h(A_2 K_p^{1/8} + B) from layer 2's attention."""
    decoder = make_faseg()
    _, pos_q = _record_layer_inputs(decoder)
    attn = {}
    decoder.transformer_cross_attention_layers[2].register_forward_hook(
        lambda m, args, kwargs, out: attn.__setitem__(2, out[1].detach()), with_kwargs=True
    )
    feats, pos, mask_features = faseg_inputs()
    decoder(feats, mask_features, pos_embeddings=pos)
    key_pos = pos[2].flatten(2).transpose(1, 2)  # B x HW_8 x C
    expected = decoder.adapt_pos2d(torch.bmm(attn[2], key_pos).transpose(0, 1) + decoder.query_embed.weight[:, None])
    torch.testing.assert_close(pos_q[3], expected)
    torch.testing.assert_close(pos_q[4], expected)
    assert not torch.allclose(pos_q[2], pos_q[3])


def test_mask_threshold_015_attends_probability_02():
    decoder = make_faseg()
    logits = torch.full((1, Q, 4, 4), torch.logit(torch.tensor(0.2)).item())
    assert not decoder.attention_mask(logits, (4, 4)).any()
    decoder.attn_mask_threshold = 0.5
    assert decoder.attention_mask(logits, (4, 4)).all()


def test_gradients_reach_dfpq_peg_inputs_and_attention_weights():
    decoder = make_faseg().train()
    feats, pos, mask_features = faseg_inputs()
    pos = [p.requires_grad_() for p in pos]
    out = decoder(feats, mask_features, pos_embeddings=pos)
    loss = sum(o["pred_masks"].square().mean() + o["pred_logits"].square().mean()
               for o in out["aux_outputs"] + [out])
    loss.backward()
    for name in ["adapt_pos2d.0.weight", "adapt_pos2d.2.weight", "query_embed.weight"]:
        assert decoder.get_parameter(name).grad.abs().sum() > 0, name
    for i, layer in enumerate(decoder.transformer_cross_attention_layers):
        assert layer.multihead_attn.in_proj_weight.grad.abs().sum() > 0, i
    for level, p in enumerate(pos):  # K_p of every level (the PEG outputs) gets a gradient
        assert p.grad.abs().sum() > 0, level


@pytest.mark.parametrize(
    "overrides",
    [dict(query_type="grid_anchor"), dict(query_type="dynamic_anchor"), dict(query_type="dynamic_foreground"),
     dict(shared_across_queries=False), dict(mapping="bilinear"), dict(selection="random"), dict(share_mlp=False),
     dict(hrca_query_pos="dfpq"), dict(first_layer_pool="background")],
)
def test_variants_produce_finite_outputs_that_differ_from_default(overrides):
    feats, pos, mask_features = faseg_inputs()
    base = make_faseg()(feats, mask_features, pos_embeddings=pos)["pred_masks"]
    out = make_faseg(**overrides)(feats, mask_features, pos_embeddings=pos)["pred_masks"]
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, base)


def test_config_builds_decoder_and_rejects_bad_values():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 14
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = K
    decoder = FASegTransformerDecoder(cfg, 256)
    assert decoder.attn_mask_threshold == 0.15 and decoder.omega_rate == 32 and decoder.first_layer_pool == "foreground"
    assert decoder.num_feature_levels == 4 and decoder.num_layers == 13
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 13  # 12 layers: no final 1/32 layer although EXTRA_FINAL_LOW_RES_LAYER
    with pytest.raises(ValueError, match="EXTRA_FINAL_LOW_RES_LAYER"):
        FASegTransformerDecoder(cfg, 256)
    cfg.MODEL.HRCA.EXTRA_FINAL_LOW_RES_LAYER = False
    assert FASegTransformerDecoder(cfg, 256).num_layers == 12
    cfg.MODEL.HRCA.MAPPING = "nearest"
    with pytest.raises(ValueError, match="MODEL.HRCA.MAPPING"):
        FASegTransformerDecoder(cfg, 256)
    cfg.MODEL.HRCA.MAPPING = "block"
    cfg.MODEL.HRCA.LEVELS = ["1/8"]
    with pytest.raises(ValueError, match="MODEL.HRCA.LEVELS"):
        FASegTransformerDecoder(cfg, 256)


def _pixel_decoder_cfg(**dfpq):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    ssh = cfg.MODEL.SEM_SEG_HEAD
    ssh.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder4Scales"
    ssh.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    ssh.CONVS_DIM, ssh.MASK_DIM, ssh.NORM, ssh.TRANSFORMER_ENC_LAYERS = 32, 16, "GN", 1
    for key, value in dfpq.items():
        cfg.MODEL.DFPQ[key] = value
    return cfg


def test_four_scale_pixel_decoder_returns_peg_maps_and_the_quarter_level():
    shapes = {"res2": (8, 4), "res3": (16, 8), "res4": (24, 16), "res5": (32, 32)}
    input_shape = {k: ShapeSpec(channels=c, stride=s) for k, (c, s) in shapes.items()}
    torch.manual_seed(0)
    features = {k: torch.randn(2, c, 64 // s, 64 // s) for k, (c, s) in shapes.items()}
    decoder = build_pixel_decoder(_pixel_decoder_cfg(), input_shape).eval()
    mask_features, _, multi_scale, pos = decoder.forward_features_with_pos(features)
    assert [tuple(x.shape[-2:]) for x in multi_scale] == [(2, 2), (4, 4), (8, 8), (16, 16)]
    assert [tuple(p.shape) for p in pos] == [(2, 32, 2, 2), (2, 32, 4, 4), (2, 32, 8, 8), (2, 32, 16, 16)]
    # PE_4 is the depth-wise conv of the res2 projection (not of the FPN output); PE_32 of the res5 projection
    res2 = decoder.input_proj[3](features["res2"])
    torch.testing.assert_close(pos[3], torch.nn.functional.conv2d(
        res2, decoder.pos_linear[3].weight, decoder.pos_linear[3].bias, padding=1, groups=32))
    torch.testing.assert_close(pos[0], decoder.pos_linear[0](decoder.input_proj[0](features["res5"])))
    torch.testing.assert_close(mask_features, decoder.mask_features(multi_scale[3]))
    assert len(decoder.forward_features(features)[2]) == 4
    cfg_off = _pixel_decoder_cfg(POS_ENCODING="sine")
    cfg_off.MODEL.HRCA.ENABLED = False
    plain = build_pixel_decoder(cfg_off, input_shape)
    assert len(plain.input_proj) == 3 and not hasattr(plain, "pos_linear")
    assert len(plain.forward_features_with_pos(features)[3]) == 3
    learned = build_pixel_decoder(_pixel_decoder_cfg(POS_ENCODING="learnable", LEARNABLE_PE_SIZE=4), input_shape)
    pos = learned.forward_features_with_pos(features)[3]
    assert learned.pos_embed.shape == (4, 32, 4, 4) and [tuple(p.shape[-2:]) for p in pos][2:] == [(8, 8), (16, 16)]
    torch.testing.assert_close(pos[1][0], learned.pos_embed[1])  # a 4 x 4 level gets its grid unchanged
    sum(p.sum() for p in pos).backward()
    assert learned.pos_embed.grad.abs().sum() > 0


def test_toy_faseg_model_trains_one_step():
    """The toy config builds MaskFormerHeadFASeg + 4-scale PEG pixel decoder + FASeg decoder; losses backprop."""
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "toy",
                                     "semantic-segmentation", "faseg_R18_toy.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 64
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = []
    for _ in range(2):
        inst = Instances((64, 64))
        masks = torch.zeros(2, 64, 64, dtype=torch.bool)
        masks[0, :32], masks[1, 32:] = True, True
        inst.gt_masks, inst.gt_classes = BitMasks(masks), torch.tensor([0, 4])
        batch.append({"image": torch.randint(0, 256, (3, 64, 64)).float(), "instances": inst})
    losses = model(batch)
    assert len(losses) == 3 * 6  # ce, mask, dice for the 6 predictions of DEC_LAYERS = 6
    sum(losses.values()).backward()
    head = model.sem_seg_head
    assert type(head).__name__ == "MaskFormerHeadFASeg"
    assert head.pixel_decoder.pos_linear[3].weight.grad.abs().sum() > 0  # PE_4 reaches the loss via HRCA
    assert head.predictor.adapt_pos2d[0].weight.grad.abs().sum() > 0
