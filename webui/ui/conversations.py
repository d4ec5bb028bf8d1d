"""The conversation sidebar of both tabs: the user's stored sessions, new chat, search, rename,
delete and export, and a session reopened into the chat window after a reload or a restart.

Who the user is: the login name when the browser logged in (with --token),
otherwise an id made once per browser and kept in its localStorage
(`gr.BrowserState`), which also remembers each tab's open session.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from api.history_api import as_markdown
from api.sessions import COOKIE, SessionSigner
from chat import ConversationRef
from history import HistoryService, SessionNotFound
from webui.ui.answering import details_block, sources_block

_USER_ID = re.compile(r"[A-Za-z0-9_:.@+-]{1,255}")
LIST_LIMIT = 50


def browser_state(token: Optional[str]) -> gr.BrowserState:
    # a secret that survives restarts (a random one per start would make every browser forget its
    # conversations); it only keeps the stored value private to this service, since a user id is
    # self-asserted anyway, as X-User-Id is on the API
    secret = hashlib.sha256(b"chatllm-webui browser state:" + (token or "").encode("utf-8")).hexdigest()
    return gr.BrowserState({"user": "", "chat": "", "langchain": ""}, storage_key="chatllm-webui-conversations",
                           secret=secret)


def login_user_id(name: str) -> str:
    """A login name as an X-User-Id: itself when it fits the header's characters, else a stable digest of it."""
    return name if _USER_ID.fullmatch(name) else "login-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:24]


class WebUsers:
    def __init__(self, signer: Optional[SessionSigner]) -> None:
        self.signer = signer

    def identify(self, request: Optional[gr.Request], browser: Optional[dict]) -> tuple[str, dict]:
        """The user id of this browser, and the browser state (given an id of its own on first use)."""
        browser = dict(browser or {})
        if self.signer is not None and request is not None:
            cookies = getattr(request, "cookies", None) or {}
            name = self.signer.user(cookies.get(COOKIE))
            if name:
                return login_user_id(name), browser
        if not _USER_ID.fullmatch(browser.get("user") or ""):
            browser["user"] = "browser-" + uuid.uuid4().hex
        return browser["user"], browser


def conversation_for(users: WebUsers, tab: str, request: Optional[gr.Request], browser: Optional[dict]
                     ) -> tuple[ConversationRef, dict]:
    """The tab's open session (a new one when none is open); the chat window holds the history it sends."""
    user, browser = users.identify(request, browser)
    session = browser.get(tab) or uuid.uuid4().hex
    browser[tab] = session
    return ConversationRef(session_id=session, user_id=user, named=True, use_stored=False, store=True), browser


def window_messages(session: dict, traces: dict[str, dict]) -> list[dict]:
    """A stored session as chat-window messages, with each answer's sources and details blocks."""
    out: list[dict] = []
    for message in session["messages"]:
        out.append({"role": message["role"], "content": message["content"]})
        if message["role"] != "assistant":
            continue
        if message.get("sources") is not None:
            out.append(sources_block(message["sources"]))
        trace = traces.get(message.get("trace_id") or "")
        if trace is not None:
            out.append(details_block(trace))
    return out


