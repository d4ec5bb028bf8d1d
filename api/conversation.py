"""Sessions and users from request headers, the same on every chat surface.

`X-Session-Id` names the conversation (32-255 letters, digits, `_`, `-`, `:`);
without one the server makes one up and returns it in the `X-Session-Id`
response header. `X-User-Id` names its owner; without one the user is the
anonymous user "". With `--no-history` both headers are ignored.
"""

from __future__ import annotations

import re
import uuid
from typing import Mapping, Optional

from api.errors import APIError
from chat import ChatService, ConversationRef

SESSION_HEADER = "X-Session-Id"
USER_HEADER = "X-User-Id"
_SESSION_ID = re.compile(r"[A-Za-z0-9_:-]{32,255}")
_USER_ID = re.compile(r"[A-Za-z0-9_:.@+-]{1,255}")


def session_id_problem(value: str) -> Optional[str]:
    if _SESSION_ID.fullmatch(value):
        return None
    return (f"{SESSION_HEADER}: must be 32-255 characters of letters, digits, '_', '-' or ':' "
            f"(got {len(value)} characters)")


def user_id(headers: Mapping[str, str]) -> str:
    value = headers.get(USER_HEADER)
    if value is None or value == "":
        return ""
    if not _USER_ID.fullmatch(value):
        raise APIError(400, f"{USER_HEADER}: must be 1-255 characters of letters, digits, '_', '-', ':', '.', '@' or '+'",
                       param=USER_HEADER, code="invalid_header")
    return value


def conversation_from(headers: Mapping[str, str], chat: ChatService, explicit_history: bool,
                      store: bool = True) -> Optional[ConversationRef]:
    """The request's conversation, or None when the server keeps no history."""
    if chat.history is None:
        return None
    sid = headers.get(SESSION_HEADER)
    if sid is not None:
        problem = session_id_problem(sid)
        if problem:
            raise APIError(400, problem, param=SESSION_HEADER, code="invalid_header")
    return ConversationRef(session_id=sid or uuid.uuid4().hex, user_id=user_id(headers), named=sid is not None,
                           use_stored=not explicit_history, store=store)


def session_headers(conversation: Optional[ConversationRef]) -> dict[str, str]:
    return {SESSION_HEADER: conversation.session_id} if conversation is not None else {}
