"""Tests of qsegformers/inference.py on hand-made query predictions with known outputs."""
import math

import pytest
import torch
from detectron2.structures import Instances

from qsegformers.inference import class_probs, instance_inference, panoptic_inference, semantic_inference

pytestmark = pytest.mark.smoke  # also run on the current stack (.ci/run)

STRONG = 10.0  # a confident logit
HEIGHT, WIDTH = 4, 6


def _mask(region):
    """HEIGHT x WIDTH mask logits: +STRONG inside ``region`` (a tuple of slices), -STRONG elsewhere."""
    logits = torch.full((HEIGHT, WIDTH), -STRONG)
    logits[region] = STRONG
    return logits


def _one_hot_logits(num_columns, column, value=STRONG):
    logits = torch.zeros(num_columns)
    logits[column] = value
    return logits


def test_class_probs():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    torch.testing.assert_close(class_probs(logits, "softmax"), torch.tensor([[0.6, 0.3]]))
    torch.testing.assert_close(class_probs(torch.zeros(1, 2), "sigmoid"), torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="activation"):
        class_probs(logits, "relu")


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_semantic_inference(activation):
    num_classes = 3
    num_columns = num_classes + (activation == "softmax")
    mask_cls = torch.stack([_one_hot_logits(num_columns, 0), _one_hot_logits(num_columns, 2)])
    if activation == "sigmoid":
        mask_cls = 2 * mask_cls - STRONG  # +STRONG for the class, -STRONG for the others
    mask_pred = torch.stack([_mask((slice(None), slice(0, 3))), _mask((slice(None), slice(3, None)))])
    sem = semantic_inference(mask_cls, mask_pred, activation=activation)
    assert sem.shape == (num_classes, HEIGHT, WIDTH)
    expected = torch.zeros(HEIGHT, WIDTH, dtype=torch.int64)
    expected[:, 3:] = 2
    assert torch.equal(sem.argmax(0), expected)
    probs = class_probs(mask_cls, activation)
    loop = sum(probs[q][:, None, None] * mask_pred[q].sigmoid()[None] for q in range(2))
    torch.testing.assert_close(sem, loop)


def _panoptic_case():
    """K = 3 (class 0 is a thing, 1 and 2 are stuff); 6 softmax queries, see comments."""
    num_columns = 4
    rows_top, rows_bottom, all_rows = slice(0, 2), slice(2, 4), slice(None)
    queries = [
        (_one_hot_logits(num_columns, 0), _mask((all_rows, slice(0, 2)))),  # thing, cols 0-1
        (_one_hot_logits(num_columns, 1), _mask((rows_top, slice(2, None)))),  # stuff 1, top right
        (_one_hot_logits(num_columns, 1), _mask((rows_bottom, slice(2, 4)))),  # stuff 1 again: merges
        (_one_hot_logits(num_columns, 3), _mask((all_rows, all_rows))),  # no-object: dropped
        # stuff 2 with a lower score (~0.87): loses cols 0-1 to query 0, wins 2 of its 10 pixels
        (_one_hot_logits(num_columns, 2, value=3.0), _mask((all_rows, slice(0, 2))).maximum(_mask((rows_bottom, 4)))),
        # best class 1 with score e / (e + 3) ~ 0.475 < threshold 0.5: dropped
        (_one_hot_logits(num_columns, 1, value=1.0), _mask((rows_bottom, slice(4, None)))),
    ]
    mask_cls = torch.stack([c for c, _ in queries])
    mask_pred = torch.stack([m for _, m in queries])
    return mask_cls, mask_pred


def test_panoptic_inference_merges_stuff_and_rejects_occluded_queries():
    mask_cls, mask_pred = _panoptic_case()
    seg, info = panoptic_inference(
        mask_cls, mask_pred, num_classes=3, object_mask_threshold=0.5, overlap_threshold=0.8, thing_ids={0}
    )
    expected = torch.tensor(
        [
            [1, 1, 2, 2, 2, 2],
            [1, 1, 2, 2, 2, 2],
            [1, 1, 2, 2, 0, 0],
            [1, 1, 2, 2, 0, 0],
        ],
        dtype=torch.int32,
    )
    assert seg.dtype == torch.int32
    assert torch.equal(seg, expected)
    assert info == [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": False, "category_id": 1},
    ]


def test_panoptic_inference_low_overlap_threshold_keeps_partly_occluded_query():
    mask_cls, mask_pred = _panoptic_case()
    seg, info = panoptic_inference(
        mask_cls, mask_pred, num_classes=3, object_mask_threshold=0.5, overlap_threshold=0.1, thing_ids={0}
    )
    assert seg[2:, 4].tolist() == [3, 3] and seg[2:, 5].tolist() == [0, 0]
    assert info[-1] == {"id": 3, "isthing": False, "category_id": 2}
    assert len(info) == 3


def test_panoptic_inference_nothing_kept():
    mask_cls = torch.stack([_one_hot_logits(4, 3)] * 2)
    seg, info = panoptic_inference(
        mask_cls, torch.zeros(2, HEIGHT, WIDTH), num_classes=3, object_mask_threshold=0.5,
        overlap_threshold=0.8, thing_ids={0},
    )
    assert info == [] and seg.shape == (HEIGHT, WIDTH) and not seg.any()


