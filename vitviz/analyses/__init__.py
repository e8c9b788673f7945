"""The analysis registry: every analysis vitviz runs on a model, each declared once in its own module here.

    from vitviz.analyses import AnalysisOptions, get, names
    names()                      # ('filters', 'position', 'distance', 'rollout', ...) in order
    get("distance").to_json      # its JSON section

A module in this package that calls `register(Analysis(...))` is an analysis: it is found when the package is
imported (as timm finds its models through `@register_model`), so adding one touches no other file here.
`AnalysisOptions` is made from the shared options and every analysis's own, with their defaults and checks.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Sequence
from typing import Any

from vitviz.analyses.base import (
    Analysis,
    FigureContext,
    NotApplicable,
    Option,
    PairContext,
    PairStream,
    Stream,
    StreamContext,
    at_least,
    check_target_class,
)
from vitviz.errors import VitvizError

__all__ = [
    "Analysis",
    "AnalysisOptions",
    "FigureContext",
    "NotApplicable",
    "Option",
    "PairContext",
    "PairStream",
    "Stream",
    "StreamContext",
    "analyses",
    "check_target_class",
    "default_names",
    "get",
    "image_names",
    "names",
    "options",
    "pair_names",
    "pairs",
    "parse",
    "register",
    "section",
]

_REGISTRY: dict[str, Analysis] = {}


# Options more than one analysis reads.
SHARED_OPTIONS = (
    Option("target_class", None, "the class gradient rollout and the logit lens follow (default: the prediction)", int),
    Option("batch_size", 16, "images per forward", int, at_least(1)),
)


def register(analysis: Analysis) -> Analysis:
    """Add an analysis to the registry (its name and JSON section must be new); returns it."""
    taken = {a.section for a in _REGISTRY.values()}
    if analysis.name in _REGISTRY or analysis.section in taken:
        raise ValueError(f"analysis {analysis.name!r} (section {analysis.section!r}) is registered already")
    _REGISTRY[analysis.name] = analysis
    return analysis


def unregister(name: str) -> None:
    """Remove an analysis (tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def analyses() -> tuple[Analysis, ...]:
    """Every registered analysis of one model, in order (the comparisons of two models are `pairs()`)."""
    return tuple(sorted((a for a in _REGISTRY.values() if not a.on_pairs), key=lambda a: (a.order, a.name)))


def pairs() -> tuple[Analysis, ...]:
    """Every registered comparison of two models over the same images, in order (`python -m vitviz compare`)."""
    return tuple(sorted((a for a in _REGISTRY.values() if a.on_pairs), key=lambda a: (a.order, a.name)))


def pair_names() -> tuple[str, ...]:
    return tuple(a.name for a in pairs())


def names() -> tuple[str, ...]:
    return tuple(a.name for a in analyses())


def default_names() -> tuple[str, ...]:
    """What runs when --analyses is not given."""
    return tuple(a.name for a in analyses() if a.default)


def image_names() -> tuple[str, ...]:
    """The analyses of images (the others read only the weights)."""
    return tuple(a.name for a in analyses() if a.on_images)


def get(name: str) -> Analysis:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise VitvizError(f"unknown analysis {name!r}: choose from {','.join(names())}") from None


def parse(text: str | None) -> list[str]:
    """Parse a comma-separated --analyses list; None means the default analyses."""
    if text is None:
        return list(default_names())
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in names()]
    if unknown or not chosen:
        raise VitvizError(f"unknown analysis {', '.join(unknown) or repr(text)}: choose from {','.join(names())}")
    return list(dict.fromkeys(chosen))


def options() -> tuple[Option, ...]:
    """The shared options, then every analysis's own, in the registry's order (then the comparisons' own)."""
    return SHARED_OPTIONS + tuple(o for a in analyses() + pairs() for o in a.options)


def section(analysis: Analysis, result: Any, image_names: Sequence[str]) -> Any:
    """The JSON section of one result: `{"not_applicable": reason}` or the analysis's own form."""
    if isinstance(result, NotApplicable):
        return {"not_applicable": result.reason}
    return analysis.to_json(result, image_names)


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def _make_options_class() -> type:
    declared = options()
    by_name = {o.name: o for o in declared}
    if len(by_name) != len(declared):
        raise ValueError("two analyses declare the same option")

    def __post_init__(self: Any) -> None:
        for option in declared:
            option.validate(getattr(self, option.name))

    def check_model(self: Any, loaded: Any, chosen: Sequence[str] | None = None) -> None:
        """Refuse options that do not fit this model (a start layer past the last, a class it does not have)."""
        for name in chosen if chosen is not None else names():
            analysis = _REGISTRY.get(name)
            if analysis is not None and analysis.check_model is not None:
                analysis.check_model(loaded, self)

    cls = dataclasses.make_dataclass(
        "AnalysisOptions",
        [(o.name, Any, dataclasses.field(default=o.default)) for o in declared],
        namespace={"__post_init__": __post_init__, "check_model": check_model, "__module__": __name__},
        frozen=True,
    )
    cls.__doc__ = "Every analysis option with its default; invalid values are refused when the object is made."
    return cls


_discover()
AnalysisOptions = _make_options_class()
