"""A real `monailabel start_server` subprocess on a free loopback port, for the end-to-end tests.

`start_server(*conf)` starts one on the test's own copy of the app and datastore (fixtures `app_dir`, `studies`,
`free_port` from tests/conftest.py) and returns a `Server`; every server a test started is stopped in teardown,
its whole process group included (training runs as a child `python -m monailabel.interfaces.utils.app`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

STARTUP_DEADLINE_S = 120
# Scoring at start-up and after training is exercised by test_active_learning.py; elsewhere it would only add
# background subprocesses competing for the CPU.
BASE_CONF = (("models", "hf_sam,masg_sam"), ("backbone", "tiny"), ("auto_scoring", "false"))


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    app_dir: Path
    studies: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def get(self, path: str, timeout: float = 60, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=timeout, **kwargs)

    def post(self, path: str, timeout: float = 120, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=timeout, **kwargs)

    def info(self) -> dict:
        response = self.get("/info/")
        assert response.status_code == 200, f"/info/ answered {response.status_code}: {response.text}\n{self.log_tail()}"
        return response.json()

    def stop(self) -> None:
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        # Training subprocesses share the group and may outlive the server's own exit.
        _signal_group(self.process.pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def server_command(app_dir: Path, studies: Path, port: int, conf: tuple[tuple[str, str], ...]) -> list[str]:
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    merged = dict(BASE_CONF)
    merged.update(conf)  # a later value for a key replaces the default (e.g. backbone vit_b)
    for key, value in merged.items():
        cmd += ["--conf", key, value]
    return cmd


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MONAI_LABEL_TRACKING_ENABLED"] = "false"
    # The server sees what its scoring/training subprocesses write to the datastore by reloading it on change;
    # in-process tests and scripts switch that off in this process's environment.
    env["MONAI_LABEL_DATASTORE_AUTO_RELOAD"] = "true"
    # Training runs in a subprocess started by the server: it must find this venv's interpreter and tools first.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def start_server(tmp_path, app_dir, studies, free_port) -> Callable[..., Server]:
    """start_server(("key", "value"), ..., expect_failure=False) -> Server (running, /info/ answering).

    With ``expect_failure=True`` the process must exit by itself before the deadline; the Server is returned
    with its log for the test to inspect.
    """
    servers: list[Server] = []

    def start(*conf: tuple[str, str], expect_failure: bool = False) -> Server:
        port = free_port if not servers else _another_port()
        log_path = tmp_path / f"server-{len(servers)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                server_command(app_dir, studies, port, conf),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=server_env(),
                cwd=str(tmp_path),
                start_new_session=True,
            )
        server = Server(f"http://127.0.0.1:{port}", process, log_path, app_dir, studies)
        servers.append(server)

        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                if expect_failure:
                    return server
                pytest.fail(f"server exited early with code {process.returncode}; log tail:\n{server.log_tail()}")
            if not expect_failure:
                try:
                    if requests.get(server.url + "/info/", timeout=2).status_code == 200:
                        return server
                except requests.RequestException:
                    pass
            time.sleep(0.5)
        if expect_failure:
            pytest.fail(f"server was expected to fail at start-up but still runs; log tail:\n{server.log_tail()}")
        pytest.fail(f"server did not answer /info/ within {STARTUP_DEADLINE_S} s; log tail:\n{server.log_tail()}")

    yield start
    for server in servers:
        server.stop()


def _another_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
