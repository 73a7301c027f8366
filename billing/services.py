"""Write operations on customers' money: grants, deductions, usage charges."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import transaction

from billing import credit
from billing.ledger import (
    LedgerError,
    Posted,
    account_balance,
    account_for_organization,
    platform_account,
    transaction_post,
)
from billing.models import LedgerAccount, LedgerTransaction
from marketplace.models import Organization


class CreditError(Exception):
    """A credit movement that cannot be made (bad amount, missing reason, not enough)."""


def credit_grant(
    *,
    organization: Organization,
    amount: int,
    reason: str,
    idempotency_key: str | None = None,
) -> Posted:
    """Give an organisation ``amount`` nano-USD of credit from the platform's grants account."""
    if amount <= 0:
        raise CreditError("the amount must be positive")
    if not reason.strip():
        raise CreditError("a reason is required")
    key = idempotency_key or f"grant:{uuid.uuid4()}"
    with transaction.atomic():
        posted = transaction_post(
            kind=LedgerTransaction.Kind.GRANT,
            idempotency_key=key,
            legs=[
                (platform_account(LedgerAccount.Kind.PLATFORM_GRANTS), -amount),
                (account_for_organization(organization), amount),
            ],
            memo=reason,
        )
        if posted.created:
            credit.adjust_after_commit(organization.pk, amount)
    return posted


def credit_deduct(
    *,
    organization: Organization,
    amount: int,
    reason: str,
    idempotency_key: str | None = None,
) -> Posted:
    """Take ``amount`` nano-USD of credit back; refuses to take more than the balance."""
    if amount <= 0:
        raise CreditError("the amount must be positive")
    if not reason.strip():
        raise CreditError("a reason is required")
    key = idempotency_key or f"deduct:{uuid.uuid4()}"
    with transaction.atomic():
        account = account_for_organization(organization)
        # Lock the account row so that two deductions cannot both see the same balance.
        LedgerAccount.objects.select_for_update().get(pk=account.pk)
        if account_balance(account) < amount:
            raise CreditError("the organisation does not hold that much credit")
        try:
            posted = transaction_post(
                kind=LedgerTransaction.Kind.DEDUCTION,
                idempotency_key=key,
                legs=[
                    (account, -amount),
                    (platform_account(LedgerAccount.Kind.PLATFORM_GRANTS), amount),
                ],
                memo=reason,
            )
        except LedgerError as exc:  # pragma: no cover - legs are balanced by construction
            raise CreditError(str(exc)) from exc
        if posted.created:
            credit.adjust_after_commit(organization.pk, -amount)
    return posted


def default_fee_bps() -> int:
    return settings.PLATFORM_FEE_BPS
