"""The ledger: balanced, append-only, idempotent; balances derived from entries."""

from __future__ import annotations

import pytest
from django.db import DatabaseError, connection, transaction
from django.db.models import Sum

from billing import credit
from billing.ledger import (
    LedgerError,
    account_balance,
    account_for_organization,
    organization_balance,
    platform_account,
    transaction_post,
)
from billing.models import LedgerAccount, LedgerEntry, LedgerTransaction
from billing.money import usd_to_nanos
from billing.services import CreditError, credit_deduct, credit_grant
from tests import factories

pytestmark = pytest.mark.django_db


def test_it_keeps_every_transaction_balanced():
    org = factories.organization(credit_usd="3")
    credit_deduct(organization=org, amount=usd_to_nanos("1"), reason="test")
    for txn in LedgerTransaction.objects.all():
        assert txn.entries.aggregate(total=Sum("amount"))["total"] == 0
    assert LedgerEntry.objects.aggregate(total=Sum("amount"))["total"] == 0
    assert organization_balance(org) == usd_to_nanos("2")


def test_it_refuses_unbalanced_legs():
    org = factories.organization(credit_usd=None)
    with pytest.raises(LedgerError):
        transaction_post(
            kind=LedgerTransaction.Kind.GRANT,
            idempotency_key="bad",
            legs=[(account_for_organization(org), 5)],
        )
    assert not LedgerTransaction.objects.filter(idempotency_key="bad").exists()


def test_the_database_refuses_an_unbalanced_commit_that_bypasses_the_service():
    org = factories.organization(credit_usd=None)
    account = account_for_organization(org)
    with pytest.raises(DatabaseError, match="does not balance"), transaction.atomic():
        txn = LedgerTransaction.objects.create(kind="grant", idempotency_key="sneaky")
        LedgerEntry.objects.create(transaction=txn, account=account, amount=100)
        # Deferred constraint triggers fire at commit; force them inside the savepoint.
        with connection.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")


def test_the_database_refuses_an_unbalanced_row_added_to_an_old_balanced_transaction():
    org = factories.organization(credit_usd="1")
    entry = LedgerEntry.objects.filter(account=account_for_organization(org)).first()
    with pytest.raises(DatabaseError, match="does not balance"), transaction.atomic():
        LedgerEntry.objects.create(
            transaction_id=entry.transaction_id, account=entry.account, amount=7
        )
    assert organization_balance(org) == usd_to_nanos("1")


def test_the_database_refuses_to_rewrite_history():
    org = factories.organization(credit_usd="1")
    entry = LedgerEntry.objects.filter(account=account_for_organization(org)).first()
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        LedgerEntry.objects.filter(pk=entry.pk).update(amount=10**12)
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        LedgerEntry.objects.filter(pk=entry.pk).delete()
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        LedgerTransaction.objects.filter(pk=entry.transaction_id).update(memo="rewritten")


def test_it_posts_an_idempotency_key_once():
    org = factories.organization(credit_usd=None)
    for _ in range(3):
        credit_grant(
            organization=org, amount=usd_to_nanos("1"), reason="retry", idempotency_key="grant:once"
        )
    assert organization_balance(org) == usd_to_nanos("1")
    assert LedgerTransaction.objects.filter(idempotency_key="grant:once").count() == 1


def test_it_derives_balances_from_entries():
    org = factories.organization(credit_usd="5")
    grants = platform_account(LedgerAccount.Kind.PLATFORM_GRANTS)
    assert account_balance(grants) == -organization_balance(org)


@pytest.mark.parametrize(("amount", "reason"), [(0, "x"), (-5, "x"), (10, "  ")])
def test_it_refuses_bad_grants(amount, reason):
    org = factories.organization(credit_usd=None)
    with pytest.raises(CreditError):
        credit_grant(organization=org, amount=amount, reason=reason)
    assert not LedgerTransaction.objects.exists()


def test_it_refuses_to_deduct_more_than_the_balance():
    org = factories.organization(credit_usd="1")
    with pytest.raises(CreditError, match="does not hold"):
        credit_deduct(organization=org, amount=usd_to_nanos("2"), reason="too much")
    assert organization_balance(org) == usd_to_nanos("1")


@pytest.mark.django_db(transaction=True)
def test_it_tells_the_gateway_about_a_grant_after_commit():
    org = factories.organization(credit_usd=None)
    credit.sync_client().set(credit.credit_key(org.pk), 100)
    credit_grant(organization=org, amount=50, reason="top up")
    assert credit.spendable(org.pk) == 150
    with pytest.raises(RuntimeError), transaction.atomic():
        credit_grant(organization=org, amount=70, reason="rolled back")
        raise RuntimeError
    assert credit.spendable(org.pk) == 150