def test_panoptic_inference_sigmoid_head():
    mask_cls = torch.full((3, 2), -STRONG)
    mask_cls[0, 0] = STRONG  # thing
    mask_cls[1, 1] = STRONG  # stuff
    # query 2: every class score ~0 < threshold (a sigmoid head has no no-object column)
    mask_pred = torch.stack(
        [_mask((slice(None), slice(0, 3))), _mask((slice(None), slice(3, None))), _mask((slice(None), slice(None)))]
    )
    seg, info = panoptic_inference(
        mask_cls, mask_pred, num_classes=2, object_mask_threshold=0.5, overlap_threshold=0.8,
        thing_ids={0}, activation="sigmoid",
    )
    assert seg[:, :3].eq(1).all() and seg[:, 3:].eq(2).all()
    assert info == [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": False, "category_id": 1}]


def test_wrong_number_of_class_columns():
    with pytest.raises(ValueError, match="needs 4 class columns"):
        panoptic_inference(
            torch.zeros(2, 3), torch.zeros(2, HEIGHT, WIDTH), num_classes=3, object_mask_threshold=0.5,
            overlap_threshold=0.8, thing_ids=set(),
        )
    with pytest.raises(ValueError, match="activation"):
        instance_inference(torch.zeros(2, 3), torch.zeros(2, HEIGHT, WIDTH), num_classes=3, topk=2, activation="x")


# Instance case: K = 2; class probabilities per query and mask probability inside the binary mask.
INSTANCE_PROBS = [[0.6, 0.3], [0.2, 0.7], [0.15, 0.05]]  # softmax head: no-object takes the rest


def _instance_masks():
    mask_pred = torch.full((3, HEIGHT, WIDTH), -STRONG)
    mask_pred[0, 1:3, 1:4] = math.log(3.0)  # p = 0.75, box (x0, y0, x1, y1) = (1, 1, 4, 3)
    mask_pred[1, :, 5] = math.log(9.0)  # p = 0.9, box (5, 0, 6, 4)
    return mask_pred  # query 2: empty mask


def _check_instances(result, keep):
    # (query, class, class score) sorted by class score: 0.7, 0.6, 0.3, 0.2, 0.15
    ranked = [(1, 1, 0.7), (0, 0, 0.6), (0, 1, 0.3), (1, 0, 0.2), (2, 0, 0.15)]
    ranked = [r for i, r in enumerate(ranked) if i in keep]
    mask_score = {0: 0.75, 1: 0.9, 2: 0.0}
    box = {0: [1.0, 1.0, 4.0, 3.0], 1: [5.0, 0.0, 6.0, 4.0], 2: [0.0, 0.0, 0.0, 0.0]}
    mask_pred = _instance_masks()
    assert isinstance(result, Instances) and result.image_size == (HEIGHT, WIDTH)
    assert len(result) == len(ranked)
    assert result.pred_classes.tolist() == [c for _, c, _ in ranked]
    torch.testing.assert_close(result.scores, torch.tensor([s * mask_score[q] for q, _, s in ranked]))
    torch.testing.assert_close(result.pred_boxes.tensor, torch.tensor([box[q] for q, _, _ in ranked]))
    torch.testing.assert_close(result.pred_masks, torch.stack([(mask_pred[q] > 0).float() for q, _, _ in ranked]))


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_instance_inference_topk_order_scores_and_boxes(activation):
    probs = torch.tensor(INSTANCE_PROBS)
    if activation == "softmax":
        mask_cls = torch.log(torch.cat([probs, 1 - probs.sum(1, keepdim=True)], dim=1))
    else:
        mask_cls = torch.logit(probs)
    result = instance_inference(mask_cls, _instance_masks(), num_classes=2, topk=5, activation=activation)
    _check_instances(result, keep=range(5))
    top2 = instance_inference(mask_cls, _instance_masks(), num_classes=2, topk=2, activation=activation)
    _check_instances(top2, keep=range(2))


def test_instance_inference_keeps_only_things_when_asked():
    probs = torch.tensor(INSTANCE_PROBS)
    mask_cls = torch.log(torch.cat([probs, 1 - probs.sum(1, keepdim=True)], dim=1))
    result = instance_inference(mask_cls, _instance_masks(), num_classes=2, topk=5, thing_ids={1})
    _check_instances(result, keep=[0, 2])
    # topk larger than Q * K is clamped
    assert len(instance_inference(mask_cls, _instance_masks(), num_classes=2, topk=100)) == 6


def test_queries_are_classes_fast_path_equals_the_sum_over_queries():
    """A diagonal sigmoid head (query k scores only class k, other logits -inf, as PFT's): the fast path
    p_k[k] * sigmoid(m_k) equals the general sum over queries; a non-square head is refused."""
    from qsegformers.inference import QueryPostprocessing

    torch.manual_seed(0)
    k = 5
    diag = torch.randn(k)
    mask_cls = torch.full((k, k), float("-inf"))
    mask_cls[range(k), range(k)] = diag
    mask_pred = torch.randn(k, 6, 7)
    fast = QueryPostprocessing(num_classes=k, activation="sigmoid", queries_are_classes=True)
    general = QueryPostprocessing(num_classes=k, activation="sigmoid")
    torch.testing.assert_close(fast.semantic(mask_cls, mask_pred), general.semantic(mask_cls, mask_pred))
    torch.testing.assert_close(fast.semantic(mask_cls, mask_pred), diag.sigmoid()[:, None, None] * mask_pred.sigmoid())
    with pytest.raises(ValueError, match="Q == K"):
        fast.semantic(torch.zeros(3, k), torch.zeros(3, 6, 7))
