"""Image decoding and preprocessing: every case is generated here with PIL, nothing is downloaded."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from vitviz.errors import VitvizError
from vitviz.images import (
    GREY_BACKGROUND,
    MAX_PIXELS,
    decode_image,
    load_for_model,
    preprocess,
    sample_images,
    to_display,
    to_model_channels,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def asymmetric_pattern(height: int = 3, width: int = 5) -> np.ndarray:
    """Every pixel distinct, so any flip or rotation changes the array."""
    values = np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3) * 5
    return values


def expect_error(data: object, *fragments: str, **kwargs: object) -> str:
    with pytest.raises(VitvizError) as info:
        decode_image(data, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("could not read image '"), message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- orientation, channels, depth -----------------------------------------------------------------

# What a viewer must do to the stored pixels for each EXIF orientation (TIFF/EXIF spec, tag 0x0112).
EXPECTED_ORIENTATION = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirror left-right
    3: lambda a: a[::-1, ::-1],  # rotate 180
    4: lambda a: a[::-1, :],  # mirror top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirror along the main diagonal
    6: lambda a: np.rot90(a, k=-1),  # rotate 90 clockwise
    7: lambda a: np.rot90(a, k=2).transpose(1, 0, 2),  # mirror along the anti-diagonal
    8: lambda a: np.rot90(a, k=1),  # rotate 90 counter-clockwise
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_pixel_by_pixel(orientation: int) -> None:
    stored = asymmetric_pattern()
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "PNG", exif=exif)
    decoded = np.asarray(decode_image(data))
    np.testing.assert_array_equal(decoded, EXPECTED_ORIENTATION[orientation](stored))


def test_16_bit_grey_is_scaled_not_saturated() -> None:
    values = np.array([[0, 257, 1000, 32896, 50000, 65535]], dtype=np.uint16)
    for fmt in ("PNG", "TIFF"):
        decoded = np.asarray(decode_image(encode(Image.fromarray(values), fmt), mode="L"))
        np.testing.assert_array_equal(decoded, np.rint(values / 257.0).astype(np.uint8))
    rgb = np.asarray(decode_image(encode(Image.fromarray(values), "PNG")))
    assert rgb.shape == (1, 6, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[0, 3, 0] == 128  # mid-grey stays mid-grey


def test_transparent_pixels_become_neutral_grey() -> None:
    grey = np.array(GREY_BACKGROUND, dtype=np.uint8)

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent
    rgba[0, 1] = (10, 20, 30, 255)  # opaque
    rgba[1, :] = (255, 255, 255, 128)  # half transparent white over grey
    out = np.asarray(decode_image(encode(Image.fromarray(rgba), "PNG")))
    np.testing.assert_array_equal(out[0, 0], grey)
    np.testing.assert_array_equal(out[0, 1], (10, 20, 30))
    half = 255 * 128 / 255 + 128 * (1 - 128 / 255)
    assert np.abs(out[1].astype(float) - half).max() <= 1

    la = Image.merge("LA", (Image.new("L", (2, 1), 200), Image.fromarray(np.array([[0, 255]], np.uint8))))
    out = np.asarray(decode_image(encode(la, "PNG")))
    np.testing.assert_array_equal(out[0, 0], grey)
    np.testing.assert_array_equal(out[0, 1], (200, 200, 200))

    # Palette image whose entry 0 is transparent (PNG tRNS), as GIF and PNG both write it.
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    for fmt in ("PNG", "GIF"):
        out = np.asarray(decode_image(encode(palette, fmt, transparency=0)))
        np.testing.assert_array_equal(out[0, 0], grey, err_msg=fmt)
        np.testing.assert_array_equal(out[0, 1], (0, 0, 255), err_msg=fmt)


def test_transparent_pixel_is_normalised_grey_in_the_model_input() -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)  # entirely transparent
    x = load_for_model(encode(Image.fromarray(rgba), "PNG"), input_size=(4, 4), mean=MEAN, std=STD, in_chans=3)
    expected = (128 / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(x[:, 2, 1].numpy(), expected, atol=1e-6)


def test_cmyk_is_converted_to_rgb() -> None:
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [0, 255, 255, 0]]], np.uint8)
    out = np.asarray(decode_image(encode(Image.fromarray(cmyk, mode="CMYK"), "TIFF")))
    np.testing.assert_array_equal(out[0], [(255, 255, 255), (0, 255, 255), (0, 0, 0), (255, 0, 0)])


def test_one_bit_image_becomes_black_and_white() -> None:
    bits = Image.fromarray(np.array([[0, 255, 0], [255, 0, 255]], np.uint8)).convert("1")
    out = np.asarray(decode_image(encode(bits, "PNG")))
    np.testing.assert_array_equal(out[..., 0], [[0, 255, 0], [255, 0, 255]])
    np.testing.assert_array_equal(np.asarray(decode_image(encode(bits, "BMP"), mode="L")), out[..., 0])


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_give_their_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 3  # really animated
    out = np.asarray(decode_image(data))
    assert out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out.reshape(-1, 3), np.tile([255, 0, 0], (48, 1)))


@pytest.mark.parametrize("size", [(1, 1), (1, 65535), (65535, 1)])
def test_extreme_aspect_images_decode_and_resize(size: tuple[int, int]) -> None:
    img = Image.new("RGB", size, (255, 128, 0))
    x = load_for_model(encode(img, "PNG"), input_size=(16, 24), mean=MEAN, std=STD, in_chans=3)
    assert x.shape == (3, 16, 24) and torch.isfinite(x).all()
    expected = (np.array([255, 128, 0]) / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(x.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)


def test_common_formats_decode_to_the_same_picture() -> None:
    pattern = asymmetric_pattern(6, 7)
    for fmt in ("PNG", "BMP", "TIFF", "WEBP"):
        extra = {"lossless": True} if fmt == "WEBP" else {}
        np.testing.assert_array_equal(np.asarray(decode_image(encode(Image.fromarray(pattern), fmt, **extra))), pattern)
    jpeg = np.asarray(decode_image(encode(Image.new("RGB", (16, 16), (200, 40, 90)), "JPEG", quality=95)))
    assert np.abs(jpeg.astype(int) - (200, 40, 90)).max() <= 3


def test_paths_and_file_objects_are_accepted(tmp_path: Path) -> None:
    pattern = asymmetric_pattern()
    path = tmp_path / "photo.png"
    path.write_bytes(encode(Image.fromarray(pattern), "PNG"))
    np.testing.assert_array_equal(np.asarray(decode_image(path)), pattern)
    np.testing.assert_array_equal(np.asarray(decode_image(str(path))), pattern)
    with open(path, "rb") as fp:
        np.testing.assert_array_equal(np.asarray(decode_image(fp)), pattern)


# --- hostile input --------------------------------------------------------------------------------


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR is patched to claim another size, with a correct CRC."""
    data = bytearray(encode(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 10_000), (7_000, 7_000)])
