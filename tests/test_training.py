"""The training backend: presets, config overrides, one optimiser step, the non-finite guard, the run folder,
masked patch prediction and fine-tuning (head, resolution, frozen blocks, layer decay)."""

from __future__ import annotations

import ast
import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from training import engine, presets
from training.config import TrainConfig, apply_overrides
from training.distributed import DistContext
from training.engine import RunOptions, Trainer, TrainingFailed, build_optimizer, lr_factor, run
from training.masked import MaskedPatchModel, colour_targets, sample_corruption
from training.runfolder import RunFolder
from vitviz.errors import VitvizError
from vitviz.models import build_model, count_parameters, load_checkpoint, read_state_dict
from vitviz.tokens import token_layout

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**changes: object) -> TrainConfig:
    return replace(presets.tiny(), **changes)


def options(tmp_path: Path, run_id: str, **changes: object) -> RunOptions:
    return RunOptions(runs_dir=tmp_path, run_id=run_id, device="cpu", **changes)


# --- presets and config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_builds_a_model_that_runs(name: str) -> None:
    cfg = presets.get_preset(name)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = build_model(cfg.model).eval()
    assert count_parameters(model) > 0
    with torch.no_grad():
        logits = model(torch.randn(2, cfg.model.in_chans, *cfg.model.img_size))
    assert logits.shape == (2, cfg.model.num_classes)
    assert torch.isfinite(logits).all()


def test_mnist_small_is_the_requested_architecture() -> None:
    cfg = presets.get_preset("mnist-small")
    layout = token_layout(build_model(cfg.model))
    assert layout.grid == (4, 4) and layout.num_patches == 16 and layout.has_class_token
    assert (cfg.model.depth, cfg.model.num_heads, cfg.model.embed_dim, cfg.model.pos_embed) == (3, 4, 32, "learned")
    assert (cfg.data.train_split, cfg.data.eval_split) == ("test[:8000]", "test[8000:]")
    assert (cfg.optim.name, cfg.optim.weight_decay) == (
        "adamw",
        0.0,
    )  # AdamW without decay = Adam (lr: docs/training.md)
    assert cfg.data.augment == "digits"  # handwriting is never mirrored


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(VitvizError, match="shapes-default"):
        presets.get_preset("shapes-defualt")


def test_overrides_are_typed_by_dotted_key() -> None:
    cfg = apply_overrides(
        presets.tiny(),
        [
            "optim.lr=3e-3",
            "model.depth=4",
            "model.img_size=48,48",
            "grad_clip=none",
            "data.eval_split=none",
            "data.augment=light",
            "optim.betas=[0.8, 0.9]",
            "deterministic=true",
            "objective=masked",
        ],
    )
    assert cfg.optim.lr == 3e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.model.depth == 4 and cfg.model.img_size == (48, 48)
    assert cfg.grad_clip is None and cfg.data.eval_split is None and cfg.data.augment == "light"
    assert cfg.optim.betas == (0.8, 0.9) and cfg.deterministic is True and cfg.objective == "masked"
    assert presets.tiny().model.depth == 2  # the preset itself is untouched


