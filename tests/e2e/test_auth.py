"""Access: a real server with MONAI_LABEL_AUTH_ENABLE=true verifies bearer tokens against a realm's RSA key and
applies MONAI Label's role checks; scripts/start.sh listens on loopback only.

The realm is a local HTTP thread serving a freshly generated RSA public key the way Keycloak does
(``GET <realm URI>`` -> ``{"public_key": <base64 DER>}``); tokens are signed here with its private key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

pytestmark = pytest.mark.e2e

ADMIN, ANNOTATOR, USER = "monailabel-admin", "monailabel-annotator", "monailabel-user"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_der_b64(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def realm():
    """(realm URI, private key): a Keycloak-like realm endpoint on loopback."""
    key = rsa_key()
    realm_info = {"realm": "samfewshot", "public_key": public_der_b64(key)}

    class Realm(BaseHTTPRequestHandler):
        def do_GET(self):
            base = f"http://127.0.0.1:{self.server.server_address[1]}/realms/samfewshot"
            answers = {
                "/realms/samfewshot": realm_info,
                "/realms/samfewshot/.well-known/openid-configuration": {"token_endpoint": f"{base}/protocol/openid-connect/token"},
            }
            self.answer(200 if self.path in answers else 404, answers.get(self.path, {}))

        def do_POST(self):
            """Keycloak's password grant: user 'ann', password 'secret'."""
            form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
            if self.path.endswith("/protocol/openid-connect/token") and form.get("password") == ["secret"]:
                self.answer(200, {"access_token": "issued", "token_type": "bearer"})
            else:
                self.answer(401, {"error": "invalid_grant", "error_description": "Invalid user credentials"})

        def answer(self, status: int, body: dict) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Realm)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/realms/samfewshot", key
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(module_server_factory, realm):
    uri, _ = realm
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": uri}
    return module_server_factory(env=env, ready_status=401)


def token(realm, roles: list[str], key=None, algorithm="RS256", **claims) -> str:
    uri, realm_key = realm
    payload = {"iss": uri, "exp": int(time.time()) + 300, "preferred_username": "ann", "realm_access": {"roles": roles}}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key if key is not None else realm_key, algorithm=algorithm)


def hmac_token(payload: dict, secret: bytes) -> str:
    """An HS256 JWT written by hand (PyJWT refuses to key HMAC with a public key, which is the attack)."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = part(b'{"alg":"HS256","typ":"JWT"}') + "." + part(json.dumps(payload).encode())
    return signing_input + "." + part(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def put_label(server, headers, sample_data) -> requests.Response:
    path = sample_data / "brain-mri-groundtruth" / "brain_002.nii.gz"
    with open(path, "rb") as f:
        return server.put("/datastore/label?image=brain_002&tag=final", files={"label": (path.name, f)}, headers=headers)


def put_image(server, headers, sample_data) -> requests.Response:
    path = sample_data / "brain-mri" / "brain_003.nii.gz"
    with open(path, "rb") as f:
        return server.put("/datastore/image?image=uploaded", files={"file": (path.name, f)}, headers=headers)


def test_no_token_is_401(server):
    assert server.get("/info/").status_code == 401
    assert server.put("/datastore/label?image=brain_002&tag=final", files={"label": ("x.nii.gz", b"")}).status_code == 401


def test_a_valid_token_names_the_user_and_roles(server, realm):
    response = server.get("/auth/token/valid", headers=bearer(token(realm, [USER])))
    assert response.status_code == 200, response.text
    assert response.json()["username"] == "ann" and response.json()["roles"] == [USER]
    assert server.get("/info/", headers=bearer(token(realm, [USER]))).status_code == 200


def test_the_login_proxy_answers_401_for_a_refused_password(server):
    """POST /auth/token forwards to the realm's password grant; MONAI Label answered 500 when the realm said no."""
    response = server.post("/auth/token", data={"username": "ann", "password": "wrong"})
    assert response.status_code == 401 and "refused this user name and password" in response.text, response.text
    response = server.post("/auth/token", data={"username": "ann", "password": "secret"})
    assert response.status_code == 200 and response.json()["access_token"] == "issued", response.text


def test_an_annotator_saves_a_label_and_uploads_an_image(server, realm, sample_data):
    headers = bearer(token(realm, [ANNOTATOR]))
    response = put_label(server, headers, sample_data)
    assert response.status_code == 200, response.text
    assert response.json()["label"] == "brain_002"
    response = put_image(server, headers, sample_data)
    assert response.status_code == 200, response.text
    assert (server.studies / "uploaded.nii.gz").is_file()


@pytest.mark.parametrize(
    "kind",
    ["other-key", "expired", "other-issuer", "no-expiry", "hmac-with-public-key", "not-a-jwt"],
)
def test_bad_tokens_are_401(kind, server, realm):
    uri, key = realm
    if kind == "other-key":
        value = token(realm, [ADMIN, ANNOTATOR, USER], key=rsa_key())
    elif kind == "expired":
        value = token(realm, [ADMIN, ANNOTATOR, USER], exp=int(time.time()) - 60)
    elif kind == "other-issuer":
        value = token(realm, [ADMIN, ANNOTATOR, USER], iss="http://127.0.0.1:1/realms/other")
    elif kind == "no-expiry":
        value = token(realm, [ADMIN, ANNOTATOR, USER], exp=None)
    elif kind == "hmac-with-public-key":
        # The classic algorithm confusion: an HS256 "signature" keyed with the realm's public key text.
        pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        value = hmac_token({"iss": uri, "exp": int(time.time()) + 300, "realm_access": {"roles": [ADMIN]}}, pem)
    else:
        value = "not.a.token"
    response = server.get("/info/", headers=bearer(value))
    assert response.status_code == 401, response.text
    assert response.json()["detail"] == "Could not validate credentials"


@pytest.mark.parametrize(
    "roles,action,status",
    [
        ([USER], "label", 403),
        ([USER], "image", 403),
        ([USER, ANNOTATOR], "train", 403),
        ([ADMIN], "label", 403),  # MONAI Label's roles do not nest: an admin without the annotator role cannot save
        ([ADMIN], "train", 404),  # past the role check; the unknown model keeps a run from starting
    ],
)
def test_roles_gate_writes(roles, action, status, server, realm, sample_data):
    headers = bearer(token(realm, roles))
    if action == "label":
        response = put_label(server, headers, sample_data)
    elif action == "image":
        response = put_image(server, headers, sample_data)
    else:
        response = server.post("/train/nosuch", json={}, headers=headers)
    assert response.status_code == status, response.text
    if status == 403:
        assert "is required to perform this action" in response.json()["detail"]


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as Linux writes them) of the sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


def test_start_script_listens_on_loopback_only(module_server_factory):
    if not Path("/proc/net/tcp6").exists():
        pytest.skip("needs Linux /proc/net/tcp and tcp6 to see which address a socket listens on")
    server = module_server_factory(start_script=True)
    port = int(server.url.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"0100007F"}, "scripts/start.sh should listen on 127.0.0.1 only"
