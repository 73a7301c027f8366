from django.urls import path

from billing import views

app_name = "billing"

urlpatterns = [
    path("webhooks/stripe", views.stripe_webhook, name="stripe-webhook"),
    path("webhooks/stripe-connect", views.stripe_connect_webhook, name="stripe-connect-webhook"),
    path("topups/return", views.topup_return, name="topup-return"),
]
