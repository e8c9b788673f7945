"""Hostile and broken checkpoints, through the Python API, the command line and the app's upload.

Every file from `conftest.hostile_checkpoints` (pickles that would run code, by plain pickle and inside real
torch zip archives; empty, truncated and random files; safetensors headers that lie; tensors that do not
fit their config; malformed or absurd metadata) must be refused with one line naming the file, create no
marker file, crash nothing, and stay within `MEMORY_LIMIT` of extra address space (each load runs in a
forked child under RLIMIT_AS). A control shows that the code-running payloads are live: loading them the
unsafe way creates their marker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.conftest import (
    APP_MEMORY_LIMIT,
    MEMORY_LIMIT,
    ROOT,
    TIMM_ARCH,
    HostileFile,
    Sandbox,
    hostile_checkpoints,
    one_line_cli_error,
)

CASES = hostile_checkpoints(Path("/nonexistent"))  # names only; the files are written per session below
NAMES = [case.name for case in CASES]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, tuple[HostileFile, Path]], Path]:
    folder = tmp_path_factory.mktemp("hostile-checkpoints")
    markers = folder / "markers"
    markers.mkdir()
    files = {}
    for case in hostile_checkpoints(markers):
        path = folder / case.name / case.filename
        path.parent.mkdir()
        path.write_bytes(case.data)
        files[case.name] = (case, path)
    return files, markers


def test_at_least_25_hostile_checkpoints_and_every_payload_route() -> None:
    assert len(set(NAMES)) == len(NAMES) >= 25
    for route in ("os-system", "eval", "exec", "importlib", "marshal", "nested-getattr"):
        assert f"pickle-{route}" in NAMES and f"torchzip-{route}" in NAMES


@pytest.mark.parametrize("name", [c.name for c in CASES if c.marker is not None])
def test_control_the_payloads_run_code_when_loaded_unsafely(
    name: str, sandbox: Sandbox, tmp_path: Path, tally: dict
) -> None:
    """Without the safeguards each payload does create its marker: the refusals below are meaningful."""
    case = next(c for c in hostile_checkpoints(tmp_path) if c.name == name)
    how = "pickle" if name.startswith(("pickle-", "plain-")) else "torch"
    path = tmp_path / f"{name}.{'pkl' if how == 'pickle' else 'pt'}"  # torch.load reads *.safetensors its own way
    path.write_bytes(case.data)
    child = sandbox.run("unsafe_load", path=str(path), how=how, memory_limit=MEMORY_LIMIT)
    assert child.exit_code == 0, child.stderr
    assert case.marker is not None and case.marker.exists(), child.result
    tally["checkpoints: live payload controls"]["markers created by unsafe loads"] += 1


def _assert_refused(outcome: dict, where: str) -> None:
    assert outcome["outcome"] == "refused", f"{where}: {outcome}"
    assert "\n" not in outcome["message"], f"{where}: {outcome['message']}"


@pytest.mark.parametrize("name", NAMES)
def test_api_and_cli_refuse_with_one_line_and_bounded_memory(name: str, hostile, sandbox: Sandbox, tally: dict) -> None:
    files, markers = hostile
    case, path = files[name]
    counts = tally["checkpoints: API + CLI"]
    counts["cases"] += 1
    api = sandbox.run("load_api", path=str(path), memory_limit=MEMORY_LIMIT)
    calls = [["info", str(path)], ["info", f"timm:{TIMM_ARCH}", "--weights", str(path)]]
    cli = sandbox.run("vitviz_cli_many", calls=calls, memory_limit=MEMORY_LIMIT)
    crashed = [c for c in (api, cli) if c.exit_code != 0]
    crashes = [k for k, v in (api.result or {}).items() if v["outcome"] == "crash"]
    crashes += [" ".join(argv) for argv, r in zip(calls, cli.result or []) if "Traceback" in r["stderr"]]
    counts["calls"] += len(calls) + len(api.result or {})
    counts["crashes"] += len(crashed) + len(crashes)
    counts["markers created"] += int(case.marker is not None and case.marker.exists())
    peak, key = max((c.rss_growth or 0) >> 20 for c in (api, cli)), "peak RSS growth MiB (max)"
    counts[key] = max(counts[key], peak)
    assert not crashed, [c.stderr[-2000:] for c in crashed]
    assert not crashes, (crashes, api.result, cli.result)
    assert not any(markers.iterdir()), f"code ran: {sorted(os.listdir(markers))}"
    for channel, outcome in api.result.items():
        _assert_refused(outcome, channel)
    for argv, result in zip(calls, cli.result, strict=True):
        assert result["code"] == 2, (argv, result)
        one_line_cli_error(result)
    for child in (api, cli):
        assert child.rss_growth is not None and child.rss_growth < MEMORY_LIMIT


def test_the_real_command_line_refuses_a_pickle(hostile, tmp_path: Path) -> None:
    """The same refusal through a fresh `python -m vitviz` interpreter (exit status 2, one line, no marker)."""
    files, markers = hostile
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = ["info", f"timm:{TIMM_ARCH}", "--weights", str(files["torchzip-os-system"][1])]
    done = subprocess.run(
        [sys.executable, "-m", "vitviz", *argv], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert "refused to read" in one_line_cli_error({"stderr": done.stderr})
    assert done.stdout == ""
    assert not any(markers.iterdir())


# --- the app's upload ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_uploads(hostile, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every hostile file uploaded in turn through the sidebar's "Add a model", in one app session.

    The uploader takes only .safetensors names (the browser filters by extension and Streamlit checks it again
    on the server), so each file is uploaded under a .safetensors name: what a user or an attacker can send.
    """
    files, _ = hostile
    folder = tmp_path_factory.mktemp("app-checkpoints")
    uploads = [[_upload_name(case), str(path)] for case, path in files.values()]
    child = sandbox.run(
        "app_checkpoint_uploads",
        files=uploads,
        cache_dir=str(folder / "cache"),
        runs_dir=str(folder / "runs"),
        memory_limit=APP_MEMORY_LIMIT,
        timeout=600,
    )
    assert child.exit_code == 0, child.stderr[-3000:]
    results = child.result
    start = results[0]
    assert start["exceptions"] == [] and start["selected"] == "bundled:shapes-default", start
    by_file = {r["name"]: r for r in results[1:]}
    return {"by_name": {case.name: by_file[_upload_name(case)] for case, _ in files.values()}, "rss": child.rss_growth}


def _upload_name(case: HostileFile) -> str:
    return case.filename if case.filename.endswith(".safetensors") else f"{case.filename}.safetensors"


@pytest.mark.parametrize("name", NAMES)
def test_app_upload_refuses_with_one_error_and_keeps_the_model(name: str, hostile, app_uploads, tally: dict) -> None:
    files, markers = hostile
    case, _ = files[name]
    state = app_uploads["by_name"][name]
    counts = tally["checkpoints: app upload"]
    counts["cases"] += 1
    counts["crashes"] += int(bool(state["exceptions"]))
    counts["peak RSS growth MiB (whole session)"] = (app_uploads["rss"] or 0) >> 20
    assert state["exceptions"] == [], state
    assert not any(markers.iterdir())
    assert len(state["errors"]) == 1, state
    assert _upload_name(case) in state["errors"][0], f"the error does not name the upload: {state['errors']}"
    assert state["selected"] == "bundled:shapes-default", state


def test_app_keeps_no_refused_upload_on_disk(hostile, app_uploads) -> None:
    """A refused checkpoint is not left behind in the cache folder (each could be 400 MB)."""
    kept = {n: s["uploads_kept"] for n, s in app_uploads["by_name"].items() if s["uploads_kept"]}
    assert kept == {}, kept
