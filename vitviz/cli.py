"""`python -m vitviz`: analyse a ViT from the command line.

    python -m vitviz info MODEL [--weights FILE] [--pretrained] [--json]
    python -m vitviz analyze MODEL [--weights FILE] [--pretrained] [--images PATH ...]
        [--analyses filters,position,distance,rollout,gradient-rollout] [--json OUT] [--figures DIR]
        [--components K] [--distance-mode paper|renormalised] [--head-fusion mean|max|min]
        [--discard-ratio R] [--start-layer S] [--target-class C] [--batch-size B]
        [--outlier-factor F] [--mass-share S]   (also: tokens,features,head-maps,logit-lens in --analyses)
    python -m vitviz faithfulness MODEL [--weights FILE] [--pretrained] --images PATH ... [--methods LIST]
        [--steps S] [--target-class C] [--sanity] [--json OUT] [--figures DIR] [--batch-size B] [--ig-steps K]
        [--ig-max-steps K]
    python -m vitviz compare A B [--weights-a FILE] [--weights-b FILE] [--pretrained] (--dataset NAME [--limit N]
        | --images PATH ...) [--json OUT] [--figures DIR] [--batch-size B] [--distance-mode M] [--head-fusion F]
        [--discard-ratio R] [--start-layer S] [--methods LIST|none] [--steps S]
    python -m vitviz models [--json | --markdown] [--refresh [--exact]]

Instead of --images, both analyze and faithfulness take a slice of a data set, streamed in batches:
    --dataset shapes|digits|mnist|cifar10|folder:PATH [--split test] [--limit N] [--root DIR] [--download]
and then also run under `torchrun --nproc_per_node=K`, the images shared out between the processes and the
JSON (written by rank 0) the one a single process writes (docs/design.md, "Data sets and torchrun").

MODEL is a vitviz checkpoint (.safetensors), a run folder, or timm:<name>, optionally built smaller with timm's
keyword arguments: timm:<name>?depth=2&img_size=64 (depth, img_size, num_classes). A user's mistake prints one
line on stderr and exits with status 2; progress goes to stderr, results to the files asked for (or the
JSON to stdout with `--json -`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from vitviz.allocator import releasing, tune_malloc
from vitviz.errors import VitvizError, one_line, shown
from vitviz.fileio import atomic_write_text

if TYPE_CHECKING:  # imported where used, so `--help` and argument errors stay fast (no torch before a command runs)
    import torch

    from vitviz.models import LoadedModel
    from vitviz.pipeline import (
        AnalysisOptions,
        ImageResults,
        ModelCard,
    )

logger = logging.getLogger("vitviz")

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump) with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


# The commands, with the line `python -m vitviz --help` shows for each.
COMMANDS = {
    "info": "print a model's card: architecture, tokens, training, resolution history",
    "analyze": "run the paper's analyses and write JSON and figures",
    "faithfulness": "deletion/insertion curves of explanation maps and the cascading-randomisation check",
    "compare": "what changed between two models: linear CKA, predictions, attention distance, mean maps, AUCs",
    "models": "print which ViT architectures vitviz analyses (the support table)",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, with `command`, of that one only (the others listed by name): then
    `python -m vitviz --help` and a mistake in one command's arguments import nothing that command does not
    need, and no torch."""
    parser = _Parser(prog="python -m vitviz", description="See what a Vision Transformer has learned.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def declared(name: str) -> bool:
        if command is None or command == name:
            return True
        sub.add_parser(name, help=COMMANDS[name])
        return False

    def add_model(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "model",
            help="a vitviz checkpoint (.safetensors), a run folder, or timm:<name>[?depth=D&img_size=S&num_classes=C]",
        )
        p.add_argument("--weights", help="a local state dict (.safetensors, .pth, .bin) for a timm:<name> model")
        p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the network)")

    if declared("info"):
        info = sub.add_parser("info", help=COMMANDS["info"])
        add_model(info)
        info.add_argument("--json", action="store_true", help="print the card as JSON")
    if declared("analyze"):
        analyze = sub.add_parser("analyze", help=COMMANDS["analyze"])
        add_model(analyze)
        analyze.add_argument("--images", nargs="+", default=[], metavar="PATH", help="image files or folders of images")
        add_dataset_arguments(analyze)
        add_analysis_arguments(analyze)
    if declared("faithfulness"):
        add_faithfulness_parser(sub, add_model)
    if declared("compare"):
        add_compare_parser(sub)
    if declared("models"):
        models = sub.add_parser("models", help=COMMANDS["models"])
        models.add_argument("--json", action="store_true", help="print the table as JSON")
        models.add_argument("--markdown", action="store_true", help="print the table as Markdown (README.md's block)")
        models.add_argument("--refresh", action="store_true", help="re-run the survey (minutes) and store the table")
        models.add_argument("--exact", action="store_true", help="with --refresh: compare with each model's eager maps")
    return parser


