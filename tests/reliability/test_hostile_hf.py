"""Hostile and broken Hugging Face model folders (`hf:<folder>`), through the Python API, the command line and
the studio's "Add a model" box.

Every folder from `conftest.hostile_hf_folders` (a tiny `ViTForImageClassification` saved by `save_pretrained`,
then edited: config and preprocessor config that are not JSON, not objects, nested 200,000 deep, not UTF-8 or
with absurd values; weights of another size, truncated, unrelated to the model or pickles that would run code)
must be refused with one line, exit status 2 from `info` and `analyze`, one visible error in the studio, no
marker file, and within `MEMORY_LIMIT` of extra address space: everything is checked before a model is built.
A 60 GB file beside the model is never read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.reliability.conftest import (
    APP_MEMORY_LIMIT,
    MEMORY_LIMIT,
    HostileFolder,
    Sandbox,
    hostile_hf_folders,
    one_line_cli_error,
    tiny_hf_files,
    write_hf_folder,
)

CASES = hostile_hf_folders(Path("/nonexistent"))  # names only; the folders are written per module below
NAMES = [case.name for case in CASES]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, tuple[HostileFolder, Path]], Path]:
    root = tmp_path_factory.mktemp("hostile-hf")
    markers = root / "markers"
    markers.mkdir()
    good = tiny_hf_files()
    folders = {}
    for case in hostile_hf_folders(markers):
        folders[case.name] = (case, write_hf_folder(root / case.name, {**good, **case.changes}))
    return folders, markers


def test_every_required_case_is_tried() -> None:
    from vitviz.ui import catalog

    assert len(set(NAMES)) == len(NAMES) >= 20
    for name in NAMES:  # each is also given to the studio as the Hub id hostile/<name>
        assert catalog.hf_entry(f"hostile/{name}").hub_id == f"hostile/{name}"


def test_the_good_folder_loads(tmp_path: Path) -> None:
    """The control: the folder every case edits is a model vitviz reads."""
    from vitviz.models import load_model

    loaded = load_model(f"hf:{write_hf_folder(tmp_path / 'good', tiny_hf_files())}")
    assert loaded.meta.class_names == ["circle", "square", "triangle"] and loaded.meta.input_size == (32, 32)


@pytest.mark.parametrize("name", NAMES)
def test_api_and_cli_refuse_with_one_line_and_bounded_memory(
    name: str, hostile, sandbox: Sandbox, tmp_path: Path, tally: dict
) -> None:
    folders, markers = hostile
    case, folder = folders[name]
    counts = tally["hf folders: API + CLI"]
    counts["cases"] += 1
    api = sandbox.run("load_hf_folder", folder=str(folder), memory_limit=MEMORY_LIMIT)
    image = tmp_path / "picture.png"
    Image.new("RGB", (32, 32), (200, 100, 50)).save(image)
    analyze = ["analyze", f"hf:{folder}", "--images", str(image), "--json", str(tmp_path / "out.json")]
    calls = [["info", f"hf:{folder}"], analyze]
    cli = sandbox.run("vitviz_cli_many", calls=calls, memory_limit=MEMORY_LIMIT)
    counts["calls"] += len(calls) + 1
    crashed = [c.stderr[-2000:] for c in (api, cli) if c.exit_code != 0]
    counts["crashes"] += len(crashed)
    peak, key = max((c.rss_growth or 0) >> 20 for c in (api, cli)), "peak RSS growth MiB (max)"
    counts[key] = max(counts[key], peak)
    assert not crashed, crashed
    outcome = api.result["load_model"]
    assert outcome["outcome"] == "refused", outcome
    assert "\n" not in outcome["message"] and case.fragment in outcome["message"], outcome["message"]
    for argv, result in zip(calls, cli.result, strict=True):
        assert result["code"] == 2, (argv, result)
        assert case.fragment in one_line_cli_error(result), result["stderr"]
    assert not (tmp_path / "out.json").exists()
    assert not any(markers.iterdir()), "code ran"
    for child in (api, cli):
        assert child.rss_growth is not None and child.rss_growth < MEMORY_LIMIT


@pytest.fixture(scope="module")
def app_results(hostile, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every folder loaded in turn through the sidebar's "Add a model" box, as the Hub repository hostile/<name>."""
    folders, _ = hostile
    work = tmp_path_factory.mktemp("app-hf")
    child = sandbox.run(
        "app_hf_folders",
        folders=[[f"hostile/{name}", str(folder)] for name, (_case, folder) in folders.items()],
        cache_dir=str(work / "cache"),
        runs_dir=str(work / "runs"),
        memory_limit=APP_MEMORY_LIMIT,
        timeout=600,
    )
    assert child.exit_code == 0, child.stderr[-3000:]
    start, *rest = child.result
    assert start["exceptions"] == [] and start["selected"] == "bundled:shapes-default", start
    return {r["name"].removeprefix("hostile/"): r for r in rest}


@pytest.mark.parametrize("name", NAMES)
def test_studio_shows_one_error_and_keeps_the_model(name: str, hostile, app_results, tally: dict) -> None:
    folders, markers = hostile
    case, _ = folders[name]
    state = app_results[name]
    counts = tally["hf folders: studio"]
    counts["cases"] += 1
    counts["crashes"] += int(bool(state["exceptions"]))
    assert state["exceptions"] == [], state
    assert len(state["errors"]) == 1 and case.fragment in state["errors"][0], state
    assert "not a Hugging Face model id" not in state["errors"][0], state  # the folder itself was refused
    assert state["selected"] == "bundled:shapes-default", state
    assert not any(markers.iterdir())


def test_only_the_files_the_model_uses_are_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 60 GB file beside the model (sparse: it takes no disk) is never read: the content hash covers the config,
    the preprocessor config and the weights, nothing else in the folder."""
    import vitviz.models.hf as hf
    from vitviz.models import load_model

    folder = write_hf_folder(tmp_path / "model", tiny_hf_files())
    for name in ("optimizer.safetensors", "training_args.bin", "notes.json"):
        with open(folder / name, "wb") as handle:
            handle.truncate(60 * 2**30)
    read: list[str] = []
    real = hf.file_sha256

    def recording_sha256(path: str | Path) -> str:
        read.append(Path(path).name)
        if Path(path).stat().st_size > 2**30:  # fail at once rather than read 60 GB
            raise AssertionError(f"{Path(path).name} was hashed")
        return real(path)

    monkeypatch.setattr(hf, "file_sha256", recording_sha256)
    loaded = load_model(f"hf:{folder}")
    assert sorted(read) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert loaded.content_hash == load_model(f"hf:{write_hf_folder(tmp_path / 'copy', tiny_hf_files())}").content_hash
