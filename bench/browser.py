"""The studio in a real browser, shared by the app benchmark and tests/test_browser.py.

`streamlit_server` runs `streamlit run app.py` on a free port with its own runs and cache folders and waits
for `/_stcore/health`; `launch_chromium` starts the system Chromium (Debian's package) through Playwright,
which must be given its path because Playwright's own browser download is not available here; `wait_idle`
waits until a page's script has finished running and its elements are drawn.

"Running" is read from the `data-test-script-state` attribute Streamlit keeps on its app element
("initial", "running", "notRunning"...), not from the running indicator in the header: the indicator appears
only about half a second after a run starts, so a page whose script draws its heading and then computes for
a while would look idle to a check that comes before it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
)
# True while the page's script has not finished its run (or not started one), or an element is still a
# skeleton (a chart whose JavaScript has not loaded yet).
BUSY_JS = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app || app.getAttribute("data-test-script-state") !== "notRunning") return true;
  return !!document.querySelector('[data-testid="stSkeleton"]');
}"""


class ServerDidNotStart(RuntimeError):
    """`streamlit run` exited or did not answer its health check in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


@contextmanager
def streamlit_server(folder: Path, *, startup_timeout_s: float = 180.0, script: str = "app.py") -> Iterator[str]:
    """`streamlit run <script>` (the studio by default; a path from the repository root) on a free port, runs
    in `folder`/runs and its disk cache in `folder`/cache.

    Yields the server's URL once `/_stcore/health` answers 200; the server's output is in
    `folder`/streamlit.log. The process is stopped (terminated, then killed) on exit.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runs").mkdir(exist_ok=True)
    port = free_port()
    env = {**os.environ, "VITVIZ_RUNS_DIR": str(folder / "runs"), "VITVIZ_CACHE_DIR": str(folder / "cache")}
    command = [
        sys.executable, "-m", "streamlit", "run", script, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    log_path = folder / "streamlit.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://localhost:{port}"
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not _healthy(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise ServerDidNotStart(f"streamlit did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def launch_chromium(playwright: Any) -> Any:
    """The system Chromium, headless, through a started `sync_playwright()`; fails clearly when it is missing."""
    if not CHROMIUM.exists():
        raise FileNotFoundError(f"needs the system Chromium at {CHROMIUM} (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))


def busy(page: Any) -> bool:
    """Whether the page's script is running (or has not run yet) or an element is still a skeleton."""
    return bool(page.evaluate(BUSY_JS))


def wait_idle(page: Any, *, timeout_s: float, quiet_checks: int = 3, interval_ms: int = 150) -> None:
    """Until the page has not been busy (`busy`) for `quiet_checks` checks in a row."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while quiet < quiet_checks:
        quiet = 0 if busy(page) else quiet + 1
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not finish running")
        page.wait_for_timeout(interval_ms)
