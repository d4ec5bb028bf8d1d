"""The Gradio WebUI "ChatLLM-WebUI": a Chat tab and a LangChain tab over the shared services."""

from webui.ui.app import mount_ui

__all__ = ["mount_ui"]
