"""The LangChain tab: upload and vectorise documents, manage bases, chat with sources."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable, Optional

import gradio as gr

from api.errors import to_api_error
from chat import ChatService, KnowledgeQuery
from knowledge.jobs import Job
from knowledge.loaders import supported_extensions
from knowledge.names import NameError_, check_kb_name, safe_file_name
from knowledge.service import KnowledgeService, Upload
from knowledge.store import UnknownKnowledgeBaseError
from webui.ui.answering import stream_answer
from webui.ui.chat_tab import render_sampling_controls
from webui.ui.common import slider_defaults
from webui.ui.conversations import ConversationSidebar

DEFAULT_KB = "default"


def job_report(job: Job) -> str:
    rows = ["| file | result | chunks | reason |", "|---|---|---|---|"]
    for f in job.files:
        rows.append(f"| {f.name} | {f.status} | {f.chunks} | {f.reason or ''} |")
    counts = {s: sum(1 for f in job.files if f.status == s) for s in ("added", "replaced", "unchanged", "failed")}
    head = f"**Knowledge base `{job.kb}`: {job.state}.** " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    if job.error:
        head += f"\n\n**Error:** {job.error}"
    return head + "\n\n" + "\n".join(rows)


class LangChainTab:
    def __init__(self, chat: ChatService, knowledge: KnowledgeService, refresh_status: Callable[[], str],
                 sidebar: Optional[ConversationSidebar], browser: gr.components.Component) -> None:
        self.chat = chat
        self.sidebar = sidebar
        self.browser = browser
        self.knowledge = knowledge
        self.refresh_status = refresh_status
        self.max_bytes = int(knowledge.config.max_upload_mb * 1024 * 1024)

    def render(self, status: gr.Markdown) -> None:
        self.status = status
        with gr.Tab("LangChain", id="langchain"):
            with gr.Row():
                if self.sidebar is not None:
                    self.sidebar.render()
                with gr.Column(scale=2, min_width=280):
                    self._render_knowledge_panel()
                with gr.Column(scale=3, min_width=300):
                    self._render_chat()
        self._wire()

    def _render_knowledge_panel(self) -> None:
        names = self.knowledge.names()
        self.kb = gr.Dropdown(
            choices=sorted(set(names) | {DEFAULT_KB}), value=DEFAULT_KB, allow_custom_value=True,
            label="Knowledge base (pick one, or type a new name)", elem_id="kb-select",
        )
        self.files = gr.File(
            file_count="multiple", file_types=supported_extensions(), label="Upload .txt .md .docx .pdf",
            elem_id="kb-files",
        )
        self.vectorise = gr.Button("Vectorstore knowledge", variant="primary", elem_id="kb-vectorise")
        self.result = gr.Markdown(elem_id="kb-result")
        self.file_table = gr.Dataframe(headers=["file", "chunks", "pages", "added"], label="Files in this base",
                                       interactive=False, elem_id="kb-file-table")
        with gr.Row():
            self.delete_choice = gr.Dropdown(choices=[], label="File to delete", min_width=160, scale=3)
            self.delete = gr.Button("Delete file", variant="stop", min_width=80, scale=1, elem_id="kb-delete")
        self.top_k = gr.Slider(1, 10, value=3, step=1, label="top-k passages", elem_id="kb-top-k")

    def _render_chat(self) -> None:
        self.chatbot = gr.Chatbot(label="Answers from the knowledge base", height=480, elem_id="kb-chat-window",
                                  buttons=["copy"], placeholder="Ask about your documents.")
        with gr.Row(equal_height=True):
            self.textbox = gr.Textbox(placeholder="Ask a question about the documents", show_label=False, scale=5,
                                      min_width=200, elem_id="kb-chat-input")
            self.send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="kb-chat-send")
        with gr.Row():
            self.stop = gr.Button("Stop", variant="stop", min_width=80)
            self.clear = gr.Button("Clear", min_width=80)
        self.params = render_sampling_controls("kb", slider_defaults(self.chat.sampling_defaults))

    def _wire(self) -> None:
        listing = [self.file_table, self.delete_choice]
        self.vectorise.click(self._vectorise, [self.files, self.kb], [self.result, self.kb, self.status, *listing],
                             concurrency_id="ingest", concurrency_limit=1, show_progress_on=[self.result])
        self.kb.change(self.listing, [self.kb], listing, queue=False)
        self.delete.click(self._delete, [self.kb, self.delete_choice], [self.result, self.status, *listing])
        inputs = [self.textbox, self.chatbot, self.kb, self.top_k, self.browser, *self.params]
        outputs = [self.textbox, self.chatbot, self.browser]
        send = self.send.click(self._respond, inputs, outputs, concurrency_id="chat")
        submit = self.textbox.submit(self._respond, inputs, outputs, concurrency_id="chat")
        self.stop.click(None, None, None, cancels=[send, submit])
        if self.sidebar is None:
            self.clear.click(lambda: ([], ""), None, [self.chatbot, self.textbox], queue=False)
            return
        self.sidebar.wire(self.chatbot, self.browser)
        for event in (send, submit):
            event.then(self.sidebar.refresh, [self.sidebar.search, self.browser], [self.sidebar.sessions], queue=False)
        self.clear.click(self.sidebar.new_chat, [self.browser], [self.chatbot, self.browser, self.sidebar.sessions,
                                                                 self.sidebar.title], queue=False)

    def listing(self, kb: str):
        """Rows of the file table and the delete choices for base `kb`."""
        try:
            files = self.knowledge.get(kb).files()
        except (UnknownKnowledgeBaseError, NameError_):
            files = []
        rows = [[f["name"], f["chunks"], f["pages"] or "", f["added_at"]] for f in files]
        names = [f["name"] for f in files]
        return rows, gr.update(choices=names, value=names[0] if names else None)

    async def _vectorise(self, paths, kb, progress=gr.Progress()):
        if not paths:
            raise gr.Error("Choose one or more files to upload first.")
        try:
            kb = check_kb_name((kb or DEFAULT_KB).strip())
            uploads = []
            for path in paths:
                name = safe_file_name(Path(path).name)
                data = Path(path).read_bytes()
                if len(data) > self.max_bytes:
                    raise gr.Error(f"{name} is larger than the upload limit of {self.knowledge.config.max_upload_mb:g} MB.")
                uploads.append(Upload(name, data))
        except NameError_ as exc:
            raise gr.Error(str(exc)) from None
        try:
            job, future = self.knowledge.submit(kb, uploads)
        except Exception as exc:  # a full upload queue, a base that cannot take files
            raise gr.Error(to_api_error(exc).message) from None
        while not future.done():
            fraction = job.chunks_done / job.chunks_total if job.chunks_total else 0.0
            progress(fraction, desc=f"{job.state}: {job.chunks_done}/{job.chunks_total} chunks")
            await asyncio.sleep(0.2)
        progress(1.0, desc=job.state)
        rows, choices = self.listing(kb)
        names = sorted(set(self.knowledge.names()) | {DEFAULT_KB})
        return job_report(job), gr.update(choices=names, value=kb), self.refresh_status(), rows, choices

    async def _delete(self, kb, name):
        if not name:
            raise gr.Error("Pick a file to delete.")
        try:
            removed = await asyncio.to_thread(self.knowledge.get(kb).delete_file, name)
        except KeyError:
            raise gr.Error(f"{name} is not in knowledge base {kb}.") from None
        except Exception as exc:
            raise gr.Error(to_api_error(exc).message) from None
        rows, choices = self.listing(kb)
        return f"Deleted **{name}** ({removed} chunks) from `{kb}`.", self.refresh_status(), rows, choices

    async def _respond(self, prompt, history, kb, top_k, browser, max_new_tokens, temperature, top_p, top_k_tokens,
                       do_sample, request: gr.Request = None):
        params = (max_new_tokens, temperature, top_p, top_k_tokens, do_sample)
        if not (prompt or "").strip():
            yield gr.update(), history, browser
            return
        conversation = None
        if self.sidebar is not None:
            conversation, browser = self.sidebar.conversation(request, browser)
        query = KnowledgeQuery(kb=(kb or DEFAULT_KB).strip(), top_k=int(top_k))
        async for messages in stream_answer(self.chat, history or [], prompt, "", params, knowledge=query,
                                            conversation=conversation):
            yield "", messages, browser
