"""Jobs the fork server runs in a child process; each returns JSON describing what a user would have seen.

A job never lets an exception escape unseen: the Python API's outcome is "accepted", "refused" (one
VitvizError) or "crash" (any other exception, with its traceback); the command lines' outcome is their exit
status and their stdout and stderr, with the traceback the interpreter would print when an exception escapes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app.py"
TIMM_ARCH = "vit_tiny_patch16_224"


def _outcome(action: Callable[[], Any]) -> dict[str, Any]:
    from vitviz.errors import VitvizError

    try:
        value = action()
    except VitvizError as exc:
        return {"outcome": "refused", "message": str(exc)}
    except BaseException as exc:
        return {
            "outcome": "crash",
            "type": type(exc).__name__,
            "message": str(exc)[:300],
            "traceback": traceback.format_exc(),
        }
    return {"outcome": "accepted", "value": repr(value)[:200]}


def load_api(path: str) -> dict[str, Any]:
    """Every way the Python API opens a model file: as a checkpoint, and as weights for a timm model."""
    from vitviz.models import load_checkpoint, load_model

    results = {"load_model": _outcome(lambda: load_model(path))}
    if path.endswith(".safetensors"):
        results["load_checkpoint"] = _outcome(lambda: load_checkpoint(path))
    results["timm_weights"] = _outcome(lambda: load_model(f"timm:{TIMM_ARCH}", weights=path))
    return results


def load_hf_folder(folder: str) -> dict[str, Any]:
    """A `hf:<folder>` model through the Python API."""
    from vitviz.models import load_model

    return {"load_model": _outcome(lambda: load_model(f"hf:{folder}"))}


def _capture(main: Callable[[list[str]], int], argv: list[str]) -> dict[str, Any]:
    """Run a command-line entry point as `python -m` would: status, stdout, stderr (with any traceback)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def vitviz_cli(argv: list[str]) -> dict[str, Any]:
    """`python -m vitviz ARGV`."""
    from vitviz.cli import main

    return _capture(main, argv)


def vitviz_cli_many(calls: list[list[str]]) -> list[dict[str, Any]]:
    """Several `python -m vitviz` calls in one child (each one independent of the others)."""
    return [vitviz_cli(argv) for argv in calls]


def image_cli(checkpoint: str, cases: list[list[str]], workdir: str) -> dict[str, Any]:
    """`python -m vitviz analyze CKPT --images FILE --analyses rollout --json OUT` for every (name, path); for
    files that decode, the same analysis of a plain PNG holding the pixels `decode_image` gave."""
    import json

    import numpy as np
    from PIL import Image

    from vitviz.errors import VitvizError
    from vitviz.images import decode_image

    def analyze(image: str, out: Path) -> dict[str, Any]:
        argv = ["analyze", checkpoint, "--images", image, "--analyses", "rollout", "--json", str(out)]
        result = vitviz_cli(argv)
        result["json"] = json.loads(out.read_text()) if result["code"] == 0 and out.exists() else None
        return result

    report = {}
    for index, (name, path) in enumerate(cases):
        entry = {"file": analyze(path, Path(workdir) / f"{index}.json")}
        try:
            pixels = np.asarray(decode_image(path))
        except VitvizError:
            pixels = None
        if pixels is not None:
            plain = Path(workdir) / f"{index}-plain.png"
            Image.fromarray(pixels).save(plain)
            entry["plain"] = analyze(str(plain), Path(workdir) / f"{index}-plain.json")
        report[name] = entry
    return report


def unsafe_load(path: str, how: str) -> dict[str, Any]:
    """The control: what loading the file without safeguards does (pickle.load, torch.load(weights_only=False))."""
    import torch

    def load() -> Any:
        if how == "pickle":
            with open(path, "rb") as handle:
                return pickle.load(handle)
        return torch.load(path, weights_only=False)

    return _outcome(load)


# --- the app ------------------------------------------------------------------------------------------------


def _app_session(cache_dir: str, runs_dir: str, page: str | None = None) -> Any:
    from streamlit.testing.v1 import AppTest

    os.environ["VITVIZ_CACHE_DIR"] = cache_dir
    os.environ["VITVIZ_RUNS_DIR"] = runs_dir
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    if page is not None:
        at.switch_page(page).run()
    return at


def _page_state(at: Any) -> dict[str, Any]:
    return {
        "errors": [str(e.value).replace("\\", "") for e in at.error],
        "exceptions": [str(e.value) for e in at.exception],
        "selected": at.sidebar.selectbox(key="vv.model.widget").value if at.sidebar.selectbox else None,
        "titles": [t.value for t in at.title],
    }


