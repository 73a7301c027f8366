"""The console's playground: an organisation's platform-managed API key and the gateway
request a playground run becomes.

The browser never holds an API key. A console view (session + CSRF) calls the gateway
server-side with the organisation's playground key. That key is an ordinary API key (it
shows in the keys list, is metered like any other and can be revoked) whose secret part
is derived from its prefix with Django's ``salted_hmac``, so only its hash is stored and
the server can still present it. Revoking it (or rotating ``SECRET_KEY``) simply makes
the next run create a new one.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.http import HttpRequest
from django.utils.crypto import salted_hmac

from marketplace.keys import KEY_PREFIX, hash_key
from marketplace.models import ApiKey, Membership, Organization
from marketplace.selectors import role_allows
from marketplace.services import (
    PermissionDeniedError,
    api_key_create,
    api_key_revoke,
    audit_record,
)

PLAYGROUND_KEY_NAME = "Console playground"
PLAYGROUND_SCOPES = ["chat", "generation", "tools"]
PLAYGROUND_RATE_LIMIT_RPM = 30
PLAYGROUND_PERMISSION = "playground.use"
_SALT = "switchyard.playground-key"


def _secret_for(prefix: str) -> str:
    digest = salted_hmac(_SALT, prefix, algorithm="sha256").digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _plaintext_for(prefix: str) -> str:
    return f"{KEY_PREFIX}-{prefix}-{_secret_for(prefix)}"


@transaction.atomic
def playground_key_ensure(*, actor: User, organization: Organization) -> str:
    """The organisation's live playground key (its plaintext, for a server-side call),
    created on first use. Serialised per organisation by locking its row; a key whose
    secret can no longer be derived (``SECRET_KEY`` rotated) is revoked and replaced."""
    membership = Membership.objects.filter(organization=organization, user=actor).first()
    if membership is None or not role_allows(membership.role, PLAYGROUND_PERMISSION):
        raise PermissionDeniedError("your role in this organisation may not spend its credit")
    Organization.objects.select_for_update().filter(pk=organization.pk).first()
    current = ApiKey.objects.filter(
        organization=organization, kind=ApiKey.Kind.PLAYGROUND, revoked_at__isnull=True
    ).first()
    if current is not None:
        plaintext = _plaintext_for(current.prefix)
        # A key made before the playground needed a scope (tools, for orchestration) is
        # replaced like one whose secret can no longer be derived.
        if hash_key(plaintext) == current.key_hash and set(current.scopes) == set(
            PLAYGROUND_SCOPES
        ):
            return plaintext
        api_key_revoke(api_key=current)
    created = api_key_create(
        organization=organization,
        name=PLAYGROUND_KEY_NAME,
        created_by=actor,
        scopes=PLAYGROUND_SCOPES,
        rate_limit_rpm=PLAYGROUND_RATE_LIMIT_RPM,
    )
    key = created.api_key
    plaintext = _plaintext_for(key.prefix)
    key.kind = ApiKey.Kind.PLAYGROUND
    key.key_hash = hash_key(plaintext)
    key.save(update_fields=["kind", "key_hash"])
    audit_record(
        actor=actor,
        action="api_key.create",
        target=key,
        organization=organization,
        details={"name": key.name, "prefix": key.prefix, "kind": key.kind, "scopes": key.scopes},
    )
    return plaintext


def gateway_base_url(request: HttpRequest) -> str:
    """Where server-side calls reach the gateway: ``PLAYGROUND_GATEWAY_URL`` or, unset, the
    address this very process listens on (the gateway is mounted beside Django)."""
    if settings.PLAYGROUND_GATEWAY_URL:
        return str(settings.PLAYGROUND_GATEWAY_URL).rstrip("/")
    host = request.META.get("SERVER_NAME") or "127.0.0.1"
    port = str(request.META.get("SERVER_PORT") or "")
    if not port.isdigit() or port == "0":  # a Unix socket or an unknown server address
        return str(settings.SITE_URL).rstrip("/")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


# --- what a run asks the gateway ----------------------------------------------------------

ROUTES = {
    "auto": "Auto: classify the prompt",
    "tag": "A capability tag",
    "endpoint": "One vendor's endpoint",
    "cheapest": "Cheapest with the tag",
    "fastest": "Fastest with the tag",
    "cascade": "Cascade: cheap first, escalate when unsure",
    "orchestrate": "Orchestrate: a generalist calls specialists as tools",
}


@dataclass(frozen=True)
class PlaygroundRun:
    prompt: str
    route: str
    tag: str = "chat"
    endpoint: str = ""
    max_tokens: int = 128
    cascade_threshold: float = 0.6
    generalist: str = ""

    def gateway_body(self) -> dict[str, Any]:
        """The ``/v1/chat/completions`` body: streamed, with the usage (and cost) chunk."""
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.route == "orchestrate":
            body["model"] = "orchestrate"
            body["orchestrator"] = {"model": self.generalist}
        elif self.route == "auto":
            body["model"] = "auto"
        elif self.route == "endpoint":
            body["model"] = self.endpoint
        else:
            body["model"] = f"tag:{self.tag}"
        if self.route == "cheapest":
            body["provider"] = {"sort": "price"}
        elif self.route == "fastest":
            body["provider"] = {"sort": "latency"}
        elif self.route == "cascade":
            body["cascade"] = {"threshold": self.cascade_threshold}
        return body
