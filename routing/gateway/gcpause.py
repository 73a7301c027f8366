"""Keep the garbage collector's full collections short in the gateway process.

CPython's oldest-generation collection walks every tracked object in the process and the
references of each. The gateway's process holds Django, the models, the clients and the
routing table: about 220,000 tracked objects after start-up, and each full collection
stopped the event loop for 150-165 ms (``bench.profile_gateway --mode gc --concurrency
64``), several times a minute under load. Every request in flight waited for it: that
pause WAS the p99 at concurrency 64.

``gc.freeze()`` moves every object alive at that moment into a permanent generation that
collections skip. What start-up loaded lives as long as the process anyway, so:

* at start-up (ASGI lifespan): one ``gc.collect()`` (so no garbage is frozen) and
  ``gc.freeze()``;
* once, after the first ``refreeze_after`` requests: ``gc.freeze()`` again, for what the
  first requests loaded lazily (the routing table, modules imported inside functions,
  compiled templates, connection pools: 45,000 objects in the measurement). No collection
  first: it would be a pause under load, and what it might leave frozen is a bounded,
  one-time amount.

The young generation's threshold can be raised too (``GATEWAY_GC_YOUNG_THRESHOLD``; off by
default). Measured with ``--mode gc``: at 10,000 instead of CPython's 700, the young
collections cost 8 µs per request instead of 18 at c=16, but each pauses 2-4 ms instead of
0.1-0.3, which at c=1 put 3.7 ms on one request in 300 (p99.9 4.3 -> 5.1 ms). The default
keeps the short pauses; a deployment that cares for throughput more than tail may raise it.

Reference counting still frees frozen objects that are no longer used; only garbage held
in reference cycles among frozen objects is never reclaimed, which is why freezing is done
at these two points only and not periodically. ``GATEWAY_GC_FREEZE=0`` turns it off.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("switchyard.gateway")


class GcFreezer:
    """Start-up freeze and one re-freeze after ``refreeze_after`` requests."""

    def __init__(self, *, enabled: bool, refreeze_after: int, young_threshold: int = 0) -> None:
        self.enabled = enabled
        self.young_threshold = young_threshold
        # Requests until the re-freeze; 0 once done (or when disabled): the hot path then
        # pays one attribute test per request.
        self.remaining = refreeze_after if enabled and refreeze_after > 0 else 0

    def at_startup(self) -> None:
        if not self.enabled:
            return
        gc.collect()
        gc.freeze()
        if self.young_threshold:
            _, older, oldest = gc.get_threshold()
            gc.set_threshold(self.young_threshold, older, oldest)
        logger.info("gc: froze %d objects at start-up", gc.get_freeze_count())

    def request_served(self) -> None:
        """Count a request; at the threshold, freeze what the first requests loaded."""
        self.remaining -= 1
        if self.remaining == 0:
            gc.freeze()
            logger.info("gc: froze %d objects after warm-up", gc.get_freeze_count())
