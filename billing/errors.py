"""Errors of billing's services: one family, each with a stable code for APIs and logs."""

from __future__ import annotations


class BillingError(Exception):
    """A billing operation that cannot be done as asked."""

    code = "billing_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class TopUpError(BillingError):
    code = "topup_invalid"


class PaymentProviderError(BillingError):
    """Stripe could not be reached or refused the request; nothing was recorded as done."""

    code = "payment_provider_error"


class PayoutPermissionError(BillingError):
    """The actor's role at the vendor does not allow managing its payouts."""

    code = "payouts_forbidden"


class RefundError(BillingError):
    code = "refund_invalid"


class SettlementError(BillingError):
    code = "settlement_invalid"
