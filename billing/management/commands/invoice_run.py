from datetime import date

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from billing.invoicing import invoice_run, previous_month


class Command(BaseCommand):
    help = "Invoice every invoiced organisation for a month through Stripe (safe to repeat)."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--month", help="YYYY-MM (default: the previous month)")

    def handle(self, *args, **opts):  # type: ignore[no-untyped-def]
        if opts["month"]:
            try:
                month = date.fromisoformat(f"{opts['month']}-01")
            except ValueError:
                raise CommandError("--month must be YYYY-MM") from None
        else:
            month = previous_month(timezone.now().date())
        for invoice in invoice_run(month=month):
            self.stdout.write(
                f"{invoice.organization.slug} {invoice.month:%Y-%m}: {invoice.status} "
                f"{invoice.amount_cents / 100:.2f} USD {invoice.stripe_invoice_id or ''}"
            )
