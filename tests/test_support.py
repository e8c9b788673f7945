"""The support table (`vitviz.support`, `python -m vitviz models`): the stored table covers every timm architecture of
the families up to the parameter limit and every Hugging Face class; a live survey of one representative per
family and of every Hugging Face class gives the stored row; the command prints and serialises it, and README.md
holds its Markdown. For every Hugging Face class, rollout, distance and gradient rollout through the pipeline
equal the definitions computed on transformers' own `output_attentions=True` eager attention (q and k weights
made peaky so a wrong token or layer would show)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import transformers

from vitviz import support
from vitviz.cli import main
from vitviz.models import load_model
from vitviz.models.hf import FAMILIES as HF_CLASSES
from vitviz.pipeline import NO_CLASS_LOGITS, AnalysisOptions, NotApplicable, image_analyses

TABLE = support.load_table()
ROWS = {row.name: row for row in support.rows_of(TABLE)}
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = support.README_START, support.README_END


def _representatives() -> dict[str, str]:
    """Per timm family, its architecture with the fewest parameters (the quickest to survey)."""
    chosen: dict[str, support.Row] = {}
    for row in ROWS.values():
        if row.name.startswith(support.HF_PREFIX):
            continue
        best = chosen.get(row.family)
        if best is None or (row.params or math.inf) < (best.params or math.inf):
            chosen[row.family] = row
    return {family: row.name for family, row in chosen.items()}


# --- the stored table ----------------------------------------------------------------------------------


def test_the_table_lists_every_timm_architecture_of_the_families_up_to_the_limit() -> None:
    assert TABLE["timm_version"] == timm.__version__, "timm changed: run python -m vitviz models --refresh --exact"
    assert TABLE["max_params"] == support.MAX_PARAMS and TABLE["sections"] == list(support.sections())
    candidates = support.timm_candidates()
    assert set(TABLE["considered"]) == set(candidates), "timm's names changed: refresh the table"
    # every name in timm's ViT modules (bar its test stubs) falls in a declared family: none is forgotten
    assert [name for name in candidates if support.timm_family(name) is None] == []
    timm_rows = sorted(name for name in ROWS if not name.startswith(support.HF_PREFIX))
    assert timm_rows == support.within_limit(TABLE["considered"])
    assert len(timm_rows) >= 150
    for name in timm_rows:
        assert ROWS[name].family == support.timm_family(name)
    # the counts nearest the limit decide what is in: measure them again (meta device, nothing downloaded)
    near = [n for n, c in TABLE["considered"].items() if c is not None and 0.9 <= c / support.MAX_PARAMS <= 1.1]
    for name in near:
        assert support._parameter_count(name) == TABLE["considered"][name], name


def test_the_table_lists_every_hugging_face_class_in_one_family() -> None:
    declared = [name for classes in support.HF_FAMILIES.values() for name in classes]
    assert sorted(declared) == sorted(HF_CLASSES) and len(set(declared)) == len(declared)
    hf_rows = sorted(name for name in ROWS if name.startswith(support.HF_PREFIX))
    assert hf_rows == sorted(f"{support.HF_PREFIX}{name}" for name in HF_CLASSES)


def test_no_section_is_in_error_and_every_refusal_says_why() -> None:
    for row in ROWS.values():
        for section, status in row.status.items():
            assert status == "ok" or status.startswith(("not_applicable: ", "refused: ")), (row.name, section, status)
            assert "\n" not in status
        assert not row.exact.startswith("error"), (row.name, row.exact)


@pytest.mark.parametrize("family", sorted(_representatives()))
def test_a_live_survey_of_each_timm_family_gives_the_stored_row(family: str) -> None:
    name = _representatives()[family]
    stored = ROWS[name]
    live = support.survey_timm(name, stored.params, exact=bool(TABLE["exact"]))
    assert live == stored


@pytest.mark.parametrize("class_name", list(HF_CLASSES))
def test_a_live_survey_of_each_hugging_face_class_gives_the_stored_row(class_name: str) -> None:
    stored = ROWS[f"{support.HF_PREFIX}{class_name}"]
    assert support.survey_hf(class_name, exact=bool(TABLE["exact"])) == stored
    if TABLE["exact"]:
        assert stored.exact == "exact"  # every layer equals transformers' output_attentions


# --- printing ------------------------------------------------------------------------------------------


def test_summaries_group_reasons_and_count_partial_support() -> None:
    sections = list(support.sections())
    ok = dict.fromkeys(sections, "ok")
    table = {
        "timm_version": "x",
        "transformers_version": "y",
        "max_params": 10,
        "exact": True,
        "sections": sections,
        "considered": {},
        "rows": [
            support.Row("vit_a", "ViT (registers, DINOv2, GAP, ...)", 1, "depth=2", ok, "exact").to_dict(),
            support.Row(
                "vit_b",
                "ViT (registers, DINOv2, GAP, ...)",
                2,
                "depth=2",
                {**ok, "position": "not_applicable: no table", "rollout": "refused: vit_b block 0 is windowed"},
                "-",
            ).to_dict(),
        ],
    }
    (summary,) = support.summaries(table)
    assert summary.count == 2 and summary.examples == ("vit_a", "vit_b")
    assert summary.works.startswith("filters, distance") and "position (1/2)" in summary.works
    assert summary.not_applicable == ("position: no table (1/2)",)
    assert summary.refused == ("rollout: <name> block 0 is windowed (1/2)",)
    assert summary.exact == "1/1"
    text = support.text_table(table)
    assert "1 of 2 architectures analysed without refusal" in text and "rollout (1/2)" in text
    markdown = support.markdown_table(table)
    assert "| ViT (registers, DINOv2, GAP, ...) | 2 | `vit_a`, `vit_b` |" in markdown


def test_cli_prints_the_stored_table(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert text == support.text_table(TABLE)
    for summary in support.summaries(TABLE):
        assert f"{summary.family} ({summary.source}, {summary.count} architecture" in text
    assert main(["models", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["rows"] == TABLE["rows"] and document["timm_version"] == TABLE["timm_version"]
    assert sum(family["count"] for family in document["families"]) == len(TABLE["rows"])
    assert main(["models", "--markdown"]) == 0
    assert capsys.readouterr().out == support.markdown_table(TABLE)


@pytest.mark.parametrize(("argv", "needle"), [(["--json", "--markdown"], "one of"), (["--exact"], "--refresh")])
def test_cli_refuses_option_mixes_in_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["models", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err


def test_update_readme_replaces_only_the_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{START}\nold\n{END}\n\nrest\n")
    assert support.update_readme(TABLE, readme)
    assert readme.read_text() == f"# title\n\n{START}\n{support.markdown_table(TABLE)}{END}\n\nrest\n"
    assert not support.update_readme(TABLE, tmp_path / "missing.md")


def test_readme_holds_the_generated_markdown() -> None:
    text = README.read_text()
    assert text.count(START) == 1 and text.count(END) == 1
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert block.strip("\n") == support.markdown_table(TABLE).strip("\n"), (
        "README.md's support table is stale: python -m vitviz models --refresh rewrites it"
    )


# --- Hugging Face: the attention analyses against transformers' own attention ------------------------------


def _peaky_folder(class_name: str, folder: Path) -> None:
    """The survey's tiny model, q and k projections scaled by 6 so the attention is far from uniform."""
    support.save_tiny_hf(class_name, folder)
    model = getattr(transformers, class_name).from_pretrained(str(folder))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("query.weight", "key.weight", "q_proj.weight", "k_proj.weight")):
                param.mul_(6.0)
    model.save_pretrained(folder)


