"""DFPQ (qsegformers/decoders/dfpq.py and its use in FASegTransformerDecoder): Eq. 2, first-layer pooling,
sine anchors, and the dependence of P_t on exactly the attention of layer t-1."""
import torch

from qsegformers.decoders.dfpq import (
    attention_pooled_pos,
    build_pos_mlp,
    grid_anchors,
    mask_centres,
    region_pooled_pos,
    sine_embed_points,
)
from qsegformers.decoders.faseg import FASegState
from qsegformers.decoders.mask2former import DecoderState, Memory
from qsegformers.pixel_decoders.position_encoding import PositionEmbeddingSine

from faseg_test_utils import B, C, Q, SIZES, faseg_inputs, faseg_state, make_faseg

HW = 12


def _bias():
    return torch.randn(Q, B, C, generator=torch.Generator().manual_seed(5))


def test_one_hot_and_uniform_attention():
    """One-hot A at p: P = h(K_p[p] + B); uniform A: P = h(mean_p K_p + B)."""
    decoder = make_faseg()
    key_pos = torch.randn(HW, B, C)
    bias = _bias()
    one_hot = torch.zeros(B, Q, HW)
    p = torch.arange(Q) % HW
    one_hot[:, torch.arange(Q), p] = 1.0
    got = decoder.pos_mlp(1, attention_pooled_pos(one_hot, key_pos), bias)
    expected = decoder.adapt_pos2d(key_pos[p] + bias)  # key_pos[p]: Q x B x C
    torch.testing.assert_close(got, expected)
    uniform = torch.full((B, Q, HW), 1.0 / HW)
    got = decoder.pos_mlp(1, attention_pooled_pos(uniform, key_pos), bias)
    torch.testing.assert_close(got, decoder.adapt_pos2d(key_pos.mean(0)[None] + bias))


def test_sine_pe_and_one_hot_attention_collapse_to_anchor():
    """With sine K_p, one-hot A at pixel (y, x) gives h(sinePE(y, x) + B) (the anchor-collapse case)."""
    h, w = 4, 6
    pe = PositionEmbeddingSine(C // 2, normalize=True)(torch.zeros(1, C, h, w))  # 1 x C x h x w
    key_pos = pe.flatten(2).permute(2, 0, 1)
    y, x = 2, 5
    attn = torch.zeros(1, 1, h * w)
    attn[0, 0, y * w + x] = 1.0
    pooled = attention_pooled_pos(attn, key_pos)[0, 0]
    point = torch.tensor([(x + 1) / w, (y + 1) / h])
    torch.testing.assert_close(sine_embed_points(point, C // 2), pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, pe[0, :, y, x])


def test_first_layer_pooling():
    """Empty foreground: P_0 = h(B); one foreground pixel p: P_0 = h(K_p[p] + B); background is the complement."""
    decoder = make_faseg()
    state = faseg_state(decoder, *faseg_inputs())
    memory = state.memory
    bias = state.query_pos = _bias()
    logits = state.mask_logits = torch.full((B, Q, 64, 64), -20.0)
    p0 = decoder.layer_query_pos(0, state)
    torch.testing.assert_close(p0, decoder.adapt_pos2d(bias))
    # one foreground cell (3, 5) of the 8 x 8 level: an 8 x 8 block of the 1/4 logits
    logits[:, :, 24:32, 40:48] = 20.0
    state.method.query_pos = None
    p0 = decoder.layer_query_pos(0, state)
    cell = 3 * SIZES[0][1] + 5
    torch.testing.assert_close(p0, decoder.adapt_pos2d(memory.pos[0][cell][None] + bias), atol=1e-5, rtol=1e-5)
    background = region_pooled_pos(logits, memory.pos[0], SIZES[0], 0.5, "background")
    others = torch.cat((memory.pos[0][:cell], memory.pos[0][cell + 1:])).mean(0)  # B x C
    torch.testing.assert_close(background, others[:, None].expand(B, Q, C), atol=1e-5, rtol=1e-5)


def test_dfpq_of_layer_t_follows_attention_of_layer_t_minus_1_only():
    """Changing A of layer 1 changes P_2; changing layer 1's output but not its attention leaves P_2 unchanged."""
    feats, pos, mask_features = faseg_inputs()

    def run(edit_attention=False, edit_output=False):
        decoder = make_faseg()
        seen = {}
        layer = decoder.transformer_cross_attention_layers[1]

        def edit(module, args, kwargs, out):
            tgt, attn = out
            if edit_attention:
                attn = attn.roll(1, dims=-1)
            if edit_output:
                tgt = tgt + 1.0
            return tgt, attn

        layer.register_forward_hook(edit, with_kwargs=True)
        decoder.transformer_self_attention_layers[2].register_forward_pre_hook(
            lambda m, args, kwargs: seen.__setitem__("p2", kwargs["query_pos"].detach()), with_kwargs=True
        )
        decoder.transformer_self_attention_layers[1].register_forward_pre_hook(
            lambda m, args, kwargs: seen.__setitem__("p1", kwargs["query_pos"].detach()), with_kwargs=True
        )
        out = decoder(feats, mask_features, pos_embeddings=pos)
        return seen, out["pred_masks"]

    base, base_masks = run()
    attn_changed, _ = run(edit_attention=True)
    out_changed, out_masks = run(edit_output=True)
    torch.testing.assert_close(attn_changed["p1"], base["p1"])
    assert not torch.allclose(attn_changed["p2"], base["p2"])
    torch.testing.assert_close(out_changed["p2"], base["p2"])
    assert not torch.allclose(out_masks, base_masks)  # the output edit did take effect downstream


def test_attention_gradient_flows_into_dfpq_unless_detached():
    decoder = make_faseg()
    key_pos = torch.randn(HW, B, C)
    attn = torch.softmax(torch.randn(B, Q, HW), -1).requires_grad_()
    state = DecoderState(
        mask_features=torch.zeros(B, 1, 1, 1), memory=Memory(src=[], pos=[None, key_pos], sizes=[]),
        query_pos=_bias(), method=FASegState(),
    )
    decoder.after_attention(1, 1, attn, state)
    state.method.query_pos.sum().backward()
    assert attn.grad.abs().sum() > 0
    decoder.detach_attn = True
    attn.grad = None
    decoder.after_attention(1, 1, attn, state)
    state.method.query_pos.sum().backward()  # still differentiable w.r.t. h, but not w.r.t. A
    assert attn.grad is None


def test_anchors_and_mask_centres():
    anchors = grid_anchors(100, torch.device("cpu"))
    assert anchors.shape == (100, 2)
    torch.testing.assert_close(anchors[:3], torch.tensor([[0.05, 0.05], [0.15, 0.05], [0.25, 0.05]]))
    logits = torch.full((1, 2, 4, 8), -10.0)
    logits[0, 0, 1, 2] = logits[0, 0, 3, 6] = 10.0  # centre of pixels (1, 2) and (3, 6)
    centres = mask_centres(logits, 0.5)
    torch.testing.assert_close(centres[0, 0], torch.tensor([(3 / 8 + 7 / 8) / 2, (2 / 4 + 4 / 4) / 2]))
    torch.testing.assert_close(centres[0, 1], torch.tensor([4.5 / 8, 2.5 / 4]))  # empty -> image centre
    mlp = build_pos_mlp(C, 3)
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
