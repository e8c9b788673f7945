"""`python -m bench` keeps working: the tiny plan end to end, the JSON schema, and the timing arithmetic.

Timings are never asserted: the figures' values depend on the machine. What is checked is what a reader of
the JSON relies on: every family is there, each figure has the documented keys and types, targets and
"better" agree with docs/benchmarks.md, and a ratio is the median of measured / baseline over the rounds.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import bench.common
from bench.__main__ import FAMILIES, main
from bench.common import Figure, paired_timing

ROOT = Path(__file__).resolve().parents[1]
FIGURE_KEYS = {"name", "value", "target", "better", "unit", "baseline", "met", "detail"}
# The targets docs/benchmarks.md states: (family, better, target) for every figure that has one.
TARGETS = {
    "capture": ("lower", 1.10),
    "memory": ("lower", 1.25),
    "distance": ("lower", 1.10),
    "train": ("higher", 0.95),
}


def _run_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--threads", "1", "--json", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _check_figure(figure: dict) -> None:
    assert set(figure) == FIGURE_KEYS, figure
    assert figure["name"].split()[0] in FAMILIES
    assert isinstance(figure["value"], float) and math.isfinite(figure["value"]) and figure["value"] > 0
    assert figure["better"] in ("lower", "higher")
    assert isinstance(figure["unit"], str) and figure["unit"]
    assert isinstance(figure["baseline"], str) and figure["baseline"]
    assert isinstance(figure["detail"], dict)
    if figure["target"] is None:
        assert figure["met"] is None
    else:
        assert figure["target"] > 0
        value, target = figure["value"], figure["target"]
        assert figure["met"] is (value <= target if figure["better"] == "lower" else value >= target)


def test_tiny_run_writes_every_family_in_the_documented_schema(tmp_path: Path) -> None:
    document = _run_bench(tmp_path, "--only", "capture,memory,distance,train")
    assert set(document) == {"machine", "figures"}
    machine = document["machine"]
    assert machine["plan"] == "tiny" and machine["cpu_cores"] >= 1 and machine["torch"]
    assert machine["command"].startswith("python -m bench --tiny") and machine["torch_threads"] == 1
    figures = document["figures"]
    for figure in figures:
        _check_figure(figure)
    by_family: dict[str, list[dict]] = {}
    for figure in figures:
        by_family.setdefault(figure["name"].split()[0], []).append(figure)
    assert set(by_family) == {"capture", "memory", "distance", "train"}
    assert len(by_family["capture"]) == 2  # batch 1 and 2 of the tiny plan
    for family, (better, target) in TARGETS.items():
        targeted = [f for f in by_family[family] if f["target"] is not None]
        assert targeted and all((f["better"], f["target"]) == (better, target) for f in targeted), family
    naive = [f for f in by_family["memory"] if "naive" in f["name"]]
    assert len(naive) == 1 and naive[0]["target"] is None  # reported beside the streaming figure
    streaming = next(f for f in by_family["memory"] if "streaming" in f["name"])
    assert streaming["detail"]["peak_mib"] > 0 and streaming["detail"]["method"]
    for figure in by_family["capture"] + by_family["distance"]:
        rounds = figure["detail"]["round_ratios"]
        assert figure["value"] == pytest.approx(sorted(rounds)[len(rounds) // 2], abs=1e-4)  # the median round


def test_family_figures_cover_each_newer_family_and_gradient_rollout(tmp_path: Path) -> None:
    figures = _run_bench(tmp_path, "--only", "families")["figures"]
    for figure in figures:
        _check_figure(figure)
    capture = [f for f in figures if f["name"].startswith("families capture")]
    labels = [f["name"].removeprefix("families capture ").split(":")[0].split(" (")[0] for f in capture]
    assert labels == ["EVA-02", "rope ViT", "BEiT", "DINOv2 + 4 registers", "hf ViTForImageClassification"]
    assert all((f["better"], f["target"]) == ("lower", 1.10) for f in capture)
    assert capture[-1]["baseline"].startswith("plain transformers forward, sdpa attention")
    assert capture[0]["detail"]["fused_attention"] is True  # timm's baseline is the fused path
    (gradient,) = [f for f in figures if f["name"].startswith("families gradient rollout")]
    assert gradient["target"] is None and "forward + backward" in gradient["baseline"]


def test_extract_figures_set_the_capture_against_timms_attention_extract(tmp_path: Path) -> None:
    figures = _run_bench(tmp_path, "--only", "extract")["figures"]
    for figure in figures:
        _check_figure(figure)
    labels = [f["name"].removeprefix("extract ").split(":")[0] for f in figures]
    assert labels == ["ViT", "DeiT distilled", "DINOv2 + 4 registers", "EVA-02", "rope ViT", "BEiT", "relpos ViT"]
    assert all(f["name"].endswith("batch 2") for f in figures)  # the tiny plan's batch
    for figure in figures:
        assert (figure["better"], figure["target"], figure["unit"]) == ("lower", 1.0, "ratio")
        assert figure["baseline"].startswith("timm AttentionExtract (fx, fused attention off)")
        assert "plain fused forward (floor)" in figure["baseline"]
        rounds = figure["detail"]["round_ratios"]
        assert figure["value"] == pytest.approx(sorted(rounds)[len(rounds) // 2], abs=1e-4)  # the median round
        floor = figure["detail"]["floor"]
        assert floor["capture_over_plain"] > 0 and floor["baseline_s"] > 0 and figure["detail"]["layers"] == 1
        control = figure["detail"]["control"]  # AttentionExtract against itself, timed as the figure
        assert control["ratio"] > 0 and len(control["round_ratios"]) == len(rounds)


def test_cli_figure_times_the_help_against_an_interpreter_importing_argparse(tmp_path: Path) -> None:
    (figure,) = _run_bench(tmp_path, "--only", "cli")["figures"]
    _check_figure(figure)
    assert figure["name"] == "cli --help start"
    assert (figure["better"], figure["target"], figure["unit"]) == ("lower", 1.5, "ratio")
    assert figure["baseline"].startswith('python -c "import argparse"')
    rounds = figure["detail"]["round_ratios"]
    assert len(rounds) == 3 and figure["value"] == pytest.approx(sorted(rounds)[1], abs=1e-4)


def test_token_figures_are_the_memory_of_tokens_and_features_and_the_time_of_tokens(tmp_path: Path) -> None:
    memory, timing = _run_bench(tmp_path, "--only", "tokens")["figures"]
    for figure in (memory, timing):
        _check_figure(figure)
    assert memory["name"] == "tokens memory tiny batch 1: tokens + features"
    assert (memory["better"], memory["target"]) == ("lower", 1.25) and memory["unit"] == "ratio"
    assert memory["detail"]["analyses"] == ["tokens", "features"] and memory["detail"]["peak_mib"] > 0
    assert memory["value"] == pytest.approx(memory["detail"]["peak_mib"] / memory["detail"]["plain_peak_mib"], rel=1e-3)
    assert timing["name"] == "tokens time tiny 32x32 batch 2: tokens"
    assert (timing["better"], timing["target"]) == ("lower", 1.10) and timing["detail"]["analyses"] == ["tokens"]
    rounds = timing["detail"]["round_ratios"]
    assert timing["value"] == pytest.approx(sorted(rounds)[len(rounds) // 2], abs=1e-4)  # the median round


def test_tiny_run_writes_the_faithfulness_figures(tmp_path: Path) -> None:
    figures = _run_bench(tmp_path, "--only", "faithfulness")["figures"]
    for figure in figures:
        _check_figure(figure)
    curves = [f for f in figures if f["name"].startswith("faithfulness curves ")]
    integrated = [f for f in figures if f["name"].startswith("faithfulness integrated gradients ")]
    memory = [f for f in figures if f["name"].startswith("faithfulness memory ")]
    assert len(curves) == len(integrated) == 1 and len(memory) == 2 and len(figures) == 4  # tiny: one model
    (curve,) = curves
    assert (curve["better"], curve["target"], curve["unit"]) == ("lower", 1.10, "ratio")
    detail = curve["detail"]
    assert detail["steps"] == min(detail["patches"], 50) and detail["inputs"] == 2 * (detail["steps"] + 1)
    rounds = detail["round_ratios"]
    assert curve["value"] == pytest.approx(sorted(rounds)[len(rounds) // 2], abs=1e-4)  # the median round
    (ig,) = integrated
    assert ig["target"] is None and ig["met"] is None and ig["unit"] == "ratio"
    assert ig["detail"]["seconds_per_image"] > 0 and ig["detail"]["ig_steps"] == 50
    assert [f["name"].split(": ")[1].split()[0] for f in memory] == ["faithfulness", "analyze"]
    for figure in memory:
        assert (figure["better"], figure["target"], figure["unit"]) == ("lower", 1.05, "ratio")
        detail = figure["detail"]
        assert (detail["baseline_images"], detail["images"]) == (4, 16) and detail["baseline_peak_mib"] > 0
        assert figure["value"] == pytest.approx(detail["peak_mib"] / detail["baseline_peak_mib"], rel=1e-3)


def test_finetune_figures_set_the_projects_step_against_a_hand_written_loop_and_lora_against_full(
    tmp_path: Path,
) -> None:
    full, lora, memory, checkpointed = _run_bench(tmp_path, "--only", "finetune")["figures"]
    for figure, strategy in ((full, "full"), (lora, "lora")):
        _check_figure(figure)
        assert figure["name"] == (
            f"finetune vit_small_patch16_224 depth 1 32px batch 8 {strategy}: project step vs hand-written AdamW step"
        )
        assert (figure["better"], figure["target"], figure["unit"]) == ("higher", 0.95, "ratio")
        detail = figure["detail"]
        assert detail["strategy"] == strategy and detail["trainable_parameters"] > 0
        assert detail["command"].startswith(
            f"python -m training finetune --from timm:vit_small_patch16_224 --strategy {strategy} --dataset shapes"
        )
        rounds = detail["round_ratios"]  # time ratios; the figure is a speed ratio, the inverse of their median
        assert figure["value"] == pytest.approx(1 / sorted(rounds)[len(rounds) // 2], rel=1e-3)
    assert (
        "peft-wrapped" in lora["baseline"]
        and lora["detail"]["trainable_parameters"] < full["detail"]["trainable_parameters"]
    )
    _check_figure(memory)
    assert (
        memory["name"]
        == "finetune memory vit_small_patch16_224 depth 1 32px batch 8: lora vs full, peak training memory"
    )
    assert (memory["better"], memory["target"], memory["unit"]) == ("lower", 0.6, "ratio")
    for figure in (memory, checkpointed):
        detail = figure["detail"]
        assert detail["full_working_mib"] > 0 and detail["steps"] == 3 and detail["method"]
        assert figure["value"] == pytest.approx(detail["lora_working_mib"] / detail["full_working_mib"], rel=1e-2)
    _check_figure(checkpointed)
    assert checkpointed["name"] == memory["name"] + ", both with gradient checkpointing"
    assert checkpointed["target"] == 0.6 and "--grad-checkpointing" in checkpointed["detail"]["command"]


def test_compare_figures_are_its_time_against_plain_forwards_and_its_memory_against_fewer_images(
    tmp_path: Path,
) -> None:
    timed, rest, memory = _run_bench(tmp_path, "--only", "compare")["figures"]
    for figure in (timed, rest, memory):
        _check_figure(figure)
    assert timed["name"] == "compare time tiny vs tiny, 8 images: compare_models vs plain forwards"
    assert (timed["better"], timed["target"], timed["unit"]) == ("lower", 1.15, "ratio")
    assert rest["name"].startswith("compare time tiny vs tiny, 8 images: without gradient rollout")
    assert rest["target"] is None and rest["better"] == "lower"
    for figure in (timed, rest):
        rounds = figure["detail"]["round_ratios"]
        assert figure["value"] == pytest.approx(sorted(rounds)[len(rounds) // 2], abs=1e-4)  # the median round
        assert figure["detail"]["images"] == 8 and figure["detail"]["batch_size"] == 16
    parts = timed["detail"]["parts"]
    assert {"pair_pass_s", "model_pass_a_s", "model_pass_a_no_gradient_s", "forward_backward_b_s"} <= set(parts)
    assert all(seconds >= 0 for seconds in parts.values())
    assert memory["name"] == "compare memory tiny vs tiny: compare --dataset of 16 vs 4 images"
    assert (memory["better"], memory["target"], memory["unit"]) == ("lower", 1.05, "ratio")
    detail = memory["detail"]
    assert (detail["baseline_images"], detail["images"]) == (4, 16) and detail["baseline_peak_mib"] > 0
    assert memory["value"] == pytest.approx(detail["peak_mib"] / detail["baseline_peak_mib"], rel=1e-3)
    assert detail["command"].startswith("python -m vitviz compare ")


@pytest.mark.browser
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs the system Chromium at /usr/bin/chromium")
def test_app_figures_come_from_the_real_browser(tmp_path: Path) -> None:
    document = _run_bench(tmp_path, "--only", "app")
    figures = document["figures"]
    rollout, studio = figures[:2], figures[2:]
    assert [f["name"].split(":")[-1].strip() for f in rollout] == [
        "upload to rollout overlay on screen",
        "cached page switch",
    ]
    for figure, target in zip(rollout, (1.5, 0.5), strict=True):
        _check_figure(figure)
        assert figure["unit"] == "s" and figure["target"] == target
        assert len(figure["detail"]["runs_s"]) >= 1
    # Studio latency: the first visit of /, every page of app.py, every bundled comparison, with their targets.
    from vitviz.ui.compare import READY_MADE

    pages = [f"/{path}" for path in _app_url_paths()]
    expected = (
        [
            ("app floor: a Streamlit page with a heading, new session", None, "s"),
            ("app floor: a Streamlit page with one Plotly chart, new session", None, "s"),
            ("app floor: a Streamlit page with a heading, first visit of a fresh server", None, "s"),
            ("app floor: import torch and timm in a fresh interpreter", None, "s"),
            ("app studio: first visit of / on a fresh server", 2.0, "ratio"),
        ]
        + [(f"app studio: {path} by the sidebar, warm server", 2.0, "ratio") for path in pages]
        + [(f"app studio: {path} in a new session, warm server", 2.0, "ratio") for path in pages]
        + [(f"app studio: /compare {label}, warm server", 5.0, "s") for label in READY_MADE]
    )
    assert sorted((f["name"], f["target"], f["unit"]) for f in studio) == sorted(expected)  # names are unique
    for figure in studio:
        _check_figure(figure)
    floor = {f["name"]: f["value"] for f in studio if f["name"].startswith("app floor")}
    assert len(floor) == 4 and all(value > 0 for value in floor.values())
    (first,) = [f for f in studio if "first visit of /" in f["name"]]
    runs = first["detail"]["runs_s"]  # the tiny plan: one fresh server of each
    floor_first = floor["app floor: a Streamlit page with a heading, first visit of a fresh server"]
    assert len(runs) == 1 and first["value"] == pytest.approx(runs[0] / floor_first, rel=2e-3)  # rounded in JSON


SLOW_SCRIPT = """
import time
import streamlit as st

