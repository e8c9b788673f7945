"""Distributed training: torchrun with 2 CPU (gloo) processes computes the same weights as one process with
the same global batch, and only rank 0 writes the run folder; the same for a timm model fine-tuned with LoRA,
stopped and resumed under torchrun."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.fakes import torchrun
from training import presets
from training.config import apply_overrides
from training.distributed import DistContext
from training.engine import RunOptions, epoch_order, rank_batches, run
from vitviz.models import read_state_dict

# SGD with momentum: Adam's first steps divide each gradient by its own magnitude, which turns float
# rounding differences in near-zero gradients into +-lr jumps, so only SGD can be compared at 1e-5.
OVERRIDES = {
    "optim.name": "sgd",
    "optim.lr": "0.05",
    "optim.momentum": "0.9",
    "grad_accum": "2",
    "epochs": "2",
    "resume_every": "100",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ranks_together_take_exactly_the_single_process_batch() -> None:
    order = epoch_order(64, seed=3, epoch=1)
    assert sorted(order) == list(range(64)) and order != epoch_order(64, seed=3, epoch=2)
    single = rank_batches(order, 16, DistContext(0, 1, 0, torch.device("cpu")), 0, 4)
    for world in (2, 4):
        shards = [rank_batches(order, 16, DistContext(r, world, r, torch.device("cpu")), 0, 4) for r in range(world)]
        for step in range(4):
            assert all(len(shard[step]) == 16 // world for shard in shards)
            assert sorted(i for shard in shards for i in shard[step]) == sorted(single[step])
    # Starting at step 2 (a resume) gives the batches that were not seen yet, and nothing else.
    assert rank_batches(order, 16, DistContext(0, 1, 0, torch.device("cpu")), 2, 4) == single[2:]


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    cfg = presets.tiny()
    cfg = replace(
        cfg,
        optim=replace(cfg.optim, name="sgd", lr=0.05, momentum=0.9),
        grad_accum=2,
        epochs=2,
        resume_every=100,
    )
    assert apply_overrides(presets.tiny(), [f"{k}={v}" for k, v in OVERRIDES.items()]) == cfg  # same config both ways
    run(cfg, RunOptions(runs_dir=tmp_path, run_id="single", device="cpu"))

    args = [
        "train",
        "--preset",
        "tiny",
        "--no-progress",
        "--device",
        "cpu",
        "--runs-dir",
        str(tmp_path),
        "--run-id",
        "ddp",
    ]
    torchrun("training", *args, *(f"--set={key}={value}" for key, value in OVERRIDES.items()), timeout=300)

    single = read_state_dict(tmp_path / "single" / "last.safetensors")
    ddp = read_state_dict(tmp_path / "ddp" / "last.safetensors")
    assert single.keys() == ddp.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5, msg=key)
    after_epoch_1 = read_state_dict(tmp_path / "single" / "checkpoints" / "epoch-001.safetensors")
    moved = max(float((single[k] - after_epoch_1[k]).abs().max()) for k in single)
    assert moved > 1e-3  # the weights really changed in the steps compared, so agreement means something

    saved = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert saved["batch_size"] == 16 and saved["grad_accum"] == 2  # the global batch, as for one process
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 9))  # rank 0 alone logs
    single_records = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    for ours, theirs in zip(records, single_records):
        assert ours["kind"] == theirs["kind"]
        if ours.get("loss") is not None:
            assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)  # losses averaged over both ranks
    assert json.loads((tmp_path / "ddp" / "status.json").read_text())["status"] == "finished"


# A timm model fine-tuned with LoRA: DDP wraps the peft model, whose frozen base weights it must leave out of its
# gradient buckets, and the checkpoint holds the merged weights and the adapters, from the unwrapped model.
FINETUNE = [
    "finetune", "--from", "timm:vit_tiny_patch16_224", "--model-kwargs", "depth=2", "--img-size", "32", "32",
    "--dataset", "shapes", "--strategy", "lora", "--no-progress", "--device", "cpu",
]  # fmt: skip
FINETUNE_OVERRIDES = {
    "optim.lr": "0.2",  # the finetune preset's SGD with momentum, clipped at norm 1
    "batch_size": "16",
    "grad_accum": "2",
    "epochs": "2",
    "data.num_train_samples": "64",  # 4 steps an epoch
    "data.num_eval_samples": "32",
    "data.in_memory": "true",
    "data.num_workers": "0",
    "schedule.warmup_epochs": "0",
    "resume_every": "100",
}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_fine_tune_a_timm_model_with_lora_as_one_process_does(tmp_path: Path) -> None:
    """One process, and two under torchrun stopped mid-epoch (step 3 of 8) and resumed under torchrun: the same
    weights and adapters, and the same epoch records (the resume state holds both ranks' sums)."""
    from training.__main__ import main

    overrides = [arg for key, value in FINETUNE_OVERRIDES.items() for arg in ("--set", f"{key}={value}")]
    assert main([*FINETUNE, *overrides, "--runs-dir", str(tmp_path), "--run-id", "single"]) == 0
    torchrun("training", *FINETUNE, *overrides, "--runs-dir", str(tmp_path), "--run-id", "ddp", "--max-steps", "3")
    stopped = json.loads((tmp_path / "ddp" / "status.json").read_text())
    assert stopped["status"] == "failed" and stopped["resumable"] and stopped["progress"]["step"] == 3
    torchrun("training", "train", "--resume", str(tmp_path / "ddp"), "--no-progress", "--device", "cpu")

    single = read_state_dict(tmp_path / "single" / "last.safetensors")
    ddp = read_state_dict(tmp_path / "ddp" / "last.safetensors")
    assert single.keys() == ddp.keys()
    adapters = [key for key in single if key.startswith("lora.")]
    assert len(adapters) == 4 and not any(key.startswith("module.") for key in single)  # A and B of 2 blocks' qkv
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5, msg=key)
    after_epoch_1 = read_state_dict(tmp_path / "single" / "checkpoints" / "epoch-001.safetensors")
    moved = {key: float((single[key] - after_epoch_1[key]).abs().max()) for key in single}
    assert moved["head.weight"] > 1e-3 and moved["lora.blocks.1.attn.qkv.B"] > 1e-3, moved  # agreement means something
    assert moved["blocks.1.attn.qkv.weight"] > 0  # the adapters merged into the weights
    assert torch.equal(single["blocks.0.mlp.fc1.weight"], after_epoch_1["blocks.0.mlp.fc1.weight"])  # frozen

    saved = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert saved["finetune"]["strategy"] == "lora" and saved["batch_size"] == 16
    ours, theirs = _records(tmp_path / "ddp"), _records(tmp_path / "single")
    assert [(r["kind"], r["step"]) for r in ours] == [(r["kind"], r["step"]) for r in theirs]  # logged once
    for mine, other in zip(ours, theirs, strict=True):
        for key in ("loss", "accuracy", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy"):
            if other.get(key) is not None:
                assert mine[key] == pytest.approx(other[key], abs=1e-5), (mine, key)
    assert json.loads((tmp_path / "ddp" / "status.json").read_text())["status"] == "finished"
