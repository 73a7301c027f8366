"""Monthly Stripe invoices for invoiced organisations (``billing_mode == "invoiced"``).

Accounts. Usage ingest charges every organisation the same way: its credit account goes
down by the cost (vendor payable and platform revenue go up). A prepaid organisation holds
credit; an invoiced one runs a negative credit balance: what it has used and not yet been
invoiced for. Issuing and paying an invoice moves that debt on, always in balanced
transactions:

* issue (``invoice:<org id>:<YYYY-MM>``): organisation credit ``+usage`` (its month is
  accounted for), organisation receivable ``-total`` (what it now owes on the invoice) and
  platform revenue ``+(total - usage)`` (the rounding to cents, at most half a cent per
  line, either way);
* paid (``invoice-paid:<Stripe invoice id>``, on the ``invoice.paid`` webhook): receivable
  ``+paid``, Stripe clearing ``-paid`` (the money arrived at Stripe, like a top-up).

So after a paid invoice the organisation's credit and receivable are both back to where
they were, and every transaction sums to zero.

Amounts. One invoice item per endpoint: the sum of the month's charged, not refunded usage
records (by ``occurred_at``, UTC) of that endpoint, converted to cents with
``billing.money.nanos_to_cents`` (half up) per line; the invoice total is the sum of the
lines. Lines that round to zero cents are not sent to Stripe (their nanos are still taken
off the credit account and written off against revenue by the rounding leg). A month with no
usage, or one whose total rounds to zero, gets no invoice.

Steps (``invoice_issue``), each safe to repeat: compute the lines, store the ``Invoice``
row and post the issue transaction in one database transaction; then, against Stripe, make
sure the organisation has a customer (``customer:<org id>``), create the invoice
(``collection_method=send_invoice``, ``days_until_due``; key ``invoice:<org>:<month>``),
add the items (``invoice:<org>:<month>:line:<endpoint>``; lines already on the Stripe
invoice are skipped, even after Stripe forgot the keys), finalize and send it. A run that
stopped half-way resumes from the row.

Not handled here (left to an operator): credit notes for refunds after invoicing (they stay
as credit on the organisation's account), voided or uncollectible invoices (the status is
recorded, the receivable stays until written off), usage ingested after the month's run.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, time
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, Sum
from django.utils import timezone

from billing import credit, stripe_gateway
from billing.errors import PaymentProviderError
from billing.ledger import (
    account_for_organization,
    account_for_organization_receivable,
    platform_account,
    transaction_post,
)
from billing.models import (
    Invoice,
    LedgerAccount,
    LedgerTransaction,
    StripeCustomer,
    UsageRecord,
)
from billing.money import cents_to_nanos, nanos_to_cents
from marketplace.models import Membership, Organization
from vendors.models import Endpoint

logger = logging.getLogger("switchyard.billing.invoicing")


def month_start(day: date) -> date:
    return day.replace(day=1)


def month_bounds(month: date) -> tuple[datetime, datetime]:
    first = month_start(month)
    following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return (
        datetime.combine(first, time.min, tzinfo=UTC),
        datetime.combine(following, time.min, tzinfo=UTC),
    )


def previous_month(today: date) -> date:
    first = month_start(today)
    return date(first.year - (first.month == 1), (first.month - 2) % 12 + 1, 1)


def _days_until_due() -> int:
    return int(getattr(settings, "INVOICE_DAYS_UNTIL_DUE", 30))


def invoice_lines(*, organization: Organization, month: date) -> list[dict[str, Any]]:
    """The month's charged, not refunded usage per endpoint, with its amount in cents."""
    start, end = month_bounds(month)
    rows = (
        UsageRecord.objects.filter(
            organization=organization,
            occurred_at__gte=start,
            occurred_at__lt=end,
            transaction__isnull=False,
            refund__isnull=True,
        )
        .values("endpoint_id")
        .annotate(
            requests=Count("id"),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
            usage=Sum("cost"),
        )
        .order_by("endpoint_id")
    )
    endpoints = Endpoint.objects.select_related("vendor").in_bulk(
        [r["endpoint_id"] for r in rows if r["endpoint_id"]]
    )
    lines = []
    for row in rows:
        endpoint = endpoints.get(row["endpoint_id"]) if row["endpoint_id"] else None
        name = endpoint.full_slug if endpoint else "other usage"
        usage = int(row["usage"] or 0)
        lines.append(
            {
                "key": f"endpoint-{row['endpoint_id']}" if row["endpoint_id"] else "other",
                "endpoint_id": row["endpoint_id"],
                "description": (
                    f"{name}: {row['requests']} requests, {row['prompt'] or 0} input and "
                    f"{row['completion'] or 0} output tokens ({month:%B %Y})"
                ),
                "requests": row["requests"],
                "usage": usage,
                "cents": nanos_to_cents(usage),
                "stripe_item_id": None,
            }
        )
    return lines


