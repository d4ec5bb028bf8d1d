"""Assembling the page and mounting it on the API app at `/`."""

from __future__ import annotations

from typing import Optional

import gradio as gr
from fastapi import FastAPI

from api.sessions import SessionSigner
from chat import ChatService
from knowledge.service import KnowledgeService
from webui.ui.chat_tab import ChatTab
from webui.ui.conversations import ConversationSidebar, WebUsers, browser_state
from webui.ui.langchain_tab import DEFAULT_KB, LangChainTab

TITLE = "ChatLLM-WebUI"
CSS = """
#chat-window, #kb-chat-window { min-height: 320px; }
@media (max-width: 640px) { .gradio-container { padding: 4px !important; } }
"""


def status_line(chat: ChatService, knowledge: Optional[KnowledgeService]) -> str:
    model = f"**Model:** `{chat.model_name}`"
    if knowledge is None:
        return f"{model} · **Knowledge base:** off"
    bases = knowledge.names()
    chunks = knowledge.total_chunks()
    kb = (f"{len(bases)} base{'s' if len(bases) != 1 else ''}, {chunks} chunks loaded" if chunks else "empty (upload files in the LangChain tab)")
    return f"{model} · **Knowledge base:** {kb} · embeddings `{knowledge.embedder.name}`"


def build_blocks(chat: ChatService, knowledge: Optional[KnowledgeService], concurrency: int,
                 signer: Optional[SessionSigner] = None, token: Optional[str] = None) -> gr.Blocks:
    refresh = lambda: status_line(chat, knowledge)  # noqa: E731
    users = WebUsers(signer)
    with gr.Blocks(title=TITLE) as blocks:
        gr.Markdown(f"# {TITLE}")
        status = gr.Markdown(refresh(), elem_id="status-line")
        # with history on, the browser remembers its user id and each tab's open conversation
        browser = browser_state(token) if chat.history is not None else gr.State({})
        sidebars = {}
        with gr.Tabs():
            if chat.history is not None:
                sidebars["chat"] = ConversationSidebar(chat.history, "chat", users)
            chat_tab = ChatTab(chat, sidebars.get("chat"), browser)
            chat_tab.render()
            if knowledge is not None:
                if chat.history is not None:
                    sidebars["langchain"] = ConversationSidebar(chat.history, "langchain", users)
                langchain = LangChainTab(chat, knowledge, refresh, sidebars.get("langchain"), browser)
                langchain.render(status)
        if knowledge is not None:
            blocks.load(lambda: (refresh(), *langchain.listing(DEFAULT_KB)), None,
                        [status, langchain.file_table, langchain.delete_choice], queue=False)
        windows = {"chat": chat_tab.chatbot, "langchain": langchain.chatbot if knowledge is not None else None}
        for tab, sidebar in sidebars.items():
            # a reload (or a restart) brings each tab's conversation back
            blocks.load(sidebar.load, [browser], [windows[tab], browser, sidebar.sessions, sidebar.title])
    # several browser users stream at once; the engine interleaves them
    blocks.queue(default_concurrency_limit=concurrency)
    return blocks


def mount_ui(chat: ChatService, knowledge: Optional[KnowledgeService], concurrency: int = 16, max_upload_mb: float = 20.0):
    """An app part: mounts the page at `/`.

    With --token the request guard sends a browser without a session to the
    login page (api/login.py) before any of the page or its endpoints is served.
    """

    def mount(app: FastAPI) -> None:
        blocks = build_blocks(chat, knowledge, concurrency, app.state.sessions, app.state.settings.token)
        gr.mount_gradio_app(
            app, blocks, path="/", max_file_size=f"{int(max_upload_mb * 1024)}kb", footer_links=["api"],
            run_history=False, css=CSS, theme=gr.themes.Soft(),
        )

    return mount
