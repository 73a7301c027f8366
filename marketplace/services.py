"""Write operations on the customer side: organisations, members, API keys."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from marketplace import invalidation
from marketplace.keys import generate_key
from marketplace.models import ApiKey, Membership, Organization


class ServiceError(Exception):
    """A request to change state that cannot be honoured; the message says why."""


@transaction.atomic
def organization_create(
    *,
    name: str,
    slug: str | None = None,
    owner: User | None = None,
    billing_mode: str = Organization.BillingMode.PREPAID,
) -> Organization:
    """Create an organisation (and its owner's membership when an owner is given)."""
    name = name.strip()
    if not name:
        raise ServiceError("an organisation needs a name")
    slug = slugify(slug or name)[:64]
    if not slug:
        raise ServiceError("the organisation's name gives no usable slug")
    if billing_mode not in Organization.BillingMode.values:
        raise ServiceError(f"unknown billing mode {billing_mode!r}")
    if Organization.objects.filter(slug=slug).exists():
        raise ServiceError(f"an organisation with the slug {slug!r} exists already")
    organization = Organization.objects.create(name=name, slug=slug, billing_mode=billing_mode)
    if owner is not None:
        Membership.objects.create(organization=organization, user=owner, role=Membership.Role.OWNER)
    return organization


@dataclass(frozen=True)
class CreatedKey:
    api_key: ApiKey
    plaintext: str  # shown once, never stored


def api_key_create(
    *,
    organization: Organization,
    name: str,
    created_by: User | None = None,
    scopes: list[str] | None = None,
    credit_limit: int | None = None,
    credit_limit_period: str = ApiKey.Period.NEVER,
    rate_limit_rpm: int | None = None,
    expires_at: datetime | None = None,
) -> CreatedKey:
    """Create an API key; the plaintext is returned once and only its hash is stored."""
    name = name.strip()
    if not name:
        raise ServiceError("a key needs a name")
    if credit_limit is not None and credit_limit < 0:
        raise ServiceError("a credit limit cannot be negative")
    if expires_at is not None and expires_at <= timezone.now():
        raise ServiceError("the expiry must be in the future")
    new = generate_key()
    api_key = ApiKey.objects.create(
        organization=organization,
        name=name,
        prefix=new.prefix,
        key_hash=new.key_hash,
        scopes=scopes or [],
        credit_limit=credit_limit,
        credit_limit_period=credit_limit_period,
        rate_limit_rpm=rate_limit_rpm,
        expires_at=expires_at,
        created_by=created_by,
    )
    return CreatedKey(api_key=api_key, plaintext=new.plaintext)


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke a key; every gateway replica forgets it as soon as the change commits."""
    locked = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    if locked.revoked_at is None:
        locked.revoked_at = timezone.now()
        locked.save(update_fields=["revoked_at"])
    invalidation.publish_after_commit(invalidation.key_message(locked.key_hash))
    return locked
