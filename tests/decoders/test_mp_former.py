"""MPMaskedTransformerDecoder: Mask2Former equivalence, isolation of the MP part, pilot masks, content."""
import torch

from qsegformers.decoders.mask2former import MultiScaleMaskedTransformerDecoder
from qsegformers.decoders.mp_former import (
    MPMaskedTransformerDecoder,
    MultiScaleMaskedTransformerDecoderMaskDN,
    mp_self_attention_mask,
)
from qsegformers.decoders.mp_noise import downsample_gt, resize_nearest

B, C, Q, K, D, HEADS = 2, 16, 5, 4, 8, 2
SIZES = [(2, 3), (4, 6), (8, 12)]  # 1/32, 1/16, 1/8 of a 64 x 96 image
BASE_ARGS = dict(
    num_classes=K, hidden_dim=C, num_queries=Q, nheads=HEADS, dim_feedforward=32, dec_layers=4,
    pre_norm=False, mask_dim=D, enforce_input_project=False,
)


def make_mp(**mp_args):
    torch.manual_seed(0)
    return MPMaskedTransformerDecoder(C, **BASE_ARGS, **mp_args)


def make_m2f_like(mp_decoder):
    """A plain Mask2Former decoder with the MP decoder's weights (everything but label_enc)."""
    m2f = MultiScaleMaskedTransformerDecoder(C, **BASE_ARGS)
    state = {k: v for k, v in mp_decoder.state_dict().items() if not k.startswith("label_enc")}
    m2f.load_state_dict(state, strict=True)
    return m2f


def inputs():
    torch.manual_seed(1)
    return [torch.randn(B, C, h, w) for h, w in SIZES], torch.randn(B, D, 16, 24)


def targets():
    """Image 0: 3 segments, image 1: 1 segment, as 64 x 96 padded masks."""
    g = torch.Generator().manual_seed(2)
    masks0 = torch.zeros(3, 64, 96, dtype=torch.bool)
    masks0[0, :32, :48] = True
    masks0[1, 40:, 10:70] = True
    masks0[2] = torch.rand(64, 96, generator=g) > 0.8
    masks1 = torch.zeros(1, 64, 96, dtype=torch.bool)
    masks1[0, 8:24, 60:90] = True
    return [{"labels": torch.tensor([1, 3, 0]), "masks": masks0}, {"labels": torch.tensor([2]), "masks": masks1}]


def all_predictions(out):
    return [(out["pred_logits"], out["pred_masks"])] + [(a["pred_logits"], a["pred_masks"]) for a in out["aux_outputs"]]


def test_eval_mode_equals_mask2former_exactly():
    mp = make_mp().eval()
    m2f = make_m2f_like(mp).eval()
    feats, mask_features = inputs()
    got = mp(feats, mask_features, targets=targets())
    ref = m2f(feats, mask_features)
    assert "mp_outputs" not in got
    for (gc, gm), (rc, rm) in zip(all_predictions(got), all_predictions(ref)):
        assert torch.equal(gc, rc) and torch.equal(gm, rm)


def test_training_with_mp_disabled_equals_mask2former():
    mp = make_mp(mp_enabled=False).train()
    m2f = make_m2f_like(mp).train()
    feats, mask_features = inputs()
    got, ref = mp(feats, mask_features, targets=targets()), m2f(feats, mask_features)
    assert "mp_outputs" not in got
    for (gc, gm), (rc, rm) in zip(all_predictions(got), all_predictions(ref)):
        torch.testing.assert_close(gc, rc, atol=1e-6, rtol=0)
        torch.testing.assert_close(gm, rm, atol=1e-6, rtol=0)


def test_matching_part_is_unchanged_by_the_mp_part():
    """Training with MP: the matching queries' predictions equal those of a run without MP, at every layer."""
    mp = make_mp(mask_noise="point").train()
    m2f = make_m2f_like(mp).train()
    feats, mask_features = inputs()
    got, ref = mp(feats, mask_features, targets=targets()), m2f(feats, mask_features)
    assert "mp_outputs" in got
    for (gc, gm), (rc, rm) in zip(all_predictions(got), all_predictions(ref)):
        torch.testing.assert_close(gc, rc, atol=1e-5, rtol=0)
        torch.testing.assert_close(gm, rm, atol=1e-5, rtol=0)


