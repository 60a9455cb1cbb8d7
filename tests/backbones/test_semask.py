"""D2SeMaskSwinTransformer and its semantic layer (SeMask spec §9)."""
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone

from qsegformers import add_qsegformers_config
from qsegformers.backbones.semask import D2SeMaskSwinTransformer, SemanticLayer
from qsegformers.backbones.swin import D2SwinTransformer

K = 5
TINY = dict(embed_dim=16, depths=[2, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=4, drop_path_rate=0.0)
NAMES = ["res2", "res3", "res4", "res5"]


def semask(**kwargs):
    return D2SeMaskSwinTransformer(**{"num_classes": K, "sem_dropout": 0.0, **TINY, **kwargs})


def tiny_cfg():
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2SeMaskSwinTransformer"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = K
    cfg.MODEL.SWIN.EMBED_DIM = 16
    cfg.MODEL.SWIN.DEPTHS = [1, 1, 1, 1]
    cfg.MODEL.SWIN.NUM_HEADS = [1, 2, 2, 4]
    cfg.MODEL.SWIN.WINDOW_SIZE = 4
    return cfg


def test_shapes_priors_in_training_only_at_odd_size():
    backbone = build_backbone(tiny_cfg())
    assert sorted(backbone.output_shape()) == NAMES and backbone.size_divisibility == 32
    x = torch.randn(2, 3, 257, 321)
    out = backbone.train()(x)
    assert sorted(out) == NAMES + ["sem_" + n for n in NAMES]
    h, w = math.ceil(257 / 4), math.ceil(321 / 4)
    for i, name in enumerate(NAMES):
        assert out[name].shape == (2, 16 * 2**i, h, w)
        assert out["sem_" + name].shape == (2, K, h, w)
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    with torch.no_grad():
        assert sorted(backbone.eval()(x)) == NAMES


def test_config_keys_and_official_aliases():
    cfg = tiny_cfg()
    cfg.MODEL.SEMASK.GLOBAL_STAGES = [3, 4]
    cfg.MODEL.SEMASK.DROPOUT = 0.2
    b = build_backbone(cfg)
    layers = [layer.semantic_layer for layer in b.layers]
    assert [l.global_attention for l in layers] == [False, False, True, True]
    assert layers[0].window_size == 4  # SEM_WINDOW_SIZE 0: the Swin window
    assert layers[0].class_injection[0].proj_drop.p == 0.2
    assert layers[0].class_injection[0].mlp_cls_q.out_features == K

    cfg = tiny_cfg()
    cfg.MODEL.SEMASK.NUM_SEM_BLOCKS = [1, 0, 2, 1]
    cfg.MODEL.SEMASK.SEM_WINDOW_SIZE = 3
    b = build_backbone(cfg)
    assert b.layers[1].semantic_layer is None and "layers.1.semantic_layer.norm1.weight" not in b.state_dict()
    assert len(b.layers[2].semantic_layer.class_injection) == 2 and b.layers[0].semantic_layer.window_size == 3
    assert sorted(k for k in b.train()(torch.randn(1, 3, 64, 64)) if k.startswith("sem_")) == [
        "sem_res2", "sem_res4", "sem_res5"
    ]

    cfg = tiny_cfg()  # official SeMask-Mask2Former names
    cfg.MODEL.SWIN.NUM_SEM_BLOCKS = 2
    cfg.MODEL.SWIN.SEM_WINDOW_SIZE = 2
    b = build_backbone(cfg)
    assert [len(l.semantic_layer.class_injection) for l in b.layers] == [2, 2, 2, 2]
    assert b.layers[0].semantic_layer.window_size == 2
    cfg.MODEL.SEMASK.SEM_WINDOW_SIZE = 3
    with pytest.raises(ValueError, match="MODEL.SWIN.SEM_WINDOW_SIZE"):
        build_backbone(cfg)


def test_extra_parameters_match_formula_swin_t_k150():
    swin_t = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)
    plain = sum(p.numel() for p in D2SwinTransformer(**swin_t).parameters())
    semask_t = sum(p.numel() for p in D2SeMaskSwinTransformer(num_classes=150, **swin_t).parameters())
    assert semask_t - plain == 2_005_684  # spec §2.9 table


def run_and_grads(model, x):
    out = model.train()(x)
    sum((v**2).mean() for v in out.values()).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_gradient_reaches_every_parameter_trunc_normal():
    torch.manual_seed(0)
    model = semask()
    grads = run_and_grads(model, torch.randn(2, 3, 64, 96))
    assert all(g is not None for g in grads.values())
    # lambda = 0 at init: the update U = W_O softmax(S_Q S_K^T) V enters as lambda * U, so W_K, W_V, W_O get
    # an exactly zero gradient; everything else (lambda included) moves.
    zero_by_design = {n for n in grads if any(s in n for s in (".mlp_cls_k.", ".mlp_v.", ".mlp_res."))}
    assert not [n for n, g in grads.items() if n not in zero_by_design and not torch.any(g != 0)]
    assert all(grads[n].abs().max() > 0 for n in grads if n.endswith("gamma"))
    model.zero_grad()
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.data.fill_(0.5)
    grads = run_and_grads(model, torch.randn(2, 3, 64, 96))
    # b_K adds S_Q . b_K to a whole row of logits, which the softmax ignores: its gradient is ~0 by design.
    assert not [n for n, g in grads.items() if not n.endswith("mlp_cls_k.bias") and not torch.any(g != 0)]


