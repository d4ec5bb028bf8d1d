"""The conversation history API: sessions, their messages, exports and traces, per user (`X-User-Id`)."""

from __future__ import annotations

from typing import Literal, Optional

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from api.conversation import USER_HEADER, session_id_problem, user_id
from api.errors import APIError
from history import HistoryService

router = APIRouter(prefix="/api", tags=["history"])

SESSION_ID = Path(min_length=1, max_length=255, description="the session id (X-Session-Id of its requests)")


class SessionPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: Optional[str] = Field(None, min_length=1, max_length=200)
    pinned: Optional[bool] = None


def _history(request: Request) -> HistoryService:
    history = request.app.state.chat.history
    if history is None:
        raise APIError(404, "this server keeps no conversation history (--no-history)", type_="not_found_error",
                       code="history_disabled")
    return history


def _session_id(session_id: str) -> str:
    problem = session_id_problem(session_id)
    if problem:
        raise APIError(400, problem.replace("X-Session-Id", "session id"), param="session_id")
    return session_id


@router.get("/sessions", summary=f"The user's sessions (by {USER_HEADER}), newest first; q searches titles and messages")
async def list_sessions(request: Request, limit: int = Query(20, ge=1, le=200),
                        cursor: Optional[str] = Query(None, max_length=1024),
                        q: Optional[str] = Query(None, min_length=1, max_length=200)) -> dict:
    history = _history(request)
    return await history.call(history.repo.list_sessions, user_id(request.headers), limit, cursor, q)


@router.delete("/sessions", summary="Delete all of the user's sessions")
async def delete_all(request: Request) -> dict:
    history = _history(request)
    return {"deleted": await history.call(history.repo.delete_all, user_id(request.headers))}


@router.get("/sessions/export", summary="All of the user's sessions with their messages, as JSON")
async def export_all(request: Request, format: Literal["json"] = "json") -> JSONResponse:
    history = _history(request)
    sessions = await history.call(history.repo.export_all, user_id(request.headers))
    return JSONResponse({"sessions": sessions}, headers={"Content-Disposition": 'attachment; filename="sessions.json"'})


@router.get("/sessions/{session_id}", summary="One session with its messages")
async def get_session(request: Request, session_id: str = SESSION_ID) -> dict:
    history = _history(request)
    return await history.call(history.repo.get_session, _session_id(session_id), user_id(request.headers))


@router.patch("/sessions/{session_id}", summary="Rename and/or pin a session")
async def patch_session(body: SessionPatch, request: Request, session_id: str = SESSION_ID) -> dict:
    history = _history(request)
    if body.title is None and body.pinned is None:
        raise APIError(400, "nothing to change: send title and/or pinned", param="title")
    return await history.call(history.repo.update_session, _session_id(session_id), user_id(request.headers),
                              body.title, body.pinned)


@router.delete("/sessions/{session_id}", summary="Delete a session, its messages and traces")
async def delete_session(request: Request, session_id: str = SESSION_ID) -> dict:
    history = _history(request)
    await history.call(history.repo.delete_session, _session_id(session_id), user_id(request.headers))
    return {"deleted": session_id}


@router.get("/sessions/{session_id}/export", summary="One session as JSON or Markdown")
async def export_session(request: Request, session_id: str = SESSION_ID,
                         format: Literal["json", "markdown"] = "json") -> Response:
    history = _history(request)
    session = await history.call(history.repo.get_session, _session_id(session_id), user_id(request.headers))
    if format == "json":
        return JSONResponse(session, headers={"Content-Disposition": f'attachment; filename="{session_id}.json"'})
    return PlainTextResponse(as_markdown(session), media_type="text/markdown; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{session_id}.md"'})


@router.get("/sessions/{session_id}/traces", summary="The traces of a session's answers, oldest first")
async def session_traces(request: Request, session_id: str = SESSION_ID) -> dict:
    history = _history(request)
    traces = await history.call(history.repo.session_traces, _session_id(session_id), user_id(request.headers))
    return {"traces": traces}


@router.get("/traces/{trace_id}", summary="One trace: its spans with timings and attributes")
async def get_trace(request: Request, trace_id: str = Path(min_length=1, max_length=64)) -> dict:
    history = _history(request)
    try:
        return await history.call(history.repo.trace, trace_id, user_id(request.headers))
    except LookupError as exc:
        raise APIError(404, str(exc), type_="not_found_error", param="trace_id", code="trace_not_found") from None


def as_markdown(session: dict) -> str:
    lines = [f"# {session['title'] or 'Conversation'}", "", f"Session `{session['id']}`, started {session['created_at']}", ""]
    for message in session["messages"]:
        who = {"user": "User", "assistant": "Assistant"}.get(message["role"], message["role"])
        lines += [f"**{who}** ({message['created_at']}):", "", message["content"], ""]
        for source in message.get("sources") or []:
            lines.append(f"> source: {source.get('file')}" + (f", page {source['page']}" if source.get("page") else ""))
    return "\n".join(lines).rstrip() + "\n"