@pytest.mark.parametrize(
    ("assignment", "fragment"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("nonsense=1", "unknown config key"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("model.depth=2.5", "must be an integer"),
        ("epochs=0", "epochs must be > 0"),
        ("model.pos_embed=spiral", "pos_embed"),
        ("objective=dream", "objective must be one of"),
        ("optim=3", "is a section"),
        ("epochs.count=1", "has no sub-keys"),
        ("lr", "key=value"),
        ("model.img_size=30,30", "not divisible by patch_size"),
    ],
)
def test_bad_overrides_are_one_line_errors(assignment: str, fragment: str) -> None:
    with pytest.raises(VitvizError, match=None) as info:
        apply_overrides(presets.tiny(), [assignment])
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_in_memory_data_refuses_per_image_augmentation() -> None:
    with pytest.raises(VitvizError, match="in_memory needs data.augment=none"):
        apply_overrides(tiny(), ["data.in_memory=true", "data.augment=light"])
    assert apply_overrides(tiny(), ["data.in_memory=true"]).data.in_memory is True


def test_config_json_rejects_unknown_keys() -> None:
    doc = presets.tiny().to_dict()
    doc["optim"]["learning_rate"] = 0.1
    with pytest.raises(VitvizError, match="optim.learning_rate"):
        TrainConfig.from_dict(doc)


def test_schedule_warms_up_linearly_then_follows_a_half_cosine() -> None:
    kwargs = dict(total_steps=104, warmup_steps=4, decay="cosine", min_ratio=0.0)
    assert [lr_factor(s, **kwargs) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, **kwargs) == 1.0
    assert lr_factor(54, **kwargs) == pytest.approx(0.5)  # half way through the decay
    assert lr_factor(104, **kwargs) == pytest.approx(0.0)
    linear = dict(kwargs, decay="linear", min_ratio=0.1)
    assert lr_factor(54, **linear) == pytest.approx(0.1 + 0.9 * 0.5)


# --- one step -------------------------------------------------------------------------------------------


def _fixed_batch(cfg: TrainConfig, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(size, cfg.model.in_chans, *cfg.model.img_size, generator=generator) * 2 - 1
    labels = torch.randint(0, cfg.model.num_classes, (size,), generator=generator)
    return images, labels


def test_one_step_lowers_the_loss_on_a_fixed_batch() -> None:
    cfg = tiny()
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_model(cfg.model), CPU, mean=(0.5,) * 3, std=(0.5,) * 3, total_steps=10, warmup_steps=0)
    images, labels = _fixed_batch(cfg)
    before = trainer.train_step(images, labels, step=0)  # reports the loss it stepped on
    after = trainer.train_step(images, labels, step=0)  # same batch, same dropout seed, updated weights
    assert not before.skipped and before.count == 16
    assert after.loss_sum / after.count < before.loss_sum / before.count


def test_masked_prediction_step_lowers_its_loss() -> None:
    cfg = tiny(objective="masked", optim=replace(presets.tiny().optim, lr=3e-3))
    model_cfg = replace(cfg.model, num_classes=cfg.masked.num_colour_classes)
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_model(model_cfg), CPU, mean=(0.5,) * 3, std=(0.5,) * 3, total_steps=10, warmup_steps=0)
    images, labels = _fixed_batch(cfg)
    losses = [trainer.train_step(images, labels, step=0) for _ in range(3)]
    num_patches = 16
    assert all(o.count == 16 * num_patches // 2 for o in losses)  # half the patches of every image are predicted
    mean_losses = [o.loss_sum / o.count for o in losses]
    assert mean_losses[1] < mean_losses[0] and mean_losses[2] < mean_losses[1]


def test_bf16_autocast_trains_on_cpu() -> None:
    cfg = tiny(precision="bf16")
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_model(cfg.model), CPU, mean=(0.5,) * 3, std=(0.5,) * 3, total_steps=10, warmup_steps=0)
    images, labels = _fixed_batch(cfg)
    before = trainer.train_step(images, labels, step=0)
    after = trainer.train_step(images, labels, step=0)
    assert after.loss_sum < before.loss_sum and not after.skipped
    assert all(p.dtype == torch.float32 for p in trainer.module.parameters())  # autocast, not a bf16 copy


# --- masked patch prediction ----------------------------------------------------------------------------


def test_colour_targets_match_a_per_patch_loop() -> None:
    generator = torch.Generator().manual_seed(1)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    pixels = torch.randint(0, 256, (2, 3, 8, 12), generator=generator).float() / 255
    images = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    targets = colour_targets(images, mean, std, (4, 4), bits=3)
    assert targets.shape == (2, 6)
    for b in range(2):
        for row in range(2):
            for col in range(3):
                patch = pixels[b, :, row * 4 : (row + 1) * 4, col * 4 : (col + 1) * 4]
                r, g, bl = (min(7, int(float(patch[c].mean()) * 8)) for c in range(3))
                assert targets[b, row * 3 + col] == r * 64 + g * 8 + bl


def test_grey_images_use_grey_colour_classes() -> None:
    grey = torch.full((1, 1, 4, 4), 0.3)
    target = colour_targets(grey, torch.tensor([0.0]), torch.tensor([1.0]), (4, 4), bits=3)
    assert int(target) == 2 * 64 + 2 * 8 + 2  # 0.3 * 8 = 2.4 -> level 2 in R, G and B


