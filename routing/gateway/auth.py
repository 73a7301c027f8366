"""API key authentication with an in-process cache.

Keys are looked up by their keyed hash: first in a small in-process cache, then once in
the database. A revoked key is dropped from every replica's cache through the
invalidation channel (as is a key whose data changed: its organisation's routing policy,
its data policy, ...); the cache's TTL bounds staleness should a message be lost. A read
that was under way when its key was invalidated may predate the change: it is not cached (a
request waiting on it reads once more). A known key past its TTL is answered from the cache
while it is re-read in the background, so no request waits for the database, and while
PostgreSQL is away the last answer is kept.
Unknown keys are remembered briefly too, so guessing keys cannot hammer the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from marketplace.keys import hash_key, looks_like_key
from marketplace.models import ApiKey
from routing.errors import BadRequest, Forbidden, Unauthorized, Unavailable
from routing.gateway.db import off_loop
from routing.policy import ProviderPolicy, parse_provider

logger = logging.getLogger("switchyard.gateway")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: int
    organization_id: int
    key_hash: str
    prefix: str
    expires_at: float | None  # epoch seconds
    revoked: bool
    rate_limit_rpm: int | None
    rate_limit_tpm: int | None = None
    credit_limit: int | None = None
    credit_limit_period: str = "never"
    scopes: tuple[str, ...] = ()
    org_budget: int | None = None  # the organisation's monthly budget (nano-USD)
    # The key's settings over its organisation's: privacy guard and response cache.
    privacy: str = "off"  # "off" | "redact" | "trusted_only"
    cache_ttl: int = 0  # seconds a cached answer is reused by default; 0: only when asked
    cache_similarity: int | None = None  # semantic cache threshold, cosine x 1000
    trusted_regions: frozenset[str] | None = None  # trusted_only: the allowed regions
    # The organisation's routing policy, parsed once: merged under each request's provider.
    provider_default: ProviderPolicy | None = None
    log_content: bool = False  # opted in: prompts and completions go into the route traces

    def allows(self, scope: str) -> bool:
        """A key without scopes may use every API."""
        return not self.scopes or scope in self.scopes


def require_scope(key: KeyInfo, scope: str) -> None:
    """Refuse a call outside the key's scopes (403), before anything is routed or held."""
    if not key.allows(scope):
        raise Forbidden(
            f"this API key may not use the `{scope}` API (its scopes: {', '.join(key.scopes)})",
            code="insufficient_scope",
        )


def _query_key(key_hash: str) -> KeyInfo | None:
    row = (
        ApiKey.objects.filter(key_hash=key_hash)
        .values(
            "pk",
            "organization_id",
            "prefix",
            "expires_at",
            "revoked_at",
            "rate_limit_rpm",
            "rate_limit_tpm",
            "credit_limit",
            "credit_limit_period",
            "scopes",
            "organization__monthly_budget",
            "privacy_policy",
            "cache_ttl",
            "cache_similarity",
            "organization__privacy_policy",
            "organization__cache_ttl",
            "organization__cache_similarity",
            "organization__trusted_regions",
            "organization__routing_defaults",
            "log_content",
        )
        .first()
    )
    if row is None:
        return None
    expires: datetime | None = row["expires_at"]
    return KeyInfo(
        key_id=row["pk"],
        organization_id=row["organization_id"],
        key_hash=key_hash,
        prefix=row["prefix"],
        expires_at=expires.timestamp() if expires else None,
        revoked=row["revoked_at"] is not None,
        rate_limit_rpm=row["rate_limit_rpm"],
        rate_limit_tpm=row["rate_limit_tpm"],
        credit_limit=row["credit_limit"],
        credit_limit_period=row["credit_limit_period"],
        scopes=tuple(row["scopes"] or ()),
        org_budget=row["organization__monthly_budget"],
        privacy=row["privacy_policy"] or row["organization__privacy_policy"] or "off",
        cache_ttl=(
            row["cache_ttl"] if row["cache_ttl"] is not None else row["organization__cache_ttl"]
        ),
        cache_similarity=(
            row["cache_similarity"]
            if row["cache_similarity"] is not None
            else row["organization__cache_similarity"]
        ),
        trusted_regions=(
            frozenset(row["organization__trusted_regions"].split(","))
            if row["organization__trusted_regions"]
            else None
        ),
        log_content=row["log_content"],
        provider_default=_provider_default(
            row["organization_id"], row["organization__routing_defaults"]
        ),
    )


# A stored policy's fields that protect data or keep vendors out: one of these that no
# longer parses is not dropped (that would quietly send prompts where the organisation said
# they must not go) but read as allowing no endpoint.
_PROTECTIVE_FIELDS = frozenset({"data_collection", "zdr", "region", "only", "ignore"})


def _provider_default(organization_id: int, value: Any) -> ProviderPolicy | None:
    """The organisation's routing policy. It was checked when it was saved, so a field that
    no longer parses can only follow a change of the rules (or an edit outside the
    services): a preference (sort, max_price...) is dropped, a protective field fails closed
    (``only: []``: no endpoint serves the organisation until an owner saves the policy
    again). Either is logged; neither is a 400 on every request."""
    if not value:
        return None
    try:
        return parse_provider(value, param="organization.provider")
    except BadRequest as exc:
        logger.warning("organisation %s: routing policy: %s", organization_id, exc.message)
    kept: dict[str, Any] = {}
    closed = not isinstance(value, dict)
    for field, item in value.items() if isinstance(value, dict) else ():
        try:
            parse_provider({field: item}, param="organization.provider")
        except BadRequest:
            closed = closed or field in _PROTECTIVE_FIELDS
            continue
        kept[field] = item
    if closed:
        kept["only"] = []
    return parse_provider(kept, param="organization.provider")


