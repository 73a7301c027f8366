"""Budget and low-balance alerts: emails to an organisation's owners and billing members.

Each kind of alert goes out at most once per organisation and calendar month (UTC): a
``BudgetAlert`` row, unique on (organisation, kind, period), is created first and the
email is sent only after that row commits. A retried or doubled check finds the row and
sends nothing; a mail server failure after the commit loses that one email (at most once).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q, Sum
from django.urls import reverse
from django.utils import timezone

from billing.models import BudgetAlert, UsageRecord
from billing.money import format_usd
from billing.selectors import organization_balance_by_id
from marketplace.models import Membership, Organization

ALERT_ROLES = (Membership.Role.OWNER, Membership.Role.BILLING)


def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    """The calendar month (UTC) containing ``now``, as [start, end)."""
    now = now.astimezone(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


@dataclass(frozen=True)
class DueAlert:
    kind: str
    details: dict[str, int]
    notify: bool = True


def alerts_due(organization: Organization, *, spend: int, balance: int | None) -> list[DueAlert]:
    """The alerts ``organization`` qualifies for now (before deduplication)."""
    due: list[DueAlert] = []
    budget = organization.monthly_budget
    if budget is not None and budget > 0:
        figures = {"spend": spend, "budget": budget}
        hard = spend >= budget
        if hard:
            due.append(DueAlert(BudgetAlert.Kind.HARD, figures))
        if spend * 100 >= budget * organization.budget_alert_percent:
            # Reaching the whole budget in one step makes the softer warning redundant:
            # it is recorded (so it never follows later) but not emailed.
            soft = {**figures, "percent": organization.budget_alert_percent}
            due.append(DueAlert(BudgetAlert.Kind.SOFT, soft, notify=not hard))
    threshold = organization.low_balance_alert
    if threshold is not None and balance is not None and balance < threshold:
        due.append(
            DueAlert(BudgetAlert.Kind.LOW_BALANCE, {"balance": balance, "threshold": threshold})
        )
    return due


def _recipients(organization: Organization) -> list[str]:
    emails = Membership.objects.filter(organization=organization, role__in=ALERT_ROLES).values_list(
        "user__email", flat=True
    )
    return sorted({email for email in emails if email})


def _message(organization: Organization, alert: DueAlert) -> tuple[str, str]:
    d = alert.details
    link = settings.SITE_URL + reverse("console:budget", args=[organization.slug])
    if alert.kind == BudgetAlert.Kind.LOW_BALANCE:
        subject = f"{organization.name}: credit balance below {format_usd(d['threshold'], 2)}"
        body = (
            f"The credit balance of {organization.name} is {format_usd(d['balance'], 2)}, "
            f"below your alert level of {format_usd(d['threshold'], 2)}.\n"
            "Top up credits to keep your API keys working.\n"
        )
    else:
        spend, budget = d["spend"], d["budget"]
        share = spend * 100 // budget
        reached = (
            "your monthly budget"
            if alert.kind == BudgetAlert.Kind.HARD
            else (f"{d['percent']}% of your monthly budget")
        )
        subject = f"{organization.name}: {reached} reached"
        body = (
            f"{organization.name} has spent {format_usd(spend, 2)} this month (UTC), "
            f"{share}% of its budget of {format_usd(budget, 2)}.\n"
            "Alerts inform only; requests are not stopped.\n"
        )
    return subject, f"{body}\nBudget and alert settings: {link}\n"


def _send(subject: str, body: str, recipients: list[str]) -> None:
    if recipients:
        send_mail(subject=subject, message=body, from_email=None, recipient_list=recipients)


def _alert_record(organization: Organization, period: str, alert: DueAlert, now: datetime) -> bool:
    """Record ``alert`` for ``period`` and email it after commit; False if already recorded."""
    with transaction.atomic():
        _, created = BudgetAlert.objects.get_or_create(
            organization=organization,
            kind=alert.kind,
            period=period,
            defaults={"sent_at": now, "details": {**alert.details, "emailed": alert.notify}},
        )
        if not created or not alert.notify:
            return False
        subject, body = _message(organization, alert)
        transaction.on_commit(partial(_send, subject, body, _recipients(organization)))
    return True


def budget_alerts_check(now: datetime | None = None) -> int:
    """Send the budget and low-balance alerts due now; returns how many were sent."""
    now = now or timezone.now()
    start, end = month_bounds(now)
    period = start.strftime("%Y-%m")
    organizations = list(
        Organization.objects.filter(
            Q(monthly_budget__isnull=False) | Q(low_balance_alert__isnull=False)
        ).order_by("pk")
    )
    if not organizations:
        return 0
    ids = [org.pk for org in organizations]
    spend = dict(
        UsageRecord.objects.filter(
            organization_id__in=ids, occurred_at__gte=start, occurred_at__lt=end
        )
        .values("organization_id")
        .annotate(total=Sum("cost"))
        .values_list("organization_id", "total")
    )
    done = set(
        BudgetAlert.objects.filter(organization_id__in=ids, period=period).values_list(
            "organization_id", "kind"
        )
    )
    sent = 0
    for org in organizations:
        # Invoiced organisations pay later: their credit balance means nothing here.
        balance = (
            organization_balance_by_id(org.pk)
            if org.low_balance_alert is not None
            and org.billing_mode == Organization.BillingMode.PREPAID
            and (org.pk, BudgetAlert.Kind.LOW_BALANCE) not in done
            else None
        )
        for alert in alerts_due(org, spend=int(spend.get(org.pk) or 0), balance=balance):
            if (org.pk, alert.kind) in done:
                continue
            sent += _alert_record(org, period, alert, now)
    return sent
