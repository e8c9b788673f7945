"""The studio's own defences: how the server is configured, what its pickers accept, and where uploads go.

- Config: the server binds to localhost, XSRF protection is on, uploads are capped; checked in the file, in the
  options Streamlit actually resolves, and on a real `streamlit run` (what it listens on, and an upload without
  the session's XSRF token refused).
- Pickers: a model can be named in the URL (?model=, ?compare=), picked from discovered checkpoints, runs and
  samples, or given a run id on /train. Traversal (../, absolute paths, NUL bytes, symlinks out of the allowed
  folders) must never reach a file outside the bundled checkpoints, the runs folder or the upload cache.
- Uploads: never written to disk under the name the browser sent.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.reliability.conftest import ROOT, safetensors_bytes, tiny_checkpoint_parts

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the toml package that streamlit depends on
    import toml as tomllib

DEFAULT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"
APP = ROOT / "app.py"
UPLOAD_LIMIT_MB = 400  # what the README promises: a ViT-B/16 checkpoint fits


@pytest.fixture
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Runs, cache and a working directory of the test's own; an `outside` folder the app must never reach."""
    made = {name: tmp_path / name for name in ("runs", "cache", "cwd", "outside")}
    for path in made.values():
        path.mkdir()
    monkeypatch.setenv("VITVIZ_RUNS_DIR", str(made["runs"]))
    monkeypatch.setenv("VITVIZ_CACHE_DIR", str(made["cache"]))
    monkeypatch.chdir(made["cwd"])
    return made


def _app(page: str | None = None, query: dict[str, object] | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=120)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    at.run()
    if page is not None:
        at.switch_page(page).run()
    return at


def _texts(elements) -> list[str]:
    return [str(e.value).replace("\\", "") for e in elements]


# --- configuration ------------------------------------------------------------------------------------------------


def test_config_file_binds_localhost_with_xsrf_and_an_upload_cap() -> None:
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    server = config["server"]
    assert server["address"] == "localhost"
    assert server["enableXsrfProtection"] is True
    assert 0 < server["maxUploadSize"] <= UPLOAD_LIMIT_MB
    assert config["browser"]["gatherUsageStats"] is False


def test_streamlit_resolves_the_same_settings() -> None:
    """Options as Streamlit itself reads them from the repository (a misspelt key would be ignored silently)."""
    code = (
        "import json; from streamlit import config; config.get_config_options(force_reparse=True); "
        "print(json.dumps({k: config.get_option(k) for k in ('server.address', 'server.enableXsrfProtection', "
        "'server.maxUploadSize', 'browser.gatherUsageStats')}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    options = json.loads(done.stdout.strip().splitlines()[-1])
    assert options == {
        "server.address": "localhost",
        "server.enableXsrfProtection": True,
        "server.maxUploadSize": options["server.maxUploadSize"],
        "browser.gatherUsageStats": False,
    }
    assert 0 < options["server.maxUploadSize"] <= UPLOAD_LIMIT_MB


def test_image_uploaders_have_a_smaller_cap_than_checkpoints() -> None:
    from vitviz.ui import widgets

    assert 0 < widgets.MAX_IMAGE_UPLOAD_MB <= 50


def _listening_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def test_real_server_listens_on_localhost_only_and_refuses_an_upload_without_xsrf_token(folders, tally: dict) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(port),
        "--server.headless",
        "true",
    ]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as answer:
                    assert answer.read().strip() == b"ok"
                    break
            except OSError:  # refused, or (while the App's start-up imports) accepted but not answered in time
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        addresses = _listening_addresses(port)
        assert addresses and addresses <= {"127.0.0.1", "::1"}, addresses
        upload = urllib.request.Request(
            f"http://127.0.0.1:{port}/_stcore/upload_file/some-session/some-file",
            data=b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\nabc\r\n--x--\r\n',
            headers={"Content-Type": "multipart/form-data; boundary=x"},
            method="PUT",
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(upload, timeout=10)
        assert refused.value.code == 403, refused.value.code
        tally["app hardening"]["real server checks (bind, XSRF)"] += 2
    finally:
        server.terminate()  # the server this test started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# --- pickers --------------------------------------------------------------------------------------------------------

HOSTILE_KEYS = [
    "bundled:../../../../etc/passwd",
    "bundled:/etc/passwd",
    "bundled:shapes-default/../../../../etc/passwd",
    "bundled:shapes-default\x00.png",
    "run:../outside",
    "run:/etc",
    "run:good/../../outside",
    "run:good/epoch-001/../../../../outside/evil",
    "run:good\x00/epoch-001",
    "upload:../../outside/evil",
    "upload:/etc/passwd",
    "upload:0123456789abcdef\x00",
    "timm:../../outside/evil",
    "timm:/etc/passwd",
    "/etc/passwd",
    "../../outside/evil.safetensors",
    "file:///etc/passwd",
    "",
]


def _run_folder(runs: Path, run_id: str, checkpoint: bytes) -> Path:
    run = runs / run_id
    (run / "checkpoints").mkdir(parents=True)
    (run / "best.safetensors").write_bytes(checkpoint)
    (run / "checkpoints" / "epoch-001.safetensors").write_bytes(checkpoint)
    (run / "config.json").write_text(json.dumps({"preset": "tiny"}))
    (run / "status.json").write_text(json.dumps({"status": "finished", "run_id": run_id}))
    return run


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=[repr(k) for k in HOSTILE_KEYS])
def test_hostile_model_keys_resolve_to_nothing(key: str, folders, tally: dict) -> None:
    from vitviz.ui import catalog

    _run_folder(folders["runs"], "good", DEFAULT.read_bytes())
    entries = catalog.discover_models(runs=folders["runs"])
    tally["app hardening"]["hostile model keys"] += 1
    assert catalog.resolve_key(key, entries) is None


