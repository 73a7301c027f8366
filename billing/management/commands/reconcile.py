from datetime import UTC, date, datetime, time

from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_datetime

from billing.reconcile import reconcile


def _moment(text: str | None) -> datetime | None:
    if not text:
        return None
    parsed = parse_datetime(text)
    if parsed is None:
        try:
            parsed = datetime.combine(date.fromisoformat(text), time.min)
        except ValueError:
            raise CommandError(f"not a date or date-time: {text!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = (
        "Check that the ledger agrees with itself, with usage, top-ups, refunds, payouts and "
        "invoices, and with Stripe's transfers. Prints each mismatch; exits 1 on any."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--start", help="from this date/date-time (UTC, included)")
        parser.add_argument("--end", help="until this date/date-time (UTC, excluded)")
        parser.add_argument(
            "--skip-stripe", action="store_true", help="do not compare payouts with Stripe"
        )

    def handle(self, *args, **opts):  # type: ignore[no-untyped-def]
        mismatches = reconcile(
            start=_moment(opts["start"]),
            end=_moment(opts["end"]),
            check_stripe=not opts["skip_stripe"],
        )
        for mismatch in mismatches:
            self.stdout.write(str(mismatch))
        if mismatches:
            raise CommandError(f"{len(mismatches)} mismatch(es) found")
        self.stdout.write("reconciled: no mismatch")
