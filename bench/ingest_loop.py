"""A Celery-free usage ingest loop for benchmarks: metering runs while the gateway is loaded.

    python -m bench.ingest_loop            # needs DATABASE_URL / REDIS_URL (devenv exec)

Calls ``billing.usage.usage_ingest_batch`` and ``routing.traces.trace_ingest_batch`` in a
loop, exactly what the Celery tasks do,
until SIGTERM/SIGINT. Prints ``READY`` once Django is set up and, at exit, one JSON line
``{"batches": .., "entries": .., "recorded": .., "duplicates": .., "invalid": ..}``.
With ``INGEST_TIMINGS=<file>`` it also writes, at exit, one row per round:
``[start, usage done, traces done, events read, traces stored]`` (``time.perf_counter()``,
the clock the load generator times requests with), for ``bench.tail_bench``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")


def main() -> int:
    import django

    django.setup()
    from billing.usage import linger_after, usage_ingest_batch
    from routing.traces import trace_ingest_batch

    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    timings: list[tuple[float, float, float, int, int]] = []
    timings_path = os.environ.get("INGEST_TIMINGS")
    totals = {"batches": 0, "entries": 0, "recorded": 0, "duplicates": 0, "invalid": 0, "traces": 0}
    print("READY", flush=True)
    while not stop:
        try:
            began = time.perf_counter()
            result = usage_ingest_batch(count=1000, block_ms=100)
            used = time.perf_counter()
            # The route traces too, as the trace_ingest task does in production.
            stored = trace_ingest_batch(count=1000).stored
            totals["traces"] += stored
            if timings_path and (result.read or stored):
                timings.append((began, used, time.perf_counter(), result.read, stored))
        except Exception as exc:  # keep metering alive through a hiccup, but say so
            print(f"ingest error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            time.sleep(0.2)
            continue
        if result.read:
            totals["batches"] += 1
            totals["entries"] += result.read
            totals["recorded"] += result.recorded
            totals["duplicates"] += result.duplicates
            totals["invalid"] += result.invalid
            linger_after(result.read)
    if timings_path:
        with open(timings_path, "w") as out:
            json.dump(timings, out)
    print(json.dumps(totals), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
