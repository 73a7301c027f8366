"""Vendors' Stripe Connect (Express) accounts: creation, onboarding links, status sync.

The vendor's connected account lives in ``VendorPayoutAccount`` (one per vendor). Creating
it is idempotent twice over: the row is locked and returned when it already has an account,
and the Stripe call carries the key ``connect-account:<vendor id>``, so a crash between
Stripe's answer and our commit finds the same account on the next call. Whether the vendor
can be paid (``payouts_enabled``) is only ever copied from Stripe: on the ``account.updated``
Connect webhook and whenever ``connect_account_sync`` is called (e.g. on the onboarding
return page).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from django.db import transaction

from billing import stripe_gateway
from billing.errors import PaymentProviderError, PayoutPermissionError
from billing.models import VendorPayoutAccount
from vendors.models import Vendor, VendorMembership
from vendors.selectors import vendor_role_allows


def _owner_email(vendor: Vendor) -> str | None:
    membership = (
        VendorMembership.objects.filter(vendor=vendor, role=VendorMembership.Role.OWNER)
        .select_related("user")
        .order_by("pk")
        .first()
    )
    email = getattr(membership.user, "email", "") if membership else ""
    return email or None


def _apply(account: VendorPayoutAccount, remote: dict[str, object]) -> list[str]:
    requirements = remote.get("requirements") or {}
    due = list(requirements.get("currently_due") or []) if isinstance(requirements, dict) else []
    account.payouts_enabled = bool(remote.get("payouts_enabled"))
    account.details_submitted = bool(remote.get("details_submitted"))
    account.requirements_due = due
    return ["payouts_enabled", "details_submitted", "requirements_due", "updated_at"]


def connect_account_create(*, vendor: Vendor) -> VendorPayoutAccount:
    """The vendor's Express account, created on Stripe the first time (idempotent by vendor)."""
    with transaction.atomic():
        account, _ = VendorPayoutAccount.objects.get_or_create(vendor=vendor)
        account = VendorPayoutAccount.objects.select_for_update().get(pk=account.pk)
        if account.stripe_account_id:
            return account
    try:
        remote = stripe_gateway.account_create(
            email=_owner_email(vendor),
            business_name=vendor.name,
            metadata={"vendor_id": vendor.pk, "vendor_slug": vendor.slug},
            idempotency_key=f"connect-account:{vendor.pk}",
        )
    except stripe_gateway.StripeError as exc:
        raise PaymentProviderError(f"Stripe could not create the account: {exc}") from exc
    with transaction.atomic():
        account = VendorPayoutAccount.objects.select_for_update().get(pk=account.pk)
        if not account.stripe_account_id:
            account.stripe_account_id = str(remote["id"])
            fields = _apply(account, remote)
            account.save(update_fields=["stripe_account_id", *fields])
    return account


def connect_onboarding_link(
    *, vendor: Vendor, refresh_url: str, return_url: str, fresh: bool = False
) -> str:
    """A one-time Stripe onboarding URL for the vendor (creating its account if needed).

    Account links expire within minutes and are single-use, so each minute gets a new one;
    the idempotency key (vendor, account, URLs, minute) makes a double click return the same.
    ``fresh`` is for Stripe's ``refresh_url``: the last link was used or expired, and
    replaying it (same minute, same key) would send the vendor straight back to the refresh
    URL, in a loop; a random part in the key asks Stripe for a new link.
    """
    account = connect_account_create(vendor=vendor)
    assert account.stripe_account_id
    urls = hashlib.sha256(f"{refresh_url}\n{return_url}".encode()).hexdigest()[:16]
    minute = int(time.time()) // 60
    key = f"connect-link:{vendor.pk}:{account.stripe_account_id}:{urls}:{minute}"
    if fresh:
        key += f":{secrets.token_hex(8)}"
    try:
        link = stripe_gateway.account_link_create(
            account_id=account.stripe_account_id,
            refresh_url=refresh_url,
            return_url=return_url,
            idempotency_key=key,
        )
    except stripe_gateway.StripeError as exc:
        raise PaymentProviderError(f"Stripe could not create the onboarding link: {exc}") from exc
    return str(link["url"])


def connect_account_sync(*, stripe_account_id: str) -> VendorPayoutAccount | None:
    """Copy the account's payout status from Stripe (re-read, never from an event body)."""
    try:
        remote = stripe_gateway.account_retrieve(stripe_account_id)
    except stripe_gateway.StripeError as exc:
        raise PaymentProviderError(f"cannot read account {stripe_account_id}: {exc}") from exc
    with transaction.atomic():
        account = (
            VendorPayoutAccount.objects.select_for_update()
            .filter(stripe_account_id=stripe_account_id)
            .first()
        )
        if account is None:
            return None
        fields = _apply(account, remote)
        account.save(update_fields=fields)
    return account


# --- the vendor portal: audited onboarding started by a person ------------------------------


def connect_onboarding_start(
    *, actor: Any, vendor: Vendor, refresh_url: str, return_url: str, fresh: bool = False
) -> str:
    """The onboarding URL to send a vendor's owner or admin to (creating the Express
    account the first time), audited as ``payouts.onboarding``.

    Stripe is called outside any database transaction (no lock is held while waiting); the
    audit entry is written once Stripe answered with a link, so a refused or failed attempt
    (``PaymentProviderError``) leaves no entry and no half-made link.
    """
    from marketplace.services import audit_record

    membership = VendorMembership.objects.filter(vendor=vendor, user=actor).first()
    if membership is None or not vendor_role_allows(membership.role, "payouts.manage"):
        raise PayoutPermissionError("your role at this vendor does not allow managing payouts")
    had_account = VendorPayoutAccount.objects.filter(
        vendor=vendor, stripe_account_id__isnull=False
    ).exists()
    url = connect_onboarding_link(
        vendor=vendor, refresh_url=refresh_url, return_url=return_url, fresh=fresh
    )
    account = VendorPayoutAccount.objects.get(vendor=vendor)
    audit_record(
        actor=actor,
        action="payouts.onboarding",
        target=account,
        details={
            "vendor": vendor.slug,
            "account": account.stripe_account_id,
            "account_created": not had_account,
            "refreshed": fresh,
        },
    )
    return url
