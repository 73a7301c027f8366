"""Write operations on an organisation's private endpoints (the customer console's page).

A private endpoint is an ordinary ``Endpoint`` with ``private_to`` set: the routing snapshot
shows it to that organisation only. It belongs to the organisation's *private vendor*, one
``Vendor`` row per organisation (``Vendor.private_to``), created on first use, approved,
with a 100 % platform fee so that nothing ever accrues to a payable, and skipped by
settlement (see docs/design.md). Registration runs the vendor portal's ``endpoint_create``
(the same SSRF, slug, price and capacity checks); the endpoint goes live without the admin
queue, but only once a conformance check passes. Owners and admins manage; every change is
in the organisation's audit log; the gateways reload their routing table on commit.
"""

from __future__ import annotations

from django.contrib.auth.models import User
from django.db import transaction

from marketplace import invalidation
from marketplace.models import Membership, Organization
from marketplace.selectors import role_allows
from marketplace.services import PermissionDeniedError, audit_record
from vendors.models import ConformanceReport, Endpoint, Vendor
from vendors.services import (
    VendorError,
    endpoint_approve,
    endpoint_check_conformance,
    endpoint_create,
    endpoint_suspend,
)

PRIVATE_VENDOR_PREFIX = "private-"
PRIVATE_VENDOR_FEE_BPS = 10_000  # the whole charge is platform revenue: no payable accrues
MANAGE = "endpoints.manage"


def _require(actor: User, organization: Organization) -> None:
    membership = Membership.objects.filter(organization=organization, user=actor).first()
    if membership is None or not role_allows(membership.role, MANAGE):
        raise PermissionDeniedError("your role in this organisation does not allow that")


def _organization_of(endpoint: Endpoint) -> Organization:
    if endpoint.private_to is None:
        raise VendorError("this is not a private endpoint")
    return endpoint.private_to


def _audit(actor: User, action: str, endpoint: Endpoint, **details: object) -> None:
    audit_record(
        actor=actor,
        action=action,
        target=endpoint,
        organization=endpoint.private_to,
        details={"endpoint": endpoint.full_slug, **details},
    )


@transaction.atomic
def private_vendor_ensure(*, organization: Organization) -> Vendor:
    """The organisation's private vendor, created (approved, fee 100 %) on first use.

    Its slug is ``private-<organisation slug>`` (with a number when a vendor holds it);
    customers call their private endpoints as ``<that slug>/<endpoint>``.
    """
    existing = Vendor.objects.filter(private_to=organization).first()
    if existing is not None:
        return existing
    # Two first registrations at once: the organisation's row lock lets one create it.
    Organization.objects.select_for_update().get(pk=organization.pk)
    existing = Vendor.objects.filter(private_to=organization).first()
    if existing is not None:
        return existing
    base = f"{PRIVATE_VENDOR_PREFIX}{organization.slug}"[:64].rstrip("-")
    slug, n = base, 2
    while Vendor.objects.filter(slug=slug).exists():
        slug = f"{base[:58].rstrip('-')}-{n}"
        n += 1
    return Vendor.objects.create(
        name=f"{organization.name} (private)"[:200],
        slug=slug,
        status=Vendor.Status.APPROVED,
        fee_bps=PRIVATE_VENDOR_FEE_BPS,
        private_to=organization,
    )


@transaction.atomic
def private_endpoint_register(
    *, actor: User, organization: Organization, **fields: object
) -> Endpoint:
    """Register a private endpoint of ``organization`` (fields as ``endpoint_create``).

    It is pending until ``private_endpoint_check`` passes; the secret is encrypted at rest
    and never logged.
    """
    _require(actor, organization)
    if fields.get("slug") == "new":
        raise VendorError("the slug 'new' is reserved; choose another endpoint name")
    vendor = private_vendor_ensure(organization=organization)
    endpoint = endpoint_create(vendor=vendor, private_to=organization, **fields)  # type: ignore[arg-type]
    _audit(
        actor,
        "private_endpoint.register",
        endpoint,
        base_url=endpoint.base_url,
        upstream_model=endpoint.upstream_model,
        kind=endpoint.kind,
        price_input=endpoint.price_input,
        price_output=endpoint.price_output,
        secret_set=bool(fields.get("secret")),
    )
    return endpoint


def private_endpoint_check(*, actor: User, endpoint: Endpoint) -> ConformanceReport:
    """Run the conformance check (outside any transaction: it calls the endpoint) and keep
    the report; when it passes, the endpoint goes live (a failing check never takes a live
    endpoint down: the gateway's circuit breaker judges live traffic)."""
    organization = _organization_of(endpoint)
    _require(actor, organization)
    report = endpoint_check_conformance(endpoint=endpoint)
    with transaction.atomic():
        before = Endpoint.objects.select_for_update().get(pk=endpoint.pk).status
        after = before
        if report.passed and before != Endpoint.Status.APPROVED:
            after = endpoint_approve(endpoint=endpoint).status
        _audit(
            actor,
            "private_endpoint.check",
            endpoint,
            passed=report.passed,
            report=report.pk,
            **({"from": before, "to": after} if after != before else {}),
        )
    return report


@transaction.atomic
def private_endpoint_disable(*, actor: User, endpoint: Endpoint) -> Endpoint:
    """Take a private endpoint out of routing (a passing check puts it back)."""
    _require(actor, _organization_of(endpoint))
    before = Endpoint.objects.select_for_update().get(pk=endpoint.pk).status
    updated = endpoint_suspend(endpoint=endpoint)
    if updated.status != before:
        _audit(actor, "private_endpoint.disable", updated, **{"from": before})
    return updated


@transaction.atomic
def private_endpoint_delete(*, actor: User, endpoint: Endpoint) -> None:
    """Delete a private endpoint and its reports; usage records keep their numbers (their
    endpoint becomes empty) and the audit log keeps what it was."""
    _require(actor, _organization_of(endpoint))
    locked = Endpoint.objects.select_for_update().select_related("vendor").get(pk=endpoint.pk)
    _audit(
        actor,
        "private_endpoint.delete",
        locked,
        base_url=locked.base_url,
        upstream_model=locked.upstream_model,
        status=locked.status,
    )
    locked.delete()
    invalidation.publish_after_commit(invalidation.SNAPSHOT)
