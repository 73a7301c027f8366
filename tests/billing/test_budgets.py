"""Budgets: alerts at the soft threshold, at the budget and on a low balance (each once per
month), cost savings against a reference model, and the console's budget page."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.core import mail
from django.urls import reverse
from django.utils import timezone

from billing.alerts import budget_alerts_check, month_bounds
from billing.models import BudgetAlert, UsageRecord
from billing.money import usd_to_nanos
from billing.schedule import BILLING_BEAT_SCHEDULE
from billing.selectors import cost_savings
from marketplace.models import AuditLogEntry, Membership, Organization
from marketplace.services import console_organization_create
from tests import factories

pytestmark = pytest.mark.django_db

_ids = itertools.count(1)
NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)


def record(org, *, cost, at=NOW, prompt=0, completion=0):  # type: ignore[no-untyped-def]
    return UsageRecord.objects.create(
        request_id=f"budget-req-{next(_ids)}",
        organization=org,
        model_requested="tag:chat",
        prompt_tokens=prompt,
        completion_tokens=completion,
        price_input=1,
        price_output=1,
        cost=cost,
        outcome="success",
        occurred_at=at,
    )


@pytest.fixture
def org():  # type: ignore[no-untyped-def]
    owner = factories.user("owner@example.test")
    organization = console_organization_create(actor=owner, name="Budget Co")
    for email, role in [
        ("billing@example.test", Membership.Role.BILLING),
        ("dev@example.test", Membership.Role.DEVELOPER),
        ("admin@example.test", Membership.Role.ADMIN),
    ]:
        Membership.objects.create(organization=organization, user=factories.user(email), role=role)
    return organization


def check(capture, now=NOW) -> int:  # type: ignore[no-untyped-def]
    with capture(execute=True):
        return budget_alerts_check(now=now)


def test_it_alerts_once_at_the_soft_threshold(org, django_capture_on_commit_callbacks):
    org.monthly_budget = usd_to_nanos("100")
    org.save()
    record(org, cost=usd_to_nanos("79.99"))
    record(org, cost=usd_to_nanos("500"), at=datetime(2026, 10, 31, 23, 59, tzinfo=UTC))
    assert check(django_capture_on_commit_callbacks) == 0
    assert mail.outbox == []

    record(org, cost=usd_to_nanos("0.01"))
    assert check(django_capture_on_commit_callbacks) == 1
    assert check(django_capture_on_commit_callbacks) == 0

    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert sorted(message.to) == ["billing@example.test", "owner@example.test"]
    assert "80% of your monthly budget" in message.subject
    assert "$80.00" in message.body and "$100.00" in message.body
    alert = BudgetAlert.objects.get()
    assert (alert.kind, alert.period) == ("soft", "2026-11")
    assert alert.details["spend"] == usd_to_nanos("80")

    # A new month starts over.
    record(org, cost=usd_to_nanos("90"), at=datetime(2026, 12, 1, tzinfo=UTC))
    assert check(django_capture_on_commit_callbacks, datetime(2026, 12, 2, tzinfo=UTC)) == 1
    assert BudgetAlert.objects.filter(period="2026-12", kind="soft").exists()


def test_it_alerts_at_the_whole_budget(org, django_capture_on_commit_callbacks):
    org.monthly_budget = usd_to_nanos("100")
    org.budget_alert_percent = 50
    org.save()
    record(org, cost=usd_to_nanos("60"))
    assert check(django_capture_on_commit_callbacks) == 1
    record(org, cost=usd_to_nanos("40"))
    assert check(django_capture_on_commit_callbacks) == 1
    assert check(django_capture_on_commit_callbacks) == 0
    assert [m.subject for m in mail.outbox] == [
        "Budget Co: 50% of your monthly budget reached",
        "Budget Co: your monthly budget reached",
    ]


def test_it_sends_only_the_budget_alert_when_both_are_reached_at_once(
    org, django_capture_on_commit_callbacks
):
    org.monthly_budget = usd_to_nanos("10")
    org.save()
    record(org, cost=usd_to_nanos("12"))
    assert check(django_capture_on_commit_callbacks) == 1
    assert check(django_capture_on_commit_callbacks) == 0
    assert [m.subject for m in mail.outbox] == ["Budget Co: your monthly budget reached"]
    assert set(BudgetAlert.objects.values_list("kind", flat=True)) == {"soft", "hard"}


def test_it_alerts_on_a_low_balance(django_capture_on_commit_callbacks):
    org = factories.organization(credit_usd="10")
    owner = factories.user("rich@example.test")
    Membership.objects.create(organization=org, user=owner, role=Membership.Role.OWNER)
    org.low_balance_alert = usd_to_nanos("10")
    org.save()
    assert check(django_capture_on_commit_callbacks) == 0  # 10 is not below 10

    org.low_balance_alert = usd_to_nanos("25")
    org.save()
    assert check(django_capture_on_commit_callbacks) == 1
    assert check(django_capture_on_commit_callbacks) == 0
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == ["rich@example.test"]
    assert "below $25.00" in mail.outbox[0].subject
    assert "$10.00" in mail.outbox[0].body
    assert BudgetAlert.objects.get().details["balance"] == usd_to_nanos("10")


def test_it_sends_nothing_without_a_budget(org, django_capture_on_commit_callbacks):
    record(org, cost=usd_to_nanos("1000"))
    assert check(django_capture_on_commit_callbacks) == 0
    assert mail.outbox == []
    assert not BudgetAlert.objects.exists()


def test_it_does_not_send_before_the_commit(org, django_capture_on_commit_callbacks):
    org.monthly_budget = usd_to_nanos("1")
    org.save()
    record(org, cost=usd_to_nanos("1"))
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert budget_alerts_check(now=NOW) == 1
    assert mail.outbox == [] and len(callbacks) == 1


def test_it_schedules_the_check_every_five_minutes():
    entry = BILLING_BEAT_SCHEDULE["billing-budget-alerts"]
    assert entry == {"task": "billing.tasks.budget_alerts", "schedule": 300.0}


def test_it_bounds_the_month_in_utc():
    assert month_bounds(datetime(2026, 12, 31, 23, 0, tzinfo=UTC)) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )


def test_it_computes_cost_savings_exactly_in_nanos(org):
    start, end = month_bounds(NOW)
    assert cost_savings(org, start, end) is None
    org.reference_price_input = usd_to_nanos("0.15")  # 150_000_000 per million
    org.reference_price_output = usd_to_nanos("0.6")
    record(org, cost=1_234, prompt=1_000_001, completion=333)
    record(org, cost=5_000, prompt=2, completion=0)
    record(org, cost=99_999, prompt=7, completion=7, at=end)  # next month: excluded

    savings = cost_savings(org, start, end)
    # 1_000_003 * 150_000_000 / 1e6 = 150_000_450 exactly; 333 * 600_000_000 / 1e6 = 199_800.
    assert savings == {
        "actual": 6_234,
        "reference": 150_000_450 + 199_800,
        "saved": 150_200_250 - 6_234,
        "saved_percent": Decimal("100.0"),
    }
    org.reference_price_output = None
    org.reference_price_input = 1  # 1_000_003 tokens at 1 nano per million: rounds up to 2
    savings = cost_savings(org, start, end)
    assert savings is not None
    assert (savings["reference"], savings["saved"]) == (2, 2 - 6_234)
    assert savings["saved_percent"] == Decimal("-311600.0")


# --- the console ------------------------------------------------------------------------


def login(client, email):  # type: ignore[no-untyped-def]
    from django.contrib.auth import get_user_model

    client.force_login(get_user_model().objects.get(email=email))
    return client


def test_it_lets_only_owners_and_billing_members_open_the_budget_page(org, client):
    url = reverse("console:budget", args=[org.slug])
    for email in ("owner@example.test", "billing@example.test"):
        response = login(client, email).get(url)
        assert response.status_code == 200
        assert "Monthly budget (USD)" in response.content.decode()
    for email in ("dev@example.test", "admin@example.test"):
        assert login(client, email).get(url).status_code == 403
        assert login(client, email).post(url, {"budget_alert_percent": "80"}).status_code == 403
    login(client, factories.user("stranger@example.test").email)
    assert client.get(url).status_code == 404
    client.logout()
    assert client.get(url).status_code == 302


def test_it_links_the_budget_page_for_billing_managers_only(org, client):
    overview = reverse("console:overview", args=[org.slug])
    budget_url = reverse("console:budget", args=[org.slug])
    assert budget_url in login(client, "owner@example.test").get(overview).content.decode()
    assert budget_url not in login(client, "dev@example.test").get(overview).content.decode()


def test_it_saves_the_budget_settings_and_audits_them(org, client):
    url = reverse("console:budget", args=[org.slug])
    response = login(client, "billing@example.test").post(
        url,
        {
            "monthly_budget_usd": "250.50",
            "budget_alert_percent": "90",
            "low_balance_alert_usd": "20",
            "reference_price_input_usd": "0.15",
            "reference_price_output_usd": "0.000000001",
        },
    )
    assert response.status_code == 302
    org.refresh_from_db()
    assert org.monthly_budget == 250_500_000_000
    assert org.budget_alert_percent == 90
    assert org.low_balance_alert == 20_000_000_000
    assert (org.reference_price_input, org.reference_price_output) == (150_000_000, 1)
    entry = AuditLogEntry.objects.get(action="organization.budget_update")
    assert entry.actor.email == "billing@example.test"
    assert entry.details["monthly_budget"] == {"from": None, "to": 250_500_000_000}

    page = client.get(url).content.decode()
    assert 'value="250.5"' in page and 'value="0.000000001"' in page

    # Clearing a field removes it.
    client.post(url, {"budget_alert_percent": "90"})
    org.refresh_from_db()
    assert org.monthly_budget is None and org.reference_price_input is None


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"monthly_budget_usd": "0"}, "monthly_budget_usd", "greater than or equal to 0.01"),
        ({"monthly_budget_usd": "1.005"}, "monthly_budget_usd", "2 decimal places"),
        ({"monthly_budget_usd": "ten"}, "monthly_budget_usd", "Enter a number"),
        ({"budget_alert_percent": "0"}, "budget_alert_percent", "greater than or equal to 1"),
        ({"budget_alert_percent": "101"}, "budget_alert_percent", "less than or equal to 100"),
        ({"budget_alert_percent": ""}, "budget_alert_percent", "required"),
        ({"low_balance_alert_usd": "-5"}, "low_balance_alert_usd", "greater than or equal"),
        ({"reference_price_input_usd": "-1"}, "reference_price_input_usd", "greater than or equal"),
        (
            {"reference_price_output_usd": "0.0000000001"},
            "reference_price_output_usd",
            "9 decimal places",
        ),
    ],
)
def test_it_explains_invalid_budget_settings(org, client, data, field, message):
    url = reverse("console:budget", args=[org.slug])
    response = login(client, "owner@example.test").post(url, {"budget_alert_percent": "80", **data})
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert message in " ".join(errors[field])
    assert message in response.content.decode().replace("&#x27;", "'")
    org.refresh_from_db()
    assert org.monthly_budget is None and org.budget_alert_percent == 80
    assert not AuditLogEntry.objects.filter(action="organization.budget_update").exists()


def test_it_shows_the_savings_on_the_usage_page(org, client):
    url = reverse("console:usage", args=[org.slug])
    now = timezone.now()
    record(org, cost=usd_to_nanos("1"), at=now, prompt=2_000_000, completion=1_000_000)

    page = login(client, "owner@example.test").get(url).content.decode()
    assert "Set a reference price" in page
    assert reverse("console:budget", args=[org.slug]) in page
    page = login(client, "dev@example.test").get(url).content.decode()
    assert "Set a reference price" not in page and "can set a reference price" in page

    Organization.objects.filter(pk=org.pk).update(
        reference_price_input=usd_to_nanos("1"), reference_price_output=usd_to_nanos("2")
    )
    page = client.get(url).content.decode()
    # Reference: 2M tokens at $1 + 1M at $2 = $4; spent $1; saved $3 (75%).
    assert "Saved vs your reference model: <strong>$3.000000</strong> (75.0%)" in page
