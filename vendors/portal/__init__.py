"""The vendor portal: registration, endpoints, conformance checks and pricing."""
