from django.core.management.base import BaseCommand, CommandError

from billing.management.commands.reconcile import _moment
from billing.rollups import rollup_rebuild


class Command(BaseCommand):
    help = "Rebuild hourly usage rollups from usage records for a range (idempotent)."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--start", required=True, help="date or date-time (UTC)")
        parser.add_argument("--end", required=True, help="date or date-time (UTC, excluded)")

    def handle(self, *args, **opts):  # type: ignore[no-untyped-def]
        start, end = _moment(opts["start"]), _moment(opts["end"])
        if start is None or end is None or end <= start:
            raise CommandError("--end must be after --start")
        rows = rollup_rebuild(start=start, end=end)
        self.stdout.write(f"{rows} rollup rows rebuilt")
