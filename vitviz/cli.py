"""`python -m vitviz`: analyse a ViT from the command line.

    python -m vitviz info MODEL [--weights FILE] [--pretrained] [--json]
    python -m vitviz analyze MODEL [--weights FILE] [--pretrained] [--images PATH ...]
        [--analyses filters,position,distance,rollout,gradient-rollout] [--json OUT] [--figures DIR]
        [--components K] [--distance-mode paper|renormalised] [--head-fusion mean|max|min]
        [--discard-ratio R] [--start-layer S] [--target-class C] [--batch-size B]

MODEL is a vitviz checkpoint (.safetensors), a run folder, or timm:<name>. A user's mistake prints one
line on stderr and exits with status 2; progress goes to stderr, results to the files asked for (or the
JSON to stdout with `--json -`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from vitviz.allocator import tune_malloc
from vitviz.errors import VitvizError
from vitviz.fileio import atomic_write_text

logger = logging.getLogger("vitviz")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump) with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m vitviz", description="See what a Vision Transformer has learned.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_model(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="a vitviz checkpoint (.safetensors), a run folder, or timm:<name>")
        p.add_argument("--weights", help="a local state dict (.safetensors, .pth, .bin) for a timm:<name> model")
        p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the network)")

    info = sub.add_parser("info", help="print a model's card: architecture, tokens, training, resolution history")
    add_model(info)
    info.add_argument("--json", action="store_true", help="print the card as JSON")

    analyze = sub.add_parser("analyze", help="run the paper's analyses and write JSON and figures")
    add_model(analyze)
    analyze.add_argument("--images", nargs="+", default=[], metavar="PATH", help="image files or folders of images")
    analyze.add_argument(
        "--analyses", help="comma-separated subset of filters,position,distance,rollout,gradient-rollout"
    )
    analyze.add_argument("--json", dest="json_out", metavar="OUT", help="write the results as JSON ('-' for stdout)")
    analyze.add_argument("--figures", metavar="DIR", help="write the paper-style figures as PNG and SVG")
    analyze.add_argument("--components", type=int, default=28, help="principal components of the filters (28)")
    analyze.add_argument("--distance-mode", default="paper", help="paper (default) or renormalised")
    analyze.add_argument("--head-fusion", default="mean", help="rollout head fusion: mean (default), max or min")
    analyze.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: share of weakest links dropped")
    analyze.add_argument("--start-layer", type=int, default=0, help="rollout: first layer multiplied in")
    analyze.add_argument("--target-class", type=int, help="gradient rollout class (default: the prediction)")
    analyze.add_argument("--batch-size", type=int, default=16, help="images per forward (16)")
    return parser


def collect_images(paths: Sequence[str]) -> list[Path]:
    """Expand files and folders (their image files, sorted) into a list of files."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise VitvizError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {raw}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise VitvizError(f"no such image file or folder: {raw}")
    return files


def _load(args: argparse.Namespace):  # -> LoadedModel
    from vitviz.models import load_model

    return load_model(args.model, weights=args.weights, pretrained=args.pretrained)


def cmd_info(args: argparse.Namespace) -> int:
    from vitviz.models import count_parameters
    from vitviz.pipeline import model_summary

    loaded = _load(args)
    card = model_summary(loaded)
    meta = loaded.meta
    card.update(
        {
            "parameters": count_parameters(loaded.model),
            "in_chans": meta.in_chans,
            "mean": list(meta.mean),
            "std": list(meta.std),
            "config": meta.config.to_dict() if meta.config is not None else None,
            "class_names": list(meta.class_names),
            "training": meta.training,
            "resolution_history": meta.resolution_history,
            "content_hash": loaded.content_hash,
        }
    )
    if args.json:
        print(json.dumps(card, indent=2))
        return 0
    lines = [
        f"model       {card['source']}  ({card['arch']})",
        f"parameters  {card['parameters']:,}",
        f"input       {card['img_size'][0]}x{card['img_size'][1]} px, {card['in_chans']} channel(s)",
        f"tokens      {card['grid'][0]}x{card['grid'][1]} patches of {card['stride'][0]}x{card['stride'][1]} px"
        f" + {card['num_prefix_tokens']} prefix token(s)",
        f"transformer depth {card['depth']}, {card['num_heads']} heads, width {card['embed_dim']}",
        f"classes     {card['num_classes']}: {', '.join(card['class_names'][:10])}"
        + (" ..." if len(card["class_names"]) > 10 else ""),
    ]
    if meta.config is not None:
        cfg = meta.config
        lines.append(f"variant     position embedding {cfg.pos_embed}, stem {cfg.stem}, pooling {cfg.global_pool}")
    if meta.training:
        summary = ", ".join(f"{k}={v}" for k, v in meta.training.items() if not isinstance(v, (dict, list)))
        lines.append(f"training    {summary}")
        metrics = meta.training.get("final_metrics") or meta.training.get("metrics")
        if isinstance(metrics, dict):
            lines.append(
                "metrics     "
                + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            )
    for entry in meta.resolution_history:
        lines.append(f"resampled   {entry.get('old_grid')} -> {entry.get('new_grid')} ({entry.get('method')})")
    print("\n".join(lines))
    return 0


