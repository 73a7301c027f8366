"""Live state in Redis: holds, capacity leases, circuit breaker, rate and credit limits.

These run the gateway's real Lua scripts against the real Redis, concurrently."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
import redis.asyncio as aioredis
from django.conf import settings

from billing.credit import credit_key, credit_version_key
from marketplace.redis_client import sync_client
from routing import live as live_mod
from routing.live import LiveCache, LiveConfig, LiveState, Verdict
from vendors.pricing import live_key


def _run(fn, config: LiveConfig | None = None):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        client = aioredis.Redis.from_url(settings.REDIS_URL)
        try:
            return await fn(LiveState(client, config))
        finally:
            await client.aclose()

    return asyncio.run(main())


def _reserve(
    state: LiveState,
    *,
    org=1,
    ep=10,
    capacity=100,
    hold=10,
    lease="l",
    rpm=None,
    key_limit=None,
    key_id=5,
    attempt=0,
):  # type: ignore[no-untyped-def]
    return state.reserve(
        organization_id=org,
        key_id=key_id,
        endpoint_id=ep,
        capacity=capacity,
        hold=hold,
        lease=lease,
        rate_limit_rpm=rpm,
        key_credit_limit=key_limit,
        key_period="all",
        key_period_ttl=3600,
        attempt=attempt,
    )


def _settle_free(state: LiveState, reservation, request_id: str):  # type: ignore[no-untyped-def]
    """A successful answer that cost nothing: no event, no trace."""
    return state.settle(
        reservation,
        cost=0,
        vendor_failed=False,
        latency_ms=5,
        event=None,
        request_id=request_id,
        trace=None,
    )


def test_it_never_holds_more_than_the_balance_under_concurrency():
    sync_client().set(credit_key(1), 1_000)

    async def burst(state: LiveState) -> list[Verdict]:
        results = await asyncio.gather(
            *(_reserve(state, hold=70, lease=f"l{i}") for i in range(100))
        )
        return [r.verdict for r in results]

    verdicts = _run(burst)
    assert verdicts.count(Verdict.OK) == 1_000 // 70
    assert set(verdicts) == {Verdict.OK, Verdict.NO_CREDIT}
    assert int(sync_client().get(credit_key(1))) == 1_000 % 70


def test_it_never_gives_out_more_slots_than_the_capacity():
    sync_client().set(credit_key(1), 10**12)

    async def burst(state: LiveState) -> list[Verdict]:
        results = await asyncio.gather(
            *(_reserve(state, capacity=3, lease=f"l{i}") for i in range(20))
        )
        return [r.verdict for r in results]

    verdicts = _run(burst)
    assert verdicts.count(Verdict.OK) == 3 and verdicts.count(Verdict.FULL) == 17
    assert sync_client().hget(live_key(10), live_mod.INFLIGHT) == b"3"


def test_a_slot_comes_back_when_its_lease_expires():
    sync_client().set(credit_key(1), 10**12)

    async def scenario(state: LiveState) -> tuple[Verdict, Verdict]:
        first = await _reserve(state, capacity=1, lease="dead-replica")
        # The replica holding the lease dies: pretend its lease expired a second ago.
        await state.client.zadd(live_mod.slots_key(10), {"dead-replica": time.time() - 1})
        second = await _reserve(state, capacity=1, lease="alive")
        return first.verdict, second.verdict

    assert _run(scenario) == (Verdict.OK, Verdict.OK)


def test_settling_charges_the_cost_and_emits_event_and_trace_together():
    sync_client().set(credit_key(1), 1000)

    async def scenario(state: LiveState) -> None:
        reserved = await _reserve(state, hold=400)
        await state.settle(
            reserved.reservation,
            cost=100,
            vendor_failed=False,
            latency_ms=12,
            event={"rid": "gen-1", "cost": 100},
            request_id="gen-1",
            trace={"id": "gen-1", "organization_id": 1},
        )

    _run(scenario)
    assert int(sync_client().get(credit_key(1))) == 900
    entries = sync_client().xrange("sy:usage")
    assert len(entries) == 1 and b"gen-1" in entries[0][1][b"e"]
    assert b'"organization_id":1' in sync_client().get("sy:trace:gen-1")
    assert sync_client().hget(live_key(10), live_mod.INFLIGHT) == b"0"


def test_settling_averages_the_completion_tokens_per_second_for_nitro():
    sync_client().set(credit_key(1), 10**9)

    async def scenario(state: LiveState) -> None:
        for latency_ms, completion in ((500, 50), (250, 50), (100, 0)):  # 100, 200, unmeasured
            reserved = await _reserve(state, hold=400)
            await state.settle(
                reserved.reservation,
                cost=10,
                vendor_failed=False,
                latency_ms=latency_ms,
                event=None,
                request_id=f"gen-tps-{latency_ms}",
                trace=None,
                completion_tokens=completion,
            )

    _run(scenario)
    numbers = live_mod.read_numbers_now(sync_client(), [10])[10]
    # 100 tokens/s, then an EWMA step towards 200; a request without completion tokens
    # (embeddings) leaves it alone.
    assert numbers.throughput_tps == pytest.approx(100 + live_mod.LATENCY_ALPHA * 100)


def test_releasing_gives_the_whole_hold_back():
    sync_client().set(credit_key(1), 1000)

    async def scenario(state: LiveState) -> None:
        reserved = await _reserve(state, hold=400)
        await state.release(reserved.reservation, vendor_failed=True)

    _run(scenario)
    assert int(sync_client().get(credit_key(1))) == 1000


def test_the_circuit_opens_after_consecutive_failures_then_half_opens_for_one_trial():
    sync_client().set(credit_key(1), 10**12)
    config = LiveConfig(circuit_threshold=3, circuit_cooldown=30)

    async def scenario(state: LiveState) -> list[Verdict]:
        seen = []
        for i in range(3):
            r = await _reserve(state, lease=f"f{i}")
            await state.release(r.reservation, vendor_failed=True)
        seen.append((await _reserve(state, lease="blocked")).verdict)
        # The cooldown passes: open since 31 s ago.
        await state.client.hset(live_key(10), live_mod.CIRCUIT, time.time() - 31)
        trial = await _reserve(state, lease="trial")
        seen.append(trial.verdict)
        seen.append((await _reserve(state, lease="second-trial")).verdict)  # one trial at a time
        await _settle_free(state, trial.reservation, "gen-t")
        seen.append((await _reserve(state, lease="closed-again")).verdict)
        return seen

    assert _run(scenario, config) == [
        Verdict.CIRCUIT_OPEN,
        Verdict.OK,
        Verdict.CIRCUIT_OPEN,
        Verdict.OK,
    ]
    assert sync_client().hget(live_key(10), live_mod.CIRCUIT) is None


def test_a_failed_trial_opens_the_circuit_again():
    sync_client().set(credit_key(1), 10**12)
    sync_client().hset(live_key(10), live_mod.CIRCUIT, time.time() - 100)

    async def scenario(state: LiveState) -> Verdict:
        trial = await _reserve(state, lease="trial")
        assert trial.reservation.half_open_trial
        await state.release(trial.reservation, vendor_failed=True)
        return (await _reserve(state, lease="after")).verdict

    assert _run(scenario, LiveConfig(circuit_cooldown=30)) is Verdict.CIRCUIT_OPEN


def test_a_customer_error_does_not_feed_the_circuit():
    sync_client().set(credit_key(1), 10**12)

    async def scenario(state: LiveState) -> Verdict:
        for i in range(5):
            r = await _reserve(state, lease=f"c{i}")
            await state.release(r.reservation, vendor_failed=None)
        return (await _reserve(state, lease="next")).verdict

    assert _run(scenario, LiveConfig(circuit_threshold=2)) is Verdict.OK


def test_it_limits_requests_per_minute_per_key():
    sync_client().set(credit_key(1), 10**12)

    async def scenario(state: LiveState) -> list:  # type: ignore[type-arg]
        return [await _reserve(state, rpm=3, lease=f"r{i}") for i in range(5)]

    results = _run(scenario)
    assert [r.verdict for r in results] == [Verdict.OK] * 3 + [Verdict.RATE_LIMITED] * 2
    assert [r.reservation.ratelimit_remaining for r in results[:3]] == [2, 1, 0]
    assert results[3].retry_after >= 1


def test_it_stops_a_key_at_its_credit_limit():
    sync_client().set(credit_key(1), 10**12)
    sync_client().set(live_mod.keyspend_key(5, "all"), 0)

    async def scenario(state: LiveState) -> list[Verdict]:
        return [
            (await _reserve(state, hold=40, key_limit=100, lease=f"k{i}")).verdict for i in range(3)
        ]

    assert _run(scenario) == [Verdict.OK, Verdict.OK, Verdict.KEY_LIMIT]


def test_it_asks_for_the_balance_when_redis_does_not_know_it():
    async def scenario(state: LiveState) -> list[Verdict]:
        first = (await _reserve(state)).verdict
        version = await state.credit_version(1)
        await state.init_credit(1, 500, version)
        return [first, (await _reserve(state, hold=400)).verdict]

    assert _run(scenario) == [Verdict.CREDIT_UNKNOWN, Verdict.OK]


def test_a_concurrent_grant_makes_the_balance_load_retry():
    async def scenario(state: LiveState) -> bytes | None:
        version = await state.credit_version(1)
        sync_client().incr(credit_version_key(1))  # a grant committed meanwhile
        await state.init_credit(1, 100, version)
        return await state.client.get(credit_key(1))

    assert _run(scenario) is None


def test_the_live_cache_reads_every_endpoints_numbers_in_one_pipeline():
    sync_client().set(credit_key(1), 10**12)

    async def scenario(state: LiveState) -> dict:  # type: ignore[type-arg]
        r = await _reserve(state, ep=42, capacity=4, lease="x")
        cache = LiveCache(state.client)
        await cache.refresh()
        numbers = cache.numbers[42]
        await state.settle(
            r.reservation,
            cost=0,
            vendor_failed=False,
            latency_ms=80,
            event=None,
            request_id="g",
            trace=None,
        )
        await cache.refresh()
        return {"during": numbers, "after": cache.numbers[42]}

    seen = _run(scenario)
    assert seen["during"].inflight == 1 and seen["during"].utilisation > 0
    assert seen["after"].inflight == 0 and seen["after"].latency_ms == pytest.approx(80)
    assert seen["after"].requests == 1


def test_retries_in_flight_stay_within_the_shared_budget():
    sync_client().set(credit_key(1), 10**12)
    config = LiveConfig(retry_budget_ratio=0.2, retry_budget_min=3)

    async def scenario(state: LiveState) -> list[Verdict]:
        # 20 requests in flight (first attempts)...
        firsts = [
            (await _reserve(state, ep=10, capacity=1000, hold=1, lease=f"first-{i}")).reservation
            for i in range(20)
        ]
        # ...then 8 of them fail and want a retry, each after giving its first attempt back
        # (as the proxy does): at most max(3, 0.2 * 20) = 4 retries may run at once.
        results = []
        for i in range(8):
            first = firsts[i]
            assert first is not None
            await state.release(first, vendor_failed=None)
            r = await _reserve(state, ep=11, capacity=1000, hold=1, lease=f"retry-{i}", attempt=1)
            results.append(r.verdict)
        return results

    verdicts = _run(scenario, config)
    assert verdicts == [Verdict.OK] * 4 + [Verdict.RETRY_BUDGET] * 4


def test_a_finished_retry_gives_its_place_in_the_retry_budget_back():
    sync_client().set(credit_key(1), 10**12)
    config = LiveConfig(retry_budget_ratio=0.0, retry_budget_min=1)

    async def scenario(state: LiveState) -> list[Verdict]:
        first = await _reserve(state, lease="a", attempt=1)
        blocked = await _reserve(state, lease="b", attempt=1)  # the one place is taken
        assert first.reservation is not None and first.reservation.retry
        await _settle_free(state, first.reservation, "req-a")
        after_settle = await _reserve(state, lease="c", attempt=1)
        assert after_settle.reservation is not None
        await state.release(after_settle.reservation, vendor_failed=None)
        after_release = await _reserve(state, lease="d", attempt=1)
        return [first.verdict, blocked.verdict, after_settle.verdict, after_release.verdict]

    assert _run(scenario, config) == [
        Verdict.OK,
        Verdict.RETRY_BUDGET,
        Verdict.OK,
        Verdict.OK,
    ]


def _reserve_leg(state: LiveState, *, hold: int, lease: str, budget: str):  # type: ignore[no-untyped-def]
    return state.reserve(
        organization_id=1,
        key_id=5,
        endpoint_id=10,
        capacity=100,
        hold=hold,
        lease=lease,
        rate_limit_rpm=None,
        key_credit_limit=None,
        key_period="all",
        key_period_ttl=3600,
        budget_lease=budget,
    )


def test_an_orchestration_budget_is_held_and_its_legs_draw_on_it_first():
    sync_client().set(credit_key(1), 1_000)

    async def scenario(state: LiveState):  # type: ignore[no-untyped-def]
        opened = await state.budget_open(1, 600, "b1", ttl=60)
        after_open = int(sync_client().get(credit_key(1)))
        leg = await _reserve_leg(state, hold=250, lease="leg1", budget="b1")
        left = await state.budget_remaining("b1")
        # A leg bigger than what is left of the budget takes the rest from the credit.
        big = await _reserve_leg(state, hold=500, lease="leg2", budget="b1")
        return opened, after_open, leg.verdict, left, big.verdict

    opened, after_open, leg, left, big = _run(scenario)
    assert opened is Verdict.OK
    assert after_open == 400
    assert leg is Verdict.OK and left == 350
    assert big is Verdict.OK
    # 1_000 - 250 - 500 held by legs, nothing left in the budget.
    assert int(sync_client().get(credit_key(1))) == 250
    assert _run(lambda s: s.budget_remaining("b1")) == 0


def test_a_leg_beyond_budget_and_credit_is_refused_and_takes_nothing():
    sync_client().set(credit_key(1), 1_000)

    async def scenario(state: LiveState):  # type: ignore[no-untyped-def]
        await state.budget_open(1, 600, "b1", ttl=60)
        refused = await _reserve_leg(state, hold=1_001, lease="leg1", budget="b1")
        return refused.verdict, await state.budget_remaining("b1")

    verdict, left = _run(scenario)
    assert verdict is Verdict.NO_CREDIT
    assert left == 600
    assert int(sync_client().get(credit_key(1))) == 400


def test_a_budget_beyond_the_balance_is_refused_and_closing_returns_the_rest_once():
    sync_client().set(credit_key(1), 500)

    async def scenario(state: LiveState):  # type: ignore[no-untyped-def]
        refused = await state.budget_open(1, 501, "big", ttl=60)
        ok = await state.budget_open(1, 300, "b1", ttl=60)
        await _reserve_leg(state, hold=100, lease="leg1", budget="b1")
        first = await state.budget_close("b1")
        second = await state.budget_close("b1")
        return refused, ok, first, second

    refused, ok, first, second = _run(scenario)
    assert (refused, ok) == (Verdict.NO_CREDIT, Verdict.OK)
    assert (first, second) == (200, 0)
    assert int(sync_client().get(credit_key(1))) == 400  # only the leg's hold is out


def test_the_budget_of_a_gateway_that_died_comes_back_with_the_sweep():
    sync_client().set(credit_key(1), 500)

    async def scenario(state: LiveState):  # type: ignore[no-untyped-def]
        await state.budget_open(1, 300, "b1", ttl=-1)  # already expired
        return await state.sweep_holds()

    assert _run(scenario) == 1
    assert int(sync_client().get(credit_key(1))) == 500


def test_a_budget_for_an_unknown_balance_asks_for_it():
    assert _run(lambda s: s.budget_open(1, 10, "b1", ttl=60)) is Verdict.CREDIT_UNKNOWN


def test_the_live_cache_leaves_out_numbers_it_cannot_trust():
    """A hash with a value that is not a finite number (or a field that is not an endpoint
    id) loses only that field; the others are read as usual."""
    client = sync_client()
    client.hset(live_key(7), mapping={"u": "0.25", "l": "120.5", "r": "3"})
    client.hset(live_key(8), mapping={"u": "nan", "l": "80", "r": "true"})
    client.hset(live_key(9), mapping={"u": "inf", "l": "1e3", "r": "5"})
    client.hset(live_key("oops"), mapping={"u": "0.5"})
    client.zadd(live_mod.TOUCHED, {"7": 1, "8": 1, "9": 1, "oops": 1})

    async def scenario(state: LiveState) -> dict:  # type: ignore[type-arg]
        cache = LiveCache(state.client)
        await cache.refresh()
        return cache.numbers

    numbers = _run(scenario)
    assert set(numbers) == {7, 8, 9}
    assert (numbers[7].utilisation, numbers[7].latency_ms, numbers[7].requests) == (0.25, 120.5, 3)
    assert (numbers[8].utilisation, numbers[8].latency_ms, numbers[8].requests) == (0.0, 80, 0)
    assert (numbers[9].utilisation, numbers[9].latency_ms, numbers[9].requests) == (0.0, 1000.0, 5)
    assert isinstance(numbers[7].requests, int) and isinstance(numbers[9].latency_ms, float)


def test_the_live_cache_reads_ten_thousand_endpoints():
    client = sync_client()
    ids = range(1, 10_001)
    pipe = client.pipeline(transaction=False)
    for i in ids:
        pipe.hset(live_key(i), mapping={"n": i % 5, "u": i / 20_000, "ok": 1})
    pipe.zadd(live_mod.TOUCHED, {str(i): 1 for i in ids})
    pipe.execute()

    async def scenario(state: LiveState) -> dict:  # type: ignore[type-arg]
        cache = LiveCache(state.client)
        await cache.refresh()
        return cache.numbers

    numbers = _run(scenario)
    assert len(numbers) == 10_000
    assert numbers[9_999].inflight == 4 and numbers[9_999].utilisation == 9_999 / 20_000
    assert numbers[10_000].success_ratio == 1 and numbers[10_000].latency_ms is None


def test_a_refresh_reads_only_the_endpoints_the_scripts_marked_as_changed():
    """After the first (full) read, a refresh reads the endpoints that reserve, release and
    settle touched since the last one; a value written behind the scripts' back waits for
    the next full read."""
    sync_client().set(credit_key(1), 10**12)

    async def scenario(state: LiveState) -> dict:  # type: ignore[type-arg]
        idle = await _reserve(state, ep=11, lease="idle")
        await _settle_free(state, idle.reservation, "g-idle")
        cache = LiveCache(state.client, skew=0)  # the default re-reads the last 0.5 s too
        seen = {"first": await cache.refresh()}
        await state.client.hset(live_key(11), live_mod.INFLIGHT, 7)  # not marked again
        busy = await _reserve(state, ep=12, lease="busy")
        failed = await _reserve(state, ep=13, lease="failed")
        await state.release(failed.reservation, vendor_failed=True, retry_until=time.time() + 60)
        seen["second"] = await cache.refresh()
        seen["busy"], seen["failed"] = cache.numbers[12], cache.numbers[13]
        seen["unmarked_before"] = cache.numbers[11].inflight
        await state.settle(
            busy.reservation,
            cost=0,
            vendor_failed=False,
            latency_ms=40,
            event=None,
            request_id="g-busy",
            trace=None,
        )
        seen["third"] = await cache.refresh()
        seen["settled"] = cache.numbers[12]
        seen["quiet"] = await cache.refresh()
        seen["full"] = await cache.refresh(full=True)
        seen["unmarked_after"] = cache.numbers[11].inflight
        margin = LiveCache(state.client, skew=3600)  # for clocks up to an hour apart
        await margin.refresh()
        seen["margin"] = await margin.refresh()
        return seen

    seen = _run(scenario)
    assert seen["first"] is None  # the first read is a full one
    assert seen["second"] == {12, 13}  # 11 was not marked again
    assert seen["busy"].inflight == 1 and seen["busy"].utilisation > 0
    assert seen["failed"].inflight == 0 and seen["failed"].cooldown_until > time.time()
    assert seen["failed"].success_ratio < 1
    assert seen["unmarked_before"] == 0
    assert seen["third"] == {12}
    assert seen["settled"].inflight == 0 and seen["settled"].requests == 1
    assert seen["settled"].latency_ms == pytest.approx(40)
    assert seen["quiet"] == frozenset()
    assert seen["full"] is None and seen["unmarked_after"] == 7
    assert seen["margin"] == {11, 12, 13}


def test_a_refresh_reads_everything_when_too_many_endpoints_changed_or_it_is_time():
    sync_client().set(credit_key(1), 10**12)

    async def scenario(state: LiveState) -> list:  # type: ignore[type-arg]
        cache = LiveCache(state.client, skew=0)
        cache.MAX_CHANGED = 3
        reads = [await cache.refresh()]
        for ep in (21, 22):
            await _reserve(state, ep=ep, lease=f"l{ep}")
        reads.append(await cache.refresh())
        for ep in (23, 24, 25):
            await _reserve(state, ep=ep, lease=f"l{ep}")
        reads.append(await cache.refresh())  # three changed: read everything
        reads.append(sorted(cache.numbers))
        every_time = LiveCache(state.client, full_every=0)
        await every_time.refresh()
        reads.append(await every_time.refresh())
        return reads

    first, two, many, ids, full_every_time = _run(scenario)
    assert (first, two, many, full_every_time) == (None, {21, 22}, None, None)
    assert ids == [21, 22, 23, 24, 25]


def test_the_sweep_gives_back_the_hold_and_the_spend_of_a_request_whose_gateway_died():
    """The hold's member says what to give back: the credit, the key's and the
    organisation's spend; once, whichever replicas sweep."""
    sync_client().set(credit_key(1), 1_000)
    sync_client().set(live_mod.keyspend_key(5, "all"), 0)
    sync_client().set(live_mod.orgspend_key(1, "2026-11"), 0)

    async def scenario(state: LiveState) -> tuple[int, int]:
        result = await state.reserve(
            organization_id=1,
            key_id=5,
            endpoint_id=10,
            capacity=10,
            hold=300,
            lease="gen-dead:1",
            rate_limit_rpm=None,
            key_credit_limit=10_000,
            key_period="all",
            key_period_ttl=3600,
            org_budget=10_000,
            org_period="2026-11",
            org_period_ttl=3600,
        )
        assert result.reservation is not None
        held = [
            int(sync_client().get(key))
            for key in (credit_key(1), "sy:keyspend:5:all", "sy:orgspend:1:2026-11")
        ]
        assert held == [700, 300, 300]
        first = await state.sweep_holds()  # its lease expired at once (lease_ttl=-1)
        return first, await state.sweep_holds()

    assert _run(scenario, LiveConfig(lease_ttl=-1)) == (1, 0)
    assert [
        int(sync_client().get(key))
        for key in (credit_key(1), "sy:keyspend:5:all", "sy:orgspend:1:2026-11")
    ] == [1_000, 0, 0]
    assert sync_client().zcard(live_mod.HOLDS) == 0
    # ...and its slot, where the routers read the endpoint's in-flight number.
    assert sync_client().zcard(live_mod.slots_key(10)) == 0
    assert sync_client().hget(live_key(10), live_mod.INFLIGHT) == b"0"


