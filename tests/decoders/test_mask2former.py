"""MultiScaleMaskedTransformerDecoder: contract, shapes and the masked-attention behaviour."""
import pytest
import torch
import torch.nn.functional as F

from qsegformers.decoders.layers import MLP, CrossAttentionLayer
from qsegformers.decoders.mask2former import DecoderState, MultiScaleMaskedTransformerDecoder

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
    state = DecoderState(mask_features=mask_features)
    memory = decoder.prepare_memory(feats, state)
    output, query_pos = decoder.prepare_queries(state)
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


def _features_blocking_query_0(decoder):
    """Mask features whose input-query prediction blocks query 0 everywhere (logit -10) while every other query
    predicts a random pattern (logit = pattern), so it attends to a part of each level."""
    with torch.no_grad():
        embed = decoder.mask_embed(decoder.decoder_norm(decoder.query_feat.weight))  # Q x D
        target = torch.zeros(Q, 2)
        target[0, 0], target[1:, 1] = -10.0, 1.0
        v = torch.linalg.pinv(embed) @ target  # D x 2: embed @ v = target (Q < D)
    pattern = torch.randn(B, 1, 16, 24, generator=torch.Generator().manual_seed(2))
    return v[:, 0][None, :, None, None] + pattern * v[:, 1][None, :, None, None]


def test_fully_blocked_query_attends_to_every_key_others_keep_their_mask():
    """The input prediction blocks query 0 at every 1/32 pixel: layer 0's cross-attention gives it the unmasked
    attention over all keys (memory_mask=None), the other queries the masked attention of their own predicted
    mask, and the whole forward equals a reference in which fully blocked rows are unmasked by hand."""
    decoder = make_decoder(dec_layers=4)
    feats, _ = inputs()
    mask_features = _features_blocking_query_0(decoder)
    with torch.no_grad():
        logits = decoder.forward_prediction_heads(*decoder.prepare_queries(DecoderState(mask_features=mask_features))[:1], mask_features, SIZES[0])[1]
    low = F.interpolate(logits, size=SIZES[0], mode="bilinear", align_corners=False).flatten(2)  # B x Q x 6
    assert (low[:, 0] < -5).all()  # query 0: sigmoid < 0.5 at every key
    assert low[:, 1:].abs().min() > 1e-3  # the others are not decided by float noise ...
    predicted = low.sigmoid() < 0.5
    assert predicted[:, 1:].any(-1).all() and (~predicted[:, 1:]).any(-1).all()  # ... and partially blocked
    captured = {}
    handle = decoder.transformer_cross_attention_layers[0].register_forward_hook(
        lambda m, args, kwargs, out: captured.update(args=args, kwargs=kwargs, out=out.detach().clone()),
        with_kwargs=True,
    )
    with torch.no_grad():
        out = decoder(feats, mask_features)
    handle.remove()  # the reference calls below must not overwrite the capture
    layer = decoder.transformer_cross_attention_layers[0]
    tgt, memory = captured["args"]
    pos, query_pos = captured["kwargs"]["pos"], captured["kwargs"]["query_pos"]
    with torch.no_grad():
        unmasked = layer(tgt, memory, memory_mask=None, pos=pos, query_pos=query_pos)
        mask = predicted.repeat_interleave(decoder.num_heads, dim=0)  # (B*heads) x Q x S, image-major
        masked = layer(tgt, memory, memory_mask=mask.clone(), pos=pos, query_pos=query_pos)
    torch.testing.assert_close(captured["out"][0], unmasked[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured["out"][1:], masked[1:], atol=1e-5, rtol=1e-5)
    assert (unmasked[1:] - masked[1:]).abs().max() > 1e-2  # masking the other rows does change them

    reference = make_decoder(dec_layers=4)
    plain_mask = reference.attention_mask

    def unmask_full_rows(outputs_mask, target_size):
        blocked = plain_mask(outputs_mask, target_size)
        return torch.where(blocked.all(-1, keepdim=True), torch.zeros_like(blocked), blocked)

    reference.attention_mask = unmask_full_rows
    with torch.no_grad():
        expected = reference(feats, mask_features)
    torch.testing.assert_close(out["pred_logits"], expected["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["pred_masks"], expected["pred_masks"], atol=1e-4, rtol=1e-5)


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
