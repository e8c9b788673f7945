"""Survey: which timm ViT-family architectures vitviz can analyse (run ``python -m tests.timm_matrix``).

For every timm name matching FAMILY_PATTERNS with at most MAX_PARAMS parameters at its default size (counted
on the meta device, nothing downloaded), build it with random weights (``pretrained=False``, seed 0) at depth
2 and a small input where timm accepts them, then read its token layout and stream one image's attention to
the rollout and distance consumers. Each analysis ends as ``ok``, ``not_applicable: reason`` (the analysis is
defined not to apply), ``refused: reason`` (a one-line VitvizError: the model cannot be read) or
``error: last traceback line`` (a bug). An importable helper for the tests, not a test file.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer_sam import Block as SamBlock
from torch import nn

from vitviz.analysis.distance import DistanceAccumulator
from vitviz.analysis.rollout import RolloutAccumulator
from vitviz.capture import KeepAllAttention, capture_attention
from vitviz.errors import VitvizError
from vitviz.tokens import token_layout

logger = logging.getLogger(__name__)

FAMILY_PATTERNS = ("vit_*", "deit*", "beit*", "eva*", "cait*", "flexivit*", "naflexvit*", "samvit*", "vitamin*")
MAX_PARAMS = 120_000_000
SMALL_IMAGE = 64
# Attempts in order: reduced depth and input, reduced depth only, reduced input only (models with per-block
# settings refuse another depth).
_ATTEMPTS: tuple[dict[str, Any], ...] = (dict(depth=2, img_size=SMALL_IMAGE), dict(depth=2), dict(img_size=SMALL_IMAGE))


@dataclass(frozen=True)
class Row:
    """One architecture's outcome: how it was built and each analysis' status."""

    name: str
    built_with: str
    layout: str
    rollout: str
    distance: str
    exact: str = "-"  # with --exact: the captured maps against timm's eager ones

    @property
    def ok(self) -> bool:
        return all(
            not status.startswith(("refused", "error"))
            for status in (self.layout, self.rollout, self.distance, self.exact)
        )


def _parameter_count(name: str) -> int | None:
    """Parameters of timm's default config, counted on the meta device (no memory, nothing downloaded)."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # a name timm cannot build on meta is kept: the survey will say what happens
        return None
    return sum(p.numel() for p in model.parameters())


def family_names(patterns: Iterable[str] = FAMILY_PATTERNS, max_params: int = MAX_PARAMS) -> list[str]:
    """Every timm name matching the patterns with at most max_params parameters at timm's default config.

    Counting builds every model on the meta device (about a second each), so the counts are cached in the
    temporary directory per timm version.
    """
    names = sorted({name for pattern in patterns for name in timm.list_models(pattern)})
    cache = Path(tempfile.gettempdir()) / f"vitviz-timm-param-counts-{timm.__version__}.json"
    counts: dict[str, int | None] = json.loads(cache.read_text()) if cache.exists() else {}
    missing = [name for name in names if name not in counts]
    for name in missing:
        counts[name] = _parameter_count(name)
    if missing:
        cache.write_text(json.dumps(counts))
    return [name for name in names if counts[name] is None or counts[name] <= max_params]


def _status(error: BaseException) -> str:
    if isinstance(error, VitvizError):
        return f"refused: {error}"
    last = traceback.format_exception_only(type(error), error)[-1].strip()
    return f"error: {last}"


def build_small(name: str) -> tuple[nn.Module, str]:
    """The architecture at reduced depth and input size where timm accepts them, random weights, eval mode."""
    failure: BaseException | None = None
    for overrides in _ATTEMPTS:
        torch.manual_seed(0)
        try:
            model = timm.create_model(name, pretrained=False, num_classes=10, **overrides).eval()
            layout = token_layout(model)
            with torch.no_grad():
                model(torch.randn(1, 3, *layout.img_size))
        except Exception as error:  # try the next, less reduced configuration
            failure = error
            continue
        return model, ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"
    assert failure is not None
    raise failure


def _keep_cait_or_branches(block: nn.Module, kept: list[torch.Tensor]) -> bool:
    """Hooks keeping the map docs/design.md defines for CaiT's blocks and timm's ParallelThingsBlock; False for any
    other block. CaiT self-attention: the softmax before the heads are mixed (proj_w's input), the class token its
    own row; class attention: the class token's row, patch rows identity; parallel: branches side by side."""
    attn = getattr(block, "attn", None)
    if hasattr(block, "attns"):
        parts: list[torch.Tensor] = []
        for branch in block.attns:
            branch.attn.attn_drop.register_forward_hook(lambda _m, _a, out: parts.append(out))

        def join(_module: nn.Module, _args: Any, _out: torch.Tensor) -> None:
            kept.append(torch.cat(parts, dim=1))
            parts.clear()

        block.register_forward_hook(join)
        return True
    if hasattr(attn, "proj_w"):

        def talking_heads(_module: nn.Module, args: Any) -> None:
            patches = args[0].permute(0, 3, 1, 2)  # [B, n, n, H] -> [B, H, n, n]
            full = patches.new_zeros(*patches.shape[:2], patches.shape[-1] + 1, patches.shape[-1] + 1)
            full[:, :, 0, 0] = 1.0
            full[:, :, 1:, 1:] = patches
            kept.append(full)

        attn.proj_w.register_forward_pre_hook(talking_heads)
        return True
    if type(attn).__name__ == "ClassAttn":

        def class_row(_module: nn.Module, _args: Any, out: torch.Tensor) -> None:
            full = torch.eye(out.shape[-1], dtype=out.dtype).expand(*out.shape[:2], -1, -1).clone()
            full[:, :, :1] = out
            kept.append(full)

        attn.attn_drop.register_forward_hook(class_row)
        return True
    return False


