"""Which ViT architectures vitviz analyses, and how: the support table (`python -m vitviz models`).

Families are declared once, here: TIMM_FAMILIES maps timm name patterns to a family label (the first family
whose pattern matches a name takes it), HF_FAMILIES groups the Hugging Face classes `vitviz.models.hf` reads.
The survey builds every timm name of those families with at most MAX_PARAMS parameters at timm's default config
(counted on the meta device, nothing downloaded) with random weights (seed 0) at depth 2 and a 64-pixel input
where timm accepts them, and every Hugging Face class from a tiny random config saved with save_pretrained into
a temporary folder and loaded through `hf:<folder>`. Each model then goes through the real pipeline: the
filters and position sections, and `pipeline.image_analyses` with every image analysis on two random images.
Each section ends as

- ``ok``: computed (every array finite);
- ``not_applicable: reason``: the analysis is defined not to apply to this model (`pipeline.NotApplicable`);
- ``refused: reason``: vitviz cannot read the model's attention exactly yet (`capture.unreadable_reason`), or
  the model was refused with a one-line VitvizError;
- ``error: last traceback line``: a bug.

With ``exact``, every captured attention map is also compared with the model's own eager attention (timm: a
copy with ``fused_attn = False``, read where timm passes the probabilities through ``attn_drop``; Hugging Face:
transformers' ``output_attentions=True``). The full survey takes minutes, so its result ships as
``vitviz/support_table.json``; `python -m vitviz models --refresh [--exact]` regenerates it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import functools
import json
import logging
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitviz.errors import VitvizError
from vitviz.fileio import atomic_write_text

logger = logging.getLogger(__name__)

TABLE_PATH = Path(__file__).with_name("support_table.json")
MAX_PARAMS = 120_000_000
SMALL_IMAGE = 64
IMAGES = 2  # random images per model
EXACT_TOLERANCE = 1e-5
# timm's modules that hold the ViT families; every name in them (bar timm's own test stubs) must match a family.
TIMM_MODULES = (
    "beit",
    "cait",
    "deit",
    "eva",
    "naflexvit",
    "vision_transformer",
    "vision_transformer_hybrid",
    "vision_transformer_relpos",
    "vision_transformer_sam",
    "vitamin",
)
TIMM_TEST_STUBS = "test_*"
# Attempts in order: reduced depth and input, reduced depth only, reduced input only (models with per-block
# settings refuse another depth).
_ATTEMPTS: tuple[dict[str, Any], ...] = (dict(depth=2, img_size=SMALL_IMAGE), dict(depth=2), dict(img_size=SMALL_IMAGE))


@dataclass(frozen=True)
class Family:
    """A family label and the timm name patterns (fnmatch) of its architectures."""

    label: str
    patterns: tuple[str, ...]


# First match wins, so the specific families come before the catch-all "vit_*".
TIMM_FAMILIES: tuple[Family, ...] = (
    Family("CaiT", ("cait*",)),
    Family("SAM ViT", ("samvit*",)),
    Family("ViTamin", ("vitamin*",)),
    Family("NaFlexViT", ("naflexvit*",)),
    Family("FlexiViT", ("flexivit*",)),
    Family("BEiT", ("beit*",)),
    Family("DeiT, DeiT III", ("deit*",)),
    Family("EVA-02", ("eva*",)),
    Family("AIMv2", ("aimv2*",)),
    Family(
        "rope ViT (DINOv3, Perception Encoder, ...)",
        ("vit_*dinov3*", "vit_*rope*", "vit_pe_*", "vit_*lingbot*", "vit_*sapiens*"),
    ),
    Family("relative-position ViT", ("vit_relpos_*", "vit_srelpos_*")),
    Family("hybrid ViT (CNN stem)", ("vit_*_r26_*", "vit_*_r50_*", "vit_*_resnet*", "vit_tiny_r_*", "vit_base_mci_*")),
    Family("differential-attention ViT", ("vit_dwee_*", "vit_dpwee_*", "vit_dlittle_*")),
    Family("parallel-block ViT", ("vit_pwee_*", "vit_*_18x2_*", "vit_*_36x1_*")),
    Family("CLIP, SigLIP towers", ("vit_*clip*", "vit_*siglip*")),
    Family("ViT (registers, DINOv2, GAP, ...)", ("vit_*",)),
)

# Hugging Face classes by family; every class `vitviz.models.hf` reads is in exactly one.
HF_FAMILIES: dict[str, tuple[str, ...]] = {
    "Hugging Face ViT": ("ViTModel", "ViTForImageClassification"),
    "Hugging Face DeiT": ("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"),
    "Hugging Face BEiT": ("BeitModel", "BeitForImageClassification"),
    "Hugging Face DINOv2": (
        "Dinov2Model",
        "Dinov2ForImageClassification",
        "Dinov2WithRegistersModel",
        "Dinov2WithRegistersForImageClassification",
    ),
    "Hugging Face CLIP vision": ("CLIPVisionModel",),
    "Hugging Face SigLIP vision": ("SiglipVisionModel",),
}
HF_TINY: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "initializer_range": 0.2,
    "image_size": 32,
    "patch_size": 8,
}
# Per config class, what the tiny config adds: BEiT as its checkpoints are (relative bias, no absolute table).
HF_EXTRA: dict[str, dict[str, Any]] = {
    "BeitConfig": {"use_relative_position_bias": True},
    "Dinov2WithRegistersConfig": {"num_register_tokens": 4},
}
HF_LABELS = {0: "apple", 1: "pear", 2: "plum"}
HF_PREFIX = "hf:"


def sections() -> tuple[str, ...]:
    """The analyses each architecture is surveyed for: every registered analysis, in the registry's order."""
    from vitviz import analyses as registry

    return registry.names()


