"""Every streamlit cache of the app, in one place.

- `st.cache_resource` holds only the shared models, keyed by strings: the source (path or timm name),
  its content hash and whether timm's pretrained weights were asked for. One model serves every session;
  analyses read it through `vitviz.pipeline`, whose attention capture is thread-safe and never changes the
  model.
- `st.cache_data` holds model cards, the small typed results of analyses that need only the model
  (filters, position embeddings) and decoded images. Arguments starting with "_" are not hashed: the
  content hash passed beside them names the model.
- `functools.lru_cache` holds the overview's training-curves pictures, keyed by the records' JSON, so that the
  server's start-up can draw the bundled default's before any session exists (no Streamlit runtime there).
Image analyses that cost real time live in the on-disk cache (`vitviz.ui.diskcache`), not here.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import streamlit as st

from vitviz import pipeline
from vitviz.errors import VitvizError
from vitviz.images import decode_image, sample_images
from vitviz.models import LoadedModel, file_sha256, load_model
from vitviz.pipeline import FilterResult, ModelCard, NotApplicable, PositionResult, ResampledPosition
from vitviz.ui import analyses

logger = logging.getLogger(__name__)

MAX_MODELS = 4  # models kept in memory at once (a ViT-B/16 is about 350 MB)


@functools.lru_cache(maxsize=32)
def training_curves_png(records_json: str, marker: tuple[float, str] | None, width_px: int) -> bytes:
    """The training curves of `records_json` (a JSON list of metrics records) as a PNG `width_px` wide, drawn
    by `vitviz.plots.paper` (the same description as the interactive chart and the download)."""
    from vitviz.plots import paper

    fig = paper.training_curves_figure(json.loads(records_json), x="step", marker=marker)
    buffer = io.BytesIO()
    # The constrained layout keeps every label inside the canvas, so no second, "tight" drawing pass is needed.
    fig.savefig(buffer, format="png", dpi=width_px / fig.get_figwidth(), pil_kwargs={"compress_level": 1})
    return buffer.getvalue()


@st.cache_data(show_spinner=False, max_entries=512)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def file_digest(path: Path) -> str:
    """sha256 of a file, recomputed only when its size or modification time changes."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise VitvizError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


@st.cache_resource(show_spinner=False, max_entries=MAX_MODELS)
def shared_model(source: str, content_hash: str, pretrained: bool) -> LoadedModel:
    """The one in-memory copy of a model (eval mode), shared by all sessions."""
    logger.info("loading %s (%s)", source, content_hash[:12])
    # The studio names no local hf: folder: an hf: key (from the add-model box or a URL) is a Hub id only.
    return load_model(source, pretrained=pretrained, hf_local_folders=False)


@st.cache_data(show_spinner=False, max_entries=64)
def model_card(source: str, content_hash: str, _loaded: LoadedModel) -> ModelCard:
    """The model's card (`vitviz.pipeline.model_card`)."""
    return pipeline.model_card(_loaded)


@st.cache_data(show_spinner=False, max_entries=64)
def filters(content_hash: str, _loaded: LoadedModel) -> FilterResult | NotApplicable:
    """Raw patch filters and every principal component, or why the model has none."""
    return analyses.filters(_loaded)


@st.cache_data(show_spinner=False, max_entries=64)
def position(content_hash: str, _loaded: LoadedModel) -> PositionResult | NotApplicable:
    """Cosine similarity [gh, gw, gh, gw] of the patch-position embeddings, or why the model has none."""
    return analyses.position(_loaded)


@st.cache_data(show_spinner=False, max_entries=32)
def resampled_position(content_hash: str, _loaded: LoadedModel, new_size: tuple[int, int]) -> ResampledPosition:
    """Position similarity after resampling the model to `new_size` pixels, and how it was resampled."""
    return analyses.resampled_position(_loaded, new_size)


@st.cache_data(show_spinner=False, max_entries=1)
def natural_photos() -> list[tuple[str, np.ndarray]]:
    """The natural photos that ship with the installed dependencies, decoded (uint8 RGB)."""
    return [(name, np.asarray(picture)) for name, picture in sample_images()]


@st.cache_data(show_spinner=False, max_entries=512)
def _decoded_file(path: str, size: int, mtime_ns: int) -> np.ndarray:
    return np.asarray(decode_image(path))


def decoded_file(path: Path) -> np.ndarray:
    """An image file decoded upright as uint8 RGB, cached until the file changes."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise VitvizError(f"cannot read image {path.name}: {exc.strerror or exc}") from None
    return _decoded_file(str(path), stat.st_size, stat.st_mtime_ns)


@st.cache_data(show_spinner=False, max_entries=64)
def _decoded_upload(digest: str, name: str, _data: bytes) -> np.ndarray:
    return np.asarray(decode_image(_data, name=name))


def decoded_upload(data: bytes, name: str) -> tuple[str, np.ndarray]:
    """(sha256, uint8 RGB picture) of uploaded image bytes; a bad file raises VitvizError naming it."""
    digest = hashlib.sha256(data).hexdigest()
    return digest, _decoded_upload(digest, name, data)