def test_corruption_follows_the_50_80_10_10_rule() -> None:
    cfg = presets.tiny().masked
    c = sample_corruption(2000, 64, cfg, torch.Generator().manual_seed(0))
    assert (c.corrupted.sum(dim=1) == 32).all()
    assert not (c.use_mask & ~c.corrupted).any() and not (c.use_random & ~c.corrupted).any()
    assert not (c.use_mask & c.use_random).any()
    total = c.corrupted.sum().item()
    assert c.use_mask.sum().item() / total == pytest.approx(0.8, abs=0.01)
    assert c.use_random.sum().item() / total == pytest.approx(0.1, abs=0.01)
    assert (c.random_source != torch.arange(64)).all()  # "another" patch, never the patch itself


def test_a_masked_patch_cannot_leak_its_pixels() -> None:
    cfg = presets.tiny()
    torch.manual_seed(0)
    model = MaskedPatchModel(build_model(replace(cfg.model, num_classes=512)), cfg.masked).eval()
    n = model.num_patches
    use_mask = torch.zeros(1, n, dtype=torch.bool)
    use_mask[0, 5] = True  # patch (1, 1) of the 4x4 grid
    no_random = torch.zeros(1, n, dtype=torch.bool)
    source = torch.zeros(1, n, dtype=torch.long)
    image = torch.randn(1, 3, 32, 32)
    changed_masked = image.clone()
    changed_masked[:, :, 8:16, 8:16] += 1.0
    changed_visible = image.clone()
    changed_visible[:, :, 0:8, 0:8] += 1.0
    with torch.no_grad():
        base = model(image, use_mask, no_random, source)
        assert torch.equal(model(changed_masked, use_mask, no_random, source), base)
        assert not torch.allclose(model(changed_visible, use_mask, no_random, source), base)
        # Without corruption the forward is the model's own per-token head on forward_features.
        plain = model(image, no_random, no_random, source)
        features = model.vit.forward_features(image)[:, 1:]
        assert torch.allclose(plain, model.vit.head(model.vit.fc_norm(features)))


# --- runs, status, guard ---------------------------------------------------------------------------------


def test_run_folder_holds_config_logs_checkpoints_and_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    statuses: list[str] = []
    original = RunFolder.write_status

    def record(self: RunFolder, status: str, **kwargs: object) -> None:
        statuses.append(status)
        original(self, status, **kwargs)

    monkeypatch.setattr(RunFolder, "write_status", record)
    cfg = tiny(checkpoint_every=2, epochs=3, log_every=2)
    result = run(cfg, options(tmp_path, "r1"))
    folder = tmp_path / "r1"
    assert result.status == "finished" and result.run_dir == folder and result.step == 12
    assert statuses[0] == "running" and statuses[-1] == "finished" and set(statuses) == {"running", "finished"}
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "finished" and status["progress"]["fraction"] == 1.0 and status["reason"] is None

    saved = TrainConfig.from_dict(json.loads((folder / "config.json").read_text()))
    assert saved.model.num_classes == 10 and saved.data.mean == (0.5, 0.5, 0.5)  # resolved from the dataset

    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == [2, 4, 6, 8, 10, 12]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3]
    with open(folder / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["eval_accuracy"]) == pytest.approx(records[-1]["eval_accuracy"])

    epoch_files = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert epoch_files == ["epoch-002.safetensors", "epoch-003.safetensors"]  # every 2nd epoch, and the last
    last = load_checkpoint(folder / "last.safetensors")
    assert last.meta.class_names[0] == "circle" and last.meta.training["run_id"] == "r1"
    assert last.meta.training["steps"] == 12 and last.meta.training["epochs"] == 3
    assert last.meta.training["metrics"]["eval_accuracy"] == pytest.approx(records[-1]["eval_accuracy"])
    best_accuracy = max(r["eval_accuracy"] for r in records if r["kind"] == "epoch")
    assert load_checkpoint(folder / "best.safetensors").meta.training["metrics"]["best_accuracy"] == best_accuracy

    with pytest.raises(VitvizError, match="already exists"):
        run(cfg, options(tmp_path, "r1"))