def test_decompression_bombs_are_refused_before_decoding(
    size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert size[0] * size[1] > MAX_PIXELS

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's bomb warning must not escape either
        message = expect_error(png_claiming_size(*size), "pixel limit")
    assert "decoded" not in message


def test_pixel_limit_is_configurable() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    expect_error(data, "10,000 pixels", max_pixels=9_999)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)


def test_hostile_files_raise_one_clear_line(tmp_path: Path) -> None:
    expect_error(b"", "empty")
    expect_error(np.random.default_rng(0).bytes(4096), "not a PNG, JPEG")

    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n" * 20)
    expect_error(text, "'notes.png'", "not a PNG, JPEG")

    svg = tmp_path / "logo.png"
    svg.write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    expect_error(svg, "'logo.png'", "SVG")
    expect_error(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "PDF")

    expect_error(tmp_path / "missing.jpg", "'missing.jpg'", "no such file")
    expect_error(tmp_path, "folder")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_jpeg_is_an_error_not_padded(fraction: float) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=90)
    expect_error(data[: int(len(data) * fraction)], name="cut.jpg")


def test_truncated_png_is_an_error() -> None:
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    expect_error(data[: len(data) // 2], "damaged or truncated")


def _valid_seeds() -> list[bytes]:
    pattern = Image.fromarray(asymmetric_pattern(9, 11))
    return [encode(pattern, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]


SEEDS = _valid_seeds()


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=4096))
    data = bytearray(draw(st.sampled_from(SEEDS)))  # a real file, then damaged: reaches the decoders
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile_bytes())
def test_any_bytes_give_a_tensor_or_a_vitviz_error(data: bytes) -> None:
    try:
        x = load_for_model(data, input_size=(8, 8), mean=MEAN, std=STD, in_chans=3, max_pixels=1_000_000)
    except VitvizError as exc:
        assert "\n" not in str(exc)
        return
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()


