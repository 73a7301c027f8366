"""Demo data for `make run`: built from the same services the operator commands use."""

import json
import os
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from billing.money import usd_to_nanos
from billing.services import credit_grant
from marketplace.models import Organization
from marketplace.services import api_key_create, organization_create
from vendors.models import Endpoint, Vendor
from vendors.services import (
    VendorError,
    endpoint_approve,
    endpoint_create,
    endpoint_set_url,
    vendor_approve,
    vendor_create,
)

DEMO_ORG = "acme"


class Command(BaseCommand):
    help = "Create demo users, two vendors with approved endpoints and a customer with credit."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--chat-url", required=True, help="SmolLM2 server base URL (…/v1)")
        parser.add_argument("--chat-model", default="smollm2-135m-instruct")
        parser.add_argument("--weak-url", required=True, help="Gemma 270M server base URL (…/v1)")
        parser.add_argument("--weak-model", default="gemma-3-270m")
        parser.add_argument(
            "--credentials-file",
            type=Path,
            default=Path(settings.VAR_DIR) / "demo-credentials.json",
        )

    def handle(self, *args, **opts):  # type: ignore[no-untyped-def]
        path: Path = opts["credentials_file"]
        if Organization.objects.filter(slug=DEMO_ORG).exists():
            self._refresh_urls(opts)
            self.stdout.write(f"Demo data exists already; credentials are in {path}.")
            return
        try:
            with transaction.atomic():
                credentials = self._seed(opts)
        except VendorError as exc:
            raise CommandError(str(exc)) from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(credentials, handle, indent=2)
        self.stdout.write("Demo data created. These credentials are printed once:")
        for label, value in credentials.items():
            self.stdout.write(f"  {label:<22} {value}")
        self.stdout.write(f"(also saved, readable only by you, in {path})")

    def _refresh_urls(self, opts) -> None:  # type: ignore[no-untyped-def]
        for full_slug, url in (
            ("smol-labs/smollm2-135m", opts["chat_url"]),
            ("budget-models/gemma3-270m", opts["weak_url"]),
        ):
            vendor_slug, _, slug = full_slug.partition("/")
            endpoint = Endpoint.objects.filter(vendor__slug=vendor_slug, slug=slug).first()
            if endpoint is not None and endpoint.base_url != url.rstrip("/"):
                endpoint_set_url(endpoint=endpoint, base_url=url)

    def _seed(self, opts) -> dict[str, str]:  # type: ignore[no-untyped-def]
        user_model = get_user_model()
        creds: dict[str, str] = {}

        def user(email: str, *, staff: bool = False) -> object:
            password = secrets.token_urlsafe(12)
            account = user_model.objects.create_user(
                username=email, email=email, password=password, is_staff=staff, is_superuser=staff
            )
            self._verify_email(account, email)
            creds[f"{email} password"] = password
            return account

        user("admin@switchyard.local", staff=True)
        smol_owner = user("vendor@smol-labs.example")
        budget_owner = user("vendor@budget-models.example")
        customer = user("dev@acme.example")

        smol = vendor_approve(
            vendor=vendor_create(name="Smol Labs", slug="smol-labs", owner=smol_owner)
        )
        budget = vendor_approve(
            vendor=vendor_create(name="Budget Models", slug="budget-models", owner=budget_owner)
        )
        endpoint_approve(
            endpoint=endpoint_create(
                vendor=smol,
                slug="smollm2-135m",
                base_url=opts["chat_url"],
                upstream_model=opts["chat_model"],
                tags=["chat", "general", "sql"],
                domains=["general"],
                languages=["en"],
                capacity=4,
                context_length=2048,
                price_input=usd_to_nanos("0.10"),
                price_output=usd_to_nanos("0.20"),
            )
        )
        endpoint_approve(
            endpoint=endpoint_create(
                vendor=budget,
                slug="gemma3-270m",
                base_url=opts["weak_url"],
                upstream_model=opts["weak_model"],
                tags=["chat", "general"],
                domains=["general"],
                languages=["en"],
                capacity=2,
                context_length=2048,
                price_input=usd_to_nanos("0.02"),
                price_output=usd_to_nanos("0.04"),
            )
        )
        org = organization_create(name="Acme Analytics", slug=DEMO_ORG, owner=customer)
        credit_grant(
            organization=org,
            amount=usd_to_nanos("5"),
            reason="demo credit",
            idempotency_key="demo:initial-credit",
        )
        creds["customer API key"] = api_key_create(organization=org, name="demo").plaintext
        assert Vendor.objects.filter(status=Vendor.Status.APPROVED).count() >= 2
        return creds

    @staticmethod
    def _verify_email(account, email: str) -> None:  # type: ignore[no-untyped-def]
        from allauth.account.models import EmailAddress

        EmailAddress.objects.create(user=account, email=email, verified=True, primary=True)