def add_analysis_arguments(p: argparse.ArgumentParser) -> None:
    """--analyses, --json, --figures and every analysis option, read from the registry (vitviz/analyses)."""
    from vitviz import analyses as registry

    listed = ", ".join(a.name + (" (default)" if a.default else "") for a in registry.analyses())
    p.add_argument("--analyses", help=f"comma-separated subset of: {listed}")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the results as JSON ('-' for stdout)")
    p.add_argument("--figures", metavar="DIR", help="write the paper-style figures as PNG and SVG")
    p.add_argument(
        "--colormap",
        default="viridis",
        help="colour map of the figures' maps and overlays, a matplotlib name (viridis)",
    )
    for option in registry.options():
        default = "" if option.default is None else f" ({option.default})"
        p.add_argument(
            option.flag, dest=option.name, type=option.type, default=option.default, help=option.help + default
        )


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """--dataset, --split, --limit, --root, --download: a data-set slice instead of --images."""
    p.add_argument(
        "--dataset",
        metavar="NAME",
        help="a data set instead of --images: shapes, digits, mnist, cifar10 (or fashion-mnist, cifar100), folder:PATH",
    )
    p.add_argument("--split", default="test", help="train, val or test, optionally sliced: test[:500] (test)")
    p.add_argument("--limit", type=int, help="only the first N images of the split")
    p.add_argument("--root", help="where mnist/cifar10 are (mnist: default the bundled test set; cifar10: ./data)")
    p.add_argument("--download", action="store_true", help="let torchvision download cifar10 (needs the network)")


def _dataset_slice(args: argparse.Namespace) -> Any:
    """The DatasetSlice that --dataset asks for, or None; --images with --dataset, or torchrun without it, is refused."""
    import os

    if args.dataset is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise VitvizError("under torchrun, pass --dataset: the processes share out a data set's images")
        for name in ("limit", "root"):
            if getattr(args, name) is not None:
                raise VitvizError(f"--{name} needs --dataset")
        return None
    if args.images:
        raise VitvizError("pass --images or --dataset, not both")
    from vitviz.data.stream import DatasetSlice

    return DatasetSlice.parse(args.dataset, split=args.split, limit=args.limit, root=args.root)


def _open_slice(slice_: Any, loaded: LoadedModel, download: bool) -> Any:
    """The slice preprocessed as `loaded` expects (its input size, channels and normalisation)."""
    from vitviz.data.stream import open_dataset

    meta = loaded.meta
    return open_dataset(
        slice_, input_size=meta.input_size, in_chans=meta.in_chans, mean=meta.mean, std=meta.std, download=download
    )


def _load(args: argparse.Namespace) -> LoadedModel:
    from vitviz.models import load_model

    return load_model(args.model, weights=args.weights, pretrained=args.pretrained)


def info_lines(card: ModelCard) -> list[str]:
    """The model card as the lines `info` prints: `vitviz.card`'s rows, each label in a column of its own."""
    from vitviz.card import card_rows

    return [f"{label:<11} {value}" for label, value in card_rows(card)]


def cmd_info(args: argparse.Namespace) -> int:
    from vitviz.pipeline import model_card

    card = model_card(_load(args))
    if args.json:
        print(json.dumps(card.to_dict(), indent=2))
    else:
        print("\n".join(info_lines(card)))
    return 0


def _load_images(files: Sequence[Path], loaded: LoadedModel) -> torch.Tensor:
    from vitviz.images import load_for_model

    meta = loaded.meta
    tensors = [
        load_for_model(path, input_size=tuple(meta.input_size), mean=meta.mean, std=meta.std, in_chans=meta.in_chans)
        for path in files
    ]
    import torch

    return torch.stack(tensors)


# --- the JSON contract (README, "The JSON") ------------------------------------------------------------


