"""Every read and write of conversations, sessions and traces: one class over SQLAlchemy Core.

Blocking by design (SQLAlchemy's sync engine works the same on SQLite,
PostgreSQL and MySQL); `HistoryService` runs it on its own threads.
Every method that takes a user id only ever sees that user's rows: a session
owned by someone else is reported as not existing.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import sqlalchemy as sa

from engine.text import utf8_safe
from history.tables import HistoryTables

TITLE_CHARS = 80


class SessionNotFound(LookupError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session {session_id[:64]!r} for this user")
        self.session_id = session_id


class BadCursor(ValueError):
    pass


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def iso(value: dt.datetime) -> str:
    return value.isoformat(timespec="microseconds") + "Z"


def storable(text: str) -> str:
    """Text every database takes: PostgreSQL refuses NUL characters, and no driver encodes lone surrogates."""
    return utf8_safe(text.replace("\x00", "\ufffd") if "\x00" in text else text)


def title_from(question: str) -> str:
    line = " ".join(storable(question).split())
    return line if len(line) <= TITLE_CHARS else line[:TITLE_CHARS - 1] + "…"


@dataclass
class Exchange:
    """One question and its answer, as stored."""

    session_id: str
    user_id: str
    question: str
    answer: str
    finish_reason: str
    trace_id: Optional[str]
    details: dict[str, Any]  # sources, usage, timings, status


class HistoryRepository:
    def __init__(self, engine: sa.Engine, suffix: str, max_message_chars: int = 200_000) -> None:
        self.engine = engine
        self.t = HistoryTables(suffix)
        self.max_message_chars = max_message_chars

    # ---- what the chat path needs ------------------------------------------------------------

    def owner_check(self, session_id: str, user_id: str) -> bool:
        """True when the session exists (and is this user's); SessionNotFound when it is someone else's."""
        s = self.t.sessions
        with self.engine.connect() as c:
            owner = c.execute(sa.select(s.c.user_id).where(s.c.id == session_id)).scalar()
        if owner is None:
            return False
        if owner != user_id:
            raise SessionNotFound(session_id)
        return True

    def recent_turns(self, session_id: str, user_id: str, max_turns: int) -> list[tuple[str, str]]:
        """The newest `max_turns` [question, answer] pairs of a session, oldest first."""
        if not self.owner_check(session_id, user_id):
            return []
        m = self.t.messages
        query = (sa.select(m.c.role, m.c.content).where(m.c.session_id == session_id)
                 .order_by(m.c.id.desc()).limit(max_turns * 2))
        with self.engine.connect() as c:
            rows = list(c.execute(query))[::-1]
        pairs, question = [], None
        for role, content in rows:
            if role == "user":
                question = content
            elif role == "assistant" and question is not None:
                pairs.append((question, content))
                question = None
        return pairs

    def add_exchange(self, exchange: Exchange) -> None:
        """Store a question and its answer; the session is made (titled by the question) on its first exchange."""
        now = utcnow()
        s, m = self.t.sessions, self.t.messages
        with self.engine.begin() as c:
            owner = c.execute(sa.select(s.c.user_id).where(s.c.id == exchange.session_id).with_for_update()).scalar()
            if owner is None:
                try:
                    with c.begin_nested():
                        c.execute(s.insert().values(id=exchange.session_id, user_id=exchange.user_id,
                                                    title=title_from(exchange.question), created_at=now,
                                                    updated_at=now, pinned=False))
                except sa.exc.IntegrityError:  # another instance made it a moment ago
                    owner = c.execute(sa.select(s.c.user_id).where(s.c.id == exchange.session_id)).scalar()
            if owner is not None and owner != exchange.user_id:
                raise SessionNotFound(exchange.session_id)
            if owner is not None:
                c.execute(s.update().where(s.c.id == exchange.session_id).values(updated_at=now))
            question, q_cut = self._bounded(exchange.question)
            answer, a_cut = self._bounded(exchange.answer)
            c.execute(m.insert(), [
                dict(session_id=exchange.session_id, role="user", content=question, created_at=now,
                     trace_id=exchange.trace_id, finish_reason=None, details={"truncated": True} if q_cut else None),
                dict(session_id=exchange.session_id, role="assistant", content=answer, created_at=now,
                     trace_id=exchange.trace_id, finish_reason=exchange.finish_reason,
                     details={**exchange.details, **({"truncated": True} if a_cut else {})}),
            ])

    def drop_last_exchange(self, session_id: str, user_id: str) -> bool:
        """Remove the newest question and answer (the WebUI's Regenerate replaces them)."""
        if not self.owner_check(session_id, user_id):
            return False
        m = self.t.messages
        with self.engine.begin() as c:
            rows = list(c.execute(sa.select(m.c.id, m.c.role).where(m.c.session_id == session_id)
                                  .order_by(m.c.id.desc()).limit(2)))
            if [r.role for r in rows] != ["assistant", "user"]:
                return False
            c.execute(m.delete().where(m.c.id.in_([r.id for r in rows])))
        return True

    def add_trace(self, trace: dict, session_id: Optional[str], user_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(self.t.traces.insert().values(id=trace["id"], session_id=session_id, user_id=user_id,
                                                    created_at=utcnow(), name=trace.get("name", "chat"),
                                                    spans=trace))

    def _bounded(self, text: str) -> tuple[str, bool]:
        text = storable(text)
        if len(text) <= self.max_message_chars:
            return text, False
        return text[:self.max_message_chars], True

    # ---- the history API ---------------------------------------------------------------------

    def list_sessions(self, user_id: str, limit: int, cursor: Optional[str] = None, q: Optional[str] = None) -> dict:
        s, m = self.t.sessions, self.t.messages
        query = sa.select(s).where(s.c.user_id == user_id)
        if q:
            q = storable(q)
            pattern = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            in_messages = sa.select(m.c.id).where(m.c.session_id == s.c.id, m.c.content.ilike(pattern, escape="\\"))
            query = query.where(sa.or_(s.c.title.ilike(pattern, escape="\\"), in_messages.exists()))
        if cursor:
            updated, last_id = _decode_cursor(cursor)
            query = query.where(sa.or_(s.c.updated_at < updated, sa.and_(s.c.updated_at == updated, s.c.id < last_id)))
        query = query.order_by(s.c.updated_at.desc(), s.c.id.desc()).limit(limit + 1)
        with self.engine.connect() as c:
            rows = list(c.execute(query).mappings())
        more = len(rows) > limit
        rows = rows[:limit]
        return {"sessions": [_session(r) for r in rows],
                "next_cursor": _encode_cursor(rows[-1]["updated_at"], rows[-1]["id"]) if more and rows else None}

    def get_session(self, session_id: str, user_id: str) -> dict:
        s, m = self.t.sessions, self.t.messages
        with self.engine.connect() as c:
            row = c.execute(sa.select(s).where(s.c.id == session_id, s.c.user_id == user_id)).mappings().first()
            if row is None:
                raise SessionNotFound(session_id)
            messages = list(c.execute(sa.select(m).where(m.c.session_id == session_id).order_by(m.c.id)).mappings())
        return {**_session(row), "messages": [_message(r) for r in messages]}

    def update_session(self, session_id: str, user_id: str, title: Optional[str], pinned: Optional[bool]) -> dict:
        s = self.t.sessions
        values = {k: v for k, v in (("title", storable(title) if title is not None else None), ("pinned", pinned))
                  if v is not None}
        mine = sa.and_(s.c.id == session_id, s.c.user_id == user_id)
        with self.engine.begin() as c:
            if c.execute(sa.select(s.c.id).where(mine)).first() is None:
                raise SessionNotFound(session_id)
            if values:
                c.execute(s.update().where(mine).values(**values))
            row = c.execute(sa.select(s).where(mine)).mappings().first()
        return _session(row)

    def delete_session(self, session_id: str, user_id: str) -> None:
        with self.engine.begin() as c:
            if self._delete(c, [session_id], user_id) == 0:
                raise SessionNotFound(session_id)

    def delete_all(self, user_id: str) -> int:
        s = self.t.sessions
        with self.engine.begin() as c:
            ids = list(c.execute(sa.select(s.c.id).where(s.c.user_id == user_id)).scalars())
            return self._delete(c, ids, user_id)

    def _delete(self, c: sa.Connection, ids: Sequence[str], user_id: str) -> int:
        """Children first: SQLite only honours ON DELETE CASCADE when foreign keys are switched on."""
        if not ids:
            return 0
        s, m, t = self.t.sessions, self.t.messages, self.t.traces
        owned = sa.select(s.c.id).where(s.c.id.in_(ids), s.c.user_id == user_id)
        c.execute(m.delete().where(m.c.session_id.in_(owned)))
        c.execute(t.delete().where(t.c.session_id.in_(owned)))
        return c.execute(s.delete().where(s.c.id.in_(ids), s.c.user_id == user_id)).rowcount

    def export_all(self, user_id: str) -> list[dict]:
        s = self.t.sessions
        with self.engine.connect() as c:
            ids = list(c.execute(sa.select(s.c.id).where(s.c.user_id == user_id).order_by(s.c.updated_at.desc())).scalars())
        return [self.get_session(i, user_id) for i in ids]

    def session_traces(self, session_id: str, user_id: str) -> list[dict]:
        self.get_session_row(session_id, user_id)
        t = self.t.traces
        with self.engine.connect() as c:
            rows = c.execute(sa.select(t.c.spans, t.c.created_at).where(t.c.session_id == session_id).order_by(t.c.created_at))
            return [_stored_trace(r.spans) for r in rows]

    def trace(self, trace_id: str, user_id: str) -> dict:
        t = self.t.traces
        with self.engine.connect() as c:
            spans = c.execute(sa.select(t.c.spans).where(t.c.id == trace_id, t.c.user_id == user_id)).scalar()
        if spans is None:
            raise LookupError(f"no trace {trace_id[:64]!r} for this user")
        return _stored_trace(spans)

    def get_session_row(self, session_id: str, user_id: str) -> dict:
        s = self.t.sessions
        with self.engine.connect() as c:
            row = c.execute(sa.select(s).where(s.c.id == session_id, s.c.user_id == user_id)).mappings().first()
        if row is None:
            raise SessionNotFound(session_id)
        return _session(row)

    # ---- retention ---------------------------------------------------------------------------

    def prune(self, max_age_days: float, max_sessions_per_user: int) -> int:
        """Delete sessions past the age limit, then each user's oldest unpinned ones past the cap."""
        s = self.t.sessions
        removed = 0
        with self.engine.begin() as c:
            if max_age_days > 0:
                cutoff = utcnow() - dt.timedelta(days=max_age_days)
                for user_id, session_id in list(c.execute(sa.select(s.c.user_id, s.c.id).where(s.c.updated_at < cutoff))):
                    removed += self._delete(c, [session_id], user_id)
            if max_sessions_per_user > 0:
                over = sa.select(s.c.user_id).group_by(s.c.user_id).having(sa.func.count() > max_sessions_per_user)
                for user_id in list(c.execute(over).scalars()):
                    pinned = c.execute(sa.select(sa.func.count()).where(s.c.user_id == user_id, s.c.pinned.is_(True))).scalar()
                    keep = max(0, max_sessions_per_user - pinned)  # pinned sessions count, and are never removed
                    ids = list(c.execute(sa.select(s.c.id).where(s.c.user_id == user_id, s.c.pinned.is_(False))
                                         .order_by(s.c.updated_at.desc()).offset(keep)).scalars())
                    removed += self._delete(c, ids, user_id)
        return removed


def _session(row) -> dict:
    return {"id": row["id"], "title": row["title"], "created_at": iso(row["created_at"]),
            "updated_at": iso(row["updated_at"]), "pinned": bool(row["pinned"])}


def _message(row) -> dict:
    out = {"role": row["role"], "content": row["content"], "created_at": iso(row["created_at"]),
           "trace_id": row["trace_id"]}
    if row["finish_reason"]:
        out["finish_reason"] = row["finish_reason"]
    out.update(row["details"] or {})
    return out


def _stored_trace(spans: Any) -> dict:
    return spans if isinstance(spans, dict) else json.loads(spans)


def _encode_cursor(updated_at: dt.datetime, session_id: str) -> str:
    raw = json.dumps([updated_at.isoformat(), session_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        updated, session_id = json.loads(raw)
        return dt.datetime.fromisoformat(updated), str(session_id)
    except (ValueError, TypeError, binascii.Error):
        raise BadCursor("cursor: not a cursor this server gave out") from None
