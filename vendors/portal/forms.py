"""Forms of the vendor portal. They check the shape of the input; the services decide."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms

from billing.money import nanos_to_usd, usd_to_nanos
from vendors.models import Endpoint, VendorMembership
from vendors.pricing import SurgeCurveError, validate_surge_curve
from vendors.services import MAX_SURGE_CAP
from vendors.tag_examples import (
    MAX_EXAMPLE_CHARS,
    MAX_VENDOR_EXAMPLES_PER_TAG,
    TagExamplesError,
    tag_examples_clean,
)

SURGE_POINTS = 6  # rows offered by the pricing editor (blank rows are ignored)

PRICE_HELP = "US dollars per million tokens."


def _price_field(label: str) -> forms.DecimalField:
    return forms.DecimalField(
        label=label,
        min_value=Decimal(0),
        max_value=Decimal(100_000),
        max_digits=15,
        decimal_places=9,
        help_text=PRICE_HELP,
        widget=forms.NumberInput(attrs={"step": "any", "inputmode": "decimal"}),
    )


def _plain(value: Decimal) -> str:
    """A decimal for an input box: no exponent, no trailing zeros (``100``, ``0.15``)."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.replace("\n", ",").split(",") if part.strip()]


class VendorRegisterForm(forms.Form):
    name = forms.CharField(
        label="Vendor name",
        max_length=200,
        help_text="Customers see it next to your models; your portal address is made from it.",
        widget=forms.TextInput(attrs={"autocomplete": "organization"}),
    )


VENDOR_ROLE_HELP = (
    "Owner: everything, including owners. Admin: members, pricing, revenue and payouts. "
    "Developer: endpoints and conformance checks."
)


def vendor_role_choices(*, include_owner: bool) -> list[tuple[str, str]]:
    return [
        (value, label)
        for value, label in VendorMembership.Role.choices
        if include_owner or value != VendorMembership.Role.OWNER
    ]


