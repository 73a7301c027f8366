"""A fake Stripe API: a real HTTP server on loopback that speaks Stripe's wire format.

Billing talks to Stripe through the official ``stripe`` SDK; the honest way to test that is
to let the SDK make real HTTP requests (form-encoded bodies, ``Idempotency-Key`` headers,
Stripe-shaped JSON and errors) against a server that answers like Stripe. Only the
endpoints Switchyard calls are implemented; anything else is a Stripe-shaped 404.

Endpoints
---------
* ``POST/GET /v1/checkout/sessions[/<id>]`` (``cs_test_...``; ``payment_status`` starts
  ``unpaid``; the test moves it with :meth:`FakeStripe.complete_checkout` /
  :meth:`FakeStripe.expire_checkout`). The session's ``url``, ``GET /checkout/pay/<id>``,
  is a tiny stand-in for the hosted Checkout page (for browser tests): the amount and
  links to the success and cancel URLs.
* ``POST/GET /v1/accounts[/<id>]`` (Express, ``acct_...``; :meth:`FakeStripe.update_account`
  plays the vendor finishing onboarding), ``POST /v1/account_links``. The link's ``url``,
  ``GET /connect/setup/e/<account>/<code>``, is a stand-in for Stripe's hosted onboarding
  (for browser tests): single-use like Stripe's (a second visit, or a visit after
  ``expires_at``, is redirected to the link's ``refresh_url``); its "Agree and submit"
  finishes onboarding (:meth:`FakeStripe.update_account`), sends the signed Connect
  ``account.updated`` event to :meth:`FakeStripe.set_connect_webhook_url`'s URL, as
  Stripe does, and redirects to the link's ``return_url``; "Return without finishing"
  goes to ``return_url`` with nothing changed.
* ``POST /v1/transfers``, ``GET /v1/transfers[/<id>]``, ``POST /v1/transfers/<id>/reversals``.
  Transfers draw on the platform's available balance (:meth:`FakeStripe.set_available_balance`);
  when it is short the answer is Stripe's ``balance_insufficient`` error. The destination
  must exist and have the ``transfers`` capability active, as on Stripe.
* ``POST/GET /v1/customers[/<id>]``; ``POST /v1/invoices``, ``GET /v1/invoices/<id>``,
  ``POST /v1/invoices/<id>/finalize``, ``POST /v1/invoices/<id>/send``,
  ``POST /v1/invoiceitems`` (:meth:`FakeStripe.pay_invoice` /
  :meth:`FakeStripe.fail_invoice_payment` play the customer).

Behaviour shared by every endpoint
----------------------------------
* ``Authorization: Bearer <api key>`` is required (401 otherwise).
* Bodies and query strings are parsed from Stripe's form encoding
  (``metadata[k]=v``, ``line_items[0][price_data][unit_amount]=500``).
* ``Idempotency-Key`` (per ``Stripe-Account``): the same key with the same method, path and
  parameters replays the first answer, errors included (header ``Idempotent-Replayed``);
  the same key with different parameters is a 400 ``idempotency_error``, like Stripe.
* Every request is recorded (:attr:`FakeStripe.requests`, :meth:`FakeStripe.calls`).

Webhooks: :meth:`FakeStripe.event` builds an event around the current state of an object and
:meth:`FakeStripe.signed` serialises and signs it with Stripe's scheme
(``Stripe-Signature: t=<ts>,v1=HMAC-SHA256(secret, "<ts>.<payload>")``);
:meth:`FakeStripe.deliver` posts it with Django's test client, :meth:`FakeStripe.send`
over real HTTP to a running server.

The server runs in a background thread with its own event loop (like
``tests/support/upstream.py``); the state is shared with the test under a lock, so tests
call helpers directly instead of a control API.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import hashlib
import hmac
import html
import json
import re
import secrets
import string
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import pytest
from aiohttp import web

API_KEY = "sk_test_switchyard_fake"
WEBHOOK_SECRET = "whsec_test_platform_secret"
CONNECT_WEBHOOK_SECRET = "whsec_test_connect_secret"
API_VERSION = "2026-10-28.endive"

_ALPHABET = string.ascii_letters + string.digits


def _rand(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def _new_id(prefix: str) -> str:
    lengths = {"cs_test": 58, "acct": 16, "cus": 14}
    if prefix == "cs_test":
        return f"cs_test_a1{_rand(lengths['cs_test'])}"
    if prefix in lengths:
        return f"{prefix}_1{_rand(lengths[prefix])}"
    return f"{prefix}_1{_rand(24)}"


# --- Stripe's form encoding --------------------------------------------------------------

_KEY_PART = re.compile(r"\[([^\]]*)\]")


def _listify(value: Any) -> Any:
    if isinstance(value, dict):
        converted = {k: _listify(v) for k, v in value.items()}
        if converted and all(k.isdigit() for k in converted):
            return [converted[k] for k in sorted(converted, key=int)]
        return converted
    return value


def parse_form(body: str) -> dict[str, Any]:
    """Stripe's ``a[b][0][c]=v`` form encoding to nested dicts and lists (values stay strings)."""
    result: dict[str, Any] = {}
    for raw_key, value in parse_qsl(body, keep_blank_values=True):
        head = raw_key.split("[", 1)[0]
        parts = [head, *_KEY_PART.findall(raw_key[len(head) :])]
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _listify(result)


