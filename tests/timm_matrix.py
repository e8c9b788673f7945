"""Survey a few timm ViT architectures: a thin wrapper over `vitviz.support`, whose whole table
`python -m vitviz models --refresh [--exact]` regenerates.

    python -m tests.timm_matrix [PATTERN ...] [--names NAME ...] [--exact] [--max-params N]

surveys the timm names matching the patterns (default: every family's) with at most N parameters, or the names
given, exactly as the support table does (depth 2, random weights, every analysis through the pipeline; with
--exact, every captured map against timm's eager one), prints one line per name, then the per-family summary.
"""

from __future__ import annotations

import argparse
import fnmatch
import time
from collections.abc import Iterable

from vitviz import support
from vitviz.support import MAX_PARAMS, Row, survey_timm
from vitviz.support import build_small_timm as build_small
from vitviz.support import timm_eager_attention as eager_attention

FAMILY_PATTERNS = tuple(pattern for family in support.TIMM_FAMILIES for pattern in family.patterns)

__all__ = ["FAMILY_PATTERNS", "MAX_PARAMS", "Row", "build_small", "eager_attention", "family_names", "survey_timm"]


def family_names(patterns: Iterable[str] = FAMILY_PATTERNS, max_params: int = MAX_PARAMS) -> list[str]:
    """The support table's timm names that match the patterns and have at most max_params parameters."""
    patterns = tuple(patterns)
    names = [n for n in support.timm_candidates() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return support.within_limit(support.parameter_counts(names), max_params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", default=list(FAMILY_PATTERNS))
    parser.add_argument("--max-params", type=int, default=MAX_PARAMS)
    parser.add_argument("--names", nargs="*", help="survey these timm names instead of the families")
    parser.add_argument("--exact", action="store_true", help="also compare with timm's eager attention")
    args = parser.parse_args(argv)
    names = args.names or family_names(args.patterns, args.max_params)
    start = time.perf_counter()
    table = support.survey(
        names,
        [],
        exact=args.exact,
        max_params=args.max_params,
        progress=lambda row, done, total: print(support.progress_line(row, done, total), flush=True),
    )
    print(f"\n({time.perf_counter() - start:.0f} s)\n")
    print(support.text_table(table), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