class _Load:
    """The reads of one key under way since it was last invalidated. ``forget()`` and
    ``clear()`` drop it from ``KeyCache._loads``, which is how a read learns that the row it
    got may predate a change: only a read whose ``_Load`` is still the current one is cached."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = 0


class KeyCache:
    def __init__(
        self,
        *,
        ttl: float,
        negative_ttl: float = 5.0,
        max_entries: int = 100_000,
        loader: Callable[[str], Awaitable[KeyInfo | None]] | None = None,
    ) -> None:
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[float, KeyInfo | None]] = OrderedDict()
        self._loader = loader or off_loop(_query_key)
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        # Keys being read (misses and background refreshes), each with its current _Load;
        # only keys with a read under way are here, so invalidations cannot grow it.
        self._loads: dict[str, _Load] = {}

    def forget(self, key_hash: str) -> None:
        self._entries.pop(key_hash, None)
        self._loads.pop(key_hash, None)  # reads under way must not cache what they got

    def clear(self) -> None:
        self._entries.clear()
        self._loads.clear()

    async def authenticate(self, authorization: str | None, scope: str | None = None) -> KeyInfo:
        """The key's cached facts; with ``scope``, also refuse a key not allowed that API."""
        if not authorization:
            raise Unauthorized(
                "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key"
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not looks_like_key(token):
            raise Unauthorized("invalid API key")
        key_hash = hash_key(token)
        cached = self._entries.get(key_hash)
        if cached is not None and cached[1] is not None:
            info: KeyInfo | None = cached[1]
            if cached[0] <= time.monotonic():
                # A known key past its TTL: answer from the cache and re-read it in the
                # background, so no request waits for the database (nor for its timeout
                # while PostgreSQL is away; a revocation still arrives through pub/sub).
                self._refresh_in_background(key_hash)
        elif cached is not None and cached[0] > time.monotonic():
            info = None  # an unknown key, remembered briefly
        else:
            try:
                info = await self._load(key_hash)
            except Exception:
                logger.warning("key lookup failed", exc_info=True)
                raise Unavailable(
                    "this API key cannot be checked right now; retry shortly",
                    code="auth_unavailable",
                ) from None
        if info is None:
            raise Unauthorized("invalid API key")
        if info.revoked:
            raise Unauthorized("this API key has been revoked", code="revoked_api_key")
        if info.expires_at is not None and info.expires_at <= time.time():
            raise Unauthorized("this API key has expired", code="expired_api_key")
        if scope is not None:
            require_scope(info, scope)
        return info

    async def _load(self, key_hash: str) -> KeyInfo | None:
        """Read a key missing from the cache and cache it. Should the key be invalidated
        while it is read, the row may predate the change: it is read once more, and that
        answer is cached only if no invalidation came in meanwhile either."""
        for _ in range(2):
            load = self._begin_load(key_hash)
            try:
                info = await self._loader(key_hash)
            finally:
                current = self._end_load(key_hash, load)
            if current:
                self._store(key_hash, info)
                break
        return info

    def _begin_load(self, key_hash: str) -> _Load:
        load = self._loads.get(key_hash)
        if load is None:
            load = self._loads[key_hash] = _Load()
        load.pending += 1
        return load

    def _end_load(self, key_hash: str, load: _Load) -> bool:
        """Whether the key was not invalidated since ``load`` began, so its read may be
        cached (called with no await between it and the store)."""
        load.pending -= 1
        current = self._loads.get(key_hash) is load
        if current and not load.pending:
            del self._loads[key_hash]
        return current

    def _store(self, key_hash: str, info: KeyInfo | None) -> None:
        ttl = self._ttl if info is not None else self._negative_ttl
        self._entries[key_hash] = (time.monotonic() + ttl, info)
        self._entries.move_to_end(key_hash)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def _refresh_in_background(self, key_hash: str) -> None:
        if key_hash in self._refreshing:
            return
        task = asyncio.get_running_loop().create_task(self._refresh(key_hash))
        self._refreshing[key_hash] = task
        task.add_done_callback(lambda _: self._refreshing.pop(key_hash, None))

    async def _refresh(self, key_hash: str) -> None:
        load = self._begin_load(key_hash)
        error: Exception | None = None
        try:
            info = await self._loader(key_hash)
        except Exception as exc:
            error = exc
        finally:
            current = self._end_load(key_hash, load)
        if not current:
            # Invalidated (revoked, its policy changed) while we were reading: what we read
            # may predate the change. The entry is gone; the next request reads afresh.
            return
        if error is not None:
            cached = self._entries.get(key_hash)
            if cached is None:  # evicted meanwhile: nothing to keep
                return
            # The database is away: keep trusting what we knew for another TTL.
            logger.warning("key refresh failed; serving the cached answer", exc_info=error)
            info = cached[1]
        self._store(key_hash, info)
