"""The procedural shapes dataset, defined in `vitviz.data.shapes` (the core analyses it too); re-exported here."""

from vitviz.data.shapes import (
    DEFAULT_IMG_SIZE,
    DEFAULT_NUM_SAMPLES,
    SHAPE_CLASSES,
    ShapeScene,
    ShapesDataset,
    measure_speed,
    paint,
    pick_colour,
    render_background,
    sample_scene,
    shape_mask,
    shape_polygons,
)

__all__ = [
    "DEFAULT_IMG_SIZE",
    "DEFAULT_NUM_SAMPLES",
    "SHAPE_CLASSES",
    "ShapeScene",
    "ShapesDataset",
    "measure_speed",
    "paint",
    "pick_colour",
    "render_background",
    "sample_scene",
    "shape_mask",
    "shape_polygons",
]
