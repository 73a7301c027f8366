"""Write operations on the customer side: organisations, members, API keys."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import models, transaction
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify

from marketplace import invalidation
from marketplace.keys import KEY_SCOPES, generate_key, unknown_scopes
from marketplace.models import ApiKey, AuditLogEntry, Invitation, Membership, Organization
from marketplace.selectors import invitation_token_hash, role_allows, user_emails


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
    scopes = list(dict.fromkeys(scopes or []))
    if unknown := unknown_scopes(scopes):
        raise ServiceError(f"unknown scope {unknown[0]!r}; choose from {', '.join(KEY_SCOPES)}")
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


# --- the consoles: audited changes made by people -----------------------------------------
#
# The functions below are what the customer console calls. Each takes the acting user,
# checks the actor's role in the organisation (the views check too), makes the change with
# the services above and writes an ``AuditLogEntry`` in the same database transaction.

INVITATION_TTL = timedelta(days=7)


class PermissionDeniedError(ServiceError):
    """The actor's role does not allow this change."""


def _target_type(target: models.Model) -> str:
    return f"{target._meta.app_label}.{target._meta.model_name}"


def audit_record(
    *,
    actor: User | None,
    action: str,
    target: models.Model | None = None,
    target_type: str = "",
    target_id: str | int = "",
    organization: Organization | None = None,
    details: dict[str, Any] | None = None,
) -> AuditLogEntry:
    """Append one entry to the audit log (``target`` or ``target_type``/``target_id``)."""
    if target is not None:
        target_type, target_id = _target_type(target), target.pk
    real_actor = actor if getattr(actor, "is_authenticated", False) else None
    return AuditLogEntry.objects.create(
        actor=real_actor,
        actor_repr=(getattr(real_actor, "email", "") or str(real_actor or "system"))[:254],
        organization=organization,
        action=action,
        target_type=target_type,
        target_id=str(target_id),
        details=details or {},
    )


def _require(actor: User, organization: Organization, permission: str) -> Membership:
    membership = Membership.objects.filter(organization=organization, user=actor).first()
    if membership is None or not role_allows(membership.role, permission):
        raise PermissionDeniedError("your role in this organisation does not allow that")
    return membership


# Console paths that an organisation's slug must not shadow (/console/<slug>/).
RESERVED_ORGANIZATION_SLUGS = frozenset({"new", "invitations"})


@transaction.atomic
def console_organization_create(*, actor: User, name: str) -> Organization:
    """Create an organisation owned by ``actor`` (the slug comes from the name)."""
    if slugify(name)[:64] in RESERVED_ORGANIZATION_SLUGS:
        raise ServiceError(f"{name.strip()!r} is reserved; choose another name")
    organization = organization_create(name=name, owner=actor)
    audit_record(
        actor=actor,
        action="organization.create",
        target=organization,
        organization=organization,
        details={"name": organization.name, "slug": organization.slug},
    )
    return organization


