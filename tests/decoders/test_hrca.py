"""HRCA (qsegformers/decoders/hrca.py and FASegTransformerDecoder.hrca_cross_attention): token count,
top-k selection shared by the queries of an image, block mapping, locality, permutation invariance."""
import pytest
import torch

from qsegformers.decoders.faseg import HRCA_LEVEL, FASegState
from qsegformers.decoders.hrca import (
    gather_tokens,
    gather_tokens_per_query,
    num_selected_cells,
    per_query_cross_attention,
    select_token_indices,
    selection_scores,
)
from qsegformers.decoders.layers import CrossAttentionLayer
from qsegformers.decoders.mask2former import DecoderState, Memory

from faseg_test_utils import B, C, Q, SIZES, faseg_inputs, faseg_state, make_faseg


@pytest.mark.parametrize("hw_low, omega, expected", [(256, 32, 8), (2048, 32, 64), (64, 16, 4), (255, 32, 7), (4, 32, 1)])
def test_topk_count_is_floor_hw32_over_omega(hw_low, omega, expected):
    assert num_selected_cells(hw_low, omega) == expected


def test_512_input_gathers_512_of_16384_tokens():
    scores = torch.rand(1, 1, 16 * 16)
    idx = select_token_indices(scores, (16, 16), (128, 128), num_selected_cells(256, 32), "block")
    assert idx.shape == (1, 1, 512) and idx.unique().numel() == 512