st.title("Slow page")
time.sleep({seconds})
st.write("done")
"""


@pytest.mark.browser
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs the system Chromium at /usr/bin/chromium")
def test_a_page_is_busy_until_its_script_has_finished(tmp_path: Path) -> None:
    """A script that draws its heading and then works for 2 s is timed to its end: the running indicator in the
    header appears only about half a second into a run, so an idle check that trusted it saw this page as idle
    as soon as its heading showed."""
    from playwright.sync_api import sync_playwright

    from bench.app import _visit
    from bench.browser import launch_chromium, streamlit_server

    script = tmp_path / "slow.py"
    script.write_text(SLOW_SCRIPT.format(seconds=2.0))
    with streamlit_server(tmp_path / "server", script=str(script)) as url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page()
            page.set_default_timeout(120_000)
            assert _visit(page, url, "Slow page") >= 2.0
            assert page.get_by_text("done").count() == 1  # idle means the script's last element is there
        finally:
            browser.close()


def _app_url_paths() -> list[str]:
    """The url_path of every page app.py registers, from the studio's page list ("" for the default page)."""
    from vitviz.ui.pages import PAGES

    return [page.url_path for page in PAGES]


def test_ratio_is_the_median_of_interleaved_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a fake clock, each round's ratio is exact; the figure is their median and the order alternates."""
    now = [0.0]
    calls: list[str] = []
    monkeypatch.setitem(bench.common._CLOCK_FUNCTIONS, "wall", lambda: now[0])
    costs = iter([1.0, 2.0, 3.0, 2.0, 1.0, 5.0])  # measured, baseline: round 0 b=1 m=2, round 1 m=3 b=2, ...

    def run(name: str) -> None:
        calls.append(name)
        if len(calls) > 2:  # the warm-up round is untimed
            now[0] += next(costs)

    timing = paired_timing(lambda: run("b"), lambda: run("m"), warmup=1, repeats=3)
    assert calls == ["b", "m", "b", "m", "m", "b", "b", "m"]
    assert timing.ratios == (2.0, 1.5, 5.0)
    assert timing.ratio == 2.0 and timing.baseline_s == 1.0 and timing.measured_s == 3.0


