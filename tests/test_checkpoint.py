"""The checkpoint format: exact round trips, atomic writes, and refusal of bad or hostile files."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

import vitviz.models.checkpoint as checkpoint_module
from vitviz.errors import VitvizError
from vitviz.models import (
    ModelMeta,
    ViTConfig,
    build_model,
    file_sha256,
    load_checkpoint,
    load_state_dict_checked,
    read_checkpoint_meta,
    save_checkpoint,
)

IMG = (32, 48)


def tiny(**overrides: object) -> ViTConfig:
    base = dict(img_size=IMG, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, hybrid_layers=(1, 1))
    base.update(overrides)
    return ViTConfig(**base)  # type: ignore[arg-type]


def meta_for(cfg: ViTConfig, **overrides: object) -> ModelMeta:
    fields = dict(
        arch="vitviz",
        config=cfg,
        class_names=["cat", "dog", "émeu"][: cfg.num_classes],
        input_size=cfg.img_size,
        in_chans=cfg.in_chans,
        mean=(0.485, 0.456, 0.406)[: cfg.in_chans],
        std=(0.229, 0.224, 0.225)[: cfg.in_chans],
        training={"dataset": "tiny", "epochs": 2, "steps": 10, "metrics": {"val_acc": 0.5}, "run_id": "r1"},
        resolution_history=[{"method": "bicubic", "old_grid": [2, 3], "new_grid": [4, 6]}],
    )
    fields.update(overrides)
    return ModelMeta(**fields)  # type: ignore[arg-type]


def saved(
    tmp_path: Path, cfg: ViTConfig | None = None, name: str = "model.safetensors"
) -> tuple[Path, torch.nn.Module]:
    cfg = cfg or tiny()
    model = build_model(cfg)
    path = tmp_path / name
    save_checkpoint(path, model, meta_for(cfg))
    return path, model


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(),
        tiny(pos_embed="learned_2d", reg_tokens=2),
        tiny(pos_embed="sincos", in_chans=1),
        tiny(pos_embed="relative", stem="hybrid", head="pretrain"),
        tiny(pos_embed="none", class_token=False, global_pool="avg"),
    ],
    ids=["learned", "learned_2d", "sincos", "relative-hybrid-pretrain", "none-avg"],
)
def test_round_trip_is_bit_exact(tmp_path: Path, cfg: ViTConfig) -> None:
    model = build_model(cfg)
    with torch.no_grad():  # make every tensor distinctive, including zero-initialised biases
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    meta = meta_for(cfg)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, meta)
    loaded = load_checkpoint(path)
    original = model.state_dict()
    restored = loaded.model.state_dict()
    assert restored.keys() == original.keys()
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    assert loaded.meta == meta
    assert loaded.meta.to_json() == meta.to_json()
    assert not loaded.model.training
    assert loaded.content_hash == file_sha256(path)
    images = torch.randn(2, cfg.in_chans, *IMG)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(images), model(images))


def test_header_meta_is_readable_without_building_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = saved(tmp_path)
    monkeypatch.setattr(checkpoint_module, "build_model", _forbidden)
    meta = read_checkpoint_meta(path)
    assert meta == meta_for(tiny())
    with safetensors.safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["vitviz"])["format_version"] == 1


def _forbidden(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("a model was built before the metadata was validated")


@pytest.mark.parametrize("failing", ["os.replace", "save_file"])
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path, _ = saved(tmp_path)
    previous = path.read_bytes()

    def broken_save_file(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"partial")  # half a file on disk, then the disk fills up
        raise OSError(28, "No space left on device")

    def broken_replace(*_args: object) -> None:
        raise OSError(5, "Input/output error")

    if failing == "os.replace":
        monkeypatch.setattr(os, "replace", broken_replace)  # the one atomic writer, vitviz.fileio, renames with it
    else:
        monkeypatch.setattr(checkpoint_module.safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(VitvizError, match="could not write checkpoint"):
        save_checkpoint(path, build_model(tiny()), meta_for(tiny()))
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    previous = path.read_bytes()
    model = build_model(tiny())
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[3, 4] = float("nan")
    with pytest.raises(VitvizError, match=r"NaN.*blocks\.1\.mlp\.fc1\.weight"):
        save_checkpoint(path, model, meta_for(tiny()))
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[3, 4] = float("inf")
    with pytest.raises(VitvizError, match="NaN or infinite"):
        save_checkpoint(tmp_path / "other.safetensors", model, meta_for(tiny()))
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_tied_weights_save_and_load(tmp_path: Path) -> None:
    model = build_model(tiny())
    model.blocks[1].attn.qkv.weight = model.blocks[0].attn.qkv.weight  # tied, as weight sharing would do
    path = tmp_path / "tied.safetensors"
    save_checkpoint(path, model, meta_for(tiny()))
    loaded = load_checkpoint(path)
    expected = model.blocks[0].attn.qkv.weight
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, expected)
    assert torch.equal(loaded.model.blocks[1].attn.qkv.weight, expected)


def test_meta_that_does_not_describe_the_model_is_refused_at_save(tmp_path: Path) -> None:
    model = build_model(tiny(embed_dim=64))
    with pytest.raises(VitvizError, match="does not match meta.config"):
        save_checkpoint(tmp_path / "x.safetensors", model, meta_for(tiny()))
    assert list(tmp_path.iterdir()) == []


def _evil_pickle(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    data = pickle.dumps(Evil(), protocol=2)
    assert b"system" in data  # the fixture really carries a call to os.system
    return data


def _corrupt_files(tmp_path: Path) -> dict[str, Path]:
    good, _ = saved(tmp_path, name="good.safetensors")
    data = good.read_bytes()
    files = {
        "zero-byte": b"",
        "truncated": data[: len(data) // 2],
        "header-only": data[:200],
        "random": os.urandom(4096),
        "pickle": _evil_pickle(tmp_path / "marker"),
        "huge-header": (10**12).to_bytes(8, "little") + b"{}",
    }
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.safetensors"
        out[name].write_bytes(content)
    return out


def test_corrupt_and_hostile_checkpoints_are_refused_with_one_line(tmp_path: Path) -> None:
    for name, path in _corrupt_files(tmp_path).items():
        for reader in (read_checkpoint_meta, load_checkpoint):
            with pytest.raises(VitvizError) as info:
                reader(path)
            assert "\n" not in str(info.value), name
            assert str(path) in str(info.value), name
    assert not (tmp_path / "marker").exists()


def _write_raw(path: Path, tensors: dict[str, torch.Tensor], meta_json: str | None) -> None:
    metadata = None if meta_json is None else {"vitviz": meta_json}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def test_absurd_config_in_meta_is_refused_before_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = json.loads(meta_for(tiny()).to_json())
    doc["config"]["depth"] = 10**6
    path = tmp_path / "absurd.safetensors"
    _write_raw(path, {"x": torch.zeros(1)}, json.dumps(doc))
    monkeypatch.setattr(checkpoint_module, "build_model", _forbidden)
    with pytest.raises(VitvizError, match="depth"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d.update(format_version=99), "newer"),
        (lambda d: d.update(surprise=1), "unknown"),
        (lambda d: d.pop("class_names"), "lacks"),
        (lambda d: d.update(class_names=["a"]), "class names"),
        (lambda d: d.update(std=[0.2, 0.0, 0.2]), "std"),
        (lambda d: d.update(mean=[0.5]), "mean"),
        (lambda d: d.update(input_size=[64, 64]), "input"),
        (lambda d: d["config"].update(colour="red"), "colour"),
        (lambda d: d.update(resolution_history=[{"method": "bicubic"}]), "old_grid"),
    ],
)
def test_invalid_meta_is_refused(tmp_path: Path, edit, needle: str) -> None:
    model = build_model(tiny())
    doc = json.loads(meta_for(tiny()).to_json())
    edit(doc)
    path = tmp_path / "bad.safetensors"
    _write_raw(path, dict(model.state_dict()), json.dumps(doc))
    with pytest.raises(VitvizError, match=needle):
        load_checkpoint(path)


def test_safetensors_without_vitviz_meta_points_to_weights_option(tmp_path: Path) -> None:
    path = tmp_path / "bare.safetensors"
    _write_raw(path, dict(build_model(tiny()).state_dict()), None)
    with pytest.raises(VitvizError, match="--weights"):
        load_checkpoint(path)


def test_mismatched_weights_give_one_line_naming_the_first_bad_keys(tmp_path: Path) -> None:
    wide = build_model(tiny(embed_dim=64))
    path = tmp_path / "mismatch.safetensors"
    _write_raw(path, dict(wide.state_dict()), meta_for(tiny()).to_json())
    with pytest.raises(VitvizError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    assert "wrong shape" in message and "cls_token [1, 1, 64] vs model [1, 1, 32]" in message

    model = build_model(tiny())
    state = dict(model.state_dict())
    state.pop("head.weight")
    state["head.extra"] = torch.zeros(1)
    with pytest.raises(VitvizError, match=r"1 missing \(head\.weight\); 1 unexpected \(head\.extra\)"):
        load_state_dict_checked(model, state, "somewhere")


def test_save_refuses_other_suffixes_and_missing_folders(tmp_path: Path) -> None:
    model = build_model(tiny())
    with pytest.raises(VitvizError, match=".safetensors"):
        save_checkpoint(tmp_path / "model.pth", model, meta_for(tiny()))
    with pytest.raises(VitvizError, match="does not exist"):
        save_checkpoint(tmp_path / "nope" / "model.safetensors", model, meta_for(tiny()))
