"""Celery tasks of vendors: probes and conformance, thin wrappers over the services.

The ``*_all`` tasks fan out one task per endpoint; each fanned-out message expires before
the next round would send it again, so a backlog never piles up behind a slow worker.
"""

from __future__ import annotations

from celery import shared_task

from vendors import selectors, services
from vendors.models import Endpoint
from vendors.schedule import HEALTH_PROBE_SECONDS, QUALITY_PROBE_SECONDS

HEALTH_EXPIRES_SECONDS = HEALTH_PROBE_SECONDS - 5
QUALITY_EXPIRES_SECONDS = QUALITY_PROBE_SECONDS - 600


def _endpoint(endpoint_id: int) -> Endpoint | None:
    return (
        Endpoint.objects.select_related("vendor")
        .prefetch_related("tags")
        .filter(pk=endpoint_id)
        .first()
    )


@shared_task(
    name="vendors.tasks.health_probe_endpoint",
    acks_late=True,
    ignore_result=True,
    soft_time_limit=30,
    time_limit=45,
)
def health_probe_endpoint(endpoint_id: int) -> bool | None:
    """Probe one endpoint's health; None if it no longer exists."""
    endpoint = _endpoint(endpoint_id)
    if endpoint is None:
        return None
    return services.endpoint_probe_health(endpoint=endpoint).ok


@shared_task(name="vendors.tasks.health_probe_all", acks_late=True, ignore_result=True)
def health_probe_all() -> int:
    """Queue a health probe for every approved endpoint (beat: every 30 s)."""
    ids = selectors.probe_targets()
    for endpoint_id in ids:
        health_probe_endpoint.apply_async((endpoint_id,), expires=HEALTH_EXPIRES_SECONDS)
    return len(ids)


@shared_task(
    name="vendors.tasks.quality_probe_endpoint",
    acks_late=True,
    ignore_result=True,
    soft_time_limit=10 * 60,
    time_limit=11 * 60,
)
def quality_probe_endpoint(endpoint_id: int) -> int | None:
    """Send the golden sets to one endpoint; returns how many items were sent."""
    endpoint = _endpoint(endpoint_id)
    if endpoint is None:
        return None
    return len(services.endpoint_probe_quality(endpoint=endpoint))


@shared_task(name="vendors.tasks.quality_probe_all", acks_late=True, ignore_result=True)
def quality_probe_all() -> int:
    """Queue golden-set probes for every approved chat endpoint (beat: hourly)."""
    ids = selectors.probe_targets(kind=Endpoint.Kind.CHAT)
    for endpoint_id in ids:
        quality_probe_endpoint.apply_async((endpoint_id,), expires=QUALITY_EXPIRES_SECONDS)
    return len(ids)


@shared_task(
    name="vendors.tasks.conformance_check_endpoint",
    acks_late=True,
    ignore_result=True,
    soft_time_limit=3 * 60,
    time_limit=4 * 60,
)
def conformance_check_endpoint(endpoint_id: int) -> bool | None:
    """Run the conformance check of one endpoint (the portal queues it on registration)."""
    endpoint = _endpoint(endpoint_id)
    if endpoint is None:
        return None
    return services.endpoint_check_conformance(endpoint=endpoint).passed


@shared_task(name="vendors.tasks.live_state_prune", acks_late=True, ignore_result=True)
def live_state_prune() -> int:
    """Drop the gateway's live numbers of deleted endpoints from Redis (beat: hourly)."""
    from marketplace.redis_client import sync_client
    from routing.live import prune_live_state

    def existing(ids: list[int]) -> set[int]:
        return set(Endpoint.objects.filter(pk__in=ids).values_list("pk", flat=True))

    return prune_live_state(sync_client(), existing)


@shared_task(name="vendors.tasks.vendor_history_prune", acks_late=True, ignore_result=True)
def vendor_history_prune() -> int:
    """Delete probe results and health checks older than 30 days (beat: daily)."""
    return services.vendor_history_prune()