def test_a_round_times_as_many_calls_as_fill_min_round_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each side gets the same number of consecutive calls per round; times are per call."""
    now = [0.0]
    calls: list[str] = []
    monkeypatch.setitem(bench.common._CLOCK_FUNCTIONS, "wall", lambda: now[0])

    def run(name: str, cost: float) -> None:
        calls.append(name)
        now[0] += cost

    timing = paired_timing(lambda: run("b", 0.1), lambda: run("m", 0.15), warmup=1, repeats=2, min_round_s=0.35)
    assert timing.calls_per_round == 4  # ceil(0.35 / 0.1)
    # warm-up, the call that sizes the rounds, then 4 + 4 calls per round, the order alternating
    assert calls == ["b", "m", "b"] + ["b"] * 4 + ["m"] * 4 + ["m"] * 4 + ["b"] * 4
    assert timing.ratios == pytest.approx((1.5, 1.5))
    assert timing.baseline_s == pytest.approx(0.1) and timing.measured_s == pytest.approx(0.15)
    assert timing.detail()["calls_per_round"] == 4


def test_met_follows_the_direction_of_the_target() -> None:
    def figure(value: float, target: float | None, better: str) -> Figure:
        return Figure(name="capture x", value=value, target=target, better=better, unit="ratio", baseline="b")

    assert figure(1.05, 1.10, "lower").met is True
    assert figure(1.15, 1.10, "lower").met is False
    assert figure(0.96, 0.95, "higher").met is True
    assert figure(0.90, 0.95, "higher").met is False
    assert figure(3.0, None, "lower").met is None


def test_unknown_family_is_refused_with_one_line() -> None:
    with pytest.raises(SystemExit, match="unknown figure family nope"):
        main(["--tiny", "--only", "nope"])


def test_the_first_visit_is_the_median_of_fresh_servers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """One fresh server's first visit varies by seconds here: the figure is the median of `studio_repeats`
    fresh servers against the median of as many fresh servers of the floor app, visited alternately, with
    every run in the detail; the pages are ratios to the one-chart floor."""
    import bench.app as app
    from bench.__main__ import QUICK

    visits = iter([9.0, 2.0, 15.0, 3.0, 11.0, 4.0][: 2 * QUICK.studio_repeats])
    scripts = []

    def fresh(folder: Path, script: str, path: str, heading: str) -> float:
        scripts.append(script)
        return next(visits)

    monkeypatch.setattr(app, "measure_floor", lambda folder, repeats: {"text": 1.5, "plotly": 3.0, "imports": 7.0})
    monkeypatch.setattr(app, "fresh_visit_s", fresh)
    walk = {"first_visit_s": 11.0, "sidebar_s": {"/filters": 5.0}, "linked_s": {"/filters": 7.0}, "compare_s": {}}
    monkeypatch.setattr(app, "measure_studio", lambda folder: walk)
    figures = {f.name: f for f in app.studio_figures(QUICK, tmp_path)}
    assert scripts == ["app.py", "bench/floor_app.py"] * QUICK.studio_repeats
    first = figures["app studio: first visit of / on a fresh server"]
    studio_runs, floor_runs = [9.0, 15.0, 11.0][: QUICK.studio_repeats], [2.0, 3.0, 4.0][: QUICK.studio_repeats]
    assert first.detail["runs_s"] == studio_runs and first.unit == "ratio"
    assert first.value == pytest.approx(statistics.median(studio_runs) / statistics.median(floor_runs))
    assert not first.met
    assert figures["app floor: import torch and timm in a fresh interpreter"].value == 7.0
    sidebar = figures["app studio: /filters by the sidebar, warm server"]
    assert sidebar.value == pytest.approx(5.0 / 3.0) and sidebar.met
    linked = figures["app studio: /filters in a new session, warm server"]
    assert linked.value == pytest.approx(7.0 / 3.0) and not linked.met and linked.detail["seconds"] == 7.0
