"""Widgets every page shares: the model picker, image inputs, download buttons and safe messages.

Text that comes from users or models (file names, class names, run ids, error messages naming them) is
shown through `plain()`, which escapes Markdown, or in tables and code blocks; nothing here uses HTML.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import streamlit as st

from vitviz.domain import TrainingDomain, domain_gaps
from vitviz.errors import VitvizError
from vitviz.models import LoadedModel, read_checkpoint_meta
from vitviz.ui import cached, catalog, exports, keys
from vitviz.ui.analyses import InputImage, pixels_digest
from vitviz.ui.catalog import ModelEntry

if TYPE_CHECKING:
    from matplotlib.figure import Figure  # figures are made only when their download is clicked

IMAGE_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"]
MAX_IMAGE_UPLOAD_MB = 50
ROW_HEIGHT = 35  # pixels per row of st.dataframe, to size small tables without a scroll bar
PLOTLY_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}
FIGURE_DPI = 150  # matplotlib figures on the page (their downloads have their own resolution)
FIGURE_MAX_PIXELS = 1460  # Streamlit resizes and re-encodes any image wider than this
FIGURE_FIT_PIXELS = 1400  # the figure's own width at most, leaving room for what a tight bounding box adds
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:=^&\"'])")
UPLOAD_SET = "my uploads"
PHOTOS_SET = "natural photos"


def plain(text: object) -> str:
    """Text that Markdown shows literally: every Markdown-active character is backslash-escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


def show_error(exc: BaseException | str, where: object = st) -> None:
    """A user's mistake as one readable line (never a traceback)."""
    where.error(plain(exc), icon=":material/error:")


def table(rows: Sequence[Mapping[str, object]] | object, **kwargs: object) -> None:
    """A read-only table tall enough for all its rows (small tables only)."""
    count = len(rows) if isinstance(rows, Sequence) else len(getattr(rows, "index", []))
    st.dataframe(rows, hide_index=True, width="stretch", height=ROW_HEIGHT * (count + 1) + 3, **kwargs)


def plotly(fig: object, *, key: str | None = None, height: int | None = None, stretch: bool = True) -> None:
    """Draw a plotly figure across the column (or at its own layout width with stretch=False), with a PNG
    export in its toolbar."""
    if height is not None:
        fig.update_layout(height=height)  # type: ignore[attr-defined]
    st.plotly_chart(fig, width="stretch" if stretch else "content", config=PLOTLY_CONFIG, key=key)


def pyplot(fig: Figure, *, dpi: int = FIGURE_DPI) -> None:
    """A matplotlib figure across the column, as a PNG that Streamlit sends as it is.

    `st.pyplot` saves at 200 dpi, so a 12-inch figure becomes 2400 px, which Streamlit then decodes, resizes to
    the page (1460 px) and encodes again. Here the figure is saved at a resolution that fits, with fast PNG
    compression: about 25% less CPU for /tokens' figures (docs/benchmarks.md, "Studio latency"). The bounding
    box stays tight, as st.pyplot's: a title wider than its axes is kept whole, not cut at the canvas.
    """
    buffer = io.BytesIO()
    dpi_fits = min(float(dpi), FIGURE_FIT_PIXELS / fig.get_figwidth())
    fig.savefig(buffer, format="png", dpi=dpi_fits, bbox_inches="tight", pil_kwargs={"compress_level": 1})
    st.image(buffer.getvalue(), width="stretch")


# --- model picker ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The model a page works on."""

    entry: ModelEntry
    loaded: LoadedModel


def _all_entries() -> list[ModelEntry]:
    discovered = catalog.discover_models(epochs=False)  # epoch checkpoints are listed under their run on /train
    extra: dict[str, ModelEntry] = st.session_state.setdefault(keys.EXTRA_MODELS, {})
    known = {entry.key for entry in discovered}
    return discovered + [entry for key, entry in extra.items() if key not in known]


def picker_entries() -> list[ModelEntry]:
    """Every model the sidebar's picker offers: the catalog's, then the ones added in this session (timm, Hub,
    uploads)."""
    return _all_entries()


def _remember(entry: ModelEntry) -> None:
    st.session_state.setdefault(keys.EXTRA_MODELS, {})[entry.key] = entry


def select_model(entry: ModelEntry) -> None:
    """Make `entry` the sidebar's selection (kept in the picker for this session if discovery does not list it)."""
    _remember(entry)
    st.session_state[keys.MODEL] = entry.key