def test_the_sweep_gives_back_a_hold_written_by_an_older_gateway():
    """Before holds carried their amounts, a hold was its lease, its amounts in sy:holdinfo:
    after an upgrade, the hold of a request such a gateway did not finish still comes back."""
    sync_client().set(credit_key(1), 700)
    sync_client().set(live_mod.keyspend_key(5, "all"), 300)
    sync_client().zadd(live_mod.HOLDS, {"gen-old:1": time.time() - 1})
    sync_client().hset(live_mod.HOLD_INFO, "gen-old:1", f"{credit_key(1)}|300|sy:keyspend:5:all|")

    async def scenario(state: LiveState) -> int:
        return await state.sweep_holds()

    assert _run(scenario) == 1
    assert int(sync_client().get(credit_key(1))) == 1_000
    assert int(sync_client().get("sy:keyspend:5:all")) == 0
    assert sync_client().hlen(live_mod.HOLD_INFO) == 0


def test_the_sweep_marks_the_in_flight_counts_it_corrects():
    """A replica died holding a slot: the sweep recounts the endpoint's in-flight number,
    and the other replicas' next refresh sees it without a full read."""
    sync_client().set(credit_key(1), 10**12)

    async def scenario(state: LiveState) -> tuple:  # type: ignore[type-arg]
        dead = (await _reserve(state, ep=31, lease="dead-replica")).reservation
        cache = LiveCache(state.client, skew=0)
        await cache.refresh()
        before = cache.numbers[31].inflight
        await state.client.zadd(live_mod.slots_key(31), {"dead-replica": time.time() - 1})
        await state.client.zadd(live_mod.HOLDS, {dead.held: time.time() - 1})
        await state.sweep_holds()
        return before, await cache.refresh(), cache.numbers[31].inflight

    assert _run(scenario) == (1, {31}, 0)


