from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from marketplace.models import Organization
from marketplace.services import ServiceError, organization_create


class Command(BaseCommand):
    help = "Create a customer organisation (optionally with an existing user as its owner)."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--name", required=True)
        parser.add_argument("--slug")
        parser.add_argument("--owner-email", help="an existing user who becomes the owner")
        parser.add_argument(
            "--billing-mode",
            default=Organization.BillingMode.PREPAID,
            choices=Organization.BillingMode.values,
        )

    @transaction.atomic
    def handle(self, *args, **opts):  # type: ignore[no-untyped-def]
        owner = None
        if opts["owner_email"]:
            owner = get_user_model().objects.filter(email__iexact=opts["owner_email"]).first()
            if owner is None:
                raise CommandError(f"no user with the email {opts['owner_email']}")
        try:
            org = organization_create(
                name=opts["name"], slug=opts["slug"], owner=owner, billing_mode=opts["billing_mode"]
            )
        except ServiceError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(org.slug)
