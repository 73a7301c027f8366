"""Authentication of the management API with an API key (``Authorization: Bearer sy-...``).

Kept apart from ``marketplace.api``: DRF imports authentication classes while it loads its
own views, so this module must not import ``rest_framework.views``.
"""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from marketplace import selectors
from marketplace.keys import hash_key, looks_like_key
from marketplace.models import ApiKey

# --- authentication -------------------------------------------------------------------------


class ApiKeyAuthentication(BaseAuthentication):
    """``Authorization: Bearer sy-...``: the key (hashed as the gateway hashes it) is the
    credential; ``request.auth`` is the ``ApiKey`` and its organisation the only tenant."""

    def authenticate(self, request: Request) -> tuple[Any, ApiKey] | None:
        header = get_authorization_header(request).decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        token = token.strip()
        if not looks_like_key(token):
            raise exceptions.AuthenticationFailed("invalid API key")
        key = selectors.api_key_by_hash(hash_key(token))
        if key is None:
            raise exceptions.AuthenticationFailed("invalid API key")
        if not key.is_active:
            raise exceptions.AuthenticationFailed("this API key is revoked or expired")
        return (KeyUser(key), key)

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="switchyard"'


class KeyUser:
    """The ``request.user`` of a key-authenticated request: authenticated, never staff, and
    no member of anything by itself (the key's organisation decides)."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False

    def __init__(self, key: ApiKey) -> None:
        self.key = key
        self.pk = None
        self.id = None

    def __str__(self) -> str:
        return f"API key {self.key.prefix}"
