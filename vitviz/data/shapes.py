"""Procedural shapes: an unlimited, seeded dataset of coloured shapes on textured backgrounds, with exact masks.

Image i of a (seed, split) pair is drawn from a random generator seeded by (seed, split, i) alone, so any
DataLoader worker, a resumed run or another machine sees the same image for the same index, and the three
splits come from disjoint random streams. The class is the shape; colour, fill style (filled or outlined),
position, size, rotation and background are random, so a model has to learn shape to be right. The mask
of an image is the set of pixels the shape was painted on (for an outlined shape, the outline), which is
what the pointing game checks the model's attention against.

Generation is numpy and PIL.ImageDraw, no per-pixel Python: about 4,000 images per CPU second at 32 px and
2,000 at 64 px on one core (``python -m vitviz.data.shapes`` measures it on your machine).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from vitviz.data.base import VisionDataset
from vitviz.errors import VitvizError

log = logging.getLogger(__name__)

SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "hexagon",
    "ellipse",
    "heart",
    "arrow",
    "crescent",
)

DEFAULT_IMG_SIZE = (64, 64)
DEFAULT_NUM_SAMPLES = {"train": 50_000, "val": 1_000, "test": 1_000}
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}  # separate random streams, so splits never share an image

# Geometry and clutter ranges (fractions of the shorter image side unless stated). Chosen for learnability:
# with smaller shapes (radius 0.24-0.42), thinner outlines and busier backgrounds, a 4-layer ViT at 32 px
# reached roughly half the validation accuracy after the same 5 CPU minutes.
RADIUS_RANGE = (0.30, 0.45)  # radius of the circle that holds the shape
MAX_OVERHANG = 0.10  # at most this fraction of the radius may leave the image, so shapes stay mostly inside
OUTLINE_FRACTION = (0.25, 0.35)  # outline width as a fraction of the radius
MIN_OUTLINE_PX = 2  # thinner outlines vanish in the noise at 32 px
ELLIPSE_MINOR_RANGE = (0.38, 0.58)  # minor/major axis ratio; far enough from 1 that an ellipse is never a circle
MIN_LUMINANCE_CONTRAST = 90.0  # shape vs mean background luminance under it, on the 0..255 scale
TEXTURE_AMPLITUDE = (5.0, 18.0)  # stripes or blobs, +- this on the 0..255 scale
NOISE_STD = (2.0, 7.0)  # per-pixel Gaussian noise over the whole image, shape included
SUPERSAMPLING = 4  # sub-pixels per pixel side when rasterising masks up to 128 px (2 above, for speed)


@dataclass(frozen=True)
class ShapeScene:
    """Everything that decides where and how one shape is drawn, in pixel coordinates.

    Pixel (x, y) has its centre at the integer point (x, y), as in PIL.ImageDraw.
    """

    label: int  # index into SHAPE_CLASSES
    filled: bool  # filled, or only its outline
    center: tuple[float, float]  # (x, y)
    radius: float  # radius of the circle holding the shape, pixels
    angle: float  # rotation, radians
    minor_ratio: float  # ellipse minor/major axis ratio (ignored by other classes)
    outline_width: int  # pixels, for outlined shapes
    colour: tuple[int, int, int] = (255, 255, 255)  # RGB, chosen against the background it lands on


def _regular_polygon(num_vertices: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(num_vertices) / num_vertices
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    angles = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    return radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _heart(num_points: int = 48) -> np.ndarray:
    # The classic parametric heart, centred on its bounding box and scaled into the unit circle.
    t = np.linspace(0, 2 * math.pi, num_points, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    points = np.stack([x, y], axis=1)
    points -= (points.max(axis=0) + points.min(axis=0)) / 2
    return points / np.linalg.norm(points, axis=1).max()


def _unit_outline(points: list[tuple[float, float]]) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    return array / np.linalg.norm(array, axis=1).max()


_CIRCLE = _regular_polygon(64)
# Each class is a list of (polygon in the unit disc, adds) pairs: adds=False cuts the polygon out again.
_UNIT_SHAPES: dict[str, list[tuple[np.ndarray, bool]]] = {
    "circle": [(_CIRCLE, True)],
    "square": [(_regular_polygon(4, phase=math.pi / 4), True)],
    "triangle": [(_regular_polygon(3), True)],
    "star": [(_star(), True)],
    "cross": [
        (
            _unit_outline(
                [
                    (-0.3, -1),
                    (0.3, -1),
                    (0.3, -0.3),
                    (1, -0.3),
                    (1, 0.3),
                    (0.3, 0.3),
                    (0.3, 1),
                    (-0.3, 1),
                    (-0.3, 0.3),
                    (-1, 0.3),
                    (-1, -0.3),
                    (-0.3, -0.3),
                ]
            ),
            True,
        )
    ],
    "hexagon": [(_regular_polygon(6), True)],
    "ellipse": [(_CIRCLE, True)],  # squashed by the scene's minor_ratio
    "heart": [(_heart(), True)],
    "arrow": [
        (
            _unit_outline([(-1, -0.22), (0.15, -0.22), (0.15, -0.62), (1, 0), (0.15, 0.62), (0.15, 0.22), (-1, 0.22)]),
            True,
        )
    ],
    # A disc with an offset, smaller disc cut away.
    "crescent": [(_CIRCLE, True), (0.8 * _CIRCLE + np.array([0.42, -0.12]), False)],
}
assert tuple(_UNIT_SHAPES) == SHAPE_CLASSES


def shape_polygons(scene: ShapeScene) -> list[tuple[np.ndarray, bool]]:
    """The scene's shape as pixel-space polygons [K, 2] of (x, y), each with whether it adds or cuts out."""
    cos, sin = math.cos(scene.angle), math.sin(scene.angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    stretch = np.array([1.0, scene.minor_ratio]) if SHAPE_CLASSES[scene.label] == "ellipse" else np.ones(2)
    center = np.asarray(scene.center)
    return [
        ((unit * stretch) @ rotation.T * scene.radius + center, adds)
        for unit, adds in _UNIT_SHAPES[SHAPE_CLASSES[scene.label]]
    ]


def _rasterise(polygons: list[tuple[np.ndarray, bool]], img_size: tuple[int, int]) -> np.ndarray:
    """Pixels at least half covered by the polygons (adds minus cuts), as a boolean [H, W] array.

    PIL truncates vertices to integers and fills edges inclusively, which grows a shape by about half a
    pixel up and to the left; drawing at several times the resolution and voting per pixel removes that bias.
    """
    height, width = img_size
    factor = SUPERSAMPLING if max(height, width) <= 128 else 2
    canvas = Image.new("L", (width * factor, height * factor), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon, adds in polygons:
        # Pixel (x, y) spans [x - 0.5, x + 0.5]; its sub-pixels' centres sit at integer fine coordinates.
        fine = (polygon + 0.5) * factor - 0.5
        draw.polygon(fine.ravel().tolist(), fill=255 if adds else 0)
    # Box-averaging 255s: a pixel half covered averages 127.5, which PIL rounds to 128.
    return np.asarray(canvas.reduce(factor)) >= 128


def shape_mask(scene: ShapeScene, img_size: tuple[int, int]) -> np.ndarray:
    """Boolean [H, W] mask of the pixels the scene's shape covers (the outline only, when not filled)."""
    if scene.filled:
        return _rasterise(shape_polygons(scene), img_size)
    # The outline is the part of the shape within outline_width pixels (Euclidean) of its edge. The shape
    # is drawn on a canvas padded by that width, so a shape running off the image keeps its outline up to
    # the border and gets none along the border itself. Working on the bounding box (plus the ring of
    # outside pixels around it) keeps the distance transform cheap.
    height, width = img_size
    pad = scene.outline_width + 1
    padded = _rasterise(
        [(polygon + pad, adds) for polygon, adds in shape_polygons(scene)], (height + 2 * pad, width + 2 * pad)
    )
    if not padded.any():
        return padded[pad:-pad, pad:-pad]
    rows = np.flatnonzero(padded.any(axis=1))
    cols = np.flatnonzero(padded.any(axis=0))
    top, bottom = max(rows[0] - 1, 0), min(rows[-1] + 2, padded.shape[0])
    left, right = max(cols[0] - 1, 0), min(cols[-1] + 2, padded.shape[1])
    box = padded[top:bottom, left:right]
    outline = np.zeros_like(padded)
    outline[top:bottom, left:right] = box & (ndimage.distance_transform_edt(box) <= scene.outline_width)
    return outline[pad:-pad, pad:-pad]


@lru_cache(maxsize=16)
def _unit_grid(img_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates scaled to [0, 1] along each axis, shaped [H, 1] and [1, W]."""
    height, width = img_size
    ys = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]
    xs = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, :]
    return ys, xs


def render_background(rng: np.random.Generator, img_size: tuple[int, int]) -> np.ndarray:
    """A textured background, float32 [H, W, 3] in 0..255: a colour gradient plus stripes or soft blobs."""
    height, width = img_size
    ys, xs = _unit_grid(img_size)
    start = rng.uniform(0, 255, size=3).astype(np.float32)
    end = np.clip(start + rng.uniform(-90, 90, size=3), 0, 255).astype(np.float32)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = xs * math.cos(direction) + ys * math.sin(direction)  # [H, W]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    background = start + ramp[:, :, None] * (end - start)

    amplitude = rng.uniform(*TEXTURE_AMPLITUDE) * rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    if rng.random() < 0.5:
        # Stripes at a random angle and frequency, in the shape's size range or finer.
        angle = rng.uniform(0, math.pi)
        cycles = rng.uniform(2, 7)
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin((xs * math.cos(angle) + ys * math.sin(angle)) * (2 * math.pi * cycles) + phase)
        background += wave[:, :, None] * amplitude
    else:
        # Soft blobs: a coarse random grid blown up with bicubic interpolation.
        coarse = rng.integers(0, 256, size=(int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3), dtype=np.uint8)
        blobs = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        background += (blobs / 127.5 - 1.0) * amplitude
    return background


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=rgb.dtype)


def pick_colour(rng: np.random.Generator, background_luminance: float) -> tuple[int, int, int]:
    """A random colour whose luminance differs from `background_luminance` by at least the minimum contrast."""
    if background_luminance < 128:
        target = rng.uniform(background_luminance + MIN_LUMINANCE_CONTRAST, 255)
    else:
        target = rng.uniform(0, background_luminance - MIN_LUMINANCE_CONTRAST)
    colour = rng.uniform(0, 255, size=3)
    for _ in range(3):  # shifting then clipping moves the luminance less than asked; a few rounds converge
        colour = np.clip(colour + (target - _luminance(colour)), 0, 255)
    if abs(_luminance(colour) - background_luminance) < MIN_LUMINANCE_CONTRAST:
        colour = np.full(3, target)
    return tuple(int(round(c)) for c in colour)


def sample_scene(rng: np.random.Generator, label: int, img_size: tuple[int, int]) -> ShapeScene:
    """Random placement, size, rotation and style for a shape of class `label` (colour is chosen later)."""
    height, width = img_size
    radius = rng.uniform(*RADIUS_RANGE) * min(height, width)
    margin = radius * (1 - MAX_OVERHANG)
    # Continuous image extent is [-0.5, W - 0.5] with pixel centres at integers.
    center_x = rng.uniform(margin - 0.5, max(width - 0.5 - margin, margin - 0.5))
    center_y = rng.uniform(margin - 0.5, max(height - 0.5 - margin, margin - 0.5))
    return ShapeScene(
        label=label,
        filled=bool(rng.random() < 0.5),
        center=(float(center_x), float(center_y)),
        radius=float(radius),
        angle=float(rng.uniform(0, 2 * math.pi)),
        minor_ratio=float(rng.uniform(*ELLIPSE_MINOR_RANGE)),
        outline_width=max(MIN_OUTLINE_PX, int(round(radius * rng.uniform(*OUTLINE_FRACTION)))),
    )


def paint(
    background: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], noise: np.ndarray | None
) -> np.ndarray:
    """Paints `colour` on `background` where `mask` is set, adds pixel noise to everything, returns uint8 RGB."""
    image = np.where(mask[:, :, None], np.asarray(colour, dtype=np.float32), background)
    if noise is not None:
        image = image + noise
    return np.clip(image, 0, 255).round().astype(np.uint8)


class ShapesDataset(VisionDataset):
    """Seeded procedural shapes with exact object masks; any length, any resolution, random access.

    Labels cycle through the classes (label = index mod number of classes), so every split and every
    contiguous slice is balanced; the training loader shuffles.
    """

    in_chans = 3
    has_masks = True

    def __init__(
        self,
        *,
        split: str = "train",
        img_size: tuple[int, int] = DEFAULT_IMG_SIZE,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        if split not in _SPLIT_STREAM:
            raise VitvizError(f"unknown shapes split {split!r}: use one of {', '.join(_SPLIT_STREAM)}")
        height, width = (int(img_size[0]), int(img_size[1]))
        if min(height, width) < 8:
            raise VitvizError(f"shapes needs images of at least 8x8 pixels, got {height}x{width}")
        length = DEFAULT_NUM_SAMPLES[split] if num_samples is None else int(num_samples)
        if length <= 0:
            raise VitvizError(f"num_samples must be positive, got {num_samples}")
        self.split = split
        self.img_size = (height, width)
        self.seed = int(seed)
        self.length = length
        self.class_names = list(SHAPE_CLASSES)
        self._last_render: tuple[int, np.ndarray, np.ndarray] | None = None  # image and mask are often asked in pairs

    def __len__(self) -> int:
        return self.length

    @property
    def labels(self) -> np.ndarray:
        return np.arange(self.length) % len(SHAPE_CLASSES)

    def rng(self, index: int) -> np.random.Generator:
        """The random generator that image `index` is drawn from; it depends on (seed, split, index) only."""
        # SeedSequence wants non-negative entropy; the mask keeps negative seeds usable and distinct.
        return np.random.default_rng([self.seed & 0xFFFF_FFFF_FFFF_FFFF, _SPLIT_STREAM[self.split], index])

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, ShapeScene]:
        """Image `index` as uint8 [H, W, 3], its boolean [H, W] mask and the scene that was drawn."""
        index = self._check_index(index)
        rng = self.rng(index)
        scene = sample_scene(rng, index % len(SHAPE_CLASSES), self.img_size)
        background = render_background(rng, self.img_size)
        mask = shape_mask(scene, self.img_size)
        under_shape = background[mask] if mask.any() else background.reshape(-1, 3)
        scene = dataclasses.replace(scene, colour=pick_colour(rng, float(_luminance(under_shape.mean(axis=0)))))
        noise = rng.standard_normal((*self.img_size, 3), dtype=np.float32) * np.float32(rng.uniform(*NOISE_STD))
        return paint(background, mask, scene.colour, noise), mask, scene

    def _render_cached(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._check_index(index)
        if self._last_render is None or self._last_render[0] != index:
            image, mask, _ = self.render(index)
            self._last_render = (index, image, mask)
        return self._last_render[1], self._last_render[2]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, _ = self._render_cached(index)
        return Image.fromarray(image), self._check_index(index) % len(SHAPE_CLASSES)

    def mask(self, index: int) -> np.ndarray:
        _, mask = self._render_cached(index)
        return mask.copy()


def measure_speed(img_size: tuple[int, int], *, num_images: int = 2000) -> float:
    """Images per second of CPU time that `ShapesDataset.__getitem__` takes on one thread.

    CPU time rather than wall time, so the figure holds on a machine shared with other work.
    """
    dataset = ShapesDataset(split="train", img_size=img_size, num_samples=num_images)
    start = time.process_time()
    for index in range(num_images):
        dataset[index]
    return num_images / (time.process_time() - start)


if __name__ == "__main__":
    for size in (32, 64, 224):
        print(f"{size}x{size}: {measure_speed((size, size)):.0f} images per CPU second")
