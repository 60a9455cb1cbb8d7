"""MultiScaleMaskedTransformerDecoder: contract, shapes and the masked-attention behaviour."""
import pytest
import torch

from qsegformers.decoders.layers import MLP, CrossAttentionLayer
from qsegformers.decoders.mask2former import MultiScaleMaskedTransformerDecoder

B, C, Q, K, D = 2, 32, 5, 4, 16
SIZES = [(2, 3), (4, 6), (8, 12)]  # 1/32, 1/16, 1/8 of a 64 x 96 image


def make_decoder(dec_layers=4, in_channels=C, enforce=False):
    torch.manual_seed(0)
    return MultiScaleMaskedTransformerDecoder(
        in_channels,
        num_classes=K,
        hidden_dim=C,
        num_queries=Q,
        nheads=4,
        dim_feedforward=64,
        dec_layers=dec_layers,
        pre_norm=False,
        mask_dim=D,
        enforce_input_project=enforce,
    ).eval()


def inputs(in_channels=C):
    torch.manual_seed(1)
    feats = [torch.randn(B, in_channels, h, w) for h, w in SIZES]
    return feats, torch.randn(B, D, 16, 24)


def test_output_contract_and_shapes():
    decoder = make_decoder(dec_layers=4)
    out = decoder(*inputs())
    assert out["pred_logits"].shape == (B, Q, K + 1)
    assert out["pred_masks"].shape == (B, Q, 16, 24)
    # one prediction on the input queries + one per layer; the last one is not an aux output
    assert len(out["aux_outputs"]) == 3
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (B, Q, K + 1) and aux["pred_masks"].shape == (B, Q, 16, 24)
    assert decoder.class_activation == "softmax" and decoder.matcher_name == "HungarianMatcher"


def test_mask_logits_are_query_embedding_dot_pixel_features():
    decoder = make_decoder(dec_layers=1)
    feats, mask_features = inputs()
    out = decoder(feats, mask_features)
    queries = decoder.decoder_norm(decoder.query_feat.weight)  # Q x C, same for every image
    expected = torch.einsum("qc,bchw->bqhw", decoder.mask_embed(queries), mask_features)
    torch.testing.assert_close(out["pred_masks"], expected)
    torch.testing.assert_close(out["pred_logits"], decoder.class_embed(queries).expand(B, Q, K + 1))


def test_input_projection_only_when_widths_differ():
    assert sum(p.numel() for p in make_decoder().input_proj.parameters()) == 0
    assert sum(p.numel() for p in make_decoder(enforce=True).input_proj.parameters()) > 0
    decoder = make_decoder(in_channels=24)
    out = decoder(*inputs(in_channels=24))
    assert out["pred_masks"].shape == (B, Q, 16, 24)


def test_cross_attention_ignores_pixels_outside_the_predicted_mask():
    """Features of blocked pixels do not change the first layer's output; attended pixels do."""
    decoder = make_decoder(dec_layers=2)
    feats, mask_features = inputs()
    memory = decoder.prepare_memory(feats)
    output, query_pos = decoder.prepare_queries(B)
    _, _, attn_mask = decoder.forward_prediction_heads(output, mask_features, memory.sizes[0])
    # block every pixel except the first one for all queries of image 0
    attn_mask = torch.ones_like(attn_mask)
    attn_mask[:, :, 0] = False
    layer = decoder.transformer_cross_attention_layers[0]
    base = layer(output, memory.src[0], memory_mask=attn_mask, pos=memory.pos[0], query_pos=query_pos)
    perturbed_src = memory.src[0].clone()
    perturbed_src[1:] += 10.0  # change every blocked pixel
    same = layer(output, perturbed_src, memory_mask=attn_mask, pos=memory.pos[0], query_pos=query_pos)
    torch.testing.assert_close(base, same)
    perturbed_src[0] += 10.0  # change the one attended pixel
    changed = layer(output, perturbed_src, memory_mask=attn_mask, pos=memory.pos[0], query_pos=query_pos)
    assert not torch.allclose(base, changed)


def test_attention_mask_thresholds_sigmoid_at_half():
    decoder = make_decoder()
    logits = torch.tensor([[[[-1.0, 1.0], [0.0, -0.1]]]])  # B=1, Q=1
    blocked = decoder.attention_mask(logits, (2, 2))
    assert blocked.shape == (decoder.num_heads, 1, 4)
    assert blocked[0, 0].tolist() == [True, False, False, True]


def test_fully_blocked_query_attends_everywhere_instead_of_nan():
    decoder = make_decoder(dec_layers=2)
    feats, mask_features = inputs()
    mask_features = torch.full_like(mask_features, -1e3)  # masks all negative -> everything blocked
    out = decoder(feats, mask_features)
    assert torch.isfinite(out["pred_logits"]).all()


def test_rejects_wrong_number_of_levels_and_layers():
    with pytest.raises(ValueError, match="3 feature levels"):
        make_decoder()(inputs()[0][:2], inputs()[1])
    with pytest.raises(ValueError, match="DEC_LAYERS"):
        make_decoder(dec_layers=0)


def test_gradients_reach_every_parameter():
    decoder = make_decoder(dec_layers=4).train()
    feats, mask_features = inputs()
    out = decoder(feats, mask_features)
    loss = out["pred_logits"].sum() + out["pred_masks"].sum()
    loss = loss + sum(a["pred_logits"].sum() + a["pred_masks"].sum() for a in out["aux_outputs"])
    loss.backward()
    no_grad = [n for n, p in decoder.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad


def test_mlp_and_cross_attention_weights():
    mlp = MLP(3, 5, 2, 3)
    assert [tuple(layer.weight.shape) for layer in mlp.layers] == [(5, 3), (5, 5), (2, 5)]
    layer = CrossAttentionLayer(C, 4)
    tgt, memory = torch.randn(Q, B, C), torch.randn(7, B, C)
    _, weights = layer(tgt, memory, need_weights=True)
    assert weights.shape == (B, Q, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, Q))
