"""Vendors: organisations that sell model endpoints, their endpoints and price curves."""