class StripeFailure(Exception):
    """An error answer in Stripe's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"message": message, "type": type_}
        if code:
            self.body["code"] = code
            self.body["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
        if param:
            self.body["param"] = param


def _missing(kind: str, object_id: str, param: str = "id") -> StripeFailure:
    return StripeFailure(
        404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param
    )


def _int_param(params: dict[str, Any], name: str) -> int:
    try:
        return int(params[name])
    except KeyError:
        raise StripeFailure(400, f"Missing required param: {name}.", param=name) from None
    except ValueError:
        raise StripeFailure(400, f"Invalid integer: {params[name]}", param=name) from None


def _required(params: dict[str, Any], name: str) -> Any:
    if name not in params or params[name] == "":
        raise StripeFailure(400, f"Missing required param: {name}.", param=name)
    return params[name]


def _bool(value: Any) -> bool:
    return str(value).lower() == "true"


def _previous_attributes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What changed, with the old values, as Stripe's ``data.previous_attributes`` (changed
    keys only, nested objects down to their changed keys)."""
    previous: dict[str, Any] = {}
    for key, old in before.items():
        new = after.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            previous[key] = _previous_attributes(old, new)
        else:
            previous[key] = copy.deepcopy(old)
    return previous


@dataclass
class RecordedRequest:
    method: str
    path: str
    params: dict[str, Any]
    idempotency_key: str | None
    stripe_account: str | None
    status: int = 0
    replayed: bool = False


@dataclass
class _Stored:
    fingerprint: tuple[str, str, str]
    status: int
    body: dict[str, Any]


@dataclass
class _State:
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotency: dict[tuple[str, str], _Stored] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    available_balance_cents: int | None = None  # None: unlimited
    # Account Links by the code in their URL: account, URLs, expiry, visited, submitted.
    account_links: dict[str, dict[str, Any]] = field(default_factory=dict)
    connect_webhook_url: str | None = None
    # (event id, HTTP status; 0 when the endpoint could not be reached) per delivery.
    webhook_deliveries: list[tuple[str, int]] = field(default_factory=list)


