"""Reading arbitrary user images for the demo: EXIF orientation, grayscale, RGBA, 16-bit, corrupt files.

detectron2's ``read_image`` applies the EXIF orientation and converts grayscale and RGBA images, but
``PIL.Image.convert("RGB")`` clips 16-bit values (mode "I" / "I;16") at 255 instead of scaling them,
so a 16-bit image would come out almost white. :func:`read_image_any` scales those to 8 bits first.
"""
from typing import Tuple

import numpy as np
from detectron2.data.detection_utils import _apply_exif_orientation, convert_PIL_to_numpy
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageReadError", "read_image_any", "SIXTEEN_BIT_MODES"]

# PIL modes of single-channel images with more than 8 bits per pixel (16-bit PNG/TIFF open as these).
SIXTEEN_BIT_MODES: Tuple[str, ...] = ("I", "I;16", "I;16B", "I;16L", "I;16N")
UINT16_MAX = np.iinfo(np.uint16).max
UINT8_MAX = np.iinfo(np.uint8).max


class ImageReadError(ValueError):
    """An input file that is not a decodable image (the message names the file)."""


def _to_8bit(image: Image.Image) -> Image.Image:
    """A mode-"L" copy of a 16-bit image, scaled linearly from [0, 65535] to [0, 255]."""
    values = np.asarray(image, dtype=np.float64)
    scaled = np.clip(np.round(values * (UINT8_MAX / UINT16_MAX)), 0, UINT8_MAX).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def read_image_any(path: str, format: str = "BGR") -> np.ndarray:
    """Read ``path`` as an H x W x 3 uint8 array in ``format`` ("BGR" or "RGB"), upright per its EXIF tag.

    Grayscale images are replicated to three channels, the alpha channel of RGBA/LA/palette images is
    dropped, and 16-bit images are scaled to 8 bits (value * 255 / 65535).

    Raises:
        ImageReadError: the file cannot be opened or decoded as an image.
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            image = _apply_exif_orientation(image)
            if image.mode in SIXTEEN_BIT_MODES:
                image = _to_8bit(image)
            return np.ascontiguousarray(convert_PIL_to_numpy(image, format))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e
