import json
import os

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from billing.money import MoneyError, usd_to_nanos
from vendors.models import Endpoint, Vendor
from vendors.services import VendorError, endpoint_approve, endpoint_create


class Command(BaseCommand):
    help = "Register an endpoint for a vendor from flags (and approve it with --approve)."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--vendor", required=True, help="vendor slug")
        parser.add_argument("--slug", required=True)
        parser.add_argument(
            "--url", required=True, help="OpenAI-compatible base URL, e.g. http://host/v1"
        )
        parser.add_argument("--upstream-model", required=True)
        parser.add_argument("--kind", default=Endpoint.Kind.CHAT, choices=Endpoint.Kind.values)
        parser.add_argument("--tags", default="", help="comma-separated capability tags")
        parser.add_argument("--capacity", type=int, default=4)
        parser.add_argument("--context-length", type=int, default=2048)
        parser.add_argument("--price-input-usd", required=True, help="USD per million input tokens")
        parser.add_argument(
            "--price-output-usd", required=True, help="USD per million output tokens"
        )
        parser.add_argument(
            "--secret-env", help="name of an environment variable holding the secret"
        )
        parser.add_argument("--region", default="eu")
        parser.add_argument(
            "--examples-file",
            help='JSON file of example prompts per tag for auto-routing: {"sql": ["...", ...]}',
        )
        parser.add_argument("--approve", action="store_true")

    @transaction.atomic
    def handle(self, *args, **opts):  # type: ignore[no-untyped-def]
        vendor = Vendor.objects.filter(slug=opts["vendor"]).first()
        if vendor is None:
            raise CommandError(f"no vendor with the slug {opts['vendor']!r}")
        secret = ""
        if opts["secret_env"]:
            secret = os.environ.get(opts["secret_env"], "")
            if not secret:
                raise CommandError(f"the environment variable {opts['secret_env']} is empty")
        tag_examples = None
        if opts["examples_file"]:
            try:
                with open(opts["examples_file"], encoding="utf-8") as f:
                    tag_examples = json.load(f)
            except (OSError, ValueError) as exc:
                raise CommandError(f"cannot read {opts['examples_file']}: {exc}") from exc
            if not isinstance(tag_examples, dict):
                raise CommandError("the examples file must hold a JSON object {tag: [prompts]}")
        try:
            price_input = usd_to_nanos(opts["price_input_usd"])
            price_output = usd_to_nanos(opts["price_output_usd"])
        except MoneyError as exc:
            raise CommandError(str(exc)) from exc
        try:
            endpoint = endpoint_create(
                vendor=vendor,
                slug=opts["slug"],
                base_url=opts["url"],
                upstream_model=opts["upstream_model"],
                kind=opts["kind"],
                tags=[t.strip() for t in opts["tags"].split(",") if t.strip()],
                capacity=opts["capacity"],
                context_length=opts["context_length"],
                price_input=price_input,
                price_output=price_output,
                secret=secret,
                region=opts["region"],
                tag_examples=tag_examples,
            )
            if opts["approve"]:
                endpoint = endpoint_approve(endpoint=endpoint)
        except VendorError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"{endpoint.full_slug} ({endpoint.status})")
