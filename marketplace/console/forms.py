"""Forms of the customer console. They check the shape of the input; the services decide."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import orjson
from django import forms
from django.utils import timezone

from billing.money import nanos_to_usd, usd_to_nanos
from marketplace.keys import KEY_SCOPES
from marketplace.models import ApiKey, Membership, PrivacyPolicy
from marketplace.playground import ROUTES as PLAYGROUND_ROUTES
from marketplace.playground import PlaygroundRun
from marketplace.selectors import MAX_USAGE_DAYS
from vendors.portal.forms import EndpointForm

KEY_SCOPE_CHOICES = list(KEY_SCOPES.items())


class OrganizationForm(forms.Form):
    name = forms.CharField(
        label="Organisation name",
        max_length=200,
        help_text="Shown to your team; the address of its console is made from it.",
        widget=forms.TextInput(attrs={"autocomplete": "organization"}),
    )


def role_choices(*, include_owner: bool) -> list[tuple[str, str]]:
    return [
        (value, label)
        for value, label in Membership.Role.choices
        if include_owner or value != Membership.Role.OWNER
    ]


ROLE_HELP = (
    "Owner: everything. Admin: members, keys, credits. Developer: keys and usage. "
    "Billing: credits and usage."
)


class InviteForm(forms.Form):
    email = forms.EmailField(
        label="Email address", widget=forms.EmailInput(attrs={"autocomplete": "off"})
    )
    role = forms.ChoiceField(label="Role", help_text=ROLE_HELP)

    def __init__(self, *args: Any, can_grant_owner: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        role = self.fields["role"]
        assert isinstance(role, forms.ChoiceField)
        role.choices = role_choices(include_owner=can_grant_owner)
        role.initial = Membership.Role.DEVELOPER


class RoleForm(forms.Form):
    role = forms.ChoiceField(label="Role", choices=Membership.Role.choices)


class ApiKeyForm(forms.Form):
    name = forms.CharField(
        label="Name",
        max_length=100,
        help_text="What the key is for, e.g. “production backend”.",
    )
    scopes = forms.MultipleChoiceField(
        label="Scopes",
        choices=KEY_SCOPE_CHOICES,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Which APIs the key may call. Leave all unticked to allow every API.",
    )
    credit_limit_usd = forms.DecimalField(
        label="Credit limit (USD)",
        required=False,
        min_value=Decimal("0.01"),
        max_value=Decimal("1000000"),
        decimal_places=2,
        help_text="The most this key may spend per period; empty: no limit.",
        widget=forms.NumberInput(attrs={"step": "0.01", "inputmode": "decimal"}),
    )
    credit_limit_period = forms.ChoiceField(
        label="Limit resets",
        choices=ApiKey.Period.choices,
        initial=ApiKey.Period.NEVER,
        help_text="“Never” makes the limit a lifetime total.",
    )
    rate_limit_rpm = forms.IntegerField(
        label="Requests per minute",
        required=False,
        min_value=1,
        max_value=100_000,
        help_text="Empty: no per-key rate limit.",
    )
    expires_on = forms.DateField(
        label="Expires on (UTC)",
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
        help_text="The key stops working at the start of this day; empty: never.",
    )

    def clean_expires_on(self) -> date | None:
        value: date | None = self.cleaned_data.get("expires_on")
        if value is not None and value <= timezone.now().date():
            raise forms.ValidationError("Choose a day after today.")
        return value

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        limit = data.get("credit_limit_usd")
        period = data.get("credit_limit_period")
        if limit is None and period and period != ApiKey.Period.NEVER:
            self.add_error("credit_limit_period", "Set a credit limit to choose when it resets.")
        return data

    def service_arguments(self) -> dict[str, Any]:
        data = self.cleaned_data
        expires = data.get("expires_on")
        limit = data.get("credit_limit_usd")
        return {
            "name": data["name"],
            "scopes": list(data.get("scopes") or []),
            "credit_limit": usd_to_nanos(limit) if limit is not None else None,
            "credit_limit_period": data["credit_limit_period"],
            "rate_limit_rpm": data.get("rate_limit_rpm"),
            "expires_at": (
                datetime.combine(expires, time.min, tzinfo=timezone.get_current_timezone())
                if expires
                else None
            ),
        }


class UsageRangeForm(forms.Form):
    start = forms.DateField(label="From", widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(label="To", widget=forms.DateInput(attrs={"type": "date"}))

    DEFAULT_DAYS = 7

    @classmethod
    def default_range(cls) -> tuple[date, date]:
        today = timezone.now().date()
        return today - timedelta(days=cls.DEFAULT_DAYS - 1), today

    @classmethod
    def from_query(cls, query: Any) -> UsageRangeForm:
        start, end = cls.default_range()
        data = {"start": query.get("start") or start, "end": query.get("end") or end}
        return cls(data)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        start, end = data.get("start"), data.get("end")
        if start and end:
            if start > end:
                self.add_error("end", "The end date must not be before the start date.")
            elif (end - start).days + 1 > MAX_USAGE_DAYS:
                self.add_error("start", f"Choose at most {MAX_USAGE_DAYS} days.")
        return data

    def range(self) -> tuple[date, date]:
        """The chosen days, or the default ones when the input is invalid."""
        if self.is_valid():
            return self.cleaned_data["start"], self.cleaned_data["end"]
        return self.default_range()


def _usd_field(label: str, help_text: str, *, min_value: str, places: int) -> forms.DecimalField:
    step = "0.01" if places == 2 else "any"
    return forms.DecimalField(
        label=label,
        required=False,
        min_value=Decimal(min_value),
        max_value=Decimal("1000000"),
        decimal_places=places,
        help_text=help_text,
        widget=forms.NumberInput(attrs={"step": step, "inputmode": "decimal"}),
    )


class BudgetForm(forms.Form):
    monthly_budget_usd = _usd_field(
        "Monthly budget (USD)",
        "Owners and billing members are emailed as spend in a calendar month (UTC) nears and "
        "reaches it; requests are not stopped. Empty: no budget.",
        min_value="0.01",
        places=2,
    )
    budget_alert_percent = forms.IntegerField(
        label="Early warning at (% of the budget)",
        min_value=1,
        max_value=100,
        initial=80,
    )
    low_balance_alert_usd = _usd_field(
        "Low-balance alert (USD)",
        "Email when the credit balance falls below this (at most once a month). Empty: never.",
        min_value="0.01",
        places=2,
    )
    reference_price_input_usd = _usd_field(
        "Reference input price (USD per million tokens)",
        "What your reference model charges, to show what you save. Empty: not set.",
        min_value="0",
        places=9,
    )
    reference_price_output_usd = _usd_field(
        "Reference output price (USD per million tokens)",
        "Empty: not set.",
        min_value="0",
        places=9,
    )

    FIELDS = {
        "monthly_budget_usd": "monthly_budget",
        "low_balance_alert_usd": "low_balance_alert",
        "reference_price_input_usd": "reference_price_input",
        "reference_price_output_usd": "reference_price_output",
    }

    @classmethod
    def for_organization(cls, organization: Any) -> BudgetForm:
        initial: dict[str, Any] = {"budget_alert_percent": organization.budget_alert_percent}
        for field, attr in cls.FIELDS.items():
            value = getattr(organization, attr)
            initial[field] = (
                format(nanos_to_usd(value).normalize(), "f") if value is not None else None
            )
        return cls(initial=initial)

    def service_arguments(self) -> dict[str, Any]:
        data = self.cleaned_data
        arguments: dict[str, Any] = {"budget_alert_percent": data["budget_alert_percent"]}
        for field, attr in self.FIELDS.items():
            value = data.get(field)
            arguments[attr] = usd_to_nanos(value) if value is not None else None
        return arguments


class TopUpForm(forms.Form):
    """How much credit to buy by card: whole US dollars or dollars and cents."""

    amount_usd = forms.CharField(
        label="Amount (USD)",
        max_length=32,
        widget=forms.TextInput(attrs={"inputmode": "decimal", "autocomplete": "off"}),
    )

    def __init__(self, *args: Any, min_cents: int, max_cents: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_cents, self.max_cents = min_cents, max_cents
        self.fields["amount_usd"].help_text = (
            f"From {_cents_text(min_cents)} to {_cents_text(max_cents)}, "
            "in whole dollars or dollars and cents (for example 25 or 25.50)."
        )

    def clean_amount_usd(self) -> int:
        """The amount in US cents (an ``int``)."""
        raw = str(self.cleaned_data["amount_usd"]).strip().replace(",", "")
        raw = raw.removeprefix("$").strip()
        try:
            amount = Decimal(raw)
        except ArithmeticError:
            amount = None
        if amount is None or not amount.is_finite():
            raise forms.ValidationError(
                "Enter an amount in US dollars, such as 25 or 25.50.", code="invalid"
            )
        if amount != amount.quantize(Decimal("0.01")):
            raise forms.ValidationError(
                "Enter whole dollars or dollars and cents (at most two decimal places).",
                code="precision",
            )
        cents = int(amount * 100)
        if not self.min_cents <= cents <= self.max_cents:
            raise forms.ValidationError(
                f"Enter an amount from {_cents_text(self.min_cents)} "
                f"to {_cents_text(self.max_cents)}.",
                code="out_of_range",
            )
        return cents


def _cents_text(cents: int) -> str:
    return f"${cents // 100:,}.{cents % 100:02d}"


class PlaygroundForm(forms.Form):
    """One playground run; the tag and endpoint choices are what the catalog offers."""

    prompt = forms.CharField(
        label="Prompt",
        max_length=8000,
        widget=forms.Textarea(attrs={"rows": 5}),
        error_messages={"required": "Type a prompt to send."},
    )
    route = forms.ChoiceField(
        label="How to route",
        choices=list(PLAYGROUND_ROUTES.items()),
        initial="auto",
        widget=forms.RadioSelect,
    )
    tag = forms.ChoiceField(
        label="Capability tag",
        required=False,
        help_text="For a tag, the cheapest, the fastest or a cascade.",
    )
    endpoint = forms.ChoiceField(
        label="Endpoint", required=False, help_text="For one vendor's endpoint."
    )
    generalist = forms.ChoiceField(
        label="Generalist",
        required=False,
        help_text="The model that plans and calls the specialists: an endpoint or a tag.",
    )
    max_tokens = forms.IntegerField(
        label="Longest answer (tokens)", min_value=1, max_value=1024, initial=128
    )
    cascade_threshold = forms.DecimalField(
        label="Cascade confidence threshold",
        min_value=Decimal("0.01"),
        max_value=Decimal("0.99"),
        decimal_places=2,
        initial=Decimal("0.6"),
        help_text="Below this confidence the next, dearer tier answers.",
        widget=forms.NumberInput(attrs={"step": "0.05", "inputmode": "decimal"}),
    )

    def __init__(
        self, *args: Any, tags: list[str], endpoints: list[tuple[str, str]], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        tag = self.fields["tag"]
        endpoint = self.fields["endpoint"]
        assert isinstance(tag, forms.ChoiceField) and isinstance(endpoint, forms.ChoiceField)
        tag.choices = [(t, t) for t in tags]
        tag.initial = "chat" if "chat" in tags else (tags[0] if tags else None)
        endpoint.choices = [("", "Choose an endpoint"), *endpoints]
        generalist = self.fields["generalist"]
        assert isinstance(generalist, forms.ChoiceField)
        generalist.choices = [
            ("", "Choose the generalist"),
            *endpoints,
            *((f"tag:{t}", f"Any endpoint with the tag {t}") for t in tags),
        ]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        route = data.get("route")
        if route == "endpoint" and not data.get("endpoint"):
            self.add_error("endpoint", "Choose the endpoint to send the prompt to.")
        if route in {"tag", "cheapest", "fastest", "cascade"} and not data.get("tag"):
            self.add_error("tag", "Choose a capability tag.")
        if route == "orchestrate" and not data.get("generalist"):
            self.add_error("generalist", "Choose the generalist that calls the specialists.")
        return data

    def run(self) -> PlaygroundRun:
        data = self.cleaned_data
        return PlaygroundRun(
            prompt=data["prompt"],
            route=data["route"],
            tag=data.get("tag") or "chat",
            endpoint=data.get("endpoint") or "",
            max_tokens=data["max_tokens"],
            cascade_threshold=float(data["cascade_threshold"]),
            generalist=data.get("generalist") or "",
        )


class DataPolicyForm(forms.Form):
    """The organisation's privacy guard and response-cache defaults."""

    privacy_policy = forms.ChoiceField(
        label="Personal data in prompts",
        choices=PrivacyPolicy.choices,
        widget=forms.RadioSelect,
        help_text="E-mail addresses, phone, card and bank numbers and names are detected "
        "before a prompt leaves for a vendor. Traces record the kinds found, never the values.",
    )
    trusted_regions = forms.CharField(
        label="Trusted regions",
        required=False,
        max_length=200,
        help_text="With “trusted endpoints only”: also keep prompts with personal data in "
        "these regions, comma-separated (for example <code>eu</code>). Empty: any region.",
    )
    cache_ttl = forms.IntegerField(
        label="Reuse cached answers for (seconds)",
        min_value=0,
        max_value=30 * 24 * 3600,
        initial=0,
        help_text="Deterministic requests (temperature 0 or a seed) repeated within this time "
        "are answered from the cache, free. 0: only requests that ask for it are cached.",
    )
    cache_similarity = forms.DecimalField(
        label="Semantic cache similarity (0.500 to 1.000)",
        required=False,
        min_value=Decimal("0.5"),
        max_value=Decimal("1"),
        decimal_places=3,
        help_text="Also reuse the answer to a differently worded prompt this similar. "
        "Empty: exact repeats only.",
    )

    @classmethod
    def for_organization(cls, organization: Any) -> DataPolicyForm:
        similarity = organization.cache_similarity
        return cls(
            initial={
                "privacy_policy": organization.privacy_policy,
                "trusted_regions": organization.trusted_regions.replace(",", ", "),
                "cache_ttl": organization.cache_ttl,
                "cache_similarity": Decimal(similarity) / 1000 if similarity is not None else None,
            }
        )

    def service_arguments(self) -> dict[str, Any]:
        data = self.cleaned_data
        similarity = data.get("cache_similarity")
        return {
            "privacy_policy": data["privacy_policy"],
            "trusted_regions": data.get("trusted_regions") or "",
            "cache_ttl": data["cache_ttl"],
            "cache_similarity": int(similarity * 1000) if similarity is not None else None,
        }