def stripe_customer_ensure(*, organization: Organization) -> str:
    """The organisation's Stripe customer id, created once (key ``customer:<org id>``)."""
    existing = StripeCustomer.objects.filter(organization=organization).first()
    if existing is not None:
        return existing.stripe_customer_id
    owner = (
        Membership.objects.filter(organization=organization, role=Membership.Role.OWNER)
        .select_related("user")
        .order_by("pk")
        .first()
    )
    try:
        remote = stripe_gateway.customer_create(
            name=organization.name,
            email=(owner.user.email or None) if owner else None,
            metadata={"organization_id": organization.pk, "organization_slug": organization.slug},
            idempotency_key=f"customer:{organization.pk}",
        )
    except stripe_gateway.StripeError as exc:
        raise PaymentProviderError(f"Stripe could not create the customer: {exc}") from exc
    try:
        with transaction.atomic():
            StripeCustomer.objects.create(
                organization=organization, stripe_customer_id=str(remote["id"])
            )
    except IntegrityError:
        pass  # a concurrent call stored the same customer (same idempotency key)
    return StripeCustomer.objects.get(organization=organization).stripe_customer_id


def _issue(organization: Organization, month: date) -> Invoice | None:
    """Store the invoice and post the issue transaction (once); None when nothing to bill."""
    with transaction.atomic():
        invoice = (
            Invoice.objects.select_for_update()
            .filter(organization=organization, month=month)
            .first()
        )
        if invoice is not None:
            return invoice
        lines = invoice_lines(organization=organization, month=month)
        usage = sum(line["usage"] for line in lines)
        total_cents = sum(line["cents"] for line in lines)
        if total_cents <= 0:
            return None
        try:
            with transaction.atomic():
                invoice = Invoice.objects.create(
                    organization=organization,
                    month=month,
                    usage_amount=usage,
                    amount_cents=total_cents,
                    lines=lines,
                    days_until_due=_days_until_due(),
                )
        except IntegrityError:  # issued concurrently: that one wins
            return Invoice.objects.select_for_update().get(organization=organization, month=month)
        total = cents_to_nanos(total_cents)
        posted = transaction_post(
            kind=LedgerTransaction.Kind.INVOICE,
            idempotency_key=f"invoice:{organization.pk}:{month:%Y-%m}",
            legs=[
                (account_for_organization(organization), usage),
                (account_for_organization_receivable(organization), -total),
                (platform_account(LedgerAccount.Kind.PLATFORM_REVENUE), total - usage),
            ],
            memo=f"invoice {month:%Y-%m} ({len(lines)} lines)",
        )
        invoice.issue_transaction = posted.transaction
        invoice.save(update_fields=["issue_transaction", "updated_at"])
        if posted.created:
            credit.adjust_after_commit(organization.pk, usage)
    return invoice


def _save_lines(invoice_id: int, lines: list[dict[str, Any]]) -> None:
    with transaction.atomic():
        locked = Invoice.objects.select_for_update().get(pk=invoice_id)
        locked.lines = lines
        locked.save(update_fields=["lines", "updated_at"])