def timm_family(name: str) -> str | None:
    """The label of the first family with a pattern matching the timm name; None when none does."""
    for family in TIMM_FAMILIES:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in family.patterns):
            return family.label
    return None


def hf_family(class_name: str) -> str | None:
    return next((label for label, classes in HF_FAMILIES.items() if class_name in classes), None)


@dataclass(frozen=True)
class Row:
    """One architecture: its family, how it was built and each section's status."""

    name: str  # the timm name, or hf:<class>
    family: str
    params: int | None  # timm's default config (the full model, not the reduced one); None for hf
    built_with: str
    status: dict[str, str]  # section -> ok | not_applicable: ... | refused: ... | error: ...
    exact: str = "-"  # with exact: "exact", "not_compared: why" (another shape than the eager maps) or an error

    @property
    def ok(self) -> bool:
        """No section refused or in error, and the exactness check (when run) passed."""
        statuses = [*self.status.values(), self.exact]
        return all(not s.startswith(("refused", "error")) for s in statuses)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


# --- the timm names ------------------------------------------------------------------------------------


def _parameter_count(name: str) -> int | None:
    """Parameters of timm's default config, counted on the meta device (no memory, nothing downloaded)."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # a name timm cannot build on meta is kept: the survey will say what happens
        return None
    return sum(p.numel() for p in model.parameters())


def timm_candidates() -> list[str]:
    """Every timm name in TIMM_MODULES or matching a family pattern, except timm's test stubs."""
    import timm

    names = {name for module in TIMM_MODULES for name in timm.list_models(module=module)}
    names |= {name for family in TIMM_FAMILIES for pattern in family.patterns for name in timm.list_models(pattern)}
    return sorted(name for name in names if not fnmatch.fnmatchcase(name, TIMM_TEST_STUBS))


def parameter_counts(names: Iterable[str]) -> dict[str, int | None]:
    """Default-config parameter counts; building on the meta device takes about a second a name, so counts are
    cached in the temporary directory per timm version."""
    import timm

    names = list(names)
    cache = Path(tempfile.gettempdir()) / f"vitviz-timm-param-counts-{timm.__version__}.json"
    try:
        counts: dict[str, int | None] = json.loads(cache.read_text()) if cache.exists() else {}
    except (OSError, ValueError):
        counts = {}
    missing = [name for name in names if name not in counts]
    for name in missing:
        counts[name] = _parameter_count(name)
    if missing:
        with contextlib.suppress(OSError):  # an unwritable temporary directory only costs the next run time
            atomic_write_text(cache, json.dumps(counts))
    return {name: counts[name] for name in names}


def within_limit(counts: dict[str, int | None], max_params: int = MAX_PARAMS) -> list[str]:
    """The names with at most max_params parameters (or an unknown count: the survey says what happens)."""
    return sorted(name for name, count in counts.items() if count is None or count <= max_params)


# --- surveying one model -------------------------------------------------------------------------------


def _status(error: BaseException) -> str:
    if isinstance(error, VitvizError):
        return f"refused: {error}"
    last = traceback.format_exception_only(type(error), error)[-1].strip()
    return f"error: {last}"


