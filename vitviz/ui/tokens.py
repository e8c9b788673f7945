"""Page `/tokens`: what the tokens carry. Token norms per layer (high-norm artefacts, Darcet et al. 2024), the
attention patch queries give to prefix tokens, the patch features' PCA as RGB (DINOv2's pictures), DINO's
per-head maps with their mass threshold, and a per-patch logit lens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import streamlit as st

from vitviz.errors import VitvizError
from vitviz.pipeline import AnalysisOptions, NotApplicable, TokensResult
from vitviz.plots import tokens as plots
from vitviz.ui import exports, widgets
from vitviz.ui.analyses import InputImage, display_picture
from vitviz.ui.token_analyses import TokenAnalyses, token_analyses

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ALL_LAYERS = "all layers"


def render() -> None:
    selection = widgets.model_sidebar()
    loaded = selection.loaded
    st.title("What tokens carry")
    st.caption(
        "Norms of every token after every block (the high-norm artefact tokens of Darcet et al., 'Vision "
        "Transformers Need Registers'), how much attention patches pay to the prefix tokens, the patch features' "
        "principal components as colours (as in the DINOv2 paper), DINO's per-head maps and a per-patch logit lens."
    )
    images = widgets.dataset_picker(key="tokens.images", default_count=8)
    if not images:
        return
    options, foreground = _controls()
    try:
        with st.spinner("Running the model…"):
            result = token_analyses(loaded, images, options)
    except VitvizError as exc:
        widgets.show_error(exc)
        return

    if len(images) > 1:
        index = st.selectbox(
            "Image to show", range(len(images)), format_func=lambda i: images[i].name, key="tokens.which"
        )
    else:
        index = 0
    image = images[index]
    picture = display_picture(loaded, image)
    grid = result.features.projections.shape[1:3]
    layer_key = widgets.model_key("tokens.layer", loaded)  # the layers are the model's
    figures = _token_sections(result.tokens, index, picture, grid, options, layer_key)
    num_classes = int(getattr(loaded.model, "num_classes", 0) or 0) or len(loaded.meta.class_names)
    figures.update(_feature_sections(result, index, picture, foreground, loaded.meta.class_names, num_classes))
    _downloads(f"{selection.entry.key}-{image.name}", result, index, images, figures)


def _controls() -> tuple[AnalysisOptions, bool]:
    """The options the analyses run with, and whether the feature colours black out the background."""
    factor_col, share_col, mask_col = st.columns(3)
    outlier_factor = factor_col.slider(
        "Outlier factor",
        1.1,
        5.0,
        2.0,
        0.1,
        key="tokens.factor",
        help="A patch token is an outlier when its norm exceeds this many times the median patch-token norm of "
        "its image at that layer.",
    )
    mass_share = share_col.slider(
        "Head-map mass share",
        0.05,
        1.0,
        0.6,
        0.05,
        key="tokens.share",
        help="DINO's threshold: each head's mask is the smallest set of patches holding this share of its attention.",
    )
    foreground = mask_col.toggle(
        "Foreground only",
        value=False,
        key="tokens.foreground",
        help="Black out patches whose first principal component (scaled over all images) is below one half.",
    )
    return AnalysisOptions(outlier_factor=outlier_factor, mass_share=mass_share, batch_size=8), foreground


def _token_sections(
    tokens: TokensResult,
    index: int,
    picture: np.ndarray,
    grid: tuple[int, int],
    options: AnalysisOptions,
    layer_key: str,
) -> dict[str, Callable[[], Figure]]:
    """Token norms, the high-norm patches of the image shown and the attention to prefix tokens; their figures
    for download."""
    st.markdown("##### Token norms after every block")
    st.caption(
        f"Mean over {tokens.num_images} image(s); {tokens.num_prefix_tokens} prefix token(s) first, then the "
        "patches in row-major order."
    )
    norm_fig = plots.norm_heatmap_figure(tokens.norms, tokens.token_names, tokens.num_prefix_tokens)
    widgets.pyplot(norm_fig)

    outlier_col, prefix_col = st.columns(2)
    layers = tokens.norms.shape[0]
    with outlier_col:
        st.markdown("##### High-norm patches")
        choice = st.selectbox("Layer", [ALL_LAYERS, *range(1, layers + 1)], index=0, key=layer_key, format_func=str)
        chosen = tokens.outlier_image == index
        if choice != ALL_LAYERS:
            chosen &= tokens.outlier_layer == int(choice) - 1
        outlier_fig = plots.outliers_figure(
            picture,
            tokens.outlier_row[chosen],
            tokens.outlier_col[chosen],
            tokens.outlier_ratio[chosen],
            grid,
            title=f"Norm > {options.outlier_factor:g} × median, {choice}",
        )
        widgets.pyplot(outlier_fig)
        counts = ", ".join(f"{layer + 1}: {count}" for layer, count in enumerate(tokens.outlier_counts))
        st.caption(
            f"Outlined: the patch tokens whose norm exceeds {options.outlier_factor:g} times the median patch-token "
            "norm of their image at that layer; such high-norm tokens tend to hold global information rather "
            f"than their patch's content. Outliers per layer over all images — {counts}"
        )
    with prefix_col:
        st.markdown("##### Attention to prefix tokens")
        prefix_fig = plots.prefix_attention_figure(tokens.prefix_attention, tokens.num_prefix_tokens)
        widgets.pyplot(prefix_fig)
        st.caption(
            "An attention sink is a token that receives much of the patches' attention while carrying little "
            "content; the lines show the share of each layer's patch attention that goes to the prefix tokens."
        )
        if not tokens.num_prefix_tokens:
            st.caption("The model has no prefix tokens, so the share is 0 everywhere.")
    return {
        "token-norms": lambda: plots.norm_heatmap_figure(tokens.norms, tokens.token_names, tokens.num_prefix_tokens),
        "outliers": lambda: outlier_fig,
        "prefix-attention": lambda: prefix_fig,
    }


def _feature_sections(
    result: TokenAnalyses,
    index: int,
    picture: np.ndarray,
    foreground: bool,
    class_names: Sequence[str],
    num_classes: int,
) -> dict[str, Callable[[], Figure]]:
    """The patch features' PCA, the head maps and the logit lens of the image shown; their figures for download."""
    st.markdown("##### Patch features, first three principal components as RGB")
    features = result.features
    rgb = plots.features_rgb(features.projections, foreground=foreground)
    features_fig = plots.features_figure(picture, rgb[index], features.explained_variance_ratio)
    widgets.pyplot(features_fig)
    st.caption(
        "PCA over the final features' patch tokens of all chosen images; each component is min-max scaled over all "
        "images, so colours compare across images."
    )

    heads = result.head_maps[index]
    st.markdown("##### Head maps")
    if not heads.uses_class_token:
        st.info("The model has no class token: the maps show the mean attention of all patch queries.")
    heads_fig = plots.head_maps_figure(heads.attention, heads.masks, query=heads.query, mass_share=heads.mass_share)
    widgets.pyplot(heads_fig)
    figures: dict[str, Callable[[], Figure]] = {"features-pca": lambda: features_fig, "head-maps": lambda: heads_fig}

    st.markdown("##### Logit lens")
    if isinstance(result.logit_lens, NotApplicable):
        st.caption(f"Not available: {result.logit_lens.reason}.")
    else:
        lens = result.logit_lens[index]
        name = class_names[lens.target_class] if lens.target_class < len(class_names) else str(lens.target_class)
        lens_fig = plots.logit_lens_figure(lens.probabilities, name)
        widgets.pyplot(lens_fig)
        st.caption(f"The predicted class, {widgets.plain(name)}, followed through every layer.")
        uniform = near_uniform_note(lens.probabilities, num_classes)
        if uniform:
            st.caption(uniform)
        figures["logit-lens"] = lambda: lens_fig
    return figures


