"""A fork server for the reliability suite: `python -m tests.reliability._sandbox`.

Importing torch, timm and streamlit takes seconds on a busy 2-core machine, and the suite runs a few hundred
short jobs that must each live in a process of their own (so that one can be killed with SIGKILL, held to a
memory limit, or crash without taking pytest down). This server imports everything once, then forks one child
per request; a child starts in milliseconds with the modules already loaded.

Protocol (one JSON object per line): the test writes
    {"job": NAME, "kwargs": {...}, "out": DIR, "memory_limit": BYTES | null, "timeout": S, "kill_after": S | null}
and the server answers {"pid": PID} as soon as the child exists, then {"status": ..., "signal": ...} when it
has ended. The child runs `tests.reliability._jobs.NAME(**kwargs)` with stdout and stderr sent to DIR/stdout and
DIR/stderr, writes the returned JSON to DIR/result.json and its memory figures to DIR/memory.json.
`memory_limit` caps the growth of the child's address space (RLIMIT_AS, on top of what the server already
maps); `kill_after` has the server send SIGKILL to the child after that many seconds (it is the child's
parent, so the pid cannot have been reused); `timeout` ends a hung child with SIGALRM.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import sys
import time
import traceback
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def _vm_bytes() -> tuple[int, int]:
    """(address space, resident set) of this process in bytes, from /proc."""
    with open("/proc/self/statm") as handle:
        size, resident = handle.read().split()[:2]
    return int(size) * PAGE, int(resident) * PAGE


def _preload() -> None:
    import torch

    torch.set_num_threads(1)
    import safetensors.torch  # noqa: F401
    import timm  # noqa: F401

    import training.__main__
    import training.engine  # noqa: F401
    import vitviz.cli
    import vitviz.images
    import vitviz.models

    try:  # the app's modules, for jobs that drive it through AppTest
        import plotly.graph_objects  # noqa: F401
        import streamlit.testing.v1  # noqa: F401

        import vitviz.plots.interactive
        import vitviz.plots.paper
        import vitviz.ui.widgets  # noqa: F401
    except ImportError:
        pass
    import tests.reliability._jobs  # noqa: F401

    _warm_up()


def _warm_up() -> None:
    """Train a few steps here, once: the first run in a process pays seconds of one-off set-up (kernels, timm's
    model registry, the shapes renderer) that every forked child would otherwise pay again."""
    import logging
    import tempfile

    import training.__main__

    with tempfile.TemporaryDirectory(prefix="vitviz-warm-up-") as folder:
        argv = ["train", "--preset", "tiny", "--runs-dir", folder, "--run-id", "warm-up", "--no-progress",
                "--device", "cpu", "--max-steps", "2"]  # fmt: skip
        training.__main__.main(argv)
    root = logging.getLogger()
    for handler in list(root.handlers):  # children configure their own logging, as a fresh process would
        root.removeHandler(handler)


def _child(request: dict) -> None:
    """Runs in the forked child; never returns."""
    code = 0
    try:
        out = Path(request["out"])
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.stdin = open(os.devnull)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(request.get("timeout") or 120))
        size, resident = _vm_bytes()
        if request.get("memory_limit"):
            limit = size + int(request["memory_limit"])
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        from tests.reliability import _jobs

        result = getattr(_jobs, request["job"])(**request.get("kwargs", {}))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        (out / "memory.json").write_text(json.dumps({"rss_start": resident, "rss_peak": peak}))
        (out / "result.json").write_text(json.dumps(result))
    except BaseException:
        traceback.print_exc()
        code = 99
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _wait(pid: int, kill_after: float | None) -> int:
    """Wait for the child; SIGKILL it first when `kill_after` seconds pass. Returns the raw wait status."""
    if kill_after is not None:
        pidfd = os.pidfd_open(pid)
        try:
            ready, _, _ = select.select([pidfd], [], [], max(0.0, kill_after))
            if not ready:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return status


def main() -> None:
    # The protocol gets a descriptor of its own; anything else printed here (e.g. by the warm-up) goes to the log.
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _preload()
    reply.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    reply.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            reply.close()
            _child(request)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
        status = _wait(pid, request.get("kill_after"))
        answer = {
            "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "seconds": time.monotonic() - started,
        }
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