def _finite(result: Any) -> bool:
    """Every numpy array in a result (dataclasses, tuples of them) is finite."""
    if isinstance(result, np.ndarray):
        return not np.issubdtype(result.dtype, np.floating) or bool(np.isfinite(result).all())
    if isinstance(result, (tuple, list)):
        return all(_finite(item) for item in result)
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return all(_finite(getattr(result, f.name)) for f in dataclasses.fields(result))
    return True


def _section_status(result: Any, refused_reason: str | None) -> str:
    from vitviz.pipeline import NotApplicable

    if isinstance(result, NotApplicable):
        if refused_reason is not None and result.reason == refused_reason:
            return f"refused: {result.reason}"
        return f"not_applicable: {result.reason}"
    if result is None or (isinstance(result, tuple) and not result):
        return "error: the pipeline returned no result"
    return "ok" if _finite(result) else "error: non-finite values"


def analyse(loaded: Any, images: torch.Tensor) -> dict[str, str]:
    """Every section's status for a loaded model, through the registry and the real pipeline (each analysis of
    the weights' `compute`, `pipeline.image_analyses`). One section's failure never hides the others: when the
    image analyses fail together, each is re-run alone to say which one fails."""
    from vitviz import analyses as registry
    from vitviz import pipeline

    status: dict[str, str] = {}
    refused = pipeline.attention_not_applicable(loaded)
    refused_reason = refused.reason if refused is not None else None
    options = registry.AnalysisOptions(batch_size=images.shape[0])
    for analysis in registry.analyses():
        if analysis.compute is not None:
            try:
                status[analysis.name] = _section_status(analysis.compute(loaded, options), refused_reason)
            except Exception as error:
                status[analysis.name] = _status(error)
    image_sections = list(registry.image_names())
    try:
        results = pipeline.image_analyses(loaded, images, image_sections, options)
        for name in image_sections:
            status[name] = _section_status(results[name], refused_reason)
    except Exception:
        for name in image_sections:
            try:
                alone = pipeline.image_analyses(loaded, images, [name], options)
                status[name] = _section_status(alone[name], refused_reason)
            except Exception as error:
                status[name] = _status(error)
    return {name: status[name] for name in sections()}


def _compare(captured: Sequence[torch.Tensor], want: Sequence[torch.Tensor], whose: str) -> str:
    if len(want) != len(captured):
        return f"error: {len(captured)} layers captured, {whose} has {len(want)}"
    for layer, (a, b) in enumerate(zip(captured, want)):
        if a.shape != b.shape:  # CaiT, SAM: the capture maps the attention onto the model's token sequence
            return f"not_compared: layer {layer} captured as {tuple(a.shape)}, {whose} is {tuple(b.shape)}"
    worst = max((float((a - b).abs().max()) for a, b in zip(captured, want)), default=0.0)
    return "exact" if worst <= EXACT_TOLERANCE else f"error: differs from {whose} by {worst:.2e}"


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


