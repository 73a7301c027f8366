from django.core.management.base import BaseCommand, CommandError

from billing.errors import SettlementError
from billing.settlement import parse_period, settlement_run


class Command(BaseCommand):
    help = (
        "Pay vendors their earnings for a period through Stripe Connect transfers "
        "(safe to run again: nothing is paid twice; failed payouts are retried)."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument(
            "--period", required=True, help="YYYY-MM-DD..YYYY-MM-DD (both days included)"
        )

    def handle(self, *args, **opts):  # type: ignore[no-untyped-def]
        try:
            start, end = parse_period(opts["period"])
            report = settlement_run(period_start=start, period_end=end)
        except SettlementError as exc:
            raise CommandError(str(exc)) from exc
        for o in report.outcomes:
            detail = f" ({o.reason})" if o.reason else ""
            amount = f" {o.amount_cents / 100:.2f} USD" if o.amount_cents else ""
            self.stdout.write(f"vendor {o.vendor_id}: {o.outcome}{detail}{amount}")
        self.stdout.write(f"settlement {report.run.period_key}: {len(report.outcomes)} vendors")
        if not report.ok:
            raise CommandError("some payouts failed or are pending; run the command again later")
