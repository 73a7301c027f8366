"""The ledger's one write path: balanced, idempotent transactions.

Callers describe a movement as legs ``(account, amount)``; ``transaction_post`` refuses
unbalanced legs, returns the existing transaction when the idempotency key was seen before
(so a retried task or webhook posts nothing twice), and writes every entry in one database
transaction. The database checks the balance again at commit (a deferred constraint
trigger), so no code path can leave money unaccounted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from django.db import IntegrityError, transaction
from django.db.models import Sum

from billing.models import LedgerAccount, LedgerEntry, LedgerTransaction
from marketplace.models import Organization
from vendors.models import Vendor

Leg = tuple[LedgerAccount, int]


class LedgerError(Exception):
    """A movement that would break the ledger's rules."""


@dataclass(frozen=True)
class Posted:
    transaction: LedgerTransaction
    created: bool


def account_for_organization(organization: Organization) -> LedgerAccount:
    account, _ = LedgerAccount.objects.get_or_create(
        code=f"org:{organization.pk}:credit",
        defaults={"kind": LedgerAccount.Kind.CUSTOMER_CREDIT, "organization": organization},
    )
    return account


def account_for_vendor(vendor: Vendor) -> LedgerAccount:
    account, _ = LedgerAccount.objects.get_or_create(
        code=f"vendor:{vendor.pk}:payable",
        defaults={"kind": LedgerAccount.Kind.VENDOR_PAYABLE, "vendor": vendor},
    )
    return account


def account_for_vendor_payouts(vendor: Vendor) -> LedgerAccount:
    """Where a vendor's payable goes when a Stripe transfer pays it (money that left us)."""
    account, _ = LedgerAccount.objects.get_or_create(
        code=f"vendor:{vendor.pk}:payouts",
        defaults={"kind": LedgerAccount.Kind.VENDOR_PAYOUTS, "vendor": vendor},
    )
    return account


def account_for_organization_receivable(organization: Organization) -> LedgerAccount:
    """What an invoiced organisation owes us on issued, unpaid invoices (negative: owed)."""
    account, _ = LedgerAccount.objects.get_or_create(
        code=f"org:{organization.pk}:receivable",
        defaults={"kind": LedgerAccount.Kind.CUSTOMER_RECEIVABLE, "organization": organization},
    )
    return account


def platform_account(kind: LedgerAccount.Kind) -> LedgerAccount:
    """The platform's singleton account of ``kind`` (revenue, grants, Stripe clearing...)."""
    account, _ = LedgerAccount.objects.get_or_create(
        code=f"platform:{kind}", defaults={"kind": kind}
    )
    return account


def transaction_post(
    *,
    kind: LedgerTransaction.Kind,
    idempotency_key: str,
    legs: Sequence[Leg],
    memo: str = "",
) -> Posted:
    """Post a balanced transaction once per ``idempotency_key``.

    Legs with a zero amount are dropped (a free request moves no money but is still
    recorded by its key). Raises ``LedgerError`` when the legs do not sum to zero.
    """
    legs = [(account, amount) for account, amount in legs if amount != 0]
    if sum(amount for _, amount in legs) != 0:
        raise LedgerError(f"unbalanced transaction {idempotency_key}: legs sum to non-zero")
    existing = LedgerTransaction.objects.filter(idempotency_key=idempotency_key).first()
    if existing is not None:
        return Posted(existing, created=False)
    try:
        with transaction.atomic():
            txn = LedgerTransaction.objects.create(
                kind=kind, idempotency_key=idempotency_key, memo=memo[:500]
            )
            LedgerEntry.objects.bulk_create(
                LedgerEntry(transaction=txn, account=account, amount=amount)
                for account, amount in legs
            )
    except IntegrityError:
        # A concurrent caller posted the same key first: theirs is the one.
        existing = LedgerTransaction.objects.filter(idempotency_key=idempotency_key).first()
        if existing is None:
            raise
        return Posted(existing, created=False)
    return Posted(txn, created=True)


def account_balance(account: LedgerAccount) -> int:
    """The balance of an account, derived from its entries (nano-USD)."""
    total = LedgerEntry.objects.filter(account=account).aggregate(total=Sum("amount"))["total"]
    return int(total or 0)


def account_balance_before(account: LedgerAccount, moment: datetime) -> int:
    """The balance from the transactions posted before ``moment`` (nano-USD)."""
    total = LedgerEntry.objects.filter(
        account=account, transaction__created_at__lt=moment
    ).aggregate(total=Sum("amount"))["total"]
    return int(total or 0)


def organization_balance(organization: Organization) -> int:
    return account_balance(account_for_organization(organization))
