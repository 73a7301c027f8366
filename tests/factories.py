"""Test data, built through the same services the product uses."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from django.contrib.auth import get_user_model

from billing.money import usd_to_nanos
from billing.services import credit_grant
from marketplace.models import Membership, Organization
from marketplace.services import api_key_create, organization_create
from vendors.models import Endpoint, Vendor
from vendors.services import endpoint_approve, endpoint_create, vendor_approve, vendor_create

_seq = itertools.count(1)


def user(email: str | None = None, password: str = "a-long-test-password"):  # type: ignore[no-untyped-def]
    n = next(_seq)
    email = email or f"user{n}@example.test"
    return get_user_model().objects.create_user(username=email, email=email, password=password)


def organization(*, credit_usd: str | None = "10", name: str | None = None) -> Organization:
    n = next(_seq)
    org = organization_create(name=name or f"Customer {n}", slug=f"customer-{n}")
    if credit_usd:
        credit_grant(organization=org, amount=usd_to_nanos(credit_usd), reason="test credit")
    return org


def owner(organization: Organization):  # type: ignore[no-untyped-def]
    """A new user who owns ``organization`` (the role the settings services ask for)."""
    member = user()
    Membership.objects.create(organization=organization, user=member, role=Membership.Role.OWNER)
    return member


@dataclass
class Customer:
    organization: Organization
    key: str


def customer(*, credit_usd: str | None = "10") -> Customer:
    org = organization(credit_usd=credit_usd)
    return Customer(org, api_key_create(organization=org, name="test key").plaintext)


def guarded(customer: Customer, policy: str, regions: str = "") -> None:
    """Turn on the customer's privacy guard (``redact`` or ``trusted_only``), cache off."""
    from marketplace.data_policy import organization_data_policy_update

    organization_data_policy_update(
        actor=owner(customer.organization),
        organization=customer.organization,
        privacy_policy=policy,
        cache_ttl=0,
        cache_similarity=None,
        trusted_regions=regions,
    )


def log_content(customer: Customer) -> None:
    """Opt the customer's key in to keeping prompts and completions in its traces."""
    from marketplace.data_policy import api_key_data_policy_update
    from marketplace.models import ApiKey

    api_key_data_policy_update(
        actor=owner(customer.organization),
        api_key=ApiKey.objects.get(organization=customer.organization),
        privacy_policy="",
        cache_ttl=None,
        cache_similarity=None,
        log_content=True,
    )


def vendor(*, approved: bool = True, slug: str | None = None) -> Vendor:
    n = next(_seq)
    v = vendor_create(name=f"Vendor {n}", slug=slug or f"vendor-{n}")
    return vendor_approve(vendor=v) if approved else v


def endpoint(
    *,
    base_url: str,
    upstream_model: str = "test-model",
    vendor_obj: Vendor | None = None,
    slug: str | None = None,
    tags: tuple[str, ...] = ("chat",),
    price_input_usd: str = "1",
    price_output_usd: str = "2",
    approved: bool = True,
    secret: str = "",
    context_length: int = 2048,
    **extra: object,
) -> Endpoint:
    n = next(_seq)
    ep = endpoint_create(
        vendor=vendor_obj or vendor(),
        slug=slug or f"model-{n}",
        base_url=base_url,
        upstream_model=upstream_model,
        tags=tags,
        price_input=usd_to_nanos(price_input_usd),
        price_output=usd_to_nanos(price_output_usd),
        secret=secret,
        context_length=context_length,
        **extra,  # type: ignore[arg-type]
    )
    return endpoint_approve(endpoint=ep) if approved else ep