def _adopt_url_model(entries: list[ModelEntry]) -> None:
    """On a session's first run, a model named in the URL becomes the selection (when it exists here)."""
    if st.session_state.get(keys.URL_ADOPTED):
        return
    st.session_state[keys.URL_ADOPTED] = True
    wanted = st.query_params.get(keys.QUERY_MODEL)
    if not wanted:
        return
    entry = catalog.resolve_key(wanted, entries)
    if entry is None:
        st.session_state[keys.MODEL_MESSAGE] = (
            "warning",
            f"The link names the model {wanted}, which is not available here; showing the default instead.",
        )
        return
    if entry.kind == catalog.HF and entry.key not in {e.key for e in entries}:
        # A Hub model is downloaded only when the user asks: a link alone never makes the server go online.
        st.session_state[keys.HUB_OFFER] = entry
        return
    if entry.key not in {e.key for e in entries}:
        _remember(entry)
        entries.append(entry)
    st.session_state[keys.MODEL] = entry.key


def _on_pick() -> None:
    st.session_state[keys.MODEL] = st.session_state[keys.MODEL_WIDGET]


def _on_timm() -> None:
    name = st.session_state.get("vv.add.timm", "")
    pretrained = bool(st.session_state.get("vv.add.pretrained", False))
    try:
        entry = catalog.named_entry(name, pretrained=pretrained)
    except VitvizError as exc:
        st.session_state[keys.MODEL_MESSAGE] = ("error", add_model_error(str(exc)))
        return
    _remember(entry)
    st.session_state["vv.model.previous"] = st.session_state.get(keys.MODEL)
    st.session_state[keys.MODEL] = entry.key


def _on_checkpoint_upload() -> None:
    upload = st.session_state.get("vv.add.upload")
    if upload is None:
        return
    data = upload.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = catalog.store_upload(data, digest)
    entry = catalog.upload_entry(digest[:16], upload.name)
    if entry is None:
        path.unlink(missing_ok=True)
        st.session_state[keys.MODEL_MESSAGE] = ("error", f"{upload.name} could not be kept on the server")
        return
    try:
        read_checkpoint_meta(path)  # the header alone: cheap, and catches most bad files at once
        load(entry)  # the full, shared load: a file that does not load is refused now, not kept
    except VitvizError as exc:
        path.unlink(missing_ok=True)
        # The user knows the file by the name they uploaded, not by the server's cache path.
        message = str(exc).replace(str(path), upload.name)
        st.session_state[keys.MODEL_MESSAGE] = ("error", f"{upload.name}: {message}")
        return
    _remember(entry)
    st.session_state["vv.model.previous"] = st.session_state.get(keys.MODEL)
    st.session_state[keys.MODEL] = entry.key


def _on_hub_offer() -> None:
    entry = st.session_state.pop(keys.HUB_OFFER, None)
    if entry is None:
        return
    _remember(entry)
    st.session_state["vv.model.previous"] = st.session_state.get(keys.MODEL)
    st.session_state[keys.MODEL] = entry.key


def _hub_offer() -> None:
    """The Hugging Face model a link names, with the button that downloads it (nothing is fetched before)."""
    entry = st.session_state.get(keys.HUB_OFFER)
    if entry is None:
        return
    st.info(plain(f"The link names the Hugging Face model {entry.hub_id}: it is downloaded only if you ask."))
    st.button(f"Download {entry.source}", key="vv.model.hub_offer.load", on_click=_on_hub_offer, width="stretch")


def _show_model_message() -> None:
    message = st.session_state.pop(keys.MODEL_MESSAGE, None)
    if message is None:
        return
    kind, text = message
    (st.error if kind == "error" else st.warning)(plain(text))


def load(entry: ModelEntry) -> LoadedModel:
    """The shared in-memory model of an entry (loaded once per content hash, for every session)."""
    content_hash = cached.file_digest(entry.path) if entry.path is not None else entry.key
    return cached.shared_model(entry.source, content_hash, entry.pretrained)


def model_sidebar() -> Selection:
    """The model picker in the sidebar; returns the selected, loaded model or stops the page with a message."""
    entries = _all_entries()
    _adopt_url_model(entries)
    by_key = {entry.key: entry for entry in entries}
    current = st.session_state.get(keys.MODEL)
    if current not in by_key:
        current = catalog.default_model_key(entries)
    with st.sidebar:
        st.markdown("**Model**")
        if current is None:
            st.info("No checkpoints found. Train one on the Train page, or add a timm model or a checkpoint below.")
            _add_model_controls()
            st.stop()
        st.session_state[keys.MODEL_WIDGET] = current
        st.selectbox(
            "Model",
            list(by_key),
            key=keys.MODEL_WIDGET,
            format_func=lambda key: by_key[key].label if key in by_key else key,
            on_change=_on_pick,
            label_visibility="collapsed",
            help="Bundled checkpoints, training runs, and models added below. The choice is kept in the URL.",
        )
        _show_model_message()
        _hub_offer()
        summary_slot = st.empty()
        _add_model_controls()
    st.session_state[keys.MODEL] = current
    st.query_params[keys.QUERY_MODEL] = current
    entry = by_key[current]
    loaded = _load_or_explain(entry)
    summary_slot.caption(model_line(loaded))
    return Selection(entry=entry, loaded=loaded)


