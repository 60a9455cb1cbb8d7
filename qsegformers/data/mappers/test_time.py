"""The evaluation mapper: detectron2's test-time ``DatasetMapper`` reading images like the training mappers.

detectron2's ``DatasetMapper`` reads images with ``detection_utils.read_image``, which clips 16-bit
images to white and reports an undecodable file as a bare PIL error from inside a data-loader worker.
:class:`SafeTestDatasetMapper` reads with :func:`qsegformers.utils.image_io.read_image_any` (EXIF
orientation, grayscale, palette, RGBA, 16-bit) and otherwise does what ``DatasetMapper(cfg, False)``
does: the test-time resize, a C x H x W uint8 ``image``, annotations and label file names removed.
An image that cannot be read is not skipped (the metrics would silently cover fewer images): the error
names the file and the dataset record.
"""
import copy

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ...utils.image_io import ImageReadError, read_image_any
from .semantic import READ_ANY_FORMATS

__all__ = ["SafeTestDatasetMapper"]


class SafeTestDatasetMapper(DatasetMapper):
    """``DatasetMapper(cfg, is_train=False)`` with robust image reading (module docstring)."""

    def __call__(self, dataset_dict: dict) -> dict:
        """dataset_dict: a detectron2 record; returns it with ``image`` (C x H x W uint8, resized)."""
        if self.is_train:
            return super().__call__(dataset_dict)
        dataset_dict = copy.deepcopy(dataset_dict)
        path = dataset_dict["file_name"]
        try:
            if self.image_format in READ_ANY_FORMATS:
                image = read_image_any(path, format=self.image_format)
            else:
                image = utils.read_image(path, format=self.image_format)
        except (ImageReadError, OSError) as e:
            raise ImageReadError(
                f"Evaluation image {path} (image_id {dataset_dict.get('image_id')}) cannot be read, and "
                f"evaluation does not skip images: fix or remove it from the dataset. ({e})"
            ) from e
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        dataset_dict.pop("annotations", None)
        dataset_dict.pop("sem_seg_file_name", None)
        dataset_dict.pop("pan_seg_file_name", None)
        return dataset_dict