def timm_eager_attention(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """timm's own eager probabilities per block: a copy with fused_attn off everywhere, read at each block's
    attn_drop (where timm's non-fused path passes them), as docs/design.md defines the map: SAM's windows placed
    on the grid, differential attention's S1 - lambda S2."""
    from timm.models.vision_transformer_sam import Block as SamBlock

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
    elif _is_sam(block) and block.window_size == 0:  # global: [B * heads, N, N]
        out = out.reshape(block.grid_seen[0], block.attn.num_heads, *out.shape[-2:])
    elif _is_sam(block):  # windows [B * windows * heads, n, n] -> [B, heads, H*W, H*W]
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


def _is_sam(block: nn.Module) -> bool:
    from timm.models.vision_transformer_sam import Block as SamBlock

    return isinstance(block, SamBlock)


def _exactness(model: nn.Module, images: torch.Tensor, reference: Callable[[], list[torch.Tensor]], whose: str) -> str:
    from vitviz.capture import KeepAllAttention, capture_attention, unreadable_reason

    if unreadable_reason(model) is not None:
        return "-"
    try:
        keep = KeepAllAttention()
        capture_attention(model, images, [keep], with_logits=False, stop_after_attention=True)
        return _compare(keep.result(), reference(), whose)
    except Exception as error:
        return _status(error)


def build_small_timm(name: str) -> tuple[Any, str]:
    """The architecture at reduced depth and input size where timm accepts them, random weights, eval mode, loaded
    through the entry point users name it by: `load_model("timm:<name>?depth=2&img_size=64&num_classes=10")`.
    Returns the LoadedModel and how it was built ("depth=2,img_size=64", or "default")."""
    from vitviz.models import load_model
    from vitviz.models.sources import timm_source

    failure: BaseException | None = None
    for overrides in _ATTEMPTS:
        try:
            loaded = load_model(timm_source(name, {**overrides, "num_classes": 10}))
            with torch.no_grad():
                loaded.model(torch.randn(1, loaded.meta.in_chans, *loaded.meta.input_size))
        except Exception as error:  # try the next, less reduced configuration
            failure = error
            continue
        return loaded, ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"
    assert failure is not None
    raise failure


def _images(img_size: tuple[int, int], in_chans: int = 3) -> torch.Tensor:
    return torch.randn(IMAGES, in_chans, *img_size, generator=torch.Generator().manual_seed(1))


def survey_timm(name: str, params: int | None = None, exact: bool = False) -> Row:
    """Build one timm architecture small and run every section through the pipeline."""
    from vitviz.tokens import token_layout

    family = timm_family(name) or "?"
    try:
        loaded, built_with = build_small_timm(name)
        model = loaded.model
        images = _images(token_layout(model).img_size, loaded.meta.in_chans)
    except Exception as error:
        status = _status(error)
        return Row(name, family, params, "-", {section: status for section in sections()}, "-")
    row_status = analyse(loaded, images)
    checked = "-"
    if exact:
        checked = _exactness(model, images, lambda: timm_eager_attention(model, images), "timm's eager attention")
    return Row(name, family, params, built_with, row_status, checked)


def save_tiny_hf(class_name: str, folder: Path) -> nn.Module:
    """A tiny random `class_name` model (HF_TINY, seed 0) saved with save_pretrained into `folder`, with a
    preprocessor_config.json; returns the model."""
    import transformers

    model_class = getattr(transformers, class_name)
    config_class = model_class.config_class
    kwargs = dict(HF_TINY, **HF_EXTRA.get(config_class.__name__, {}))
    if "ForImageClassification" in class_name:
        kwargs.update(id2label=HF_LABELS, label2id={v: k for k, v in HF_LABELS.items()})
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    size = {"height": HF_TINY["image_size"], "width": HF_TINY["image_size"]}
    processor = {"do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": size}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return model


def survey_hf(class_name: str, exact: bool = False) -> Row:
    """Save one Hugging Face class from a tiny random config, load it through hf:<folder>, run every section."""
    from vitviz.models import load_model
    from vitviz.tokens import token_layout

    name = f"{HF_PREFIX}{class_name}"
    family = hf_family(class_name) or "?"
    built_with = "tiny config, {num_hidden_layers} layers, width {hidden_size}, {image_size} px".format(**HF_TINY)
    with tempfile.TemporaryDirectory() as folder:
        try:
            _quiet_transformers()
            save_tiny_hf(class_name, Path(folder))
            loaded = load_model(f"hf:{folder}")
            images = _images(token_layout(loaded.model).img_size, loaded.meta.in_chans)
        except Exception as error:
            status = _status(error)
            return Row(name, family, None, "-", {section: status for section in sections()}, "-")
        row_status = analyse(loaded, images)
        if not exact:
            return Row(name, family, None, built_with, row_status, "-")

        def reference() -> list[torch.Tensor]:
            with torch.no_grad():
                return list(loaded.model.hf(pixel_values=images, output_attentions=True).attentions)

        checked = _exactness(loaded.model, images, reference, "transformers' output_attentions")
        return Row(name, family, None, built_with, row_status, checked)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# --- the table -----------------------------------------------------------------------------------------


def survey(
    names: Sequence[str] | None = None,
    hf_classes: Sequence[str] | None = None,
    *,
    exact: bool = False,
    max_params: int = MAX_PARAMS,
    progress: Callable[[Row, int, int], None] | None = None,
) -> dict[str, Any]:
    """Survey timm names (None: every candidate within max_params) and Hugging Face classes (None: all) and
    return the table as JSON data: versions, limits, every candidate's parameter count, the rows."""
    import timm
    import transformers

    from vitviz.models.hf import FAMILIES as HF_CLASSES

    considered: dict[str, int | None] = {}
    if names is None:
        considered = parameter_counts(timm_candidates())
        names = within_limit(considered, max_params)
    else:
        considered = parameter_counts(names)
    hf_classes = list(HF_CLASSES) if hf_classes is None else list(hf_classes)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: list[Row] = []
    total = len(names) + len(hf_classes)
    start = time.perf_counter()
    try:
        for name in names:
            rows.append(survey_timm(name, considered.get(name), exact=exact))
            if progress is not None:
                progress(rows[-1], len(rows), total)
        for class_name in hf_classes:
            rows.append(survey_hf(class_name, exact=exact))
            if progress is not None:
                progress(rows[-1], len(rows), total)
    finally:
        torch.set_num_threads(torch_threads)
    return {
        "timm_version": timm.__version__,
        "transformers_version": transformers.__version__,
        "max_params": max_params,
        "exact": exact,
        "seconds": round(time.perf_counter() - start),
        "sections": list(sections()),
        "considered": considered,
        "rows": [row.to_dict() for row in rows],
    }


def save_table(table: dict[str, Any], path: Path = TABLE_PATH) -> None:
    atomic_write_text(Path(path), json.dumps(table, indent=1, sort_keys=False) + "\n")


README_PATH = Path(__file__).resolve().parents[1] / "README.md"  # in a checkout of the repository
README_START, README_END = "<!-- support-table:start -->", "<!-- support-table:end -->"


def update_readme(table: dict[str, Any], path: Path = README_PATH) -> bool:
    """Put the Markdown table between README.md's markers; False (nothing written) when there is no such file
    (an installed package) or it has no markers."""
    try:
        text = Path(path).read_text()
    except OSError:
        return False
    if text.count(README_START) != 1 or text.count(README_END) != 1:
        return False
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    atomic_write_text(Path(path), f"{before}{README_START}\n{markdown_table(table)}{README_END}{after}")
    return True


def load_table(path: Path = TABLE_PATH) -> dict[str, Any]:
    """The stored table (vitviz/support_table.json unless told)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise VitvizError(
            f"cannot read the support table {path} ({error}); run python -m vitviz models --refresh"
        ) from error


def rows_of(table: dict[str, Any]) -> list[Row]:
    return [Row.from_dict(row) for row in table["rows"]]


@dataclass(frozen=True)
class FamilySummary:
    """One family's line in the printed table."""

    family: str
    source: str  # "timm" or "Hugging Face"
    count: int
    examples: tuple[str, ...]
    works: str  # the sections computed for every architecture; "k/n" for the others
    not_applicable: tuple[str, ...] = ()  # "sections: reason (k/n)"
    refused: tuple[str, ...] = ()  # "sections: reason (k/n)", errors too
    exact: str = "-"  # "k/n" architectures whose captured maps equal the eager ones; "-" when not checked

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _general(reason: str, row: Row) -> str:
    """A reason without what names one architecture (its timm name), so that a family's reasons group."""
    return reason.replace(row.name, "<name>")


def _grouped(rows: Sequence[Row], prefix: str) -> tuple[str, ...]:
    """Per distinct reason: the sections it stands for and on how many of the rows."""
    by_reason: dict[str, set[str]] = {}
    counts: Counter[str] = Counter()
    for row in rows:
        seen: set[str] = set()
        for section, status in row.status.items():
            for wanted in prefix.split("|"):
                if status.startswith(wanted + ":"):
                    reason = _general(status[len(wanted) + 1 :].strip(), row)
                    if wanted == "error":
                        reason = f"error: {reason}"
                    by_reason.setdefault(reason, set()).add(section)
                    seen.add(reason)
        counts.update(seen)
    order = {name: i for i, name in enumerate(sections())}
    lines = []
    first = {reason: min(order[section] for section in found) for reason, found in by_reason.items()}
    for reason in sorted(counts, key=lambda r: (-counts[r], first[r], r)):  # the same order in every process
        how_many = counts[reason]
        names = ", ".join(sorted(by_reason[reason], key=order.get))
        lines.append(f"{names}: {reason} ({how_many}/{len(rows)})")
    return tuple(lines)


def summaries(table: dict[str, Any]) -> list[FamilySummary]:
    """One summary per family with at least one architecture, timm families first, in declaration order."""
    rows = rows_of(table)
    labels = [f.label for f in TIMM_FAMILIES] + list(HF_FAMILIES)
    known = set(labels)
    labels += sorted({row.family for row in rows} - known)
    result = []
    for label in labels:
        members = [row for row in rows if row.family == label]
        if not members:
            continue
        ok_counts = {s: sum(row.status.get(s) == "ok" for row in members) for s in sections()}
        everywhere = [s for s, k in ok_counts.items() if k == len(members)]
        partly = [f"{s} ({k}/{len(members)})" for s, k in ok_counts.items() if 0 < k < len(members)]
        works = "all" if len(everywhere) == len(ok_counts) else (", ".join([*everywhere, *partly]) or "none")
        checked = [row for row in members if row.exact not in ("-",) and not row.exact.startswith("not_compared")]
        exact = f"{sum(row.exact == 'exact' for row in checked)}/{len(checked)}" if checked else "-"
        skipped = sum(row.exact.startswith("not_compared") for row in members)
        if skipped:
            exact += f" ({skipped} not compared: the captured maps have another shape than the eager ones)"
        result.append(
            FamilySummary(
                family=label,
                source="Hugging Face" if label in HF_FAMILIES else "timm",
                count=len(members),
                examples=tuple(row.name for row in members[:3]),
                works=works,
                not_applicable=_grouped(members, "not_applicable"),
                refused=_grouped(members, "refused|error"),
                exact=exact,
            )
        )
    return result


def empty_families(table: dict[str, Any]) -> list[str]:
    """timm families whose every architecture is over the parameter limit."""
    present = {row["family"] for row in table["rows"]}
    considered = {timm_family(name) for name in table["considered"]}
    return [f.label for f in TIMM_FAMILIES if f.label in considered and f.label not in present]


def _heading(table: dict[str, Any]) -> str:
    rows = rows_of(table)
    working = sum(row.ok for row in rows)
    timm_rows = [row for row in rows if not row.name.startswith(HF_PREFIX)]
    limit = table["max_params"] / 1e6
    return (
        f"{working} of {len(rows)} architectures analysed without refusal: {len(timm_rows)} timm {table['timm_version']}"
        f" names up to {limit:g}M parameters (depth 2, random weights) and {len(rows) - len(timm_rows)} Hugging Face"
        f" classes (transformers {table['transformers_version']}, tiny random configs)."
    )


def _legend(table: dict[str, Any]) -> str:
    exact = (
        " exact: architectures whose every captured attention map is within "
        f"{EXACT_TOLERANCE:g} of the model's own eager one (of those whose attention is read)."
        if table.get("exact")
        else ""
    )
    empty = empty_families(table)
    over = f" Every {', '.join(empty)} architecture is over the limit." if empty else ""
    return (
        f"Sections: {', '.join(table['sections'])}; works: computed for every architecture of the family (k/n: for"
        " k of its n)." + exact + over
    )


def text_table(table: dict[str, Any]) -> str:
    """The table as plain text: one block per family."""
    lines = [_heading(table), _legend(table), ""]
    for s in summaries(table):
        lines.append(f"{s.family} ({s.source}, {s.count} architecture{'s' if s.count != 1 else ''})")
        lines.append(f"  examples:       {', '.join(s.examples)}")
        lines.append(f"  works:          {s.works}")
        if table.get("exact"):
            lines.append(f"  exact:          {s.exact}")
        for title, items in (("not applicable", s.not_applicable), ("refused", s.refused)):
            for i, item in enumerate(items):
                lines.append(f"  {(title + ':') if i == 0 else '':15s} {item}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(table: dict[str, Any]) -> str:
    """The table as Markdown (what README.md's generated block holds)."""
    with_exact = bool(table.get("exact"))
    header = ["family", "architectures", "examples", "works"] + (["exact"] if with_exact else [])
    header += ["not applicable (why)", "refused (why)"]
    lines = [_heading(table), "", _legend(table), ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + " --- |" * len(header))
    for s in summaries(table):
        cells = [s.family, str(s.count), ", ".join(f"`{e}`" for e in s.examples), s.works]
        cells += [s.exact] if with_exact else []
        cells += ["<br>".join(s.not_applicable) or "-", "<br>".join(s.refused) or "-"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def json_table(table: dict[str, Any]) -> dict[str, Any]:
    """The table as JSON data: the stored table plus the per-family summaries."""
    return {**table, "families": [s.to_dict() for s in summaries(table)]}


def progress_line(row: Row, done: int, total: int) -> str:
    statuses = " | ".join(f"{section}={status}" for section, status in row.status.items())
    return f"[{done}/{total}] {row.name} ({row.family}; {row.built_with}) {statuses} | exact={row.exact}"


__all__ = [
    "HF_FAMILIES",
    "MAX_PARAMS",
    "TABLE_PATH",
    "TIMM_FAMILIES",
    "TIMM_MODULES",
    "Family",
    "FamilySummary",
    "Row",
    "analyse",
    "json_table",
    "load_table",
    "markdown_table",
    "save_table",
    "summaries",
    "survey",
    "survey_hf",
    "survey_timm",
    "text_table",
    "timm_candidates",
    "timm_family",
]
