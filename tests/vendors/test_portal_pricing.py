"""Pricing: ``endpoint_update_pricing`` (validated, announced to the gateways after commit)
and the portal's pricing editor (server-side validation, a live server check, roles)."""

from __future__ import annotations

import time

import pytest
from django.urls import reverse

from marketplace import invalidation
from marketplace.models import AuditLogEntry
from marketplace.redis_client import sync_client
from tests import factories
from vendors.models import VendorMembership
from vendors.pricing import surge_multiplier
from vendors.services import VendorError, endpoint_update_pricing, portal_vendor_register

pytestmark = pytest.mark.django_db

CURVE = [[0.0, 1.0], [0.5, 1.0], [0.9, 2.0], [1.0, 3.0]]


def published(subscriber, wait: float = 2.0) -> list[str]:  # type: ignore[no-untyped-def]
    deadline, seen = time.monotonic() + wait, []
    while time.monotonic() < deadline and not seen:
        message = subscriber.get_message(timeout=0.2)
        if message is not None:
            seen.append(message["data"].decode())
    return seen


@pytest.fixture
def endpoint(upstream):  # type: ignore[no-untyped-def]
    return factories.endpoint(base_url=upstream.base_url)


def test_it_updates_prices_and_tells_the_gateways_after_commit(
    endpoint, django_capture_on_commit_callbacks
):
    subscriber = sync_client().pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(invalidation.CHANNEL)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        updated = endpoint_update_pricing(
            endpoint=endpoint, price_input=7, price_output=9, surge_curve=CURVE, surge_cap=2.5
        )

    assert len(callbacks) == 1
    assert published(subscriber) == [invalidation.SNAPSHOT]
    endpoint.refresh_from_db()
    assert (endpoint.price_input, endpoint.price_output) == (7, 9)
    assert endpoint.surge_curve == CURVE and endpoint.surge_cap == 2.5
    assert updated.surge_curve == CURVE


def test_an_unchanged_price_announces_nothing(endpoint, django_capture_on_commit_callbacks):
    args = {
        "price_input": endpoint.price_input,
        "price_output": endpoint.price_output,
        "surge_curve": endpoint.surge_curve,
        "surge_cap": endpoint.surge_cap,
    }
    with django_capture_on_commit_callbacks() as callbacks:
        endpoint_update_pricing(endpoint=endpoint, **args)
    assert callbacks == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"price_input": -1}, "cannot be negative"),
        ({"price_output": 1.5}, "whole numbers"),
        ({"surge_cap": 0.5}, "surge cap"),
        ({"surge_cap": float("nan")}, "surge cap"),
        ({"surge_curve": []}, "at least one"),
        ({"surge_curve": [[0.5, 1.0], [0.2, 2.0]]}, "must increase"),
        ({"surge_curve": [[0.0, 2.0], [1.0, 1.5]]}, "never decrease"),
        ({"surge_curve": [[0.0, 0.5]]}, "start at 1"),
    ],
)
def test_it_refuses_invalid_pricing(endpoint, changes, message):
    args = {"price_input": 1, "price_output": 1, "surge_curve": CURVE, "surge_cap": 3.0}
    args.update(changes)
    with pytest.raises(VendorError, match=message):
        endpoint_update_pricing(endpoint=endpoint, **args)


@pytest.fixture
def owner(client, upstream):  # type: ignore[no-untyped-def]
    user = factories.user()
    vendor = portal_vendor_register(actor=user, name="Pricey")
    client.force_login(user)
    client.user, client.vendor = user, vendor
    client.endpoint = factories.endpoint(base_url=upstream.base_url, vendor_obj=vendor)
    return client


def pricing_url(c, name: str = "portal:pricing") -> str:  # type: ignore[no-untyped-def]
    return reverse(name, args=[c.vendor.slug, c.endpoint.slug])


