"""The studio's pages, declared once: `app.py` builds its navigation from this list and the overview's guide
reads it. Nothing but the standard library is imported here, so the list costs nothing to read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Page:
    """One page of the studio."""

    path: str  # the page's script, relative to the repository root
    title: str  # its name in the sidebar and in the overview's guide
    url_path: str  # "" for the default page, which is served at /
    about: str  # one line for the overview's guide: what the page shows

    @property
    def default(self) -> bool:
        return self.url_path == ""


PAGES: tuple[Page, ...] = (
    Page(
        "vitviz/ui/overview.py",
        "Overview",
        "",
        "the selected model's card, how it was trained and its training curves.",
    ),
    Page(
        "vitviz/ui/filters.py",
        "Patch filters",
        "filters",
        "the learned patch-embedding filters and their principal components.",
    ),
    Page(
        "vitviz/ui/position.py",
        "Position embeddings",
        "position",
        "how similar each position's embedding is to every other, and after resampling.",
    ),
    Page(
        "vitviz/ui/distance.py",
        "Attention distance",
        "distance",
        "how far each head looks, layer by layer, over many images.",
    ),
    Page(
        "vitviz/ui/rollout.py",
        "Attention rollout",
        "rollout",
        "which patches explain a prediction, and where one patch attends in every head.",
    ),
    Page(
        "vitviz/ui/tokens.py",
        "Tokens",
        "tokens",
        "what the tokens carry: high-norm tokens, attention to prefix tokens, feature PCA, head maps, logit lens.",
    ),
    Page(
        "vitviz/ui/explore.py",
        "Every analysis",
        "analyses",
        "any analysis vitviz has, with the figures and JSON the command line writes for it.",
    ),
    Page(
        "vitviz/ui/trust.py",
        "Which map to trust?",
        "trust",
        "methods side by side with their deletion and insertion curves, AUCs and the sanity check.",
    ),
    Page(
        "vitviz/ui/compare.py",
        "Compare models",
        "compare",
        "two or more checkpoints side by side on the same inputs.",
    ),
    Page(
        "vitviz/ui/train.py",
        "Train",
        "train",
        "start a training or fine-tuning run and follow its curves live.",
    ),
)


def guide() -> tuple[Page, ...]:
    """The pages the overview's guide lists: every page but the overview itself."""
    return tuple(page for page in PAGES if not page.default)
