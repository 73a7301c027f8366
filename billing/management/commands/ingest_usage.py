"""A dedicated usage consumer: blocks on the stream and ingests batches as they arrive.

Celery beat also triggers ingest every second; this command is the lower-latency option
for production (run one or more) and is what the crash tests kill with SIGKILL.
"""

import signal
import time

from django.core.management.base import BaseCommand

from billing.usage import linger_after, usage_ingest_batch


class Command(BaseCommand):
    help = "Consume the usage stream until stopped (or once with --once)."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--batch", type=int, default=1000)
        parser.add_argument("--once", action="store_true", help="drain the stream, then exit")
        parser.add_argument("--consumer", help="consumer name (default: host and pid)")

    def handle(self, *args, **opts):  # type: ignore[no-untyped-def]
        stopping = False

        def stop(*_: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        recorded = 0
        while not stopping:
            result = usage_ingest_batch(
                count=opts["batch"],
                block_ms=None if opts["once"] else 500,
                consumer=opts["consumer"],
            )
            recorded += result.recorded
            if result.read:
                self.stdout.write(f"ingested {result.recorded} (duplicates {result.duplicates})")
                self.stdout.flush()
                if not opts["once"]:
                    linger_after(result.read)
            elif opts["once"]:
                break
            else:
                time.sleep(0.01)
        self.stdout.write(f"stopped after recording {recorded}")
