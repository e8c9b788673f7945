"""The project's one image loader: safe decoding of untrusted files and preprocessing for a model.

Decoding (`decode_image`) treats every input as hostile: only a fixed list of raster formats is
opened (never EPS, which would start Ghostscript), the pixel count declared in the header is checked
against `MAX_PIXELS` before any pixel is decoded, truncated files are errors rather than silently
padded, and every failure becomes one `VitvizError` line naming the file.

Preprocessing (`preprocess`) follows docs/design.md (preprocessing): EXIF orientation,
transparency composited on neutral grey, the model's channels (RGB or L), a direct bicubic resize to
the input size (no crop, so the whole image is explained; skipped when the size already matches),
scaling to [0, 1], then normalisation with the model's mean and std.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError

from vitviz.errors import VitvizError, quoted
from vitviz.fileio import file_kind

logger = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000
"""Images declaring more pixels than this (width x height, from the header) are refused undecoded.

40 MP covers every phone and most camera photos while capping the decoded RGB buffer near 120 MB.
PIL refuses anything above twice its own `Image.MAX_IMAGE_PIXELS` regardless, so a larger
`max_pixels` argument cannot go past that.
"""

GREY_BACKGROUND = (128, 128, 128)
"""Transparent pixels are composited on this neutral grey, which sits near the dataset mean."""

# Raster formats a person is likely to upload. The explicit list keeps PIL from handing hostile
# bytes to plugins that run external programs (EPS -> Ghostscript) or rarely see fuzzing.
ALLOWED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "GIF", "TIFF", "AVIF")
_FORMAT_NAMES = "PNG, JPEG, WebP, BMP, GIF or TIFF"

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO


def decode_image(
    data: ImageSource,
    *,
    max_pixels: int = MAX_PIXELS,
    mode: Literal["RGB", "L"] = "RGB",
    name: str | None = None,
) -> Image.Image:
    """Decode an untrusted image file into an upright, opaque RGB (or grey) picture.

    Only the first frame of animated GIF/WebP/PNG and multi-page TIFF is used. 16-bit grey is
    scaled to 8 bits (value / 257) rather than clipped; transparency is composited on grey.

    Args:
        data: the file's bytes, a path, or a binary file object (e.g. a Streamlit upload).
        max_pixels: refuse images whose header declares more pixels than this, before decoding.
        mode: "RGB" (default) or "L" for grey.
        name: how to call the image in error messages; defaults to the file name.

    Raises:
        VitvizError: the file is missing, empty, not a supported image, too large or damaged.
    """
    label = name or _label(data)
    with _open_binary(data, label) as fp:
        head = fp.read(512)
        if not head:
            raise VitvizError(f"could not read image {quoted(label)}: the file is empty")
        fp.seek(0)
        try:
            # PIL signals oversized images with a warning first: make it an error, only here. Its other
            # warnings (corrupt EXIF, odd TIFF tags) are not fatal and go to the debug log.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(fp, formats=_allowed_formats()) as img:
                    _check_pixel_count(img.size, max_pixels, label)
                    img.load()  # decodes the current (first) frame only
                    upright = ImageOps.exif_transpose(img)
                flat = _flatten(upright)
            for warning in caught:
                logger.debug("%s: %s", label, warning.message)
        except VitvizError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise VitvizError(
                f"could not read image {quoted(label)}: it declares more pixels than the {max_pixels:,} pixel "
                "limit (a decompression bomb or a very large scan); downscale it first"
            ) from None
        except UnidentifiedImageError:
            raise VitvizError(f"could not read image {quoted(label)}: {_describe_unreadable(head)}") from None
        except Exception as exc:
            logger.debug("decoding %s failed", label, exc_info=True)
            raise VitvizError(
                f"could not read image {quoted(label)}: the file is damaged or truncated ({_one_line(exc)})"
            ) from None
    return flat if flat.mode == mode else flat.convert(mode)


def to_model_channels(img: Image.Image, in_chans: int) -> Image.Image:
    """Return `img` with the model's channels: "RGB" for 3, "L" for 1 (any PIL mode accepted)."""
    if in_chans not in (1, 3):
        raise VitvizError(
            f"the model takes {in_chans} input channels; images can only be fed to 1-channel (grey) "
            "or 3-channel (RGB) models"
        )
    if img.mode not in ("RGB", "L"):
        img = _flatten(img)
    target = "L" if in_chans == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def preprocess(
    img: Image.Image,
    *,
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    in_chans: int,
) -> torch.Tensor:
    """Turn a decoded image into the model's input, shaped [C, H, W] float32.

    Args:
        img: a PIL image, e.g. from `decode_image`.
        input_size: (H, W) the model takes.
        mean, std: per-channel normalisation; one value is used for every channel, and a grey
            model given RGB statistics uses their average.
        in_chans: 1 or 3.
    """
    height, width = input_size
    img = to_model_channels(img, in_chans)
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BICUBIC)
    x = TF.to_tensor(img)  # (C, H, W) in [0, 1]
    return TF.normalize(x, _channel_stats(mean, in_chans, "mean"), _channel_stats(std, in_chans, "std"))


