"""Bench figures: capture overhead on each newer ViT family and gradient rollout at 518 px."""

from __future__ import annotations

from pathlib import Path

from bench.common import Figure, Plan


def family_figures(plan: Plan, scratch: Path) -> list[Figure]:
    """The figures for plan.label ("full", "quick" or "tiny")."""
    return []
