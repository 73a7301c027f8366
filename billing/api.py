"""The management API on money: an organisation's balance and ledger transactions, and a
vendor's statements per period. Amounts are integer nano-USD (``*_nanos``) with a
display string in US dollars beside them."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from billing.money import format_usd_plain
from billing.selectors import organization_balance_by_id
from billing.statements import vendor_statement_rows
from marketplace import selectors as customer_selectors
from marketplace.api import ERRORS, INPUT_ERRORS, Pagination, organization_access
from vendors.api import vendor_access

MAX_STATEMENT_DAYS = 366


class BalanceApi(APIView):
    class OutputSerializer(serializers.Serializer):  # type: ignore[type-arg]
        class Meta:
            ref_name = "Balance"

        balance_nanos = serializers.IntegerField(help_text="credit left, nano-USD")
        balance_usd = serializers.CharField(help_text="the same in US dollars (display)")
        billing_mode = serializers.CharField()

    @extend_schema(
        operation_id="organization_balance",
        summary="The organisation's credit balance",
        responses={200: OutputSerializer, **ERRORS},
    )
    def get(self, request: Request, org_slug: str) -> Response:
        access = organization_access(request, org_slug, "billing.view")
        organization = access.organization
        balance = organization_balance_by_id(organization.pk)
        return Response(
            self.OutputSerializer(
                {
                    "balance_nanos": balance,
                    "balance_usd": format_usd_plain(balance),
                    "billing_mode": organization.billing_mode,
                }
            ).data
        )


class TransactionListApi(APIView):
    pagination_class = Pagination

    class OutputSerializer(serializers.Serializer):  # type: ignore[type-arg]
        class Meta:
            ref_name = "Transaction"

        id = serializers.IntegerField(source="transaction.pk")
        kind = serializers.CharField(source="transaction.kind")
        memo = serializers.CharField(source="transaction.memo")
        created_at = serializers.DateTimeField(source="transaction.created_at")
        amount_nanos = serializers.IntegerField(
            source="amount", help_text="positive: credit received; negative: spent"
        )
        balance_after_nanos = serializers.IntegerField(source="balance_after")

    @extend_schema(
        operation_id="organization_transactions_list",
        summary="Movements of the organisation's credit, newest first (paginated)",
        responses={200: OutputSerializer(many=True), **ERRORS},
    )
    def get(self, request: Request, org_slug: str) -> Response:
        access = organization_access(request, org_slug, "billing.view")
        entries = customer_selectors.organization_ledger(organization=access.organization)
        paginator = Pagination()
        page = paginator.paginate_queryset(entries, request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)


class StatementApi(APIView):
    class FilterSerializer(serializers.Serializer):  # type: ignore[type-arg]
        start = serializers.DateField(required=False, help_text="First day (UTC); default: 1st")
        end = serializers.DateField(required=False, help_text="Last day (UTC); default: today")

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            today = timezone.now().date()
            end = attrs.get("end") or today
            start = attrs.get("start") or end.replace(day=1)
            if start > end:
                raise serializers.ValidationError({"end": ["the end is before the start"]})
            if (end - start).days >= MAX_STATEMENT_DAYS:
                raise serializers.ValidationError(
                    {"start": [f"a statement covers at most {MAX_STATEMENT_DAYS} days"]}
                )
            if end >= date.max - timedelta(days=1):
                raise serializers.ValidationError({"end": ["the end is too far away"]})
            return {"start": start, "end": end}

    class OutputSerializer(serializers.Serializer):  # type: ignore[type-arg]
        class Meta:
            ref_name = "Statement"

        class RowSerializer(serializers.Serializer):  # type: ignore[type-arg]
            class Meta:
                ref_name = "StatementRow"

            date = serializers.DateField()
            type = serializers.ChoiceField(choices=["usage", "refund", "payout", "adjustment"])
            reference = serializers.CharField()
            description = serializers.CharField()
            requests = serializers.IntegerField(allow_null=True)
            gross_nanos = serializers.IntegerField(allow_null=True)
            platform_fee_nanos = serializers.IntegerField(allow_null=True)
            net_nanos = serializers.IntegerField()

        start = serializers.DateField()
        end = serializers.DateField()
        opening_balance_nanos = serializers.IntegerField()
        closing_balance_nanos = serializers.IntegerField()
        rows = RowSerializer(many=True)

    @extend_schema(
        operation_id="vendor_statement",
        summary="What the vendor earned, had refunded and was paid over whole days (UTC)",
        parameters=[FilterSerializer],
        responses={200: OutputSerializer, **INPUT_ERRORS},
    )
    def get(self, request: Request, vendor_slug: str) -> Response:
        access = vendor_access(request, vendor_slug, "statements.view")
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        start, end = filters.validated_data["start"], filters.validated_data["end"]
        opening, rows, closing = vendor_statement_rows(vendor=access.vendor, start=start, end=end)

        def amount(value: object) -> int | None:
            return value if isinstance(value, int) else None

        body = {
            "start": start,
            "end": end,
            "opening_balance_nanos": opening,
            "closing_balance_nanos": closing,
            "rows": [
                {
                    "date": row["date"],
                    "type": row["type"],
                    "reference": row["reference"],
                    "description": row["description"],
                    "requests": amount(row["requests"]),
                    "gross_nanos": amount(row["gross"]),
                    "platform_fee_nanos": amount(row["fee"]),
                    "net_nanos": row["net"],
                }
                for row in rows
            ],
        }
        return Response(self.OutputSerializer(body).data)
