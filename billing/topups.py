"""Top-ups: customers buy prepaid credit through Stripe Checkout.

Flow:

1. ``topup_checkout_create`` stores a pending ``TopUp`` (our id), then creates a Checkout
   Session (mode ``payment``, one line of ``amount_cents``, metadata with the organisation
   and top-up ids, idempotency key ``topup:<top-up id>:checkout``) and returns its URL.
2. The customer pays. Stripe tells us twice, in any order, any number of times: the
   ``checkout.session.completed`` (or, for delayed methods,
   ``checkout.session.async_payment_succeeded``) webhook, processed by a Celery task, and
   the browser coming back to the success URL. Both call ``topup_fulfil``.
3. ``topup_fulfil`` re-reads the session from Stripe (the webhook body and the redirect are
   only hints), and only when ``payment_status == "paid"`` and the amount, currency and
   metadata match our row does it, under the top-up's row lock, post the ledger transaction
   Stripe clearing -> organisation credit with idempotency key ``topup:<session id>``, mark
   the top-up paid and, after commit, add the credit to the gateway's spendable balance
   (``billing.credit.adjust_after_commit``). A second call finds the row paid and returns.

Ledger: the Stripe clearing account goes negative by what customers paid in (money held
for us by Stripe); each organisation's credit account goes up by the same amount.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing import credit, stripe_gateway
from billing.errors import PaymentProviderError, TopUpError
from billing.ledger import account_for_organization, platform_account, transaction_post
from billing.models import LedgerAccount, LedgerTransaction, TopUp
from billing.money import cents_to_nanos
from marketplace.models import Organization

logger = logging.getLogger("switchyard.billing.topups")


@dataclass(frozen=True)
class CheckoutStarted:
    topup: TopUp
    url: str


def _limits() -> tuple[int, int]:
    return (
        int(getattr(settings, "TOPUP_MIN_CENTS", 500)),
        int(getattr(settings, "TOPUP_MAX_CENTS", 1_000_000)),
    )


def topup_checkout_create(
    *,
    organization: Organization,
    amount_cents: int,
    success_url: str,
    cancel_url: str,
    created_by: Any = None,
) -> CheckoutStarted:
    """Start a top-up of ``amount_cents`` US cents: a pending ``TopUp`` and a Checkout Session.

    ``success_url`` may contain ``{CHECKOUT_SESSION_ID}``; Stripe replaces it on redirect,
    and the page behind it should call ``topup_fulfil`` with that id.
    Raises ``TopUpError`` for an amount outside ``TOPUP_MIN_CENTS..TOPUP_MAX_CENTS`` and
    ``PaymentProviderError`` when Stripe cannot create the session (the top-up is failed).
    """
    low, high = _limits()
    if not isinstance(amount_cents, int) or not low <= amount_cents <= high:
        raise TopUpError(f"a top-up is between {low} and {high} cents", code="topup_amount")
    if not success_url or not cancel_url:
        raise TopUpError("success and cancel URLs are required", code="topup_urls")
    topup = TopUp.objects.create(
        organization=organization,
        amount_cents=amount_cents,
        amount=cents_to_nanos(amount_cents),
        created_by=created_by if getattr(created_by, "pk", None) else None,
    )
    try:
        session = stripe_gateway.checkout_session_create(
            amount_cents=amount_cents,
            product_name="Switchyard credit",
            success_url=success_url,
            cancel_url=cancel_url,
            client_reference_id=str(topup.pk),
            metadata={"organization_id": organization.pk, "topup_id": topup.pk},
            idempotency_key=f"topup:{topup.pk}:checkout",
        )
    except stripe_gateway.StripeError as exc:
        TopUp.objects.filter(pk=topup.pk, status=TopUp.Status.PENDING).update(
            status=TopUp.Status.FAILED, failure_reason="checkout_create_failed"
        )
        raise PaymentProviderError(f"Stripe could not start the checkout: {exc}") from exc
    with transaction.atomic():
        locked = TopUp.objects.select_for_update().get(pk=topup.pk)
        if not locked.stripe_session_id:
            locked.stripe_session_id = session["id"]
            locked.checkout_url = session.get("url") or ""
            locked.save(update_fields=["stripe_session_id", "checkout_url"])
    return CheckoutStarted(locked, session.get("url") or "")


def _locked_topup_for(session: dict[str, Any]) -> TopUp | None:
    """The top-up of ``session`` under a row lock (found by session id or our metadata)."""
    topup = TopUp.objects.select_for_update().filter(stripe_session_id=session["id"]).first()
    if topup is not None:
        return topup
    # Stripe answered but we crashed before saving the session id: our id is in metadata.
    metadata = session.get("metadata") or {}
    topup_id = str(metadata.get("topup_id") or "")
    if not topup_id.isdigit():
        return None
    topup = TopUp.objects.select_for_update().filter(pk=int(topup_id)).first()
    if topup is None or topup.stripe_session_id not in (None, "", session["id"]):
        return None
    if str(topup.organization_id) != str(metadata.get("organization_id")):
        return None
    topup.stripe_session_id = session["id"]
    topup.save(update_fields=["stripe_session_id"])
    return topup


def _matches(topup: TopUp, session: dict[str, Any]) -> bool:
    metadata = session.get("metadata") or {}
    return (
        session.get("amount_total") == topup.amount_cents
        and (session.get("currency") or "").lower() == topup.currency
        and str(metadata.get("organization_id")) == str(topup.organization_id)
        and str(metadata.get("topup_id")) == str(topup.pk)
    )


def topup_fulfil(*, session_id: str) -> TopUp | None:
    """Credit a paid top-up once, however often and in whatever order this is called.

    Called by the webhook task and by the success-redirect page. Re-reads the session from
    Stripe; credits only a session whose ``payment_status`` is ``paid``. Returns the top-up
    (paid, or still pending when Stripe has not been paid yet), or None when the session is
    not one of ours. Raises ``PaymentProviderError`` when Stripe cannot be read.
    """
    try:
        session = stripe_gateway.checkout_session_retrieve(session_id)
    except stripe_gateway.StripeError as exc:
        raise PaymentProviderError(f"cannot read checkout session {session_id}: {exc}") from exc
    with transaction.atomic():
        topup = _locked_topup_for(session)
        if topup is None:
            logger.warning("checkout session %s is not a top-up of ours", session_id)
            return None
        if topup.status == TopUp.Status.PAID:
            return topup
        if session.get("payment_status") != "paid":
            return topup
        if not _matches(topup, session):
            # Never credit what we did not sell; an operator must look at it.
            logger.error("checkout session %s does not match top-up %s", session_id, topup.pk)
            return topup
        posted = transaction_post(
            kind=LedgerTransaction.Kind.TOPUP,
            idempotency_key=f"topup:{session['id']}",
            legs=[
                (platform_account(LedgerAccount.Kind.STRIPE_CLEARING), -topup.amount),
                (account_for_organization(topup.organization), topup.amount),
            ],
            memo=f"top-up {topup.pk} via Stripe Checkout",
        )
        topup.status = TopUp.Status.PAID
        topup.transaction = posted.transaction
        topup.paid_at = timezone.now()
        topup.failure_reason = ""
        topup.save(update_fields=["status", "transaction", "paid_at", "failure_reason"])
        if posted.created:
            credit.adjust_after_commit(topup.organization_id, topup.amount)
    return topup


def topup_fail(*, session_id: str, reason: str) -> TopUp | None:
    """Mark a top-up failed (session expired, delayed payment failed) unless it was paid."""
    try:
        session = stripe_gateway.checkout_session_retrieve(session_id)
    except stripe_gateway.StripeError as exc:
        raise PaymentProviderError(f"cannot read checkout session {session_id}: {exc}") from exc
    if session.get("payment_status") == "paid":
        return topup_fulfil(session_id=session_id)
    with transaction.atomic():
        topup = _locked_topup_for(session)
        if topup is None or topup.status != TopUp.Status.PENDING:
            return topup
        topup.status = TopUp.Status.FAILED
        topup.failure_reason = reason[:200]
        topup.save(update_fields=["status", "failure_reason"])
    return topup
