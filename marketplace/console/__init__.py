"""The customer console: organisations, members, API keys, credits and usage."""