class VendorInviteForm(forms.Form):
    email = forms.EmailField(
        label="Email address", widget=forms.EmailInput(attrs={"autocomplete": "off"})
    )
    role = forms.ChoiceField(label="Role", help_text=VENDOR_ROLE_HELP)

    def __init__(self, *args: Any, can_grant_owner: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        role = self.fields["role"]
        assert isinstance(role, forms.ChoiceField)
        role.choices = vendor_role_choices(include_owner=can_grant_owner)
        role.initial = VendorMembership.Role.DEVELOPER


class VendorRoleForm(forms.Form):
    role = forms.ChoiceField(label="Role", choices=VendorMembership.Role.choices)


TAG_EXAMPLES_HELP = (
    "One per line, written as <em>tag: prompt</em>, e.g. "
    "<code>sql: Which customers spent most last month?</code> Once the endpoint is approved, "
    'auto-routing (<code>model: "auto"</code>) learns from them which prompts belong to '
    f"each tag. Only your tags above; at most {MAX_VENDOR_EXAMPLES_PER_TAG} per tag, "
    f"{MAX_EXAMPLE_CHARS} characters each."
)
# Enough for 20 prompts of 500 characters for a few tags; more is refused before parsing.
MAX_TAG_EXAMPLES_TEXT = 100_000


def _example_lines(text: str) -> tuple[list[tuple[int, str, str]], list[str]]:
    """``(line number, tag, prompt)`` for each non-blank line, and the lines' problems."""
    entries: list[tuple[int, str, str]] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        tag, colon, prompt = line.partition(":")
        if not colon or not tag.strip():
            problems.append(
                f"Line {number}: write it as “tag: prompt”, e.g. “sql: Which customers spent "
                "most last month?”."
            )
        elif not prompt.strip():
            problems.append(f"Line {number}: the example prompt after “{tag.strip()}:” is empty.")
        else:
            entries.append((number, tag.strip().lower(), prompt.strip()))
    return entries, problems


class EndpointForm(forms.Form):
    slug = forms.SlugField(
        label="Endpoint name",
        max_length=64,
        help_text="Lowercase letters, digits and dashes; customers call it as vendor/name.",
    )
    base_url = forms.CharField(
        label="Base URL",
        max_length=500,
        help_text="Your OpenAI-compatible base, e.g. https://models.example.com/v1.",
        widget=forms.URLInput(attrs={"inputmode": "url", "autocomplete": "url"}),
    )
    upstream_model = forms.CharField(
        label="Upstream model",
        max_length=200,
        help_text="The model name your server expects in requests.",
    )
    secret = forms.CharField(
        label="Secret (bearer token)",
        required=False,
        max_length=500,
        strip=True,
        help_text="Sent as “Authorization: Bearer …” to your server. Stored encrypted; "
        "never shown again.",
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
    )
    kind = forms.ChoiceField(label="Kind", choices=Endpoint.Kind.choices)
    tags = forms.CharField(
        label="Capability tags",
        required=False,
        help_text="Comma-separated, e.g. sql, chat. Customers route by tag:sql.",
        widget=forms.TextInput(attrs={"list": "known-tags", "autocomplete": "off"}),
    )
    tag_examples = forms.CharField(
        label="Example prompts",
        required=False,
        max_length=MAX_TAG_EXAMPLES_TEXT,
        strip=False,  # line numbers in messages must match what the vendor typed
        help_text=TAG_EXAMPLES_HELP,
        widget=forms.Textarea(
            attrs={
                "rows": 4,
                "spellcheck": "false",
                "placeholder": "sql: Which customers spent most last month?\n"
                "sql: Write a query for the top 10 products by revenue.",
            }
        ),
    )
    domains = forms.CharField(
        label="Domains", required=False, help_text="Comma-separated, e.g. finance, legal."
    )
    languages = forms.CharField(
        label="Languages", required=False, help_text="Comma-separated codes, e.g. en, de."
    )
    context_length = forms.IntegerField(
        label="Context length (tokens)", min_value=16, max_value=10_000_000, initial=2048
    )
    capacity = forms.IntegerField(
        label="Capacity (concurrent requests)", min_value=1, max_value=100_000, initial=4
    )
    region = forms.CharField(
        label="Region",
        max_length=32,
        initial="eu",
        help_text="Where requests are processed, e.g. eu, us.",
        widget=forms.TextInput(attrs={"list": "known-regions"}),
    )
    data_retention_days = forms.IntegerField(
        label="Data retention (days)",
        min_value=0,
        max_value=3650,
        initial=0,
        help_text="How long you keep prompts and answers; 0: not kept.",
    )
    price_input_usd = _price_field("Input price")
    price_output_usd = _price_field("Output price")

    # Which field a service error belongs on, by a phrase of its message.
    ERROR_FIELDS = (
        ("example prompt", "tag_examples"),  # before "capability tag": its messages name tags
        ("URL", "base_url"),
        ("slug", "slug"),
        ("exists already", "slug"),
        ("upstream model", "upstream_model"),
        ("capability tag", "tags"),
        ("kind", "kind"),
        ("capacity", "capacity"),
        ("context length", "context_length"),
        ("prices", "price_input_usd"),
    )

    def clean_tags(self) -> list[str]:
        return [tag.lower() for tag in _split(self.cleaned_data.get("tags", ""))]

    def clean_domains(self) -> list[str]:
        return _split(self.cleaned_data.get("domains", ""))

    def clean_languages(self) -> list[str]:
        return [lang.lower() for lang in _split(self.cleaned_data.get("languages", ""))]

    def clean_tag_examples(self) -> list[tuple[int, str, str]]:
        entries, problems = _example_lines(self.cleaned_data.get("tag_examples") or "")
        if problems:
            raise forms.ValidationError(problems)
        return entries

    def clean(self) -> dict[str, Any]:
        """Check the example prompts against the tags, naming the offending line."""
        data = super().clean() or {}
        entries = data.get("tag_examples")
        if "tag_examples" in self.fields and isinstance(entries, list) and "tags" in data:
            try:
                data["tag_examples"] = tag_examples_clean(
                    [(tag, prompt) for _, tag, prompt in entries], tags=data["tags"]
                )
            except TagExamplesError as exc:
                text = str(exc)
                line = entries[exc.position][0]
                self.add_error("tag_examples", f"Line {line}: {text[:1].upper()}{text[1:]}.")
        return data

    def service_arguments(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "slug": data["slug"],
            "base_url": data["base_url"].strip(),
            "upstream_model": data["upstream_model"],
            "secret": data.get("secret") or "",
            "kind": data["kind"],
            "tags": data["tags"],
            "domains": data["domains"],
            "languages": data["languages"],
            "context_length": data["context_length"],
            "capacity": data["capacity"],
            "region": data["region"].strip().lower(),
            "data_retention_days": data["data_retention_days"],
            "price_input": usd_to_nanos(data["price_input_usd"]),
            "price_output": usd_to_nanos(data["price_output_usd"]),
            "tag_examples": data.get("tag_examples") or {},
        }

    def add_service_error(self, message: str) -> None:
        for phrase, field in self.ERROR_FIELDS:
            if phrase.lower() in message.lower() and field in self.fields:
                self.add_error(field, message)
                return
        self.add_error(None, message)


class PricingForm(forms.Form):
    """Base prices, a surge cap and up to ``SURGE_POINTS`` curve points.

    Utilisation is entered in percent (0-100) and stored as a fraction (0-1); the curve is
    validated with ``vendors.pricing.validate_surge_curve``, the same rules the service uses.
    """

    price_input_usd = _price_field("Input price")
    price_output_usd = _price_field("Output price")
    surge_cap = forms.DecimalField(
        label="Surge cap (multiplier)",
        min_value=Decimal(1),
        max_value=Decimal(str(MAX_SURGE_CAP)),
        max_digits=6,
        decimal_places=2,
        help_text="The price never exceeds base price times the cap.",
        widget=forms.NumberInput(attrs={"step": "0.05", "inputmode": "decimal"}),
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for i in range(SURGE_POINTS):
            self.fields[f"u_{i}"] = forms.DecimalField(
                label=f"Point {i + 1}: utilisation (%)",
                required=False,
                min_value=Decimal(0),
                max_value=Decimal(100),
                max_digits=6,
                decimal_places=2,
                widget=forms.NumberInput(
                    attrs={"step": "1", "inputmode": "decimal", "data-point": i, "data-axis": "u"}
                ),
            )
            self.fields[f"m_{i}"] = forms.DecimalField(
                label=f"Point {i + 1}: multiplier",
                required=False,
                min_value=Decimal(1),
                max_value=Decimal(100),
                max_digits=6,
                decimal_places=3,
                widget=forms.NumberInput(
                    attrs={
                        "step": "0.05",
                        "inputmode": "decimal",
                        "data-point": i,
                        "data-axis": "m",
                    }
                ),
            )

    @classmethod
    def initial_for(cls, endpoint: Endpoint) -> dict[str, Any]:
        initial: dict[str, Any] = {
            "price_input_usd": _plain(nanos_to_usd(endpoint.price_input)),
            "price_output_usd": _plain(nanos_to_usd(endpoint.price_output)),
            "surge_cap": _plain(Decimal(str(endpoint.surge_cap))),
        }
        for i, (u, m) in enumerate(endpoint.surge_curve[:SURGE_POINTS]):
            initial[f"u_{i}"] = _plain(Decimal(str(u)) * 100)
            initial[f"m_{i}"] = _plain(Decimal(str(m)))
        return initial

    def point_rows(self) -> list[tuple[forms.BoundField, forms.BoundField]]:
        return [(self[f"u_{i}"], self[f"m_{i}"]) for i in range(SURGE_POINTS)]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        curve: list[list[float]] = []
        for i in range(SURGE_POINTS):
            u, m = data.get(f"u_{i}"), data.get(f"m_{i}")
            if f"u_{i}" in self.errors or f"m_{i}" in self.errors:
                continue
            if u is None and m is None:
                continue
            if u is None:
                self.add_error(f"u_{i}", "Enter the utilisation of this point, or clear it.")
            elif m is None:
                self.add_error(f"m_{i}", "Enter the multiplier of this point, or clear it.")
            else:
                curve.append([float(u) / 100, float(m)])
        if not self.errors:
            try:
                validate_surge_curve(curve)
            except SurgeCurveError as exc:
                text = str(exc)
                self.add_error(None, f"Surge curve: {text[:1].upper()}{text[1:]}.")
        data["surge_curve"] = curve
        return data

    def service_arguments(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "price_input": usd_to_nanos(data["price_input_usd"]),
            "price_output": usd_to_nanos(data["price_output_usd"]),
            "surge_curve": data["surge_curve"],
            "surge_cap": float(data["surge_cap"]),
        }