def _nan_loss_at(calls: set[int]):
    real = engine.classification_loss
    counter = {"n": 0}

    def loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
        value = real(logits, labels, smoothing)
        if torch.is_grad_enabled():
            counter["n"] += 1
            if counter["n"] in calls:
                return value * float("nan")
        return value

    return loss


def test_a_non_finite_step_is_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "classification_loss", _nan_loss_at({3}))
    result = run(tiny(), options(tmp_path, "one-nan"))
    assert result.status == "finished" and result.metrics["skipped_steps"] == 1
    records = [json.loads(line) for line in (tmp_path / "one-nan" / "metrics.jsonl").read_text().splitlines()]
    step3 = next(r for r in records if r["kind"] == "step" and r["step"] == 3)
    assert step3["loss"] is None and step3["skipped_steps"] == 1
    weights = read_state_dict(tmp_path / "one-nan" / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_consecutive_non_finite_steps_fail_the_run_without_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "classification_loss", _nan_loss_at(set(range(2, 100))))
    with pytest.raises(TrainingFailed, match="not finite for 3 steps in a row"):
        run(tiny(max_bad_steps=3), options(tmp_path, "diverged"))
    folder = tmp_path / "diverged"
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "failed" and "not finite" in status["reason"] and status["progress"]["step"] == 4
    assert not list(folder.glob("*.safetensors")) and not list((folder / "checkpoints").iterdir())


def _attributes_set(function: ast.FunctionDef) -> set[str]:
    """Names X of every `self.X = ...`, `self.X += ...` and `self.X: T = ...` in a method."""
    names = set()
    for node in ast.walk(function):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        while targets:
            target = targets.pop()
            if isinstance(target, ast.Tuple | ast.List):
                targets.extend(target.elts)
            elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                names.add(target.attr)
    return names


@pytest.mark.parametrize("module", ["engine", "metrics", "resume"])
def test_training_classes_set_every_attribute_first_in_init(module: str) -> None:
    """Every attribute a training class ever sets is set in its __init__, so an instance's fields are
    all visible there (and a resume state cannot miss one that appears mid-run)."""
    source = Path(__file__).resolve().parents[1] / "training" / f"{module}.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    assert classes
    for cls in classes:
        methods = [node for node in cls.body if isinstance(node, ast.FunctionDef)]
        in_init = set().union(*(_attributes_set(m) for m in methods if m.name == "__init__"))
        for method in methods:
            if method.name != "__init__":
                assert _attributes_set(method) <= in_init, f"{cls.name}.{method.name}"


def test_the_attribute_check_sees_a_late_attribute() -> None:
    tree = ast.parse(
        "class A:\n    def __init__(self):\n        self.a = 1\n    def go(self):\n        self.a, self.b = 2, 3\n"
    )
    init, go = tree.body[0].body  # type: ignore[attr-defined]
    assert _attributes_set(init) == {"a"} and _attributes_set(go) == {"a", "b"}


# --- fine-tuning ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pretrained")
    run(tiny(epochs=1), RunOptions(runs_dir=root, run_id="src", device="cpu"))
    return root / "src"


def test_finetune_resamples_position_embeddings_like_timm(tmp_path: Path, pretrained_run: Path) -> None:
    source = load_checkpoint(pretrained_run / "last.safetensors")
    depth = source.meta.config.depth
    cfg = replace(
        presets.finetune(),
        model=presets.tiny().model,
        data=presets.tiny().data,
        finetune=replace(
            presets.finetune().finetune, source=str(pretrained_run), img_size=(48, 32), freeze_blocks=depth
        ),
        epochs=1,
        batch_size=16,
    )
    run(cfg, options(tmp_path, "hires"))
    tuned = load_checkpoint(tmp_path / "hires" / "last.safetensors")
    expected = resample_abs_pos_embed(
        source.model.pos_embed.detach(), new_size=(6, 4), old_size=(4, 4), num_prefix_tokens=1
    )
    # Everything up to the last block is frozen, so the resampled table is exactly what training ends with.
    assert torch.equal(tuned.model.pos_embed.detach(), expected)
    assert torch.equal(tuned.model.blocks[0].attn.qkv.weight, source.model.blocks[0].attn.qkv.weight)
    assert tuned.meta.input_size == (48, 32) and tuned.meta.config.img_size == (48, 32)
    assert tuned.meta.resolution_history == [{"method": "bicubic", "old_grid": [4, 4], "new_grid": [6, 4]}]
    assert tuned.meta.training["finetuned_from"] == str(pretrained_run)
    assert not torch.equal(tuned.model.head.weight, torch.zeros_like(tuned.model.head.weight))  # the head trained


