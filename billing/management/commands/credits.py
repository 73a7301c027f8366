from django.core.management.base import BaseCommand, CommandError

from billing.ledger import organization_balance
from billing.money import MoneyError, format_usd, usd_to_nanos
from billing.services import CreditError, credit_deduct, credit_grant
from marketplace.models import Organization


class Command(BaseCommand):
    help = "Grant or deduct an organisation's credits through the ledger, with a reason."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("action", choices=["grant", "deduct", "show"])
        parser.add_argument("--org", required=True, help="organisation slug")
        parser.add_argument("--usd", help="amount in US dollars, e.g. 10 or 0.25")
        parser.add_argument("--reason", default="")
        parser.add_argument("--idempotency-key", help="repeat-safe: the same key posts once")

    def handle(self, *args, **opts):  # type: ignore[no-untyped-def]
        org = Organization.objects.filter(slug=opts["org"]).first()
        if org is None:
            raise CommandError(f"no organisation with the slug {opts['org']!r}")
        if opts["action"] != "show":
            if not opts["usd"]:
                raise CommandError("--usd is required")
            try:
                amount = usd_to_nanos(opts["usd"])
            except MoneyError as exc:
                raise CommandError(str(exc)) from exc
            action = credit_grant if opts["action"] == "grant" else credit_deduct
            try:
                action(
                    organization=org,
                    amount=amount,
                    reason=opts["reason"],
                    idempotency_key=opts["idempotency_key"],
                )
            except CreditError as exc:
                raise CommandError(str(exc)) from exc
        self.stdout.write(f"{org.slug}: {format_usd(organization_balance(org))}")