def app_checkpoint_uploads(files: list[list[str]], cache_dir: str, runs_dir: str) -> list[dict[str, Any]]:
    """Upload each (name, path) through the sidebar's "Add a model" uploader, one after another in one session
    (a fresh session after any exception, so that one crash does not hide what the next file does)."""
    at = _app_session(cache_dir, runs_dir)
    results = [{"name": "(start)", **_page_state(at)}]
    uploads = Path(cache_dir) / "uploads"
    for name, path in files:
        before = set(os.listdir(uploads)) if uploads.is_dir() else set()
        data = Path(path).read_bytes()
        try:
            at.file_uploader(key="vv.add.upload").set_value((name, data, "application/octet-stream")).run()
            state = _page_state(at)
        except BaseException as exc:
            state = {"errors": [], "exceptions": [f"{type(exc).__name__}: {exc}"], "selected": None, "titles": []}
        after = set(os.listdir(uploads)) if uploads.is_dir() else set()
        state["uploads_kept"] = sorted(after - before)
        results.append({"name": name, **state})
        if state["exceptions"]:
            at = _app_session(cache_dir, runs_dir)
    return results


def app_hf_folders(folders: list[list[str]], cache_dir: str, runs_dir: str) -> list[dict[str, Any]]:
    """Each (Hub id, folder) typed as `hf:<Hub id>` into the sidebar's "Add a model" box and loaded, one after
    another in one session; the Hub download is replaced by the folder (no network), so the folder's files reach
    the loader as a downloaded repository's would."""
    import vitviz.models.hf

    by_id = dict((hub_id, Path(folder)) for hub_id, folder in folders)
    vitviz.models.hf._download = lambda repo_id: by_id[repo_id]
    at = _app_session(cache_dir, runs_dir)
    results = [{"name": "(start)", **_page_state(at)}]
    for hub_id, _folder in folders:
        try:
            at.text_input(key="vv.add.timm").set_value(f"hf:{hub_id}")  # a form: submitted by its button
            next(b for b in at.button if b.label == "Load model").click().run()
            state = _page_state(at)
        except BaseException as exc:
            state = {"errors": [], "exceptions": [f"{type(exc).__name__}: {exc}"], "selected": None, "titles": []}
        results.append({"name": hub_id, **state})
        if state["exceptions"]:
            at = _app_session(cache_dir, runs_dir)
    return results


def app_image_uploads(files: list[list[str]], cache_dir: str, runs_dir: str, valid: list[str]) -> dict[str, Any]:
    """Upload all (name, path) files at once on /rollout; then pick every valid one and read the top-5 table."""
    at = _app_session(cache_dir, runs_dir, "vitviz/ui/rollout.py")
    uploads = [(name, Path(path).read_bytes(), "application/octet-stream") for name, path in files]
    at.file_uploader(key="rollout.images.upload").set_value(uploads).run()
    report: dict[str, Any] = {"upload": _page_state(at), "top5": {}}
    names = [name for name, _ in files if name in valid]
    for index, name in enumerate(names):
        if len(names) > 1:
            at.selectbox(key="rollout.which").set_value(index).run()
        table = at.dataframe[0].value if at.dataframe else None
        captions = [str(c.value).replace("\\", "") for c in at.caption]
        report["top5"][name] = {
            **_page_state(at),
            "classes": None if table is None else list(table["class"]),
            "probabilities": None if table is None else [float(p) for p in table["probability"]],
            "input_caption": [c for c in captions if c.startswith("Input:")],
        }
    return report


def reference_probabilities(checkpoint: str, pictures: dict[str, str]) -> dict[str, list[float]]:
    """Class probabilities of a checkpoint on .npy pictures (uint8 HxWx3), preprocessed by hand (docs/design.md)."""
    import numpy as np
    import torch
    from PIL import Image

    from vitviz.models import load_model

    loaded = load_model(checkpoint)
    meta = loaded.meta
    height, width = meta.input_size
    out = {}
    for name, npy in pictures.items():
        picture = Image.fromarray(np.load(npy))
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.BICUBIC)
        x = (np.asarray(picture, dtype=np.float32) / 255.0 - np.array(meta.mean, np.float32)) / np.array(
            meta.std, np.float32
        )
        with torch.no_grad():
            logits = loaded.model(torch.from_numpy(x).permute(2, 0, 1)[None])
        out[name] = logits.softmax(dim=-1)[0].tolist()
    return out


# --- training with faults ----------------------------------------------------------------------------------