@pytest.mark.parametrize(
    ("page", "query"),
    [
        (None, {"model": "bundled:../../../../etc/passwd"}),
        (None, {"model": "run:/etc"}),
        (None, {"model": "upload:0123456789abcdef\x00"}),
        ("vitviz/ui/compare.py", {"compare": ["bundled:/etc/passwd", "run:../outside"]}),
    ],
)
def test_hostile_urls_fall_back_to_the_default_model(page, query, folders, tally: dict) -> None:
    at = _app(page, query)
    tally["app hardening"]["hostile URLs in the app"] += 1
    assert not at.exception, [e.value for e in at.exception]
    assert at.sidebar.selectbox(key="vv.model.widget").value == "bundled:shapes-default"


def _escape_routes(runs: Path, outside: Path, checkpoint: bytes) -> None:
    """Symlinks from inside the runs folder to checkpoints and run folders outside it."""
    _run_folder(outside, "elsewhere", checkpoint)
    (runs / "escape").symlink_to(outside / "elsewhere", target_is_directory=True)
    inside = _run_folder(runs, "inside", checkpoint)
    (outside / "secret.safetensors").write_bytes(checkpoint)
    (inside / "checkpoints" / "epoch-002.safetensors").symlink_to(outside / "secret.safetensors")
    (inside / "last.safetensors").symlink_to(outside / "secret.safetensors")
    linked_best = _run_folder(runs, "linked-best", checkpoint)
    (linked_best / "best.safetensors").unlink()
    (linked_best / "best.safetensors").symlink_to(outside / "secret.safetensors")


def _outside(path: Path | None, allowed: list[Path]) -> bool:
    if path is None:
        return False
    real = path.resolve()
    return not any(real.is_relative_to(folder.resolve()) for folder in allowed)


def test_symlinks_out_of_the_runs_folder_are_not_offered(folders, tally: dict) -> None:
    from vitviz import runs as run_folders
    from vitviz.ui import catalog

    _escape_routes(folders["runs"], folders["outside"], DEFAULT.read_bytes())
    tally["app hardening"]["symlink escapes tried"] += 4
    allowed = [catalog.CHECKPOINTS_DIR, folders["runs"]]
    runs = run_folders.list_run_folders(folders["runs"])
    assert [r.name for r in runs if _outside(r, [folders["runs"]])] == []
    offered = catalog.discover_models(runs=folders["runs"])
    assert [e.key for e in offered if _outside(e.path, allowed)] == []