def _load_images(files: Sequence[Path], loaded) -> torch.Tensor:
    from vitviz.images import load_for_model

    meta = loaded.meta
    tensors = [
        load_for_model(path, input_size=tuple(meta.input_size), mean=meta.mean, std=meta.std, in_chans=meta.in_chans)
        for path in files
    ]
    return torch.stack(tensors)


def cmd_analyze(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vitviz.pipeline import (
        IMAGE_ANALYSES,
        AnalysisOptions,
        filters_section,
        image_sections,
        model_summary,
        parse_analyses,
        position_section,
        run_image_analyses,
    )
    from vitviz.tokens import token_layout

    analyses = parse_analyses(args.analyses)
    options = AnalysisOptions(
        components=args.components,
        distance_mode=args.distance_mode,
        head_fusion=args.head_fusion,
        discard_ratio=args.discard_ratio,
        start_layer=args.start_layer,
        target_class=args.target_class,
        batch_size=args.batch_size,
    )
    if args.json_out is None and args.figures is None:
        raise VitvizError("nothing to write: pass --json OUT (or --json -) and/or --figures DIR")
    files = collect_images(args.images)
    wanted_image_analyses = [a for a in analyses if a in IMAGE_ANALYSES]
    if wanted_image_analyses and not files:
        if args.analyses is not None:
            raise VitvizError(f"{', '.join(wanted_image_analyses)} need images: pass --images PATH ...")
        logger.info("no --images given: skipping %s", ", ".join(wanted_image_analyses))
        analyses = [a for a in analyses if a not in IMAGE_ANALYSES]

    loaded = _load(args)
    model = loaded.model
    layout = token_layout(model)
    if options.target_class is not None and not 0 <= options.target_class < model.num_classes:
        raise VitvizError(
            f"--target-class {options.target_class} is out of range: the model has {model.num_classes} classes"
        )
    result: dict[str, Any] = {"model": model_summary(loaded)}
    pca = similarity = None
    if "filters" in analyses:
        result["filters"], pca = filters_section(model, options.components)
    if "position" in analyses:
        result["position"], similarity = position_section(model, layout)
    images = None
    image_results = None
    if any(a in IMAGE_ANALYSES for a in analyses):
        images = _load_images(files, loaded)
        with tqdm(total=len(files), desc="analysing images", unit="img", file=sys.stderr, disable=None) as bar:
            image_results = run_image_analyses(
                loaded, images, analyses, options, progress=lambda done: bar.update(done - bar.n)
            )
        result.update(image_sections(image_results, [str(f) for f in files], options))

    if args.json_out is not None:
        text = json.dumps(result)
        if args.json_out == "-":
            sys.stdout.write(text + "\n")
        else:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(args.json_out), text)
            logger.info("wrote %s", args.json_out)
    if args.figures is not None:
        written = write_figures(Path(args.figures), loaded, result, pca, similarity, images, image_results, files)
        logger.info("wrote %d figures to %s", len(written), args.figures)
    return 0


def write_figures(folder: Path, loaded, result, pca, similarity, images, image_results, files) -> list[Path]:
    """The paper-style matplotlib figures for every analysis that ran, as PNG and SVG."""
    from vitviz.images import to_display
    from vitviz.plots import paper

    written: list[Path] = []
    meta = loaded.meta
    if pca is not None:
        fig = paper.filters_figure(pca.components.numpy(), pca.explained_variance_ratio.numpy())
        written += paper.save_figure(fig, folder / "filters")
    if similarity is not None:
        fig = paper.position_similarity_figure(similarity.numpy())
        written += paper.save_figure(fig, folder / "position")
    if image_results is not None and image_results.distance is not None:
        d = image_results.distance
        fig = paper.distance_figure(d.pixels.numpy(), std=d.std.numpy())
        written += paper.save_figure(fig, folder / "distance")
    if image_results is not None:
        for kind, maps in (("rollout", image_results.rollout_maps), ("gradient-rollout", image_results.gradient_maps)):
            if maps is None:
                continue
            for index, (path, relevance) in enumerate(zip(files, maps)):
                picture = to_display(images[index], meta.mean, meta.std)
                title = "Attention rollout" if kind == "rollout" else "Gradient-weighted rollout"
                fig = paper.rollout_overlay_figure(picture, relevance.numpy(), title=f"{title}: {path.name}")
                written += paper.save_figure(fig, folder / f"{kind}-{index:03d}-{path.stem}")
    return written


def _configure_logging() -> None:
    """Progress and notes go to the current stderr as "vitviz: ..." lines (one handler, however often called)."""
    for handler in [h for h in logger.handlers if getattr(h, "_vitviz_cli", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vitviz: %(message)s"))
    handler._vitviz_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn a user's mistake into one line and status 2."""
    _configure_logging()
    args = build_parser().parse_args(argv)
    tune_malloc()  # freed tensor memory stays for the next batch (vitviz/allocator.py)
    try:
        if args.command == "info":
            return cmd_info(args)
        return cmd_analyze(args)
    except VitvizError as exc:
        print(f"vitviz: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # e.g. an output folder that cannot be written
        print(f"vitviz: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("vitviz: interrupted", file=sys.stderr)
        return 130
