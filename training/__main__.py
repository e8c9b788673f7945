"""Train, fine-tune and evaluate ViTs: ``python -m training train|finetune|evaluate``.

One process (CPU, or the GPU when there is one):

    python -m training train --preset shapes-default
    python -m training train --preset mnist-small --set optim.lr=1e-3 --set model.depth=4 --run-id mnist-a
    python -m training train --resume runs/mnist-a            # continue a stopped or killed run exactly
    python -m training finetune --from runs/shapes-a --preset shapes-finetune-hires --img-size 96 96 \\
        --strategy freeze:1 --layer-decay 0.75 --dataset shapes
    python -m training finetune --from timm:vit_small_patch16_224 --pretrained --dataset folder:data/flowers \\
        --strategy lora --lora-rank 8 --ema-decay 0.999 --mixup 0.8 --cutmix 1.0 --smoothing 0.1
    python -m training finetune --from hf:path/to/vit-folder --dataset cifar10 --strategy linear
    python -m training evaluate runs/shapes-a/best.safetensors --dataset shapes --split test --json eval.json

Several processes with DistributedDataParallel (gloo on CPU, nccl on GPU); batch_size stays the global
batch and is split evenly across the processes, rank 0 logs and writes checkpoints:

    torchrun --nproc_per_node=4 -m training train --preset shapes-default
    python -m torch.distributed.run --nproc_per_node=2 --master_port 29511 -m training train --preset tiny

A run writes runs/<run-id>/ (config.json, metrics.jsonl, summary.csv, status.json, best/last and
checkpoints/epoch-NNN.safetensors, state/ for --resume). Mistakes in the arguments print one line and
exit with status 2; a run stopped by non-finite losses exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vitviz.errors import VitvizError

logger = logging.getLogger("training")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as a VitvizError (one line, exit 2) instead of usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise VitvizError(f"{self.prog}: {message}")


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted key, e.g. optim.lr=1e-3 (repeatable)",
    )
    parser.add_argument("--dataset", help="dataset name or folder:PATH (shortcut for --set data.dataset=NAME)")
    _regularisation_options(parser)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="folder that holds run folders")
    parser.add_argument("--run-id", help="name of the run folder (default: <preset>-<date>-<time>)")
    parser.add_argument("--max-steps", type=int, help="stop (resumably) once the run has done this many steps")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _regularisation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mixup", type=float, metavar="ALPHA", help="Mixup alpha (timm.data.Mixup); 0: off")
    parser.add_argument("--cutmix", type=float, metavar="ALPHA", help="CutMix alpha; 0: off")
    parser.add_argument("--smoothing", type=float, metavar="EPS", help="label smoothing, e.g. 0.1")
    parser.add_argument(
        "--ema-decay", type=float, metavar="DECAY", help="keep a model EMA (timm ModelEmaV3), e.g. 0.999"
    )
    parser.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the global gradient norm to NORM")
    parser.add_argument(
        "--grad-checkpointing",
        action="store_true",
        default=None,
        help="recompute each block's activations in the backward pass: less memory, about a third more time",
    )


def _finetune_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--from",
        dest="source",
        required=required,
        metavar="SOURCE",
        help="a checkpoint, a run folder, timm:<name> or hf:<repo id or local folder>",
    )
    parser.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="new input size")
    parser.add_argument(
        "--strategy", help="what trains: full (default), linear (the head), freeze:K, lora (adapters + head)"
    )
    parser.add_argument(
        "--freeze-blocks", type=int, metavar="K", help="freeze the patch embedding and the first K blocks"
    )
    parser.add_argument("--layer-decay", type=float, metavar="RATE", help="layer-wise lr decay, e.g. 0.75")
    parser.add_argument("--weights", metavar="FILE", help="timm: sources: start from this local state dict")
    parser.add_argument("--pretrained", action="store_true", help="timm: sources: timm's weights (network)")
    parser.add_argument(
        "--model-kwargs",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="timm: sources: keyword arguments of timm.create_model, e.g. depth=2",
    )
    parser.add_argument("--lora-rank", type=int, metavar="R", help="LoRA rank (default 8)")
    parser.add_argument("--lora-alpha", type=float, metavar="ALPHA", help="LoRA alpha (default 16)")
    parser.add_argument(
        "--lora-targets",
        metavar="NAMES",
        help="comma-separated Linear names in the blocks to adapt (default: qkv for timm, query/value projections "
        "for transformers)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m training", description="Train, fine-tune and evaluate vitviz ViTs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model from a preset")
    train.add_argument("--preset", default="shapes-default", help="named preset (see training/presets.py)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in this folder")
    _run_options(train)

    finetune = commands.add_parser("finetune", help="fine-tune any model source with a new head")
    finetune.add_argument("--preset", default="finetune", help="preset with the fine-tuning hyper-parameters")
    _finetune_options(finetune, required=True)
    _run_options(finetune)

    check = commands.add_parser(
        "check", help="resolve a run's config without starting it: one error line and exit 2 when it is wrong"
    )
    check.add_argument("--kind", choices=("train", "finetune"), default="train", help="the run it would be")
    check.add_argument("--preset", help="named preset (default: the kind's default preset)")
    _finetune_options(check, required=False)
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--dataset", help="dataset name or folder:PATH (shortcut for --set data.dataset=NAME)")
    _regularisation_options(check)

    presets = commands.add_parser("presets", help="list the presets (--json: every resolved config)")
    presets.add_argument("--json", action="store_true", help="print {name: config} as JSON")

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint on a dataset split")
    evaluate.add_argument("source", metavar="CKPT|RUN_DIR")
    evaluate.add_argument("--dataset", required=True)
    evaluate.add_argument("--split", default="test", help='e.g. "test" or "test[8000:]"')
    evaluate.add_argument("--root", help="folder with the dataset's files")
    evaluate.add_argument("--num-samples", type=int, help="evaluate a seeded subset (or, for shapes, this many images)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    evaluate.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    evaluate.add_argument(
        "--faithfulness-images",
        type=int,
        default=100,
        metavar="N",
        help="deletion/insertion curves on the first N images (100; 0: none); each costs 2(S+1) forwards per method",
    )
    evaluate.add_argument(
        "--faithfulness-steps", type=int, metavar="S", help="curve steps S (default min(patches, 50))"
    )
    evaluate.add_argument(
        "--faithfulness-methods",
        default="rollout,gradient-rollout,random",
        metavar="LIST",
        help="comma-separated methods for the curves (rollout,gradient-rollout,random), as python -m vitviz "
        "faithfulness takes them",
    )
    return parser


def _presets(args: argparse.Namespace) -> int:
    """Print the preset names, or every preset's config as JSON (what the app's /train page offers)."""
    import json

    from training.presets import PRESETS

    if args.json:
        print(json.dumps({name: make().to_dict() for name, make in PRESETS.items()}))
    else:
        for name, make in PRESETS.items():
            doc = (make.__doc__ or "").strip().splitlines()
            print(f"{name:24s} {doc[0] if doc else ''}")
    return 0


def _config_for(args: argparse.Namespace):  # -> TrainConfig
    from training.config import FinetuneConfig, apply_overrides
    from training.data import normalize_dataset_name
    from training.presets import get_preset

    cfg = get_preset(args.preset)
    if args.command == "finetune":
        if any(o.strip().startswith("model.") for o in args.overrides):
            raise VitvizError(
                "fine-tuning keeps the source's architecture; --set model.* is not allowed (use --img-size)"
            )
        base = cfg.finetune
        strategy = _option(args, "strategy") or base.strategy
        freeze = _option(args, "freeze_blocks")
        targets = _option(args, "lora_targets")
        cfg = replace(
            cfg,
            finetune=FinetuneConfig(
                source=args.source,
                img_size=tuple(args.img_size) if args.img_size else base.img_size,
                freeze_blocks=base.freeze_blocks if freeze is None else freeze,
                strategy=strategy.strip(),
                weights=_option(args, "weights"),
                pretrained=bool(_option(args, "pretrained")),
                model_kwargs=tuple(_option(args, "model_kwargs") or ()),
                lora_rank=base.lora_rank if args.lora_rank is None else args.lora_rank,
                lora_alpha=base.lora_alpha if args.lora_alpha is None else args.lora_alpha,
                lora_targets=tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else (),
            ),
            objective="classify",
        )
        if args.layer_decay is not None:
            cfg = replace(cfg, optim=replace(cfg.optim, layer_decay=args.layer_decay))
        named = args.source.startswith(("timm:", "hf:"))
        if not named and not Path(args.source).exists():
            raise VitvizError(
                f"no such checkpoint or run folder: {args.source} (a source is a checkpoint, a run folder, "
                "timm:<name> or hf:<repo id or folder>)"
            )
    regularisation = {
        "mixup": _option(args, "mixup"),
        "cutmix": _option(args, "cutmix"),
        "label_smoothing": _option(args, "smoothing"),
        "ema_decay": _option(args, "ema_decay"),
        "grad_clip": _option(args, "clip_grad"),
        "grad_checkpointing": _option(args, "grad_checkpointing"),
    }
    cfg = replace(cfg, **{k: v for k, v in regularisation.items() if v is not None})
    if args.dataset:
        name, sep, path = args.dataset.partition(":")
        if sep and name.strip().lower() == "folder":  # an ImageFolder tree: folder:PATH
            if not path.strip():
                raise VitvizError("the folder data set needs its path: --dataset folder:PATH")
            cfg = replace(cfg, data=replace(cfg.data, dataset="folder", root=path.strip()))
        else:
            cfg = replace(cfg, data=replace(cfg.data, dataset=args.dataset))
    cfg = apply_overrides(cfg, args.overrides)
    cfg = replace(cfg, data=replace(cfg.data, dataset=normalize_dataset_name(cfg.data.dataset)))
    return cfg


def _option(args: argparse.Namespace, name: str) -> Any:
    """An optional argument's value, None when this command does not take it or it was not given."""
    return getattr(args, name, None)


