"""Write path of an organisation's (and a key's) privacy guard and response-cache settings,
and of the organisation's routing defaults.

Kept beside ``marketplace.services`` (which is near its size limit); the gateway caches
these settings with each API key, so every change tells the gateways to reload the keys.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from django.contrib.auth.models import User
from django.db import transaction

from marketplace import invalidation
from marketplace.models import ApiKey, Organization, PrivacyPolicy
from marketplace.services import ServiceError, _require, audit_record, organization_fields_update
from routing.errors import BadRequest
from routing.policy import parse_provider

MAX_CACHE_TTL = 30 * 24 * 3600
MAX_ROUTING_DEFAULTS_BYTES = 4096
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def normalised_regions(text: str) -> str:
    """``"EU, us-east"`` -> ``"eu,us-east"`` (sorted, unique); refuses what is not a region."""
    regions = sorted({r.strip().lower() for r in re.split(r"[,\s]+", text) if r.strip()})
    bad = [r for r in regions if not _REGION.match(r)]
    if bad:
        raise ServiceError(f"not a region code: {', '.join(bad)}")
    joined = ",".join(regions)
    if len(joined) > 200:
        raise ServiceError("too many trusted regions")
    return joined


def _check(privacy_policy: str, cache_ttl: int | None, cache_similarity: int | None) -> None:
    if privacy_policy not in PrivacyPolicy.values:
        raise ServiceError("the privacy policy is off, redact or trusted_only")
    if cache_ttl is not None and not 0 <= cache_ttl <= MAX_CACHE_TTL:
        raise ServiceError("the cache time is between 0 seconds and 30 days")
    if cache_similarity is not None and not 500 <= cache_similarity <= 1000:
        raise ServiceError("the similarity threshold is between 0.500 and 1.000")


def _forget_keys(keys: Any) -> None:
    for key_hash in keys.values_list("key_hash", flat=True):
        invalidation.publish_after_commit(invalidation.key_message(key_hash))


@transaction.atomic
def organization_data_policy_update(
    *,
    actor: User,
    organization: Organization,
    privacy_policy: str,
    cache_ttl: int,
    cache_similarity: int | None,
    trusted_regions: str = "",
) -> Organization:
    """Set the organisation's privacy policy, the regions ``trusted_only`` keeps personal
    data in (empty: any) and the cache defaults (owners and admins)."""
    _require(actor, organization, "members.manage")
    _check(privacy_policy, cache_ttl, cache_similarity)
    trusted_regions = normalised_regions(trusted_regions)
    values = {
        "privacy_policy": privacy_policy,
        "cache_ttl": cache_ttl,
        "cache_similarity": cache_similarity,
        "trusted_regions": trusted_regions,
    }
    locked, changes = organization_fields_update(
        actor=actor,
        organization=organization,
        values=values,
        action="organization.data_policy_update",
    )
    if changes:
        _forget_keys(ApiKey.objects.filter(organization=locked))
    for name in values:
        setattr(organization, name, getattr(locked, name))
    return organization


@transaction.atomic
def api_key_data_policy_update(
    *,
    actor: User,
    api_key: ApiKey,
    privacy_policy: str,
    cache_ttl: int | None,
    cache_similarity: int | None,
    log_content: bool | None = None,
) -> ApiKey:
    """Override the organisation's settings for one key ("" / None: inherit), and whether
    its route traces keep prompts and completions (``log_content``; None leaves it as it
    is, so a caller that only changes the privacy settings never turns it off)."""
    _require(actor, api_key.organization, "members.manage")
    if privacy_policy:
        _check(privacy_policy, cache_ttl, cache_similarity)
    else:
        _check(PrivacyPolicy.OFF, cache_ttl, cache_similarity)
    locked = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    locked.privacy_policy = privacy_policy
    locked.cache_ttl = cache_ttl
    locked.cache_similarity = cache_similarity
    if log_content is not None:
        locked.log_content = log_content
    locked.save(update_fields=["privacy_policy", "cache_ttl", "cache_similarity", "log_content"])
    audit_record(
        actor=actor,
        action="api_key.data_policy_update",
        target=locked,
        organization=locked.organization,
        details={
            "privacy_policy": privacy_policy,
            "cache_ttl": cache_ttl,
            "cache_similarity": cache_similarity,
            "log_content": locked.log_content,
        },
    )
    _forget_keys(ApiKey.objects.filter(pk=locked.pk))
    return locked


@transaction.atomic
def organization_routing_defaults_update(
    *, actor: User, organization: Organization, provider: Any
) -> Organization:
    """Set the organisation's routing policy (owners and admins): a ``provider`` object, as a
    request would send it, merged under every request's own (``routing.policy.merge_provider``:
    the request wins field by field, ``ignore`` lists add up, ``only`` and ``region``
    intersect, ``data_collection: deny`` holds if either asks). ``{}`` clears it.

    Refused, with the gateway's own message, unless a request could carry it.
    """
    _require(actor, organization, "members.manage")
    if provider is None:
        provider = {}
    if not isinstance(provider, dict):
        raise ServiceError("the routing policy is a JSON object, like a request's `provider`")
    try:
        size = len(orjson.dumps(provider))
    except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits, a lone surrogate
        raise ServiceError(
            "the routing policy holds a value JSON cannot carry here (an integer beyond "
            "64 bits or invalid text)"
        ) from None
    if size > MAX_ROUTING_DEFAULTS_BYTES:
        raise ServiceError(f"the routing policy is larger than {MAX_ROUTING_DEFAULTS_BYTES} bytes")
    try:
        parsed = parse_provider(provider, param="provider")
    except BadRequest as exc:
        raise ServiceError(exc.message) from None
    for name, allowed in (("only", parsed.only), ("region", parsed.regions)):
        if allowed is not None and not allowed:
            # Every request of the organisation would be refused: surely not what was meant.
            raise ServiceError(f"`provider.{name}` is empty: no endpoint could serve a request")
    locked, changes = organization_fields_update(
        actor=actor,
        organization=organization,
        values={"routing_defaults": provider},
        action="organization.routing_defaults_update",
    )
    if changes:
        _forget_keys(ApiKey.objects.filter(organization=locked))
    organization.routing_defaults = locked.routing_defaults
    return organization