def test_mp_output_shapes_and_groups():
    """T_max = 3 -> G = 100 // 3 = 33 groups, P = 99 slots; a fixed NUM_GROUPS overrides the budget."""
    feats, mask_features = inputs()
    out = make_mp().train()(feats, mask_features, targets=targets())["mp_outputs"]
    assert (out["num_groups"], out["max_targets"]) == (33, 3)
    assert out["pred_logits"].shape == (B, 99, K + 1) and out["pred_masks"].shape == (B, 99, 16, 24)
    assert len(out["aux_outputs"]) == 3
    out = make_mp(mp_num_groups=2).train()(feats, mask_features, targets=targets())["mp_outputs"]
    assert out["pred_logits"].shape == (B, 6, K + 1) and out["num_groups"] == 2


def test_groups_do_not_see_each_other():
    """Changing the content of group 1 changes group 1's outputs only (not group 0, not the matching part)."""
    decoder = make_mp(mp_num_groups=2, mask_noise="none", label_noise_ratio=0.0).train()
    feats, mask_features = inputs()
    base = decoder(feats, mask_features, targets=targets())
    original = decoder.mp_content

    def perturbed(mp, like):
        content = original(mp, like).clone()
        content[mp.max_targets:] += 5.0  # group 1 = slots 3..5
        return content

    decoder.mp_content = perturbed
    changed = decoder(feats, mask_features, targets=targets())
    for (bc, bm), (cc, cm) in zip(all_predictions(base["mp_outputs"]), all_predictions(changed["mp_outputs"])):
        torch.testing.assert_close(bc[:, :3], cc[:, :3], atol=1e-5, rtol=0)
        torch.testing.assert_close(bm[:, :3], cm[:, :3], atol=1e-5, rtol=0)
    assert not torch.allclose(base["mp_outputs"]["pred_logits"][:, 3:], changed["mp_outputs"]["pred_logits"][:, 3:])
    for (bc, _), (cc, _) in zip(all_predictions(base), all_predictions(changed)):
        torch.testing.assert_close(bc, cc, atol=1e-5, rtol=0)


def test_self_attention_mask_layout():
    """G=2, T_max=3, N=4: rows 0-2 blocked on 3-5, rows 3-5 on 0-2, rows 6-9 on 0-5, nothing else."""
    mask = mp_self_attention_mask(2, 3, 4)
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[0:3, 3:6] = True
    expected[3:6, 0:3] = True
    expected[6:10, 0:6] = True
    assert torch.equal(mask, expected)


def record_cross_attention_masks(decoder):
    """Wrap every cross-attention layer to record the memory mask it receives (after unblocking)."""
    records = []
    for layer in decoder.transformer_cross_attention_layers:
        forward = layer.forward

        def wrapped(*args, _forward=forward, **kwargs):
            records.append(kwargs["memory_mask"].clone())
            return _forward(*args, **kwargs)

        layer.forward = wrapped
    return records


def expected_pilot_rows(size, num_groups):
    """B x P x (h*w) blocked rows of the slots from the clean GT (padding rows: all False, i.e. unblocked)."""
    rows = []
    for t in targets():
        small = downsample_gt(t["masks"], size, "area_any").flatten(1)
        pad = torch.zeros(3 - small.shape[0], small.shape[1], dtype=torch.bool)
        blocked = torch.cat([~small, pad])  # padding rows are fully blocked, then unblocked everywhere
        rows.append(blocked.repeat(num_groups, 1))
    return torch.stack(rows)


def test_pilot_masks_replace_mp_rows_in_every_layer_without_noise():
    decoder = make_mp(mp_num_groups=2, mask_noise="none").train()
    records = record_cross_attention_masks(decoder)
    feats, mask_features = inputs()
    decoder(feats, mask_features, targets=targets())
    assert len(records) == 3
    for i, attn_mask in enumerate(records):
        got = attn_mask.view(B, HEADS, 6 + Q, -1)[:, :, :6]
        expected = expected_pilot_rows(SIZES[i % 3], 2)
        for h in range(HEADS):
            assert torch.equal(got[:, h], expected)


def test_first_layer_only_then_own_predictions():
    """MP.LAYERS = 1: layer 0 uses the GT; layer 1's MP rows come from the slots' own layer-0 predictions."""
    decoder = make_mp(mp_num_groups=1, mask_noise="none", mp_layers=1).train()
    records = record_cross_attention_masks(decoder)
    feats, mask_features = inputs()
    out = decoder(feats, mask_features, targets=targets())
    assert torch.equal(records[0].view(B, HEADS, 3 + Q, -1)[:, 0, :3], expected_pilot_rows(SIZES[0], 1))
    layer0_masks = out["mp_outputs"]["aux_outputs"][1]["pred_masks"]  # prediction after layer 0
    own = decoder.attention_mask(layer0_masks, SIZES[1])
    own[torch.where(own.sum(-1) == own.shape[-1])] = False
    assert torch.equal(records[1].view(B, HEADS, 3 + Q, -1)[:, :, :3], own.view(B, HEADS, 3, -1))


