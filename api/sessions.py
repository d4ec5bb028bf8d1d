"""WebUI login sessions and the brake on guessing the token.

A session is a signed cookie carrying its expiry and the login name:
`<expiry>.<nonce>.<user, base64url>.<mac>`; the login name is the WebUI's user id.
The signing key is derived from the service token, so every instance behind a
load balancer accepts the sessions of the others, and changing the token ends
them all. Nothing is kept in memory per session.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import base64
import binascii
import secrets
import time
from typing import Optional

COOKIE = "chatllm_session"
_MAX_COOKIE = 400
MAX_LOGIN_NAME = 64


class SessionSigner:
    def __init__(self, token: str, ttl_seconds: float) -> None:
        self._key = hmac.new(token.encode("utf-8"), b"chatllm-webui session v1", hashlib.sha256).digest()
        self.ttl_seconds = ttl_seconds

    def _mac(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).hexdigest()

    def issue(self, now: Optional[float] = None, user: str = "") -> str:
        expiry = int((now or time.time()) + self.ttl_seconds)
        name = base64.urlsafe_b64encode(user[:MAX_LOGIN_NAME].encode("utf-8")).decode("ascii").rstrip("=")
        payload = f"{expiry}.{secrets.token_hex(8)}.{name}"
        return f"{payload}.{self._mac(payload)}"

    def user(self, value: Optional[str], now: Optional[float] = None) -> Optional[str]:
        """The login name a valid session carries ("" when none was given); None when the session is not valid."""
        if not self.valid(value, now):
            return None
        name = value.rpartition(".")[0].split(".")[2] if value.count(".") >= 3 else ""
        try:
            return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return ""

    def valid(self, value: Optional[str], now: Optional[float] = None) -> bool:
        if not value or len(value) > _MAX_COOKIE or not value.isascii():
            return False
        payload, _, mac = value.rpartition(".")
        expiry = payload.partition(".")[0]
        if not expiry.isdigit() or not hmac.compare_digest(mac, self._mac(payload)):
            return False
        return int(expiry) > (now or time.time())


class FailureLimiter:
    """Counts failed logins and wrong tokens per client address in a sliding window."""

    def __init__(self, max_failures: int, window_seconds: float = 60.0, max_clients: int = 10_000) -> None:
        self.max_failures = max_failures
        self.window = window_seconds
        self._max_clients = max_clients
        self._failures: dict[str, collections.deque[float]] = {}

    def retry_after(self, client: str, now: Optional[float] = None) -> float:
        """Seconds until `client` may try again; 0 when it may now."""
        now = now or time.monotonic()
        recent = self._recent(client, now)
        if self.max_failures <= 0 or recent is None or len(recent) < self.max_failures:
            return 0.0
        return max(0.0, recent[0] + self.window - now)

    def record(self, client: str, now: Optional[float] = None) -> None:
        now = now or time.monotonic()
        if len(self._failures) >= self._max_clients:
            self._prune(now)
        recent = self._recent(client, now)
        if recent is None:
            recent = self._failures[client] = collections.deque(maxlen=max(self.max_failures, 1))
        recent.append(now)

    def _recent(self, client: str, now: float) -> Optional[collections.deque[float]]:
        recent = self._failures.get(client)
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        return recent

    def _prune(self, now: float) -> None:
        for client in [c for c, d in self._failures.items() if not d or d[-1] <= now - self.window]:
            del self._failures[client]
        while len(self._failures) >= self._max_clients:  # everyone is recent: forget the oldest
            del self._failures[next(iter(self._failures))]
