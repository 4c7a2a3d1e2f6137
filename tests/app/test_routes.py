"""lib/routes.py in-process: every route MONAI Label's application has is declared, optional groups are served only
when enabled and then checked like the rest, and installing the policy again changes nothing."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
from fastapi.routing import APIRoute

from lib import routes

GROUPS = {"models": "segmentation", "backbone": "tiny", "engine": "torch", "auto_scoring": "false", "endpoints": "logs,batch_infer"}
# Declared for a server with MONAI_LABEL_AUTH_ENABLE=true: the login proxy is included only then.
AUTH_ROUTES = {("GET", "/auth/"), ("POST", "/auth/token"), ("GET", "/auth/token/valid")}


def upstream_routes(app) -> set[tuple[str, str]]:
    found = set()
    for router in routes.routers_of(app.router):
        for route in router.routes:
            if isinstance(route, APIRoute):
                found |= {(method, route.path) for method in route.methods}
            elif hasattr(route, "methods") and route.methods:
                found |= {(method, route.path) for method in route.methods - {"HEAD"}}
            elif hasattr(route, "app") and hasattr(route, "path"):
                found.add(("MOUNT", route.path))
    return found


def test_every_route_of_monailabel_is_declared(client):
    from monailabel.app import app

    served = upstream_routes(app)
    assert not served - set(routes.ROUTES), f"routes MONAI Label serves that lib/routes.py does not declare: {served - set(routes.ROUTES)}"
    assert set(routes.ROUTES) - served <= AUTH_ROUTES, (
        f"declared routes MONAI Label does not have: {set(routes.ROUTES) - served - AUTH_ROUTES}"
    )


def test_installing_again_keeps_monailabel_endpoints_underneath(client):
    from monailabel.app import app
    from monailabel.endpoints import info

    before = client.get("/info/").json()
    report = routes.install(app, frozenset({"sessions"}))
    assert "GET /info/" in report["open"] and "POST /reload" in report["closed"] and "GET /logs/" in report["disabled"]
    endpoint = next(r.endpoint for router in routes.routers_of(app.router) for r in router.routes if getattr(r, "path", "") == "/info/")
    assert endpoint.__samfewshot_original__ is info.api_app_info
    assert client.get("/info/").json() == before


def test_sessions_live_in_the_model_folder(client, app_dir):
    from monailabel.interfaces.utils.app import app_instance

    assert app_instance().sessions().store_path == str(app_dir / "model" / "sessions")


def test_unknown_endpoint_groups_stop_the_server():
    with pytest.raises(
        ValueError, match=r"unknown endpoint group\(s\) \['wsi'\] in --conf endpoints; valid: none, sessions, logs, batch_infer"
    ):
        routes.parse_endpoint_groups("logs,wsi")
    assert routes.parse_endpoint_groups("none") == frozenset()
    assert routes.parse_endpoint_groups(None) == {"sessions"}


@pytest.mark.parametrize("client_conf", [GROUPS])
def test_enabled_groups_are_checked_like_the_rest(client):
    assert client.get("/logs/?lines=99999999999999999999").status_code == 422
    response = client.get("/logs/?lines=100001")
    assert response.status_code == 422 and "lines must be in 0..100000" in response.text
    assert client.get("/logs/?lines=5&text=true").status_code in (200, 404)  # 404: no log file in-process
    if not shutil.which("nvidia-smi"):
        response = client.get("/logs/gpu")
        assert response.status_code == 404 and "nvidia-smi is not installed" in response.text
    for body, status, message in [
        ({"label_tag": "final"}, 422, "may not store its predictions as final labels"),
        ({"label_tag": "../x"}, 422, "label tag '../x' is not a plain name"),
        ({"image": "/etc/hostname"}, 422, "not one 'image'"),
        ({"model": "../x"}, 422, "differs from the model 'hf_sam'"),
        ({"images": "everything"}, 422, "differs from the images 'all'"),
        ({"image_path": "/etc/hostname"}, 422, "may not set image_path"),
    ]:
        response = client.post("/batch/infer/hf_sam", json=body)
        assert response.status_code == status and message in response.text, (body, response.text)
    assert client.post("/batch/infer/nosuch", json={}).status_code == 404
    response = client.get("/session/nosuch")  # sessions are not among the groups named
    assert response.status_code == 404 and "name 'sessions' in --conf endpoints" in response.text


def test_options_run_as_the_types_they_were_checked_as(client):
    """Numeric and boolean strings pass the checks; the run gets the numbers and booleans (a train request with
    "max_epochs": "1" once answered 200 and then failed in the run). A seed a generator cannot take is refused."""
    options = {"max_epochs": "1", "train_batch_size": "1", "val_split": "0", "multi_gpu": "false", "lr": "0.001"}
    stats = client.post("/train/hf_sam?run_sync=true", json=options)
    assert stats.status_code == 200 and stats.json()["epoch"] == 1, stats.text
    refused = client.post("/train/hf_sam", json={"max_epochs": "one", "lr": "-1"})
    assert refused.status_code == 422 and "max_epochs must be a positive integer" in refused.text and "lr must be" in refused.text
    for seed in ("abc", 7):
        assert client.post("/activelearning/random", json={"seed": seed}).status_code == 200
    refused = client.post("/activelearning/clasp_pe", json={"seed": -1})
    assert refused.status_code == 422 and "seed must be a non-negative integer or a string" in refused.text


def test_no_answer_names_a_server_path(client, app_dir, studies, sample_data):
    """Every JSON answer a client can get, after a training run and a session: ids and names, never a path under the
    datastore, the app (its model folder) or the temporary folder. Files (volumes, labels, adapters) are the routes'
    content and are left out; the task lists (train, scoring, batch infer: 404 without an async task here) carry log
    lines, checked below on their own."""
    import json
    import tempfile

    assert client.post("/train/hf_sam?run_sync=true", json={"max_epochs": 1, "val_split": 0}).status_code == 200
    volume = (studies / "brain_003.nii.gz").read_bytes()
    session = client.put("/session/", files={"files": ("brain.nii.gz", volume)})
    session_id = session.json()["session_id"]
    answers = {
        "PUT /session/": session,
        "GET /session/{session_id}": client.get(f"/session/{session_id}"),
        "GET /info/": client.get("/info/"),
        "GET /model/info/{model}": client.get("/model/info/hf_sam"),
        "POST /activelearning/{strategy}": client.post("/activelearning/random", json={}),
        "GET /datastore/": client.get("/datastore/?output=all"),
        "GET /datastore/image/info": client.get("/datastore/image/info?image=brain_003"),
        "GET /datastore/label/info": client.get("/datastore/label/info?label=brain_000&tag=final"),
        "POST /infer/{model}": client.post("/infer/hf_sam?image=brain_003&output=json"),
    }
    roots = {str(app_dir), str(studies), tempfile.gettempdir()}
    roots |= {str(sample_data)} | {os.path.realpath(r) for r in roots}
    for route, answer in answers.items():
        assert answer.status_code == 200, (route, answer.text)
        text = json.dumps(answer.json())
        leaked = [r for r in roots if r in text]
        assert not leaked, f"{route} names {leaked}: {text[:300]}"


def test_a_task_log_line_names_files_relative_to_their_folder():
    roots = ("/srv/app", "/srv/app/model", "/data/studies")
    details = {"details": ["split /srv/app/model/hf_sam_split.json: 2 / 1"], "path": "/data/studies/a.nii.gz", "id": "a"}
    assert routes.without_server_paths(details, roots) == {"details": ["split hf_sam_split.json: 2 / 1"], "id": "a"}


def test_a_pacs_that_never_answers_stalls_no_other_client(app_dir, monkeypatch):
    """A server on a PACS that accepts connections and never answers: the DICOMweb proxy waits in a worker thread,
    so the event loop answers meanwhile, and every request that needs the PACS (the proxy, /info/ through the
    datastore) ends with a 504 naming it after ``PACS_TIMEOUT_S`` instead of hanging."""
    import socket
    import threading

    from fastapi.testclient import TestClient
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    from lib import monailabel_compat

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held, silent = [], threading.Event()

    def pacs_that_falls_silent():
        """An empty PACS while the server starts, then one that accepts and never answers."""
        while True:
            try:
                connection = listener.accept()[0]
            except OSError:
                return
            if silent.is_set():
                held.append(connection)
                continue
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: 2\r\n\r\n[]")
            connection.close()

    threading.Thread(target=pacs_that_falls_silent, daemon=True).start()
    pacs = f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
    monkeypatch.setattr(monailabel_compat, "PACS_TIMEOUT_S", (2.0, 2.0))
    monkeypatch.setattr(settings, "MONAI_LABEL_APP_DIR", str(app_dir))
    monkeypatch.setattr(settings, "MONAI_LABEL_STUDIES", pacs)
    monkeypatch.setattr(settings, "MONAI_LABEL_APP_CONF", {"models": "hf_sam", "backbone": "tiny", "auto_scoring": "false"})
    clear_cache()
    from monailabel.app import app

    answers = {}
    try:
        with TestClient(app) as client:
            assert client.get("/info/").status_code == 200  # started on the empty PACS
            silent.set()
            waiting = threading.Thread(target=lambda: answers.update(proxy=client.get("/proxy/dicom/qido/studies")))
            waiting.start()
            deadline = time.monotonic() + 60
            while not held and waiting.is_alive():  # until the PACS has the proxied request
                assert time.monotonic() < deadline, "the proxy never reached the PACS"
                time.sleep(0.05)
            assert held, f"the proxy answered without asking the PACS: {answers['proxy'].status_code} {answers['proxy'].text}"
            schema = client.get("/openapi.json")
            answered_while_waiting = waiting.is_alive()
            waiting.join(120)
            monailabel_compat.clear_dicomweb_lists()  # /info/ must ask the PACS for its series again
            info = client.get("/info/")
    finally:
        clear_cache()
        listener.close()
        for connection in held:
            connection.close()
    assert schema.status_code == 200 and answered_while_waiting
    for answer in (answers["proxy"], info):
        assert answer.status_code == 504 and f"the PACS at {pacs} did not answer in time" in answer.text, answer.text


@pytest.mark.parametrize("client_conf", [{**GROUPS, "endpoints": "none"}, {**GROUPS, "models": "fgnet", "endpoints": "none"}])
def test_every_option_a_client_sees_is_declared_and_unknown_ones_are_refused_or_listed(client):
    """What /info/ shows as a task's config (3D Slicer and OHIF echo it) is declared with its type at the door, so
    the check and the task cannot drift; a key nobody declared is refused with the nearest name (train, active
    learning, scoring) or, for infer, dropped and listed in the answer."""
    from lib.checks.requests import COMMON_OPTIONS, INFER_PARAMS, TRAIN_OPTIONS

    info = client.get("/info/").json()
    for section, declared in [
        ("models", INFER_PARAMS),
        ("trainers", TRAIN_OPTIONS),
        ("strategies", routes.STRATEGY_OPTIONS),
        ("scoring", COMMON_OPTIONS),
    ]:
        for name, task in info[section].items():
            assert set(task.get("config", {})) <= set(declared), (section, name, set(task["config"]) - set(declared))
    for url, body, message in [
        ("/train/", {"max_epoch": 1}, "'max_epoch' is not one of the train options: By 'max_epoch', did you mean 'max_epochs'?"),
        ("/train/", {"learning_rate": 0.1}, "'learning_rate' is not one of the train options"),
        ("/activelearning/random", {"sead": 3}, "'sead' is not one of the active learning options: By 'sead', did you mean 'seed'?"),
        *[(f"/scoring/{method}", {"modle": "x"}, "'modle' is not one of the scoring options") for method in info["scoring"]],
    ]:
        response = client.post(url, json=body)
        assert response.status_code == 422 and message in response.text, (url, response.text)


@pytest.mark.parametrize("client_conf", [GROUPS])
def test_batch_infer_runs_the_options_it_accepted(client, studies):
    """A batch on a host without GPUs once answered 200 and then failed in the background (upstream spreads it over
    zero GPUs); numeric strings run as numbers; unknown keys are refused (no answer per volume lists them)."""
    response = client.post("/batch/infer/hf_sam?images=unlabeled&run_sync=true", json={"images": "unlabeled", "max_batch_size": "1"})
    assert response.status_code == 200, response.text
    assert len(list((studies / "labels" / "original").glob("*.nii.gz"))) == 1
    for body, message in [
        ({"max_batch_size": "all"}, "max_batch_size must be a non-negative integer"),
        ({"multi_gpu": True}, "this host has none"),
        ({"batch_sise": 2}, "'batch_sise' is not one of the batch infer options: By 'batch_sise', did you mean 'batch_size'?"),
    ]:
        if body.get("multi_gpu") and torch.cuda.device_count():
            continue  # a GPU host runs a multi-GPU batch
        response = client.post("/batch/infer/hf_sam?images=unlabeled", json={"images": "unlabeled", **body})
        assert response.status_code == 422 and message in response.text, (body, response.text)