class FakeStripe:
    """The fake Stripe API server; see the module docstring. Use as a context manager."""

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        webhook_secret: str = WEBHOOK_SECRET,
        connect_webhook_secret: str = CONNECT_WEBHOOK_SECRET,
    ) -> None:
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.connect_webhook_secret = connect_webhook_secret
        self._lock = threading.RLock()
        self._state = _State()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port: int | None = None
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., dict[str, Any]]]] = [
            ("POST", re.compile(r"^/v1/checkout/sessions$"), self._checkout_create),
            ("GET", re.compile(r"^/v1/checkout/sessions/([^/]+)$"), self._checkout_get),
            ("POST", re.compile(r"^/v1/accounts$"), self._account_create),
            ("GET", re.compile(r"^/v1/accounts/([^/]+)$"), self._account_get),
            ("POST", re.compile(r"^/v1/account_links$"), self._account_link_create),
            ("POST", re.compile(r"^/v1/transfers$"), self._transfer_create),
            ("GET", re.compile(r"^/v1/transfers$"), self._transfer_list),
            ("GET", re.compile(r"^/v1/transfers/([^/]+)$"), self._transfer_get),
            ("POST", re.compile(r"^/v1/transfers/([^/]+)/reversals$"), self._reversal_create),
            ("POST", re.compile(r"^/v1/customers$"), self._customer_create),
            ("GET", re.compile(r"^/v1/customers/([^/]+)$"), self._customer_get),
            ("POST", re.compile(r"^/v1/invoices$"), self._invoice_create),
            ("GET", re.compile(r"^/v1/invoices/([^/]+)$"), self._invoice_get),
            ("POST", re.compile(r"^/v1/invoices/([^/]+)/finalize$"), self._invoice_finalize),
            ("POST", re.compile(r"^/v1/invoices/([^/]+)/send$"), self._invoice_send),
            ("POST", re.compile(r"^/v1/invoiceitems$"), self._invoice_item_create),
        ]

    # --- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("fake Stripe is not running")
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> FakeStripe:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fake-stripe", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("fake Stripe did not start in time")
        if self._error is not None:
            raise RuntimeError("fake Stripe failed to start") from self._error
        return self

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/checkout/pay/{session_id}", self._hosted_checkout)
        app.router.add_get("/connect/setup/e/{account_id}/{code}", self._hosted_onboarding)
        app.router.add_post(
            "/connect/setup/e/{account_id}/{code}/submit", self._hosted_onboarding_submit
        )
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, runner = self._thread, self._loop, self._runner
        self._thread = None
        if thread is None or loop is None:
            return
        if runner is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def __enter__(self) -> FakeStripe:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget every object, idempotency key and recorded request."""
        with self._lock:
            self._state = _State()

    # --- inspection ------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._state.requests)

    def calls(self, method: str | None = None, path: str | None = None) -> list[RecordedRequest]:
        """Recorded requests, filtered by method and path (a regular expression, full match)."""
        pattern = re.compile(path) if path else None
        return [
            r
            for r in self.requests
            if (method is None or r.method == method)
            and (pattern is None or pattern.fullmatch(r.path))
        ]

    def get(self, object_id: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._state.objects[object_id])

    def objects(self, kind: str) -> list[dict[str, Any]]:
        """Every stored object whose ``object`` is ``kind`` (``"transfer"``...), oldest first."""
        with self._lock:
            return [copy.deepcopy(o) for o in self._state.objects.values() if o["object"] == kind]

    # --- the test plays the customer, the vendor and Stripe's balance ---------------------

    def complete_checkout(self, session_id: str, *, payment_status: str = "paid") -> dict[str, Any]:
        """The customer finishes Checkout (``payment_status`` stays unpaid for async methods)."""
        with self._lock:
            session = self._obj("checkout.session", session_id)
            session["status"] = "complete"
            session["payment_status"] = payment_status
            session["payment_intent"] = session["payment_intent"] or _new_id("pi")
            session["customer_details"] = {"email": "payer@example.test", "name": "Payer"}
            return copy.deepcopy(session)

    def settle_async_payment(self, session_id: str, *, succeeded: bool = True) -> dict[str, Any]:
        """A delayed payment method (bank debit) succeeds or fails after Checkout completed."""
        with self._lock:
            session = self._obj("checkout.session", session_id)
            session["payment_status"] = "paid" if succeeded else "unpaid"
            return copy.deepcopy(session)

    def expire_checkout(self, session_id: str) -> dict[str, Any]:
        with self._lock:
            session = self._obj("checkout.session", session_id)
            session["status"] = "expired"
            session["url"] = None
            return copy.deepcopy(session)

    def update_account(
        self,
        account_id: str,
        *,
        payouts_enabled: bool = True,
        details_submitted: bool = True,
        charges_enabled: bool | None = None,
    ) -> dict[str, Any]:
        """The vendor completes (or loses) onboarding; the transfers capability follows."""
        with self._lock:
            account = self._obj("account", account_id)
            account["payouts_enabled"] = payouts_enabled
            account["details_submitted"] = details_submitted
            account["charges_enabled"] = (
                payouts_enabled if charges_enabled is None else charges_enabled
            )
            account["capabilities"]["transfers"] = "active" if payouts_enabled else "inactive"
            due = [] if details_submitted else ["external_account", "tos_acceptance.date"]
            account["requirements"]["currently_due"] = due
            account["requirements"]["eventually_due"] = due
            account["requirements"]["disabled_reason"] = (
                None if payouts_enabled else "requirements.past_due"
            )
            return copy.deepcopy(account)

    def set_connect_webhook_url(self, url: str | None) -> None:
        """Where the hosted onboarding page delivers ``account.updated`` (the Connect webhook
        endpoint configured in Stripe's dashboard); None: nowhere."""
        with self._lock:
            self._state.connect_webhook_url = url

    @property
    def webhook_deliveries(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._state.webhook_deliveries)

    def set_available_balance(self, cents: int | None) -> None:
        """The platform's available balance for transfers (None: unlimited)."""
        with self._lock:
            self._state.available_balance_cents = cents

    def pay_invoice(self, invoice_id: str) -> dict[str, Any]:
        with self._lock:
            invoice = self._obj("invoice", invoice_id)
            if invoice["status"] != "open":
                raise ValueError(f"invoice {invoice_id} is {invoice['status']}, not open")
            now = int(time.time())
            invoice.update(
                status="paid",
                amount_paid=invoice["amount_due"],
                amount_remaining=0,
                attempted=True,
                attempt_count=invoice["attempt_count"] + 1,
                paid=True,
            )
            invoice["status_transitions"]["paid_at"] = now
            return copy.deepcopy(invoice)

    def fail_invoice_payment(self, invoice_id: str) -> dict[str, Any]:
        with self._lock:
            invoice = self._obj("invoice", invoice_id)
            invoice["attempted"] = True
            invoice["attempt_count"] += 1
            invoice["next_payment_attempt"] = int(time.time()) + 3 * 86400
            return copy.deepcopy(invoice)

    # --- webhooks --------------------------------------------------------------------

    def event(
        self,
        type_: str,
        obj: dict[str, Any] | str,
        *,
        account: str | None = None,
        previous_attributes: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """An event of ``type_`` carrying ``obj`` (an object or the id of a stored one)."""
        snapshot = self.get(obj) if isinstance(obj, str) else copy.deepcopy(obj)
        event: dict[str, Any] = {
            "id": _new_id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()),
            "data": {"object": snapshot},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": type_,
        }
        if previous_attributes is not None:
            event["data"]["previous_attributes"] = previous_attributes
        if account is not None:
            event["account"] = account
        return event

    @staticmethod
    def sign(payload: bytes | str, secret: str, *, timestamp: int | None = None) -> str:
        """The ``Stripe-Signature`` header for ``payload``: ``t=<ts>,v1=<hex HMAC-SHA256>``."""
        text = payload.decode() if isinstance(payload, bytes) else payload
        ts = int(time.time()) if timestamp is None else timestamp
        mac = hmac.new(secret.encode(), f"{ts}.{text}".encode(), hashlib.sha256).hexdigest()
        return f"t={ts},v1={mac}"

    def signed(
        self, event: dict[str, Any], *, connect: bool = False, secret: str | None = None
    ) -> tuple[bytes, str]:
        """``(raw body, Stripe-Signature header)`` for delivering ``event``."""
        body = json.dumps(event, indent=2).encode()  # Stripe pretty-prints its payloads
        if secret is None:
            secret = self.connect_webhook_secret if connect else self.webhook_secret
        return body, self.sign(body, secret)

    def deliver(
        self,
        client: Any,
        event: dict[str, Any],
        *,
        connect: bool = False,
        secret: str | None = None,
        signature: str | None = None,
    ) -> Any:
        """POST ``event`` to our webhook view with Django's test ``client``, signed like Stripe."""
        body, header = self.signed(event, connect=connect, secret=secret)
        path = "/billing/webhooks/stripe-connect" if connect else "/billing/webhooks/stripe"
        return client.post(
            path,
            data=body,
            content_type="application/json",
            HTTP_STRIPE_SIGNATURE=header if signature is None else signature,
        )

    def send(self, event: dict[str, Any], url: str, *, connect: bool = False) -> tuple[int, Any]:
        """POST ``event``, signed, to ``url`` over real HTTP as Stripe delivers webhooks.

        Returns ``(status, parsed JSON body)``; an error status is returned, not raised.
        """
        body, header = self.signed(event, connect=connect)
        request = urllib.request.Request(
            url,
            data=body,
            headers={"Content-Type": "application/json", "Stripe-Signature": header},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.load(error)

    # --- HTTP ------------------------------------------------------------------------

    async def _hosted_checkout(self, request: web.Request) -> web.Response:
        """A stand-in for Stripe's hosted Checkout page (the session's ``url``), for browsers.

        The customer pays in the test (:meth:`complete_checkout`); the page links back to
        the session's ``success_url`` (``{CHECKOUT_SESSION_ID}`` filled in, as Stripe
        redirects) and to its ``cancel_url``.
        """
        session_id = request.match_info["session_id"]
        with self._lock:
            session = self._state.objects.get(session_id)
            session = copy.deepcopy(session) if session else None
        if session is None or session["object"] != "checkout.session":
            text, status = "<h1>Something went wrong</h1><p>No such Checkout Session.</p>", 404
        elif session["status"] == "expired":
            text, status = "<h1>This Checkout Session is no longer active</h1>", 200
        else:
            cents = int(session["amount_total"])
            success = session["success_url"].replace("{CHECKOUT_SESSION_ID}", session_id)
            links = f'<p><a href="{html.escape(success)}">Return to the merchant</a></p>'
            if session.get("cancel_url"):
                links += f'<p><a href="{html.escape(session["cancel_url"])}">Cancel</a></p>'
            text = (
                f"<h1>Pay ${cents // 100:,}.{cents % 100:02d}</h1>"
                f"<p>Status: {html.escape(session['status'])}, "
                f"payment {html.escape(session['payment_status'])}.</p>{links}"
            )
            status = 200
        page = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="icon" href="data:,"><title>Checkout (fake Stripe)</title></head>'
            f'<body style="font-family: sans-serif; margin: 2rem">{text}</body></html>'
        )
        return web.Response(text=page, status=status, content_type="text/html")

    @staticmethod
    def _page(title: str, body: str, status: int = 200) -> web.Response:
        page = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{html.escape(title)} (fake Stripe)</title>'
            f'</head><body style="font-family: sans-serif; margin: 2rem">{body}</body></html>'
        )
        return web.Response(text=page, status=status, content_type="text/html")

    def _link(self, request: web.Request) -> dict[str, Any] | None:
        link = self._state.account_links.get(request.match_info["code"])
        if link is None or link["account"] != request.match_info["account_id"]:
            return None
        return link

    async def _hosted_onboarding(self, request: web.Request) -> web.Response:
        """A stand-in for Stripe's hosted Connect onboarding (an Account Link's ``url``)."""
        with self._lock:
            link = self._link(request)
            if link is None:
                return self._page("Onboarding", "<h1>This link is not valid</h1>", 404)
            if link["visited"] or link["expires_at"] < time.time():
                # Stripe: used or expired links go to the platform's refresh_url.
                raise web.HTTPFound(link["refresh_url"])
            link["visited"] = True
            account = copy.deepcopy(self._state.objects[link["account"]])
        name = (account.get("business_profile") or {}).get("name") or account["id"]
        due = account["requirements"]["currently_due"]
        items = "".join(f"<li>{html.escape(code)}</li>" for code in due)
        action = f"/connect/setup/e/{account['id']}/{request.match_info['code']}/submit"
        body = (
            f"<h1>Set up payouts for {html.escape(str(name))}</h1>"
            "<p>Stripe partners with the platform to pay you. Test mode: nothing is checked.</p>"
            + (f"<p>Stripe needs:</p><ul>{items}</ul>" if items else "")
            + f'<form method="post" action="{html.escape(action)}">'
            '<button type="submit">Agree and submit</button></form>'
            f'<p><a href="{html.escape(link["return_url"])}">Return without finishing</a></p>'
        )
        return self._page("Onboarding", body)

    async def _hosted_onboarding_submit(self, request: web.Request) -> web.Response:
        """The vendor finishes onboarding: the account can be paid, Stripe sends
        ``account.updated`` to the Connect webhook, and the browser goes to ``return_url``."""
        with self._lock:
            link = self._link(request)
            if link is None or not link["visited"] or link["submitted"]:
                return self._page("Onboarding", "<h1>This link has expired</h1>", 400)
            link["submitted"] = True
            account_id = link["account"]
            before = copy.deepcopy(self._state.objects[account_id])
            after = self.update_account(account_id, payouts_enabled=True, details_submitted=True)
            previous = _previous_attributes(before, after)
            event = self.event(
                "account.updated", after, account=account_id, previous_attributes=previous
            )
            url = self._state.connect_webhook_url
        if url is not None:
            loop = asyncio.get_running_loop()
            status = await loop.run_in_executor(None, self._deliver_quietly, event, url)
            with self._lock:
                self._state.webhook_deliveries.append((event["id"], status))
        raise web.HTTPSeeOther(link["return_url"])

    def _deliver_quietly(self, event: dict[str, Any], url: str) -> int:
        try:
            status, _ = self.send(event, url, connect=True)
        except (OSError, ValueError):  # unreachable, or not JSON: Stripe retries later
            return 0
        return status

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.text() if request.method == "POST" else request.query_string
        params = parse_form(raw)
        key = request.headers.get("Idempotency-Key")
        account = request.headers.get("Stripe-Account")
        recorded = RecordedRequest(request.method, request.path, params, key, account)
        with self._lock:
            self._state.requests.append(recorded)
            status, body, replayed = self._dispatch(request, params, key, account)
            recorded.status, recorded.replayed = status, replayed
        headers = {"Request-Id": f"req_{_rand(14)}", "Stripe-Version": API_VERSION}
        if key:
            headers["Idempotency-Key"] = key
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return web.json_response(body, status=status, headers=headers)

    def _dispatch(
        self, request: web.Request, params: dict[str, Any], key: str | None, account: str | None
    ) -> tuple[int, dict[str, Any], bool]:
        auth = request.headers.get("Authorization", "")
        if auth != f"Bearer {self.api_key}":
            return (
                401,
                {
                    "error": {
                        "message": "Invalid API Key provided.",
                        "type": "invalid_request_error",
                    }
                },
                False,
            )
        fingerprint = (request.method, request.path, json.dumps(params, sort_keys=True))
        if key and request.method == "POST":
            stored = self._state.idempotency.get((account or "", key))
            if stored is not None:
                if stored.fingerprint != fingerprint:
                    message = (
                        "Keys for idempotent requests can only be used with the same parameters "
                        "they were first used with. Try using a key other than "
                        f"'{key}' if you meant to execute a different request."
                    )
                    return 400, {"error": {"message": message, "type": "idempotency_error"}}, False
                return stored.status, copy.deepcopy(stored.body), True
        status, body = self._route(request.method, request.path, params)
        if key and request.method == "POST":
            self._state.idempotency[(account or "", key)] = _Stored(
                fingerprint, status, copy.deepcopy(body)
            )
        return status, body, False

    def _route(self, method: str, path: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        for route_method, pattern, handler in self._routes:
            match = pattern.match(path)
            if match and route_method == method:
                try:
                    return 200, copy.deepcopy(handler(params, *match.groups()))
                except StripeFailure as failure:
                    return failure.status, {"error": failure.body}
        message = f"Unrecognized request URL ({method}: {path})."
        return 404, {"error": {"message": message, "type": "invalid_request_error"}}

    # --- objects ---------------------------------------------------------------------

    def _obj(self, kind: str, object_id: str, param: str = "id") -> dict[str, Any]:
        obj = self._state.objects.get(object_id)
        if obj is None or obj["object"] != kind:
            raise _missing(
                kind.replace("checkout.", "checkout ").replace("_", " "), object_id, param
            )
        return obj

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._state.objects[obj["id"]] = obj
        return obj

    @staticmethod
    def _metadata(params: dict[str, Any]) -> dict[str, str]:
        metadata = params.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise StripeFailure(400, "Invalid metadata: must be an object", param="metadata")
        return {k: v for k, v in metadata.items() if v != ""}

    def _checkout_create(self, params: dict[str, Any]) -> dict[str, Any]:
        mode = _required(params, "mode")
        if mode != "payment":
            raise StripeFailure(400, "This fake only supports mode=payment.", param="mode")
        success_url = _required(params, "success_url")
        items = params.get("line_items")
        if not isinstance(items, list) or not items:
            raise StripeFailure(400, "Missing required param: line_items.", param="line_items")
        total = 0
        currency = None
        for index, item in enumerate(items):
            price = item.get("price_data") or {}
            if "unit_amount" not in price:
                raise StripeFailure(
                    400,
                    "Missing required param: unit_amount.",
                    param=f"line_items[{index}][price_data][unit_amount]",
                )
            currency = price.get("currency")
            total += int(price["unit_amount"]) * int(item.get("quantity", 1))
        if total < 50:
            raise StripeFailure(
                400,
                "The Checkout Session's total amount due must add up to at least $0.50 usd",
            )
        now = int(time.time())
        session_id = _new_id("cs_test")
        return self._store(
            {
                "id": session_id,
                "object": "checkout.session",
                "after_expiration": None,
                "allow_promotion_codes": None,
                "amount_subtotal": total,
                "amount_total": total,
                "automatic_tax": {"enabled": False, "liability": None, "status": None},
                "billing_address_collection": None,
                "cancel_url": params.get("cancel_url"),
                "client_reference_id": params.get("client_reference_id"),
                "created": now,
                "currency": currency,
                "customer": params.get("customer"),
                "customer_creation": "if_required",
                "customer_details": None,
                "customer_email": params.get("customer_email"),
                "expires_at": now + 86400,
                "invoice": None,
                "livemode": False,
                "locale": None,
                "metadata": self._metadata(params),
                "mode": mode,
                "payment_intent": None,
                "payment_method_types": ["card"],
                "payment_status": "unpaid",
                "status": "open",
                "submit_type": None,
                "success_url": success_url,
                "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
                "ui_mode": "hosted",
                "url": f"{self.url}/checkout/pay/{session_id}",
            }
        )

    def _checkout_get(self, params: dict[str, Any], session_id: str) -> dict[str, Any]:
        return self._obj("checkout.session", session_id)

    def _account_create(self, params: dict[str, Any]) -> dict[str, Any]:
        account_type = params.get("type", "express")
        account_id = _new_id("acct")
        requested = params.get("capabilities") or {}
        return self._store(
            {
                "id": account_id,
                "object": "account",
                "business_profile": {
                    "name": (params.get("business_profile") or {}).get("name"),
                    "url": None,
                    "mcc": None,
                },
                "business_type": None,
                "capabilities": {
                    name: "inactive"
                    for name, value in requested.items()
                    if _bool((value or {}).get("requested"))
                },
                "charges_enabled": False,
                "controller": {"type": "application", "is_controller": True},
                "country": params.get("country", "US"),
                "created": int(time.time()),
                "default_currency": "usd",
                "details_submitted": False,
                "email": params.get("email"),
                "external_accounts": {
                    "object": "list",
                    "data": [],
                    "has_more": False,
                    "total_count": 0,
                    "url": f"/v1/accounts/{account_id}/external_accounts",
                },
                "metadata": self._metadata(params),
                "payouts_enabled": False,
                "requirements": {
                    "currently_due": ["external_account", "tos_acceptance.date"],
                    "eventually_due": ["external_account", "tos_acceptance.date"],
                    "past_due": [],
                    "disabled_reason": "requirements.past_due",
                    "current_deadline": None,
                    "errors": [],
                },
                "settings": {"payouts": {"schedule": {"interval": "daily", "delay_days": 2}}},
                "tos_acceptance": {"date": None},
                "type": account_type,
            }
        )

    def _account_get(self, params: dict[str, Any], account_id: str) -> dict[str, Any]:
        return self._obj("account", account_id)

    def _account_link_create(self, params: dict[str, Any]) -> dict[str, Any]:
        account_id = _required(params, "account")
        self._obj("account", account_id, "account")
        for name in ("refresh_url", "return_url", "type"):
            _required(params, name)
        now = int(time.time())
        code = _rand(12)
        self._state.account_links[code] = {
            "account": account_id,
            "refresh_url": params["refresh_url"],
            "return_url": params["return_url"],
            "expires_at": now + 300,
            "visited": False,
            "submitted": False,
        }
        return {
            "object": "account_link",
            "created": now,
            "expires_at": now + 300,
            "url": f"{self.url}/connect/setup/e/{account_id}/{code}",
        }

    def _transfer_create(self, params: dict[str, Any]) -> dict[str, Any]:
        amount = _int_param(params, "amount")
        if amount <= 0:
            raise StripeFailure(400, "Invalid positive integer", param="amount")
        currency = _required(params, "currency")
        destination = _required(params, "destination")
        account = self._state.objects.get(destination)
        if account is None or account["object"] != "account":
            raise StripeFailure(
                400,
                f"No such destination: '{destination}'",
                code="resource_missing",
                param="destination",
            )
        if account["capabilities"].get("transfers") != "active":
            raise StripeFailure(
                400,
                "Your destination account needs to have at least one of the following "
                "capabilities enabled: transfers, crypto_transfers, legacy_payments",
                code="insufficient_capabilities_for_transfer",
                param="destination",
            )
        balance = self._state.available_balance_cents
        if balance is not None:
            if amount > balance:
                raise StripeFailure(
                    400,
                    "You have insufficient available funds in your Stripe account. Try adding "
                    "funds directly to your available balance by creating Charges using the "
                    "4000000000000077 test card. See: https://stripe.com/docs/testing"
                    "#available-balance",
                    code="balance_insufficient",
                )
            self._state.available_balance_cents = balance - amount
        transfer_id = _new_id("tr")
        return self._store(
            {
                "id": transfer_id,
                "object": "transfer",
                "amount": amount,
                "amount_reversed": 0,
                "balance_transaction": _new_id("txn"),
                "created": int(time.time()),
                "currency": currency,
                "description": params.get("description"),
                "destination": destination,
                "destination_payment": _new_id("py"),
                "livemode": False,
                "metadata": self._metadata(params),
                "reversals": {
                    "object": "list",
                    "data": [],
                    "has_more": False,
                    "total_count": 0,
                    "url": f"/v1/transfers/{transfer_id}/reversals",
                },
                "reversed": False,
                "source_transaction": None,
                "source_type": "card",
                "transfer_group": params.get("transfer_group"),
            }
        )

    def _transfer_get(self, params: dict[str, Any], transfer_id: str) -> dict[str, Any]:
        return self._obj("transfer", transfer_id)

    def _transfer_list(self, params: dict[str, Any]) -> dict[str, Any]:
        data = [
            t
            for t in self._state.objects.values()
            if t["object"] == "transfer"
            and params.get("destination") in (None, t["destination"])
            and params.get("transfer_group") in (None, t["transfer_group"])
        ]
        data.reverse()  # newest first, like Stripe
        limit = int(params.get("limit", 10))
        return {
            "object": "list",
            "data": data[:limit],
            "has_more": len(data) > limit,
            "url": "/v1/transfers",
        }

    def _reversal_create(self, params: dict[str, Any], transfer_id: str) -> dict[str, Any]:
        transfer = self._obj("transfer", transfer_id)
        remaining = transfer["amount"] - transfer["amount_reversed"]
        amount = int(params.get("amount", remaining))
        if amount <= 0 or amount > remaining:
            raise StripeFailure(
                400,
                f"You have requested a reversal of {amount} cents, but only {remaining} "
                "cents remain on the transfer.",
                param="amount",
            )
        reversal = {
            "id": _new_id("trr"),
            "object": "transfer_reversal",
            "amount": amount,
            "balance_transaction": _new_id("txn"),
            "created": int(time.time()),
            "currency": transfer["currency"],
            "destination_payment_refund": _new_id("pyr"),
            "metadata": self._metadata(params),
            "source_refund": None,
            "transfer": transfer_id,
        }
        transfer["amount_reversed"] += amount
        transfer["reversed"] = transfer["amount_reversed"] == transfer["amount"]
        transfer["reversals"]["data"].insert(0, reversal)
        transfer["reversals"]["total_count"] += 1
        if self._state.available_balance_cents is not None:
            self._state.available_balance_cents += amount
        return reversal

    def _customer_create(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._store(
            {
                "id": _new_id("cus"),
                "object": "customer",
                "address": None,
                "balance": 0,
                "created": int(time.time()),
                "currency": None,
                "default_source": None,
                "delinquent": False,
                "description": params.get("description"),
                "email": params.get("email"),
                "invoice_prefix": _rand(8).upper(),
                "invoice_settings": {
                    "custom_fields": None,
                    "default_payment_method": None,
                    "footer": None,
                },
                "livemode": False,
                "metadata": self._metadata(params),
                "name": params.get("name"),
                "next_invoice_sequence": 1,
                "phone": None,
                "preferred_locales": [],
                "shipping": None,
                "tax_exempt": "none",
                "test_clock": None,
            }
        )

    def _customer_get(self, params: dict[str, Any], customer_id: str) -> dict[str, Any]:
        return self._obj("customer", customer_id)

    def _invoice_create(self, params: dict[str, Any]) -> dict[str, Any]:
        customer = self._obj("customer", _required(params, "customer"), "customer")
        method = params.get("collection_method", "charge_automatically")
        days = params.get("days_until_due")
        if method == "send_invoice" and days is None:
            raise StripeFailure(
                400, "Missing required param: days_until_due.", param="days_until_due"
            )
        invoice_id = _new_id("in")
        now = int(time.time())
        return self._store(
            {
                "id": invoice_id,
                "object": "invoice",
                "account_country": "US",
                "amount_due": 0,
                "amount_paid": 0,
                "amount_remaining": 0,
                "attempt_count": 0,
                "attempted": False,
                "auto_advance": _bool(params.get("auto_advance", "false")),
                "collection_method": method,
                "created": now,
                "currency": params.get("currency", "usd"),
                "customer": customer["id"],
                "customer_email": customer["email"],
                "customer_name": customer["name"],
                "days_until_due": int(days) if days is not None else None,
                "description": params.get("description"),
                "due_date": None,
                "hosted_invoice_url": None,
                "invoice_pdf": None,
                "lines": {
                    "object": "list",
                    "data": [],
                    "has_more": False,
                    "total_count": 0,
                    "url": f"/v1/invoices/{invoice_id}/lines",
                },
                "livemode": False,
                "metadata": self._metadata(params),
                "next_payment_attempt": None,
                "number": None,
                "paid": False,
                "period_end": now,
                "period_start": now,
                "status": "draft",
                "status_transitions": {
                    "finalized_at": None,
                    "marked_uncollectible_at": None,
                    "paid_at": None,
                    "voided_at": None,
                },
                "subtotal": 0,
                "total": 0,
            }
        )

    def _invoice_get(self, params: dict[str, Any], invoice_id: str) -> dict[str, Any]:
        return self._obj("invoice", invoice_id)

    def _invoice_item_create(self, params: dict[str, Any]) -> dict[str, Any]:
        customer = self._obj("customer", _required(params, "customer"), "customer")
        amount = _int_param(params, "amount")
        currency = _required(params, "currency")
        invoice = None
        if params.get("invoice"):
            invoice = self._obj("invoice", params["invoice"], "invoice")
            if invoice["status"] != "draft":
                raise StripeFailure(
                    400, "You can only add invoice items to draft invoices.", param="invoice"
                )
            if invoice["customer"] != customer["id"]:
                raise StripeFailure(400, "The invoice belongs to another customer.")
        now = int(time.time())
        item = self._store(
            {
                "id": _new_id("ii"),
                "object": "invoiceitem",
                "amount": amount,
                "currency": currency,
                "customer": customer["id"],
                "date": now,
                "description": params.get("description"),
                "discountable": True,
                "invoice": invoice["id"] if invoice else None,
                "livemode": False,
                "metadata": self._metadata(params),
                "period": {"start": now, "end": now},
                "proration": False,
                "quantity": 1,
            }
        )
        if invoice is not None:
            invoice["lines"]["data"].append(
                {
                    "id": _new_id("il"),
                    "object": "line_item",
                    "amount": amount,
                    "currency": currency,
                    "description": item["description"],
                    "invoice": invoice["id"],
                    "livemode": False,
                    "metadata": item["metadata"],
                    "parent": {
                        "type": "invoice_item_details",
                        "invoice_item_details": {"invoice_item": item["id"]},
                    },
                    "period": item["period"],
                    "quantity": 1,
                }
            )
            invoice["lines"]["total_count"] += 1
            invoice["subtotal"] += amount
            invoice["total"] += amount
            invoice["amount_due"] += amount
            invoice["amount_remaining"] += amount
        return item

    def _invoice_finalize(self, params: dict[str, Any], invoice_id: str) -> dict[str, Any]:
        invoice = self._obj("invoice", invoice_id)
        if invoice["status"] != "draft":
            raise StripeFailure(
                400,
                "This invoice is already finalized, you can't re-finalize a non-draft invoice.",
                code="invoice_not_editable",
            )
        now = int(time.time())
        customer = self._obj("customer", invoice["customer"])
        number = f"{customer['invoice_prefix']}-{customer['next_invoice_sequence']:04d}"
        customer["next_invoice_sequence"] += 1
        invoice.update(
            status="open",
            number=number,
            hosted_invoice_url=f"{self.url}/i/{invoice_id}",
            invoice_pdf=f"{self.url}/i/{invoice_id}/pdf",
        )
        if invoice["collection_method"] == "send_invoice":
            invoice["due_date"] = now + 86400 * int(invoice["days_until_due"] or 0)
        invoice["status_transitions"]["finalized_at"] = now
        if "auto_advance" in params:
            invoice["auto_advance"] = _bool(params["auto_advance"])
        return invoice

    def _invoice_send(self, params: dict[str, Any], invoice_id: str) -> dict[str, Any]:
        invoice = self._obj("invoice", invoice_id)
        if invoice["collection_method"] != "send_invoice":
            raise StripeFailure(400, "You can only send invoices with send_invoice collection.")
        if invoice["status"] == "draft":
            self._invoice_finalize({}, invoice_id)
        elif invoice["status"] != "open":
            raise StripeFailure(400, f"You can't send an invoice that is {invoice['status']}.")
        return invoice


# --- pytest fixtures (import them into a test module to use them) -------------------------


_server_lock = threading.Lock()
_server: FakeStripe | None = None


def _shared_server() -> FakeStripe:
    global _server
    with _server_lock:
        if _server is None:
            _server = FakeStripe().start()
            atexit.register(_server.stop)
        return _server


@pytest.fixture
def stripe_fake(settings: Any) -> Iterator[FakeStripe]:
    """A clean fake Stripe, and the settings that point billing at it.

    One server per test session (started on first use), reset before each test.
    """
    server = _shared_server()
    server.reset()
    settings.STRIPE_SECRET_KEY = server.api_key
    settings.STRIPE_API_BASE = server.url
    settings.STRIPE_WEBHOOK_SECRET = server.webhook_secret
    settings.STRIPE_CONNECT_WEBHOOK_SECRET = server.connect_webhook_secret
    settings.STRIPE_MAX_NETWORK_RETRIES = 0
    yield server


__all__ = ["FakeStripe", "RecordedRequest", "parse_form", "stripe_fake"]