def image_sections(results: ImageResults, image_names: Sequence[str]) -> dict[str, Any]:
    """The JSON sections of the image analyses that ran (or `{"not_applicable": reason}` for those that do not
    apply to the model), each as its analysis declares it."""
    from vitviz import analyses as registry

    return {
        a.section: registry.section(a, results[a.name], image_names)
        for a in registry.analyses()
        if a.name in results.by_name
    }


def _model_sections(loaded: LoadedModel, analyses: Sequence[str], options: AnalysisOptions) -> tuple[dict, dict]:
    """The JSON's model section and the sections of the analyses of the weights, and their results for figures."""
    from vitviz import analyses as registry
    from vitviz.pipeline import model_card

    document: dict[str, Any] = {"model": model_card(loaded).model_section()}
    results: dict[str, Any] = {}
    for analysis in registry.analyses():
        if analysis.name in analyses and analysis.compute is not None:
            results[analysis.name] = analysis.compute(loaded, options)
            document[analysis.section] = registry.section(analysis, results[analysis.name], [])
    return document, results


def _check_colormap(name: str) -> None:
    import matplotlib

    if name not in matplotlib.colormaps:
        raise VitvizError(f"--colormap {name!r} is not a matplotlib colour map (for example viridis, magma, jet)")


def cmd_analyze(args: argparse.Namespace) -> int:
    from vitviz import analyses as registry

    # Every argument is checked before torch is imported (the registry's declarations are light).
    analyses = registry.parse(args.analyses)
    options = registry.AnalysisOptions(**{o.name: getattr(args, o.name) for o in registry.options()})
    if args.json_out is None and args.figures is None:
        raise VitvizError("nothing to write: pass --json OUT (or --json -) and/or --figures DIR")
    _check_colormap(args.colormap)

    from tqdm import tqdm

    from vitviz.imagefiles import collect_images
    from vitviz.pipeline import IMAGE_ANALYSES, image_analyses

    slice_ = _dataset_slice(args)
    if slice_ is not None:
        return analyze_dataset(args, slice_, analyses, options)
    files = collect_images(args.images)
    wanted_image_analyses = [a for a in analyses if a in IMAGE_ANALYSES]
    if wanted_image_analyses and not files:
        if args.analyses is not None:
            raise VitvizError(f"{', '.join(wanted_image_analyses)} need images: pass --images PATH ...")
        logger.info("no --images given: skipping %s", ", ".join(wanted_image_analyses))
        analyses = [a for a in analyses if a not in IMAGE_ANALYSES]

    loaded = _load(args)
    options.check_model(loaded, analyses)
    result, weight_results = _model_sections(loaded, analyses, options)
    images = None
    image_results = None
    if any(a in IMAGE_ANALYSES for a in analyses):
        images = _load_images(files, loaded)
        with tqdm(total=len(files), desc="analysing images", unit="img", file=sys.stderr, disable=None) as bar:
            image_results = image_analyses(
                loaded, images, analyses, options, progress=lambda done, _total: bar.update(done - bar.n)
            )
        result.update(image_sections(image_results, [str(f) for f in files]))

    if args.json_out is not None:
        write_json(result, args.json_out)
    if args.figures is not None:
        written = write_figures(
            Path(args.figures), loaded, weight_results, images, image_results, files, colormap=args.colormap
        )
        logger.info("wrote %d figures to %s", len(written), args.figures)
    return 0


def write_json(document: dict[str, Any], out: str) -> None:
    """Write a result document to `out` atomically, or to stdout for '-'."""
    text = json.dumps(document)
    if out == "-":
        sys.stdout.write(text + "\n")
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out), text)
    logger.info("wrote %s", out)


def cmd_models(args: argparse.Namespace) -> int:
    """Print the support table (vitviz/support_table.json); --refresh re-runs the survey first."""
    from vitviz import support

    if args.json and args.markdown:
        raise VitvizError("choose one of --json and --markdown")
    if args.exact and not args.refresh:
        raise VitvizError("--exact applies to --refresh (the stored table says whether it was checked)")
    if args.refresh:

        def progress(row: support.Row, done: int, total: int) -> None:
            print(support.progress_line(row, done, total), file=sys.stderr, flush=True)

        table = support.survey(exact=args.exact, progress=progress)
        support.save_table(table)
        logger.info("wrote %s (%d rows, %d s)", support.TABLE_PATH, len(table["rows"]), table["seconds"])
        if support.update_readme(table):
            logger.info("updated the support table in %s", support.README_PATH)
    else:
        table = support.load_table()
    if args.json:
        print(json.dumps(support.json_table(table), indent=1))
    else:
        print(support.markdown_table(table) if args.markdown else support.text_table(table), end="")
    return 0