def near_uniform_note(probabilities: np.ndarray, num_classes: int) -> str | None:
    """A sentence for a logit lens that is dark everywhere because its probabilities stay near the uniform
    1/num_classes (within ten times it, and under 0.05 of the 0..1 scale; as with random weights); None
    otherwise."""
    if num_classes < 2 or not np.size(probabilities):
        return None
    peak = float(np.max(probabilities))
    if peak > min(10.0 / num_classes, 0.05):
        return None
    return (
        f"The maps are dark because the head is undecided: the highest probability anywhere is {peak:.2g}, close "
        f"to 1/{num_classes} = {1 / num_classes:.2g} for {num_classes} classes (as with untrained or random "
        "weights), so every patch sits near 0 on the 0..1 scale."
    )


def _downloads(
    name: str,
    result: TokenAnalyses,
    index: int,
    images: Sequence[InputImage],
    figures: dict[str, Callable[[], Figure]],
) -> None:
    """The page's figures and its numbers (norms, every outlier of every image, the arrays) for download."""
    tokens, features, heads = result.tokens, result.features, result.head_maps[index]
    arrays = {
        **{f"tokens_{k}": v for k, v in tokens.to_arrays().items()},
        "features_explained_variance_ratio": features.explained_variance_ratio,
        "features_projections": features.projections,
        "head_attention": heads.attention,
        "head_masks": heads.masks,
    }
    if not isinstance(result.logit_lens, NotApplicable):
        arrays["logit_lens"] = result.logit_lens[index].probabilities
    outlier_rows = [
        (images[int(i)].name, int(layer) + 1, int(r), int(c), float(n), float(q))
        for i, layer, r, c, n, q in zip(
            tokens.outlier_image,
            tokens.outlier_layer,
            tokens.outlier_row,
            tokens.outlier_col,
            tokens.outlier_norm,
            tokens.outlier_ratio,
        )
    ]
    widgets.figure_picker_downloads(
        name,
        figures=figures,
        numbers={
            "norms.csv": lambda: exports.matrix_csv_bytes(tokens.norms, "layer", list(tokens.token_names)),
            "outliers.csv": lambda: exports.csv_bytes(["image", "layer", "row", "col", "norm", "ratio"], outlier_rows),
            "tokens.npz": lambda: exports.npz_bytes({k: np.asarray(v) for k, v in arrays.items()}),
        },
        key="tokens",
    )


if __name__ == "__main__":
    render()
