"""The gateway publishes its OpenAPI document at ``GET /v1/openapi.json``."""

from __future__ import annotations

import pytest
from drf_spectacular.validation import validate_schema

from routing.gateway.app import ROUTES

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_serves_a_valid_openapi_document_of_every_v1_route(gateway_server):
    with gateway_server.client() as client:
        response = client.get("/v1/openapi.json")
        again = client.get("/v1/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == again.content  # one pre-serialised document
    document = response.json()
    validate_schema(document)
    api_routes = {path for path in ROUTES if path.startswith("/v1/") and path != "/v1/openapi.json"}
    # Plus the one prefix route, ``/v1/tools/<name>``.
    assert set(document["paths"]) == api_routes | {"/v1/tools/{name}"}
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "402", "404", "409", "413", "422", "429", "502", "503"} <= set(
        chat["responses"]
    )
    error = document["components"]["schemas"]["Error"]["properties"]["error"]
    assert error["required"] == ["message", "type", "code"]


def test_it_refuses_other_methods_on_the_document(gateway_server):
    with gateway_server.client() as client:
        response = client.post("/v1/openapi.json")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
