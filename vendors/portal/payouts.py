"""Vendor portal: payouts through Stripe Connect (Express).

The page shows what Stripe last told us about the vendor's connected account. Owners and
admins start (or resume) Stripe's hosted onboarding: we ask Stripe for an Account Link and
send the browser there. Stripe sends it back to ``return_url`` (we re-read the account from
Stripe and show the result) or, when the link was used or expired, to ``refresh_url``
(we make a new link and send the browser there again, as Stripe documents).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from billing.connect import connect_account_sync, connect_onboarding_start
from billing.errors import PaymentProviderError, PayoutPermissionError
from billing.models import VendorPayoutAccount
from billing.selectors import vendor_payout_account
from marketplace.console.access import AuthenticatedHttpRequest
from vendors.portal.views import VendorContext, _context, vendor_view

logger = logging.getLogger("switchyard.vendors.portal")

STRIPE_UNAVAILABLE = (
    "Stripe could not start the onboarding just now, so nothing changed. "
    "Please try again in a few minutes."
)

# Stripe's requirement codes (``requirements.currently_due``) in words; others are shown
# as Stripe names them.
REQUIREMENTS = {
    "external_account": "A bank account to receive payouts",
    "tos_acceptance.date": "Acceptance of Stripe's services agreement",
    "tos_acceptance.ip": "Acceptance of Stripe's services agreement",
    "business_type": "Your type of business",
    "business_profile.url": "Your business website",
    "business_profile.mcc": "Your industry",
    "business_profile.product_description": "A description of what you sell",
    "individual.first_name": "Your first name",
    "individual.last_name": "Your last name",
    "individual.dob.day": "Your date of birth",
    "individual.dob.month": "Your date of birth",
    "individual.dob.year": "Your date of birth",
    "individual.email": "Your email address",
    "individual.phone": "Your phone number",
    "individual.address.line1": "Your address",
    "individual.address.city": "Your address",
    "individual.address.postal_code": "Your address",
    "individual.address.state": "Your address",
    "individual.id_number": "Your identity number",
    "individual.ssn_last_4": "The last four digits of your SSN",
    "individual.verification.document": "An identity document",
    "company.name": "Your company's name",
    "company.tax_id": "Your company's tax id",
    "company.address.line1": "Your company's address",
    "company.address.city": "Your company's address",
    "company.address.postal_code": "Your company's address",
    "company.address.state": "Your company's address",
    "company.phone": "Your company's phone number",
    "representative.first_name": "Your representative's details",
    "representative.last_name": "Your representative's details",
}


@dataclass(frozen=True)
class PayoutStatus:
    """``state``: ``none`` (no Stripe account yet), ``incomplete`` or ``enabled``."""

    state: str
    account: VendorPayoutAccount | None
    requirements: list[str]

    @classmethod
    def of(cls, account: VendorPayoutAccount | None) -> PayoutStatus:
        if account is None or not account.stripe_account_id:
            return cls("none", None, [])
        due = [str(code) for code in account.requirements_due or []]
        words = list(dict.fromkeys(REQUIREMENTS.get(code, code) for code in due))
        return cls("enabled" if account.payouts_enabled else "incomplete", account, words)


def _status(ctx: VendorContext) -> PayoutStatus:
    return PayoutStatus.of(vendor_payout_account(vendor_id=ctx.vendor.pk))


@vendor_view("payouts.view")
def payouts(request: AuthenticatedHttpRequest, ctx: VendorContext) -> HttpResponse:
    return render(request, "portal/payouts.html", _context(ctx, payout=_status(ctx)))


def _to_stripe(
    request: AuthenticatedHttpRequest, ctx: VendorContext, *, fresh: bool
) -> HttpResponse:
    slug = ctx.vendor.slug
    try:
        url = connect_onboarding_start(
            actor=request.user,
            vendor=ctx.vendor,
            refresh_url=request.build_absolute_uri(reverse("portal:payouts-refresh", args=[slug])),
            return_url=request.build_absolute_uri(reverse("portal:payouts-return", args=[slug])),
            fresh=fresh,
        )
    except PayoutPermissionError as exc:  # the role changed since the page was checked
        raise PermissionDenied(str(exc)) from exc
    except PaymentProviderError as exc:
        logger.warning("Stripe onboarding for vendor %s failed: %s", slug, exc)
        messages.error(request, STRIPE_UNAVAILABLE)
        return redirect("portal:payouts", slug)
    return redirect(url)


@require_POST
@vendor_view("payouts.manage")
def payouts_start(request: AuthenticatedHttpRequest, ctx: VendorContext) -> HttpResponse:
    """ "Set up payouts" / "Resume onboarding": off to Stripe's hosted onboarding."""
    return _to_stripe(request, ctx, fresh=False)


@vendor_view("payouts.manage")
def payouts_refresh(request: AuthenticatedHttpRequest, ctx: VendorContext) -> HttpResponse:
    """Stripe's ``refresh_url``: the link expired or was used; make a new one and go back.

    A GET (Stripe redirects the browser here), so it never creates the Stripe account: only
    the "Set up payouts" button (a POST) does."""
    account = vendor_payout_account(vendor_id=ctx.vendor.pk)
    if account is None or not account.stripe_account_id:
        return redirect("portal:payouts", ctx.vendor.slug)
    return _to_stripe(request, ctx, fresh=True)


@vendor_view("payouts.view")
def payouts_return(request: AuthenticatedHttpRequest, ctx: VendorContext) -> HttpResponse:
    """Stripe's ``return_url``: the vendor left onboarding (finished or not). Read the
    account from Stripe now (the ``account.updated`` webhook may come later) and say so."""
    account = vendor_payout_account(vendor_id=ctx.vendor.pk)
    if account is None or not account.stripe_account_id:
        messages.info(request, "There is no payout account yet: set up payouts to create one.")
        return redirect("portal:payouts", ctx.vendor.slug)
    try:
        synced = connect_account_sync(stripe_account_id=account.stripe_account_id)
    except PaymentProviderError as exc:
        logger.warning("reading the Stripe account of vendor %s failed: %s", ctx.vendor.slug, exc)
        messages.error(
            request,
            "Stripe could not be reached to check your account; below is what it last told "
            "us. Reload this page in a few minutes.",
        )
        return redirect("portal:payouts", ctx.vendor.slug)
    account = synced or account
    if account.payouts_enabled:
        messages.success(
            request,
            "Payouts are enabled: your earnings are transferred to your Stripe account "
            "with each daily settlement.",
        )
    elif account.details_submitted:
        messages.warning(
            request,
            "Stripe has your details but does not allow payouts yet; "
            "see what it still needs below.",
        )
    else:
        messages.warning(
            request,
            "Onboarding is not finished: Stripe still needs the details listed below. "
            "Resume it whenever you are ready.",
        )
    return redirect("portal:payouts", ctx.vendor.slug)
