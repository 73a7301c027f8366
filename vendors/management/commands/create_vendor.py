from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from vendors.services import VendorError, vendor_approve, vendor_create


class Command(BaseCommand):
    help = "Create a vendor (pending unless --approve)."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--name", required=True)
        parser.add_argument("--slug")
        parser.add_argument("--approve", action="store_true")

    @transaction.atomic
    def handle(self, *args, **opts):  # type: ignore[no-untyped-def]
        try:
            vendor = vendor_create(name=opts["name"], slug=opts["slug"])
            if opts["approve"]:
                vendor = vendor_approve(vendor=vendor)
        except VendorError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"{vendor.slug} ({vendor.status})")
