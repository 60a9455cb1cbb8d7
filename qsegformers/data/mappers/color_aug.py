"""SSD-style photometric distortion as a detectron2 ``Transform`` that changes images only."""
import cv2
import numpy as np
from fvcore.transforms.transform import Transform

__all__ = ["ColorAugSSDTransform"]

# Defaults of the SSD photometric distortion (as used by Mask2Former / mmseg).
BRIGHTNESS_DELTA = 32  # added intensity in [-delta, delta]
CONTRAST_RANGE = (0.5, 1.5)  # intensity multiplier
SATURATION_RANGE = (0.5, 1.5)  # HSV saturation multiplier
HUE_DELTA = 18  # HSV hue shift in OpenCV units (0..180 per turn)
OPENCV_HUE_PERIOD = 180
MAX_INTENSITY = 255
SUPPORTED_FORMATS = ("BGR", "RGB")


class ColorAugSSDTransform(Transform):
    """Random brightness, contrast, saturation and hue changes of an H x W x 3 uint8 image.

    Each step is applied with probability 1/2 and contrast comes either first or last (as in SSD).
    The randomness is drawn when the image is transformed, from numpy's global generator (which
    detectron2 seeds per data-loader worker). Coordinates and segmentations are returned unchanged,
    so labels and panoptic RGB-encoded ids are never distorted.
    """

    def __init__(
        self,
        img_format: str,
        brightness_delta: float = BRIGHTNESS_DELTA,
        contrast_range: tuple = CONTRAST_RANGE,
        saturation_range: tuple = SATURATION_RANGE,
        hue_delta: int = HUE_DELTA,
    ):
        super().__init__()
        if img_format not in SUPPORTED_FORMATS:
            raise ValueError(
                f"INPUT.COLOR_AUG_SSD needs INPUT.FORMAT in {SUPPORTED_FORMATS}, got {img_format!r}."
            )
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        """img: H x W x 3 uint8 in ``img_format``; returns the distorted H x W x 3 uint8 image."""
        bgr = np.ascontiguousarray(img[:, :, ::-1] if self.img_format == "RGB" else img)
        bgr = self._brightness(bgr)
        if np.random.randint(2):
            bgr = self._hue(self._saturation(self._contrast(bgr)))
        else:
            bgr = self._contrast(self._hue(self._saturation(bgr)))
        return np.ascontiguousarray(bgr[:, :, ::-1]) if self.img_format == "RGB" else bgr

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    @staticmethod
    def _affine(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        out = values.astype(np.float32) * alpha + beta
        return np.clip(out, 0, MAX_INTENSITY).astype(np.uint8)

    def _brightness(self, bgr: np.ndarray) -> np.ndarray:
        if np.random.randint(2):
            return self._affine(bgr, beta=np.random.uniform(-self.brightness_delta, self.brightness_delta))
        return bgr

    def _contrast(self, bgr: np.ndarray) -> np.ndarray:
        if np.random.randint(2):
            return self._affine(bgr, alpha=np.random.uniform(*self.contrast_range))
        return bgr

    def _saturation(self, bgr: np.ndarray) -> np.ndarray:
        if np.random.randint(2):
            hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
            hsv[:, :, 1] = self._affine(hsv[:, :, 1], alpha=np.random.uniform(*self.saturation_range))
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        return bgr

    def _hue(self, bgr: np.ndarray) -> np.ndarray:
        if np.random.randint(2):
            hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
            shift = np.random.randint(-self.hue_delta, self.hue_delta + 1)
            hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int32) + shift) % OPENCV_HUE_PERIOD).astype(np.uint8)
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        return bgr
