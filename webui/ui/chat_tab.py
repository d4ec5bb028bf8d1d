"""The Chat tab: streaming chat with Send/Stop/Regenerate/Clear and sampling controls."""

from __future__ import annotations

import gradio as gr

from typing import Optional

from chat import ChatService
from webui.ui.answering import stream_answer
from webui.ui.common import last_user_turn, slider_defaults
from webui.ui.conversations import ConversationSidebar


def render_sampling_controls(prefix: str, defaults: dict) -> list[gr.components.Component]:
    """max_new_tokens, temperature, top_p, top_k, do_sample, opening at the API's defaults for this model."""
    with gr.Accordion("Parameters", open=False, elem_id=f"{prefix}-params"):
        with gr.Row():
            max_new_tokens = gr.Slider(1, 4096, value=defaults["max_new_tokens"], step=1, label="max_new_tokens",
                                       min_width=120, elem_id=f"{prefix}-max-new-tokens")
            temperature = gr.Slider(0.0, 2.0, value=defaults["temperature"], step=0.05, label="temperature",
                                    min_width=120, elem_id=f"{prefix}-temperature")
        with gr.Row():
            top_p = gr.Slider(0.01, 1.0, value=defaults["top_p"], step=0.01, label="top_p", min_width=120,
                              elem_id=f"{prefix}-top-p")
            top_k = gr.Slider(0, 100, value=defaults["top_k"], step=1, label="top_k (0 = off)", min_width=120,
                              elem_id=f"{prefix}-top-k")
        do_sample = gr.Checkbox(value=defaults["do_sample"], label="do_sample (off = greedy)", elem_id=f"{prefix}-do-sample")
    return [max_new_tokens, temperature, top_p, top_k, do_sample]


class ChatTab:
    """`sidebar` is None when the server keeps no history; `browser` then is a plain per-page state."""

    def __init__(self, chat: ChatService, sidebar: Optional[ConversationSidebar], browser: gr.components.Component) -> None:
        self.chat = chat
        self.sidebar = sidebar
        self.browser = browser

    def render(self) -> None:
        with gr.Tab("Chat", id="chat"):
            with gr.Row():
                if self.sidebar is not None:
                    self.sidebar.render()
                with gr.Column(scale=4, min_width=300):
                    self._render_chat()
        self._wire()

    def _render_chat(self) -> None:
        self.chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chat-window",
                                  buttons=["copy"], placeholder="Ask anything. Answers stream here.")
        with gr.Row(equal_height=True):
            self.textbox = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                      scale=5, min_width=200, elem_id="chat-input", lines=1, max_lines=8)
            self.send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="chat-send")
        with gr.Row():
            self.stop = gr.Button("Stop", variant="stop", min_width=80, elem_id="chat-stop")
            self.regenerate = gr.Button("Regenerate", min_width=80, elem_id="chat-regenerate")
            self.clear = gr.Button("Clear", min_width=80, elem_id="chat-clear")
        self.system_prompt = gr.Textbox(label="System prompt", placeholder="(the model's own default when empty)", lines=2)
        self.params = render_sampling_controls("chat", slider_defaults(self.chat.sampling_defaults))

    def _wire(self) -> None:
        inputs = [self.textbox, self.chatbot, self.system_prompt, self.browser, *self.params]
        outputs = [self.textbox, self.chatbot, self.browser]
        send = self.send.click(self._respond, inputs, outputs, concurrency_id="chat")
        submit = self.textbox.submit(self._respond, inputs, outputs, concurrency_id="chat")
        regen = self.regenerate.click(self._regenerate, [self.chatbot, self.system_prompt, self.browser, *self.params],
                                      [self.chatbot, self.browser], concurrency_id="chat")
        # cancelling the event cancels its task, which closes the stream and aborts the request in the engine
        self.stop.click(None, None, None, cancels=[send, submit, regen])
        if self.sidebar is None:
            self.clear.click(lambda: ([], ""), None, [self.chatbot, self.textbox], queue=False)
            return
        self.sidebar.wire(self.chatbot, self.browser)
        for event in (send, submit, regen):
            event.then(self.sidebar.refresh, [self.sidebar.search, self.browser], [self.sidebar.sessions], queue=False)
        # Clear starts a new conversation; the old one stays in the list
        self.clear.click(self.sidebar.new_chat, [self.browser], [self.chatbot, self.browser, self.sidebar.sessions,
                                                                 self.sidebar.title], queue=False)

    async def _respond(self, prompt, history, system_prompt, browser, max_new_tokens, temperature, top_p, top_k,
                       do_sample, request: gr.Request = None):
        params = (max_new_tokens, temperature, top_p, top_k, do_sample)
        if not (prompt or "").strip():
            yield gr.update(), history, browser
            return
        conversation, browser = self._conversation(request, browser)
        async for messages in stream_answer(self.chat, history or [], prompt, system_prompt, params,
                                            conversation=conversation):
            yield "", messages, browser

    async def _regenerate(self, history, system_prompt, browser, max_new_tokens, temperature, top_p, top_k, do_sample,
                          request: gr.Request = None):
        params = (max_new_tokens, temperature, top_p, top_k, do_sample)
        earlier, prompt = last_user_turn(history or [])
        if prompt is None:
            yield history, browser
            return
        conversation, browser = self._conversation(request, browser)
        if conversation is not None:  # the new answer replaces the stored one
            await self.sidebar.drop_last(conversation)
        async for messages in stream_answer(self.chat, earlier, prompt, system_prompt, params, conversation=conversation):
            yield messages, browser

    def _conversation(self, request, browser):
        if self.sidebar is None:
            return None, browser
        return self.sidebar.conversation(request, browser)