def add_faithfulness_parser(sub: Any, add_model: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `faithfulness` subparser; `sub` is build_parser()'s subparsers action, `add_model` its helper."""
    from vitviz.method_names import DEFAULT_METHODS, METHODS

    p = sub.add_parser("faithfulness", help=COMMANDS["faithfulness"])
    add_model(p)
    p.add_argument("--images", nargs="+", default=[], metavar="PATH", help="image files or folders of images")
    add_dataset_arguments(p)
    p.add_argument(
        "--methods",
        help=f"comma-separated subset of {','.join(METHODS)} (default {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--steps", type=int, help="curve steps S (default min(patches, 50))")
    p.add_argument("--target-class", type=int, help="class whose probability is followed (default: the prediction)")
    p.add_argument("--sanity", action="store_true", help="also run the cascading-randomisation sanity check")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the results as JSON ('-' for stdout)")
    p.add_argument("--figures", metavar="DIR", help="write the curves (and sanity) figures as PNG and SVG")
    p.add_argument("--batch-size", type=int, default=64, help="masked inputs per forward (64)")
    p.add_argument(
        "--ig-steps", type=int, default=50, help="integrated gradients: the first interpolation step count (50)"
    )
    p.add_argument(
        "--ig-max-steps",
        type=int,
        default=800,
        help="integrated gradients: steps are doubled up to this until the completeness error is at most 5%% "
        "(800; at most 8192)",
    )


def cmd_faithfulness(args: argparse.Namespace) -> int:
    """Run the comparison and write the JSON and figures asked for."""
    from vitviz.method_names import parse_method_list

    parse_method_list(args.methods)  # a misspelt method is refused before torch is imported
    if args.json_out is None and args.figures is None:
        raise VitvizError("nothing to write: pass --json OUT (or --json -) and/or --figures DIR")

    from tqdm import tqdm

    from vitviz.faithfulness import FaithfulnessOptions, parse_methods, run_faithfulness
    from vitviz.imagefiles import collect_images
    from vitviz.pipeline import model_card

    options = FaithfulnessOptions(  # checks methods, steps, batch size before anything is loaded
        methods=tuple(parse_methods(args.methods)),
        steps=args.steps,
        target_class=args.target_class,
        batch_size=args.batch_size,
        ig_steps=args.ig_steps,
        ig_max_steps=args.ig_max_steps,
        sanity=args.sanity,
    )
    slice_ = _dataset_slice(args)
    if slice_ is not None:
        return faithfulness_dataset(args, slice_, options)
    if not args.images:
        raise VitvizError("faithfulness needs images: pass --images PATH ... or --dataset NAME")
    files = collect_images(args.images)
    loaded = _load(args)
    images = _load_images(files, loaded)
    total = len(files) * len(options.methods)
    with tqdm(total=total, desc="faithfulness", unit="map", file=sys.stderr, disable=None) as bar:
        done: dict[str, int] = {}

        def progress(method: str, finished: int) -> None:
            done[method] = finished
            bar.update(sum(done.values()) - bar.n)

        result = run_faithfulness(loaded.model, images, [str(f) for f in files], options, progress=progress)
    for name, method in result.methods.items():
        logger.info("%s: deletion AUC %.4f, insertion AUC %.4f over %d images", name,
                    method.deletion_auc, method.insertion_auc, len(files))  # fmt: skip
    document = result.to_json(model_card(loaded).model_section())

    if args.json_out is not None:
        write_json(document, args.json_out)
    if args.figures is not None:
        written = write_faithfulness_figures(Path(args.figures), result)
        logger.info("wrote %d figures to %s", len(written), args.figures)
    return 0


# --- data sets, streamed, and torchrun (docs/design.md, "Data sets and torchrun") ----------------------


def dataset_sections(results: Any, slice_: Any, class_names: Sequence[str], options: Any) -> dict[str, Any]:
    """The JSON's "dataset", "distance", "rollout" and "gradient_rollout" sections of a data-set run.

    `class_names` are the data set's; the accuracy is given only when they are the model's classes.
    """
    from vitviz import analyses as registry
    from vitviz.pipeline import NotApplicable

    per_image: list[dict[str, Any]] = []
    for position, (index, label) in enumerate(zip(results.indices.tolist(), results.labels.tolist())):
        entry: dict[str, Any] = {"image": slice_.image_name(index), "index": index, "label": label}
        if results.predicted is not None:
            entry["predicted"] = int(results.predicted[position])
            entry["probability"] = float(results.probability[position])
        if results.gradient_targets is not None:
            entry["gradient_target"] = int(results.gradient_targets[position])
        per_image.append(entry)
    sections: dict[str, Any] = {
        "dataset": {
            **slice_.describe(),
            "num_images": results.num_images,
            "class_names": list(class_names),
            "accuracy": results.accuracy() if list(class_names) == list(options["model_classes"]) else None,
            "per_image": per_image,
        }
    }
    if results.distance is not None:  # serialised as for --images
        sections["distance"] = registry.section(registry.get("distance"), results.distance, [])
    for key, mean, extra in (
        ("rollout", results.rollout_mean, options["rollout"]),
        ("gradient_rollout", results.gradient_mean, options["gradient_rollout"]),
    ):
        if isinstance(mean, NotApplicable):
            sections[key] = {"not_applicable": mean.reason}
        elif mean is not None:
            sections[key] = {**extra, "num_images": results.num_images, "mean_map": mean.tolist()}
    return sections


def _agree_on_failure(ranks: Any, exc: BaseException) -> None:
    """Under torchrun, a rank that meets a user error before the ranks' one gather sends it there, so every rank
    stops with the same one-line error (printed by rank 0) instead of the others waiting for it."""
    message = str(exc) if isinstance(exc, VitvizError) else os_error_line(exc)  # type: ignore[arg-type]
    ranks.fail(exc, message)


def _quiet_unless_main(ranks: Any) -> None:
    """Under torchrun only rank 0 reports: the other ranks' notes are dropped (their errors still print)."""
    if not ranks.is_main:
        logger.setLevel(logging.WARNING)


def _progress_bar(total: int, desc: str, unit: str, ranks: Any) -> Any:
    """tqdm on stderr for rank 0 (its share of the work under torchrun), disabled on the other ranks."""
    from tqdm import tqdm

    if ranks.world_size > 1:
        desc = f"{desc} (rank 0 of {ranks.world_size})"
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None if ranks.is_main else True)


