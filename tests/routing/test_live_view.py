"""The router's view of the live numbers, rebuilt by the gateway after every refresh."""

from __future__ import annotations

import time

from django.conf import settings

from routing.gateway.app import GatewayApp
from routing.live import EndpointNumbers

IDLE = EndpointNumbers(inflight=1, utilisation=0.5, latency_ms=40.0, requests=9)


def _seen(app: GatewayApp, numbers: EndpointNumbers) -> tuple[str, bool]:
    app._rebuild_live_view({7: numbers})
    live = app.live_view[7]
    return live.circuit, live.half_open_trial


def test_the_view_follows_a_circuit_through_open_half_open_and_closed_again():
    app = GatewayApp()
    now = time.time()
    cooldown = settings.GATEWAY_CIRCUIT_COOLDOWN_SECONDS
    assert _seen(app, IDLE) == ("closed", False)
    assert _seen(app, IDLE._replace(circuit_opened_at=now)) == ("open", False)
    assert _seen(app, IDLE._replace(circuit_opened_at=now - cooldown - 1)) == ("half_open", True)
    assert _seen(app, IDLE) == ("closed", False)
    # The vendor asked for quiet (Retry-After): open until then, closed after.
    assert _seen(app, IDLE._replace(cooldown_until=now + 60)) == ("open", False)
    assert _seen(app, IDLE._replace(cooldown_until=now - 1)) == ("closed", False)


def test_an_idle_endpoint_keeps_its_view_and_a_busy_one_gets_a_new_one():
    app = GatewayApp()
    app._rebuild_live_view({7: IDLE, 8: IDLE})
    before = app.live_view[7], app.live_view[8]
    app._rebuild_live_view({7: IDLE, 8: IDLE._replace(inflight=2)})
    assert app.live_view[7] is before[0]  # the numbers did not move
    assert app.live_view[8] is not before[1] and app.live_view[8].inflight == 2
    assert app.live_view[7].inflight == 1
