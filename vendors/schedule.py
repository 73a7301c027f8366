"""Periodic tasks of vendors, merged by the settings into ``CELERY_BEAT_SCHEDULE``
(``{**existing, **VENDORS_BEAT_SCHEDULE}``).

The settings import this module, so it imports nothing of Django or of the app; the
expiry times match ``vendors.tasks`` (a round's messages expire before the next round).
"""

from __future__ import annotations

from typing import Any

HEALTH_PROBE_SECONDS = 30.0
QUALITY_PROBE_SECONDS = 60.0 * 60
HISTORY_PRUNE_SECONDS = 24 * 60.0 * 60
LIVE_STATE_PRUNE_SECONDS = 60.0 * 60

VENDORS_BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "vendors-health-probe-all": {
        "task": "vendors.tasks.health_probe_all",
        "schedule": HEALTH_PROBE_SECONDS,
        "options": {"expires": HEALTH_PROBE_SECONDS - 5},
    },
    "vendors-quality-probe-all": {
        "task": "vendors.tasks.quality_probe_all",
        "schedule": QUALITY_PROBE_SECONDS,
        "options": {"expires": QUALITY_PROBE_SECONDS - 600},
    },
    "vendors-live-state-prune": {
        "task": "vendors.tasks.live_state_prune",
        "schedule": LIVE_STATE_PRUNE_SECONDS,
        "options": {"expires": LIVE_STATE_PRUNE_SECONDS - 600},
    },
    "vendors-history-prune": {
        "task": "vendors.tasks.vendor_history_prune",
        "schedule": HISTORY_PRUNE_SECONDS,
        "options": {"expires": 60.0 * 60},
    },
}
