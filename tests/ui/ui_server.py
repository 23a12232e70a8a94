"""A real `studio ui` server in a subprocess, shared by the browser and gradio_client tests
(imported as `ui_server`)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

USER, PASSWORD = "tester", "correct-horse"
OTHER_USER, OTHER_PASSWORD = "intruder", "battery-staple"  # a second login: must never see the tester's runs
# How long a condition may take before a test fails: generous, because every wait polls for its
# condition and returns as soon as it holds (a loaded machine is slower, never wrong).
DEADLINE_S = float(os.environ.get("STUDIO_UI_DEADLINE_S", "600"))


@dataclass
class Server:
    url: str
    root: Path  # holds users.txt, server.log and the workspace ws/
    process: subprocess.Popen | None = None

    @property
    def workspace(self) -> Path:
        return self.root / "ws"


def wait_for(condition, what: str, deadline_s: float = DEADLINE_S, every_s: float = 0.5):
    """Poll `condition()` until it returns something true (returned), or fail after `deadline_s`."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"after {deadline_s:.0f} s still waiting for {what}")
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def studio_ui(root: Path, *flags: str) -> Iterator[Server]:
    """`studio ui --auth-file` on a free port with workspace root/ws, until the block ends (then SIGTERM:
    the server stops its jobs cleanly)."""
    (root / "users.txt").write_text(f"# test logins\n{USER}:{PASSWORD}\n{OTHER_USER}:{OTHER_PASSWORD}\n")
    port = free_port()
    log = open(root / "server.log", "a")  # noqa: SIM115 (appended: a restarted server keeps the first's log)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "studio.cli",
            "ui",
            "--port",
            str(port),
            "--workspace",
            str(root / "ws"),
            "--auth-file",
            str(root / "users.txt"),
            *flags,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log.close()
                pytest.fail(f"studio ui did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.3)
    try:
        yield Server(f"http://127.0.0.1:{port}", root, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