def _load_or_explain(entry: ModelEntry) -> LoadedModel:
    try:
        with st.spinner("Loading the model…"):
            return load(entry)
    except VitvizError as exc:
        extra = st.session_state.setdefault(keys.EXTRA_MODELS, {})
        if entry.key in extra:
            # A model added in this session that does not load: forget it and go back to the previous one.
            del extra[entry.key]
            st.session_state[keys.MODEL] = st.session_state.pop("vv.model.previous", None)
            st.session_state[keys.MODEL_MESSAGE] = ("error", add_model_error(str(exc)))
            st.rerun()
        show_error(exc)
        st.info("Choose another model in the sidebar.")
        st.stop()
    raise AssertionError("unreachable")


def _add_model_controls() -> None:
    # A keyed expander keeps its open state in the session, so the error line above it does not fold it; the
    # form makes Enter in the name box load the model.
    with st.expander("Add a model", key=keys.ADD_MODEL_OPEN, on_change="rerun"):
        with st.form("vv.add.form", border=False):
            st.text_input(
                "timm or Hugging Face model",
                key="vv.add.timm",
                placeholder="vit_tiny_patch16_224",
                help="A timm architecture, as vit_tiny_patch16_224 or timm:vit_tiny_patch16_224, or a Hugging Face "
                "model as hf:google/vit-base-patch16-224 (downloaded once, needs the network).",
            )
            st.checkbox(
                "Pretrained weights (needs the network)",
                key="vv.add.pretrained",
                help="Without it the architecture gets a seeded random initialisation, which works offline.",
            )
            st.form_submit_button("Load model", on_click=_on_timm, width="stretch")
        st.file_uploader(
            "Checkpoint (.safetensors)",
            type=["safetensors"],
            key="vv.add.upload",
            on_change=_on_checkpoint_upload,
            help="A vitviz checkpoint. Other formats are refused: they could run code when loaded.",
        )


_CLI_WEIGHTS = re.compile(r"[;,]?\s*download them elsewhere and pass --weights FILE")
_EXCEPTION_NAME = re.compile(r":\s*[A-Za-z_.]*(?:Error|Exception|Timeout)\b")
STUDIO_WEIGHTS_ADVICE = (
    ". Untick pretrained weights to load the architecture with random weights (works offline), or add a "
    "vitviz checkpoint (.safetensors) below"
)


