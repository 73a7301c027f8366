from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from marketplace import views
from marketplace.console.catalog import catalog

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("accounts/", include("allauth.urls")),
    path("billing/", include("billing.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/v1/", include("marketplace.api_urls")),
    path("catalog/", catalog, name="catalog"),
    path("console/", include("marketplace.console.urls")),
    path("vendor/", include("vendors.portal.urls")),
    path("ops/", include("marketplace.ops.urls")),
]
