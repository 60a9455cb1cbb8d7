"""The official FASeg configs (ziplab/FASeg, merged) build our model with exactly the official state-dict
names, shapes, order and parameter counts, and an official-layout state dict loads strictly."""
import os

import pytest
import torch

from test_reference_state_dict import assert_state_dict_matches, build_from_reference, read_reference

# Parameter elements of the official FASeg models (counted from the official state dicts: every entry except
# the R50 FrozenBN buffers, Swin's relative_position_index and criterion.empty_weight).
OFFICIAL_PARAMETERS = {"faseg_ade20k_sem_r50": 50_511_639, "faseg_ade20k_sem_swin_t": 53_922_065}


def _official_parameter_count(rows):
    buffers = ("running_mean", "running_var", "relative_position_index", "empty_weight")
    count = 0
    for key, shape, _ in rows:
        frozen_bn = key.startswith("backbone.") and ".norm." in key  # R50 FrozenBatchNorm2d buffers
        if key.endswith(buffers) or frozen_bn:
            continue
        count += int(torch.tensor(shape).prod()) if shape else 1
    return count


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMETERS))
def test_official_faseg_builds_and_loads(reference_dir, name):
    rows = read_reference(os.path.join(reference_dir, f"{name}_state_dict.tsv"))
    model = build_from_reference(reference_dir, name)
    assert_state_dict_matches(model, rows)
    head = model.sem_seg_head
    assert type(head.predictor).__name__ == "MultiScaleMaskedTransformerDecoderFASeg"
    assert head.predictor.num_layers == 13 and head.predictor.attn_mask_threshold == 0.15
    assert head.pixel_decoder.position_encoding == "conditional"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == OFFICIAL_PARAMETERS[name]
    if name.endswith("r50"):  # Swin has no non-parameter floating entries to tell apart by name
        assert _official_parameter_count(rows) == n_params
    state = {key: torch.full(shape, 0.5) if dtype.startswith("float") else torch.zeros(shape, dtype=torch.long)
             for key, shape, dtype in rows}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.all(head.predictor.adapt_pos2d[2].weight == 0.5)
    assert torch.all(head.pixel_decoder.pos_linear[3].weight == 0.5)


# Keys where our FASeg configs differ from the official merge: our registry names (the official ones are
# registered too), output folders, and the data-loader workers of our Mask2Former base.
RENAMED = {
    "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME": ("MSDeformAttnPixelDecoder4Scales", "MSDeformAttnPixelDecoder4ScalesFASeg"),
    "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME": ("FASegTransformerDecoder", "MultiScaleMaskedTransformerDecoderFASeg"),
}
NOT_COMPARED = {"MODEL.WEIGHTS", "MODEL.DEVICE", "OUTPUT_DIR", "DATALOADER.NUM_WORKERS"}


@pytest.mark.parametrize("ours, official", [
    ("configs/ade20k/semantic-segmentation/faseg/faseg_R50_bs16_160k.yaml", "faseg_ade20k_sem_r50"),
    ("configs/ade20k/semantic-segmentation/faseg/faseg_swin_tiny_bs16_160k.yaml", "faseg_ade20k_sem_swin_t"),
])
def test_our_faseg_configs_equal_the_official_merge(reference_dir, ours, official):
    from test_configs import REPO, merged

    got = merged(os.path.join(REPO, ours))
    expected = merged(os.path.join(reference_dir, f"{official}_config.yaml"))
    diff = {k: (got.get(k), v) for k, v in expected.items() if k not in NOT_COMPARED and got.get(k) != v}
    assert diff == {k: v for k, v in RENAMED.items() if k in diff} and set(diff) == set(RENAMED), diff
    assert got["MODEL.DFPQ.ATTN_MASK_THRESHOLD"] == 0.15 and got["MODEL.HRCA.OMEGA_RATE"] == 32
