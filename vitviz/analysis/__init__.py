"""The paper's analyses as pure functions: tensors in, tensors or frozen dataclasses out.

Definitions follow docs/design.md ("Analyses: definitions") exactly; each module's docstring restates its own.
Streaming accumulators (RolloutAccumulator, DistanceAccumulator) are consumers for vitviz.capture.
"""

from vitviz.analysis.differences import Difference, MapDifferences, map_differences, resample_bilinear
from vitviz.analysis.distance import (
    DISTANCE_MODES,
    AttentionDistance,
    DistanceAccumulator,
    mean_attention_distance,
    query_attention_distance,
)
from vitviz.analysis.filters import (
    FilterPCA,
    components_for_display,
    filter_pca,
    filters_applicable,
    patch_embedding_filters,
)
from vitviz.analysis.position import position_similarity
from vitviz.analysis.rollout import (
    HEAD_FUSIONS,
    PointingGame,
    RolloutAccumulator,
    attention_rollout,
    gradient_rollout,
    patch_grid,
    pointing_game,
)

__all__ = [
    "DISTANCE_MODES",
    "HEAD_FUSIONS",
    "AttentionDistance",
    "Difference",
    "DistanceAccumulator",
    "FilterPCA",
    "MapDifferences",
    "PointingGame",
    "RolloutAccumulator",
    "attention_rollout",
    "components_for_display",
    "filter_pca",
    "filters_applicable",
    "gradient_rollout",
    "map_differences",
    "mean_attention_distance",
    "patch_embedding_filters",
    "patch_grid",
    "pointing_game",
    "position_similarity",
    "query_attention_distance",
    "resample_bilinear",
]