class _Faults:
    """Failures injected into one training process. Specs (dicts):

    {"kind": "kill", "where": W, "match": S, "nth": N}: SIGKILL at the N-th write whose path contains S, at
        W = "mid-write" (half the checkpoint's bytes written), "before-fsync", "before-rename", "after-rename"
        (before the folder is fsynced) or "before-unlink" (while old resume states are deleted);
    {"kind": "full-disk", "after_writes": K}: from the (K+1)-th file write on, every write fails with ENOSPC
        after putting a third of its bytes on disk (a full disk stays full);
    {"kind": "read-only", "after_creates": K, "errno": E}: from the (K+1)-th new file on, the run folder
        refuses to create, rename or delete entries (what chmod a-w or chattr +i does to a folder);
    {"kind": "nan", "steps": [...]}: one input pixel is NaN in the batches of these (0-based) steps.
    """

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        self.specs = specs
        self.kill_counts = [0] * len(specs)
        self.writes = 0
        self.creates = 0

    def _kill(self, where: str, path: str) -> None:
        for index, spec in enumerate(self.specs):
            if spec["kind"] == "kill" and spec["where"] == where and spec.get("match", "") in path:
                self.kill_counts[index] += 1
                if self.kill_counts[index] == spec.get("nth", 1):
                    os.kill(os.getpid(), signal.SIGKILL)

    def _disk_full(self) -> bool:
        self.writes += 1
        return any(s["kind"] == "full-disk" and self.writes > s["after_writes"] for s in self.specs)

    def _refuse(self, path: str, new_entry: bool) -> None:
        self.creates += new_entry
        for spec in self.specs:
            if spec["kind"] == "read-only" and self.creates > spec["after_creates"]:
                code = spec.get("errno", errno.EACCES)
                raise PermissionError(code, os.strerror(code), path)

    def install(self) -> None:
        import pathlib
        import tempfile

        import safetensors.torch

        import training.engine
        import training.runfolder
        import vitviz.fileio

        faults = self
        real_replace, real_fsync, real_unlink = os.replace, os.fsync, pathlib.Path.unlink
        real_save_file, real_mkstemp = safetensors.torch.save_file, tempfile.mkstemp
        real_train_step = training.engine.Trainer.train_step

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            faults._kill("before-rename", str(dst))
            faults._refuse(str(dst), new_entry=False)
            real_replace(src, dst, *args, **kwargs)
            faults._kill("after-rename", str(dst))

        def fsync(fd: int) -> None:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            faults._kill("before-fsync", target)
            real_fsync(fd)

        def unlink(self: pathlib.Path, *args: Any, **kwargs: Any) -> None:
            faults._kill("before-unlink", str(self))
            if not str(self).endswith(".tmp"):  # cleaning up our own temporary file is always allowed here
                faults._refuse(str(self), new_entry=False)
            real_unlink(self, *args, **kwargs)

        def save_file(tensors: Any, filename: Any, *args: Any, **kwargs: Any) -> None:
            real_save_file(tensors, filename, *args, **kwargs)
            size = os.path.getsize(filename)
            for index, spec in enumerate(faults.specs):
                if spec["kind"] == "kill" and spec["where"] == "mid-write" and spec.get("match", "") in str(filename):
                    faults.kill_counts[index] += 1
                    if faults.kill_counts[index] == spec.get("nth", 1):
                        os.truncate(filename, size // 2)  # the part that reached the disk before the kill
                        os.kill(os.getpid(), signal.SIGKILL)
            if faults._disk_full():
                os.truncate(filename, size // 3)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def mkstemp(*args: Any, **kwargs: Any) -> Any:
            faults._refuse(str(kwargs.get("dir", "")), new_entry=True)
            return real_mkstemp(*args, **kwargs)

        class FillingFile:
            """A file on a full disk: a third of what is written lands, then ENOSPC."""

            def __init__(self, handle: Any) -> None:
                self._handle = handle

            def write(self, data: Any) -> int:
                self._handle.write(data[: len(data) // 3])
                self._handle.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name: str) -> Any:
                return getattr(self._handle, name)

            def __enter__(self) -> FillingFile:
                return self

            def __exit__(self, *exc: object) -> None:
                self._handle.close()

        def writer_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = open(file, mode, *args, **kwargs)  # noqa: SIM115 - returned to the caller's with-block
            if any(c in mode for c in "wax+") and faults._disk_full():
                return FillingFile(handle)
            return handle

        def train_step(self: Any, images: Any, labels: Any, step: int) -> Any:
            for spec in faults.specs:
                if spec["kind"] == "nan" and step in spec["steps"]:
                    images = images.clone()
                    images[0, 0, 0, 0] = float("nan")
            return real_train_step(self, images, labels, step)

        os.replace = replace
        os.fsync = fsync
        pathlib.Path.unlink = unlink
        safetensors.torch.save_file = save_file
        tempfile.mkstemp = mkstemp
        training.engine.Trainer.train_step = train_step
        vitviz.fileio.open = writer_open  # a module global shadows the builtin for the one atomic writer ...
        training.runfolder.open = writer_open  # ... and for the run folder's append-only logs


def train(argv: list[str], faults: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`python -m training ARGV` with injected faults."""
    import torch

    import training.__main__

    torch.set_num_threads(1)
    _Faults(faults or []).install()
    return _capture(training.__main__.main, argv)


def decode_all(paths: list[list[str]]) -> dict[str, Any]:
    """decode_image and load_for_model on every (name, path), under the child's memory limit."""
    import numpy as np

    from vitviz.images import decode_image, load_for_model

    out = {}

    def model_input_shape(path: str) -> tuple[int, ...]:
        return tuple(load_for_model(path, input_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, in_chans=3).shape)

    for name, path in paths:
        decoded = _outcome(lambda path=path: np.asarray(decode_image(path)).shape)
        tensor = _outcome(lambda path=path: model_input_shape(path))
        out[name] = {"decode": decoded, "tensor": tensor}
    return out


def python_version() -> str:
    return sys.version