def _check(args: argparse.Namespace) -> int:
    """Resolve the config `train`/`finetune` would run with the same arguments; print it as JSON when valid."""
    if args.kind == "finetune" and not args.source:
        raise VitvizError("fine-tuning needs a checkpoint to start from (--from)")
    preset = args.preset or ("finetune" if args.kind == "finetune" else "shapes-default")
    resolved = argparse.Namespace(**{**vars(args), "command": args.kind, "preset": preset})
    print(json.dumps(_config_for(resolved).to_dict()))
    return 0


def _train(args: argparse.Namespace) -> int:
    from training.engine import RunOptions, run

    if args.max_steps is not None and args.max_steps <= 0:
        raise VitvizError(f"--max-steps must be positive, got {args.max_steps}")
    resume = getattr(args, "resume", None)
    if resume is not None:
        if args.overrides or args.dataset or args.run_id:
            raise VitvizError("--resume continues a run with its saved config; drop --set, --dataset and --run-id")
        cfg = None
    else:
        cfg = _config_for(args)
    options = RunOptions(
        runs_dir=args.runs_dir,
        run_id=args.run_id,
        resume=resume,
        max_steps=args.max_steps,
        device=args.device,
        progress=not args.no_progress,
    )
    result = run(cfg, options)
    if result.run_dir is not None:
        print(result.run_dir)
        if result.status != "finished":
            logger.info(
                "stopped at step %d; continue with: python -m training train --resume %s", result.step, result.run_dir
            )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.source,
        dataset=args.dataset,
        split=args.split,
        root=args.root,
        num_samples=args.num_samples,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        faithfulness_images=args.faithfulness_images,
        faithfulness_steps=args.faithfulness_steps,
        faithfulness_methods=args.faithfulness_methods,
    )
    line = f"accuracy {result['accuracy']:.4f} on {result['num_images']} images"
    if "pointing_game" in result:
        game = result["pointing_game"]
        line += f"; pointing game: rollout {game['rollout']:.3f}, random patch {game['random']:.3f}"
    if "faithfulness" in result:
        curves = result["faithfulness"]
        aucs = ", ".join(
            f"{name} {m['deletion_auc']:.3f}/{m['insertion_auc']:.3f}" for name, m in curves["methods"].items()
        )
        line += f"; deletion/insertion AUC on {curves['num_images']} images: {aucs}"
    print(line)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise VitvizError(f"cannot write {args.json}: {exc.strerror or exc}") from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("vitviz").setLevel(logging.WARNING)  # one line per saved checkpoint is noise here
    try:
        args = build_parser().parse_args(argv)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "presets":
            return _presets(args)
        if args.command == "check":
            return _check(args)
        return _train(args)
    except VitvizError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a folder that refuses writes, met while the run was going
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"error: could not write the run's files: {exc.strerror or exc}{where}; "
            "the last checkpoint is intact: free space or fix permissions, then --resume",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:
        from training.engine import TrainingFailed

        if isinstance(exc, TrainingFailed):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
