"""The vendor portal: register as a vendor, register endpoints (the URL checked against
SSRF by the service, errors on the field, the secret write-only), run the conformance
check, and nothing of another vendor."""

from __future__ import annotations

import pytest
from django.urls import reverse

from marketplace.models import AuditLogEntry
from tests import factories
from vendors.crypto import decrypt_secret
from vendors.models import Endpoint, Vendor, VendorMembership
from vendors.services import portal_vendor_register

pytestmark = pytest.mark.django_db


@pytest.fixture
def vendor_owner(client):  # type: ignore[no-untyped-def]
    user = factories.user()
    vendor = portal_vendor_register(actor=user, name="Model Makers")
    client.force_login(user)
    client.user, client.vendor = user, vendor
    return client


def endpoint_form(base_url: str, **overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "slug": "sql-small",
        "base_url": base_url,
        "upstream_model": "fake-small",
        "secret": "s3cret-token",
        "kind": "chat",
        "tags": "sql, Chat",
        "domains": "finance, legal",
        "languages": "EN, de",
        "context_length": "4096",
        "capacity": "8",
        "region": "EU",
        "data_retention_days": "0",
        "price_input_usd": "0.15",
        "price_output_usd": "0.6",
    }
    data.update(overrides)
    return data


def test_it_registers_a_vendor_pending_approval(client):
    user = factories.user()
    client.force_login(user)
    page = client.get(reverse("portal:index")).content.decode()
    assert 'for="id_name"' in page

    response = client.post(reverse("portal:register"), {"name": "Tiny Models"})

    vendor = Vendor.objects.get(slug="tiny-models")
    assert response["Location"] == reverse("portal:dashboard", args=[vendor.slug])
    assert vendor.status == Vendor.Status.PENDING
    assert VendorMembership.objects.get(vendor=vendor).user == user
    assert AuditLogEntry.objects.filter(action="vendor.register").exists()
    dashboard = client.get(response["Location"]).content.decode()
    assert "awaits approval" in dashboard


@pytest.mark.parametrize(
    ("name", "message"),
    [("", "This field is required."), ("Register", "is reserved"), ("Private Acme", "is reserved")],
)
def test_it_explains_a_refused_vendor_name(client, name, message):
    client.force_login(factories.user())
    response = client.post(reverse("portal:register"), {"name": name})
    assert message in response.content.decode()
    assert not Vendor.objects.exists()


def test_it_registers_an_endpoint_with_a_write_only_secret(vendor_owner, upstream):
    response = vendor_owner.post(
        reverse("portal:endpoint-create", args=[vendor_owner.vendor.slug]),
        endpoint_form(upstream.base_url),
    )

    endpoint = Endpoint.objects.get(vendor=vendor_owner.vendor)
    assert response["Location"] == reverse(
        "portal:endpoint", args=[vendor_owner.vendor.slug, endpoint.slug]
    )
    assert endpoint.status == Endpoint.Status.PENDING
    assert sorted(t.slug for t in endpoint.tags.all()) == ["chat", "sql"]
    assert endpoint.domains == ["finance", "legal"] and endpoint.languages == ["en", "de"]
    assert endpoint.price_input == 150_000_000 and endpoint.price_output == 600_000_000
    assert endpoint.region == "eu" and endpoint.capacity == 8 and endpoint.context_length == 4096
    assert decrypt_secret(endpoint.secret_encrypted) == "s3cret-token"

    page = vendor_owner.get(response["Location"]).content.decode()
    assert "s3cret-token" not in page and "set (hidden)" in page
    entry = AuditLogEntry.objects.get(action="endpoint.register")
    assert "s3cret-token" not in str(entry.details)


