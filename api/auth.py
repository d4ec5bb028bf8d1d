"""The token comparison shared by the request guard and the login page (EAS bare token or Bearer)."""

from __future__ import annotations

import hmac
from typing import Optional


def token_matches(presented: Optional[str], token: str) -> bool:
    """Constant-time comparison; `Bearer ` in front is accepted, as OpenAI clients send it."""
    if not presented:
        return False
    presented = presented.strip()
    if presented[:7].lower() == "bearer ":
        presented = presented[7:].strip()
    return hmac.compare_digest(presented.encode("utf-8"), token.encode("utf-8"))