def _push(invoice: Invoice) -> Invoice:
    """Create, fill, finalize and send the Stripe invoice, resuming where a run stopped."""
    organization = invoice.organization
    base = f"invoice:{organization.pk}:{invoice.month:%Y-%m}"
    customer_id = stripe_customer_ensure(organization=organization)
    try:
        if not invoice.stripe_invoice_id:
            remote = stripe_gateway.invoice_create(
                customer_id=customer_id,
                days_until_due=invoice.days_until_due,
                description=f"Switchyard usage, {invoice.month:%B %Y}",
                metadata={
                    "organization_id": organization.pk,
                    "month": f"{invoice.month:%Y-%m}",
                    "invoice_id": invoice.pk,
                },
                idempotency_key=base,
            )
            Invoice.objects.filter(pk=invoice.pk, stripe_invoice_id__isnull=True).update(
                stripe_invoice_id=remote["id"]
            )
            invoice.refresh_from_db()
        else:
            remote = stripe_gateway.invoice_retrieve(str(invoice.stripe_invoice_id))
        stripe_id = str(invoice.stripe_invoice_id)
        if remote.get("status") == "draft":
            on_stripe = {
                (line.get("metadata") or {}).get("line_key")
                for line in (remote.get("lines") or {}).get("data", [])
            }
            lines = list(invoice.lines)
            for line in lines:
                if line["cents"] <= 0 or line.get("stripe_item_id") or line["key"] in on_stripe:
                    continue
                item = stripe_gateway.invoice_item_create(
                    customer_id=customer_id,
                    invoice_id=stripe_id,
                    amount_cents=line["cents"],
                    description=line["description"],
                    metadata={"line_key": line["key"], "endpoint_id": line["endpoint_id"] or ""},
                    idempotency_key=f"{base}:line:{line['key']}",
                )
                line["stripe_item_id"] = item["id"]
                _save_lines(invoice.pk, lines)
            remote = stripe_gateway.invoice_finalize(stripe_id, idempotency_key=f"{base}:finalize")
        if remote.get("status") == "open":
            remote = stripe_gateway.invoice_send(stripe_id, idempotency_key=f"{base}:send")
    except stripe_gateway.StripeError as exc:
        raise PaymentProviderError(f"Stripe could not issue {base}: {exc}") from exc
    if remote.get("total") != invoice.amount_cents:
        logger.error(
            "Stripe invoice %s totals %s, ours %s",
            remote.get("id"),
            remote.get("total"),
            invoice.amount_cents,
        )
    with transaction.atomic():
        invoice = Invoice.objects.select_for_update().get(pk=invoice.pk)
        if invoice.status == Invoice.Status.DRAFT:
            invoice.status = Invoice.Status.OPEN
            invoice.stripe_number = str(remote.get("number") or "")
            invoice.hosted_invoice_url = str(remote.get("hosted_invoice_url") or "")
            invoice.sent_at = timezone.now()
            invoice.save()
    return invoice


def invoice_issue(*, organization: Organization, month: date) -> Invoice | None:
    """Invoice ``organization`` for ``month`` (any day of it) once; None when nothing to bill."""
    invoice = _issue(organization, month_start(month))
    if invoice is None or invoice.status != Invoice.Status.DRAFT:
        return invoice
    return _push(invoice)


def invoice_run(*, month: date) -> list[Invoice]:
    """Invoice every invoiced organisation for ``month``; one failure does not stop the rest."""
    issued = []
    organizations = Organization.objects.filter(
        billing_mode=Organization.BillingMode.INVOICED
    ).order_by("pk")
    for organization in organizations:
        try:
            invoice = invoice_issue(organization=organization, month=month)
        except Exception:
            logger.exception("invoicing organisation %s for %s failed", organization.pk, month)
            continue
        if invoice is not None:
            issued.append(invoice)
    return issued


def invoice_sync(*, stripe_invoice_id: str, payment_failed: bool = False) -> Invoice | None:
    """Bring our invoice up to date with Stripe's (re-read); post the payment once."""
    try:
        remote = stripe_gateway.invoice_retrieve(stripe_invoice_id)
    except stripe_gateway.StripeError as exc:
        raise PaymentProviderError(f"cannot read invoice {stripe_invoice_id}: {exc}") from exc
    with transaction.atomic():
        invoice = (
            Invoice.objects.select_for_update()
            .select_related("organization")
            .filter(stripe_invoice_id=stripe_invoice_id)
            .first()
        )
        if invoice is None or invoice.status == Invoice.Status.PAID:
            return invoice
        status = remote.get("status")
        if status == "paid":
            paid = cents_to_nanos(int(remote.get("amount_paid") or 0))
            if paid != cents_to_nanos(invoice.amount_cents):
                logger.error(
                    "invoice %s paid %s nanos, issued %s cents",
                    stripe_invoice_id,
                    paid,
                    invoice.amount_cents,
                )
            posted = transaction_post(
                kind=LedgerTransaction.Kind.INVOICE_PAYMENT,
                idempotency_key=f"invoice-paid:{stripe_invoice_id}",
                legs=[
                    (account_for_organization_receivable(invoice.organization), paid),
                    (platform_account(LedgerAccount.Kind.STRIPE_CLEARING), -paid),
                ],
                memo=f"invoice {invoice.month:%Y-%m} paid",
            )
            invoice.status = Invoice.Status.PAID
            invoice.payment_transaction = posted.transaction
            invoice.paid_at = timezone.now()
        elif status == "void":
            invoice.status = Invoice.Status.VOID
        elif status == "uncollectible":
            invoice.status = Invoice.Status.UNCOLLECTIBLE
        elif payment_failed:
            invoice.status = Invoice.Status.PAYMENT_FAILED
            invoice.payment_failures += 1
        invoice.save()
    return invoice
