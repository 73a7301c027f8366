from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from vendors.selectors import catalog_endpoints


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "home.html", {"endpoints": catalog_endpoints()})


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})