def add_model_error(text: str) -> str:
    """The one line the add-model box shows for a model that does not load: no exception class names, and
    what the studio can do instead of the command line's --weights option."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "the model could not be loaded")
    line = _EXCEPTION_NAME.sub("", line)
    if _CLI_WEIGHTS.search(line):
        line = _CLI_WEIGHTS.sub("", line).rstrip(" .;,") + STUDIO_WEIGHTS_ADVICE
    line = line.rstrip(" .")
    return line if line.endswith(("?", "!")) else line + "."


def model_key(name: str, loaded: LoadedModel) -> str:
    """The key of a widget whose options or default depend on the model (classes, layers, heads, the patch grid).

    The key carries the model's content hash, so a model switch starts the widget afresh from the new model's
    default (its predicted class, its depth) instead of keeping a choice that meant something for the old one."""
    return f"{name}.{loaded.content_hash[:12]}"


def model_line(loaded: LoadedModel) -> str:
    """One line of numbers describing a model (no user text in it)."""
    card = cached.model_card(loaded.source, loaded.content_hash, loaded)
    return (
        f"{card.depth} layers × {card.num_heads} heads, width {card.embed_dim} · "
        f"{card.grid[0]}×{card.grid[1]} tokens of {card.stride[0]}×{card.stride[1]} px"
        f" + {card.num_prefix_tokens} prefix · {card.parameters / 1e6:.2f} M parameters"
    )


def prediction_context(loaded: LoadedModel, image: InputImage, where: object = st) -> None:
    """Beside a prediction: what the model was trained on, and a warning when the image is far from it."""
    domain = TrainingDomain.from_card(cached.model_card(loaded.source, loaded.content_hash, loaded))
    where.caption(plain(domain.describe()))
    gaps = domain_gaps(image.pixels, domain)
    if gaps:
        where.warning(
            plain(
                f"This image is far from what the model was trained on: {'; '.join(gaps)}. The prediction and its "
                "maps say little about the image. For photos, add a model trained on photos under Add a model in "
                "the sidebar: a timm name such as vit_base_patch16_224 with pretrained weights, or "
                "hf:google/vit-base-patch16-224."
            ),
            icon=":material/warning:",
        )


def model_choices(label: str, *, key: str, default: Sequence[str], help: str | None = None) -> list[ModelEntry]:
    """A multiselect over every model the picker offers (for /compare); returns the chosen entries."""
    entries = _all_entries()
    by_key = {entry.key: entry for entry in entries}
    chosen = st.multiselect(
        label,
        list(by_key),
        default=[k for k in default if k in by_key],
        key=key,
        format_func=lambda k: by_key[k].label if k in by_key else k,
        help=help,
    )
    return [by_key[k] for k in chosen if k in by_key]


# --- images ----------------------------------------------------------------------------------------


def uploaded_images(label: str, *, key: str, help: str | None = None, folder: bool = False) -> list[InputImage]:
    """An uploader for one or more images (with folder=True: every image of a chosen folder); unreadable files
    are reported one by one and left out."""
    files = (
        st.file_uploader(
            label,
            type=IMAGE_TYPES,
            accept_multiple_files="directory" if folder else True,
            key=key,
            help=help,
            max_upload_size=MAX_IMAGE_UPLOAD_MB,
        )
        or []
    )
    images = []
    for upload in files:
        try:
            digest, pixels = cached.decoded_upload(upload.getvalue(), upload.name)
        except VitvizError as exc:
            show_error(exc)
            continue
        images.append(InputImage(name=upload.name, digest=digest, pixels=pixels))
    return images


def sample_sets() -> dict[str, list[Callable[[], InputImage]]]:
    """Sample image sets by name: assets/samples' folders, then the natural photos; images load lazily."""
    sets: dict[str, list[Callable[[], InputImage]]] = {}
    for sample_set in catalog.discover_sample_sets():
        sets[sample_set.name] = [_file_loader(path) for path in sample_set.files]
    photos = cached.natural_photos()
    if photos:
        sets[PHOTOS_SET] = [_photo_loader(name, pixels) for name, pixels in photos]
    return sets


def sample_names() -> list[tuple[str, str]]:
    """(set name, image name) of every sample image, for pickers."""
    names = []
    for sample_set in catalog.discover_sample_sets():
        names += [(sample_set.name, path.name) for path in sample_set.files]
    names += [(PHOTOS_SET, name) for name, _ in cached.natural_photos()]
    return names


def sample_image(set_name: str, image_name: str) -> InputImage:
    """One sample image by set and file name."""
    if set_name == PHOTOS_SET:
        for name, pixels in cached.natural_photos():
            if name == image_name:
                return _photo_loader(name, pixels)()
    for sample_set in catalog.discover_sample_sets():
        if sample_set.name == set_name:
            for path in sample_set.files:
                if path.name == image_name:
                    return _file_loader(path)()
    raise VitvizError(f"sample image {set_name}/{image_name} is not available")


def _file_loader(path: Path) -> Callable[[], InputImage]:
    def load_file() -> InputImage:
        return InputImage(name=path.name, digest=cached.file_digest(path), pixels=cached.decoded_file(path))

    return load_file


def _photo_loader(name: str, pixels: np.ndarray) -> Callable[[], InputImage]:
    def load_photo() -> InputImage:
        return InputImage(name=name, digest=pixels_digest(pixels), pixels=pixels)

    return load_photo


def image_picker(*, key: str) -> tuple[list[InputImage], bool]:
    """Uploaded images when there are any, else one chosen sample; returns (images, from_uploads)."""
    upload_col, sample_col = st.columns([3, 2])
    with upload_col:
        uploads = uploaded_images(
            "Upload images",
            key=f"{key}.upload",
            help="PNG, JPEG, WebP, BMP, GIF (first frame) or TIFF; EXIF orientation is applied.",
        )
    names = sample_names()
    with sample_col:
        if uploads:
            st.caption("Showing your uploads. Remove them to pick a sample instead.")
            return uploads, True
        if not names:
            st.info("No sample images are installed; upload an image.")
            return [], False
        choice = st.selectbox(
            "…or pick a sample",
            names,
            key=f"{key}.sample",
            format_func=lambda pair: f"{pair[0]} / {pair[1]}",
        )
    try:
        return [sample_image(*choice)], False
    except VitvizError as exc:
        show_error(exc)
        return [], False


