"""Every call Switchyard makes to Stripe, in one place.

* One ``stripe.StripeClient`` per (secret key, API base), built from settings:
  ``STRIPE_SECRET_KEY``, ``STRIPE_API_BASE`` (Stripe's own by default; the tests point it at
  the fake Stripe in ``tests/support/fake_stripe.py``), ``STRIPE_MAX_NETWORK_RETRIES`` and
  ``STRIPE_TIMEOUT_SECONDS``. The HTTP client is the SDK's default (``requests``, which
  the ``stripe`` package depends on); ``stripe.HTTPXClient`` sends raw bodies in a way
  httpx deprecates.
* Every POST carries an idempotency key that the caller derives from our own ids
  (``topup:<id>:checkout``, ``settle:<period>:<vendor id>``, ``invoice:<org>:<month>``...),
  so a retried task, a crash between the call and our commit, or two workers racing all
  end with one Stripe object. Stripe replays the first answer for a key (errors included)
  and refuses the same key with different parameters (``IdempotencyError``).
* Amounts cross this boundary in Stripe's integer cents only; callers convert with
  ``billing.money`` and nowhere else.
* Answers are returned as plain dicts (``StripeObject.to_dict()``), so the rest of billing
  never depends on the SDK's object model.
* Webhooks: ``webhook_event`` verifies the ``Stripe-Signature`` header over the RAW body
  with ``stripe.WebhookSignature.verify_header`` before anything is parsed or stored.

Settings read here (all with ``getattr(settings, NAME, default)``):
``STRIPE_SECRET_KEY`` (""), ``STRIPE_API_BASE`` ("https://api.stripe.com"),
``STRIPE_WEBHOOK_SECRET`` (""), ``STRIPE_CONNECT_WEBHOOK_SECRET`` (""),
``STRIPE_WEBHOOK_TOLERANCE_SECONDS`` (300), ``STRIPE_MAX_NETWORK_RETRIES`` (2),
``STRIPE_TIMEOUT_SECONDS`` (30).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import orjson
import stripe
from django.conf import settings

DEFAULT_API_BASE = "https://api.stripe.com"
CURRENCY = "usd"  # the ledger counts nano-US-dollars; every Stripe amount is in USD cents

StripeError = stripe.StripeError


class StripeNotConfigured(RuntimeError):
    """No ``STRIPE_SECRET_KEY``: Stripe cannot be called."""


class WebhookSignatureError(ValueError):
    """The webhook's signature, timestamp or body is not acceptable (answer 400)."""


def _setting(name: str, default: Any) -> Any:
    return getattr(settings, name, default)


@functools.lru_cache(maxsize=8)
def _client_for(api_key: str, api_base: str, retries: int, timeout: int) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base, "files": api_base},
        max_network_retries=retries,
        # The SDK's default synchronous client (requests, a dependency of stripe), with our
        # timeout; it keeps one connection pool per thread.
        http_client=stripe.new_default_http_client(timeout=timeout),
    )


def client() -> stripe.StripeClient:
    """The configured Stripe client (cached per key and API base)."""
    api_key = str(_setting("STRIPE_SECRET_KEY", "") or "")
    if not api_key:
        raise StripeNotConfigured("STRIPE_SECRET_KEY is not set")
    return _client_for(
        api_key,
        str(_setting("STRIPE_API_BASE", DEFAULT_API_BASE) or DEFAULT_API_BASE).rstrip("/"),
        int(_setting("STRIPE_MAX_NETWORK_RETRIES", 2)),
        int(_setting("STRIPE_TIMEOUT_SECONDS", 30)),
    )


def _plain(obj: Any) -> dict[str, Any]:
    return dict(obj.to_dict())


def _key(idempotency_key: str) -> stripe.RequestOptions:
    if not idempotency_key:
        raise ValueError("every Stripe POST needs an idempotency key derived from our ids")
    return {"idempotency_key": idempotency_key}


def _metadata(values: Mapping[str, object]) -> dict[str, str]:
    return {key: str(value) for key, value in values.items()}


def is_definite_failure(exc: StripeError) -> bool:
    """True when Stripe refused the request (nothing happened and repeating will not help).

    Connection errors, 5xx answers and rate limits are transient: the same request with the
    same idempotency key may still succeed. An ``IdempotencyError`` is our bug, not a refusal.
    """
    return isinstance(
        exc, stripe.InvalidRequestError | stripe.CardError | stripe.PermissionError
    ) and not isinstance(exc, stripe.IdempotencyError)


# --- Checkout (top-ups) ------------------------------------------------------------------


def checkout_session_create(
    *,
    amount_cents: int,
    product_name: str,
    success_url: str,
    cancel_url: str,
    client_reference_id: str,
    metadata: Mapping[str, object],
    idempotency_key: str,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "mode": "payment",
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": CURRENCY,
                    "unit_amount": amount_cents,
                    "product_data": {"name": product_name},
                },
            }
        ],
        "success_url": success_url,
        "cancel_url": cancel_url,
        "client_reference_id": client_reference_id,
        "metadata": _metadata(metadata),
        "payment_intent_data": {"metadata": _metadata(metadata)},
    }
    session = client().v1.checkout.sessions.create(params, _key(idempotency_key))  # type: ignore[arg-type]
    return _plain(session)


def checkout_session_retrieve(session_id: str) -> dict[str, Any]:
    return _plain(client().v1.checkout.sessions.retrieve(session_id))


# --- Connect (vendors) -------------------------------------------------------------------


