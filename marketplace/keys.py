"""API key format and hashing, shared by the console (creation) and the gateway (lookup).

A key reads ``sy-<prefix>-<secret>``: the prefix (8 url-safe characters) is stored in clear
so people can tell keys apart; the whole key is stored only as HMAC-SHA256 keyed with
``API_KEY_PEPPER``, so a leaked database does not leak usable keys.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from django.conf import settings

KEY_PREFIX = "sy"
PREFIX_LENGTH = 8
MAX_KEY_LENGTH = 128

# What a key may be used for, by the gateway's APIs. A key with no scopes may use every API;
# a key with scopes is refused (403 ``insufficient_scope``) anywhere else, before routing.
KEY_SCOPES: dict[str, str] = {
    "chat": "Chat completions (/v1/chat/completions)",
    "embeddings": "Embeddings (/v1/embeddings)",
    "tools": "Specialist tools (/v1/tools, the MCP server)",
    "models": "List models (/v1/models)",
    "generation": "Read route traces (/v1/generation)",
    "feedback": "Send feedback (/v1/feedback)",
}


def unknown_scopes(scopes: list[str]) -> list[str]:
    return [scope for scope in scopes if scope not in KEY_SCOPES]


@dataclass(frozen=True)
class NewKey:
    plaintext: str
    prefix: str
    key_hash: str


def hash_key(plaintext: str) -> str:
    return hmac.new(
        settings.API_KEY_PEPPER.encode(), plaintext.encode(), hashlib.sha256
    ).hexdigest()


def generate_key() -> NewKey:
    prefix = secrets.token_hex(PREFIX_LENGTH // 2)
    plaintext = f"{KEY_PREFIX}-{prefix}-{secrets.token_urlsafe(32)}"
    return NewKey(plaintext=plaintext, prefix=prefix, key_hash=hash_key(plaintext))


def looks_like_key(candidate: str) -> bool:
    """A cheap shape check that spares the cache and database obviously wrong keys."""
    return (
        0 < len(candidate) <= MAX_KEY_LENGTH
        and candidate.startswith(f"{KEY_PREFIX}-")
        and candidate.count("-") >= 2
        and candidate.isascii()
    )
