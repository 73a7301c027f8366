"""Operations pages: staff only; approve, suspend and resume vendors and endpoints (an
endpoint only after a passing conformance report); every action is in the append-only
audit log."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, InternalError, ProgrammingError, transaction
from django.urls import reverse

from marketplace.models import AuditLogEntry
from marketplace.services import audit_record
from tests import factories
from vendors.models import ConformanceReport, Endpoint, Vendor

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(client):  # type: ignore[no-untyped-def]
    user = factories.user()
    user.is_staff = True
    user.save()
    client.force_login(user)
    client.user = user
    return client


def passing_report(endpoint: Endpoint, passed: bool = True) -> ConformanceReport:
    return ConformanceReport.objects.create(
        endpoint=endpoint,
        passed=passed,
        checks=[
            {"name": "chat", "passed": passed, "required": True, "detail": "ok", "latency_ms": 3}
        ],
    )


def test_only_staff_open_the_operations_pages(client):
    assert client.get(reverse("ops:index")).status_code == 302  # to log in
    client.force_login(factories.user())
    for name in ("ops:index", "ops:live", "ops:vendors", "ops:endpoints", "ops:audit"):
        assert client.get(reverse(name)).status_code == 403
    vendor = factories.vendor(approved=False)
    assert client.post(reverse("ops:vendor-action", args=[vendor.pk, "approve"])).status_code == 403
    vendor.refresh_from_db()
    assert vendor.status == Vendor.Status.PENDING


def test_it_queues_pending_vendors_and_endpoints_with_their_reports(staff, upstream):
    vendor = factories.vendor(approved=False)
    endpoint = factories.endpoint(base_url=upstream.base_url, vendor_obj=vendor, approved=False)
    passing_report(endpoint, passed=False)

    page = staff.get(reverse("ops:index")).content.decode()

    assert vendor.name in page and endpoint.full_slug in page
    assert "✗ fail" in page and "needs a passing check" in page


def test_it_approves_a_vendor_and_logs_it(staff):
    vendor = factories.vendor(approved=False)
    response = staff.post(reverse("ops:vendor-action", args=[vendor.pk, "approve"]))
    assert response.status_code == 302
    vendor.refresh_from_db()
    assert vendor.status == Vendor.Status.APPROVED
    entry = AuditLogEntry.objects.get(action="vendor.approve")
    assert entry.actor == staff.user and entry.details == {
        "vendor": vendor.slug,
        "from": "pending",
        "to": "approved",
    }


def test_it_approves_an_endpoint_only_after_a_passing_check(staff, upstream):
    endpoint = factories.endpoint(base_url=upstream.base_url, approved=False)
    url = reverse("ops:endpoint-action", args=[endpoint.pk, "approve"])

    response = staff.post(url, follow=True)
    assert "only after a passing conformance check" in response.content.decode()
    endpoint.refresh_from_db()
    assert endpoint.status == Endpoint.Status.PENDING

    passing_report(endpoint)
    staff.post(url)
    endpoint.refresh_from_db()
    assert endpoint.status == Endpoint.Status.APPROVED

    staff.post(reverse("ops:endpoint-action", args=[endpoint.pk, "suspend"]))
    endpoint.refresh_from_db()
    assert endpoint.status == Endpoint.Status.SUSPENDED
    staff.post(reverse("ops:endpoint-action", args=[endpoint.pk, "resume"]))
    endpoint.refresh_from_db()
    assert endpoint.status == Endpoint.Status.APPROVED
    actions = list(AuditLogEntry.objects.order_by("pk").values_list("action", flat=True))
    assert actions == ["endpoint.approve", "endpoint.suspend", "endpoint.resume"]


def test_it_runs_a_conformance_check_from_the_endpoint_page(staff, upstream):
    endpoint = factories.endpoint(
        base_url=upstream.base_url, upstream_model="fake-small", approved=False
    )
    response = staff.post(reverse("ops:endpoint-conformance", args=[endpoint.pk]), follow=True)
    page = response.content.decode()
    assert "passed the conformance check" in page
    assert "stream.usage" in page


def test_unknown_actions_are_not_found(staff):
    vendor = factories.vendor(approved=False)
    assert staff.post(reverse("ops:vendor-action", args=[vendor.pk, "delete"])).status_code == 404


def test_the_audit_log_is_append_only(staff):
    entry = audit_record(actor=staff.user, action="test.thing", target_type="x", target_id=1)
    with pytest.raises((InternalError, IntegrityError, ProgrammingError)), transaction.atomic():
        AuditLogEntry.objects.filter(pk=entry.pk).update(action="rewritten")
    with pytest.raises((InternalError, IntegrityError, ProgrammingError)), transaction.atomic():
        AuditLogEntry.objects.filter(pk=entry.pk).delete()
    assert AuditLogEntry.objects.get(pk=entry.pk).action == "test.thing"


def test_deleting_the_actor_keeps_the_entry(staff):
    entry = audit_record(actor=staff.user, action="test.thing", target_type="x", target_id=1)
    staff.user.delete()
    entry.refresh_from_db()
    assert entry.actor is None and entry.actor_repr == staff.user.email


def test_it_shows_the_audit_log(staff):
    audit_record(
        actor=staff.user, action="vendor.approve", target_type="vendors.vendor", target_id=7
    )
    page = staff.get(reverse("ops:audit")).content.decode()
    assert "vendor.approve" in page and "vendors.vendor #7" in page
