"""Bench figures: deletion/insertion curve cost and data-set memory."""

from __future__ import annotations

from pathlib import Path

from bench.common import Figure, Plan


def faithfulness_figures(plan: Plan, scratch: Path) -> list[Figure]:
    """The figures for plan.label ("full", "quick" or "tiny")."""
    return []