def load_for_model(
    data: ImageSource,
    *,
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    in_chans: int,
    max_pixels: int = MAX_PIXELS,
    name: str | None = None,
) -> torch.Tensor:
    """Decode an untrusted image file and preprocess it for a model: [C, H, W] float32."""
    img = decode_image(data, max_pixels=max_pixels, name=name)
    return preprocess(img, input_size=input_size, mean=mean, std=std, in_chans=in_chans)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo `preprocess`'s normalisation: [C, H, W] (or [1, C, H, W]) back to [0, 1], clamped."""
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3:
        raise ValueError(f"expected an image tensor [C, H, W], got shape {tuple(x.shape)}")
    channels = x.shape[0]
    mean_t = torch.tensor(_channel_stats(mean, channels, "mean"), dtype=x.dtype, device=x.device)
    std_t = torch.tensor(_channel_stats(std, channels, "std"), dtype=x.dtype, device=x.device)
    return (x * std_t[:, None, None] + mean_t[:, None, None]).clamp(0.0, 1.0)


def to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A preprocessed tensor as a uint8 H x W x 3 picture for overlays (grey repeated to RGB)."""
    rgb = denormalize(x.detach().float().cpu(), mean, std)
    if rgb.shape[0] == 1:
        rgb = rgb.expand(3, -1, -1)
    return (rgb.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def sample_images() -> list[tuple[str, Image.Image]]:
    """Natural photos that ship with the installed dependencies, for trying the app offline.

    scikit-learn's china.jpg and flower.jpg and matplotlib's grace_hopper.jpg; the ones not
    installed are skipped.
    """
    candidates: list[Path] = []
    sklearn_spec = importlib.util.find_spec("sklearn")  # locate without importing scikit-learn
    if sklearn_spec is not None and sklearn_spec.origin is not None:
        images_dir = Path(sklearn_spec.origin).parent / "datasets" / "images"
        candidates += [images_dir / "china.jpg", images_dir / "flower.jpg"]
    try:
        import matplotlib

        candidates.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    except ImportError:
        pass
    samples = []
    for path in candidates:
        if path.is_file():
            samples.append((path.name, decode_image(path)))
        else:
            logger.debug("sample image %s not installed", path)
    return samples


def _allowed_formats() -> list[str]:
    Image.init()  # registers the plugins so that availability (e.g. AVIF) is known
    return [fmt for fmt in ALLOWED_FORMATS if fmt in Image.OPEN]


def _label(data: ImageSource) -> str:
    if isinstance(data, (str, os.PathLike)):
        return Path(data).name or str(data)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return Path(str(getattr(data, "name", "<stream>"))).name


@contextlib.contextmanager
def _open_binary(data: ImageSource, label: str) -> Iterator[BinaryIO]:
    """A seekable binary file for any `ImageSource`; a file we opened is closed afterwards."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield io.BytesIO(bytes(data))
        return
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = None  # open() below says what is wrong
        if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # never open a FIFO or a device
            raise VitvizError(f"could not read image {quoted(label)}: it is {file_kind(mode)}, not a file")
        try:
            fp = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise VitvizError(f"could not read image {quoted(label)}: no such file ({path})") from None
        except IsADirectoryError:
            raise VitvizError(f"could not read image {quoted(label)}: it is a folder, not a file") from None
        except OSError as exc:
            raise VitvizError(f"could not read image {quoted(label)}: {exc.strerror or exc}") from None
        with fp:
            yield fp
        return
    if not hasattr(data, "read"):
        raise TypeError(f"expected bytes, a path or a binary file, got {type(data).__name__}")
    try:
        data.seek(0)
    except (AttributeError, OSError, io.UnsupportedOperation):
        data = io.BytesIO(data.read())  # a pipe or socket: PIL needs to seek
    yield data


