"""Every model source a user can name, and the refusal of hostile or broken weight files."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from vitviz.errors import VitvizError
from vitviz.models import ModelMeta, ViTConfig, build_model, file_sha256, load_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_TIMM = "vit_tiny_patch16_224"


def tiny_cfg() -> ViTConfig:
    return ViTConfig(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=2)


def write_checkpoint(path: Path, run_id: str) -> Path:
    cfg = tiny_cfg()
    meta = ModelMeta(
        arch="vitviz",
        config=cfg,
        class_names=["no", "yes"],
        input_size=cfg.img_size,
        in_chans=3,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        training={"run_id": run_id},
        resolution_history=[],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, build_model(cfg), meta)
    return path


def test_checkpoint_file_source(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "a.safetensors", "file")
    loaded = load_model(str(path))
    assert loaded.source == str(path)
    assert loaded.meta.training["run_id"] == "file"
    assert loaded.meta.class_names == ["no", "yes"]
    assert loaded.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not loaded.model.training


def test_run_folder_prefers_best_then_last_then_newest_epoch(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    with pytest.raises(VitvizError, match="no checkpoint yet"):
        load_model(str(run))
    write_checkpoint(run / "checkpoints" / "epoch-010.safetensors", "epoch-10")
    time.sleep(0.01)
    write_checkpoint(run / "checkpoints" / "epoch-002.safetensors", "epoch-2")  # written later, but older epoch
    assert load_model(str(run)).meta.training["run_id"] == "epoch-10"
    write_checkpoint(run / "last.safetensors", "last")
    assert load_model(str(run)).meta.training["run_id"] == "last"
    write_checkpoint(run / "best.safetensors", "best")
    loaded = load_model(str(run))
    assert loaded.meta.training["run_id"] == "best"
    assert loaded.source == str(run)
    assert loaded.content_hash == file_sha256(run / "best.safetensors")


def test_timm_random_init_is_repeatable_with_timm_normalisation_and_imagenet_names() -> None:
    first = load_model(f"timm:{TINY_TIMM}")
    second = load_model(f"timm:{TINY_TIMM}")
    assert first.content_hash == hashlib.sha256(f"timm:{TINY_TIMM}".encode()).hexdigest()
    # Same hash, same weights: caches keyed on the hash stay right.
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    assert first.meta.arch == TINY_TIMM and first.meta.config is None
    assert first.meta.mean == (0.5, 0.5, 0.5) and first.meta.std == (0.5, 0.5, 0.5)  # augreg weights
    assert first.meta.input_size == (224, 224) and first.meta.in_chans == 3
    assert len(first.meta.class_names) == 1000
    assert first.meta.class_names[0].startswith("tench") and first.meta.class_names[1].startswith("goldfish")
    assert not first.model.training
    deit = load_model("timm:deit_tiny_patch16_224")
    assert deit.meta.mean == pytest.approx((0.485, 0.456, 0.406)) and deit.meta.std == pytest.approx(
        (0.229, 0.224, 0.225)
    )


def _timm_state(num_classes: int = 1000) -> dict[str, torch.Tensor]:
    model = timm.create_model(TINY_TIMM, pretrained=False, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # distinguishable from any fresh initialisation
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("form", ["safetensors", "pth", "model-wrapped-pt", "state_dict-wrapped-bin", "ddp-pth"])
def test_timm_with_local_weights(tmp_path: Path, form: str) -> None:
    state = _timm_state(num_classes=10)
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        safetensors.torch.save_file(state, str(path))
    else:
        suffix = {"pth": ".pth", "model-wrapped-pt": ".pt", "state_dict-wrapped-bin": ".bin", "ddp-pth": ".pth"}[form]
        payload: object = {
            "pth": state,
            "model-wrapped-pt": {"model": state, "epoch": 3},
            "state_dict-wrapped-bin": {"state_dict": state},
            "ddp-pth": {f"module.{k}": v for k, v in state.items()},
        }[form]
        path = tmp_path / f"w{suffix}"
        torch.save(payload, path)
    loaded = load_model(f"timm:{TINY_TIMM}", weights=path)
    for key, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    assert loaded.meta.class_names == [f"class {i}" for i in range(10)]
    assert loaded.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not loaded.model.training


def test_mismatched_weights_for_a_timm_model_give_one_line(tmp_path: Path) -> None:
    path = tmp_path / "small.safetensors"
    small = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2)
    safetensors.torch.save_file(dict(small.state_dict()), str(path))
    with pytest.raises(VitvizError) as info:
        load_model(f"timm:{TINY_TIMM}", weights=path)
    message = str(info.value)
    assert "\n" not in message
    assert "do not fit" in message and "missing (blocks.2." in message and "wrong shape (cls_token" in message


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("timm:vit_tiny_patch16_2244", "did you mean vit_tiny_patch16_224"),
        ("timm:not_a_model_at_all", "unknown timm model"),
        ("timm:", "needs a model name"),
        ("timm:resnet18", "not a Vision Transformer"),
        ("/nonexistent/model.safetensors", "no such checkpoint or run folder"),
    ],
)
def test_bad_sources_give_one_clear_line(source: str, needle: str) -> None:
    with pytest.raises(VitvizError, match=needle) as info:
        load_model(source)
    assert "\n" not in str(info.value)


def test_weights_option_needs_a_timm_source_and_an_existing_file(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "a.safetensors", "x")
    with pytest.raises(VitvizError, match="only to timm"):
        load_model(str(path), weights=path)
    with pytest.raises(VitvizError, match="no such file"):
        load_model(f"timm:{TINY_TIMM}", weights=tmp_path / "missing.pth")
    torch.save(_timm_state(), tmp_path / "w.pth")
    with pytest.raises(VitvizError, match="not a vitviz checkpoint"):
        load_model(str(tmp_path / "w.pth"))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.command = f"touch {marker}"

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def _hostile_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    plain = pickle.dumps({"head.weight": _Evil(marker)}, protocol=2)
    assert b"system" in plain  # the payload really calls os.system when unpickled
    files = {"plain-pickle.pth": plain, "renamed-pickle.safetensors": plain, "pickle.bin": plain}
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(content)
    zipped = tmp_path / "zip-archive.pth"
    torch.save({"model": {"head.weight": _Evil(marker)}}, zipped)  # torch's own zip format with the payload
    assert zipfile.is_zipfile(zipped)
    paths["zip-archive.pth"] = zipped
    return paths


def test_hostile_pickles_are_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    for name, path in _hostile_files(tmp_path, marker).items():
        with pytest.raises(VitvizError) as info:
            load_model(f"timm:{TINY_TIMM}", weights=path)
        assert "\n" not in str(info.value), name
        with pytest.raises(VitvizError):
            load_model(str(path))
        assert not marker.exists(), name


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_broken_weight_files_are_refused(tmp_path: Path, suffix: str) -> None:
    good = tmp_path / f"good{suffix}"
    state = _timm_state()
    if suffix == ".pth":
        torch.save(state, good)
    else:
        safetensors.torch.save_file(state, str(good))
    data = good.read_bytes()
    for name, content in {"zero": b"", "truncated": data[: len(data) // 2], "random": os.urandom(2048)}.items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(content)
        with pytest.raises(VitvizError) as info:
            load_model(f"timm:{TINY_TIMM}", weights=path)
        assert "\n" not in str(info.value) and str(path) in str(info.value), name
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(VitvizError, match="does not hold a state dict"):
        load_model(f"timm:{TINY_TIMM}", weights=tmp_path / "list.pth")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(VitvizError, match="must be .safetensors"):
        load_model(f"timm:{TINY_TIMM}", weights=tmp_path / "weights.npz")


def test_offline_pretrained_request_says_so_and_suggests_weights_file(tmp_path: Path) -> None:
    code = (
        "from vitviz.models import load_model\n"
        "from vitviz.errors import VitvizError\n"
        "try:\n"
        f"    load_model('timm:{TINY_TIMM}', pretrained=True)\n"
        "except VitvizError as exc:\n"
        "    print('ERROR', exc)\n"
    )
    # An empty cache, so weights downloaded earlier on this machine cannot make the request succeed.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "TORCH_HOME": str(tmp_path)}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 1
    assert "could not be downloaded" in lines[0] and "--weights FILE" in lines[0]


def test_offline_pretrained_request_fails_before_asking_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, huggingface_hub would retry for a minute; the unreachable host is detected first."""
    from vitviz.models import factory

    def no_create(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("timm.create_model was called although the weights host is unreachable")

    monkeypatch.setattr(factory, "weights_host_reachable", lambda *args, **kwargs: False)
    monkeypatch.setattr(factory, "_weights_cached", lambda name: False)
    monkeypatch.setattr(factory.timm, "create_model", no_create)
    with pytest.raises(VitvizError, match="cannot be reached.*--weights FILE"):
        load_model(f"timm:{TINY_TIMM}", pretrained=True)
