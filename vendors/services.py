"""Write operations on vendors and their endpoints."""

from __future__ import annotations

from collections.abc import Sequence

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils.text import slugify

from marketplace import invalidation
from marketplace.models import Organization
from vendors.crypto import encrypt_secret
from vendors.models import CapabilityTag, Endpoint, Vendor, VendorMembership
from vendors.pricing import SurgeCurveError, validate_surge_curve
from vendors.ssrf import UnsafeURLError, check_url


class VendorError(Exception):
    """A vendor or endpoint change that cannot be made; the message says why."""


def _snapshot_changed() -> None:
    invalidation.publish_after_commit(invalidation.SNAPSHOT)


@transaction.atomic
def vendor_create(
    *, name: str, slug: str | None = None, owner: AbstractBaseUser | None = None
) -> Vendor:
    """Register a vendor; it stays pending until an admin approves it."""
    name = name.strip()
    if not name:
        raise VendorError("a vendor needs a name")
    slug = slugify(slug or name)[:64]
    if not slug:
        raise VendorError("the vendor's name gives no usable slug")
    if Vendor.objects.filter(slug=slug).exists():
        raise VendorError(f"a vendor with the slug {slug!r} exists already")
    vendor = Vendor.objects.create(name=name, slug=slug)
    if owner is not None:
        VendorMembership.objects.create(vendor=vendor, user=owner, role=VendorMembership.Role.OWNER)
    return vendor


def _set_vendor_status(vendor: Vendor, status: str) -> Vendor:
    locked = Vendor.objects.select_for_update().get(pk=vendor.pk)
    if locked.status != status:
        locked.status = status
        locked.save(update_fields=["status"])
        _snapshot_changed()
    return locked


@transaction.atomic
def vendor_approve(*, vendor: Vendor) -> Vendor:
    return _set_vendor_status(vendor, Vendor.Status.APPROVED)


@transaction.atomic
def vendor_suspend(*, vendor: Vendor) -> Vendor:
    """Suspend a vendor: none of its endpoints is routed to until it is resumed."""
    return _set_vendor_status(vendor, Vendor.Status.SUSPENDED)


@transaction.atomic
def vendor_resume(*, vendor: Vendor) -> Vendor:
    return _set_vendor_status(vendor, Vendor.Status.APPROVED)


def tags_ensure(slugs: Sequence[str]) -> list[CapabilityTag]:
    """The capability tags with these slugs, creating the missing ones."""
    tags = []
    for raw in slugs:
        slug = slugify(raw)
        if not slug or slug != raw.strip().lower():
            raise VendorError(f"{raw!r} is not a valid capability tag (letters, digits, dashes)")
        tag, _ = CapabilityTag.objects.get_or_create(slug=slug, defaults={"name": slug})
        tags.append(tag)
    return tags


@transaction.atomic
def endpoint_create(
    *,
    vendor: Vendor,
    slug: str,
    base_url: str,
    upstream_model: str,
    price_input: int,
    price_output: int,
    kind: str = Endpoint.Kind.CHAT,
    tags: Sequence[str] = (),
    secret: str = "",
    capacity: int = 4,
    context_length: int = 2048,
    domains: Sequence[str] = (),
    languages: Sequence[str] = (),
    surge_curve: list[list[float]] | None = None,
    region: str = "eu",
    data_retention_days: int = 0,
    private_to: Organization | None = None,
) -> Endpoint:
    """Register an endpoint for a vendor; it is pending until approved.

    The URL is checked against server-side request forgery here and again on every call.
    """
    clean_slug = slugify(slug)
    if not clean_slug or clean_slug != slug:
        raise VendorError(f"{slug!r} is not a valid endpoint slug (lowercase letters, digits, -)")
    if Endpoint.objects.filter(vendor=vendor, slug=clean_slug).exists():
        raise VendorError(f"{vendor.slug}/{clean_slug} exists already")
    if kind not in Endpoint.Kind.values:
        raise VendorError(f"unknown endpoint kind {kind!r}; use one of {Endpoint.Kind.values}")
    try:
        check_url(base_url)
    except UnsafeURLError as exc:
        raise VendorError(f"the URL is refused: {exc}") from exc
    if not upstream_model.strip():
        raise VendorError("the upstream model name is required")
    if price_input < 0 or price_output < 0:
        raise VendorError("prices cannot be negative")
    if capacity < 1:
        raise VendorError("capacity must be at least 1")
    if context_length < 16:
        raise VendorError("context length must be at least 16 tokens")
    curve = surge_curve if surge_curve is not None else None
    if curve is not None:
        try:
            validate_surge_curve(curve)
        except SurgeCurveError as exc:
            raise VendorError(str(exc)) from exc
    endpoint = Endpoint(
        vendor=vendor,
        slug=clean_slug,
        kind=kind,
        base_url=base_url.rstrip("/"),
        upstream_model=upstream_model.strip(),
        secret_encrypted=encrypt_secret(secret),
        price_input=price_input,
        price_output=price_output,
        capacity=capacity,
        context_length=context_length,
        domains=list(domains),
        languages=list(languages),
        region=region,
        data_retention_days=data_retention_days,
        private_to=private_to,
    )
    if curve is not None:
        endpoint.surge_curve = curve
    endpoint.save()
    endpoint.tags.set(tags_ensure(tags))
    return endpoint


def _set_endpoint_status(endpoint: Endpoint, status: str) -> Endpoint:
    locked = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
    if locked.status != status:
        locked.status = status
        locked.save(update_fields=["status", "updated_at"])
        _snapshot_changed()
    return locked


@transaction.atomic
def endpoint_approve(*, endpoint: Endpoint) -> Endpoint:
    return _set_endpoint_status(endpoint, Endpoint.Status.APPROVED)


@transaction.atomic
def endpoint_suspend(*, endpoint: Endpoint) -> Endpoint:
    return _set_endpoint_status(endpoint, Endpoint.Status.SUSPENDED)


@transaction.atomic
def endpoint_resume(*, endpoint: Endpoint) -> Endpoint:
    return _set_endpoint_status(endpoint, Endpoint.Status.APPROVED)


@transaction.atomic
def endpoint_set_url(*, endpoint: Endpoint, base_url: str) -> Endpoint:
    """Point an endpoint at a new URL (checked like at registration)."""
    try:
        check_url(base_url)
    except UnsafeURLError as exc:
        raise VendorError(f"the URL is refused: {exc}") from exc
    locked = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
    locked.base_url = base_url.rstrip("/")
    locked.save(update_fields=["base_url", "updated_at"])
    _snapshot_changed()
    return locked
