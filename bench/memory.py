"""Figure 2, memory: peak resident memory of streaming rollout vs plain inference, and the naive way beside it.

Every measurement runs in a fresh Python process (`python -m bench.memory WAY SOURCE BATCH`), so one way's
allocations cannot inflate or hide another's. The probe loads the model and builds the input, resets the
kernel's high-water mark (writing "5" to /proc/self/clear_refs resets VmHWM to the current VmRSS), runs once,
and reads VmHWM from /proc/self/status. Peaks are whole-process peaks: interpreter, libraries, the model's
weights and the run's working memory. Where clear_refs is not available the probe falls back to
getrusage's ru_maxrss, which also counts the model's initialisation, and says so.

Ways:
    plain      the model's forward under torch.inference_mode() (timm's fused attention)
    streaming  vitviz.pipeline.image_analyses(..., ["rollout"]): capture_attention streaming each
               layer into a RolloutAccumulator (one layer's attention alive at a time)
    naive      timm.utils.AttentionExtract with fused attention off (hooks on every attn_drop), every
               layer's maps kept, then rollout over the kept list
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from bench.common import LOWER, Figure, probe_in_child, random_images
from vitviz.allocator import tune_malloc

logger = logging.getLogger(__name__)

TARGET = 1.25
WAYS = ("plain", "streaming", "naive")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{key} not in {_STATUS}")
    return int(match.group(1))


def _reset_peak() -> str:
    """Reset the high-water mark to the current resident size; returns the method in use."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
        return "VmHWM after reset via /proc/self/clear_refs"
    except OSError:
        return "ru_maxrss (no reset available: includes model initialisation)"


def _peak_kib(method: str) -> int:
    if method.startswith("VmHWM"):
        return _status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _current_kib() -> int | None:
    try:
        return _status_kib("VmRSS")
    except OSError:
        return None


def probe(way: str, source: str, batch: int) -> dict[str, Any]:
    """Peak memory of one way, measured in this process (call it in a fresh one)."""
    from vitviz.analysis import attention_rollout
    from vitviz.models import load_model
    from vitviz.pipeline import AnalysisOptions, image_analyses
    from vitviz.tokens import token_layout

    loaded = load_model(source)
    model = loaded.model
    images = random_images(batch, loaded.meta)
    if way == "naive":
        from timm.utils import AttentionExtract

        for block in model.blocks:
            block.attn.fused_attn = False  # the probabilities only exist on timm's non-fused path
        extractor = AttentionExtract(model, method="hook")
    gc.collect()
    method = _reset_peak()
    loaded_kib = _current_kib()
    if way == "plain":
        with torch.inference_mode():
            model(images)
    elif way == "streaming":
        image_analyses(loaded, images, ["rollout"], AnalysisOptions(batch_size=batch))
    elif way == "naive":
        with torch.inference_mode():
            maps = extractor(images)  # every layer's [B, H, N, N], kept
            attention_rollout(list(maps.values()), token_layout(model))
    else:
        raise ValueError(f"unknown way {way!r}; choose from {', '.join(WAYS)}")
    return {"way": way, "peak_kib": _peak_kib(method), "loaded_kib": loaded_kib, "method": method}


def run_probe(way: str, source: str, batch: int) -> dict[str, Any]:
    """Run `probe` in a fresh interpreter and return what it reports."""
    return probe_in_child("bench.memory", [way, source, str(batch)], f"memory probe {way}")


def memory_figures(source: str, batch: int) -> list[Figure]:
    """Streaming rollout and the naive way, each as peak / peak of plain inference."""
    logger.info("memory: %s batch %d", source, batch)
    probes = {way: run_probe(way, source, batch) for way in WAYS}
    plain = probes["plain"]
    plain_mib = plain["peak_kib"] / 1024
    baseline = f"peak of plain inference (fused attention), same process set-up: {plain_mib:.0f} MiB"

    def figure(way: str, name: str, target: float | None) -> Figure:
        measured = probes[way]
        working = {
            f"{key}_working_mib": round((probes[key]["peak_kib"] - probes[key]["loaded_kib"]) / 1024, 1)
            for key in ("plain", way)
            if probes[key]["loaded_kib"] is not None
        }
        return Figure(
            name=name,
            value=measured["peak_kib"] / plain["peak_kib"],
            target=target,
            better=LOWER,
            unit="ratio",
            baseline=baseline,
            detail={
                "peak_mib": round(measured["peak_kib"] / 1024, 1),
                "plain_peak_mib": round(plain_mib, 1),
                "loaded_mib": round((measured["loaded_kib"] or 0) / 1024, 1),
                **working,
                "method": measured["method"],
                "source": source,
            },
        )

    arch = source.removeprefix("timm:") if source.startswith("timm:") else Path(source).stem
    return [
        figure("streaming", f"memory {arch} batch {batch}: streaming rollout", TARGET),
        figure("naive", f"memory {arch} batch {batch}: naive (timm AttentionExtract, every map kept)", None),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one peak-memory probe (run by python -m bench)")
    parser.add_argument("way", choices=WAYS)
    parser.add_argument("source")
    parser.add_argument("batch", type=int)
    args = parser.parse_args(argv)
    tune_malloc()  # as python -m bench (and python -m vitviz) run, for every way alike
    print(json.dumps(probe(args.way, args.source, args.batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