class RoutingPolicyForm(forms.Form):
    """The organisation's routing policy: a ``provider`` object as JSON."""

    provider = forms.CharField(
        label="Default provider policy (JSON)",
        required=False,
        max_length=8000,
        widget=forms.Textarea(attrs={"rows": 10, "spellcheck": "false", "class": "mono"}),
        help_text="Merged under every request's <code>provider</code> object: the request "
        "wins field by field, <code>ignore</code> lists add up, <code>only</code> and "
        "<code>region</code> narrow each other, <code>data_collection: deny</code> holds if "
        "either side asks. Empty: none.",
    )

    @classmethod
    def for_organization(cls, organization: Any) -> RoutingPolicyForm:
        value = organization.routing_defaults
        text = orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() if value else ""
        return cls(initial={"provider": text})

    def clean_provider(self) -> Any:
        text = (self.cleaned_data.get("provider") or "").strip()
        if not text:
            return {}
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise forms.ValidationError(f"This is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise forms.ValidationError('The policy is a JSON object, like {"ignore": ["acme"]}.')
        return value


class KeyDataPolicyForm(forms.Form):
    """One key's overrides of the organisation's privacy and cache settings."""

    privacy_policy = forms.ChoiceField(
        label="Personal data in prompts",
        choices=[("", "As the organisation"), *PrivacyPolicy.choices],
        required=False,
        widget=forms.RadioSelect,
    )
    cache_ttl = forms.IntegerField(
        label="Reuse cached answers for (seconds)",
        required=False,
        min_value=0,
        max_value=30 * 24 * 3600,
        help_text="Empty: as the organisation. 0: no cache unless a request asks for it.",
    )
    cache_similarity = forms.DecimalField(
        label="Semantic cache similarity (0.500 to 1.000)",
        required=False,
        min_value=Decimal("0.5"),
        max_value=Decimal("1"),
        decimal_places=3,
        help_text="Empty: as the organisation.",
    )
    log_content = forms.BooleanField(
        label="Keep prompts and completions in this key's route traces",
        required=False,
        help_text="Off by default: traces record how a request was routed, never what it "
        "said. On: the prompt (as sent to the vendor, after redaction) and the completion are "
        "kept with each trace, up to 32,768 characters each, for as long as traces are kept.",
    )

    @classmethod
    def for_key(cls, key: ApiKey) -> KeyDataPolicyForm:
        similarity = key.cache_similarity
        return cls(
            initial={
                "privacy_policy": key.privacy_policy,
                "cache_ttl": key.cache_ttl,
                "cache_similarity": Decimal(similarity) / 1000 if similarity is not None else None,
                "log_content": key.log_content,
            }
        )

    def service_arguments(self) -> dict[str, Any]:
        data = self.cleaned_data
        similarity = data.get("cache_similarity")
        return {
            "privacy_policy": data.get("privacy_policy") or "",
            "cache_ttl": data.get("cache_ttl"),
            "cache_similarity": int(similarity * 1000) if similarity is not None else None,
            "log_content": bool(data.get("log_content")),
        }


class PrivateEndpointForm(EndpointForm):
    """The vendor portal's endpoint form (the same fields, checks and placement of the
    service's errors) without what only a public listing needs; prices start at 0."""

    # Example prompts only feed auto-routing's shared classifier, which private endpoints
    # never steer (routing.auto.tag_examples_from_db skips them).
    OMITTED = ("domains", "languages", "region", "data_retention_days", "tag_examples")
    DEFAULTS: dict[str, Any] = {"domains": [], "languages": [], "region": "eu"}

    def __init__(self, *args: Any, vendor_slug: str = "private-organisation", **kwargs: Any):
        super().__init__(*args, **kwargs)
        for name in self.OMITTED:
            del self.fields[name]
        self.fields[
            "slug"
        ].help_text = (
            f"Lowercase letters, digits and dashes; your keys call it as {vendor_slug}/name."
        )
        self.fields["base_url"].help_text = (
            "Your model server's OpenAI-compatible base, e.g. https://llm.example.com/v1. "
            "It must be reachable from the internet."
        )
        self.fields[
            "tags"
        ].help_text = (
            "Comma-separated, e.g. sql, chat: your requests for tag:sql can be routed to it."
        )
        for name in ("price_input_usd", "price_output_usd"):
            self.fields[name].initial = 0
            self.fields[name].help_text = (
                "US dollars per million tokens, charged to your credit when you use it; "
                "0: you pay your own vendor directly."
            )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        for name, value in self.DEFAULTS.items():
            data.setdefault(name, value)
        data.setdefault("data_retention_days", 0)
        return data