def test_symlinked_sample_images_out_of_the_samples_folder_are_not_offered(tmp_path: Path) -> None:
    from vitviz.ui import catalog

    samples, outside = tmp_path / "samples", tmp_path / "outside"
    samples.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "private.png")
    Image.new("RGB", (8, 8)).save(samples / "cat.png")
    (samples / "linked.png").symlink_to(outside / "private.png")
    files = [f for s in catalog.discover_sample_sets(samples) for f in s.files]
    assert [f.name for f in files if _outside(f, [samples])] == []


def test_app_pickers_offer_nothing_behind_a_symlink(folders) -> None:
    """The sidebar's model picker and /train's runs table and "Follow run" picker, on a runs folder with escapes."""
    _escape_routes(folders["runs"], folders["outside"], DEFAULT.read_bytes())
    at = _app("vitviz/ui/train.py")
    assert not at.exception, [e.value for e in at.exception]
    picker = at.sidebar.selectbox(key="vv.model.widget")
    forbidden = ("run escape", "run inside · epoch-002", "run inside · last", "run linked-best · best")
    leaked = [label for label in picker.options if label.startswith(forbidden)]
    follow = (
        at.selectbox(key="train.follow.widget").options
        if any(s.key == "train.follow.widget" for s in at.selectbox)
        else []
    )
    assert leaked == [] and "escape" not in follow, (picker.options, follow)


@pytest.mark.parametrize("run_id", ["../escape", "/tmp/escape-abs", "..", "a/../../escape", "nul\x00byte", "-rf"])
def test_train_form_refuses_run_ids_that_leave_the_runs_folder(run_id: str, folders, tally: dict) -> None:
    from vitviz.ui import runs

    at = _app("vitviz/ui/train.py")
    at.selectbox(key="train.preset.train").set_value("tiny")
    at.text_input(key="train.run_id").set_value(run_id)
    next(b for b in at.get("form_submit_button") if b.label == "Start").click().run()
    tally["app hardening"]["hostile run ids"] += 1
    assert not at.exception, [e.value for e in at.exception]
    assert any("run id" in e for e in _texts(at.error)), _texts(at.error)
    assert runs.started_here(run_id) is None
    assert list(folders["runs"].iterdir()) == [] and list(folders["outside"].iterdir()) == []
    assert not Path("/tmp/escape-abs").exists()


def test_sample_picker_refuses_traversal(folders) -> None:
    from vitviz.errors import VitvizError
    from vitviz.ui import widgets

    for set_name, image_name in (
        ("..", "../../etc/passwd"),
        ("samples", "/etc/passwd"),
        ("natural photos", "../x\x00"),
    ):
        with pytest.raises(VitvizError):
            widgets.sample_image(set_name, image_name)


# --- uploads ------------------------------------------------------------------------------------------------------------

# No NUL bytes here: no browser sends them in a file name (Streamlit itself refuses such a name).
HOSTILE_NAMES = ["../../escape-up.png", "/tmp/escape-abs-up.png", "..\\..\\escape-win.png", "./.escape-hidden.png"]


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _all_files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file()]


def test_uploads_are_never_written_under_their_own_names(folders, tally: dict) -> None:
    """Images and checkpoints uploaded under traversal names: only content-hash names appear on disk."""
    at = _app("vitviz/ui/rollout.py")
    images = [(name, _png(i), "image/png") for i, name in enumerate(HOSTILE_NAMES)]
    at.file_uploader(key="rollout.images.upload").set_value(images).run()
    assert not at.exception, [e.value for e in at.exception]
    checkpoint = safetensors_bytes(*tiny_checkpoint_parts(seed=3))
    for name in ("../../escape-ckpt.safetensors", "/tmp/escape-abs-ckpt.safetensors", "..\\escape-win.safetensors"):
        at.file_uploader(key="vv.add.upload").set_value((name, checkpoint, "application/octet-stream")).run()
        assert not at.exception, [e.value for e in at.exception]
    tally["app hardening"]["uploads under traversal names"] += len(HOSTILE_NAMES) + 3
    written = _all_files(folders["cache"], folders["runs"], folders["cwd"], folders["outside"])
    assert [p for p in written if "escape" in p.name] == []
    for path in written:
        relative = path.relative_to(folders["cache"]).as_posix()  # everything the app wrote is in its cache
        assert re.fullmatch(
            r"uploads/[0-9a-f]{16}\.safetensors|analyses/[a-z-]+/[0-9a-f]{2}/[0-9a-f]{64}\.npz", relative
        ), relative
    for stray in (Path("/tmp/escape-abs-up.png"), Path("/tmp/escape-abs-ckpt.safetensors"),
                  folders["cwd"].parent.parent / "escape-up.png", ROOT.parent / "escape-ckpt.safetensors"):  # fmt: skip
        assert not stray.exists(), stray
    uploaded = [p for p in written if p.parent.name == "uploads"]
    assert len(uploaded) == 1 and uploaded[0].read_bytes() == checkpoint  # one file, named by its content hash


