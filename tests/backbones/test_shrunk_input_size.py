"""SegViT Shrunk: the QU query grid is fixed by the training crop, so inference on another input size is a clear
error (naming the sizes and the fix) instead of masks silently stretched over the image; sliding-window testing
at the crop, and inputs padded up to the crop, still work."""
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from qsegformers.config import add_qsegformers_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOY = os.path.join(REPO, "configs/toy/semantic-segmentation/segvit_tiny_toy.yaml")
CROP, NUM_CLASSES = 64, 6
# The toy ViT (patch 8, 4 blocks) as a Shrunk model: QD in block index 2, QU reads blk2 (1/8) then blk4 (1/16).
SHRUNK_TOY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.BACKBONE.NAME", "D2ShrunkViT",
    "MODEL.VIT.OUT_BLOCKS", "[2, 4]",
    "MODEL.SEM_SEG_HEAD.IN_FEATURES", "['blk2', 'blk4']",
    "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "ATMShrunkDecoder",
    "MODEL.MASK_FORMER.SIZE_DIVISIBILITY", "16",
    "MODEL.ATM.LAYERS_PER_STAGE", "3",
    "MODEL.SHRUNK.QD_BLOCK", "2",
    "MODEL.SHRUNK.QU_QUERY_STRIDE", "8",
    "MODEL.SHRUNK.QU_LAYERS_PER_STAGE", "1",
    "MODEL.SHRUNK.ATM_LAYERS", "2",
    "INPUT.CROP.SIZE", f"({CROP}, {CROP})",
]


def shrunk_model(*opts):
    cfg = get_cfg()
    add_qsegformers_config(cfg)
    cfg.merge_from_file(TOY)
    cfg.merge_from_list(SHRUNK_TOY + list(opts))
    torch.manual_seed(0)
    return build_model(cfg).eval()


def predict(model, height, width):
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(height * width)) * 255
    with torch.no_grad():
        return model([{"image": image}])[0]["sem_seg"]


@pytest.fixture(scope="module")
def model():
    return shrunk_model()


def test_the_training_crop_and_inputs_padded_to_it_are_accepted(model):
    assert model.sem_seg_head.predictor.grid_hw == (CROP // 8, CROP // 8)
    assert predict(model, CROP, CROP).shape == (NUM_CLASSES, CROP, CROP)
    # 60 x 56 is padded to 64 x 64 (SIZE_DIVISIBILITY 16): the grid covers exactly the padded input
    assert predict(model, 60, 56).shape == (NUM_CLASSES, 60, 56)


@pytest.mark.parametrize("size", [(64, 96), (128, 128), (48, 64)])
def test_another_input_size_is_a_clear_error(model, size):
    with pytest.raises(ValueError) as err:
        predict(model, *size)
    message = str(err.value)
    assert f"built for {CROP}x{CROP} inputs" in message
    assert f"got a {size[0]}x{size[1]} (padded) input" in message
    assert "TEST.SLIDING_WINDOW" in message and "INPUT.CROP.SIZE" in message


def test_sliding_window_at_the_crop_predicts_any_size():
    model = shrunk_model("TEST.SLIDING_WINDOW", "True", "TEST.SLIDE_CROP", str(CROP), "TEST.SLIDE_STRIDE", "32")
    sem = predict(model, 64, 96)
    assert sem.shape == (NUM_CLASSES, 64, 96) and torch.isfinite(sem).all()
    wrong_windows = shrunk_model("TEST.SLIDING_WINDOW", "True", "TEST.SLIDE_CROP", "48", "TEST.SLIDE_STRIDE", "32")
    with pytest.raises(ValueError, match="TEST.SLIDE_CROP 64"):
        predict(wrong_windows, 64, 96)
