"""Property tests of the ledger (hypothesis, real PostgreSQL): any balanced postings keep
every transaction summing to zero and every balance equal to the sum of its entries; any
unbalanced posting is refused and leaves nothing behind."""

from __future__ import annotations

import itertools

import pytest
from django.db.models import Sum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.ledger import LedgerError, account_balance, transaction_post
from billing.models import LedgerAccount, LedgerEntry, LedgerTransaction

pytestmark = pytest.mark.django_db

_keys = itertools.count(1)
AMOUNT = st.integers(-(10**15), 10**15)  # nano-USD: up to a million dollars a leg
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _accounts(count: int) -> list[LedgerAccount]:
    n = next(_keys)
    return [
        LedgerAccount.objects.create(code=f"prop:{n}:{i}", kind=LedgerAccount.Kind.PLATFORM_GRANTS)
        for i in range(count)
    ]


# A transaction: an amount for each of some accounts; the last leg balances them.
transactions = st.lists(
    st.lists(st.tuples(st.integers(0, 4), AMOUNT), min_size=1, max_size=5),
    min_size=1,
    max_size=6,
)


@SETTINGS
@given(postings=transactions, balancing_account=st.integers(0, 4))
def test_balanced_postings_sum_to_zero_and_balances_are_the_sum_of_entries(
    postings, balancing_account
):
    accounts = _accounts(5)
    expected = [0] * 5
    posted = []
    for legs in postings:
        full = [*legs, (balancing_account, -sum(amount for _, amount in legs))]
        result = transaction_post(
            kind=LedgerTransaction.Kind.GRANT,
            idempotency_key=f"prop-{next(_keys)}",
            legs=[(accounts[i], amount) for i, amount in full],
        )
        assert result.created
        posted.append(result.transaction.pk)
        for i, amount in full:
            expected[i] += amount

    for pk in posted:
        total = LedgerEntry.objects.filter(transaction_id=pk).aggregate(t=Sum("amount"))["t"]
        assert (total or 0) == 0
    assert not LedgerEntry.objects.filter(transaction_id__in=posted, amount=0).exists()
    for account, balance in zip(accounts, expected, strict=True):
        entries = LedgerEntry.objects.filter(account=account).values_list("amount", flat=True)
        assert account_balance(account) == sum(entries) == balance
    assert sum(expected) == 0


@SETTINGS
@given(legs=st.lists(st.tuples(st.integers(0, 3), AMOUNT), min_size=1, max_size=6))
def test_unbalanced_postings_are_refused_with_nothing_left_behind(legs):
    if sum(amount for _, amount in legs) == 0:
        legs = [*legs, (0, 1)]  # make it unbalanced
    accounts = _accounts(4)
    key = f"prop-unbalanced-{next(_keys)}"

    with pytest.raises(LedgerError):
        transaction_post(
            kind=LedgerTransaction.Kind.GRANT,
            idempotency_key=key,
            legs=[(accounts[i], amount) for i, amount in legs],
        )

    assert not LedgerTransaction.objects.filter(idempotency_key=key).exists()
    assert not LedgerEntry.objects.filter(account__in=accounts).exists()
    assert all(account_balance(account) == 0 for account in accounts)


@SETTINGS
@given(amount=AMOUNT.filter(bool), repeats=st.integers(2, 4))
def test_a_posting_repeated_with_its_key_moves_money_once(amount, repeats):
    accounts = _accounts(2)
    key = f"prop-repeat-{next(_keys)}"
    results = [
        transaction_post(
            kind=LedgerTransaction.Kind.GRANT,
            idempotency_key=key,
            legs=[(accounts[0], amount), (accounts[1], -amount)],
        )
        for _ in range(repeats)
    ]
    assert [r.created for r in results] == [True] + [False] * (repeats - 1)
    assert account_balance(accounts[0]) == amount == -account_balance(accounts[1])
