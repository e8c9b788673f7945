"""The tables of docs/faithfulness.md, from the JSON files `python -m vitviz faithfulness --dataset` wrote.

    python docs/faithfulness_tables.py shapes-default=runs/shapes-default-test1000.json \\
        shapes-hybrid=runs/shapes-hybrid-cheap1000.json+runs/shapes-hybrid-ig0.json+runs/shapes-hybrid-ig1.json

Each argument is a model's name and one or more JSON files joined by "+": runs of the same model, protocol and
steps over parts of one split (a costly method run on fewer images, or a split cut in pieces). Their per-image
AUCs are joined by image index. A method's intervals are over every image it has; the paired comparisons of two
methods are over the images both have, so a method run on the first 128 images is compared with the others on
those 128. Intervals and verdicts are `vitviz.intervals.summarise` (2,000 paired resamples, seed 0), exactly as
the command computes them for one run.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitviz.intervals import CURVES, summarise  # noqa: E402

Runs = dict[str, dict[int, tuple[float, float]]]  # method -> image index -> (deletion AUC, insertion AUC)


def read_runs(paths: Sequence[Path]) -> tuple[Runs, dict, dict]:
    """Every method's per-image AUCs over the files, the first file's protocol and model; files whose protocol
    differs are refused."""
    runs: Runs = {}
    protocol, model = None, None
    for path in paths:
        document = json.loads(path.read_text(encoding="utf-8"))
        if protocol is None:
            protocol, model = document["protocol"], document["model"]
        elif document["protocol"] != protocol or document["model"]["source"] != model["source"]:
            raise SystemExit(f"{path}: another model or protocol than {paths[0]}")
        offset = _slice_start(document["dataset"]["split"])  # indices count from the start of a sliced split
        for method, result in document["methods"].items():
            images = runs.setdefault(method, {})
            for image in result["per_image"]:
                images[offset + int(image["index"])] = (float(image["deletion_auc"]), float(image["insertion_auc"]))
    assert protocol is not None and model is not None
    return runs, protocol, model


def _slice_start(split: str) -> int:
    """Where a split sliced by image counts starts in the whole split: test[64:128] -> 64, test -> 0."""
    found = re.fullmatch(r"\w+\[(\d*):\d*\]", split.strip())
    if found is None:
        if "[" in split:
            raise SystemExit(f"split {split!r}: only slices by image counts can be joined (test[64:128])")
        return 0
    return int(found.group(1) or 0)


def convergence_lines(paths: Sequence[Path]) -> list[str]:
    """Integrated gradients' completeness over every image of the files: the median relative error and the step
    counts it took."""
    errors: list[float] = []
    steps: list[int] = []
    for path in paths:
        found = json.loads(path.read_text(encoding="utf-8"))["methods"].get("integrated-gradients", {})
        if found.get("convergence"):
            errors += found["convergence"]["relative_error"]
            steps += found["convergence"]["steps"]
    if not errors:
        return []
    counts = ", ".join(f"{n}: {steps.count(n)}" for n in sorted(set(steps)))
    return [
        f"Integrated gradients over {len(errors)} images: median completeness error {100 * np.median(errors):.2f}% "
        f"(largest {100 * max(errors):.1f}%); steps per image {counts}."
    ]


def _aucs(runs: Runs, methods: Sequence[str], indices: Sequence[int]) -> tuple[dict, dict]:
    deletion = {m: np.array([runs[m][i][0] for i in indices]) for m in methods}
    insertion = {m: np.array([runs[m][i][1] for i in indices]) for m in methods}
    return deletion, insertion


def method_rows(runs: Runs) -> list[str]:
    """One table row per method: images, each curve's mean AUC and its 95% interval."""
    rows = []
    for method, images in runs.items():
        indices = sorted(images)
        summary = summarise(*_aucs(runs, [method], indices))
        cells = []
        for curve, position in (("deletion", 0), ("insertion", 1)):
            mean = float(np.mean([images[i][position] for i in indices]))
            low, high = summary.intervals[method][curve]
            cells.append(f"{mean:.3f} [{low:.3f}, {high:.3f}]")
        rows.append(f"| {method} | {len(indices)} | {cells[0]} | {cells[1]} |")
    return rows


def pair_lines(runs: Runs) -> list[str]:
    """Every pair of methods on each curve, over the images both have: the difference, its interval, the
    verdict."""
    methods = list(runs)
    lines = []
    for i, first in enumerate(methods):
        for second in methods[i + 1 :]:
            shared = sorted(set(runs[first]) & set(runs[second]))
            summary = summarise(*_aucs(runs, [first, second], shared))
            for curve in CURVES:
                pair = summary.comparison(curve, first, second)
                low, high = pair.interval
                told = pair.better or "not told apart"
                lines.append(
                    f"| {curve} | {first} − {second} | {len(shared)} | {pair.difference:+.3f} [{low:+.3f}, {high:+.3f}]"
                    f" | {told} |"
                )
    return lines


def verdict_lines(runs: Runs) -> list[str]:
    """`Summary.verdict()` over the images every method has: which method leads each curve, and each against
    random."""
    lines = []
    most = max(len(images) for images in runs.values())
    groups = [list(runs)]
    if any(len(images) < most for images in runs.values()):  # also the methods run on every image, alone
        groups.append([method for method, images in runs.items() if len(images) == most])
    for methods in groups:
        shared = sorted(set.intersection(*(set(runs[m]) for m in methods)))
        summary = summarise(*_aucs(runs, methods, shared))
        lines.append(f"Over the {len(shared)} images {len(methods)} methods share ({', '.join(methods)}):")
        lines += [f"- {line}" for line in summary.verdict()]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments:
        print(__doc__)
        return 2
    for argument in arguments:
        name, _, files = argument.partition("=")
        paths = [Path(f) for f in files.split("+")]
        runs, protocol, model = read_runs(paths)
        print(f"### {name} ({model['arch']}, {protocol['steps']} steps, target {protocol['target']})\n")
        print("| method | images | deletion AUC ↓ [95%] | insertion AUC ↑ [95%] |")
        print("| --- | --- | --- | --- |")
        print("\n".join(method_rows(runs)))
        print("\n" + "\n".join(convergence_lines(paths)))
        print("\n" + "\n".join(verdict_lines(runs)))
        print("\n| curve | first − second | images | difference [95%] | better |")
        print("| --- | --- | --- | --- | --- |")
        print("\n".join(pair_lines(runs)))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
