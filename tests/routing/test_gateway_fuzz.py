"""Schemathesis against the running gateway: requests generated from its own OpenAPI
document (valid and invalid ones), sent over real HTTP to a real uvicorn server routing to a
real fault-injecting vendor, with a funded key. No answer may be a 5xx other than the
documented 502/503, and every answer must match the document (status, content type, body)."""

from __future__ import annotations

import uuid

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from routing.gateway.openapi import document_bytes
from tests import factories

pytestmark = pytest.mark.django_db(transaction=True)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture
def gateway_target(gateway_server, upstream):  # type: ignore[no-untyped-def]
    chat = factories.endpoint(base_url=upstream.base_url)
    embeddings = factories.endpoint(
        base_url=upstream.base_url, kind="embeddings", tags=("embeddings",)
    )
    customer = factories.customer(credit_usd="1000")
    return {
        "server": gateway_server,
        "key": customer.key,
        "models": {"/v1/chat/completions": chat.full_slug, "/v1/embeddings": embeddings.full_slug},
    }


# The document exactly as the gateway serves it (tests/routing/test_openapi.py checks that
# GET /v1/openapi.json sends these bytes); loaded at collection, as schemathesis wants.
schema = schemathesis.openapi.from_dict(orjson.loads(document_bytes()))


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_the_gateway_answers_every_generated_request_as_documented(case, gateway_target):  # type: ignore[no-untyped-def]
    model = gateway_target["models"].get(case.path)
    # Half the bodies name the real endpoint (without a cascade, a quarter without any
    # provider policy) so they reach the vendor; the rest exercise model resolution and
    # the policy with whatever was generated.
    size = len(str(case.body))
    if model and isinstance(case.body, dict) and size % 2 == 0:
        case.body["model"] = model
        for field in ("models", "cascade", *(("provider",) if size % 4 == 0 else ())):
            case.body.pop(field, None)
    # Generated keys repeat across examples (a replay or a 422 every time): keep the
    # generated characters, make each key unique.
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] += f"-{uuid.uuid4().hex}"
    case.call_and_validate(
        base_url=gateway_target["server"].url,
        headers={"Authorization": f"Bearer {gateway_target['key']}"},
        checks=CHECKS,
    )
