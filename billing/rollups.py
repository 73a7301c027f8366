"""Hourly usage rollups, rebuilt from usage records.

Dashboards read ``UsageRollup`` (one row per hour, organisation, API key, endpoint and
vendor) instead of scanning ``UsageRecord``. Rollups are derived data: ``rollup_rebuild``
deletes the rows of the whole hours in a range and inserts them again from the records,
in one database transaction under an advisory lock, so it is idempotent, safe to run
concurrently and picks up late-ingested records. Celery beat rebuilds the last hours every
hour; ``manage.py rollups --start --end`` rebuilds any range.

``errors`` counts requests whose outcome is not ``success`` (failed, or a stream broken
after bytes were sent).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import connection, transaction
from django.db.models import Count, Max, Q, Sum
from django.db.models.functions import TruncHour

from billing.models import UsageRecord, UsageRollup

ROLLUP_LOCK = 727_002  # pg advisory lock id: one rebuild at a time


def hour_floor(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def hour_ceil(moment: datetime) -> datetime:
    floor = hour_floor(moment)
    return floor if floor == moment else floor + timedelta(hours=1)


def rollup_rebuild(*, start: datetime, end: datetime) -> int:
    """Rebuild the rollups of every whole hour touching [start, end); returns rows written."""
    begin, finish = hour_floor(start), hour_ceil(end)
    if finish <= begin:
        return 0
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [ROLLUP_LOCK])
        UsageRollup.objects.filter(hour__gte=begin, hour__lt=finish).delete()
        buckets = (
            UsageRecord.objects.filter(occurred_at__gte=begin, occurred_at__lt=finish)
            .annotate(bucket=TruncHour("occurred_at"))
            .values("bucket", "organization_id", "api_key_id", "endpoint_id", "vendor_id")
            .annotate(
                n=Count("id"),
                n_errors=Count("id", filter=~Q(outcome=UsageRecord.Outcome.SUCCESS)),
                pt=Sum("prompt_tokens"),
                ct=Sum("completion_tokens"),
                total_cost=Sum("cost"),
                share=Sum("vendor_share"),
                fee=Sum("platform_fee"),
                latency=Sum("latency_ms"),
                latency_max=Max("latency_ms"),
            )
            .order_by()
        )
        rows = [
            UsageRollup(
                hour=b["bucket"],
                organization_id=b["organization_id"],
                api_key_id=b["api_key_id"],
                endpoint_id=b["endpoint_id"],
                vendor_id=b["vendor_id"],
                requests=b["n"],
                errors=b["n_errors"],
                prompt_tokens=b["pt"] or 0,
                completion_tokens=b["ct"] or 0,
                cost=b["total_cost"] or 0,
                vendor_share=b["share"] or 0,
                platform_fee=b["fee"] or 0,
                latency_ms_sum=b["latency"] or 0,
                latency_ms_max=b["latency_max"] or 0,
            )
            for b in buckets
        ]
        UsageRollup.objects.bulk_create(rows, batch_size=1000)
    return len(rows)
