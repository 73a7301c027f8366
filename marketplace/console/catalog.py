"""The public catalog: every approved public endpoint and capability tag."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from marketplace.selectors import catalog as catalog_entries


def catalog(request: HttpRequest) -> HttpResponse:
    tag = request.GET.get("tag", "").strip().lower() or None
    entries, tags = catalog_entries(tag=tag)
    return render(request, "catalog.html", {"entries": entries, "tags": tags, "tag": tag})