def account_create(
    *, email: str | None, business_name: str, metadata: Mapping[str, object], idempotency_key: str
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "type": "express",
        "capabilities": {"transfers": {"requested": True}},
        "business_profile": {"name": business_name},
        "metadata": _metadata(metadata),
    }
    if email:
        params["email"] = email
    return _plain(client().v1.accounts.create(params, _key(idempotency_key)))  # type: ignore[arg-type]


def account_retrieve(account_id: str) -> dict[str, Any]:
    return _plain(client().v1.accounts.retrieve(account_id))


def account_link_create(
    *, account_id: str, refresh_url: str, return_url: str, idempotency_key: str
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "account": account_id,
        "refresh_url": refresh_url,
        "return_url": return_url,
        "type": "account_onboarding",
    }
    return _plain(client().v1.account_links.create(params, _key(idempotency_key)))  # type: ignore[arg-type]


def transfer_create(
    *,
    amount_cents: int,
    destination: str,
    transfer_group: str,
    description: str,
    metadata: Mapping[str, object],
    idempotency_key: str,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "amount": amount_cents,
        "currency": CURRENCY,
        "destination": destination,
        "transfer_group": transfer_group,
        "description": description,
        "metadata": _metadata(metadata),
    }
    return _plain(client().v1.transfers.create(params, _key(idempotency_key)))  # type: ignore[arg-type]


def transfer_retrieve(transfer_id: str) -> dict[str, Any]:
    return _plain(client().v1.transfers.retrieve(transfer_id))


def transfer_list(*, transfer_group: str) -> list[dict[str, Any]]:
    """Every transfer of a transfer group (all pages)."""
    listing = client().v1.transfers.list({"transfer_group": transfer_group, "limit": 100})
    return [_plain(transfer) for transfer in listing.auto_paging_iter()]


def transfer_reversal_create(
    transfer_id: str, *, amount_cents: int, metadata: Mapping[str, object], idempotency_key: str
) -> dict[str, Any]:
    params: dict[str, Any] = {"amount": amount_cents, "metadata": _metadata(metadata)}
    reversal = client().v1.transfers.reversals.create(
        transfer_id,
        params,  # type: ignore[arg-type]
        _key(idempotency_key),
    )
    return _plain(reversal)


# --- Invoicing ---------------------------------------------------------------------------


def customer_create(
    *, name: str, email: str | None, metadata: Mapping[str, object], idempotency_key: str
) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "metadata": _metadata(metadata)}
    if email:
        params["email"] = email
    return _plain(client().v1.customers.create(params, _key(idempotency_key)))  # type: ignore[arg-type]


def invoice_create(
    *,
    customer_id: str,
    days_until_due: int,
    description: str,
    metadata: Mapping[str, object],
    idempotency_key: str,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "customer": customer_id,
        "collection_method": "send_invoice",
        "days_until_due": days_until_due,
        "currency": CURRENCY,
        "auto_advance": False,
        "pending_invoice_items_behavior": "exclude",
        "description": description,
        "metadata": _metadata(metadata),
    }
    return _plain(client().v1.invoices.create(params, _key(idempotency_key)))  # type: ignore[arg-type]


def invoice_item_create(
    *,
    customer_id: str,
    invoice_id: str,
    amount_cents: int,
    description: str,
    metadata: Mapping[str, object],
    idempotency_key: str,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "customer": customer_id,
        "invoice": invoice_id,
        "amount": amount_cents,
        "currency": CURRENCY,
        "description": description,
        "metadata": _metadata(metadata),
    }
    return _plain(client().v1.invoice_items.create(params, _key(idempotency_key)))  # type: ignore[arg-type]


def invoice_finalize(invoice_id: str, *, idempotency_key: str) -> dict[str, Any]:
    params: dict[str, Any] = {"auto_advance": False}
    invoice = client().v1.invoices.finalize_invoice(invoice_id, params, _key(idempotency_key))  # type: ignore[arg-type]
    return _plain(invoice)


def invoice_send(invoice_id: str, *, idempotency_key: str) -> dict[str, Any]:
    return _plain(client().v1.invoices.send_invoice(invoice_id, None, _key(idempotency_key)))


def invoice_retrieve(invoice_id: str) -> dict[str, Any]:
    return _plain(client().v1.invoices.retrieve(invoice_id))


# --- webhooks ----------------------------------------------------------------------------


def webhook_secret(source: str) -> str:
    """The signing secret of the platform (``"platform"``) or Connect (``"connect"``) endpoint."""
    name = "STRIPE_CONNECT_WEBHOOK_SECRET" if source == "connect" else "STRIPE_WEBHOOK_SECRET"
    return str(_setting(name, "") or "")


def webhook_event(payload: bytes, signature_header: str | None, secret: str) -> dict[str, Any]:
    """Verify ``Stripe-Signature`` over the raw ``payload`` and return the event as a dict.

    Raises ``WebhookSignatureError`` for a missing secret or header, a wrong or stale
    signature, or a body that is not an event.
    """
    if not secret:
        raise WebhookSignatureError("no webhook signing secret is configured")
    tolerance = int(_setting("STRIPE_WEBHOOK_TOLERANCE_SECONDS", 300))
    try:
        stripe.WebhookSignature.verify_header(payload, signature_header, secret, tolerance)
    except stripe.SignatureVerificationError as exc:
        raise WebhookSignatureError(str(exc).splitlines()[0]) from None
    except UnicodeDecodeError:
        raise WebhookSignatureError("the body is not UTF-8") from None
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise WebhookSignatureError("the body is not JSON") from None
    if (
        not isinstance(event, dict)
        or event.get("object") != "event"
        or not isinstance(event.get("id"), str)
        or not isinstance(event.get("type"), str)
        or not isinstance((event.get("data") or {}).get("object"), dict)
    ):
        raise WebhookSignatureError("the body is not a Stripe event")
    return event
