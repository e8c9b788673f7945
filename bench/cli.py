"""Figure: the command line's start. `python -m vitviz --help` against `python -c "import argparse"`.

Measured: a fresh interpreter running `python -m vitviz --help` (the parser of every command's name, the
registry's declarations; no torch). Baseline: a fresh interpreter importing argparse, the floor of any Python
command line. Both are timed by the wall clock from here, in interleaved rounds, as the user waits for them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import LOWER, Figure, Plan, paired_timing

TARGET = 1.5
ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> None:
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, capture_output=True, timeout=300)


def cli_figures(plan: Plan) -> list[Figure]:
    """The start of `python -m vitviz --help` over the start of an interpreter that imports argparse."""
    repeats = 3 if plan.label == "tiny" else max(plan.repeats, 5)
    timing = paired_timing(
        lambda: _run("-c", "import argparse"),
        lambda: _run("-m", "vitviz", "--help"),
        warmup=1,
        repeats=repeats,
        clock="wall",
    )
    return [
        Figure(
            name="cli --help start",
            value=timing.ratio,
            target=TARGET,
            better=LOWER,
            unit="ratio",
            baseline=f'python -c "import argparse" in a fresh interpreter: {timing.baseline_s:.3f} s wall time',
            detail=timing.detail(),
        )
    ]
