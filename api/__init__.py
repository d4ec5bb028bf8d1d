"""HTTP and WebSocket surfaces: thin adapters over the chat service."""
