"""COCO mask AP for datasets whose thing classes are not the contiguous ids 0..N-1.

detectron2 v0.6's ``COCOEvaluator`` asserts that ``thing_dataset_id_to_contiguous_id`` maps onto
0..N-1. Panoptic datasets break that: their thing classes are a subset of all contiguous classes (ADE20K
panoptic things live among the 150 ids). ``InstanceSegEvaluator`` maps predicted classes back to dataset
ids itself, then lets detectron2 evaluate with pycocotools.

Panoptic datasets may also name images differently from their instance json (ADE20K panoptic uses the
file stem "ADE_val_00000001", its instance json an integer): predictions whose ``image_id`` is not in
the json are matched to the json image with the same file stem.
"""
import os

from detectron2.evaluation import COCOEvaluator

__all__ = ["InstanceSegEvaluator"]

_ID_MAP = "thing_dataset_id_to_contiguous_id"


class _MetadataWithoutIdMap:
    """Read-only view of a detectron2 ``Metadata`` that hides the thing-id map."""

    def __init__(self, metadata):
        self._metadata = metadata

    def __getattr__(self, name):
        if name == _ID_MAP:
            raise AttributeError(name)
        return getattr(self._metadata, name)

    def get(self, name, default=None):
        return default if name == _ID_MAP else self._metadata.get(name, default)


class InstanceSegEvaluator(COCOEvaluator):
    """``COCOEvaluator`` that accepts any thing-id map (contiguous class -> dataset category id)."""

    def _match_image_ids(self, predictions):
        known = set(self._coco_api.getImgIds())
        if all(p["image_id"] in known for p in predictions):
            return
        by_stem = {
            os.path.splitext(os.path.basename(img["file_name"]))[0]: img["id"]
            for img in self._coco_api.dataset["images"]
        }
        for per_image in predictions:
            image_id = per_image["image_id"]
            if image_id in known:
                continue
            if str(image_id) not in by_stem:
                raise ValueError(
                    f"Image {image_id!r} of {self._metadata.name!r} is neither an image id nor a file name of "
                    f"the instance annotations {self._metadata.json_file!r}."
                )
            per_image["image_id"] = by_stem[str(image_id)]
            for result in per_image.get("instances", []):
                result["image_id"] = per_image["image_id"]

    def _eval_predictions(self, predictions, img_ids=None):
        if self._do_evaluation:
            self._match_image_ids(predictions)
        id_map = getattr(self._metadata, _ID_MAP, None)
        if id_map is None:
            return super()._eval_predictions(predictions, img_ids)
        reverse = {contiguous: dataset_id for dataset_id, contiguous in id_map.items()}
        for per_image in predictions:
            for result in per_image.get("instances", []):
                category = result["category_id"]
                if category not in reverse:
                    raise ValueError(
                        f"A prediction has class {category}, which is not a thing class of "
                        f"{self._metadata.name!r} (thing classes: {sorted(reverse)})."
                    )
                result["category_id"] = reverse[category]
        metadata = self._metadata
        self._metadata = _MetadataWithoutIdMap(metadata)
        try:
            return super()._eval_predictions(predictions, img_ids)
        finally:
            self._metadata = metadata