def _prefix(class_name: str) -> tuple[int, bool]:
    """(tokens before the patches, whether the first is a class token), as transformers builds the sequence."""
    if class_name.startswith("Siglip"):
        return 0, False
    if class_name.startswith("DeiT"):
        return 2, True
    if class_name.startswith("Dinov2WithRegisters"):
        return 1 + support.HF_EXTRA["Dinov2WithRegistersConfig"]["num_register_tokens"], True
    return 1, True


def _readout(r: torch.Tensor, prefix: int, has_cls: bool) -> torch.Tensor:
    """[B, N, N] -> [B, 4, 4]: the class token's row over the patches, else the mean of the patch rows."""
    rows = r[:, 0, prefix:] if has_cls else r[:, prefix:, prefix:].mean(dim=1)
    return rows.reshape(-1, 4, 4)


def _rollout(attentions: list[torch.Tensor], prefix: int, has_cls: bool) -> torch.Tensor:
    n = attentions[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    r = eye.expand(attentions[0].shape[0], n, n)
    for attn in attentions:
        a = 0.5 * attn.double().mean(dim=1) + 0.5 * eye
        r = (a / a.sum(dim=-1, keepdim=True)) @ r
    return _readout(r, prefix, has_cls)


def _gradient_rollout(attentions: list, gradients: list, prefix: int, has_cls: bool) -> torch.Tensor:
    n = attentions[0].shape[-1]
    r = torch.eye(n, dtype=torch.float64).expand(attentions[0].shape[0], n, n)
    for attn, grad in zip(attentions, gradients):
        weighted = (grad.double() * attn.double()).clamp(min=0).mean(dim=1)
        r = r + weighted @ r
    return _readout(r, prefix, has_cls)


def _distance(attentions: list[torch.Tensor], prefix: int) -> np.ndarray:
    """Paper mode, [L, H]: mean over images of the mean over patch queries of sum_k w[q, k] * |c_q - c_k| px."""
    centres = np.array([((r + 0.5) * 8, (c + 0.5) * 8) for r in range(4) for c in range(4)])
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    out = np.zeros((len(attentions), attentions[0].shape[1]))
    for layer, attn in enumerate(attentions):
        w = attn[:, :, prefix:, prefix:].double().numpy()
        out[layer] = (w * dist).sum(axis=-1).mean(axis=-1).mean(axis=0)
    return out


@pytest.mark.parametrize("class_name", list(HF_CLASSES))
def test_hf_rollout_distance_and_gradient_rollout_equal_the_definitions_on_transformers_attention(
    class_name: str, tmp_path: Path
) -> None:
    _peaky_folder(class_name, tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    analyses = ["distance", "rollout", "gradient-rollout"]
    results = image_analyses(loaded, images, analyses, AnalysisOptions(batch_size=2))

    reference = getattr(transformers, class_name).from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    out = reference(pixel_values=images, output_attentions=True)
    attentions = [a.detach() for a in out.attentions]
    assert len(attentions) == 2 and float(attentions[-1].amax(dim=-1).mean()) > 2.0 / attentions[-1].shape[-1]
    prefix, has_cls = _prefix(class_name)
    assert attentions[0].shape[-1] == prefix + 16

    rollout = torch.from_numpy(np.stack([r.map for r in results.rollouts]))
    torch.testing.assert_close(rollout, _rollout(attentions, prefix, has_cls), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(results.distance.pixels, _distance(attentions, prefix), rtol=1e-5, atol=1e-6)

    if isinstance(results.gradients, NotApplicable):  # no per-class logit the gradient could follow
        assert results.gradients.reason == NO_CLASS_LOGITS
        assert loaded.model.num_classes == 0
        return
    logits = out.logits
    target = logits.argmax(dim=-1)
    gradients = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), out.attentions)
    assert [g.target_class for g in results.gradients] == target.tolist()
    got = torch.from_numpy(np.stack([g.map for g in results.gradients]))
    want = _gradient_rollout(attentions, list(gradients), prefix, has_cls)
    assert float(want.std()) > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