def analyze_dataset(args: argparse.Namespace, slice_: Any, analyses: list[str], options: Any) -> int:
    """`analyze --dataset`: filters and position once, the image analyses streamed over the slice (and ranks)."""
    from vitviz.data.stream import Ranks, dataset_batches, rank_batches
    from vitviz.pipeline import IMAGE_ANALYSES, dataset_analyses

    ranks = Ranks.from_environment()
    _quiet_unless_main(ranks)
    try:
        loaded = _load(args)
        options.check_model(loaded, analyses)
        data = _open_slice(slice_, loaded, args.download)
        result, weight_results = _model_sections(loaded, analyses, options)
        image_results = None
        if any(a in IMAGE_ANALYSES for a in analyses):
            mine = sum(len(b) for b in rank_batches(len(data), options.batch_size, ranks.rank, ranks.world_size))
            with _progress_bar(mine, f"analysing {slice_.name} {slice_.split}", "img", ranks) as bar:
                image_results = dataset_analyses(
                    loaded,
                    dataset_batches(data, options.batch_size, ranks=ranks),
                    analyses,
                    options,
                    progress=releasing(bar.update),  # freed heap memory goes back every few batches
                    ranks=ranks,
                )
            target = "predicted" if options.target_class is None else options.target_class
            section_options = {
                "model_classes": list(loaded.meta.class_names),
                "rollout": {
                    "head_fusion": options.head_fusion,
                    "discard_ratio": options.discard_ratio,
                    "start_layer": options.start_layer,
                },
                "gradient_rollout": {"target_class": target},
            }
            result.update(dataset_sections(image_results, slice_, data.class_names, section_options))
        if not ranks.is_main:
            return 0
        if args.json_out is not None:
            write_json(result, args.json_out)
        if args.figures is not None:
            folder = Path(args.figures)
            if image_results is not None and image_results.distance is not None:
                weight_results["distance"] = image_results.distance  # the mean maps have no figure
            written = write_figures(folder, loaded, weight_results, None, None, [], colormap=args.colormap)
            logger.info("wrote %d figures to %s", len(written), args.figures)
        return 0
    except (VitvizError, OSError) as exc:
        _agree_on_failure(ranks, exc)
        raise
    finally:
        ranks.close()


