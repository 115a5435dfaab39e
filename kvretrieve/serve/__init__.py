"""`kvretrieve serve`: an OpenAI-compatible HTTP server over one LLM (app.py), speaking the wire
format of protocol.py."""
from .app import Server

__all__ = ["Server"]