@pytest.mark.parametrize(
    "url",
    ["http://10.20.30.40/v1", "http://169.254.169.254/latest", "ftp://example.test/v1"],
)
def test_it_shows_a_refused_url_on_the_url_field(vendor_owner, url):
    response = vendor_owner.post(
        reverse("portal:endpoint-create", args=[vendor_owner.vendor.slug]), endpoint_form(url)
    )

    page = response.content.decode()
    assert response.status_code == 200
    assert 'id="id_base_url_error"' in page and "The URL is refused" in page
    assert 'type="password"' in page and "s3cret-token" not in page  # never echoed back
    assert not Endpoint.objects.exists()


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"slug": "Bad Slug"}, "slug", "Enter a valid “slug”"),
        ({"upstream_model": ""}, "upstream_model", "This field is required."),
        ({"capacity": "0"}, "capacity", "greater than or equal to 1"),
        ({"context_length": "8"}, "context_length", "greater than or equal to 16"),
        ({"price_input_usd": "-1"}, "price_input_usd", "greater than or equal to 0"),
        ({"price_output_usd": "0.0000000001"}, "price_output_usd", "no more than 9 decimal"),
        ({"kind": "images"}, "kind", "Select a valid choice."),
        ({"tags": "sql, bad tag!"}, "tags", "is not a valid capability tag"),
        ({"slug": "new"}, "slug", "is reserved"),
    ],
)
def test_it_explains_each_invalid_endpoint_field(vendor_owner, upstream, overrides, field, message):
    response = vendor_owner.post(
        reverse("portal:endpoint-create", args=[vendor_owner.vendor.slug]),
        endpoint_form(upstream.base_url, **overrides),
    )
    page = response.content.decode()
    assert message in page, page[page.find("errorlist") - 300 : page.find("errorlist") + 300]
    assert f'id="id_{field}_error"' in page
    assert not Endpoint.objects.exists()


def test_it_refuses_a_duplicate_endpoint_on_the_name(vendor_owner, upstream):
    factories.endpoint(base_url=upstream.base_url, vendor_obj=vendor_owner.vendor, slug="sql-small")
    response = vendor_owner.post(
        reverse("portal:endpoint-create", args=[vendor_owner.vendor.slug]),
        endpoint_form(upstream.base_url),
    )
    assert 'id="id_slug_error"' in response.content.decode()


def test_it_runs_the_conformance_check_and_shows_each_check(vendor_owner, upstream):
    endpoint = factories.endpoint(
        base_url=upstream.base_url,
        vendor_obj=vendor_owner.vendor,
        upstream_model="fake-small",
        approved=False,
    )
    url = reverse("portal:endpoint-conformance", args=[vendor_owner.vendor.slug, endpoint.slug])

    fragment = vendor_owner.post(url, HTTP_HX_REQUEST="true").content.decode()

    assert "Passed" in fragment
    for name in ("chat", "chat.usage", "stream", "stream.usage", "logprobs", "models"):
        assert f'<span class="check-name">{name}' in fragment
    page = vendor_owner.get(
        reverse("portal:endpoint", args=[vendor_owner.vendor.slug, endpoint.slug])
    ).content.decode()
    assert "✓ pass" in page
    assert AuditLogEntry.objects.filter(action="endpoint.conformance").exists()


def test_it_reports_a_failing_endpoint(vendor_owner, upstream):
    upstream.script(["status:500"] * 10)
    endpoint = factories.endpoint(
        base_url=upstream.base_url, vendor_obj=vendor_owner.vendor, approved=False
    )
    url = reverse("portal:endpoint-conformance", args=[vendor_owner.vendor.slug, endpoint.slug])
    page = vendor_owner.post(url, follow=True).content.decode()
    assert "The conformance check failed" in page and "✗ fail" in page


def test_it_hides_other_vendors(vendor_owner, upstream):
    other = factories.vendor()
    theirs = factories.endpoint(base_url=upstream.base_url, vendor_obj=other)
    assert vendor_owner.get(reverse("portal:dashboard", args=[other.slug])).status_code == 404
    assert (
        vendor_owner.get(reverse("portal:endpoint", args=[other.slug, theirs.slug])).status_code
        == 404
    )
    url = reverse("portal:endpoint", args=[vendor_owner.vendor.slug, theirs.slug])
    assert vendor_owner.get(url).status_code == 404
    conformance = reverse("portal:endpoint-conformance", args=[other.slug, theirs.slug])
    assert vendor_owner.post(conformance).status_code == 404


