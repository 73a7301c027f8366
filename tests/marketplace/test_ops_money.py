"""Operations pages for money (staff only): refund one request or an organisation's period
after a confirmation step, and queue settlement runs and read their results; every action
is in the audit log."""

from __future__ import annotations

import base64
import json

import pytest
from django.urls import reverse
from django.utils import timezone

from billing import tasks
from billing.connect import connect_account_create, connect_account_sync
from billing.ledger import organization_balance
from billing.models import Refund, SettlementRun
from marketplace.models import AuditLogEntry
from marketplace.redis_client import sync_client
from tests import factories
from tests.billing.test_settlement import BASE_URL, charge
from tests.support import fake_stripe
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.django_db
stripe_fake = fake_stripe.stripe_fake  # the fixture


@pytest.fixture
def staff(client):  # type: ignore[no-untyped-def]
    user = factories.user()
    user.is_staff = True
    user.save()
    client.force_login(user)
    client.user = user
    return client


@pytest.fixture
def charged():  # type: ignore[no-untyped-def]
    """An organisation with three charged requests today."""
    org = factories.organization(credit_usd="100")
    endpoint = factories.endpoint(base_url=BASE_URL)
    ids = [charge(org, endpoint, cost) for cost in (1_000_000, 2_000_000, 3_000_000)]
    return org, ids


def messages_of(response) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(m) for m in response.context["messages"]]


def test_it_refunds_one_request_after_a_confirmation(staff, charged):
    org, ids = charged
    before = organization_balance(org)
    url = reverse("ops:refund-request")

    review = staff.post(url, {"request_id": ids[1], "reason": "wrong answer"})
    assert review.status_code == 200
    html = review.content.decode()
    assert ids[1] in html and org.name in html and "$0.002000" in html
    assert 'name="confirm"' in html
    assert not Refund.objects.exists()

    done = staff.post(
        url, {"request_id": ids[1], "reason": "wrong answer", "confirm": "1"}, follow=True
    )
    assert messages_of(done) == [f"Refunded $0.002000 to {org.name} for {ids[1]}."]
    assert organization_balance(org) == before + 2_000_000
    entry = AuditLogEntry.objects.get(action="billing.refund")
    assert entry.actor == staff.user and entry.organization == org
    assert entry.details["request_id"] == ids[1] and entry.details["amount"] == 2_000_000
    assert ids[1] in staff.get(reverse("ops:refunds")).content.decode()

    again = staff.post(url, {"request_id": ids[1], "reason": "twice", "confirm": "1"}, follow=True)
    assert messages_of(again) == [f"Request {ids[1]!r} was already refunded."]
    assert Refund.objects.count() == 1
    assert organization_balance(org) == before + 2_000_000


def test_it_refunds_an_organisations_period_after_a_confirmation(staff, charged):
    org, _ = charged
    before = organization_balance(org)
    today = timezone.now().date().isoformat()
    form = {"organization": org.slug, "start": today, "end": today, "reason": "outage"}
    url = reverse("ops:refund-period")

    review = staff.post(url, form)
    assert review.status_code == 200
    html = review.content.decode()
    assert 'data-testid="refund-count">3<' in html and "$0.006000" in html
    assert not Refund.objects.exists()

    done = staff.post(url, {**form, "confirm": "1"}, follow=True)
    assert messages_of(done) == [f"Refunded 3 requests of {org.name}: $0.006000 credited back."]
    assert organization_balance(org) == before + 6_000_000
    entry = AuditLogEntry.objects.get(action="billing.refund_period")
    assert entry.details["refunds"] == 3 and entry.details["amount"] == 6_000_000

    again = staff.post(url, {**form, "confirm": "1"}, follow=True)
    assert messages_of(again) == [f"{org.name} had nothing left to refund then."]
    assert Refund.objects.count() == 3


def test_it_explains_bad_refund_input_and_moves_nothing(staff, charged):
    unknown = staff.post(reverse("ops:refund-request"), {"request_id": "gen-nope", "reason": "x"})
    assert "No charged request has that id." in unknown.content.decode()

    missing = staff.post(reverse("ops:refund-request"), {"request_id": "", "reason": ""})
    assert missing.content.decode().count("This field is required.") == 2

    period = staff.post(
        reverse("ops:refund-period"),
        {"organization": "nobody", "start": "2026-02-02", "end": "2026-02-01", "reason": "x"},
    )
    html = period.content.decode()
    assert "No organisation has that slug." in html
    assert "The last day must not be before the first." in html
    assert not Refund.objects.exists()
    assert not AuditLogEntry.objects.filter(action__startswith="billing.").exists()


def _queued_tasks() -> list[tuple[str, list[object]]]:
    found = []
    for raw in sync_client().lrange("payments", 0, -1):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        found.append((message["headers"]["task"], args))
    return found


def test_it_queues_a_settlement_and_shows_the_runs_transfers_and_failures(
    staff, stripe_fake: FakeStripe, django_capture_on_commit_callbacks
):
    org = factories.organization(credit_usd="100")
    paid = factories.vendor()
    account = connect_account_create(vendor=paid)
    stripe_fake.update_account(account.stripe_account_id, payouts_enabled=True)
    connect_account_sync(stripe_account_id=account.stripe_account_id)
    unboarded = factories.vendor()
    charge(org, factories.endpoint(base_url=BASE_URL, vendor_obj=paid), 2_000_000_000)
    charge(org, factories.endpoint(base_url=BASE_URL, vendor_obj=unboarded), 1_000_000_000)
    today = timezone.now().date().isoformat()

    with django_capture_on_commit_callbacks(execute=True):
        response = staff.post(
            reverse("ops:settlement-run"),
            {"period_start": today, "period_end": today},
            follow=True,
        )
    assert messages_of(response)[0].startswith(f"Settlement for {today}..{today} is queued")
    assert _queued_tasks() == [("billing.tasks.settlement_period", [today, today])]
    assert AuditLogEntry.objects.get(action="billing.settlement_enqueue").target_id == (
        f"{today}..{today}"
    )
    assert not SettlementRun.objects.exists()  # the worker has not run it yet

    tasks.settlement_period(today, today)  # what the worker runs

    html = staff.get(reverse("ops:settlements")).content.decode()
    assert f"{today}..{today}" in html and "Completed" in html
    assert paid.name in html and "$1.60" in html and "Paid" in html
    assert f"{unboarded.name}: skipped (no_stripe_account)" in html


def test_it_refuses_a_backwards_or_future_settlement_period(staff):
    backwards = staff.post(
        reverse("ops:settlement-run"), {"period_start": "2026-02-02", "period_end": "2026-02-01"}
    )
    assert "The last day must not be before the first." in backwards.content.decode()
    future = (timezone.now().date().replace(year=timezone.now().year + 1)).isoformat()
    ahead = staff.post(
        reverse("ops:settlement-run"), {"period_start": future, "period_end": future}
    )
    assert "The period has not started yet." in ahead.content.decode()
    assert _queued_tasks() == []
    assert not AuditLogEntry.objects.exists()


def test_only_staff_may_refund_or_settle(client, charged):
    _, ids = charged
    client.force_login(factories.user())
    for name in ("ops:refunds", "ops:settlements"):
        assert client.get(reverse(name)).status_code == 403
    refused = client.post(
        reverse("ops:refund-request"), {"request_id": ids[0], "reason": "x", "confirm": "1"}
    )
    assert refused.status_code == 403
    assert not Refund.objects.exists()