# --- Hugging Face models named in a URL ------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Records every host name the server resolves and every Hub download it starts (each refused at once)."""
    import vitviz.models.hf as hf
    from vitviz.errors import VitvizError

    seen: dict[str, list[str]] = {"hosts": [], "downloads": []}

    def getaddrinfo(host, *args, **kwargs):
        seen["hosts"].append(str(host))
        raise socket.gaierror(socket.EAI_NONAME, "resolving is not allowed here")

    def download(repo_id: str) -> Path:
        seen["downloads"].append(repo_id)
        raise VitvizError(f"cannot download hf:{repo_id} from the Hugging Face Hub (offline)")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(hf, "_download", download)
    return seen


def _hub_button(at):
    return next((b for b in at.sidebar.button if b.label.startswith("Download hf:")), None)


def test_a_hub_id_in_the_url_downloads_nothing_until_the_user_asks(folders, offline, tally: dict) -> None:
    at = _app(None, {"model": "hf:google/vit-base-patch16-224"})
    tally["app hardening"]["hf links tried"] += 1
    assert not at.exception, [e.value for e in at.exception]
    assert offline == {"hosts": [], "downloads": []}, offline
    assert at.sidebar.selectbox(key="vv.model.widget").value == "bundled:shapes-default"
    button = _hub_button(at)
    assert button is not None and button.label == "Download hf:google/vit-base-patch16-224"
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert offline["downloads"] == ["google/vit-base-patch16-224"]
    assert any("cannot download hf:google/vit-base-patch16-224" in e for e in _texts(at.error)), _texts(at.error)
    assert at.sidebar.selectbox(key="vv.model.widget").value == "bundled:shapes-default"


@pytest.mark.parametrize("key", ["hf:assets/samples", "hf:models/tiny"])
def test_a_url_never_reaches_a_local_folder_through_hf(key: str, folders, offline, tally: dict) -> None:
    """`hf:owner/name` in a URL is a Hub id only: a folder of that name beside the server (the repository's own
    assets/samples, or a real model folder in its working directory) is never read, even after the click."""
    from tests.reliability.conftest import tiny_hf_files, write_hf_folder
    from vitviz.ui import catalog

    write_hf_folder(folders["cwd"] / "models" / "tiny", tiny_hf_files())
    (folders["cwd"] / "assets").symlink_to(ROOT / "assets", target_is_directory=True)
    tally["app hardening"]["hf links tried"] += 1
    at = _app(None, {"model": key})
    assert not at.exception, [e.value for e in at.exception]
    _hub_button(at).click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert offline["downloads"] == [key.removeprefix("hf:")], offline
    assert at.sidebar.selectbox(key="vv.model.widget").value == "bundled:shapes-default"
    # The same through the loader the studio uses: the folder exists, yet only the Hub is asked.
    from vitviz.errors import VitvizError
    from vitviz.models import load_model

    entry = catalog.resolve_key(key, [])
    with pytest.raises(VitvizError, match="cannot download"):
        load_model(entry.source, hf_local_folders=False)
    assert load_model("hf:models/tiny").meta.class_names == ["circle", "square", "triangle"]  # the CLI reads it


def test_a_hub_id_in_a_compare_link_downloads_nothing(folders, offline) -> None:
    at = _app("vitviz/ui/compare.py", {"compare": ["bundled:shapes-default", "hf:google/vit-base-patch16-224"]})
    assert not at.exception, [e.value for e in at.exception]
    assert offline == {"hosts": [], "downloads": []}, offline
