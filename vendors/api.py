"""The management API for vendors (``/api/v1/vendors/<slug>/...``): their endpoints with the
price quoted right now and quality scores.

Vendor members sign in (a session); API keys belong to customer organisations and open no
vendor (404, as for any vendor one is not a member of).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api import ERRORS
from marketplace.models import ApiKey
from vendors import selectors
from vendors.models import Endpoint, Vendor
from vendors.pricing import quote, surge_multiplier
from vendors.quality import OVERALL, PRIOR


@dataclass(frozen=True)
class VendorAccess:
    vendor: Vendor
    role: str


def vendor_access(request: Request, vendor_slug: str, permission: str) -> VendorAccess:
    """The vendor ``vendor_slug`` as the signed-in member sees it: 404 for a stranger (and
    for an API key), 403 when the member's role does not give ``permission``."""
    if isinstance(request.auth, ApiKey):
        raise Http404("No such vendor")
    membership = selectors.vendor_membership_for(user=request.user, slug=vendor_slug)
    if membership is None:
        raise Http404("No such vendor")
    if not selectors.vendor_role_allows(membership.role, permission):
        raise exceptions.PermissionDenied("your role at this vendor does not allow that")
    return VendorAccess(membership.vendor, membership.role)


class EndpointOutputSerializer(serializers.Serializer):  # type: ignore[type-arg]
    class Meta:
        ref_name = "Endpoint"

    class PriceSerializer(serializers.Serializer):  # type: ignore[type-arg]
        class Meta:
            ref_name = "Price"

        input_nanos = serializers.IntegerField(help_text="nano-USD per million input tokens")
        output_nanos = serializers.IntegerField(help_text="nano-USD per million output tokens")

    class CurrentPriceSerializer(PriceSerializer):
        class Meta:
            ref_name = "CurrentPrice"

        utilisation = serializers.FloatField(help_text="smoothed in-flight / capacity, 0..1")
        multiplier = serializers.FloatField(help_text="the surge multiplier at that load")

    slug = serializers.CharField()
    full_slug = serializers.CharField(help_text="vendor/endpoint: the model name customers use")
    kind = serializers.ChoiceField(choices=Endpoint.Kind.choices)
    status = serializers.ChoiceField(choices=Endpoint.Status.choices)
    version = serializers.IntegerField()
    upstream_model = serializers.CharField()
    tags = serializers.ListField(child=serializers.CharField())
    region = serializers.CharField()
    capacity = serializers.IntegerField()
    context_length = serializers.IntegerField()
    data_retention_days = serializers.IntegerField()
    base_price = PriceSerializer()
    surge_curve = serializers.ListField(
        child=serializers.ListField(child=serializers.FloatField(), min_length=2, max_length=2),
        help_text="[utilisation, multiplier] points",
    )
    surge_cap = serializers.FloatField()
    current_price = CurrentPriceSerializer(help_text="what a request would be quoted now")
    quality = serializers.DictField(
        child=serializers.FloatField(),
        help_text='score 0..1 per capability tag; "*" is overall (prior 0.5 without evidence)',
    )
    created_at = serializers.DateTimeField()


def _endpoint_rows(endpoints: list[Endpoint]) -> list[dict[str, Any]]:
    ids = [e.pk for e in endpoints]
    utilisation = selectors.endpoint_utilisation(ids)
    quality = selectors.quality_map(ids)
    rows = []
    for endpoint in endpoints:
        load = utilisation.get(endpoint.pk, 0.0)
        multiplier = surge_multiplier(endpoint.surge_curve, load, endpoint.surge_cap)
        scores = {OVERALL: PRIOR, **quality.get(endpoint.pk, {})}
        rows.append(
            {
                "slug": endpoint.slug,
                "full_slug": endpoint.full_slug,
                "kind": endpoint.kind,
                "status": endpoint.status,
                "version": endpoint.version,
                "upstream_model": endpoint.upstream_model,
                "tags": sorted(tag.slug for tag in endpoint.tags.all()),
                "region": endpoint.region,
                "capacity": endpoint.capacity,
                "context_length": endpoint.context_length,
                "data_retention_days": endpoint.data_retention_days,
                "base_price": {
                    "input_nanos": endpoint.price_input,
                    "output_nanos": endpoint.price_output,
                },
                "surge_curve": endpoint.surge_curve,
                "surge_cap": endpoint.surge_cap,
                "current_price": {
                    "utilisation": load,
                    "multiplier": multiplier,
                    "input_nanos": quote(endpoint.price_input, multiplier),
                    "output_nanos": quote(endpoint.price_output, multiplier),
                },
                "quality": scores,
                "created_at": endpoint.created_at,
            }
        )
    return rows


class EndpointListApi(APIView):
    @extend_schema(
        operation_id="vendor_endpoints_list",
        summary="The vendor's endpoints with the price quoted now and quality scores",
        responses={200: EndpointOutputSerializer(many=True), **ERRORS},
    )
    def get(self, request: Request, vendor_slug: str) -> Response:
        access = vendor_access(request, vendor_slug, "vendor.view")
        endpoints = selectors.vendor_endpoints(vendor=access.vendor)
        return Response(EndpointOutputSerializer(_endpoint_rows(endpoints), many=True).data)


class EndpointDetailApi(APIView):
    @extend_schema(
        operation_id="vendor_endpoints_retrieve",
        summary="One endpoint with the price quoted now and quality scores",
        responses={200: EndpointOutputSerializer, **ERRORS},
    )
    def get(self, request: Request, vendor_slug: str, endpoint_slug: str) -> Response:
        access = vendor_access(request, vendor_slug, "vendor.view")
        endpoint = selectors.vendor_endpoint(vendor=access.vendor, slug=endpoint_slug)
        if endpoint is None:
            raise Http404("No such endpoint")
        return Response(EndpointOutputSerializer(_endpoint_rows([endpoint])[0]).data)
