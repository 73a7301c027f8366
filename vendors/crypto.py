"""Encryption at rest for vendor secrets (MultiFernet: the first key encrypts, all decrypt)."""

from __future__ import annotations

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


@lru_cache(maxsize=1)
def _fernet() -> MultiFernet:
    return MultiFernet([Fernet(key.encode()) for key in settings.FIELD_ENCRYPTION_KEYS])


def encrypt_secret(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode() if plaintext else ""


def decrypt_secret(token: str) -> str:
    if not token:
        return ""
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise ValueError("the secret cannot be decrypted with the configured keys") from None


def rotate_secret(token: str) -> str:
    """Re-encrypt with the newest key (run after prepending a key to FIELD_ENCRYPTION_KEYS)."""
    return _fernet().rotate(token.encode()).decode() if token else ""
