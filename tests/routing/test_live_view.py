"""The router's view of the live numbers, rebuilt by the gateway after every refresh."""

from __future__ import annotations

import random
import time

import numpy as np
from django.conf import settings

from routing.gateway.app import GatewayApp
from routing.live import EndpointNumbers
from routing.scoring import EndpointLive, LiveView, index_for
from routing.snapshot import Snapshot
from tests.routing.test_router import endpoint, snapshot

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


def _columns(view: LiveView, snap: Snapshot) -> tuple[list[list[int]], list[list[float]]]:
    columns = view.columns_for(index_for(snap))
    return columns.ints.tolist(), np.nan_to_num(columns.floats, nan=-1.0).tolist()


def test_patched_arrays_are_the_arrays_built_afresh():
    """A view that replaces another where a few endpoints moved patches the router's arrays
    (quotes with the surge included); they equal the arrays of a view built from nothing."""
    rng = random.Random(7)
    snap = snapshot(*(endpoint(i) for i in range(1, 201)))

    def random_live() -> EndpointLive:
        circuit = rng.choice(["closed", "closed", "open", "half_open"])
        return EndpointLive(
            inflight=rng.randrange(5),
            utilisation=rng.random(),
            circuit=circuit,
            half_open_trial=circuit == "half_open",
            latency_ms=rng.choice([None, rng.uniform(5, 500)]),
            requests=rng.randrange(1000),
            success_ratio=rng.choice([None, rng.random()]),
        )

    table = {i: random_live() for i in range(1, 151)}
    view = LiveView(table)
    view.prepare(snap)
    for _ in range(20):
        moved = set(rng.sample(range(1, 231), 12))  # some outside the snapshot, some new
        for i in moved:
            if rng.random() < 0.2:
                table.pop(i, None)
            else:
                table[i] = random_live()
        patched = LiveView(table, since=view, moved=moved)
        assert _columns(patched, snap) == _columns(LiveView(table), snap)
        quotes = patched.columns_for(index_for(snap)).quote_input
        assert quotes.min() < quotes.max()  # utilisation moved the quotes: a real check
        view = patched


def test_a_refresh_where_nothing_moved_keeps_the_view_and_its_cached_decisions():
    app = GatewayApp()
    app._rebuild_live_view({7: IDLE, 8: IDLE})
    view = app.live_view
    app._rebuild_live_view({7: IDLE, 8: IDLE}, frozenset({7}))  # re-read, same numbers
    assert app.live_view is view
    app._rebuild_live_view({7: IDLE, 8: IDLE})  # a full read, same numbers
    assert app.live_view is view
    app._rebuild_live_view({7: IDLE, 8: IDLE._replace(inflight=3)}, frozenset({8}))
    assert app.live_view is not view and app.live_view[8].inflight == 3
    assert app.live_view[7] is view[7]


def test_an_open_circuit_half_opens_on_a_refresh_that_read_nothing_new():
    """A circuit's view moves with the clock: an endpoint whose circuit is open is looked
    at on every refresh, changed or not."""
    app = GatewayApp()
    now = time.time()
    cooldown = settings.GATEWAY_CIRCUIT_COOLDOWN_SECONDS
    numbers = {7: IDLE, 8: IDLE._replace(circuit_opened_at=now - cooldown + 0.2)}
    app._rebuild_live_view(numbers)
    assert app.live_view[8].circuit == "open"
    app._rebuild_live_view(numbers, frozenset())
    assert app.live_view[8].circuit == "open"  # nothing moved yet
    numbers[8] = IDLE._replace(circuit_opened_at=now - cooldown - 1)  # as if time passed
    app._rebuild_live_view(numbers, frozenset())  # not among the changed: still looked at
    assert app.live_view[8].circuit == "half_open" and app.live_view[8].half_open_trial


def test_an_endpoint_whose_numbers_are_gone_leaves_the_view():
    app = GatewayApp()
    app._rebuild_live_view({7: IDLE, 8: IDLE})
    app._rebuild_live_view({7: IDLE}, frozenset({8}))
    assert 8 not in app.live_view and app.live_view[7].inflight == 1
    app._rebuild_live_view({}, None)
    assert len(app.live_view) == 0