def test_point_noise_is_fresh_in_every_layer():
    """Same level (layers 0 and 3 both read 1/32), different noise; NOISE_PER_LAYER=False repeats it."""
    feats, mask_features = inputs()
    args = dict(BASE_ARGS, dec_layers=5)
    for per_layer, expect_equal in ((True, False), (False, True)):
        torch.manual_seed(0)
        decoder = MPMaskedTransformerDecoder(
            C, **args, mp_num_groups=4, point_noise_ratio=1.0, noise_per_layer=per_layer
        ).train()
        records = record_cross_attention_masks(decoder)
        torch.manual_seed(3)
        decoder(feats, mask_features, targets=targets())
        first, fourth = (records[i].view(B, HEADS, 12 + Q, -1)[:, 0, :12] for i in (0, 3))
        assert torch.equal(first, fourth) == expect_equal


def test_label_guided_content_with_no_label_noise():
    """Prediction 0 of a real slot is the heads applied to E[y]; padding slots start from zeros."""
    decoder = make_mp(mp_num_groups=2, label_noise_ratio=0.0).train()
    feats, mask_features = inputs()
    out = decoder(feats, mask_features, targets=targets())
    first = out["mp_outputs"]["aux_outputs"][0]["pred_logits"]  # B x 6 x (K+1)
    labels = torch.tensor([[1, 3, 0, 1, 3, 0], [2, 0, 0, 2, 0, 0]])
    content = decoder.label_enc(labels)
    content[1, [1, 2, 4, 5]] = 0.0
    expected = decoder.class_embed(decoder.decoder_norm(content))
    torch.testing.assert_close(first, expected)


def test_batch_without_segments_skips_mp_and_still_touches_label_enc():
    decoder = make_mp().train()
    feats, mask_features = inputs()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 64, 96, dtype=torch.bool)}] * B
    out = decoder(feats, mask_features, targets=empty)
    assert "mp_outputs" not in out
    out["pred_logits"].sum().backward()
    grad = decoder.label_enc.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0


def test_official_name_has_no_positional_queries():
    torch.manual_seed(0)
    decoder = MultiScaleMaskedTransformerDecoderMaskDN(C, **BASE_ARGS, drop_query_pos=True)
    names = set(decoder.state_dict())
    assert "label_enc.weight" in names and not any(n.startswith("query_embed") for n in names)
    assert decoder.label_enc.weight.shape == (K, C)
    feats, mask_features = inputs()
    out = decoder.train()(feats, mask_features, targets=targets())
    assert out["mp_outputs"]["pred_logits"].shape == (B, 99, K + 1)
    assert decoder.eval()(feats, mask_features)["pred_logits"].shape == (B, Q, K + 1)


def test_per_head_noise_differs_between_heads():
    decoder = make_mp(mp_num_groups=2, point_noise_ratio=1.0, per_head_noise=True).train()
    records = record_cross_attention_masks(decoder)
    torch.manual_seed(4)
    decoder(*inputs(), targets=targets())
    rows = records[2].view(B, HEADS, 6 + Q, -1)[:, :, :6]
    assert not torch.equal(rows[:, 0], rows[:, 1])


def test_shift_scale_pilots_are_drawn_once_on_the_finest_level():
    """Geometric noise is drawn once per step at 1/8; the 1/32 pilots are its nearest downsampling."""
    decoder = make_mp(mp_num_groups=2, mask_noise="shift_scale", shift_noise_scale=1.0).train()
    records = record_cross_attention_masks(decoder)
    torch.manual_seed(5)
    decoder(*inputs(), targets=targets())
    fine = ~records[2].view(B, HEADS, 6 + Q, *SIZES[2])[:, 0, :6]
    coarse = records[0].view(B, HEADS, 6 + Q, -1)[:, 0, :6]
    expected = ~resize_nearest(fine, SIZES[0]).flatten(-2)
    expected[torch.where(expected.all(-1))] = False  # fully blocked rows are unblocked
    assert torch.equal(coarse, expected)
    clean = expected_pilot_rows(SIZES[2], 2)
    assert not torch.equal(~fine.flatten(-2), clean)  # the pilots were moved


def test_learned_mp_positional_query_is_trained():
    decoder = make_mp(mp_num_groups=1, mp_query_pos="learned").train()
    assert decoder.mp_query_embed.weight.shape == (1, C)
    out = decoder(*inputs(), targets=targets())
    out["mp_outputs"]["pred_logits"].sum().backward()
    assert decoder.mp_query_embed.weight.grad.abs().sum() > 0
    assert make_mp(mp_query_pos="learned", drop_query_pos=True).mp_query_embed is None