EXAMPLES = (
    "sql: Which customers spent most last month?\r\n"
    "\r\n"
    "SQL:  Write a query for the top 10 products by revenue.\r\n"
    "chat: Tell me a joke: a short one.\r\n"
)


def test_it_saves_example_prompts_and_shows_them_on_the_endpoint(vendor_owner, upstream):
    form_page = vendor_owner.get(
        reverse("portal:endpoint-create", args=[vendor_owner.vendor.slug])
    ).content.decode()
    assert '<label for="id_tag_examples">Example prompts</label>' in form_page
    assert 'aria-describedby="id_tag_examples_helptext"' in form_page

    response = vendor_owner.post(
        reverse("portal:endpoint-create", args=[vendor_owner.vendor.slug]),
        endpoint_form(upstream.base_url, tag_examples=EXAMPLES),
    )

    endpoint = Endpoint.objects.get(vendor=vendor_owner.vendor)
    assert endpoint.tag_examples == {
        "sql": [
            "Which customers spent most last month?",
            "Write a query for the top 10 products by revenue.",
        ],
        "chat": ["Tell me a joke: a short one."],
    }
    page = vendor_owner.get(response["Location"]).content.decode()
    assert "<li>Write a query for the top 10 products by revenue.</li>" in page
    assert "<li>Tell me a joke: a short one.</li>" in page
    entry = AuditLogEntry.objects.get(action="endpoint.register")
    assert entry.details["example_prompts"] == {"sql": 2, "chat": 1}


def test_an_endpoint_without_example_prompts_says_so(vendor_owner, upstream):
    response = vendor_owner.post(
        reverse("portal:endpoint-create", args=[vendor_owner.vendor.slug]),
        endpoint_form(upstream.base_url),
    )
    assert Endpoint.objects.get(vendor=vendor_owner.vendor).tag_examples == {}
    assert "None declared" in vendor_owner.get(response["Location"]).content.decode()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("Which customers spent most last month?", "Line 3: write it as “tag: prompt”"),
        ("sql:   ", "Line 3: the example prompt after “sql:” is empty."),
        (
            "legal: Review this contract.",
            "Line 3: &#x27;legal&#x27; is not one of this endpoint&#x27;s capability tags "
            "(chat, sql).",
        ),
        ("sql: " + "x" * 501, "Line 3: The example prompt has 501 characters; at most 500"),
    ],
)
def test_it_names_the_line_of_a_bad_example_and_creates_nothing(
    vendor_owner, upstream, line, message
):
    text = f"sql: Which customers spent most last month?\nchat: Hello there.\n{line}\n"
    response = vendor_owner.post(
        reverse("portal:endpoint-create", args=[vendor_owner.vendor.slug]),
        endpoint_form(upstream.base_url, tag_examples=text),
    )

    page = response.content.decode()
    assert response.status_code == 200
    assert 'id="id_tag_examples_error"' in page
    assert message in page, page[page.find("errorlist") - 300 : page.find("errorlist") + 500]
    assert "chat: Hello there." in page  # the vendor's text is shown back to correct
    assert not Endpoint.objects.exists()


def test_it_names_the_line_of_one_example_too_many(vendor_owner, upstream):
    lines = [f"sql: Query number {i}" for i in range(21)]
    response = vendor_owner.post(
        reverse("portal:endpoint-create", args=[vendor_owner.vendor.slug]),
        endpoint_form(upstream.base_url, tag_examples="\n".join(["sql: Query number 0", *lines])),
    )
    page = response.content.decode()
    assert "Line 22: &#x27;sql&#x27; has more than 20 example prompts" in page
    assert not Endpoint.objects.exists()
