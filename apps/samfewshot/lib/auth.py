"""Token checks for ``MONAI_LABEL_AUTH_ENABLE=true``.

MONAI Label 0.8.5 verifies a bearer token with ``jwt.decode(token, key, options=...)``: PyJWT 2 requires the
accepted algorithms to be named and refuses every token without them, so with auth on nobody gets in. The app
replaces that check at start-up (``lib.monailabel_compat.install``): RSA signatures only (the realm's public key is
an RSA key; an HMAC "signature" made with the public key as secret is never accepted), an ``exp`` claim that is
required and checked, and the issuer must be the configured realm. The audience is not checked, as in MONAI Label:
Keycloak names the client in ``azp`` and puts ``account`` in ``aud``. Roles come from the claim ``MONAI_LABEL_AUTH_TOKEN_ROLES`` names
(``realm_access#roles``: a path through nested claims).
"""

from __future__ import annotations

import logging
from typing import Any

import jwt
import requests
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.endpoints.user import auth

logger = logging.getLogger(__name__)

ALGORITHMS = ["RS256", "RS384", "RS512"]


def from_token(token: str) -> auth.User:
    """The user a bearer token names; raises jwt.InvalidTokenError (MONAI Label answers 401) for a bad token."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return auth.DEFAULT_USER
    realm = settings.MONAI_LABEL_AUTH_REALM_URI
    try:
        key = auth.get_public_key(realm)
    except (requests.RequestException, KeyError, ValueError) as e:
        logger.error(f"cannot fetch the realm's public key from {realm}: {e}")
        raise HTTPException(status_code=503, detail=f"cannot fetch the token signing key from {realm}") from e
    payload = jwt.decode(token, key, algorithms=ALGORITHMS, issuer=realm, options={"verify_aud": False, "require": ["exp", "iss"]})
    roles: Any = payload
    for claim in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        roles = roles.get(claim) if isinstance(roles, dict) else None
    return auth.User(
        username=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or "",
        email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
        name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
        roles=[str(r) for r in roles] if isinstance(roles, list) else [],
    )