def test_selection_is_topk_of_attention_summed_over_queries():
    attn = torch.softmax(torch.randn(B, Q, 64), -1)
    scores = selection_scores(attn, B, Q, 64, selection="topk", shared=True, device=attn.device)
    idx = select_token_indices(scores, (8, 8), (64, 64), 3, "block")  # B x 1 x 3*64
    total = attn.sum(1)
    for b in range(B):
        # expected cells: the 3 largest summed scores, found by sorting
        expected = set(sorted(range(64), key=lambda p: -total[b, p].item())[:3])
        rows, cols = idx[b, 0] // 64, idx[b, 0] % 64
        cells = set(((rows // 8) * 8 + cols // 8).tolist())
        assert cells == expected


def test_block_mapping_equals_nearest_upsampling_of_the_selected_cells():
    h, w, r = 4, 6, 8
    scores = torch.rand(1, 1, h * w)
    idx = select_token_indices(scores, (h, w), (h * r, w * r), 5, "block")
    chosen = torch.zeros(h * r * w * r, dtype=torch.bool)
    chosen[idx[0, 0]] = True
    low = torch.zeros(h * w, dtype=torch.bool)
    low[scores[0, 0].topk(5).indices] = True
    upsampled = low.view(h, w).repeat_interleave(r, 0).repeat_interleave(r, 1).flatten()
    assert torch.equal(chosen, upsampled) and idx.shape[-1] == 5 * r * r


def test_bilinear_mapping_picks_the_same_count_of_high_res_pixels():
    scores = torch.rand(2, 1, 16)
    idx = select_token_indices(scores, (4, 4), (16, 16), 2, "bilinear")
    assert idx.shape == (2, 1, 32) and all(i.unique().numel() == 32 for i in idx[:, 0])
    with pytest.raises(ValueError, match="multiple"):
        select_token_indices(scores, (4, 4), (15, 16), 2, "block")


def _state_with_selection(decoder, attn):
    state = faseg_state(decoder, *faseg_inputs())
    state.method.select_attn = attn
    return state


def _state_with_levels(state, src, pos, attn):
    """A fresh state over the given per-level tokens and encodings, with the selecting attention ``attn``."""
    memory = Memory(src=src, pos=pos, sizes=state.memory.sizes)
    return DecoderState(mask_features=state.mask_features, memory=memory, method=FASegState(select_attn=attn))


def test_hrca_output_depends_only_on_gathered_tokens():
    """Perturbing unselected 1/4 tokens (features or K_p) leaves the HRCA output unchanged; their gradient is 0."""
    decoder = make_faseg()
    attn = torch.softmax(torch.randn(B, Q, 64), -1)
    state = _state_with_selection(decoder, attn)
    memory = state.memory
    output, bias = decoder.prepare_queries(state)
    src = memory.src[HRCA_LEVEL].detach().clone().requires_grad_()
    memory.src[HRCA_LEVEL] = src
    out = decoder.hrca_cross_attention(3, output, bias, state)
    idx = state.method.hrca_indices[-1][:, 0]  # B x T: one set per image, the same for every query
    assert idx.shape == (B, 2 * 64)
    selected = torch.zeros(src.shape[:2], dtype=torch.bool)
    selected[idx, torch.arange(B)[:, None]] = True  # (HW_4, B)
    # A random-weighted loss: with unit LayerNorm weights the post-norm output sums over channels to the constant
    # sum of its bias, so out.sum() has true gradient 0 and its float-noise gradients (~1e-8) decided the test.
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    grad_norm = src.grad.abs().sum(-1)
    assert torch.all(grad_norm[~selected] == 0)
    assert grad_norm[selected].min() > 1e-3  # measured: min 0.20, max 2.1 (float noise is ~1e-8)
    perturbed = _state_with_levels(state, list(memory.src), list(memory.pos), attn)
    noise = torch.randn_like(src) * (~selected)[..., None]
    perturbed.memory.src[HRCA_LEVEL] = src.detach() + noise
    perturbed.memory.pos[HRCA_LEVEL] = memory.pos[HRCA_LEVEL] + noise
    torch.testing.assert_close(decoder.hrca_cross_attention(3, output, bias, perturbed), out.detach())
    touched = _state_with_levels(state, list(memory.src), list(memory.pos), attn)
    touched.memory.src[HRCA_LEVEL] = src.detach() + torch.randn_like(src) * selected[..., None]
    assert not torch.allclose(decoder.hrca_cross_attention(3, output, bias, touched), out.detach())


def test_selected_set_differs_between_images_but_not_between_queries():
    decoder = make_faseg()
    attn = torch.zeros(B, Q, 64)
    attn[0, :, :2] = 0.5  # image 0 looks at cells 0, 1; image 1 at cells 62, 63
    attn[1, :, -2:] = 0.5
    state = _state_with_selection(decoder, attn)
    output, bias = decoder.prepare_queries(state)
    decoder.hrca_cross_attention(3, output, bias, state)
    idx = state.method.hrca_indices[-1]
    assert idx.shape[1] == 1  # shared across queries
    cells = [set(((i // 64 // 8) * 8 + i % 64 // 8).tolist()) for i in idx[:, 0]]
    assert cells == [{0, 1}, {62, 63}]


def test_per_query_attention_equals_shared_attention_for_equal_key_sets():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(C, 4).eval()
    tgt, query_pos = torch.randn(Q, B, C), torch.randn(Q, B, C)
    src, pos = torch.randn(100, B, C), torch.randn(100, B, C)
    idx = torch.stack([torch.randperm(100)[:20] for _ in range(B)])  # B x T
    shared = layer(tgt, gather_tokens(src, idx), pos=gather_tokens(pos, idx), query_pos=query_pos)
    per_query_idx = idx[:, None].expand(B, Q, -1)
    per_query = per_query_cross_attention(
        layer, tgt, gather_tokens_per_query(src, per_query_idx), gather_tokens_per_query(pos, per_query_idx), query_pos
    )
    torch.testing.assert_close(per_query, shared, atol=1e-5, rtol=1e-5)
    # permuting the gathered keys/values together does not change the output
    perm = idx[:, torch.randperm(20)]
    permuted = layer(tgt, gather_tokens(src, perm), pos=gather_tokens(pos, perm), query_pos=query_pos)
    torch.testing.assert_close(permuted, shared, atol=1e-5, rtol=1e-5)


def test_tiny_input_selects_at_least_one_cell():
    """64 x 64 input: HW_32 = 4 < omega_rate, k_low clamps to 1 (one 8 x 8 block)."""
    decoder = make_faseg()
    feats, pos, mask_features = faseg_inputs([(2, 2), (4, 4), (8, 8), (16, 16)])
    keys = {}
    decoder.transformer_cross_attention_layers[3].register_forward_pre_hook(
        lambda m, args: keys.__setitem__(3, args[1].shape[0])
    )
    out = decoder(feats, mask_features, pos_embeddings=pos)
    assert keys[3] == 64 and torch.isfinite(out["pred_masks"]).all()
    assert SIZES[3][0] // SIZES[0][0] == 8  # the default test sizes have 8 x 8 blocks too


def _cells_of(indices, high_w=SIZES[3][1], ratio=SIZES[3][0] // SIZES[0][0], low_w=SIZES[0][1]):
    """Raster indices of the 1/4 map -> the set of 1/32 cells they lie in."""
    return set(((indices // high_w // ratio) * low_w + (indices % high_w) // ratio).tolist())


def test_each_round_selects_from_its_own_round_attention():
    """Round t's HRCA gathers the blocks of the top-k cells of round t's 1/32 attention (summed over queries),
    not those of an earlier round: the three rounds of this forward pick different cells."""
    decoder = make_faseg()
    feats, pos, mask_features = faseg_inputs()
    select_layers = [r * (HRCA_LEVEL + 1) for r in range(3)]  # 1/32 layers 0, 4, 8 precede HRCA 3, 7, 11
    attn = {}
    for i in select_layers:
        decoder.transformer_cross_attention_layers[i].register_forward_hook(
            lambda m, args, out, i=i: attn.__setitem__(i, out[1].detach().clone())
        )
    states = []
    prepare = decoder.prepare_memory
    decoder.prepare_memory = lambda features, state: states.append(state) or prepare(features, state)
    with torch.no_grad():
        decoder(feats, mask_features, pos_embeddings=pos)
    indices = states[0].method.hrca_indices
    assert len(indices) == 3
    k_low = num_selected_cells(SIZES[0][0] * SIZES[0][1], 32)
    expected_rounds = []
    for r, i in enumerate(select_layers):
        scores = attn[i].sum(1)  # B x HW_32
        ranked = scores.sort(-1, descending=True)
        # the k-th and (k+1)-th cells are well separated, so the top-k set is not decided by float noise
        assert (ranked.values[:, k_low - 1] - ranked.values[:, k_low]).min() > 1e-4
        expected = [set(ranked.indices[b, :k_low].tolist()) for b in range(B)]
        expected_rounds.append(expected)
        assert indices[r].shape == (B, 1, k_low * 64)
        assert [_cells_of(indices[r][b, 0]) for b in range(B)] == expected
        assert all(indices[r][b, 0].unique().numel() == k_low * 64 for b in range(B))
    # the test discriminates: every round's selection differs from the previous round's
    assert expected_rounds[0] != expected_rounds[1] and expected_rounds[1] != expected_rounds[2]