def test_d2_official_init_freezes_the_update_path():
    torch.manual_seed(0)
    grads = run_and_grads(semask(semask_init="d2_official"), torch.randn(1, 3, 64, 64))
    frozen = [n for n in grads if n.endswith("gamma") or ".mlp_res." in n]
    assert len(frozen) == 4 * 3
    assert all(torch.all(grads[n] == 0) for n in frozen)
    assert torch.any(grads["layers.0.semantic_layer.class_injection.0.mlp_cls_q.weight"] != 0)


def test_lambda_zero_layer_outputs_ln_sem():
    torch.manual_seed(0)
    layer = SemanticLayer(8, K, 1, 4, False, 0.0)
    y = torch.randn(2, 6 * 7, 8) * 3 + 1
    z, prior = layer(y, 6, 7)
    torch.testing.assert_close(z, layer.norm1(y))
    assert prior.shape == (2, K, 6, 7)
    # Stage output = norm_i(LN_sem(Y)): capture Y (input of the semantic layer) in a full backbone.
    model = semask().eval()
    captured = {}
    model.layers[1].semantic_layer.register_forward_hook(lambda m, inp, out: captured.update(y=inp[0]))
    with torch.no_grad():
        res3 = model(torch.randn(1, 3, 64, 64))["res3"]
        expected = model.norm1(model.layers[1].semantic_layer.norm1(captured["y"]))
    torch.testing.assert_close(res3, expected.view(1, 8, 8, 32).permute(0, 3, 1, 2))


def test_windowed_equals_global_on_one_window():
    torch.manual_seed(0)
    windowed = SemanticLayer(8, K, 2, 4, False, 0.0)
    global_ = SemanticLayer(8, K, 2, 4, True, 0.0)
    global_.load_state_dict(windowed.state_dict())
    for p in windowed.parameters():
        p.data.normal_()  # non-trivial lambda and weights
    global_.load_state_dict(windowed.state_dict())
    y = torch.randn(3, 16, 8)
    for a, b in zip(windowed(y, 4, 4), global_(y, 4, 4)):
        torch.testing.assert_close(a, b)


def test_windowed_attention_stays_in_its_window_and_crops_padding():
    """On a 6x7 map with window 4, changing a token in the bottom-right window leaves the top-left window's
    features and priors unchanged, and the outputs are cropped back to 6x7."""
    torch.manual_seed(0)
    layer = SemanticLayer(8, K, 1, 4, False, 0.0)
    for p in layer.parameters():
        p.data.normal_()
    y = torch.randn(1, 42, 8)
    y2 = y.clone()
    y2[0, 6 * 7 - 1] += 3 * torch.randn(8)  # token (5, 6); not a constant shift, which LN_sem removes
    z1, p1 = layer(y, 6, 7)
    z2, p2 = layer(y2, 6, 7)
    assert z1.shape == (1, 42, 8) and p1.shape == (1, K, 6, 7)
    torch.testing.assert_close(p1[..., :4, :4], p2[..., :4, :4])
    top_left = torch.tensor([r * 7 + c for r in range(4) for c in range(4)])
    torch.testing.assert_close(z1[0, top_left], z2[0, top_left])
    assert not torch.allclose(p1[..., 4:, 4:], p2[..., 4:, 4:])


def test_next_stage_receives_patch_merging_of_masked_features():
    torch.manual_seed(0)
    model = semask().eval()
    sem0 = model.layers[0].semantic_layer
    sem0.class_injection[0].gamma.data.fill_(1.0)
    captured = {}
    sem0.register_forward_hook(lambda m, inp, out: captured.update(z=out[0]))
    model.layers[0].downsample.register_forward_hook(lambda m, inp, out: captured.update(merged_in=inp[0]))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        res3 = model(x)["res3"]
        assert torch.equal(captured["merged_in"], captured["z"])
        sem0.class_injection[0].mlp_v.weight.add_(torch.randn_like(sem0.class_injection[0].mlp_v.weight))
        assert not torch.allclose(model(x)["res3"], res3)


def test_no_semantic_layers_is_plain_swin():
    """NUM_SEM_BLOCKS all 0 gives exactly the plain Swin parameters and features (spec §9.8)."""
    torch.manual_seed(0)
    plain = D2SwinTransformer(**TINY).eval()
    torch.manual_seed(0)
    empty = semask(num_sem_blocks=[0, 0, 0, 0]).eval()
    assert list(empty.state_dict()) == list(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x), empty.train()(x)
    assert sorted(b) == NAMES
    for name in NAMES:
        assert torch.equal(a[name], b[name])
