"""The management API for customers (``/api/v1/organizations/<slug>/...``): API keys and
usage records, plus what every API view shares: authentication with an API key, the
organisation a request may act on, and the error shapes.

Two ways in: a signed-in session (the console) acts with the member's role in the
organisation named in the URL; ``Authorization: Bearer <API key>`` acts on the key's own
organisation only, with the role its creator has there now (a key without a creator who is
still a member may only read). Another organisation is a 404, so its existence is not
revealed; a role that does not allow the action is a 403. Errors are DRF-shaped:
``{"detail": "..."}`` or ``{"field": ["..."]}`` for bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from django.contrib.auth.models import User
from django.http import Http404, HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import exceptions, serializers
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace import selectors
from marketplace.console.forms import KEY_SCOPES
from marketplace.data_policy import (
    MAX_CACHE_TTL,
    api_key_data_policy_update,
    organization_data_policy_update,
    organization_routing_defaults_update,
)
from marketplace.models import ApiKey, Membership, Organization, PrivacyPolicy
from marketplace.services import (
    PermissionDeniedError,
    ServiceError,
    console_api_key_create,
    console_api_key_revoke,
)

MAX_BIGINT = 2**63 - 1
MAX_INTEGER = 2**31 - 1

# --- authentication: the schema side of marketplace.api_auth ----------------------------------


class ApiKeyScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    target_class = "marketplace.api_auth.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return build_bearer_security_scheme_object(  # type: ignore[no-any-return]
            header_name="Authorization",
            token_prefix="Bearer",  # noqa: S106
        )


# --- which organisation, with which rights ----------------------------------------------------

# What a key may do when no member stands behind it: read.
KEY_READ_ONLY = frozenset({"org.view", "usage.view", "keys.view", "billing.view"})


@dataclass(frozen=True)
class OrgAccess:
    organization: Organization
    actor: User | None  # the member the changes are made (and audited) as
    permissions: frozenset[str]

    def require(self, permission: str) -> None:
        if permission not in self.permissions:
            raise exceptions.PermissionDenied("your role in this organisation does not allow that")

    def actor_or_403(self) -> User:
        if self.actor is None:
            raise exceptions.PermissionDenied("this API key may only read")
        return self.actor


def _role_permissions(role: str) -> frozenset[str]:
    return frozenset(name for name, roles in selectors.PERMISSIONS.items() if role in roles)


def organization_access(request: Request, org_slug: str, permission: str) -> OrgAccess:
    """The organisation ``org_slug`` as this request may act on it; 404 for a stranger, 403
    when the role does not give ``permission``."""
    key = request.auth if isinstance(request.auth, ApiKey) else None
    if key is not None:
        if key.organization.slug != org_slug:
            raise Http404("No such organisation")
        creator = key.created_by
        membership = (
            Membership.objects.filter(organization=key.organization, user=creator).first()
            if creator is not None
            else None
        )
        if membership is None:
            access = OrgAccess(key.organization, None, KEY_READ_ONLY)
        else:
            access = OrgAccess(key.organization, creator, _role_permissions(membership.role))
    else:
        found = selectors.membership_for(user=request.user, slug=org_slug)
        if found is None:
            raise Http404("No such organisation")
        member = cast(User, request.user)  # a membership was found: a signed-in user
        access = OrgAccess(found.organization, member, _role_permissions(found.role))
    access.require(permission)
    return access


def row_id_or_404(pk: int) -> int:
    """A row id from a URL; one PostgreSQL cannot hold names no row."""
    if not 0 < pk <= MAX_BIGINT:
        raise Http404("Not found")
    return pk


# --- error shapes (for the schema) -------------------------------------------------------------


class ErrorOutputSerializer(serializers.Serializer):  # type: ignore[type-arg]
    class Meta:
        ref_name = "Error"

    detail = serializers.CharField()


ERRORS: dict[int | str, Any] = {
    401: OpenApiResponse(ErrorOutputSerializer, description="No or a bad credential"),
    403: OpenApiResponse(ErrorOutputSerializer, description="Your role does not allow this"),
    404: OpenApiResponse(ErrorOutputSerializer, description="No such object of yours"),
}
INPUT_ERRORS: dict[int | str, Any] = {
    400: OpenApiResponse(
        inline_serializer(
            "ValidationError",
            fields={"detail": serializers.CharField(required=False)},
        ),
        description='Bad input: `{"field": ["message", ...]}` or `{"detail": "message"}`',
    ),
    **ERRORS,
}


@csrf_exempt
def api_not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
    return JsonResponse({"detail": "Not found."}, status=404)


def service_error(exc: ServiceError) -> exceptions.APIException:
    if isinstance(exc, PermissionDeniedError):
        return exceptions.PermissionDenied(str(exc))
    return exceptions.ValidationError({"detail": str(exc)})


class Pagination(LimitOffsetPagination):
    default_limit = 50
    max_limit = 500


# --- API keys ----------------------------------------------------------------------------------


class ApiKeyOutputSerializer(serializers.Serializer):  # type: ignore[type-arg]
    class Meta:
        ref_name = "ApiKey"

    id = serializers.IntegerField()
    name = serializers.CharField()
    prefix = serializers.CharField(help_text="Shown as sy-<prefix>-…; the key is never shown again")
    scopes = serializers.ListField(child=serializers.CharField())
    credit_limit_nanos = serializers.IntegerField(source="credit_limit", allow_null=True)
    credit_limit_period = serializers.CharField()
    rate_limit_rpm = serializers.IntegerField(allow_null=True)
    expires_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()
    active = serializers.BooleanField(source="is_active")
    log_content = serializers.BooleanField(
        help_text="Whether the key's route traces keep prompts and completions (owners and "
        "admins set it: `PUT .../keys/{id}/data-policy/`)"
    )


class ApiKeyListApi(APIView):
    class InputSerializer(serializers.Serializer):  # type: ignore[type-arg]
        class Meta:
            ref_name = "ApiKeyCreate"

        name = serializers.CharField(max_length=100)
        scopes = serializers.MultipleChoiceField(
            choices=list(KEY_SCOPES.items()), required=False, help_text="Empty: every gateway API"
        )
        credit_limit_nanos = serializers.IntegerField(
            min_value=0, max_value=MAX_BIGINT, required=False, allow_null=True
        )
        credit_limit_period = serializers.ChoiceField(
            choices=ApiKey.Period.choices, default=ApiKey.Period.NEVER
        )
        rate_limit_rpm = serializers.IntegerField(
            min_value=1, max_value=MAX_INTEGER, required=False, allow_null=True
        )
        expires_at = serializers.DateTimeField(required=False, allow_null=True)

    class CreatedOutputSerializer(ApiKeyOutputSerializer):
        class Meta:
            ref_name = "ApiKeyCreated"

        key = serializers.CharField(help_text="The API key itself: shown in this answer only")

    @extend_schema(
        operation_id="organization_keys_list",
        summary="The organisation's API keys, active first",
        responses={200: ApiKeyOutputSerializer(many=True), **ERRORS},
    )
    def get(self, request: Request, org_slug: str) -> Response:
        access = organization_access(request, org_slug, "keys.view")
        keys = selectors.organization_api_keys(organization=access.organization)
        return Response(ApiKeyOutputSerializer(keys, many=True).data)

    @extend_schema(
        operation_id="organization_keys_create",
        summary="Create an API key (the key is in this answer only)",
        request=InputSerializer,
        responses={201: CreatedOutputSerializer, **INPUT_ERRORS},
    )
    def post(self, request: Request, org_slug: str) -> Response:
        access = organization_access(request, org_slug, "keys.manage")
        actor = access.actor_or_403()
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            created = console_api_key_create(
                actor=actor,
                organization=access.organization,
                name=data["name"],
                scopes=sorted(data.get("scopes") or ()),
                credit_limit=data.get("credit_limit_nanos"),
                credit_limit_period=data["credit_limit_period"],
                rate_limit_rpm=data.get("rate_limit_rpm"),
                expires_at=data.get("expires_at"),
            )
        except ServiceError as exc:
            raise service_error(exc) from exc
        body = dict(ApiKeyOutputSerializer(created.api_key).data, key=created.plaintext)
        return Response(body, status=201, headers={"Cache-Control": "no-store"})


class ApiKeyRevokeApi(APIView):
    @extend_schema(
        operation_id="organization_keys_revoke",
        summary="Revoke an API key (idempotent); the gateway refuses it from now on",
        request=None,
        responses={200: ApiKeyOutputSerializer, **ERRORS},
    )
    def post(self, request: Request, org_slug: str, pk: int) -> Response:
        access = organization_access(request, org_slug, "keys.manage")
        actor = access.actor_or_403()
        key = selectors.organization_api_key(organization=access.organization, pk=row_id_or_404(pk))
        if key is None:
            raise Http404("No such key")
        try:
            revoked = console_api_key_revoke(actor=actor, api_key=key)
        except ServiceError as exc:
            raise service_error(exc) from exc
        return Response(ApiKeyOutputSerializer(revoked).data)


# --- routing policy ----------------------------------------------------------------------------


class RoutingPolicySerializer(serializers.Serializer):  # type: ignore[type-arg]
    class Meta:
        ref_name = "RoutingPolicy"

    provider = serializers.JSONField(
        help_text="A `provider` object, as a request sends it, merged under every request's "
        "own (docs/api.md); `{}`: none"
    )


class RoutingPolicyApi(APIView):
    @extend_schema(
        operation_id="organization_routing_policy_get",
        summary="The organisation's routing policy",
        responses={200: RoutingPolicySerializer, **ERRORS},
    )
    def get(self, request: Request, org_slug: str) -> Response:
        access = organization_access(request, org_slug, "org.view")
        return Response({"provider": access.organization.routing_defaults or {}})

    @extend_schema(
        operation_id="organization_routing_policy_set",
        summary="Set the organisation's routing policy (owners and admins)",
        request=RoutingPolicySerializer,
        responses={200: RoutingPolicySerializer, **INPUT_ERRORS},
    )
    def put(self, request: Request, org_slug: str) -> Response:
        access = organization_access(request, org_slug, "members.manage")
        actor = access.actor_or_403()
        serializer = RoutingPolicySerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            organization = organization_routing_defaults_update(
                actor=actor,
                organization=access.organization,
                provider=serializer.validated_data["provider"],
            )
        except ServiceError as exc:
            raise service_error(exc) from exc
        return Response({"provider": organization.routing_defaults})


# --- data policy: privacy guard and response cache ----------------------------------------------

CACHE_TTL_HELP = "Seconds a cached answer of a deterministic request is reused (at most 30 days)"
CACHE_SIMILARITY_HELP = (
    "Semantic cache: the cosine similarity x 1000 (500 to 1000; 920 = 0.92) at which a "
    "differently worded prompt reuses an answer"
)


class OrganizationDataPolicySerializer(serializers.Serializer):  # type: ignore[type-arg]
    class Meta:
        ref_name = "OrganizationDataPolicy"

    privacy_policy = serializers.ChoiceField(
        choices=PrivacyPolicy.choices,
        help_text="What to do with a prompt that contains personal data (docs/api.md)",
    )
    cache_ttl = serializers.IntegerField(
        min_value=0, max_value=MAX_CACHE_TTL, help_text=f"{CACHE_TTL_HELP}; 0: only on request"
    )
    cache_similarity = serializers.IntegerField(
        min_value=500,
        max_value=1000,
        allow_null=True,
        help_text=f"{CACHE_SIMILARITY_HELP}; null: exact repeats only",
    )
    trusted_regions = serializers.CharField(
        max_length=200,
        allow_blank=True,
        help_text="With `trusted_only`: the regions prompts with personal data may also go "
        'to, comma-separated (`"eu,us-east"`; answered lower-case, sorted, unique); "": any',
    )


class KeyDataPolicySerializer(serializers.Serializer):  # type: ignore[type-arg]
    class Meta:
        ref_name = "KeyDataPolicy"

    privacy_policy = serializers.ChoiceField(
        choices=PrivacyPolicy.choices,
        allow_blank=True,
        help_text="The key's own privacy policy; \"\": the organisation's",
    )
    cache_ttl = serializers.IntegerField(
        min_value=0,
        max_value=MAX_CACHE_TTL,
        allow_null=True,
        help_text=f"{CACHE_TTL_HELP}; 0: only on request; null: the organisation's",
    )
    cache_similarity = serializers.IntegerField(
        min_value=500,
        max_value=1000,
        allow_null=True,
        help_text=f"{CACHE_SIMILARITY_HELP}; null: the organisation's",
    )
    log_content = serializers.BooleanField(
        help_text="Whether the key's route traces keep prompts and completions"
    )


class KeyDataPolicyInputSerializer(KeyDataPolicySerializer):
    class Meta:
        ref_name = "KeyDataPolicyUpdate"

    log_content = serializers.BooleanField(
        required=False,
        help_text="Whether the key's route traces keep prompts and completions; omitted: "
        "left as it is",
    )


def _organization_data_policy(organization: Organization) -> dict[str, Any]:
    return {
        "privacy_policy": organization.privacy_policy,
        "cache_ttl": organization.cache_ttl,
        "cache_similarity": organization.cache_similarity,
        "trusted_regions": organization.trusted_regions,
    }


def _key_data_policy(key: ApiKey) -> dict[str, Any]:
    return {
        "privacy_policy": key.privacy_policy,
        "cache_ttl": key.cache_ttl,
        "cache_similarity": key.cache_similarity,
        "log_content": key.log_content,
    }


class OrganizationDataPolicyApi(APIView):
    @extend_schema(
        operation_id="organization_data_policy_get",
        summary="The organisation's privacy policy and response-cache defaults",
        responses={200: OrganizationDataPolicySerializer, **ERRORS},
    )
    def get(self, request: Request, org_slug: str) -> Response:
        access = organization_access(request, org_slug, "org.view")
        return Response(_organization_data_policy(access.organization))

    @extend_schema(
        operation_id="organization_data_policy_set",
        summary="Set the organisation's privacy policy and cache defaults (owners and admins)",
        request=OrganizationDataPolicySerializer,
        responses={200: OrganizationDataPolicySerializer, **INPUT_ERRORS},
    )
    def put(self, request: Request, org_slug: str) -> Response:
        access = organization_access(request, org_slug, "members.manage")
        actor = access.actor_or_403()
        serializer = OrganizationDataPolicySerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            organization = organization_data_policy_update(
                actor=actor,
                organization=access.organization,
                privacy_policy=data["privacy_policy"],
                cache_ttl=data["cache_ttl"],
                cache_similarity=data["cache_similarity"],
                trusted_regions=data["trusted_regions"],
            )
        except ServiceError as exc:
            raise service_error(exc) from exc
        return Response(_organization_data_policy(organization))


class ApiKeyDataPolicyApi(APIView):
    @extend_schema(
        operation_id="organization_keys_data_policy_get",
        summary="One key's overrides of the organisation's privacy and cache settings",
        responses={200: KeyDataPolicySerializer, **ERRORS},
    )
    def get(self, request: Request, org_slug: str, pk: int) -> Response:
        access = organization_access(request, org_slug, "keys.view")
        key = selectors.organization_api_key(organization=access.organization, pk=row_id_or_404(pk))
        if key is None:
            raise Http404("No such key")
        return Response(_key_data_policy(key))

    @extend_schema(
        operation_id="organization_keys_data_policy_set",
        summary="Set one key's privacy and cache overrides and content logging (owners and "
        "admins); the gateways reload the key at once",
        request=KeyDataPolicyInputSerializer,
        responses={200: KeyDataPolicySerializer, **INPUT_ERRORS},
    )
    def put(self, request: Request, org_slug: str, pk: int) -> Response:
        access = organization_access(request, org_slug, "members.manage")
        actor = access.actor_or_403()
        key = selectors.organization_api_key(organization=access.organization, pk=row_id_or_404(pk))
        if key is None:
            raise Http404("No such key")
        serializer = KeyDataPolicyInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            updated = api_key_data_policy_update(
                actor=actor,
                api_key=key,
                privacy_policy=data["privacy_policy"],
                cache_ttl=data["cache_ttl"],
                cache_similarity=data["cache_similarity"],
                log_content=data.get("log_content"),
            )
        except ServiceError as exc:
            raise service_error(exc) from exc
        return Response(_key_data_policy(updated))


# --- usage records -----------------------------------------------------------------------------


class UsageRecordListApi(APIView):
    pagination_class = Pagination

    class FilterSerializer(serializers.Serializer):  # type: ignore[type-arg]
        start = serializers.DateField(required=False, help_text="First day (UTC), included")
        end = serializers.DateField(required=False, help_text="Last day (UTC), included")
        key = serializers.IntegerField(
            min_value=1, max_value=MAX_BIGINT, required=False, help_text="An API key's id"
        )
        endpoint = serializers.RegexField(
            r"^[-a-zA-Z0-9_]+/[-a-zA-Z0-9_]+$",
            max_length=129,
            required=False,
            help_text="vendor/endpoint",
        )

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            if "start" in attrs and "end" in attrs and attrs["start"] > attrs["end"]:
                raise serializers.ValidationError({"end": ["the end is before the start"]})
            return attrs

    class OutputSerializer(serializers.Serializer):  # type: ignore[type-arg]
        class Meta:
            ref_name = "UsageRecord"

        request_id = serializers.CharField()
        occurred_at = serializers.DateTimeField()
        api_key = serializers.SerializerMethodField()
        endpoint = serializers.SerializerMethodField()
        model_requested = serializers.CharField()
        prompt_tokens = serializers.IntegerField()
        completion_tokens = serializers.IntegerField()
        price_input_nanos = serializers.IntegerField(source="price_input")
        price_output_nanos = serializers.IntegerField(source="price_output")
        cost_nanos = serializers.IntegerField(source="cost")
        latency_ms = serializers.IntegerField()
        attempts = serializers.IntegerField()
        outcome = serializers.ChoiceField(choices=["success", "partial", "failed"])
        stream = serializers.BooleanField()

        def get_api_key(self, record: Any) -> int | None:
            return record.api_key_id  # type: ignore[no-any-return]

        def get_endpoint(self, record: Any) -> str | None:
            return record.endpoint.full_slug if record.endpoint is not None else None

    @extend_schema(
        operation_id="organization_usage_list",
        summary="Metered requests, newest first (paginated)",
        parameters=[FilterSerializer],
        responses={200: OutputSerializer(many=True), **INPUT_ERRORS},
    )
    def get(self, request: Request, org_slug: str) -> Response:
        access = organization_access(request, org_slug, "usage.view")
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        data = filters.validated_data
        records = selectors.usage_records(
            organization=access.organization,
            start=data.get("start"),
            end=data.get("end"),
            api_key_id=data.get("key"),
            endpoint=data.get("endpoint"),
        )
        paginator = Pagination()
        page = paginator.paginate_queryset(records, request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)
