"""One error shape for every surface, made by one mapper from exceptions."""

from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from chat import KnowledgeUnavailableError, RequestLimitError
from history import HistoryUnavailable, SessionNotFound
from history.repository import BadCursor
from engine import EngineError, EngineOverloadedError, PromptTooLongError
from engine.remote_errors import EngineRejectedError, EngineUnavailableError, EngineUpstreamError
from knowledge.loaders import LoaderError
from knowledge.names import NameError_
from knowledge.service import IngestQueueFullError
from knowledge.store import (
    EmbeddingMismatchError,
    EmptyKnowledgeBaseError,
    KnowledgeBaseDeletedError,
    KnowledgeBaseError,
    KnowledgeStoreUnavailableError,
    UnknownKnowledgeBaseError,
    UnusableKnowledgeBaseError,
)

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status, reported as {"error": {...}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, retry_after: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """The first failing field, named as a dotted path, with pydantic's reason."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]  # where FastAPI found it, not which field it is
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    message = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=param, code="invalid_value")


def to_api_error(exc: BaseException) -> APIError:
    """Map anything a handler can raise to status + body."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (ValidationError, RequestValidationError)):
        return from_validation_error(exc)
    if isinstance(exc, SessionNotFound):
        return APIError(404, str(exc), type_="not_found_error", param="X-Session-Id", code="session_not_found")
    if isinstance(exc, HistoryUnavailable):
        return APIError(503, str(exc), type_="server_error", code="history_unavailable", retry_after=5)
    if isinstance(exc, BadCursor):
        return APIError(400, str(exc), param="cursor")
    if isinstance(exc, RequestLimitError):
        return APIError(400, str(exc), param=exc.param, code="limit_exceeded")
    if isinstance(exc, IngestQueueFullError):
        return APIError(503, str(exc), type_="overloaded_error", code="ingest_queue_full", retry_after=exc.retry_after)
    if isinstance(exc, KnowledgeStoreUnavailableError):
        return APIError(503, str(exc), type_="server_error", code="knowledge_store_unavailable", retry_after=5)
    if isinstance(exc, UnusableKnowledgeBaseError):
        return APIError(409, str(exc), type_="conflict_error", param="kb", code="knowledge_base_unusable")
    if isinstance(exc, KnowledgeBaseDeletedError):
        return APIError(409, str(exc), type_="conflict_error", param="kb", code="knowledge_base_deleted")
    if isinstance(exc, KnowledgeUnavailableError):
        return APIError(400, f"langchain: {exc}", param="langchain")
    if isinstance(exc, UnknownKnowledgeBaseError):
        return APIError(404, str(exc), type_="not_found_error", param="kb", code="knowledge_base_not_found")
    if isinstance(exc, EmptyKnowledgeBaseError):
        return APIError(400, str(exc), param="kb", code="knowledge_base_empty")
    if isinstance(exc, EmbeddingMismatchError):
        return APIError(409, str(exc), type_="conflict_error", param="kb", code="embedding_model_mismatch")
    if isinstance(exc, NameError_):
        return APIError(400, str(exc), param="kb")
    if isinstance(exc, (KnowledgeBaseError, LoaderError)):
        return APIError(400, str(exc))
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param="prompt", code="context_length_exceeded")
    if isinstance(exc, EngineUnavailableError):
        return APIError(503, str(exc), type_="server_error", code="engine_unavailable", retry_after=5)
    if isinstance(exc, EngineUpstreamError):
        return APIError(502, str(exc), type_="server_error", code="engine_error")
    if isinstance(exc, EngineRejectedError):
        return APIError(400, str(exc), code="engine_rejected")
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, str(exc), type_="overloaded_error", code="server_overloaded", retry_after=5)
    if isinstance(exc, EngineError):
        return APIError(500, str(exc), type_="server_error")
    log.exception("unexpected error", exc_info=exc)
    return APIError(500, "internal error: the request could not be completed", type_="server_error")


def error_response(exc: BaseException, request_id: Optional[str] = None) -> JSONResponse:
    err = to_api_error(exc)
    body = err.body()
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    if request_id is not None:
        body["error"]["request_id"] = request_id
        headers["X-Request-Id"] = request_id
    return JSONResponse(body, status_code=err.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    async def handle_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), type_="http_error"))

    app.add_exception_handler(APIError, handle)
    app.add_exception_handler(RequestValidationError, handle)
    app.add_exception_handler(ValidationError, handle)
    app.add_exception_handler(EngineError, handle)
    for exc_type in (KnowledgeBaseError, KnowledgeUnavailableError, NameError_, RequestLimitError, IngestQueueFullError,
                     SessionNotFound, HistoryUnavailable, BadCursor):
        app.add_exception_handler(exc_type, handle)
    app.add_exception_handler(StarletteHTTPException, handle_http)
