"""Figure: the command line's start. `python -m vitviz --help` against `python -c "import argparse"`.

Measured: a fresh interpreter running `python -m vitviz --help` (the parser of every command's name, the
registry's declarations; no torch). Baseline: a fresh interpreter importing argparse, the floor of any Python
command line. Both are timed by the wall clock from here, in interleaved rounds, as the user waits for them.

Both read compiled bytecode, as a user's interpreter does after the first run: the children get a bytecode cache
of their own (`PYTHONPYCACHEPREFIX`, filled by the warm-up rounds) even where the environment sets
`PYTHONDONTWRITEBYTECODE`. Without it every run would compile vitviz's modules from source while argparse comes
compiled with the interpreter (about 8 ms of `vitviz.cli` alone), which no user's second command pays.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import LOWER, Figure, Plan, paired_timing

TARGET = 1.5
ROOT = Path(__file__).resolve().parents[1]


def _run(env: dict[str, str], *argv: str) -> None:
    subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)


def cached_bytecode_env(cache: str) -> dict[str, str]:
    """This environment with bytecode written to and read from `cache` (the interpreter's default behaviour)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = cache
    return env


def cli_figures(plan: Plan) -> list[Figure]:
    """The start of `python -m vitviz --help` over the start of an interpreter that imports argparse."""
    repeats = 3 if plan.label == "tiny" else max(plan.repeats, 5)
    with tempfile.TemporaryDirectory(prefix="vitviz-pycache-") as cache:
        env = cached_bytecode_env(cache)
        timing = paired_timing(
            lambda: _run(env, "-c", "import argparse"),
            lambda: _run(env, "-m", "vitviz", "--help"),
            warmup=2,
            repeats=repeats,
            clock="wall",
            min_round_s=0.1 if plan.label == "tiny" else 0.5,  # one start varies by +-50% from the next
        )
    return [
        Figure(
            name="cli --help start",
            value=timing.ratio,
            target=TARGET,
            better=LOWER,
            unit="ratio",
            baseline=(
                f'python -c "import argparse" in a fresh interpreter: {timing.baseline_s:.3f} s wall time'
                " (both with a bytecode cache)"
            ),
            detail=timing.detail(),
        )
    ]