class ConversationSidebar:
    def __init__(self, history: HistoryService, tab: str, users: WebUsers) -> None:
        self.history = history
        self.tab = tab
        self.users = users

    def render(self) -> None:
        p = self.tab
        with gr.Column(scale=1, min_width=220, elem_id=f"{p}-sidebar"):
            self.new = gr.Button("+ New chat", size="sm", elem_id=f"{p}-new-chat")
            self.search = gr.Textbox(placeholder="Search conversations", show_label=False, elem_id=f"{p}-search",
                                     max_length=200)
            self.sessions = gr.Radio(choices=[], label="Conversations", elem_id=f"{p}-sessions")
            with gr.Accordion("Rename · delete · export", open=False, elem_id=f"{p}-manage"):
                self.title = gr.Textbox(label="Title", max_length=200, elem_id=f"{p}-title")
                with gr.Row():
                    self.rename = gr.Button("Rename", size="sm", elem_id=f"{p}-rename")
                    self.delete = gr.Button("Delete", size="sm", variant="stop", elem_id=f"{p}-delete")
                with gr.Row():
                    self.export_md = gr.Button("Export .md", size="sm", elem_id=f"{p}-export-md")
                    self.export_json = gr.Button("Export .json", size="sm", elem_id=f"{p}-export-json")
                self.download = gr.File(label="Download", interactive=False, elem_id=f"{p}-download")

    def wire(self, chatbot: gr.Chatbot, browser: gr.BrowserState) -> None:
        listing = [self.search, browser]
        self.new.click(self.new_chat, [browser], [chatbot, browser, self.sessions, self.title], queue=False)
        self.search.change(self.refresh, listing, [self.sessions], queue=False)
        self.sessions.input(self._open, [self.sessions, browser], [chatbot, browser, self.title])
        # rename, delete and export act on the conversation selected in the list (else the open one)
        renaming = [self.title, self.search, self.sessions, browser]
        self.rename.click(self._rename, renaming, [self.sessions])
        self.title.submit(self._rename, renaming, [self.sessions])  # Enter in the title box renames too
        self.delete.click(self._delete, [self.search, self.sessions, browser], [chatbot, browser, self.sessions, self.title])
        self.export_md.click(self._export, [gr.State("markdown"), self.sessions, browser], [self.download])
        self.export_json.click(self._export, [gr.State("json"), self.sessions, browser], [self.download])

    async def refresh(self, q: Optional[str], browser: Optional[dict], request: gr.Request = None):
        user, browser = self.users.identify(request, browser)
        page = await self.history.call(self.history.repo.list_sessions, user, LIST_LIMIT, None, (q or "").strip() or None)
        choices = [(("📌 " if s["pinned"] else "") + (s["title"] or "(untitled)"), s["id"]) for s in page["sessions"]]
        current = browser.get(self.tab)
        return gr.update(choices=choices, value=current if any(c[1] == current for c in choices) else None)

    async def load(self, browser: Optional[dict], request: gr.Request = None) -> tuple[list[dict], dict, Any, str]:
        """On page load: the tab's open session back in the window, and the list."""
        user, browser = self.users.identify(request, browser)
        messages, title = [], ""
        session_id = browser.get(self.tab)
        if session_id:
            try:
                messages, title = await self._window(session_id, user)
            except SessionNotFound:
                browser[self.tab] = ""
        return messages, browser, await self.refresh("", browser, request), title

    async def _window(self, session_id: str, user: str) -> tuple[list[dict], str]:
        repo = self.history.repo
        session = await self.history.call(repo.get_session, session_id, user)
        traces = await self.history.call(repo.session_traces, session_id, user)
        return window_messages(session, {t["id"]: t for t in traces}), session["title"]

    def conversation(self, request: Optional[gr.Request], browser: Optional[dict]) -> tuple[ConversationRef, dict]:
        return conversation_for(self.users, self.tab, request, browser)

    async def drop_last(self, conversation: ConversationRef) -> None:
        try:
            await self.history.call(self.history.repo.drop_last_exchange, conversation.session_id, conversation.user_id)
        except SessionNotFound:
            pass

    async def new_chat(self, browser: Optional[dict], request: gr.Request = None):
        _, browser = self.users.identify(request, browser)
        browser[self.tab] = ""
        return [], browser, gr.update(value=None), ""

    async def _open(self, session_id: Optional[str], browser: Optional[dict], request: gr.Request = None):
        user, browser = self.users.identify(request, browser)
        if not session_id:
            return gr.update(), browser, gr.update()
        messages, title = await self._window(session_id, user)
        browser[self.tab] = session_id
        return messages, browser, title

    async def _rename(self, title: str, q: Optional[str], selected: Optional[str], browser: Optional[dict],
                      request: gr.Request = None):
        user, browser = self.users.identify(request, browser)
        session_id, title = selected or browser.get(self.tab), (title or "").strip()
        if session_id and title:
            try:
                await self.history.call(self.history.repo.update_session, session_id, user, title[:200], None)
            except SessionNotFound:
                gr.Warning("This conversation is not stored yet: send a message first.")
        return await self.refresh(q, browser, request)

    async def _delete(self, q: Optional[str], selected: Optional[str], browser: Optional[dict], request: gr.Request = None):
        user, browser = self.users.identify(request, browser)
        session_id = selected or browser.get(self.tab)
        if session_id:
            try:
                await self.history.call(self.history.repo.delete_session, session_id, user)
            except SessionNotFound:
                pass
        if session_id and session_id != browser.get(self.tab):  # another conversation than the open one
            return gr.update(), browser, await self.refresh(q, browser, request), gr.update()
        browser[self.tab] = ""
        return [], browser, await self.refresh(q, browser, request), ""

    async def _export(self, fmt: str, selected: Optional[str], browser: Optional[dict],
                      request: gr.Request = None) -> Optional[str]:
        user, browser = self.users.identify(request, browser)
        session_id = selected or browser.get(self.tab)
        if not session_id:
            gr.Warning("Open or start a conversation first.")
            return None
        try:
            session = await self.history.call(self.history.repo.get_session, session_id, user)
        except SessionNotFound:
            gr.Warning("This conversation is not stored yet: send a message first.")
            return None
        folder = Path(tempfile.mkdtemp(prefix="chatllm-export-"))
        if fmt == "markdown":
            path = folder / f"{session_id}.md"
            path.write_text(as_markdown(session), encoding="utf-8")
        else:
            path = folder / f"{session_id}.json"
            path.write_text(json.dumps(session, ensure_ascii=False, indent=1), encoding="utf-8")
        return str(path)
