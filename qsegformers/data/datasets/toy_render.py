"""Rendering of one ``qseg_toy`` scene: textured stuff regions plus occluding thing instances.

Pure numpy/OpenCV and deterministic for a given ``numpy.random.Generator``. Colours are RGB floats
in [0, 1] until the final uint8 conversion. Class ids are contiguous: things first, then stuff.
"""
from typing import List, NamedTuple, Tuple

import cv2
import numpy as np

__all__ = ["CLASS_NAMES", "IMAGE_SIZE", "NUM_THINGS", "Scene", "render_scene"]

IMAGE_SIZE = (128, 128)  # H, W
THING_CLASSES = ("disc", "square", "triangle")
STUFF_CLASSES = ("sky", "grass", "wall")
CLASS_NAMES = THING_CLASSES + STUFF_CLASSES
NUM_THINGS = len(THING_CLASSES)
IGNORE_LABEL = 255

# Base colour of each class (same order as CLASS_NAMES) and the per-image jitter around it.
BASE_RGB = np.array([
    [0.95, 0.85, 0.20],  # disc: yellow
    [0.80, 0.25, 0.75],  # square: magenta
    [0.15, 0.80, 0.80],  # triangle: cyan
    [0.40, 0.58, 0.92],  # sky: light blue
    [0.25, 0.60, 0.20],  # grass: green
    [0.65, 0.30, 0.22],  # wall: brick red
])
COLOR_JITTER = 0.08
TEXTURE_NOISE = 0.05  # std of per-pixel noise inside a texture
IMAGE_NOISE = 0.02  # std of per-pixel noise over the whole image

# Stuff layout: each present stuff class gets a smooth random field (bicubic upsampling of a coarse
# grid) plus a vertical bias (sky prefers the top, grass the bottom); a pixel takes the argmax.
NUM_STUFF_RANGE = (1, 3)  # inclusive
FIELD_GRID = (4, 4)
VERTICAL_BIAS = {"sky": -0.8, "grass": 0.8, "wall": 0.0}
SKY_GRADIENT = 0.35  # brightness gain from bottom to top
STRIPE_PERIOD_RANGE = (5.0, 12.0)  # pixels
STRIPE_CONTRAST = 0.25
BRICK_HEIGHT_RANGE = (6, 10)  # pixels; bricks are twice as wide as high
BRICK_JITTER = 0.12  # per-brick brightness variation
MORTAR_RGB = np.array([0.78, 0.75, 0.70])

# Things: 1..4 instances, half-size (radius) in pixels; placements that leave an instance with a
# small visible area or with a hole are retried, so every format keeps the same instances.
NUM_INSTANCES_RANGE = (1, 4)  # inclusive
THING_RADIUS_RANGE = (12, 28)
THING_SIZE_SCALE = (1.0, 1.1, 1.3)  # per thing class, so that the three have similar areas
MIN_VISIBLE_AREA = 80
MAX_PLACEMENT_TRIES = 10
SHADING_STRENGTH = 0.35
HIGHLIGHT_OFFSET = 0.25  # disc highlight offset from the centre, in units of the disc size

# Global illumination: gain and a linear gradient across the image.
GAIN_RANGE = (0.75, 1.15)
ILLUMINATION_SLOPE = 0.2


class Scene(NamedTuple):
    """image: H x W x 3 uint8 RGB; label: H x W uint8 contiguous ids (255 ignore);
    instances: [(contiguous thing id, H x W bool visible mask)] in drawing order."""

    image: np.ndarray
    label: np.ndarray
    instances: List[Tuple[int, np.ndarray]]


def _grid():
    """Pixel-centre coordinates ``yy, xx`` (H x W float) normalised to [0, 1]."""
    height, width = IMAGE_SIZE
    return np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")


def _smooth_field(rng) -> np.ndarray:
    """H x W float field in about [0, 1] with a few smooth bumps."""
    height, width = IMAGE_SIZE
    coarse = rng.random(FIELD_GRID).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _colour(rng, cls: int) -> np.ndarray:
    return np.clip(BASE_RGB[cls] + rng.uniform(-COLOR_JITTER, COLOR_JITTER, 3), 0.0, 1.0)


def _noise(rng, std: float) -> np.ndarray:
    return rng.normal(0.0, std, IMAGE_SIZE + (3,))


