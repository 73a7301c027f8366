from django.core.management.base import BaseCommand, CommandError

from marketplace.models import Organization
from marketplace.services import ServiceError, api_key_create


class Command(BaseCommand):
    help = "Create an API key for an organisation and print only the key (shown once)."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--org", required=True, help="organisation slug")
        parser.add_argument("--name", required=True)

    def handle(self, *args, **opts):  # type: ignore[no-untyped-def]
        org = Organization.objects.filter(slug=opts["org"]).first()
        if org is None:
            raise CommandError(f"no organisation with the slug {opts['org']!r}")
        try:
            created = api_key_create(organization=org, name=opts["name"])
        except ServiceError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(created.plaintext)
