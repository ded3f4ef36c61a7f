"""API keys: a file of ``KEY ROLE [NAMESPACE]`` lines (``#`` comments and blank lines ignored), roles ``read``
(inference, get/list/search), ``write`` (edits) and ``admin`` (import, consolidate, the key list); each role includes
the ones before it. A key with a NAMESPACE is bound to it: its requests use that store namespace and no other. Keys are
compared in constant time (``hmac.compare_digest`` against every key, no early exit) and never logged. A request
without a key is 401, one with an unknown key 401, one whose key's role is too low 403, one naming a namespace its key
is not bound to 403. Without a key file every request is let in (the server then binds only to loopback).

The namespace of a request (:func:`request_namespace`): its key's, if the key is bound to one; else what the request
names (the ``X-Editmem-Namespace`` header, and/or a ``namespace`` query parameter or ``editmem.namespace`` option,
which must agree); else the server's ``--namespace`` (default ``default``)."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from pathlib import Path

from fastapi import Request

from memory.errors import ValidationError
from memory.namespaces import check_namespace
from serve.http.protocol import ApiError

ROLES = ("read", "write", "admin")
KEYS_ENV = "EDITMEM_API_KEYS_FILE"
NAMESPACE_HEADER = "x-editmem-namespace"


class KeyRing:
    """The keys a server accepts, their roles and the namespaces they are bound to (None: any)."""

    def __init__(self, keys: dict[str, str], namespaces: dict[str, str] | None = None):
        bound = namespaces or {}
        self._keys = [(k.encode(), role, bound.get(k)) for k, role in keys.items()]

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, key: str) -> tuple[str, str | None] | None:
        """``(role, namespace)`` of ``key`` (namespace None: not bound), None for an unknown key."""
        given, found = key.encode(), None
        for stored, role, namespace in self._keys:
            if hmac.compare_digest(given, stored):
                found = (role, namespace)
        return found

    def role_of(self, key: str) -> str | None:
        found = self.lookup(key)
        return None if found is None else found[0]

    def summary(self) -> list[dict[str, object]]:
        """What the keys allow, never the keys: one entry per role and namespace with how many keys have it."""
        counts: dict[tuple[str, str | None], int] = {}
        for _, role, namespace in self._keys:
            counts[(role, namespace)] = counts.get((role, namespace), 0) + 1
        return [{"role": role, "namespace": namespace, "keys": n}
                for (role, namespace), n in sorted(counts.items(), key=lambda x: (ROLES.index(x[0][0]), x[0][1] or ""))]


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
    namespaces: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or parts[1] not in ROLES:
            raise ValidationError(f"{path}:{number}: expected 'KEY ROLE [NAMESPACE]' with ROLE one of "
                                  f"{', '.join(ROLES)}")
        if len(parts[0]) < 8:
            raise ValidationError(f"{path}:{number}: a key must have at least 8 characters")
        if parts[0] in keys:
            raise ValidationError(f"{path}:{number}: this key is given twice")
        keys[parts[0]] = parts[1]
        if len(parts) == 3:
            try:
                namespaces[parts[0]] = check_namespace(parts[2])
            except ValidationError as err:
                raise ValidationError(f"{path}:{number}: {err}") from None
    if not keys:
        raise ValidationError(f"{path}: no keys")
    return KeyRing(keys, namespaces)


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
        request.state.key_namespace = None
        if ring is None:
            return
        key = presented_key(request)
        if key is None:
            raise ApiError(401, "this server needs an API key (Authorization: Bearer KEY)",
                           type="authentication_error", code="missing_api_key")
        found = ring.lookup(key)
        if found is None:
            raise ApiError(401, "the API key is not valid", type="authentication_error", code="invalid_api_key")
        have, request.state.key_namespace = found
        if ROLES.index(have) < needed:
            article = "an" if role[0] in "aeiou" else "a"
            raise ApiError(403, f"this needs {article} {role} key; the key given is {have}", type="permission_error",
                           code="insufficient_role")

    return check


def request_namespace(request: Request, asked: str | None = None) -> str:
    """The store namespace ``request`` uses (module docstring); ``asked``: what its body or query names. Call it
    after :func:`require` has checked the key."""
    named = {check_namespace(n) for n in (asked, request.headers.get(NAMESPACE_HEADER)) if n is not None}
    if len(named) > 1:
        raise ApiError(400, f"the request names two namespaces ({', '.join(sorted(named))}): the "
                            "X-Editmem-Namespace header and the request must agree", param="namespace")
    bound: str | None = getattr(request.state, "key_namespace", None)
    if bound is not None:
        if named and named != {bound}:
            raise ApiError(403, f"this API key is bound to the namespace {bound!r}", type="permission_error",
                           param="namespace", code="namespace_forbidden")
        return bound
    return next(iter(named)) if named else str(request.app.state.ctx.settings.namespace)
