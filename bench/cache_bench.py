"""Response cache benchmark: hit latency against a vendor call, and the share of cost saved
on a repeated workload.

    .venv/bin/python -m marketplace.devenv --data-dir var/bench exec -- \\
        .venv/bin/python -m bench.cache_bench [--distinct 40] [--repeats 10] [--delay-ms 50]

In one process: a fake vendor (``tests.support.upstream.FaultUpstream``, answering after
``--delay-ms``), the whole ASGI application behind uvicorn on loopback (as the tests run it),
a customer with credit, a key and one endpoint created through the services. Then, one
request at a time (closed loop, concurrency 1):

1. **exact**: ``--distinct`` different prompts, each sent ``--repeats`` times in a shuffled
   order with ``"cache": {"ttl": 3600}`` and ``temperature: 0``; latency per request split
   by the ``x-switchyard-cache`` header (miss = a vendor call, hit = from Redis).
2. **semantic**: the same prompts as questions, then a paraphrase of each, with
   ``"cache": {"ttl": 3600, "semantic": 0.85}``: hit latency includes embedding the prompt
   (MiniLM on a worker thread), miss latency with a non-empty partition too.

The usage events are ingested afterwards; the cost saved is read from the usage records
(``cache_saved`` of hits over what the workload would have cost without the cache).
Writes ``bench/results/cache-<timestamp>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("OUTBOUND_ALLOWED_NETWORKS", "127.0.0.0/8")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"

COUNTRIES = [
    *("France", "Germany", "Spain", "Italy", "Portugal", "Norway", "Sweden", "Finland"),
    *("Poland", "Austria", "Greece", "Ireland", "Denmark", "Belgium", "Hungary", "Croatia"),
    *("Japan", "Kenya", "Peru", "Chile", "Canada", "Mexico", "Egypt", "Vietnam"),
    *("Iceland", "Estonia", "Latvia", "Morocco", "Nepal", "Bolivia", "Cuba", "Ghana"),
    *("Jordan", "Oman", "Laos", "Malta", "Panama", "Qatar", "Serbia", "Tunisia"),
]


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": round(_percentile(values, 0.5), 2),
        "p95_ms": round(_percentile(values, 0.95), 2),
        "mean_ms": round(statistics.fmean(values), 2) if values else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--distinct", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    args = parser.parse_args()

    import django

    django.setup()
    import httpx
    from django.core.management import call_command

    from billing.models import UsageRecord
    from billing.money import usd_to_nanos
    from billing.services import credit_grant
    from billing.usage import usage_ingest_batch
    from marketplace.asgi import build_application
    from marketplace.services import api_key_create, organization_create
    from tests.conftest import start_asgi_server
    from tests.support.upstream import FaultUpstream
    from vendors.services import endpoint_approve, endpoint_create, vendor_approve, vendor_create

    call_command("migrate", interactive=False, verbosity=0)
    tag = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    org = organization_create(name=f"Cache bench {tag}", slug=f"cache-bench-{tag}")
    credit_grant(organization=org, amount=usd_to_nanos("1000"), reason="benchmark credit")
    key = api_key_create(organization=org, name="cache bench").plaintext
    vendor = vendor_approve(vendor=vendor_create(name=f"Cache vendor {tag}", slug=f"cv-{tag}"))
    distinct = min(args.distinct, len(COUNTRIES))
    results: dict[str, Any] = {"args": vars(args), "started": tag}

    with FaultUpstream(delay_ms=args.delay_ms) as upstream:
        endpoint = endpoint_approve(
            endpoint=endpoint_create(
                vendor=vendor,
                slug="small",
                base_url=upstream.base_url,
                upstream_model="fake-small",
                price_input=usd_to_nanos("0.5"),
                price_output=usd_to_nanos("1.5"),
                capacity=1000,
                tags=("chat",),
            )
        )
        model = f"{vendor.slug}/{endpoint.slug}"
        server = start_asgi_server(build_application())
        try:
            with httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
            ) as client:
                answers: dict[str, dict[str, Any]] = {}

                def ask(text: str, cache: dict[str, Any]) -> tuple[str, float, int, int]:
                    body = {
                        "model": model,
                        "messages": [{"role": "user", "content": text}],
                        "max_tokens": 32,
                        "temperature": 0,
                        "cache": cache,
                    }
                    t0 = time.perf_counter()
                    response = client.post("/v1/chat/completions", json=body)
                    elapsed = (time.perf_counter() - t0) * 1000
                    response.raise_for_status()
                    answers[text] = response.json()
                    usage = answers[text]["usage"]
                    saved = (usage.get("cache") or {}).get("saved_nanos", 0)
                    status = response.headers["x-switchyard-cache"]
                    return status, elapsed, usage["cost_nanos"], saved

                # warm up: key cache, routing table, connection pools
                ask("warm up the gateway", {"ttl": 1})

                exact_prompts = [
                    f"List three facts about {c}, one line each." for c in COUNTRIES[:distinct]
                ]
                workload = [p for p in exact_prompts for _ in range(args.repeats)]
                random.Random(7).shuffle(workload)
                latency: dict[str, list[float]] = {"miss": [], "hit": []}
                paid = saved = 0
                for prompt in workload:
                    status, ms, cost, hit_saved = ask(prompt, {"ttl": 3600})
                    latency[status].append(ms)
                    paid += cost
                    saved += hit_saved
                results["exact"] = {
                    "requests": len(workload),
                    "miss": _summary(latency["miss"]),
                    "hit": _summary(latency["hit"]),
                    "paid_nanos": paid,
                    "saved_nanos": saved,
                    "saved_share": round(saved / (paid + saved), 4) if paid + saved else 0,
                }

                semantic = {"ttl": 3600, "semantic": 0.85}
                sem: dict[str, list[float]] = {"miss": [], "hit": []}
                for country in COUNTRIES[:distinct]:
                    status, ms, _, _ = ask(f"What is the capital of {country}?", semantic)
                    sem[status].append(ms)
                time.sleep(1.0)  # semantic entries are stored after the answer went out
                paraphrase_hits = wrong_hits = 0
                for country in COUNTRIES[:distinct]:
                    paraphrase = f"what's the capital city of {country}"
                    status, ms, _, _ = ask(paraphrase, semantic)
                    sem[status].append(ms)
                    paraphrase_hits += status == "hit"
                    if status == "hit":
                        source = answers[paraphrase]["usage"]["cache"]["source_request_id"]
                        question = answers[f"What is the capital of {country}?"]["id"]
                        wrong_hits += source != question
                results["semantic"] = {
                    "miss": _summary(sem["miss"]),
                    "hit": _summary(sem["hit"]),
                    "paraphrases": distinct,
                    "paraphrase_hits": paraphrase_hits,
                    "hits_on_another_question": wrong_hits,
                }
                results["vendor_calls"] = len(upstream.requests("/v1/chat/completions"))
        finally:
            server.server.should_exit = True
            server.thread.join(timeout=10)

    while usage_ingest_batch(count=1000).read:
        pass
    records = UsageRecord.objects.filter(organization=org)
    charged = sum(r.cost for r in records)
    cache_saved = sum(r.cache_saved for r in records)
    results["ledger"] = {
        "records": records.count(),
        "hits": records.exclude(cache="").count(),
        "charged_nanos": charged,
        "cache_saved_nanos": cache_saved,
        "saved_share": round(cache_saved / (charged + cache_saved), 4) if charged else 0,
    }

    import io

    from django.core.management.base import CommandError

    report = io.StringIO()
    try:
        call_command("reconcile", "--skip-stripe", stdout=report)
        results["reconcile"] = "clean" if "no mismatch" in report.getvalue() else "see output"
    except CommandError:
        results["reconcile"] = "MISMATCH: " + report.getvalue()[-500:]

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"cache-{tag}.json"
    out.write_text(json.dumps(results, indent=2))
    exact, sem_result = results["exact"], results["semantic"]
    print(f"{'':28}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}")
    for label, row in (
        ("exact miss (vendor call)", exact["miss"]),
        ("exact hit", exact["hit"]),
        ("semantic miss", sem_result["miss"]),
        ("semantic hit", sem_result["hit"]),
    ):
        print(f"{label:28}{row['n']:>6}{row['p50_ms']:>10}{row['p95_ms']:>10}")
    print(
        f"exact workload: {exact['requests']} requests, cost saved "
        f"{exact['saved_share']:.1%}; paraphrase hits {sem_result['paraphrase_hits']}/"
        f"{sem_result['paraphrases']} ({sem_result['hits_on_another_question']} on another "
        f"question); vendor calls {results['vendor_calls']}"
    )
    print(f"ledger: {results['ledger']}; reconcile: {results['reconcile']}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
