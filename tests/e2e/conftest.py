"""A real `monailabel start_server` subprocess on a free loopback port, for the end-to-end tests.

`start_server(*conf)` starts one on the test's own copy of the app and datastore (fixtures `app_dir`, `studies`,
`free_port` from tests/conftest.py) and returns a `Server`; every server a test started is stopped in teardown,
its whole process group included (training runs as a child `python -m monailabel.interfaces.utils.app`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from lib.trainers.adapter_trainer import free_loopback_port

REPO = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE_S = 120
# Scoring at start-up and after training is exercised by test_active_learning.py; elsewhere it would only add
# background subprocesses competing for the CPU.
BASE_CONF = (("models", "segmentation"), ("backbone", "tiny"), ("engine", "torch"), ("auto_scoring", "false"))


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

    def put(self, path: str, timeout: float = 120, **kwargs) -> requests.Response:
        return requests.put(self.url + path, timeout=timeout, **kwargs)

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


def server_command(app_dir: Path, studies: Path, port: int, conf: tuple[tuple[str, str], ...], start_script: bool = False) -> list[str]:
    """``monailabel start_server`` on loopback, or with ``start_script`` scripts/start.sh and its own host default."""
    cmd = [str(REPO / "scripts" / "start.sh")] if start_script else [sys.executable, "-m", "monailabel.main", "start_server"]
    cmd += ["--app", str(app_dir), "--studies", str(studies), "--port", str(port)]
    if not start_script:
        cmd += ["--host", "127.0.0.1"]
    merged = dict(BASE_CONF)
    merged.update(conf)  # a later value for a key replaces the default (e.g. backbone vit_b)
    for key, value in merged.items():
        cmd += ["--conf", key, value]
    return cmd


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["MONAI_LABEL_TRACKING_ENABLED"] = "false"
    # The server sees what its scoring/training subprocesses write to the datastore by reloading it on change;
    # in-process tests and scripts switch that off in this process's environment.
    env["MONAI_LABEL_DATASTORE_AUTO_RELOAD"] = "true"
    # Training runs in a subprocess started by the server: it must find this venv's interpreter and tools first.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def launch(
    app_dir: Path,
    studies: Path,
    port: int,
    conf: tuple[tuple[str, str], ...],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    ready_status: int = 200,
    expect_failure: bool = False,
    start_script: bool = False,
) -> Server:
    """Start a server (``server_command``) and wait until /info/ answers ``ready_status`` (401 for a server that
    wants a token); with ``expect_failure`` until the process exits by itself. The caller stops it (``Server.stop``)."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            server_command(app_dir, studies, port, conf, start_script),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=server_env(env),
            cwd=str(log_path.parent),
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path, app_dir, studies)
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if expect_failure:
                return server
            pytest.fail(f"server exited early with code {process.returncode}; log tail:\n{server.log_tail()}")
        if not expect_failure:
            try:
                if requests.get(server.url + "/info/", timeout=2).status_code == ready_status:
                    return server
            except requests.RequestException:
                pass
        time.sleep(0.5)
    server.stop()
    if expect_failure:
        pytest.fail(f"server was expected to fail at start-up but still runs; log tail:\n{server.log_tail()}")
    pytest.fail(f"server did not answer /info/ within {STARTUP_DEADLINE_S} s; log tail:\n{server.log_tail()}")


@pytest.fixture
def start_server(tmp_path, app_dir, studies, free_port) -> Callable[..., Server]:
    """start_server(("key", "value"), ..., expect_failure=False) -> Server (running, /info/ answering).

    With ``expect_failure=True`` the process must exit by itself before the deadline; the Server is returned
    with its log for the test to inspect.
    """
    servers: list[Server] = []

    def start(*conf: tuple[str, str], expect_failure: bool = False) -> Server:
        port = free_port if not servers else free_loopback_port()
        log_path = tmp_path / f"server-{len(servers)}.log"
        server = launch(app_dir, studies, port, conf, log_path, expect_failure=expect_failure)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def module_server_factory(module_tmp, module_app_dir, module_studies) -> Callable[..., Server]:
    """start(*conf, env=None, ready_status=200, start_script=False) -> Server on the module's app and brain-MRI
    datastore copies (one server per module keeps the CPU for the tests); every server it started stops when the
    module ends. See ``launch`` for the keywords."""
    servers: list[Server] = []

    def start(*conf: tuple[str, str], **kwargs) -> Server:
        log_path = module_tmp / f"server-{len(servers)}.log"
        servers.append(launch(module_app_dir, module_studies, free_loopback_port(), conf, log_path, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


# ---- a PACS: Orthanc (Debian packages) holding sample volumes as DICOM series ------------------------------
DICOMWEB_SAMPLES = ("brain_002", "brain_003", "brain_004")
ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
HAS_ORTHANC = bool(shutil.which("Orthanc")) and any(os.path.exists(f"{d}/libOrthancDicomWeb.so") for d in ORTHANC_PLUGIN_DIRS)


@pytest.fixture
def orthanc(tmp_path) -> str:
    """A private Orthanc with the DICOMweb plugin, started by scripts/orthanc.sh; its DICOMweb root."""
    if not HAS_ORTHANC:
        pytest.skip("Debian packages orthanc and orthanc-dicomweb are not installed (scripts/setup.sh installs them as root)")
    folder = tmp_path / "orthanc"
    script = str(REPO / "scripts" / "orthanc.sh")
    started = subprocess.run([script, "start", str(folder), str(free_loopback_port())], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    yield started.stdout.strip()
    subprocess.run([script, "stop", str(folder)], check=True)


@pytest.fixture
def dicomweb_samples() -> tuple[str, ...]:
    return DICOMWEB_SAMPLES


@pytest.fixture
def dicomweb_studies(orthanc, sample_data, tmp_path, monkeypatch) -> str:
    """Orthanc's DICOMweb root holding DICOMWEB_SAMPLES as MR series (sent by scripts/upload_dicom.py); a module
    serves it by overriding its `studies` fixture with this one."""
    sent = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "upload_dicom.py"), "--url", orthanc]
        + [str(sample_data / "brain-mri" / f"{name}.nii.gz") for name in DICOMWEB_SAMPLES],
        capture_output=True,
        text=True,
    )
    assert sent.returncode == 0, sent.stderr
    assert len(sent.stdout.splitlines()) == len(DICOMWEB_SAMPLES), sent.stdout
    # MONAI Label lists CT series unless told otherwise, and caches what it fetches under the home directory.
    monkeypatch.setenv("MONAI_LABEL_DICOMWEB_SEARCH_FILTER", json.dumps({"Modality": "MR"}))
    monkeypatch.setenv("MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / "dicomweb-cache"))
    return orthanc
