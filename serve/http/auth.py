"""API keys: a file of ``KEY ROLE`` lines (``#`` comments and blank lines ignored), roles ``read`` (inference,
get/list/search), ``write`` (edits) and ``admin`` (import); each role includes the ones before it. Keys are compared in
constant time (``hmac.compare_digest`` against every key, no early exit) and never logged. A request without a key is
401, one with an unknown key 401, one whose key's role is too low 403. Without a key file every request is let in
(the server then binds only to loopback)."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from pathlib import Path

from fastapi import Request

from memory.errors import ValidationError
from serve.http.protocol import ApiError

ROLES = ("read", "write", "admin")
KEYS_ENV = "EDITMEM_API_KEYS_FILE"


class KeyRing:
    """The keys a server accepts and their roles."""

    def __init__(self, keys: dict[str, str]):
        self._keys = [(k.encode(), role) for k, role in keys.items()]

    def __len__(self) -> int:
        return len(self._keys)

    def role_of(self, key: str) -> str | None:
        given, found = key.encode(), None
        for stored, role in self._keys:
            if hmac.compare_digest(given, stored):
                found = role
        return found


def load_keys(path: str | os.PathLike[str] | None) -> KeyRing | None:
    """The keys in ``path`` (or ``$EDITMEM_API_KEYS_FILE``); None when neither names a file."""
    path = path or os.environ.get(KEYS_ENV)
    if not path:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ValidationError(f"cannot read the API keys file {path}: {err.strerror or err}") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ROLES:
            raise ValidationError(f"{path}:{number}: expected 'KEY ROLE' with ROLE one of {', '.join(ROLES)}")
        if len(parts[0]) < 8:
            raise ValidationError(f"{path}:{number}: a key must have at least 8 characters")
        keys[parts[0]] = parts[1]
    if not keys:
        raise ValidationError(f"{path}: no keys")
    return KeyRing(keys)


def presented_key(request: Request) -> str | None:
    """The key a request carries: ``Authorization: Bearer KEY`` (what the OpenAI SDK sends) or ``X-API-Key``."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


def require(role: str) -> Callable[[Request], None]:
    """A FastAPI dependency that lets in requests whose key has ``role`` or a higher one."""
    needed = ROLES.index(role)

    def check(request: Request) -> None:
        ring: KeyRing | None = request.app.state.ctx.keys
        if ring is None:
            return
        key = presented_key(request)
        if key is None:
            raise ApiError(401, "this server needs an API key (Authorization: Bearer KEY)",
                           type="authentication_error", code="missing_api_key")
        have = ring.role_of(key)
        if have is None:
            raise ApiError(401, "the API key is not valid", type="authentication_error", code="invalid_api_key")
        if ROLES.index(have) < needed:
            raise ApiError(403, f"this needs a {role} key; the key given is {have}", type="permission_error",
                           code="insufficient_role")

    return check