def test_finetune_starts_from_a_zero_head_and_the_source_backbone(pretrained_run: Path) -> None:
    cfg = replace(presets.tiny(), finetune=replace(presets.tiny().finetune, source=str(pretrained_run)))
    loaded = engine.load_model(str(pretrained_run))
    vit, model_cfg, _ = engine._finetune_model(loaded, cfg, ["a", "b", "c"])
    assert model_cfg.num_classes == 3 and vit.head.weight.shape == (3, 32)
    assert not vit.head.weight.any() and not vit.head.bias.any()
    source_state = loaded.model.state_dict()
    for key, value in vit.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, source_state[key]), key


def test_layer_decay_scales_learning_rates_by_depth() -> None:
    cfg = tiny(optim=replace(presets.tiny().optim, lr=1.0, layer_decay=0.5))
    vit = build_model(cfg.model)
    optimizer = build_optimizer(vit, vit, cfg)
    trainer = Trainer(cfg, vit, CPU, mean=(0.5,) * 3, std=(0.5,) * 3, total_steps=10, warmup_steps=0)
    trainer.set_lr(0)
    lr_of = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    # stem = layer 0, block i = layer i + 1, head = layer 3 (depth 2): scale 0.5 ** (3 - layer)
    assert lr_of[id(vit.patch_embed.proj.weight)] == 0.125
    assert lr_of[id(vit.blocks[0].mlp.fc1.weight)] == 0.25
    assert lr_of[id(vit.blocks[1].mlp.fc1.weight)] == 0.5
    assert lr_of[id(vit.head.weight)] == 1.0
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(vit.pos_embed)] == 0.0 and decay_of[id(vit.blocks[0].norm1.weight)] == 0.0


def test_freezing_blocks_freezes_the_stem_and_first_blocks(pretrained_run: Path) -> None:
    vit = build_model(presets.tiny().model)
    engine.freeze_early_layers(vit, 1)
    trainable = {name for name, p in vit.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("patch_embed", "pos_embed", "cls_token", "blocks.0.")) for n in trainable)
    assert any(n.startswith("blocks.1.") for n in trainable) and "head.weight" in trainable
    with pytest.raises(VitvizError, match="more than the model's 2 blocks"):
        engine.freeze_early_layers(build_model(presets.tiny().model), 3)


def test_masked_checkpoint_fine_tunes_into_a_classifier(tmp_path: Path) -> None:
    masked = tiny(objective="masked", epochs=1)
    result = run(masked, options(tmp_path, "mpp"))
    checkpoint = load_checkpoint(tmp_path / "mpp" / "last.safetensors")
    assert checkpoint.meta.config.num_classes == 512 and len(checkpoint.meta.class_names) == 512
    assert checkpoint.meta.training["objective"] == "masked" and result.metrics["train_accuracy"] is not None
    cfg = tiny(epochs=1, finetune=replace(presets.tiny().finetune, source=str(tmp_path / "mpp"), freeze_blocks=2))
    run(cfg, options(tmp_path, "mpp-ft"))
    tuned = load_checkpoint(tmp_path / "mpp-ft" / "last.safetensors")
    assert tuned.meta.config.num_classes == 10 and tuned.meta.class_names[0] == "circle"
    assert torch.equal(tuned.model.blocks[1].mlp.fc2.weight, checkpoint.model.blocks[1].mlp.fc2.weight)
    assert torch.equal(tuned.model.pos_embed, checkpoint.model.pos_embed)


def test_finetune_from_a_missing_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    cfg = tiny(finetune=replace(presets.tiny().finetune, source=str(tmp_path / "nothing")))
    with pytest.raises(VitvizError, match="no such checkpoint"):
        run(cfg, options(tmp_path, "nope"))
    assert not (tmp_path / "nope").exists()
