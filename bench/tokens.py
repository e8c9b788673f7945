"""Bench figures: the token analyses' memory and time."""

from __future__ import annotations

from pathlib import Path

from bench.common import Figure, Plan


def token_figures(plan: Plan, scratch: Path) -> list[Figure]:
    """The figures for plan.label ("full", "quick" or "tiny")."""
    return []
