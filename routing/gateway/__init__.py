"""The OpenAI-compatible gateway: a lean ASGI app beside Django (see marketplace/asgi.py)."""
