"""`python -m training finetune --from SOURCE` for every model source (timm:, hf: folder, vitviz checkpoint) and
every strategy, on a tiny ImageFolder tree: each strategy's contract checked bitwise against the base, the result
an ordinary checkpoint that loads with the network off, and exact resume with LoRA and with a model EMA."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from training.__main__ import main
from training.config import TrainConfig
from training.finetune import head_module, load_base, with_new_head
from vitviz.models import load_model, read_adapters, read_checkpoint_meta, read_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "checkpoints" / "shapes-default.safetensors"
CLASSES = ("cat", "dog")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ with four 32 px PNGs per class (a class is a colour, with noise)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 60, (32, 32, 3)) + np.array([180, 40, 40] if label else [40, 40, 180])
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf-vit")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    processor = {"do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": 32}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def _source_args(kind: str, hf_folder: Path) -> list[str]:
    if kind == "timm":  # two blocks of vit_tiny, resampled to 32 px (2x2 patches)
        return ["--from", "timm:vit_tiny_patch16_224", "--model-kwargs", "depth=2", "--img-size", "32", "32"]
    if kind == "hf":
        return ["--from", f"hf:{hf_folder}"]
    return ["--from", str(BUNDLED)]


def _finetune(tmp: Path, run_id: str, images: Path, *extra: str) -> Path:
    argv = [
        "finetune", "--dataset", f"folder:{images}", "--runs-dir", str(tmp), "--run-id", run_id,
        "--device", "cpu", "--no-progress", "--set", "batch_size=4", "--set", "epochs=1",
        "--set", "data.eval_split=val", "--set", "optim.lr=0.05", "--set", "schedule.warmup_epochs=0", *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    return tmp / run_id


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No download can happen: the Hub is offline and no socket may connect."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("something tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _base(run: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The run's starting point (its source with the new zero head, at the run's size), and the head's names."""
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    model, _ = with_new_head(load_base(cfg), cfg, list(CLASSES))
    head = {id(p) for p in head_module(model).parameters()}
    return model.state_dict(), {n for n, p in model.named_parameters() if id(p) in head}


