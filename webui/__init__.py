"""The command-line entry point and (later) the Gradio WebUI."""