def dataset_picker(*, key: str, default_count: int = 32) -> list[InputImage]:
    """A dataset (a sample set or the user's uploads) and how many of its images to use."""
    sets = sample_sets()
    names = [*sets, UPLOAD_SET]
    set_col, count_col = st.columns([2, 3])
    with set_col:
        chosen = st.selectbox("Images", names, key=f"{key}.set")
    if chosen == UPLOAD_SET:
        with count_col:
            folder = st.toggle(
                "A whole folder",
                key=f"{key}.folder",
                help="Pick a folder and every image in it is uploaded; otherwise select one or more files.",
            )
        if folder:
            uploads = uploaded_images("Upload a folder of images", key=f"{key}.upload.folder", folder=True)
        else:
            uploads = uploaded_images(
                "Upload images", key=f"{key}.upload", help="Select several files at once (Ctrl/Shift-click)."
            )
        if not uploads:
            st.info("Upload one or more images, or a whole folder, to analyse them.")
        return uploads
    loaders = sets[chosen]
    with count_col:
        if len(loaders) > 1:
            count = st.slider("Number of images", 1, len(loaders), min(len(loaders), default_count), key=f"{key}.count")
        else:
            count = 1
            st.caption("This set has one image.")
    images = []
    for load_image in loaders[:count]:
        try:
            images.append(load_image())
        except VitvizError as exc:
            show_error(exc)
    return images


# --- downloads -------------------------------------------------------------------------------------


def downloads(
    stem: str,
    *,
    figures: Mapping[str, Callable[[], Figure]] | None = None,
    numbers: Mapping[str, Callable[[], bytes]] | None = None,
    key: str,
) -> None:
    """A row of download buttons: each figure as PNG and SVG, and the numbers (name ends in .csv/.npz/.json).

    Files are produced only when a button is clicked (deferred), so drawing the page stays fast.
    """
    buttons: list[tuple[str, Callable[[], bytes], str, str]] = []
    for name, make in (figures or {}).items():
        for fmt in ("png", "svg"):
            buttons.append((f"{name}.{fmt}", _figure_maker(make, fmt), exports.MIME[fmt], fmt.upper()))
    for name, make in (numbers or {}).items():
        fmt = name.rsplit(".", 1)[-1]
        buttons.append((name, make, exports.MIME.get(fmt, "application/octet-stream"), fmt.upper()))
    if not buttons:
        return
    with st.container(horizontal=True, wrap=True, gap="small", vertical_alignment="center"):
        st.caption("Download", width="content")
        for index, (name, make, mime, _kind) in enumerate(buttons):
            st.download_button(
                name,
                data=make,
                file_name=f"{exports.safe_stem(stem)}-{name}",
                mime=mime,
                key=f"{key}.dl.{index}",
                on_click="ignore",
                icon=":material/download:",
                width="content",
            )


def _figure_maker(make: Callable[[], Figure], fmt: str) -> Callable[[], bytes]:
    def render() -> bytes:
        return exports.figure_bytes(make(), fmt)

    return render


def figure_picker_downloads(
    stem: str,
    *,
    figures: Mapping[str, Callable[[], Figure]],
    numbers: Mapping[str, Callable[[], bytes]] | None = None,
    key: str,
) -> None:
    """Downloads for pages with many figures: pick one figure, then PNG or SVG; plus the numbers."""
    if not figures and not numbers:
        return
    with st.container(horizontal=True, wrap=True, gap="small", vertical_alignment="bottom"):
        names = list(figures)
        if names:
            name = st.selectbox("Download a figure", names, key=f"{key}.figure", width=260)
            for fmt in ("png", "svg"):
                st.download_button(
                    fmt.upper(),
                    data=_figure_maker(figures[name], fmt),
                    file_name=f"{exports.safe_stem(stem)}-{exports.safe_stem(name)}.{fmt}",
                    mime=exports.MIME[fmt],
                    key=f"{key}.dl.{fmt}",
                    on_click="ignore",
                    icon=":material/download:",
                )
        for file_name, make in (numbers or {}).items():
            fmt = file_name.rsplit(".", 1)[-1]
            st.download_button(
                file_name,
                data=make,
                file_name=f"{exports.safe_stem(stem)}-{file_name}",
                mime=exports.MIME.get(fmt, "application/octet-stream"),
                key=f"{key}.dl.{file_name}",
                on_click="ignore",
                icon=":material/download:",
            )
