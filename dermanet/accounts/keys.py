"""API keys: `dn_<key id>_<secret>`. The key id is public (it finds the row); the secret has
256 bits from `secrets` and is stored only as HMAC-SHA256 under a per-key salt.

A fast keyed hash is enough for a random 256-bit secret (nothing to brute-force, unlike a
password), and it costs microseconds per request; comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "dn"
KEY_PATTERN = re.compile(r"^dn_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class NewKey:
    """A key as shown once to its owner, and what the database keeps of it."""

    text: str
    key_id: str
    salt: str
    secret_hash: str


def hash_secret(secret: str, salt: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode(), hashlib.sha256).hexdigest()


def new_key() -> NewKey:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)  # 43 characters
    salt = secrets.token_hex(16)
    return NewKey(f"{PREFIX}_{key_id}_{secret}", key_id, salt, hash_secret(secret, salt))


def parse_key(text: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    match = KEY_PATTERN.match(text.strip())
    return (match.group(1), match.group(2)) if match else None


def secret_matches(secret: str, salt: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret, salt), secret_hash)