def pricing_form(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "price_input_usd": "0.2",
        "price_output_usd": "0.8",
        "surge_cap": "2.5",
        "u_0": "0",
        "m_0": "1",
        "u_1": "50",
        "m_1": "1",
        "u_2": "90",
        "m_2": "2",
        "u_3": "100",
        "m_3": "3",
    }
    data.update(overrides)
    return data


def test_the_editor_shows_the_current_prices_and_curve(owner):
    page = owner.get(pricing_url(owner)).content.decode()
    assert 'name="price_input_usd"' in page and 'value="1"' in page  # $1 input price
    assert 'name="u_3"' in page and 'value="100"' in page and 'name="m_3"' in page
    assert "data-pricing-editor" in page and "chart.umd.min.js" in page
    assert 'for="id_u_0"' in page  # every point input has a label


def test_the_editor_saves_prices_and_logs_the_change(owner):
    response = owner.post(pricing_url(owner), pricing_form())

    assert response.status_code == 302
    owner.endpoint.refresh_from_db()
    assert owner.endpoint.price_input == 200_000_000
    assert owner.endpoint.price_output == 800_000_000
    assert owner.endpoint.surge_curve == [[0.0, 1.0], [0.5, 1.0], [0.9, 2.0], [1.0, 3.0]]
    assert owner.endpoint.surge_cap == 2.5
    entry = AuditLogEntry.objects.get(action="endpoint.pricing")
    assert entry.details["after"]["price_input"] == 200_000_000


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"u_1": "30", "u_2": "20"}, "Surge curve: Utilisation points must increase."),
        ({"m_2": "0.9"}, "greater than or equal to 1"),
        ({"m_1": "1.5", "m_2": "1.2"}, "never decrease"),
        ({"u_2": ""}, "Enter the utilisation of this point, or clear it."),
        ({"m_3": ""}, "Enter the multiplier of this point, or clear it."),
        ({"u_3": "150"}, "less than or equal to 100"),
        ({"surge_cap": "0.5"}, "greater than or equal to 1"),
        ({"price_input_usd": ""}, "This field is required."),
        (
            {f"{a}_{i}": "" for i in range(4) for a in "um"},
            "Surge curve: The surge curve needs at least one",
        ),
    ],
)
def test_the_editor_explains_invalid_pricing(owner, overrides, message):
    response = owner.post(pricing_url(owner), pricing_form(**overrides))
    assert response.status_code == 200
    assert message in response.content.decode()
    owner.endpoint.refresh_from_db()
    assert owner.endpoint.price_input == 1_000_000_000  # unchanged


def test_the_server_check_quotes_like_the_gateway(owner):
    fragment = owner.post(pricing_url(owner, "portal:pricing-check"), pricing_form()).content
    text = fragment.decode()
    assert "The server accepts these prices." in text
    full = surge_multiplier(CURVE, 1.0, 2.5)
    assert full == 2.5
    assert "2.50\u00d7" in text and "$0.5000" in text  # 0.2 x 2.5 at 100 %

    refused = owner.post(pricing_url(owner, "portal:pricing-check"), pricing_form(u_2="10"))
    assert "The server refuses these values" in refused.content.decode()


def test_a_developer_cannot_edit_prices(owner, client):
    dev = factories.user()
    VendorMembership.objects.create(vendor=owner.vendor, user=dev, role="developer")
    client.force_login(dev)
    assert client.get(pricing_url(owner)).status_code == 403
    assert client.post(pricing_url(owner), pricing_form()).status_code == 403
    page = client.get(
        reverse("portal:endpoint", args=[owner.vendor.slug, owner.endpoint.slug])
    ).content.decode()
    assert "Edit pricing" not in page


def test_another_vendor_cannot_edit_prices(owner, client):
    client.force_login(factories.user())
    assert client.get(pricing_url(owner)).status_code == 404
    assert client.post(pricing_url(owner, "portal:pricing-check"), {}).status_code == 404
