"""Every streamlit cache of the app, in one place.

- `st.cache_resource` holds only the shared models, keyed by strings: the source (path or timm name),
  its content hash and whether timm's pretrained weights were asked for. One model serves every session;
  analyses read it through `vitviz.capture`, which is thread-safe and never changes the model.
- `st.cache_data` holds small numpy results of analyses that need only the model (filters, position
  embeddings) and decoded images. Arguments starting with "_" are not hashed: the content hash passed
  beside them names the model.
Image analyses that cost real time live in the on-disk cache (`vitviz.ui.diskcache`), not here.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
from torch import nn

from vitviz.analysis import (
    filter_pca,
    filters_applicable,
    patch_embedding_filters,
    position_similarity,
)
from vitviz.errors import VitvizError
from vitviz.images import decode_image, sample_images
from vitviz.models import (
    LoadedModel,
    ModelMeta,
    file_sha256,
    load_model,
    patch_position_embeddings,
    resample_input_size,
)
from vitviz.tokens import token_layout

logger = logging.getLogger(__name__)

MAX_MODELS = 4  # models kept in memory at once (a ViT-B/16 is about 350 MB)


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
    return load_model(source, pretrained=pretrained)


@st.cache_data(show_spinner=False, max_entries=64)
def filter_components(content_hash: str, _model: nn.Module) -> dict[str, Any]:
    """Raw patch filters [D, C, P, P] and every principal component, or {"reason": why not applicable}."""
    applicable, reason = filters_applicable(_model)
    if not applicable:
        return {"reason": reason}
    weight = patch_embedding_filters(_model)
    pca = filter_pca(weight, min(weight.shape[0], weight[0].numel()))
    return {
        "weight": weight.float().numpy(),
        "components": pca.components.numpy(),
        "ratio": pca.explained_variance_ratio.numpy(),
    }


@st.cache_data(show_spinner=False, max_entries=64)
def position_table_similarity(content_hash: str, _model: nn.Module) -> np.ndarray | None:
    """Cosine similarity [gh, gw, gh, gw] of the patch-position embeddings; None without absolute ones."""
    table = patch_position_embeddings(_model)
    if table is None:
        return None
    return position_similarity(table, token_layout(_model).grid).numpy()


@st.cache_data(show_spinner=False, max_entries=32)
def resampled_similarity(
    content_hash: str, _model: nn.Module, _meta: ModelMeta, new_size: tuple[int, int]
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Position similarity after resampling the model to `new_size` pixels, and the resampling's record."""
    new_model, new_meta = resample_input_size(_model, _meta, new_size)
    table = patch_position_embeddings(new_model)
    record = dict(new_meta.resolution_history[-1])
    if table is None:
        return None, record
    return position_similarity(table, token_layout(new_model).grid).numpy(), record


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