@pytest.mark.parametrize("kind", ["timm", "hf", "vitviz"])
@pytest.mark.parametrize("strategy", ["full", "linear", "freeze:1", "lora"])
def test_every_source_fine_tunes_with_every_strategy(
    kind: str, strategy: str, images: Path, hf_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _finetune(tmp_path, "ft", images, *_source_args(kind, hf_folder), "--strategy", strategy)
    base, head = _base(run)
    _offline(monkeypatch)
    tuned = load_model(str(run))  # the best checkpoint, rebuilt from its metadata alone
    assert tuned.meta.class_names == list(CLASSES) and tuned.meta.input_size == (32, 32)
    lineage = tuned.meta.training
    assert lineage["strategy"] == strategy and lineage["dataset"] == "folder" and lineage["train_split"] == "train"
    assert lineage["base_content_hash"] and lineage["base_source"] == _source_args(kind, hf_folder)[1]
    with torch.no_grad():
        assert tuned.model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    state = {k: v for k, v in read_state_dict(run / "last.safetensors").items() if not k.startswith("lora.")}
    assert state.keys() == base.keys()
    assert not all(torch.equal(state[k], base[k]) for k in head), "the head did not train"
    changed = {k for k in base if k not in head and not torch.equal(state[k], base[k])}
    trainable = sum(p.numel() for n, p in tuned.model.named_parameters() if n in head)
    if strategy == "linear":
        assert not changed and lineage["trainable_parameters"] == trainable
    elif strategy == "freeze:1":
        assert changed and all(_layer(k) > 1 for k in changed), sorted(changed)
    elif strategy == "full":
        assert any(_layer(k) <= 1 for k in changed)
    else:
        _check_lora(run, state, base, changed, lineage)


def _layer(name: str) -> int:
    """0 for the stem, i + 1 for block i, 99 for what follows the blocks (names of all three kinds of model)."""
    parts = name.split(".")
    for marker in ("blocks", "layers", "layer"):
        if marker in parts:
            return int(parts[parts.index(marker) + 1]) + 1
    return 0 if any(s in name for s in ("embed", "cls_token", "pos_")) else 99


def _check_lora(
    run: Path, state: dict[str, torch.Tensor], base: dict[str, torch.Tensor], changed: set[str], lineage: dict
) -> None:
    adapters = read_adapters(run / "last.safetensors")
    lora = lineage["lora"]
    assert (lora["rank"], lora["alpha"]) == (8, 16.0) and lora["modules"]
    assert sorted(adapters) == sorted(f"lora.{m}.{ab}" for m in lora["modules"] for ab in ("A", "B"))
    for module in lora["modules"]:
        a, b = adapters[f"lora.{module}.A"], adapters[f"lora.{module}.B"]
        assert a.shape[0] == 8 and b.shape[1] == 8 and b.any(), module
        expected = base[f"{module}.weight"] + (b @ a) * (16.0 / 8)
        torch.testing.assert_close(state[f"{module}.weight"], expected, rtol=0, atol=1e-6)
    # Only the adapted weights moved (their biases, and everything else outside the head, are the base's).
    assert changed == {f"{m}.weight" for m in lora["modules"]}


def test_hf_model_fine_tunes_at_a_new_size_with_its_table_resampled(
    images: Path, hf_folder: Path, tmp_path: Path
) -> None:
    run = _finetune(tmp_path, "hf48", images, "--from", f"hf:{hf_folder}", "--img-size", "48", "48",
                    "--strategy", "linear")  # fmt: skip
    meta = read_checkpoint_meta(run / "last.safetensors")
    assert meta.input_size == (48, 48) and meta.hf_config["image_size"] == 48
    assert meta.resolution_history == [{"method": "bicubic", "old_grid": [4, 4], "new_grid": [6, 6]}]
    tuned = load_model(str(run / "last.safetensors"))
    assert tuned.model.hf.vit.embeddings.position_embeddings.shape == (1, 37, 32)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("hf", ["--strategy", "lora", "--lora-rank", "4"]),
        ("timm", ["--strategy", "full", "--ema-decay", "0.9", "--mixup", "0.8", "--cutmix", "1.0",
                  "--smoothing", "0.1", "--clip-grad", "0.5", "--layer-decay", "0.75"]),
    ],
)  # fmt: skip
def test_a_stopped_fine_tune_resumes_exactly(
    kind: str, extra: list[str], images: Path, hf_folder: Path, tmp_path: Path
) -> None:
    args = [*_source_args(kind, hf_folder), *extra, "--set", "epochs=2"]
    whole = _finetune(tmp_path, "whole", images, *args)
    _finetune(tmp_path, "part", images, *args, "--max-steps", "1")
    assert main(["train", "--resume", str(tmp_path / "part"), "--device", "cpu", "--no-progress"]) == 0
    a, b = read_state_dict(whole / "last.safetensors"), read_state_dict(tmp_path / "part" / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    meta = read_checkpoint_meta(whole / "last.safetensors")
    assert meta.training["steps"] == 4 and ("ema_decay" in meta.training) == ("--ema-decay" in extra)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--from", "timm:vit_tiny_patch16_224", "--strategy", "half"], "finetune.strategy must be one of"),
        (["--from", "hf:some/model", "--weights", "w.pth"], "apply to timm:<name> sources only"),
        (["--from", "timm:vit_tiny_patch16_224", "--strategy", "full", "--lora-targets", "qkv"], "strategy lora only"),
        (["--from", "timm:vit_tiny_patch16_224", "--model-kwargs", "depth"], "expects KEY=VALUE"),
        (["--from", "timm:vit_tiny_patch16_224", "--ema-decay", "1.5"], "ema_decay must be in (0, 1)"),
    ],
)
def test_fine_tune_mistakes_are_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["check", "--kind", "finetune", *args]) == 2
    error = capsys.readouterr().err.strip()
    assert needle in error and "\n" not in error


def test_lora_targets_that_name_nothing_are_one_line(
    images: Path, hf_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["finetune", "--from", f"hf:{hf_folder}", "--strategy", "lora", "--lora-targets", "qkv",
            "--dataset", f"folder:{images}", "--runs-dir", str(tmp_path), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own loading bar
    assert error.startswith("error: no Linear layer named qkv") and "q_proj" in error


@pytest.mark.parametrize("kind", ["timm", "hf", "vitviz"])
@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_gradient_checkpointing_trains_the_same_weights(
    kind: str, strategy: str, images: Path, hf_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--grad-checkpointing` recomputes the blocks' activations in the backward pass: the run's weights after an
    epoch equal those of the same run without it (the recomputation repeats the same float operations on the
    CPU; a tolerance of a few float32 ulps of the weights' scale covers a kernel that orders a sum differently),
    LoRA's adapters included: the recomputation must not cut the gradient at the frozen blocks' inputs."""
    import torch.utils.checkpoint as torch_checkpoint

    source = _source_args(kind, hf_folder)
    plain = _finetune(tmp_path, "plain", images, *source, "--strategy", strategy)
    recomputations = []
    real = torch_checkpoint.checkpoint

    def counted(*args: object, **kwargs: object) -> object:
        recomputations.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_checkpoint, "checkpoint", counted)  # what timm calls
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)  # what transformers bound at import
    recomputed = _finetune(tmp_path, "ckpt", images, *source, "--strategy", strategy, "--grad-checkpointing")
    assert recomputations and set(recomputations) == {False}  # the blocks ran checkpointed, non-reentrant
    config = json.loads((recomputed / "config.json").read_text())
    assert config["grad_checkpointing"] is True
    a, b = read_state_dict(plain / "last.safetensors"), read_state_dict(recomputed / "last.safetensors")
    assert a.keys() == b.keys()
    base, _ = _base(plain)
    moved = [k for k in base if k in a and not torch.equal(a[k], base[k])]
    assert len(moved) > 2  # more than the head trained: the blocks (or their adapters) got gradients
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
