"""Schemathesis against the management API: requests generated from its drf-spectacular
schema (valid and invalid ones) over real HTTP to the running application, signed in as a
member of an organisation and a vendor. No answer may be a 5xx, and every answer must
match the schema (status, content type, body)."""

from __future__ import annotations

import json
import secrets

import pytest
import schemathesis
from django.test import Client
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from billing.services import credit_grant
from marketplace.services import console_api_key_create, console_organization_create
from tests import factories
from vendors.services import portal_vendor_register

pytestmark = pytest.mark.django_db(transaction=True)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

# The schema /api/schema/ serves (tests/marketplace/test_api.py checks it there).
schema = schemathesis.openapi.from_dict(
    json.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(public=True)))
)


@pytest.fixture
def api_target(gateway_server, upstream):  # type: ignore[no-untyped-def]
    member = factories.user()
    org = console_organization_create(actor=member, name="Fuzz Co")
    credit_grant(organization=org, amount=10**10, reason="fuzz")
    key = console_api_key_create(actor=member, organization=org, name="fuzzed").api_key
    vendor = portal_vendor_register(actor=member, name="Fuzz Vendor")
    endpoint = factories.endpoint(base_url=upstream.base_url, vendor_obj=vendor)
    browser = Client()
    browser.force_login(member)
    csrf = secrets.token_hex(16)  # 32 characters: Django's unmasked token length
    return {
        "server": gateway_server,
        "headers": {
            "Cookie": f"sessionid={browser.cookies['sessionid'].value}; csrftoken={csrf}",
            "X-CSRFToken": csrf,
        },
        "path_parameters": {
            "org_slug": org.slug,
            "vendor_slug": vendor.slug,
            "endpoint_slug": endpoint.slug,
            "id": key.pk,
        },
    }


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_the_management_api_answers_every_generated_request_as_documented(case, api_target):  # type: ignore[no-untyped-def]
    # Half the cases name the member's own objects with the member's session only (no
    # generated bearer key), so they get past authentication and the tenancy 404s.
    if case.path_parameters and len(repr((case.path_parameters, case.query, case.body))) % 2:
        for name in case.path_parameters:
            case.path_parameters[name] = api_target["path_parameters"][name]
        if case.headers:
            case.headers.pop("Authorization", None)
    case.call_and_validate(
        base_url=api_target["server"].url, headers=api_target["headers"], checks=CHECKS
    )