@transaction.atomic
def console_api_key_create(
    *,
    actor: User,
    organization: Organization,
    name: str,
    scopes: list[str] | None = None,
    credit_limit: int | None = None,
    credit_limit_period: str = ApiKey.Period.NEVER,
    rate_limit_rpm: int | None = None,
    expires_at: datetime | None = None,
) -> CreatedKey:
    """Create a key for ``organization``; the plaintext is in the result, never in the log."""
    _require(actor, organization, "keys.manage")
    if credit_limit_period not in ApiKey.Period.values:
        raise ServiceError(f"unknown reset period {credit_limit_period!r}")
    if rate_limit_rpm is not None and rate_limit_rpm < 1:
        raise ServiceError("a rate limit is at least one request per minute")
    created = api_key_create(
        organization=organization,
        name=name,
        created_by=actor,
        scopes=scopes,
        credit_limit=credit_limit,
        credit_limit_period=credit_limit_period,
        rate_limit_rpm=rate_limit_rpm,
        expires_at=expires_at,
    )
    key = created.api_key
    audit_record(
        actor=actor,
        action="api_key.create",
        target=key,
        organization=organization,
        details={
            "name": key.name,
            "prefix": key.prefix,
            "scopes": key.scopes,
            "credit_limit": key.credit_limit,
            "credit_limit_period": key.credit_limit_period,
            "rate_limit_rpm": key.rate_limit_rpm,
            "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        },
    )
    return created


@transaction.atomic
def console_api_key_revoke(*, actor: User, api_key: ApiKey) -> ApiKey:
    """Revoke a key of an organisation ``actor`` may manage keys of (idempotent)."""
    _require(actor, api_key.organization, "keys.manage")
    locked = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    was_active = locked.revoked_at is None
    revoked = api_key_revoke(api_key=locked)
    if was_active:
        audit_record(
            actor=actor,
            action="api_key.revoke",
            target=revoked,
            organization=revoked.organization,
            details={"name": revoked.name, "prefix": revoked.prefix},
        )
    return revoked


@dataclass(frozen=True)
class CreatedInvitation:
    invitation: Invitation
    token: str  # in the emailed link only; the database keeps its hash


def _normalised_email(email: str) -> str:
    email = email.strip().lower()
    try:
        validate_email(email)
    except ValidationError:
        raise ServiceError(f"{email!r} is not an email address") from None
    return email


def _send_invitation(invitation: Invitation, link: str) -> None:
    context = {"invitation": invitation, "link": link}
    send_mail(
        subject=render_to_string("email/invitation_subject.txt", context).strip(),
        message=render_to_string("email/invitation_message.txt", context),
        from_email=None,
        recipient_list=[invitation.email],
    )


@transaction.atomic
def invitation_create(
    *,
    actor: User,
    organization: Organization,
    email: str,
    role: str,
    site_url: str | None = None,
) -> CreatedInvitation:
    """Invite ``email`` to ``organization`` with ``role`` and email the link after commit.

    Only owners invite owners. An open invitation to the same address is replaced (the
    old link stops working); an address that is already a member is refused.
    """
    inviter = _require(actor, organization, "members.manage")
    email = _normalised_email(email)
    if role not in Membership.Role.values:
        raise ServiceError(f"unknown role {role!r}")
    if role == Membership.Role.OWNER and inviter.role != Membership.Role.OWNER:
        raise PermissionDeniedError("only an owner can invite another owner")
    if Membership.objects.filter(organization=organization, user__email__iexact=email).exists():
        raise ServiceError(f"{email} is a member already")
    now = timezone.now()
    Invitation.objects.filter(
        organization=organization,
        email__iexact=email,
        accepted_at__isnull=True,
        revoked_at__isnull=True,
    ).update(revoked_at=now)
    token = secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        organization=organization,
        email=email,
        role=role,
        token_hash=invitation_token_hash(token),
        invited_by=actor,
        created_at=now,
        expires_at=now + INVITATION_TTL,
    )
    audit_record(
        actor=actor,
        action="invitation.create",
        target=invitation,
        organization=organization,
        details={"email": email, "role": role},
    )
    base = (site_url or settings.SITE_URL).rstrip("/")
    link = base + reverse("console:invitation-accept", args=[token])
    transaction.on_commit(lambda: _send_invitation(invitation, link))
    return CreatedInvitation(invitation=invitation, token=token)


@transaction.atomic
def invitation_accept(*, token: str, user: User) -> Membership:
    """Join the organisation of an open invitation addressed to one of ``user``'s
    (verified) email addresses. A user who is a member already keeps their role."""
    invitation = (
        Invitation.objects.select_for_update()
        .filter(token_hash=invitation_token_hash(token))
        .select_related("organization")
        .first()
    )
    if invitation is None or not invitation.is_open:
        raise ServiceError("this invitation is no longer valid; ask for a new one")
    if invitation.email.lower() not in user_emails(user):
        raise PermissionDeniedError(
            f"this invitation is for {invitation.email}; sign in with that (verified) address"
        )
    membership, created = Membership.objects.get_or_create(
        organization=invitation.organization, user=user, defaults={"role": invitation.role}
    )
    invitation.accepted_at = timezone.now()
    invitation.accepted_by = user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    audit_record(
        actor=user,
        action="invitation.accept",
        target=invitation,
        organization=invitation.organization,
        details={"email": invitation.email, "role": membership.role, "joined": created},
    )
    return membership


@transaction.atomic
def invitation_revoke(*, actor: User, invitation: Invitation) -> Invitation:
    _require(actor, invitation.organization, "members.manage")
    locked = Invitation.objects.select_for_update().get(pk=invitation.pk)
    if locked.accepted_at is None and locked.revoked_at is None:
        locked.revoked_at = timezone.now()
        locked.save(update_fields=["revoked_at"])
        audit_record(
            actor=actor,
            action="invitation.revoke",
            target=locked,
            organization=locked.organization,
            details={"email": locked.email},
        )
    return locked


def _owners_locked(organization: Organization) -> list[Membership]:
    """The organisation's owner memberships, locked in a fixed order (no lost last owner)."""
    return list(
        Membership.objects.select_for_update()
        .filter(organization=organization, role=Membership.Role.OWNER)
        .order_by("pk")
    )


