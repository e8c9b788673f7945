"""Eight app sessions share the cached model and run rollouts at once while a training subprocess runs.

A Streamlit server runs every session's script in a thread of one process, and `st.cache_resource` hands all
of them the same model object. AppTest cannot run sessions side by side (each run installs and removes a
process-wide Runtime), so each session here is a thread that does what a rerun of /rollout does:
`widgets.load(entry)` (through the real `st.cache_resource`), then `analyses.image_attention` and
`analyses.gradient_map` on its own images. Meanwhile a training run started by the app's own launcher
(`vitviz.ui.runs.start_run`) is training. Every output must equal a single-threaded reference, and the model
must end exactly as it started: same weights, eval mode, no hooks left anywhere.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.reliability.conftest import ROOT

SESSIONS, ROLLOUTS = 8, 20
DEFAULT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"
HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """One torch thread per session thread: on a busy 2-core machine OpenMP workers spinning against each other
    make every small op take ~15 ms instead of microseconds (the sessions still run side by side)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(session: int):
    from vitviz.ui.analyses import InputImage

    rng = np.random.default_rng(1000 + session)
    images = []
    for index in range(ROLLOUTS):
        height, width = rng.integers(24, 96, size=2)
        pixels = rng.integers(0, 256, (int(height), int(width), 3), dtype=np.uint8)
        digest = hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
        images.append(InputImage(name=f"s{session}-{index}.png", digest=digest, pixels=pixels))
    return images


def _explain(loaded, image, with_gradient: bool) -> dict[str, np.ndarray]:
    """What one rerun of /rollout computes for an image."""
    from vitviz.pipeline import AnalysisOptions
    from vitviz.ui.analyses import gradient_map, image_attention

    out = image_attention(loaded, image, AnalysisOptions(), query_index=0).to_arrays()
    if with_gradient:
        out.update({f"gradient_{k}": v for k, v in gradient_map(loaded, image, None).to_arrays().items()})
    return out


def _hooks(model: torch.nn.Module) -> list[str]:
    found = [f"{name or 'model'}.{attr}" for name, module in model.named_modules() for attr in HOOK_DICTS
             if getattr(module, attr, None)]  # fmt: skip
    from torch.nn.modules import module as module_globals

    for attr in dir(module_globals):
        if attr.startswith("_global_") and attr.endswith("hooks") and getattr(module_globals, attr):
            found.append(f"torch global {attr}")
    return found


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _metric_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_eight_sessions_share_the_model_while_a_run_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tally: dict
) -> None:
    from vitviz.ui import catalog, runs
    from vitviz.ui.widgets import load

    runs_dir = tmp_path / "runs"
    monkeypatch.setenv("VITVIZ_RUNS_DIR", str(runs_dir))
    monkeypatch.setenv("VITVIZ_CACHE_DIR", str(tmp_path / "reference-cache"))
    entry = next(e for e in catalog.discover_models(runs=runs_dir) if e.path == DEFAULT)
    loaded = load(entry)
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = {k: p.requires_grad for k, p in model.named_parameters()}
    assert not model.training and _hooks(model) == []

    images = {s: _images(s) for s in range(SESSIONS)}
    reference = {(s, i): _explain(loaded, image, i % 2 == 0) for s in images for i, image in enumerate(images[s])}

    request = runs.RunRequest(
        command="train", preset="tiny", run_id="busy", runs_dir=runs_dir,
        overrides=("epochs=500", "log_every=1"),
    )  # fmt: skip
    process = runs.start_run(request)
    run = runs_dir / "busy"
    try:
        _wait_for(lambda: _metric_lines(run) >= 2 or process.poll() is not None, 180, "the training run to start")
        assert process.poll() is None, runs.log_tail(runs_dir, "busy")
        # Fresh disk cache: every session computes its own results instead of reading the reference's.
        monkeypatch.setenv("VITVIZ_CACHE_DIR", str(tmp_path / "concurrent-cache"))
        results: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        errors: list[str] = []
        start = threading.Barrier(SESSIONS)
        lines_before = _metric_lines(run)

        def session(s: int) -> None:
            try:
                start.wait()
                for i, image in enumerate(images[s]):
                    shared = load(entry)  # what every rerun does: the cached model, not a copy
                    assert shared is loaded, "the session got its own copy of the model"
                    results[(s, i)] = _explain(shared, image, i % 2 == 0)
            except BaseException as exc:
                errors.append(f"session {s}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=session, args=(s,), name=f"session-{s}") for s in range(SESSIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        assert not any(t.is_alive() for t in threads), "a session hung"
        still_training = process.poll() is None
        lines_after = _metric_lines(run)
    finally:
        runs.stop_run("busy")  # SIGTERM: the run saves a resume state and exits
        try:
            process.wait(timeout=120)
        except BaseException:
            process.kill()  # the process this test started, by its Popen
            process.wait()
            raise
    counts = tally["concurrency"]
    counts["sessions"], counts["rollouts per session"] = SESSIONS, ROLLOUTS
    counts["exceptions"] = len(errors)
    counts["outputs different from the single-threaded reference"] = sum(
        not all(np.array_equal(results.get(key, {}).get(k), v) for k, v in want.items())
        for key, want in reference.items()
    )
    assert errors == []
    assert still_training and lines_after > lines_before, "the training run did not train while the sessions ran"
    assert set(results) == set(reference)
    for key, want in reference.items():
        for name, value in want.items():
            np.testing.assert_array_equal(results[key][name], value, err_msg=f"session {key[0]} image {key[1]} {name}")
    assert _hooks(model) == [], "hooks left on the shared model"
    assert not model.training
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the shared model's weights changed"
    assert all(p.grad is None for p in model.parameters()), "gradients were left on the shared model"
    status = json.loads((run / "status.json").read_text())
    assert process.returncode == 0 and status.get("resumable"), status
