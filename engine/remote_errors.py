"""What a failing inference engine means for the client: each kind of failure its own error and status."""

from __future__ import annotations

import httpx

from engine.types import EngineError, EngineOverloadedError


class EngineUnavailableError(EngineError):
    """The inference engine cannot be reached or says it is not serving (503: retry later)."""


class EngineUpstreamError(EngineError):
    """The inference engine answered with a failure of its own (502)."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class EngineRejectedError(EngineError):
    """The inference engine refused this request as invalid (400, with its reason)."""


def error_for_status(status: int, message: str, url: str) -> EngineError:
    if status in (400, 413, 422):
        return EngineRejectedError(f"the inference engine refused the request: {message}")
    if status == 429:
        return EngineOverloadedError(f"the inference engine is busy: {message}")
    if status == 503:
        return EngineUnavailableError(f"the inference engine at {url} is not serving (503): {message}")
    if status in (401, 403):
        return EngineUpstreamError(f"the inference engine at {url} refused our credentials ({status}); "
                                   "check --engine-api-key", retryable=False)
    if status == 404:
        return EngineUpstreamError(f"the inference engine at {url} answered 404: {message} "
                                   "(check --engine-url ends in /v1 and --engine-model)", retryable=False)
    return EngineUpstreamError(f"the inference engine at {url} failed ({status}): {message}", retryable=status >= 500)


def explain_transport_error(url: str, exc: httpx.HTTPError) -> str:
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return f"the inference engine at {url} cannot be reached ({type(exc).__name__}: {exc or 'no answer'})"
    if isinstance(exc, httpx.ReadTimeout):
        return f"the inference engine at {url} sent nothing for too long (--engine-timeout)"
    return f"the connection to the inference engine at {url} broke ({type(exc).__name__}: {exc})"