# --- preprocessing --------------------------------------------------------------------------------


def reference_preprocess(img: Image.Image, input_size: tuple[int, int], mean, std, grey: bool) -> np.ndarray:
    """docs/design.md: channels, direct bicubic resize (no crop), [0, 1], normalise. Shaped [C, H, W]."""
    img = img.convert("L" if grey else "RGB").resize((input_size[1], input_size[0]), Image.Resampling.BICUBIC)
    pixels = np.asarray(img, dtype=np.float64) / 255.0
    if grey:
        pixels = pixels[:, :, None]
    return ((pixels - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


def test_preprocess_matches_the_hand_reference() -> None:
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (37, 50, 3), dtype=np.uint8))
    x = preprocess(img, input_size=(24, 32), mean=MEAN, std=STD, in_chans=3)
    assert x.dtype == torch.float32 and x.shape == (3, 24, 32)
    np.testing.assert_allclose(x.numpy(), reference_preprocess(img, (24, 32), MEAN, STD, False), atol=1e-5)

    grey = preprocess(img, input_size=(20, 12), mean=(0.5,), std=(0.25,), in_chans=1)
    assert grey.shape == (1, 20, 12)
    np.testing.assert_allclose(grey.numpy(), reference_preprocess(img, (20, 12), (0.5,), (0.25,), True), atol=1e-5)


def test_image_at_input_size_is_only_normalised() -> None:
    pixels = np.random.default_rng(4).integers(0, 256, (24, 40, 3), dtype=np.uint8)  # sharp, non-square
    x = preprocess(Image.fromarray(pixels), input_size=(24, 40), mean=MEAN, std=STD, in_chans=3)
    expected = ((pixels / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-5)
    # The same picture at the transposed size must be resampled (no crop): no pixel survives as is.
    turned = preprocess(Image.fromarray(pixels), input_size=(40, 24), mean=MEAN, std=STD, in_chans=3)
    assert turned.shape == (3, 40, 24)


def test_to_display_inverts_preprocess() -> None:
    pixels = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    x = preprocess(Image.fromarray(pixels), input_size=(16, 16), mean=MEAN, std=STD, in_chans=3)
    shown = to_display(x, MEAN, STD)
    assert shown.dtype == np.uint8 and shown.shape == (16, 16, 3)
    assert np.abs(shown.astype(int) - pixels).max() <= 1
    grey = to_display(x[:1], (0.485,), (0.229,))
    assert grey.shape == (16, 16, 3) and (grey[..., 0] == grey[..., 2]).all()


def test_model_channels() -> None:
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_model_channels(rgba, 3).getpixel((0, 0)) == GREY_BACKGROUND
    assert to_model_channels(Image.new("RGB", (2, 2), (255, 255, 255)), 1).mode == "L"
    with pytest.raises(VitvizError, match="4 input channels"):
        to_model_channels(rgba, 4)


def test_sample_images_are_natural_photos() -> None:
    samples = sample_images()
    assert samples, "scikit-learn and matplotlib ship sample photos"
    for name, img in samples:
        assert name.endswith(".jpg") and img.mode == "RGB" and min(img.size) >= 200
        assert np.asarray(img).std() > 20  # a photo, not a flat placeholder