def _check_pixel_count(size: tuple[int, int], max_pixels: int, label: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise VitvizError(f"could not read image {quoted(label)}: it declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise VitvizError(
            f"could not read image {quoted(label)}: {width}x{height} is {width * height:,} pixels, more than the "
            f"{max_pixels:,} pixel limit (a decompression bomb or a very large scan); downscale it first"
        )


def _describe_unreadable(head: bytes) -> str:
    """Say what a file PIL cannot open is, when its first bytes tell us, so the user knows what to do."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"%pdf"):
        return "it is a PDF document, not a picture; export the page as PNG or JPEG first"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "it is an SVG (vector) drawing; export it as PNG first"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftyphevc"):
        return f"HEIC/HEIF photos are not supported; convert it to JPEG first (supported: {_FORMAT_NAMES})"
    return f"it is not a {_FORMAT_NAMES} image"


def _flatten(img: Image.Image) -> Image.Image:
    """Any PIL mode to opaque 8-bit "RGB" or "L": 16-bit scaled, palettes expanded, alpha on grey."""
    if img.mode in _HIGH_DEPTH_MODES:
        img = _high_depth_to_grey(img)
    if img.has_transparency_data:
        background = Image.new("RGBA", img.size, (*GREY_BACKGROUND, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    if img.mode in ("RGB", "L"):
        return img
    if img.mode == "1":
        return img.convert("L")
    if img.mode == "P":
        return img.convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, RGBX, LAB, HSV ...


def _high_depth_to_grey(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey to 8-bit "L" (or "LA" when a transparent value is set).

    16-bit data spans 0..65535, so it is divided by 257 (65535 -> 255); PIL's own conversion clips
    everything above 255 to white. 32-bit integers outside 0..65535 and floats outside 0..1 are
    scaled by their own minimum and maximum.
    """
    values = np.asarray(img)
    data = values.astype(np.float64)
    if img.mode == "F":
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = (0.0, 1.0) if data.size and data.min() >= 0.0 and data.max() <= 1.0 else _range(data)
    elif img.mode == "I" and data.size and (data.min() < 0 or data.max() > 65535):
        low, high = _range(data)
    else:
        low, high = 0.0, 65535.0
    scaled = np.rint((data - low) / max(high - low, 1e-12) * 255.0).clip(0, 255).astype(np.uint8)
    grey = Image.fromarray(scaled)
    transparent_value = img.info.get("transparency")
    if isinstance(transparent_value, int):
        alpha = Image.fromarray(np.where(values == transparent_value, 0, 255).astype(np.uint8))
        grey = Image.merge("LA", (grey, alpha))
    return grey


def _range(data: np.ndarray) -> tuple[float, float]:
    return (float(data.min()), float(data.max())) if data.size else (0.0, 1.0)


def _channel_stats(values: Sequence[float], channels: int, what: str) -> list[float]:
    stats = [float(v) for v in values]
    if len(stats) == 1:
        stats = stats * channels
    elif len(stats) == 3 and channels == 1:
        stats = [sum(stats) / 3.0]  # timm keeps RGB statistics for grey models
    if len(stats) != channels:
        raise ValueError(f"{what} has {len(stats)} values for a {channels}-channel image")
    if what == "std" and any(s <= 0 for s in stats):
        raise ValueError(f"std must be positive, got {stats}")
    return stats


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