def _stuff_texture(rng, cls: int) -> np.ndarray:
    """H x W x 3 texture of a stuff class over the whole image."""
    yy, xx = _grid()
    height, width = IMAGE_SIZE
    name = CLASS_NAMES[cls]
    base = _colour(rng, cls)
    if name == "sky":
        shade = 1.0 - SKY_GRADIENT / 2 + SKY_GRADIENT * (1.0 - yy)
        tex = base * shade[..., None]
    elif name == "grass":
        angle = rng.uniform(0.0, np.pi)
        period = rng.uniform(*STRIPE_PERIOD_RANGE)
        phase = (xx * width * np.cos(angle) + yy * height * np.sin(angle)) * 2 * np.pi / period
        tex = base * (1.0 + STRIPE_CONTRAST * np.sin(phase + rng.uniform(0, 2 * np.pi)))[..., None]
    else:  # wall: running-bond bricks with light mortar lines
        brick_h = int(rng.integers(BRICK_HEIGHT_RANGE[0], BRICK_HEIGHT_RANGE[1] + 1))
        brick_w = 2 * brick_h
        ys, xs = np.mgrid[0:height, 0:width] + rng.integers(0, brick_w, 2)[:, None, None]
        row = ys // brick_h
        xs_shifted = xs + (row % 2) * (brick_w // 2)
        brick_id = row * (width // brick_w + 2) + xs_shifted // brick_w
        gains = 1.0 + rng.uniform(-BRICK_JITTER, BRICK_JITTER, int(brick_id.max()) + 1)
        tex = base * gains[brick_id][..., None]
        mortar = (ys % brick_h == 0) | (xs_shifted % brick_w == 0)
        tex[mortar] = MORTAR_RGB
    return tex + _noise(rng, TEXTURE_NOISE)


def _stuff_layout(rng):
    """Returns the H x W contiguous stuff label map and the H x W bool border (ignore) map."""
    num = int(rng.integers(NUM_STUFF_RANGE[0], NUM_STUFF_RANGE[1] + 1))
    present = NUM_THINGS + rng.choice(len(STUFF_CLASSES), size=num, replace=False)
    yy, _ = _grid()
    fields = [_smooth_field(rng) + VERTICAL_BIAS[CLASS_NAMES[c]] * (yy - 0.5) for c in present]
    labels = present[np.argmax(np.stack(fields), axis=0)].astype(np.uint8)
    border = np.zeros(IMAGE_SIZE, dtype=bool)
    border[:-1] |= labels[:-1] != labels[1:]
    border[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return labels, border


def _thing_mask(rng, cls: int) -> np.ndarray:
    """H x W bool mask of one randomly sized, placed and rotated thing."""
    height, width = IMAGE_SIZE
    radius = int(rng.integers(THING_RADIUS_RANGE[0], THING_RADIUS_RANGE[1] + 1) * THING_SIZE_SCALE[cls])
    cx, cy = rng.integers(radius, width - radius), rng.integers(radius, height - radius)
    canvas = np.zeros(IMAGE_SIZE, dtype=np.uint8)
    name = CLASS_NAMES[cls]
    if name == "disc":
        cv2.circle(canvas, (int(cx), int(cy)), radius, 1, thickness=-1)
    else:
        corners = 4 if name == "square" else 3
        angles = rng.uniform(0, 2 * np.pi) + np.arange(corners) * 2 * np.pi / corners
        pts = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)
    return canvas.astype(bool)


def _visible_masks(masks: List[np.ndarray]) -> List[np.ndarray]:
    """Visible part of each mask when later masks are drawn over earlier ones."""
    covered = np.zeros(IMAGE_SIZE, dtype=bool)
    visible = []
    for mask in reversed(masks):
        visible.append(mask & ~covered)
        covered |= mask
    return visible[::-1]


def _has_hole(mask: np.ndarray) -> bool:
    _, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0, :, 3] >= 0).any())


def _place_things(rng):
    """Returns ``[(class, full mask)]`` whose visible parts are all large and hole-free."""
    placed = []
    num = int(rng.integers(NUM_INSTANCES_RANGE[0], NUM_INSTANCES_RANGE[1] + 1))
    for _ in range(num):
        for _ in range(MAX_PLACEMENT_TRIES):
            cls = int(rng.integers(NUM_THINGS))
            candidate = placed + [(cls, _thing_mask(rng, cls))]
            visible = _visible_masks([m for _, m in candidate])
            if all(v.sum() >= MIN_VISIBLE_AREA and not _has_hole(v) for v in visible):
                placed = candidate
                break
    return placed


def _thing_texture(rng, cls: int, mask: np.ndarray) -> np.ndarray:
    """H x W x 3 texture of one instance: its colour with radial or linear shading."""
    yy, xx = _grid()
    ys, xs = np.nonzero(mask)
    cy, cx = yy[ys, xs].mean(), xx[ys, xs].mean()
    extent = max(np.ptp(yy[ys, xs]), np.ptp(xx[ys, xs]), 1.0 / max(IMAGE_SIZE))
    if CLASS_NAMES[cls] == "disc":  # highlight off-centre
        hy, hx = np.array([cy, cx]) + rng.uniform(-HIGHLIGHT_OFFSET, HIGHLIGHT_OFFSET, 2) * extent
        shade = 1.0 - SHADING_STRENGTH * np.clip(np.hypot(yy - hy, xx - hx) / extent, 0.0, 1.0)
    else:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = ((yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)) / extent
        shade = 1.0 - SHADING_STRENGTH * np.clip(ramp + 0.5, 0.0, 1.0)
    return _colour(rng, cls) * shade[..., None] + _noise(rng, TEXTURE_NOISE)


def render_scene(rng: np.random.Generator) -> Scene:
    """Render one scene; the same generator state always gives the same scene."""
    label, border = _stuff_layout(rng)
    image = np.zeros(IMAGE_SIZE + (3,))
    for cls in np.unique(label):
        region = label == cls
        image[region] = _stuff_texture(rng, int(cls))[region]
    label[border] = IGNORE_LABEL
    placed = _place_things(rng)
    instances = []
    for (cls, mask), visible in zip(placed, _visible_masks([m for _, m in placed])):
        image[mask] = _thing_texture(rng, cls, mask)[mask]  # later instances overwrite earlier ones
        label[visible] = cls
        instances.append((cls, visible))
    yy, xx = _grid()
    slope = rng.uniform(-ILLUMINATION_SLOPE, ILLUMINATION_SLOPE, 2)
    gain = rng.uniform(*GAIN_RANGE) * (1.0 + slope[0] * (yy - 0.5) + slope[1] * (xx - 0.5))
    image = image * gain[..., None] + _noise(rng, IMAGE_NOISE)
    image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return Scene(image=image, label=label, instances=instances)
