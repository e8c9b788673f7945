"""The map methods' `--methods` names, without torch: the command line's help and its argument checks read them
here, so `python -m vitviz faithfulness --help` and a misspelt method answer before torch is imported.

`vitviz.methods` registers one implementation under each of these names, in this order (a test checks that the
registry and this list agree); this module only names them.
"""

from __future__ import annotations

from collections.abc import Sequence

from vitviz.errors import VitvizError

__all__ = ["COMPARE_METHODS", "DEFAULT_METHODS", "METHODS", "parse_method_list"]

METHODS = (
    "rollout",
    "gradient-rollout",
    "attention-last",
    "integrated-gradients",
    "occlusion",
    "random",
    "grad-cam",
    "attnlrp",
)
DEFAULT_METHODS = ("rollout", "gradient-rollout", "attention-last", "integrated-gradients", "random")
# `vitviz compare`'s AUCs: the methods that cost one forward (and one backward) per image and curve step.
COMPARE_METHODS = ("rollout", "gradient-rollout", "attention-last", "random")


def parse_method_list(
    text: str | Sequence[str] | None, known: Sequence[str] = METHODS, default: Sequence[str] = DEFAULT_METHODS
) -> list[str]:
    """A comma-separated method list (or a sequence of names), each checked against `known`, repeats dropped;
    None gives `default`. Unknown or empty: a one-line VitvizError listing the known names."""
    if text is None:
        return list(default)
    raw = text.split(",") if isinstance(text, str) else list(text)
    names = [name.strip() for name in raw if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise VitvizError(f"unknown method {', '.join(unknown) or repr(text)}: choose from {','.join(known)}")
    return list(dict.fromkeys(names))
