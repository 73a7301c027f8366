"""Switchyard's Django project package and the customer side of the marketplace."""

from marketplace.celery import app as celery_app

__all__ = ["celery_app"]
