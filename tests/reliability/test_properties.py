"""Property tests (hypothesis): the image loader on any bytes, and the checkpoint format's round trip.

- Any bytes given to the image loader give a finite float tensor of the model's shape, or one VitvizError line;
  never another exception. The bytes are raw, or real files of every supported format (from conftest's odd
  images) damaged by bit flips, splices, truncation and forged header sizes.
- Any valid architecture, class names (any text), training summary and resolution history survive
  save_checkpoint -> load_checkpoint exactly: the same tensors bit for bit, the same metadata and the same
  outputs. A saved checkpoint damaged anywhere loads or is refused with one VitvizError line, nothing else.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import odd_images
from vitviz.errors import VitvizError
from vitviz.images import load_for_model

SEEDS = [case.data for case in odd_images() if len(case.data) < 200_000]
IMAGE_PIXEL_LIMIT = 2_000_000  # keeps every example fast; the default limit is tested in test_hostile_images.py


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _forge_png_size(data: bytearray, width: int, height: int) -> bytearray:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return data


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["raw", "flips", "splice", "truncate", "forged-size"]))
    if kind == "raw":
        return draw(st.binary(max_size=2048))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    if kind == "flips":
        for _ in range(draw(st.integers(1, 16))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "splice":
        other = draw(st.sampled_from(SEEDS))
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + bytearray(other[draw(st.integers(0, len(other))) :])
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    else:
        data = _forge_png_size(data, draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1)))
    return bytes(data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=image_bytes(), grey=st.booleans())
def test_any_bytes_give_a_model_input_or_one_error_line(data: bytes, grey: bool) -> None:
    channels = 1 if grey else 3
    try:
        x = load_for_model(data, input_size=(12, 20), mean=(0.5,) * channels, std=(0.25,) * channels,
                           in_chans=channels, max_pixels=IMAGE_PIXEL_LIMIT, name="upload.png")  # fmt: skip
    except VitvizError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("could not read image 'upload.png'"), message
        return
    assert x.shape == (channels, 12, 20) and x.dtype == torch.float32
    assert bool(torch.isfinite(x).all())
    # Normalised pixels of an image in [0, 1] lie in [(0 - 0.5) / 0.25, (1 - 0.5) / 0.25].
    assert float(x.min()) >= -2.0 - 1e-5 and float(x.max()) <= 2.0 + 1e-5


# --- checkpoint round trip ------------------------------------------------------------------------------------------


@st.composite
def vit_configs(draw: st.DrawFn):
    from vitviz.models import ViTConfig

    patch = draw(st.sampled_from([4, 8]))
    heads = draw(st.integers(1, 4))
    width = heads * draw(st.integers(1, 4)) * 4  # divisible by heads and by 4 (sincos)
    class_token = draw(st.booleans())
    stem = draw(st.sampled_from(["patch", "patch", "hybrid"])) if patch == 8 else "patch"
    pos_embed = draw(st.sampled_from(["learned", "learned_2d", "sincos", "none", "relative"]))
    config = dict(
        img_size=(patch * draw(st.integers(1, 4)), patch * draw(st.integers(1, 4))),
        patch_size=patch,
        in_chans=draw(st.sampled_from([1, 3])),
        num_classes=draw(st.integers(0, 5)),
        embed_dim=width,
        depth=draw(st.integers(1, 3)),
        num_heads=heads,
        mlp_ratio=draw(st.sampled_from([1.0, 2.0, 4.0])),
        class_token=class_token,
        global_pool=draw(st.sampled_from(["token", "avg"])) if class_token else "avg",
        reg_tokens=0 if pos_embed == "relative" else draw(st.integers(0, 2)),
        pos_embed=pos_embed,
        stem=stem,
        hybrid_layers=(1, 1),
        head=draw(st.sampled_from(["linear", "pretrain"])),
    )
    return ViTConfig(**config)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)  # fmt: skip


@st.composite
def metas(draw: st.DrawFn):
    from vitviz.models import ModelMeta

    config = draw(vit_configs())
    channels = config.in_chans
    finite = st.floats(-10, 10, allow_nan=False)
    history = [
        {"method": draw(st.text(min_size=1, max_size=10)), "old_grid": [draw(st.integers(0, 64)), draw(st.integers(0, 64))],
         "new_grid": list(config.grid_size)}
        for _ in range(draw(st.integers(0, 2)))
    ]  # fmt: skip
    return ModelMeta(
        arch="vitviz",
        config=config,
        class_names=draw(st.lists(st.text(max_size=12), min_size=config.num_classes, max_size=config.num_classes)),
        input_size=config.img_size,
        in_chans=channels,
        mean=tuple(draw(finite) for _ in range(channels)),
        std=tuple(draw(st.floats(0.01, 10)) for _ in range(channels)),
        training=draw(st.dictionaries(st.text(max_size=10), json_values, max_size=4)),
        resolution_history=history,
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=metas(), seed=st.integers(0, 2**31 - 1))
def test_checkpoint_round_trip_is_exact(meta, seed: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    from vitviz.models import build_model, load_checkpoint, save_checkpoint

    torch.manual_seed(seed)
    model = build_model(meta.config).eval()
    path = tmp_path_factory.mktemp("round-trip") / "model.safetensors"
    save_checkpoint(path, model, meta)
    loaded = load_checkpoint(path)
    stored = safetensors.torch.load_file(str(path))  # read back independently of vitviz
    original = model.state_dict()
    assert set(stored) == set(original)
    for key, tensor in original.items():
        assert torch.equal(stored[key], tensor), key
        assert torch.equal(loaded.model.state_dict()[key], tensor), key
    assert json.loads(loaded.meta.to_json()) == json.loads(meta.to_json())
    assert loaded.meta.class_names == meta.class_names and loaded.meta.training == meta.training
    x = torch.randn(2, meta.in_chans, *meta.input_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert not loaded.model.training


@st.composite
def damage(draw: st.DrawFn) -> list[tuple[float, int]]:
    return draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8))


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from vitviz.models import ModelMeta, ViTConfig, build_model, save_checkpoint

    config = ViTConfig(img_size=(16, 16), patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=2)
    meta = ModelMeta(arch="vitviz", config=config, class_names=["a", "b"], input_size=(16, 16), in_chans=3,
                     mean=(0.5,) * 3, std=(0.5,) * 3, training={}, resolution_history=[])  # fmt: skip
    path = tmp_path_factory.mktemp("damaged") / "model.safetensors"
    save_checkpoint(path, build_model(config), meta)
    return path.read_bytes()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(edits=damage(), cut=st.one_of(st.none(), st.floats(0, 1)), in_header=st.booleans())
def test_a_damaged_checkpoint_loads_or_is_refused_in_one_line(
    edits, cut, in_header: bool, saved_checkpoint: bytes, tmp_path: Path
) -> None:
    from vitviz.models import load_checkpoint

    data = bytearray(saved_checkpoint)
    header_end = 8 + int.from_bytes(data[:8], "little")
    span = header_end if in_header else len(data)  # most damage in the header: that is where parsing happens
    for where, value in edits:
        data[int(where * span)] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    assume(bytes(data) != saved_checkpoint)
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(data))
    try:
        loaded = load_checkpoint(path)
    except VitvizError as exc:
        assert "\n" not in str(exc), str(exc)
        return
    # Loaded: then it is a working model whose weights are finite (NaN/inf are refused).
    assert all(math.isfinite(float(t.float().abs().max())) for t in loaded.model.state_dict().values() if t.numel())