@transaction.atomic
def membership_set_role(*, actor: User, membership: Membership, role: str) -> Membership:
    """Change a member's role. Only owners grant or take away the owner role, and an
    organisation always keeps at least one owner."""
    acting = _require(actor, membership.organization, "members.manage")
    if role not in Membership.Role.values:
        raise ServiceError(f"unknown role {role!r}")
    owners = _owners_locked(membership.organization)
    locked = Membership.objects.select_for_update().get(pk=membership.pk)
    if locked.role == role:
        return locked
    touches_owner = Membership.Role.OWNER in (role, locked.role)
    if touches_owner and acting.role != Membership.Role.OWNER:
        raise PermissionDeniedError("only an owner can grant or change the owner role")
    if locked.role == Membership.Role.OWNER and len(owners) == 1:
        raise ServiceError("an organisation needs at least one owner; appoint another first")
    previous = locked.role
    locked.role = role
    locked.save(update_fields=["role"])
    audit_record(
        actor=actor,
        action="membership.role",
        target=locked,
        organization=locked.organization,
        details={"user": locked.user.email, "from": previous, "to": role},
    )
    return locked


@transaction.atomic
def membership_remove(*, actor: User, membership: Membership) -> None:
    """Remove a member (or let a member leave). The last owner cannot leave."""
    is_self = membership.user_id == getattr(actor, "pk", None)
    acting = membership if is_self else _require(actor, membership.organization, "members.manage")
    owners = _owners_locked(membership.organization)
    locked = Membership.objects.select_for_update().filter(pk=membership.pk).first()
    if locked is None:
        return
    if locked.role == Membership.Role.OWNER:
        if acting.role != Membership.Role.OWNER:
            raise PermissionDeniedError("only an owner can remove an owner")
        if len(owners) == 1:
            raise ServiceError("an organisation needs at least one owner; appoint another first")
    audit_record(
        actor=actor,
        action="membership.remove",
        target=locked,
        organization=locked.organization,
        details={"user": locked.user.email, "role": locked.role},
    )
    locked.delete()


BUDGET_FIELDS = (
    "monthly_budget",
    "budget_alert_percent",
    "low_balance_alert",
    "reference_price_input",
    "reference_price_output",
)


def organization_fields_update(
    *, actor: User, organization: Organization, values: dict[str, Any], action: str
) -> tuple[Organization, dict[str, dict[str, Any]]]:
    """Set ``values`` on the locked organisation row and audit what changed (as ``action``).

    Returns the locked row and the changes (``{field: {"from": ..., "to": ...}}``, empty when
    nothing changed, and then nothing is written). Callers check permissions and values."""
    locked = Organization.objects.select_for_update().get(pk=organization.pk)
    changes = {
        name: {"from": getattr(locked, name), "to": value}
        for name, value in values.items()
        if getattr(locked, name) != value
    }
    if changes:
        for name, value in values.items():
            setattr(locked, name, value)
        locked.save(update_fields=list(values))
        audit_record(
            actor=actor, action=action, target=locked, organization=locked, details=changes
        )
    return locked, changes


@transaction.atomic
def organization_budget_update(
    *,
    actor: User,
    organization: Organization,
    monthly_budget: int | None,
    budget_alert_percent: int,
    low_balance_alert: int | None,
    reference_price_input: int | None,
    reference_price_output: int | None,
) -> Organization:
    """Set the budget, alert levels and reference prices (nanos) of ``organization``."""
    _require(actor, organization, "billing.manage")
    if not 1 <= budget_alert_percent <= 100:
        raise ServiceError("the alert threshold is between 1 and 100 percent")
    values = {
        "monthly_budget": monthly_budget,
        "budget_alert_percent": budget_alert_percent,
        "low_balance_alert": low_balance_alert,
        "reference_price_input": reference_price_input,
        "reference_price_output": reference_price_output,
    }
    for name in ("monthly_budget", "low_balance_alert"):
        value = values[name]
        if value is not None and value <= 0:
            raise ServiceError("a budget or alert amount is more than zero")
    for name in ("reference_price_input", "reference_price_output"):
        value = values[name]
        if value is not None and value < 0:
            raise ServiceError("a reference price is never negative")
    locked, changes = organization_fields_update(
        actor=actor, organization=organization, values=values, action="organization.budget_update"
    )
    if "monthly_budget" in changes:
        # Gateways cache the budget with each key: make them reload the keys now.
        for key_hash in ApiKey.objects.filter(organization=locked).values_list(
            "key_hash", flat=True
        ):
            invalidation.publish_after_commit(invalidation.key_message(key_hash))
    for name in BUDGET_FIELDS:
        setattr(organization, name, getattr(locked, name))
    return organization
