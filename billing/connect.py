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
import time

from django.db import transaction

from billing import stripe_gateway
from billing.errors import PaymentProviderError
from billing.models import VendorPayoutAccount
from vendors.models import Vendor, VendorMembership


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


def connect_onboarding_link(*, vendor: Vendor, refresh_url: str, return_url: str) -> str:
    """A one-time Stripe onboarding URL for the vendor (creating its account if needed).

    Account links expire within minutes and are single-use, so each minute gets a new one;
    the idempotency key (vendor, account, URLs, minute) makes a double click return the same.
    """
    account = connect_account_create(vendor=vendor)
    assert account.stripe_account_id
    urls = hashlib.sha256(f"{refresh_url}\n{return_url}".encode()).hexdigest()[:16]
    minute = int(time.time()) // 60
    try:
        link = stripe_gateway.account_link_create(
            account_id=account.stripe_account_id,
            refresh_url=refresh_url,
            return_url=return_url,
            idempotency_key=f"connect-link:{vendor.pk}:{account.stripe_account_id}:{urls}:{minute}",
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
