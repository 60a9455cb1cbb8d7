"""PyramidFusionTransformerDecoder: output contract, logit averaging, cross-scale isolation, attention
logits, parameter counts (decoder and full models from the configs) and both pixel decoders."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from qsegformers import add_qsegformers_config
from qsegformers.decoders.pft import PyramidFusionTransformerDecoder
from qsegformers.decoders.pft_config import add_pft_config
from qsegformers.decoders.pft_layers import head_averaged_attention_logits
from qsegformers.inference import semantic_inference
from qsegformers.pixel_decoders.position_encoding import PositionEmbeddingSine

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
B, C, K, D = 2, 16, 5, 8
SIZES = [(2, 3), (4, 6), (8, 12)]  # strides 32, 16, 8 of a 64 x 96 image
MASK_SIZE = (16, 24)


def make_decoder(dec_layers=3, **kwargs):
    torch.manual_seed(0)
    args = dict(
        num_classes=K, hidden_dim=C, nheads=4, dim_feedforward=32, dec_layers=dec_layers, pre_norm=False,
        mask_dim=D, dropout=0.0,
    )
    args.update(kwargs)
    return PyramidFusionTransformerDecoder(C, **args)


def inputs(seed=1):
    torch.manual_seed(seed)
    return [torch.randn(B, C, h, w) for h, w in SIZES], torch.randn(B, D, *MASK_SIZE)


def test_output_shapes_for_k_classes_and_three_scales():
    decoder = make_decoder(dec_layers=4).train()
    out = decoder(*inputs())
    assert out["pred_logits"].shape == (B, K, K)
    assert out["pred_class_logits"].shape == (B, K)
    assert out["pred_class_logits_per_scale"].shape == (3, B, K)
    assert out["pred_masks"].shape == (B, K, *MASK_SIZE)
    # 3 layers: the input-query prediction and layers 1, 2 are aux outputs; layer 3 is the top level
    assert len(out["aux_outputs"]) == 3
    assert out["aux_outputs"][0]["attn_logits"] is None
    for o in out["aux_outputs"][1:] + [out]:
        # scales finest first: strides 8, 16, 32
        assert [tuple(a.shape) for a in o["attn_logits"]] == [(B, K, *s) for s in SIZES[::-1]]
    assert decoder.class_activation == "sigmoid"
    assert decoder.matcher_name == "FixedMatcher" and decoder.criterion_name == "PFTCriterion"
    # inference: only the final prediction, no attention logits (both exist only for the losses)
    final = decoder.eval()(*inputs())
    assert final["attn_logits"] is None and final["aux_outputs"] == []
    torch.testing.assert_close(final["pred_masks"], out["pred_masks"])  # dropout 0: same as in training


def test_without_input_query_supervision_aux_outputs_are_the_earlier_layers():
    out = make_decoder(dec_layers=4, supervise_input_queries=False).train()(*inputs())
    assert len(out["aux_outputs"]) == 2
    assert all(o["attn_logits"] is not None for o in out["aux_outputs"])


def test_fewer_scales_use_the_coarsest_levels():
    out = make_decoder(num_scales=2).train()(*inputs())
    assert out["pred_class_logits_per_scale"].shape == (2, B, K)
    assert [tuple(a.shape[-2:]) for a in out["attn_logits"]] == [SIZES[1], SIZES[0]]  # strides 16, 32
    with pytest.raises(ValueError, match="NUM_SCALES"):
        make_decoder(num_scales=4)


def test_logits_are_averaged_over_scales_before_any_activation():
    decoder = make_decoder().train()  # training: aux outputs are computed
    decoder.return_masks_per_scale = True
    feats, mask_features = inputs()
    out = decoder(feats, mask_features)
    torch.testing.assert_close(out["pred_class_logits"], out["pred_class_logits_per_scale"].mean(0))
    torch.testing.assert_close(out["pred_masks"], out["pred_masks_per_scale"].mean(0))
    # the input-query prediction, recomputed from the parameters: query k of scale s is query_feat[s][k]
    first = out["aux_outputs"][0]
    z, m = [], []
    for s, head in enumerate(decoder.heads):
        q = F.layer_norm(decoder.query_feat[s].weight, (C,), head.norm.weight, head.norm.bias)
        z.append(q @ head.class_embed.weight[0] + head.class_embed.bias[0])
        m.append(torch.einsum("kc,bchw->bkhw", head.mask_embed(q), mask_features))
    torch.testing.assert_close(first["pred_class_logits"], (sum(z) / 3).expand(B, K))
    torch.testing.assert_close(first["pred_masks"], sum(m) / 3)


def test_semantic_inference_is_sigmoid_class_times_sigmoid_mask_without_extra_column():
    out = make_decoder().eval()(*inputs())
    for b in range(B):
        scores = semantic_inference(out["pred_logits"][b], out["pred_masks"][b], activation="sigmoid")
        expected = out["pred_class_logits"][b].sigmoid()[:, None, None] * out["pred_masks"][b].sigmoid()
        assert scores.shape == (K, *MASK_SIZE)  # K maps, no (K+1)-th column
        torch.testing.assert_close(scores, expected)
        assert scores.min() >= 0 and scores.max() <= 1
        assert torch.equal(scores.argmax(0), expected.argmax(0))


def per_scale_predictions(decoder, feats, mask_features, layer):
    out = decoder(feats, mask_features)
    pred = out["aux_outputs"][layer] if layer < len(out["aux_outputs"]) else out
    return pred["pred_class_logits_per_scale"], pred["pred_masks_per_scale"], pred["attn_logits"]


@pytest.mark.parametrize("cross_scale", [False, True])
def test_branches_are_independent_only_without_cross_scale_attention(cross_scale):
    decoder = make_decoder(dec_layers=3, cross_scale_attention=cross_scale).train()  # train: attention logits
    decoder.return_masks_per_scale = True
    feats, mask_features = inputs()
    perturbed = [feats[0] + torch.randn_like(feats[0])] + feats[1:]  # the stride-32 features
    for layer in (1, 2):  # outputs of decoder layers 1 and 2
        z, m, a = per_scale_predictions(decoder, feats, mask_features, layer)
        z2, m2, a2 = per_scale_predictions(decoder, perturbed, mask_features, layer)
        assert not torch.allclose(z[2], z2[2])  # the stride-32 branch itself always changes
        # Layer 1's IQA runs before any cross-attention, on queries that have not seen pixels yet: the
        # stride-32 features reach the other branches from layer 2 on, and only through IQA.
        independent = layer == 1 or not cross_scale
        for s in (0, 1):  # strides 8 and 16
            assert torch.allclose(z[s], z2[s]) == independent
            assert torch.allclose(m[s], m2[s]) == independent
            assert torch.allclose(a[s], a2[s]) == independent


def test_head_averaged_logits_equal_mean_of_per_head_logits():
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(C, 4)
    query, key = torch.randn(K, B, C), torch.randn(7, B, C)
    w_q, w_k, _ = attn.in_proj_weight.chunk(3)
    b_q, b_k, _ = attn.in_proj_bias.chunk(3)
    q = (query @ w_q.T + b_q).reshape(K, B, 4, C // 4).permute(1, 2, 0, 3)  # B x h x K x C/h
    k = (key @ w_k.T + b_k).reshape(7, B, 4, C // 4).permute(1, 2, 0, 3)
    per_head = q @ k.transpose(-1, -2) / math.sqrt(C // 4)
    logits = head_averaged_attention_logits(attn, query, key)
    torch.testing.assert_close(logits, per_head.mean(1))
    # with one head the softmax of these logits is what the module itself attends with
    single = torch.nn.MultiheadAttention(C, 1)
    _, weights = single(query, key, key, need_weights=True)
    torch.testing.assert_close(head_averaged_attention_logits(single, query, key).softmax(-1), weights)


def test_attention_logits_are_those_of_the_actual_cross_attention():
    """At the call site: each layer's ``attn_logits`` equal the head-averaged pre-softmax logits of that layer's
    cross-attention, q from the queries + their embedding, k from the pixel tokens + their sine encoding
    (recomputed here from the features), and their per-head softmax is what the module attends with."""
    decoder = make_decoder(dec_layers=3).train()
    feats, mask_features = inputs()
    calls = {}
    for i, layer in enumerate(decoder.layers):
        for s, ca in enumerate(layer.cross_attention_layers):
            ca.register_forward_pre_hook(
                lambda m, args, kwargs, key=(i, s): calls.__setitem__(key, (args, kwargs)), with_kwargs=True
            )
    out = decoder(feats, mask_features)
    predictions = out["aux_outputs"][1:] + [out]  # aux 0 is the input-query prediction
    sine = PositionEmbeddingSine(C // 2, normalize=True)
    heads, d = 4, C // 4
    for (i, s), (args, kwargs) in sorted(calls.items()):
        feature = feats[::-1][s]  # scales finest first
        memory = feature.flatten(2).permute(2, 0, 1)  # in_channels == hidden_dim: no projection
        pos = sine(feature).flatten(2).permute(2, 0, 1)
        query_pos = decoder.query_embed[s].weight[:, None].expand(K, B, C)
        tgt = args[0].detach()
        torch.testing.assert_close(kwargs["pos"], pos)  # what the cross-attention itself adds to its keys
        mha = decoder.layers[i].cross_attention_layers[s].multihead_attn
        w_q, w_k, _ = mha.in_proj_weight.detach().chunk(3)
        b_q, b_k, _ = mha.in_proj_bias.detach().chunk(3)
        q = ((tgt + query_pos) @ w_q.T + b_q).reshape(K, B, heads, d).permute(1, 2, 0, 3)  # B x h x K x d
        k = ((memory + pos) @ w_k.T + b_k).reshape(-1, B, heads, d).permute(1, 2, 0, 3)  # B x h x HW x d
        per_head = q @ k.transpose(-1, -2) / math.sqrt(d)
        with torch.no_grad():
            _, weights = mha(tgt + query_pos, memory + pos, memory, need_weights=True, average_attn_weights=False)
        torch.testing.assert_close(per_head.softmax(-1), weights, rtol=1e-4, atol=1e-6)
        expected = per_head.mean(1).unflatten(-1, feature.shape[-2:])
        torch.testing.assert_close(predictions[i]["attn_logits"][s].detach(), expected, rtol=1e-4, atol=1e-5)
    assert len(calls) == 2 * 3


def test_attention_loss_gradient_reaches_query_and_key_projections_only():
    decoder = make_decoder(dec_layers=2).train()
    out = decoder(*inputs())
    out["attn_logits"][0].logsumexp(-1).sum().backward()
    grad = decoder.layers[0].cross_attention_layers[0].multihead_attn.in_proj_weight.grad
    g_q, g_k, g_v = grad.chunk(3)
    assert g_q.abs().sum() > 0 and g_k.abs().sum() > 0
    assert g_v.abs().sum() == 0


def count(module):
    return sum(p.numel() for p in module.parameters())


def paper_decoder(**kwargs):
    return PyramidFusionTransformerDecoder(
        256, num_classes=150, hidden_dim=256, nheads=8, dim_feedforward=2048, dec_layers=7, pre_norm=False,
        mask_dim=256, dropout=0.1, **kwargs,
    )


def test_decoder_parameter_count_matches_the_spec_arithmetic():
    # spec 2.7: per scale per layer 1,578,752; IQA per layer 263,680; queries 230,400; heads 594,435
    mha, ffn, ln = 4 * 256 * 256 + 4 * 256, 2 * 256 * 2048 + 2048 + 256, 2 * 256
    iqa = mha + ln
    per_layer = 3 * (2 * mha + ffn + 3 * ln) + iqa
    heads = 3 * (ln + 257 + 3 * (256 * 256 + 256))
    expected = 6 * per_layer + 2 * 3 * 150 * 256 + heads
    assert expected == 30_824_451
    decoder = paper_decoder()
    assert count(decoder) == expected
    assert count(decoder.layers[0].inter_query_attention) == iqa == 263_680
    assert count(paper_decoder(output_norm=False)) == expected - 3 * ln
    assert count(paper_decoder(cross_scale_attention=False)) == expected - 6 * iqa
    assert count(paper_decoder(iqa_ffn=True)) == expected + 6 * (ffn + ln)
    assert count(paper_decoder(cls_head="per_class")) == expected - 3 * 257 + 3 * 150 * 257


def test_ffn_position_and_per_class_head_change_the_computation():
    feats, mask_features = inputs()
    after_cross = make_decoder().eval()
    after_self = make_decoder(ffn_position="after_self").eval()
    after_self.load_state_dict(after_cross.state_dict())
    masks_cross = after_cross(feats, mask_features)["pred_masks"]
    assert not torch.allclose(masks_cross, after_self(feats, mask_features)["pred_masks"])
    per_class = make_decoder(dec_layers=2, cls_head="per_class").train()
    out = per_class(feats, mask_features)["aux_outputs"][0]  # the input-query prediction
    z = []
    for s, head in enumerate(per_class.heads):
        q = head.norm(per_class.query_feat[s].weight)
        z.append((q * head.class_embed.weight).sum(-1) + head.class_embed.bias)
    torch.testing.assert_close(out["pred_class_logits"], (sum(z) / 3).expand(B, K))
    with pytest.raises(ValueError, match="FFN_POSITION"):
        make_decoder(ffn_position="before_all")


def pft_cfg(config_file, *opts):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    add_pft_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, config_file))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.mark.parametrize(
    "config_file,paper_millions",
    [
        ("configs/ade20k/semantic-segmentation/pft/pft_R50_bs16_160k.yaml", 62),
        ("configs/ade20k/semantic-segmentation/pft/pft_swin_tiny_bs16_160k.yaml", 63),
    ],
)
def test_full_model_parameter_count_within_3_percent_of_the_paper(config_file, paper_millions):
    torch.manual_seed(0)
    model = build_model(pft_cfg(config_file))
    params = count(model)
    assert abs(params / 1e6 - paper_millions) / paper_millions < 0.03, params
    assert count(model.sem_seg_head.predictor) == 30_824_451


@pytest.mark.parametrize("pixel_decoder", ["BasePixelDecoder", "MSDeformAttnPixelDecoder"])
def test_toy_model_trains_and_infers_with_either_pixel_decoder(pixel_decoder):
    torch.manual_seed(0)
    cfg = pft_cfg(
        "configs/toy/semantic-segmentation/pft_R18_toy.yaml",
        "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", pixel_decoder,
    )
    model = build_model(cfg)
    assert type(model.sem_seg_head.pixel_decoder).__name__ == pixel_decoder
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    inst = Instances((64, 64))
    inst.gt_classes = torch.tensor([4, 1])
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, :32], masks[1, 32:] = True, True
    inst.gt_masks = BitMasks(masks)
    losses = model.train()([{"image": image, "instances": inst}])
    assert {"loss_ce", "loss_focal_ce", "loss_mask", "loss_dice", "loss_attn", "loss_attn_2"} <= set(losses)
    assert "loss_attn_0" not in losses  # the input-query prediction has no cross-attention
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert model.sem_seg_head.predictor.query_feat[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        result = model.eval()([{"image": image, "height": 64, "width": 64}])[0]["sem_seg"]
    assert result.shape == (6, 64, 64) and result.min() >= 0 and result.max() <= 1
