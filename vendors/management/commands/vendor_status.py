from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from vendors import services
from vendors.models import Endpoint, Vendor


class Command(BaseCommand):
    help = "Approve, suspend or resume a vendor (SLUG) or an endpoint (VENDOR/ENDPOINT)."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("action", choices=["approve", "suspend", "resume"])
        parser.add_argument("target", help="vendor slug or vendor/endpoint")

    @transaction.atomic
    def handle(self, *args, **opts):  # type: ignore[no-untyped-def]
        target, action = opts["target"], opts["action"]
        if "/" in target:
            vendor_slug, _, endpoint_slug = target.partition("/")
            endpoint = Endpoint.objects.filter(vendor__slug=vendor_slug, slug=endpoint_slug).first()
            if endpoint is None:
                raise CommandError(f"no endpoint {target!r}")
            endpoint = getattr(services, f"endpoint_{action}")(endpoint=endpoint)
            self.stdout.write(f"{target}: {endpoint.status}")
        else:
            vendor = Vendor.objects.filter(slug=target).first()
            if vendor is None:
                raise CommandError(f"no vendor {target!r}")
            vendor = getattr(services, f"vendor_{action}")(vendor=vendor)
            self.stdout.write(f"{target}: {vendor.status}")
