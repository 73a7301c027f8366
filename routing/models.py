"""What routing keeps in PostgreSQL: the route traces, past Redis's short-lived copy."""

from __future__ import annotations

from django.contrib.postgres.indexes import BrinIndex
from django.db import models


class RouteTrace(models.Model):
    """One request's route trace, as ``GET /v1/generation`` returns it.

    The gateway writes the trace to Redis (read back for ``GATEWAY_TRACE_TTL_SECONDS``) and
    appends it to the ``sy:traces`` stream; ``routing.traces`` ingests the stream into this
    table, which keeps it ``TRACE_RETENTION_DAYS``. ``stream_ms``/``stream_seq`` are the
    stream entry's id: a later entry for the same request (the cascade rewrites its
    trace once it has judged the answer) replaces an earlier one, never the reverse.
    No foreign key: the organisation id is checked on read, and ingest stays one insert.
    """

    request_id = models.CharField(max_length=64, primary_key=True)
    organization_id = models.BigIntegerField()
    created_at = models.DateTimeField()
    stream_ms = models.BigIntegerField()
    stream_seq = models.BigIntegerField()
    # The JSON text as the gateway wrote it. Not jsonb: nothing queries inside a trace, and
    # text is stored a third smaller and inserted without PostgreSQL parsing it (measured
    # with bench.ingest_bench); it also keeps a NUL character a request carried in (JSON's
    # \u0000), which jsonb refuses.
    trace = models.TextField()

    class Meta:
        # Appended in time order and pruned by age: a BRIN index is a few pages.
        indexes = [BrinIndex(fields=["created_at"], name="routetrace_created_brin")]

    def __str__(self) -> str:
        return self.request_id