def faithfulness_dataset(args: argparse.Namespace, slice_: Any, options: Any) -> int:
    """`faithfulness --dataset`: the curves streamed over the slice (and ranks), per image only the AUCs."""
    from vitviz.data.stream import Ranks, dataset_batches, rank_batches
    from vitviz.faithfulness import dataset_faithfulness
    from vitviz.pipeline import model_card

    ranks = Ranks.from_environment()
    _quiet_unless_main(ranks)
    try:
        if options.sanity:
            raise VitvizError("--sanity keeps every map of every randomisation stage: run it on --images")
        loaded = _load(args)
        data = _open_slice(slice_, loaded, args.download)
        # The curves' batch is --batch-size masked inputs; the images come 16 at a time (the maps' batch).
        images_per_batch = min(options.batch_size, 16)
        mine = sum(len(b) for b in rank_batches(len(data), images_per_batch, ranks.rank, ranks.world_size))
        with _progress_bar(mine * len(options.methods), "faithfulness", "map", ranks) as bar:
            result = dataset_faithfulness(
                loaded.model,
                dataset_batches(data, images_per_batch, ranks=ranks),
                options,
                image_name=slice_.image_name,
                dataset=slice_.describe(),
                ranks=ranks,
                progress=releasing(bar.update),
            )
        if not ranks.is_main:
            return 0
        if args.json_out is not None:
            write_json(result.to_json(model_card(loaded).model_section()), args.json_out)
        if args.figures is not None:
            from vitviz.plots import faithfulness as plots
            from vitviz.plots.paper import save_figure

            deletion = {name: m.mean_deletion.numpy() for name, m in result.methods.items()}
            insertion = {name: m.mean_insertion.numpy() for name, m in result.methods.items()}
            title = f"{slice_.name} {slice_.split}: {result.dataset['num_images']} image(s), S = {result.steps}"
            written = save_figure(
                plots.curves_figure(deletion, insertion, title=title), Path(args.figures) / "faithfulness-curves"
            )
            logger.info("wrote %d figures to %s", len(written), args.figures)
        return 0
    except (VitvizError, OSError) as exc:
        _agree_on_failure(ranks, exc)
        raise
    finally:
        ranks.close()


def write_faithfulness_figures(folder: Path, result: Any) -> list[Path]:
    """`faithfulness-curves` (mean over images) and, with --sanity, `faithfulness-sanity`, as PNG and SVG."""
    import numpy as np

    from vitviz.plots import faithfulness as plots
    from vitviz.plots.paper import save_figure

    deletion = {
        name: np.stack([c.deletion.numpy() for c in method.per_image]) for name, method in result.methods.items()
    }
    insertion = {
        name: np.stack([c.insertion.numpy() for c in method.per_image]) for name, method in result.methods.items()
    }
    images = len(next(iter(result.methods.values())).per_image)
    title = f"{images} image(s), S = {result.steps}, target " + (
        "predicted" if result.target_class is None else f"class {result.target_class}"
    )
    written = save_figure(plots.curves_figure(deletion, insertion, title=title), folder / "faithfulness-curves")
    if result.sanity is not None:
        first = next(iter(result.sanity.values()))
        spearman = {name: list(s.spearman) for name, s in result.sanity.items()}
        written += save_figure(plots.sanity_figure(first.randomised, spearman), folder / "faithfulness-sanity")
    return written


def write_figures(
    folder: Path,
    loaded: LoadedModel,
    weight_results: dict[str, Any],
    images: torch.Tensor | None,
    image_results: ImageResults | None,
    files: Sequence[Path],
    colormap: str = "viridis",
) -> list[Path]:
    """The paper-style matplotlib figures of every analysis that ran and has figures, as PNG and SVG."""
    from vitviz.pipeline import analysis_figures
    from vitviz.plots import paper

    results = dict(weight_results)
    if image_results is not None:
        results.update(image_results.by_name)
    shown = images if images is not None else []
    written: list[Path] = []
    names = [str(f) for f in files] if images is not None else []
    for stem, figure in analysis_figures(loaded, results, shown, names, colormap):
        written += paper.save_figure(figure, folder / stem)
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