def test_a_success_closes_a_circuit_opened_without_a_failure_count():
    """The settle script closes a circuit only where it counted failures, or on the trial
    of a half-open one: a circuit opened some other way still closes on its trial."""
    sync_client().set(credit_key(1), 10**12)
    sync_client().hset(live_key(10), live_mod.CIRCUIT, time.time() - 100)  # no failure count

    async def scenario(state: LiveState) -> tuple[bool, Verdict]:
        trial = await _reserve(state, lease="trial")
        await _settle_free(state, trial.reservation, "g-trial")
        return trial.reservation.half_open_trial, (await _reserve(state, lease="next")).verdict

    assert _run(scenario, LiveConfig(circuit_cooldown=30)) == (True, Verdict.OK)
    assert sync_client().hget(live_key(10), live_mod.CIRCUIT) is None


def test_a_trace_json_cannot_carry_becomes_a_note_not_a_lost_settlement():
    from routing.live import trace_json

    assert orjson.loads(trace_json({"outcome": "success", "cost_nanos": 5})) == {
        "outcome": "success",
        "cost_nanos": 5,
    }
    note = orjson.loads(trace_json({"outcome": "success", "policy": {"max": 2**70}}))
    assert note["outcome"] == "success"
    assert "could not be serialised" in note["error"]