def eager_attention(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """timm's own eager probabilities per block: a copy with fused_attn off everywhere, read at each block's
    attn_drop (where timm's non-fused path passes them), as docs/design.md defines the map: SAM's windows placed
    on the grid, differential attention's S1 - lambda S2."""
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    kept: list[torch.Tensor] = []
    for block in [*eager.blocks, *(getattr(eager, "blocks_token_only", None) or ())]:
        if _keep_cait_or_branches(block, kept):
            continue
        drops = [module for name, module in block.named_modules() if name.rsplit(".", 1)[-1] == "attn_drop"]
        if len(drops) != 1:
            raise RuntimeError(f"{len(drops)} attn_drop modules in a {type(block).__name__}")
        drops[0].register_forward_hook(functools.partial(_keep_as_defined, block, kept))
        if isinstance(block, SamBlock):
            block.register_forward_pre_hook(lambda module, args: setattr(module, "grid_seen", args[0].shape[:3]))
    with torch.no_grad():
        eager.forward_features(images)
    return kept


def _keep_as_defined(block: nn.Module, kept: list[torch.Tensor], _module: nn.Module, _args: Any, out: Any) -> None:
    """attn_drop's output as the map vitviz defines for the block's family."""
    differential = block if hasattr(block, "lambda_init") else getattr(block, "attn", None)
    if hasattr(differential, "lambda_init"):  # two maps per head, heads 2h and 2h + 1
        pairs = out.unflatten(1, (-1, 2))
        out = pairs[:, :, 0] - differential._compute_lambda().type_as(out) * pairs[:, :, 1]
    elif isinstance(block, SamBlock) and block.window_size == 0:  # global: [B * heads, N, N]
        out = out.reshape(block.grid_seen[0], block.attn.num_heads, *out.shape[-2:])
    elif isinstance(block, SamBlock):  # windows [B * windows * heads, n, n] -> [B, heads, H*W, H*W]
        batch, height, width = block.grid_seen
        size, heads = block.window_size, block.attn.num_heads
        rows, cols = -(-height // size), -(-width // size)
        windows = out.reshape(batch, rows * cols, heads, size * size, size * size)
        padded = out.new_zeros(batch, heads, rows * size, cols * size, rows * size, cols * size)
        for index in range(rows * cols):
            top, left = index // cols * size, index % cols * size
            tile = windows[:, index].reshape(batch, heads, size, size, size, size)
            padded[:, :, top : top + size, left : left + size, top : top + size, left : left + size] = tile
        out = padded[:, :, :height, :width, :height, :width].reshape(batch, heads, height * width, height * width)
    kept.append(out)


def _exactness(model: nn.Module, images: torch.Tensor, captured: list[torch.Tensor]) -> str:
    try:
        want = eager_attention(model, images)
        if len(want) != len(captured):
            return f"error: {len(captured)} layers captured, timm's eager path has {len(want)}"
        worst = max(float((a - b).abs().max()) for a, b in zip(captured, want))
        return "exact" if worst <= 1e-5 else f"error: differs from timm's eager attention by {worst:.2e}"
    except Exception as error:
        return _status(error)


def survey(name: str, exact: bool = False) -> Row:
    """Build one architecture small and run token_layout and the streamed rollout and distance on it; with
    ``exact``, also compare the captured maps with timm's eager ones."""
    try:
        model, built_with = build_small(name)
    except Exception as error:
        status = _status(error)
        return Row(name, "-", status, status, status)
    try:
        layout = token_layout(model)
    except Exception as error:
        status = _status(error)
        return Row(name, built_with, status, status, status)
    images = torch.randn(1, 3, *layout.img_size, generator=torch.Generator().manual_seed(1))
    consumers: dict[str, Any] = {"rollout": RolloutAccumulator(layout), "distance": DistanceAccumulator(layout)}
    if exact:
        consumers["keep"] = KeepAllAttention()
    try:
        capture_attention(model, images, list(consumers.values()), with_logits=False)
    except Exception as error:
        status = _status(error)
        return Row(name, built_with, "ok", status, status)
    statuses = {}
    for analysis in ("rollout", "distance"):
        try:
            consumers[analysis].result()
            statuses[analysis] = "ok"
        except Exception as error:
            statuses[analysis] = _status(error)
    exactness = _exactness(model, images, consumers["keep"].result()) if exact else "-"
    return Row(name, built_with, "ok", statuses["rollout"], statuses["distance"], exactness)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", default=list(FAMILY_PATTERNS))
    parser.add_argument("--max-params", type=int, default=MAX_PARAMS)
    parser.add_argument("--names", nargs="*", help="survey these timm names instead of the families")
    parser.add_argument("--exact", action="store_true", help="also compare with timm's eager attention")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = args.names or family_names(args.patterns, args.max_params)
    rows = []
    start = time.perf_counter()
    for name in names:
        row = survey(name, exact=args.exact)
        rows.append(row)
        print(
            f"{row.name:55s} {row.built_with:22s} layout={row.layout} | rollout={row.rollout} | "
            f"distance={row.distance} | exact={row.exact}",
            flush=True,
        )
    working = sum(row.ok for row in rows)
    reasons = Counter(
        status.replace(row.name, "<name>")[:150]
        for row in rows
        for status in {row.layout, row.rollout, row.distance, row.exact}
        if status not in ("ok", "exact", "-")
    )
    print(f"\n{working} of {len(rows)} architectures analysed ({time.perf_counter() - start:.0f} s)")
    for reason, count in reasons.most_common():
        print(f"{count:4d}  {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