def _is_main_process() -> bool:
    """Whether this process speaks for the job: always, but for the ranks other than 0 under torchrun."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0


def os_error_line(exc: OSError) -> str:
    """An OSError as one line: what went wrong and, quoted, the file it happened to."""
    text = one_line(str(exc.strerror or exc))
    return f"{text}: {shown(exc.filename)}" if exc.filename else text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn a user's mistake into one line and status 2."""
    _configure_logging()
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in words if not word.startswith("-")), "")
    args = build_parser(command if command in COMMANDS else "").parse_args(words)
    tune_malloc()  # freed tensor memory stays for the next batch (vitviz/allocator.py)
    try:
        if args.command == "info":
            return cmd_info(args)
        if args.command == "faithfulness":
            return cmd_faithfulness(args)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "compare":
            return cmd_compare(args)
        return cmd_analyze(args)
    except VitvizError as exc:
        if _is_main_process():  # under torchrun every rank has the same error (Ranks.fail): rank 0 says it
            print(f"vitviz: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # e.g. an output folder that cannot be written, a full disk
        print(f"vitviz: error: {os_error_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("vitviz: interrupted", file=sys.stderr)
        return 130


# --- compare: what changed between two models (docs/design.md, "Comparing two models") -----------------------

COMPARE_OPTIONS = ("batch_size", "distance_mode", "head_fusion", "discard_ratio", "start_layer")


def add_compare_parser(sub: Any) -> None:
    """The `compare` subparser: two models of any source, the same images, every registered comparison."""
    from vitviz import analyses as registry
    from vitviz.method_names import COMPARE_METHODS

    p = sub.add_parser("compare", help=COMMANDS["compare"])
    p.add_argument("model_a", metavar="A", help="a vitviz checkpoint (.safetensors), a run folder, or timm:<name>")
    p.add_argument("model_b", metavar="B", help="the model compared with A (any source, any architecture)")
    p.add_argument("--weights-a", help="a local state dict for a timm:<name> model A")
    p.add_argument("--weights-b", help="a local state dict for a timm:<name> model B")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights for timm:<name> models")
    p.add_argument("--images", nargs="+", default=[], metavar="PATH", help="image files or folders of images")
    add_dataset_arguments(p)
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the results as JSON ('-' for stdout)")
    p.add_argument(
        "--figures", metavar="DIR", help="write the CKA heat map, distance shift, difference maps and AUC intervals"
    )
    p.add_argument(
        "--methods",
        help="comma-separated map methods whose deletion and insertion AUCs both models get, as faithfulness "
        f"--methods names them; none: no AUCs (default {','.join(COMPARE_METHODS)})",
    )
    p.add_argument("--steps", type=int, help="curve steps S of the AUCs (default min(patches, 50) for each model)")
    for option in (o for o in registry.options() if o.name in COMPARE_OPTIONS):
        help_text = option.help + ("; linear CKA's minibatch b, at least 4" if option.name == "batch_size" else "")
        p.add_argument(
            option.flag,
            dest=option.name,
            type=option.type,
            default=option.default,
            help=f"{help_text} ({option.default})",
        )


def _compare_faithfulness(args: argparse.Namespace) -> Any:
    """The FaithfulnessOptions of compare's --methods and --steps (checked before any model is loaded), or None for
    --methods none (or empty)."""
    from vitviz.method_names import COMPARE_METHODS, parse_method_list

    if args.methods is not None and args.methods.strip().lower() in ("", "none"):
        if args.steps is not None:
            raise VitvizError("--steps applies to the AUCs, and --methods none asks for none")
        return None
    parse_method_list(args.methods, default=COMPARE_METHODS)  # before torch is imported

    from vitviz.faithfulness import FaithfulnessOptions, parse_methods

    methods = parse_methods(COMPARE_METHODS if args.methods is None else args.methods)
    return FaithfulnessOptions(methods=tuple(methods), steps=args.steps)


def _image_file_batches(files: Sequence[Path], batch_size: int) -> Callable[[LoadedModel], Any]:
    """Batches of (images, labels -1, indices) of image files, each read and preprocessed for the model asked."""
    import torch

    from vitviz.images import load_for_model

    def open_batches(loaded: LoadedModel) -> Any:
        meta = loaded.meta
        for start in range(0, len(files), batch_size):
            chosen = files[start : start + batch_size]
            images = torch.stack(
                [
                    load_for_model(
                        f, input_size=tuple(meta.input_size), mean=meta.mean, std=meta.std, in_chans=meta.in_chans
                    )
                    for f in chosen
                ]
            )
            yield images, torch.full((len(chosen),), -1), torch.arange(start, start + len(chosen))

    return open_batches


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare two models on the same images and write the JSON and figures asked for."""
    import os

    from vitviz import analyses as registry

    options = registry.AnalysisOptions(**{name: getattr(args, name) for name in COMPARE_OPTIONS})
    if args.json_out is None and args.figures is None:
        raise VitvizError("nothing to write: pass --json OUT (or --json -) and/or --figures DIR")
    faithfulness = _compare_faithfulness(args)

    from vitviz.comparison import compare_models, slice_batches, work
    from vitviz.data.stream import Ranks
    from vitviz.imagefiles import collect_images
    from vitviz.models import load_model
    from vitviz.pipeline import model_card

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise VitvizError("compare runs in one process: run it without torchrun")
    slice_ = _dataset_slice(args)
    if slice_ is None and not args.images:
        raise VitvizError("compare needs images: pass --dataset NAME or --images PATH ...")
    models = [
        load_model(source, weights=weights, pretrained=args.pretrained)
        for source, weights in ((args.model_a, args.weights_a), (args.model_b, args.weights_b))
    ]
    for loaded in models:  # refuse options that do not fit a model before any forward
        options.check_model(loaded, ["distance", "rollout", "gradient-rollout"])
        for analysis in registry.pairs():
            if analysis.check_model is not None:
                analysis.check_model(loaded, options)
    if slice_ is not None:
        open_batches, names, classes = slice_batches(slice_, models, options.batch_size, download=args.download)
        dataset = {**slice_.describe(), "num_images": len(names), "class_names": classes}
    else:
        files = collect_images(args.images)
        names, classes, open_batches = [str(f) for f in files], None, _image_file_batches(files, options.batch_size)
        dataset = {"images": names, "num_images": len(names)}
    methods = () if faithfulness is None else faithfulness.methods
    with _progress_bar(work(len(names), methods), "comparing", "img", Ranks()) as bar:
        comparison = compare_models(
            *models,
            open_batches,
            options,
            image_names=names,
            dataset_classes=classes,
            progress=releasing(bar.update),
            faithfulness=faithfulness,
        )
    cards = [model_card(m).model_section() for m in models]
    document = {"models": {"a": cards[0], "b": cards[1]}, "dataset": dataset, **comparison.to_json()}
    if args.json_out is not None:
        write_json(document, args.json_out)
    if args.figures is not None:
        written = write_compare_figures(Path(args.figures), models[0], models[1], comparison)
        logger.info("wrote %d figures to %s", len(written), args.figures)
    return 0


def write_compare_figures(folder: Path, loaded_a: LoadedModel, loaded_b: LoadedModel, comparison: Any) -> list[Path]:
    """Every comparison's registered figures (the CKA heat map), the distance shift where the shapes match, the
    B − A mean-map differences and both models' AUCs with their intervals, as PNG and SVG."""
    import numpy as np

    from vitviz import analyses as registry
    from vitviz.plots import comparison as plots
    from vitviz.plots.paper import save_figure

    context = registry.FigureContext(loaded_a, other=loaded_b)
    written: list[Path] = []
    for analysis in registry.pairs():
        result = comparison.pairs.get(analysis.name)
        if analysis.figures is not None and result is not None and not isinstance(result, registry.NotApplicable):
            for stem, figure in analysis.figures(result, context):
                written += save_figure(figure, folder / stem)
    shift, _ = comparison.distance_shift()
    if shift is not None:
        written += save_figure(plots.distance_shift_figure(shift), folder / "distance-shift")
    maps = {}
    for which, title in (("rollout", "rollout, B − A"), ("gradient", "gradient rollout, B − A")):
        found = comparison.map_difference(which)
        if not isinstance(found, str):
            maps[title] = found.differences["B"].values
    if maps:
        limit = max(float(np.abs(v).max()) for v in maps.values()) or 1e-12
        written += save_figure(plots.difference_maps_figure(maps, limit), folder / "map-differences")
    points = comparison.auc_points()
    if any(points.values()):
        written += save_figure(plots.auc_intervals_figure(points), folder / "faithfulness-aucs")
    return written
